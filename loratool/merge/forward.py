"""A transformers model run in bounded memory: built without weights, each block's weights read
from the checkpoint just before its forward and dropped right after (``parity --forward``, issue 14).

The model is built from its config with every parameter on the meta device (buffers, such as the
rotary ``inv_freq``, computed for real as usual); PEFT may then wrap it (``low_cpu_mem_usage``: the
adapters' own small weights are real, the base layers stay on meta). ``stream_weights`` hooks the
units that own the base weights:

* each element of a ``ModuleList`` (a decoder layer, with everything under it);
* every other module that owns parameters (embeddings, the final norm, lm_head), or the outermost
  PEFT layer around it (a DoRA layer reads its base layer's weight outside the base layer's forward).

A unit's pre-hook reads its meta parameters from the checkpoint (``BaseCheckpoint``: loratool's own
reads; a tied weight from the tensor it is tied to) as float32, and its post-hook puts the meta
parameters back. The peak is one decoder layer in float32 (or the embeddings/lm_head) plus the
activations, whatever the model's size. The values are those ``from_pretrained(dtype=float32)``
gives: the same tensors cast the same way.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Iterator

from loratool.boundary import open_regular
from loratool.errors import UsageError
from loratool.safetensors_io import TensorRef, torch_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from loratool.checkpoint import BaseCheckpoint


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Every parameter registered inside goes to the meta device; buffers stay real (what
    accelerate's ``init_empty_weights(include_buffers=False)`` does, without needing it)."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


@contextlib.contextmanager
def adapters_on_cpu() -> Iterator[None]:
    """While PEFT wraps an ``empty_model``: the adapters' weights it loads go to the CPU (in the
    base layer's dtype, as usual), not to the meta device of the base layer they sit on."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    where = BaseTunerLayer._get_base_layer_device_and_dtype

    def cpu(self, base_layer):
        device, dtype = where(self, base_layer)
        return ("cpu" if device is not None and device.type == "meta" else device), dtype

    BaseTunerLayer._get_base_layer_device_and_dtype = cpu
    try:
        yield
    finally:
        BaseTunerLayer._get_base_layer_device_and_dtype = where


def empty_model(cls, config) -> "torch.nn.Module":
    """``cls.from_config(config)`` in float32 with its parameters on meta, in eval mode."""
    import torch

    with meta_parameters():
        model = cls.from_config(config, dtype=torch.float32)
    return model.eval()


def _units(root: "torch.nn.Module") -> list["torch.nn.Module"]:
    """The modules whose forward materializes the weights under them (module docstring)."""
    import torch

    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:  # pragma: no cover - PEFT is there whenever --forward runs
        BaseTunerLayer = ()
    units: list[torch.nn.Module] = []

    def walk(module, tuner) -> None:
        if isinstance(module, torch.nn.ModuleList):
            for child in module.children():
                units.append(child)  # a whole block, nested lists included
            return
        if tuner is None and BaseTunerLayer and isinstance(module, BaseTunerLayer):
            tuner = module
        if any(True for _ in module.parameters(recurse=False)) and (tuner or module) not in units:
            units.append(tuner or module)
        for child in module.children():
            walk(child, tuner)

    walk(root, None)
    return units


class NotStreamable(Exception):
    """The checkpoint's tensors are not the parameters of the model its config builds, one for one
    (names transformers maps or tensors it fuses while loading): load the whole model instead."""


BLOCK_BYTES = 8 << 20
FLOATS = ("F64", "F32", "F16", "BF16")


class WeightStream:
    """The hooks of ``stream_weights``; ``live_elems`` counts the parameter elements materialized
    now, ``peak`` the most there were at once."""

    def __init__(self, model: "torch.nn.Module", ck: "BaseCheckpoint", names: dict):
        self.model, self.ck, self.names = model, ck, names
        self.handles: list = []
        self.live_elems = 0
        self.peak = 0
        self.fds: dict = {}
        self.block = bytearray(BLOCK_BYTES)

    def read(self, key: str) -> "torch.Tensor":
        """Checkpoint tensor ``key`` as float32, read in blocks into the float32 tensor (no
        whole-tensor copy in the file's dtype on the way)."""
        import torch

        ref = self.ck.ref(key)
        if not isinstance(ref, TensorRef) or ref.dtype not in FLOATS:  # e.g. a 4-bit weight, dequantized
            return self.ck.read(key).to(torch.float32)
        out = torch.empty(ref.shape, dtype=torch.float32)
        flat, numel = out.view(-1), ref.info.numel
        size = ref.nbytes // max(1, numel)
        per = len(self.block) // size
        path = ref.file.path
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = open_regular(path)
        for i in range(0, numel, per):
            n = min(per, numel - i)
            view, got = memoryview(self.block)[:n * size], 0
            while got < n * size:
                k = os.preadv(fd, [view[got:]], ref.info.start + i * size + got)
                if k <= 0:
                    raise UsageError(f"{path}: truncated while reading tensor {ref.info.name!r}")
                got += k
            flat[i:i + n] = torch.frombuffer(self.block, dtype=torch_dtype(ref.dtype), count=n)
        return out

    def _load(self, unit) -> None:
        for module in unit.modules():
            for pname, p in list(module._parameters.items()):
                key = self.names.get((id(module), pname))
                if p is None or p.device.type != "meta" or key is None:
                    continue
                t = self.materialize(module, pname, key, p)
                module._parameters[pname] = t
                module._loratool_meta = getattr(module, "_loratool_meta", {})
                module._loratool_meta[pname] = p
                self.live_elems += t.numel()
        self.peak = max(self.peak, self.live_elems)

    def materialize(self, module, pname: str, key: str, meta) -> "torch.nn.Parameter":
        """The real parameter for ``module.<pname>`` (now ``meta``) from checkpoint tensor ``key``:
        float32, in the meta parameter's shape (a subclass may build another kind, e.g. 4-bit)."""
        import torch

        t = self.read(key)
        if tuple(t.shape) != tuple(meta.shape):  # a checkpoint transformers converts while loading
            raise NotStreamable(f"{self.ck.path}: tensor {key!r} has shape {list(t.shape)}, the model "
                                f"built from its config.json expects {list(meta.shape)}")
        return torch.nn.Parameter(t, requires_grad=False)

    def _release(self, unit) -> None:
        for module in unit.modules():
            meta = module.__dict__.pop("_loratool_meta", None)
            for pname, p in (meta or {}).items():
                self.live_elems -= module._parameters[pname].numel()
                module._parameters[pname] = p

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        for module in self.model.modules():  # after an error inside a forward
            self._release(module)
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def stream_weights(model: "torch.nn.Module", ck: "BaseCheckpoint", cls: type = WeightStream) -> WeightStream:
    """Hook ``model`` (built by ``empty_model``, maybe wrapped by PEFT) so that its meta
    parameters are read from ``ck`` per unit, around each unit's forward. Every meta parameter
    must name a checkpoint tensor (itself or a tensor it is tied to); persistent buffers the
    checkpoint holds are loaded once. ``cls``: the ``WeightStream`` (sub)class whose
    ``materialize`` builds each parameter."""
    import torch

    names: dict[tuple[int, str], str] = {}
    # every name a parameter goes by (tied weights: several), inner model names first
    aliases: dict[int, list[str]] = {}
    owners: dict[int, list[tuple[torch.nn.Module, str]]] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for pname, p in module._parameters.items():
            if p is not None and p.device.type != "meta" and p.is_floating_point() and p.dtype != torch.float32:
                # what PEFT assigned as saved (a modules_to_save copy in bf16): float32, as
                # load_state_dict copies it into a float32 model
                p.data = p.data.to(torch.float32)
            if p is not None and p.device.type == "meta":
                aliases.setdefault(id(p), []).append(_plain(f"{mname}.{pname}" if mname else pname))
                owners.setdefault(id(p), []).append((module, pname))
    for pid, found in aliases.items():
        key = next((k for k in map(ck.tensor_name, found) if k is not None), None)
        if key is None:
            raise NotStreamable(f"{ck.path}: holds no tensor for parameter {found[0]!r} of the model its "
                                "config.json builds")
        for module, pname in owners[pid]:
            names[(id(module), pname)] = key
    for mname, module in model.named_modules():
        for bname, b in module._buffers.items():
            key = ck.tensor_name(_plain(f"{mname}.{bname}" if mname else bname))
            if b is not None and bname not in module._non_persistent_buffers_set and key is not None:
                module._buffers[bname] = ck.read(key).to(b.dtype)
    stream = cls(model, ck, names)
    for unit in _units(model):
        stream.handles.append(unit.register_forward_pre_hook(lambda m, args: stream._load(m)))
        stream.handles.append(unit.register_forward_hook(lambda m, args, out: stream._release(m)))
    return stream


def _plain(name: str) -> str:
    """A parameter's name in the checkpoint's terms: PEFT's wrappers taken out
    (``base_model.model.`` and ``.base_layer``; a modules_to_save ``original_module``)."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model."):]
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")
