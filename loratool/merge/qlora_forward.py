"""The QLoRA model as trained: the reference of ``parity --forward`` for a checkpoint merged with
``--base-precision`` (issue 16).

A QLoRA run holds the base in 4 bits and trains the adapter on top of it, unmerged. Loaded with
transformers' ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=..,
bnb_4bit_use_double_quant=.., bnb_4bit_compute_dtype=torch.float32)``, that model has:

* every ``torch.nn.Linear`` replaced by bitsandbytes' ``Linear4bit``, except the modules
  transformers keeps in 16 bits (``get_keys_to_not_convert``: the output embeddings, tied weights,
  the last module; and the model's ``_keep_in_fp32_modules``);
* each such weight quantized by ``Params4bit(W, quant_type, blocksize, compress_statistics)`` (the
  blocksize is 64 through transformers; ``Params4bit`` takes others);
* PEFT's bitsandbytes LoRA layer around each targeted ``Linear4bit``.

Here W is the checkpoint's tensor in its stored dtype (the model loaded as saved, e.g. bfloat16, as
QLoRA recipes load it), so the codes and absmax are those of the weights ``merge --base-precision``
adds the deltas to. Everything else runs in float32, like the rest of ``parity --forward``: each
4-bit layer multiplies by code·absmax computed in float32 (bitsandbytes 0.50's CPU ``gemm_4bit``
dequantizes in the activations' dtype), where the merge holds dequant(quant(W)) rounded to W's
dtype as ``dequantize_4bit`` returns it (what a bfloat16-compute QLoRA run multiplies by): for a
bfloat16 base the two differ by that rounding, for a float32 base not at all. bitsandbytes'
AVX512-BF16 packed CPU kernel (bfloat16 arithmetic) is switched off, so that the 4-bit layers run
as dequantize-then-float32-matmul on every CPU.

Without bitsandbytes the reference is the same model with plain ``Linear`` layers whose weights are
that float32 code·absmax, computed by loratool (``loratool.quant.bnb``, bit for bit with
bitsandbytes: ``tests/test_quant_bnb.py``), and PEFT's plain LoRA layers; the report says which
reference ran.

Memory stays bounded as in ``loratool.merge.forward``: the model is built on the meta device and
each unit's weights are read (and quantized) just before its forward and dropped after it
(``QLoRAStream``). ``quantize_loaded`` does the same to a whole model loaded by
``from_pretrained``, for checkpoints that cannot be streamed.

GPT-2's ``Conv1D`` layers, which transformers also quantizes, stay 16-bit here (``merge
--base-precision`` does not requantize them either).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loratool.merge.forward import WeightStream
from loratool.quant.bnb import QuantSpec

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from loratool.checkpoint import BaseCheckpoint


def bnb_version() -> str | None:
    """bitsandbytes' version when it is installed (and imports), else None."""
    try:
        import bitsandbytes
    except Exception:  # noqa: BLE001 - a broken install (no native library) counts as absent
        return None
    return getattr(bitsandbytes, "__version__", "?")


def describe(spec: QuantSpec, via_bnb: bool) -> str:
    """The reference's name, for the report: ``qlora: nf4, blocksize 64, double-quant, via ...``."""
    import peft

    what = f"qlora: {spec.quant_type}, blocksize {spec.blocksize}" + (", double-quant" if spec.double_quant else "")
    if via_bnb:
        return f"{what}, via bitsandbytes {bnb_version()} + peft {peft.__version__}"
    return f"{what}, via loratool's dequant(quant(W)) + peft {peft.__version__} (bitsandbytes not installed)"


@dataclass
class Quantized:
    """The weights the reference holds in 4 bits: checkpoint-style names, and the ids of the
    modules that own them (PEFT keeps these objects as its layers' ``base_layer``)."""

    spec: QuantSpec
    via_bnb: bool
    names: list[str] = field(default_factory=list)
    modules: set[int] = field(default_factory=set)


def kept_16bit(model: "torch.nn.Module") -> list[str]:
    """The module names transformers' bitsandbytes quantizer leaves unquantized."""
    try:
        from transformers.quantizers.base import get_keys_to_not_convert

        skip = list(get_keys_to_not_convert(model))
    except Exception:  # noqa: BLE001 - another transformers: its rule's core, the output embeddings
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        skip = [n for n, m in model.named_modules() if out is not None and m is out]
    return skip + list(getattr(model, "_keep_in_fp32_modules", None) or [])


def _converted(name: str, skip: list[str]) -> bool:
    """transformers' ``should_convert_module``: no skip pattern matches ``name``."""
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # pragma: no cover - another transformers: prefix or suffix match
        return not any(name == k or name.startswith(k + ".") or name.endswith(k) for k in skip)
    return should_convert_module(name, skip)


def _linears(model: "torch.nn.Module") -> list[tuple[str, "torch.nn.Linear"]]:
    import torch

    skip = kept_16bit(model)
    return [(n, m) for n, m in model.named_modules() if type(m) is torch.nn.Linear and _converted(n, skip)]


_LINEAR4BIT: list[type] = []


def linear4bit_class() -> type:
    """bitsandbytes' ``Linear4bit``, whose forward on a weight still on the meta device (never
    materialized: the model reads it outside its unit's forward) raises as torch does on meta
    tensors, so that ``forward_parity`` loads the whole model instead."""
    if not _LINEAR4BIT:
        import bitsandbytes as bnb

        class Linear4bit(bnb.nn.Linear4bit):
            def forward(self, x):
                if self.weight.device.type == "meta":
                    raise NotImplementedError("a 4-bit weight is still on the meta device")
                return super().forward(x)

        _LINEAR4BIT.append(Linear4bit)
    return _LINEAR4BIT[0]


def _linear4bit(linear: "torch.nn.Linear", spec: QuantSpec) -> "torch.nn.Module":
    """bitsandbytes' ``Linear4bit`` in place of ``linear``, its weight on the meta device (as
    transformers' ``replace_with_bnb_linear`` makes it); the bias is ``linear``'s own."""
    import torch

    with torch.device("meta"):
        new = linear4bit_class()(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                compute_dtype=torch.float32, compress_statistics=spec.double_quant,
                                quant_type=spec.quant_type, quant_storage=torch.uint8)
    new.weight.blocksize = spec.blocksize
    if linear.bias is not None:
        new.bias = linear.bias
    new.support_avx512bf16_for_cpu = False  # dequantize + float32 matmul on every CPU (module docstring)
    new.source_cls = type(linear)
    new.requires_grad_(False)
    return new


def quantize_empty(model: "torch.nn.Module", spec: QuantSpec, via_bnb: bool) -> Quantized:
    """Before PEFT wraps ``model`` (built by ``forward.empty_model``): with bitsandbytes, its
    quantized Linears become meta ``Linear4bit`` layers; without, they stay and are marked. The
    weights are made by ``QLoRAStream`` as their units run."""
    q = Quantized(spec, via_bnb)
    for name, linear in _linears(model):
        module = _linear4bit(linear, spec) if via_bnb else linear
        if via_bnb:
            model.set_submodule(name, module)
        q.names.append(f"{name}.weight")
        q.modules.add(id(module))
    if via_bnb:
        model.is_loaded_in_4bit = True  # what PEFT asks before it dispatches its bitsandbytes layers
    return q


def quantize_loaded(model: "torch.nn.Module", ck: "BaseCheckpoint", spec: QuantSpec, via_bnb: bool) -> Quantized:
    """``quantize_empty`` for a whole model loaded by ``from_pretrained`` (float32): each quantized
    Linear's weight from its float32 values cast back to the checkpoint's stored dtype (exact: the
    float32 values are that dtype's), made at once."""
    import torch

    from loratool.safetensors_io import torch_dtype

    q = Quantized(spec, via_bnb)
    for name, linear in _linears(model):
        key = ck.tensor_name(f"{name}.weight")
        stored = torch_dtype(ck.ref(key).dtype) if key is not None else torch.float32
        w = linear.weight.detach().to(stored)
        if via_bnb:
            module = _linear4bit(linear, spec)
            module.weight = quantized_weight(w, spec, True, module)
            model.set_submodule(name, module)
        else:
            linear.weight = quantized_weight(w, spec, False, linear)
        q.names.append(f"{name}.weight")
    if via_bnb:
        model.is_loaded_in_4bit = True
    return q


def quantized_weight(w: "torch.Tensor", spec: QuantSpec, via_bnb: bool, module) -> "torch.nn.Parameter":
    """The reference's weight from ``w`` (the stored dtype): bitsandbytes' ``Params4bit`` quantized on
    the CPU, or a float32 Parameter holding what its layer multiplies by: code·absmax in float32
    (``bnb.dequantize_4bit_f32`` of loratool's ``quantize_4bit``)."""
    import numpy as np
    import torch

    if via_bnb:
        from bitsandbytes.nn import Params4bit

        return Params4bit(w.contiguous(), requires_grad=False, blocksize=spec.blocksize,
                          compress_statistics=spec.double_quant, quant_type=spec.quant_type,
                          quant_storage=torch.uint8, module=module).to("cpu")
    from loratool.quant import bnb as qbnb

    names = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    if w.dtype not in names:
        w = w.to(torch.float32)
    dtype = names[w.dtype]
    raw = w.contiguous().view(torch.int16).numpy().view(np.uint16) if dtype == "BF16" else w.contiguous().numpy()
    x = qbnb.from_dtype_bits(raw.reshape(-1), dtype)
    packed, _ = qbnb.quantize_4bit(x, spec.blocksize, spec.quant_type)
    v = qbnb.dequantize_4bit_f32(packed, qbnb.scales(x, spec), x.size, spec.blocksize, spec.quant_type)
    return torch.nn.Parameter(torch.from_numpy(v).reshape(w.shape), requires_grad=False)


class QLoRAStream(WeightStream):
    """``forward.WeightStream`` whose quantized weights are made 4-bit (or dequant(quant(W))) from
    the checkpoint's stored tensor as their unit's forward starts."""

    quantized: Quantized

    def materialize(self, module, pname: str, key: str, meta):
        if pname != "weight" or id(module) not in self.quantized.modules:
            return super().materialize(module, pname, key, meta)
        from loratool.merge.forward import NotStreamable

        w = self.ck.read(key)
        if tuple(w.shape) != tuple(meta.shape):
            raise NotStreamable(f"{self.ck.path}: tensor {key!r} has shape {list(w.shape)}, the model built "
                                f"from its config.json expects {list(meta.shape)}")
        return quantized_weight(w, self.quantized.spec, self.quantized.via_bnb, module)

    def _release(self, unit) -> None:
        super()._release(unit)
        for module in unit.modules():  # the QuantState Params4bit left on its Linear4bit
            if id(module) in self.quantized.modules and getattr(module, "quant_state", None) is not None:
                module.quant_state = None


def qlora_stream(quantized: Quantized) -> type:
    """The ``stream_weights`` class for one model's ``Quantized``."""
    return type("QLoRAStreamFor", (QLoRAStream,), {"quantized": quantized})
