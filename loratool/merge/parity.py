"""Parity: does a merged checkpoint hold base + the adapters' deltas, within one rounding?

``check_parity`` streams the base and the merged checkpoint side by side, tensor by tensor and row
block by row block, and recomputes each touched tensor in float64 with the merge's formula. LoRA
terms on Linear, Conv1D and Embedding weights and lora_B biases go through ``paritystream`` (numpy,
mapped reads, a few threads; untouched tensors compared as raw bytes meanwhile: issue 14); DoRA,
Conv2d, modules_to_save and --dtype casts are checked here in torch (``engines.TensorMath``: the same
terms, coefficients, DoRA rescaling). A merged value M passes when

    |M − X| ≤ ulp(X) + bound          X = the float64 value, ulp in M's dtype

one rounding to M's dtype (≤ ½ ulp) with room for the float32 accumulation before it (PEFT's
Embedding merge rounds twice, which stays within 1 ulp). ``bound`` is the float32 accumulation
error bound γ·(|W| + Σ|c|·|B|·|A|) (γ = (r + 4)·2⁻²⁴, more for DoRA's norm): where the delta
cancels W (or its r products cancel each other) X is small, and a correct float32 merge can be a few
ulps of X away from it, in any output dtype.
Untouched tensors must be byte-identical (or equal to the base cast to M's dtype after --dtype);
modules_to_save tensors equal to the replacement.

``tensor_distance`` (how far one tensor is from another, in ulps of its dtype) also gives
``unmerge``'s distance to the original base.

``forward_parity`` runs the model through transformers on fixed token ids twice: the base with the
adapters applied unmerged by PEFT, and the merged checkpoint, and compares the logits. Both run
streamed (``loratool.merge.forward``): one decoder layer's float32 weights in memory at a time.

A checkpoint merged with ``--base-precision`` (its lineage says so, or ``base_precision``) is
checked against what that merge computes, round(dequant(quant(W)) + ΔW) (the base rows through
``basequant.Requantize``, in torch), and its forward reference is the QLoRA model as trained: the
base's Linear layers in 4 bits (bitsandbytes when installed) and the adapters unmerged by PEFT
(``loratool.merge.qlora_forward``).
"""

from __future__ import annotations

import contextlib
import gc
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence


from loratool.boundary import open_regular
from loratool.errors import UsageError
from loratool.schemas.merge import (  # noqa: F401  (the models, re-exported)
    TOLERANCE,
    ForwardParity,
    LayerDistance,
    LayerParity,
    ParityReport,
)
from loratool.formats import get_format
from loratool.manifest import BaseGuard
from loratool.merge import paritystream
from loratool.merge.basequant import Requantize
from loratool.merge.engines import TensorMath, row_spans, tensor_spans
from loratool.merge.plan import CONVERTIBLE, Action, TensorPlan, plan_merge
from loratool.merge.specs import LoadedAdapter, _specs, load_adapters
from loratool.safetensors_io import TensorRef, torch_dtype

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from loratool.quant.bnb import QuantSpec

U32 = paritystream.U32  # float32 unit roundoff
# safetensors dtype -> (mantissa bits, smallest normal exponent)
FLOAT_FORMATS = paritystream.FORMATS  # safetensors dtype -> (raw elements, mantissa bits, smallest normal exponent)


def ulp(x: "torch.Tensor", dtype: str) -> "torch.Tensor":
    """The spacing of ``dtype`` values around each (float64) value of ``x``: the one ulp rule,
    ``paritystream.exponent_floor`` (X's power of two, at least the smallest normal) times
    2^-mantissa, for the tensors parity checks in torch."""
    import numpy as np
    import torch

    xn = np.ascontiguousarray(x.detach().to("cpu", torch.float64).numpy())
    u = paritystream.exponent_floor(xn, dtype, np.empty_like(xn))
    return torch.from_numpy(u * 2.0 ** -paritystream.FORMATS[dtype][1])


# -- reading ------------------------------------------------------------------------------------

class _Rows:
    """Row blocks of tensors, read with pread (files opened read-only, kept open)."""

    def __init__(self):
        self.fds: dict[Path, int] = {}

    def __enter__(self) -> "_Rows":
        return self

    def __exit__(self, *exc) -> None:
        for fd in self.fds.values():
            os.close(fd)

    def raw(self, ref: TensorRef, start: int, n: int) -> bytes:
        path = ref.file.path
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = open_regular(path)
        out = bytearray()
        while len(out) < n:
            data = os.pread(fd, n - len(out), ref.info.start + start + len(out))
            if not data:
                raise UsageError(f"{path}: truncated while reading tensor {ref.info.name!r}")
            out += data
        return bytes(out)

    def rows(self, ref: TensorRef, i: int, j: int) -> "torch.Tensor":
        import torch

        from loratool.quant.stored import DequantizedRef

        if isinstance(ref, DequantizedRef):  # a base stored quantized: the rows it dequantizes to
            data = ref.rows(i, j)
            return torch.frombuffer(bytearray(data.tobytes()), dtype=torch_dtype(ref.dtype)).reshape(data.shape) \
                if data.size else torch.empty(data.shape, dtype=torch_dtype(ref.dtype))
        shape = tuple(ref.shape)
        rows = shape[0] if shape else 1
        row_bytes = ref.nbytes // max(1, rows)
        data = self.raw(ref, i * row_bytes, (j - i) * row_bytes)
        dt = torch_dtype(ref.dtype)
        t = torch.frombuffer(bytearray(data), dtype=dt) if data else torch.empty(0, dtype=dt)
        return t.reshape((j - i,) + shape[1:] if shape else ())


def _spans_of(ref: TensorRef, block_bytes: int = 8 << 20) -> list[tuple[int, int]]:
    rows = ref.shape[0] if ref.shape else 1
    row_bytes = max(1, ref.nbytes // max(1, rows))
    return row_spans(rows, max(1, block_bytes // row_bytes))


# -- per-tensor checks --------------------------------------------------------------------------

def _bound(math64: TensorMath, w: "torch.Tensor", exact: "torch.Tensor", i: int, j: int):
    """The float32 accumulation error bound for rows [i, j) (see the module docstring)."""
    import torch
    from dataclasses import replace

    mag = w.to(torch.float64).abs()
    r = 0
    for term, b, a in math64.factors:
        pos = replace(term, coef=abs(term.coef))
        if term.part == "weight" and term.module.needs_base:  # OFT, IA3, GLoRA: ΔW from the base rows
            mag.add_(math64.base_delta(pos, w.abs(), i, j).abs())
        elif b is None:  # a kind without a low-rank form (full): its dense delta rows
            mag.add_(math64.delta(pos, None, None, i, j).abs())
        else:
            mag.add_(math64.delta(pos, b.abs(), a.abs() if a is not None else None, i, j))
        r += term.module.rank if term.part == "weight" else 1
    gamma = (r + 4) * U32
    if math64.magnitude is None:
        return gamma * mag
    # DoRA: V's error is scaled by m/‖V‖; the norm (a float32 sum over the row), the division
    # and the product add a relative error
    factor = math64.dora_factor(math64.values(w, i, j), i, j).abs()
    n = max(exact.shape) if exact.dim() else 1  # the length of the norm's sum, or more
    return gamma * mag * factor + (n + r + 8) * U32 * exact.abs()


def _check_merge(t: TensorPlan, m: TensorRef, rows: _Rows, progress) -> LayerParity:
    import torch

    math64 = TensorMath(t, torch.float64)
    max_abs = max_ulp = max_ratio = 0.0
    bad = 0
    # the base rows as the merge computed with them: --base-precision's dequant(quant(W))
    # (``basequant.Requantize``), or a base stored quantized (bitsandbytes ``Dequantize``, GPTQ/AWQ
    # ``basepacked.DequantizePacked``), from the bytes the merge's reader hands them
    apply = t.transform.prepare(t) if t.transform is not None else None
    for i, j in tensor_spans(t):
        w = _base_rows(t, rows, apply, i, j)
        got = rows.rows(m, i, j).to(torch.float64)
        exact = math64.rows(w, i, j)
        err = (got - exact).abs()
        u = ulp(exact, m.dtype)
        tol = u + _bound(math64, w, exact, i, j)
        bad += int((~(err <= tol)).sum())  # NaN counts as bad
        if err.numel():
            finite = torch.nan_to_num(err, nan=float("inf"))
            max_abs = max(max_abs, float(finite.max()))
            max_ulp = max(max_ulp, float((finite / u).max()))
            max_ratio = max(max_ratio, float((finite / tol).max()))
        if progress:
            progress(2 * (j - i) * (m.nbytes // max(1, m.shape[0] if m.shape else 1)))
    kind = "bias" if t.terms[0].part == "bias" else t.kind.value
    return LayerParity(name=t.name, action="merge", kind=kind, dora=t.dora, dtype=m.dtype, numel=t.numel,
                       adapters=sorted({term.adapter for term in t.terms}), max_abs_err=max_abs,
                       max_ulp_err=max_ulp, max_err_over_tol=max_ratio, bad=bad, ok=bad == 0)


def _check_replace(t: TensorPlan, m: TensorRef, rows: _Rows) -> LayerParity:
    import torch

    from loratool.adapter import load_tensor

    want = load_tensor(t.replacement).to(torch_dtype(m.dtype)).reshape(t.shape)
    got = rows.rows(m, 0, m.shape[0] if m.shape else 1)
    same = torch.equal(want.view(-1).view(torch.uint8), got.reshape(-1).view(torch.uint8)) if want.numel() else True
    err = (got.to(torch.float64) - want.to(torch.float64)).abs()
    max_abs = float(err.max()) if err.numel() else 0.0
    return LayerParity(name=t.name, action="replace", kind=None, dtype=m.dtype, numel=t.numel,
                       adapters=[], max_abs_err=max_abs, max_ulp_err=0.0 if same else float("inf"),
                       max_err_over_tol=0.0 if same else float("inf"),
                       bad=0 if same else int((err != 0).sum()), ok=same)


def _base_rows(t: TensorPlan, rows: _Rows, apply, i: int, j: int) -> "torch.Tensor":
    """Rows [i, j) of the base tensor as the merge computed with them: read, then, with ``apply``
    (``t.transform.prepare(t)``), transformed from the bytes the merge's reader hands over."""
    import torch

    if apply is None:
        return rows.rows(t.src, i, j)
    shape = tuple(t.src.shape)
    row_bytes = t.src.nbytes // max(1, shape[0] if shape else 1)
    raw = bytearray(rows.raw(t.src, i * row_bytes, (j - i) * row_bytes))
    out, n = apply(raw, len(raw), i, j)  # a thread's reused buffer: copied out at once
    w = torch.frombuffer(bytearray(out.tobytes()[:n]), dtype=torch_dtype(t.src.dtype))
    return w.reshape((j - i,) + shape[1:])


def _same_untouched(t: TensorPlan, m: TensorRef, rows: _Rows) -> bool:
    """Byte equality with the base (or with the base cast to the merged dtype; a base stored
    quantized, as its transform dequantizes it)."""
    import torch

    if t.transform is not None:
        apply = t.transform.prepare(t)
        for i, j in tensor_spans(t):
            want = _base_rows(t, rows, apply, i, j).to(torch_dtype(m.dtype))
            if not torch.equal(want.reshape(-1).view(torch.uint8), rows.rows(m, i, j).reshape(-1).view(torch.uint8)):
                return False
        return True
    if m.dtype == t.src.dtype:
        step = 16 << 20
        for off in range(0, t.src.nbytes, step):
            n = min(step, t.src.nbytes - off)
            if rows.raw(t.src, off, n) != rows.raw(m, off, n):
                return False
        return True
    for i, j in _spans_of(t.src):
        want = rows.rows(t.src, i, j).to(torch_dtype(m.dtype))
        got = rows.rows(m, i, j)
        if not torch.equal(want.reshape(-1).view(torch.uint8), got.reshape(-1).view(torch.uint8)):
            return False
    return True


def tensor_distance(name: str, got: TensorRef, ref: TensorRef, scale: TensorRef | None = None) -> LayerDistance:
    """How far ``got`` is from ``ref``, element-wise. Ulps are those of ``ref``'s dtype at the
    largest magnitude among got, ref and ``scale`` (for an unmerge: the merged tensor, whose
    rounding sets the error)."""
    import torch

    differing = 0
    max_abs = max_ulp = 0.0
    with _Rows() as rows:
        for i, j in _spans_of(ref):
            a = rows.rows(got, i, j).to(torch.float64)
            b = rows.rows(ref, i, j).to(torch.float64)
            err = (a - b).abs()
            differing += int((err != 0).sum())
            if err.numel():
                max_abs = max(max_abs, float(err.max()))
                mag = torch.maximum(a.abs(), b.abs())
                if scale is not None:
                    mag = torch.maximum(mag, rows.rows(scale, i, j).to(torch.float64).abs())
                u = ulp(mag, ref.dtype) if ref.dtype in FLOAT_FORMATS else torch.ones_like(b)
                max_ulp = max(max_ulp, float((err / u).max()))
    return LayerDistance(name=name, dtype=ref.dtype, numel=ref.info.numel, differing=differing,
                         max_abs=max_abs, max_ulp=max_ulp)


def _layer(t: TensorPlan, m: TensorRef, st: "paritystream.Stats") -> LayerParity:
    kind = "bias" if t.terms[0].part == "bias" else t.kind.value
    return LayerParity(name=t.name, action="merge", kind=kind, dora=t.dora, dtype=m.dtype, numel=t.numel,
                       adapters=sorted({term.adapter for term in t.terms}), max_abs_err=st.max_abs,
                       max_ulp_err=st.max_ulp, max_err_over_tol=st.max_ratio, bad=st.bad, ok=st.bad == 0)


def _check_others(jobs: list[tuple[TensorPlan, TensorRef]], report: ParityReport, cb) -> list[LayerParity]:
    """The tensors the numpy stream does not take, in torch: DoRA, Conv2d, modules_to_save, casts,
    and merged weights whose base rows the merge transformed (a --base-precision merge added the
    deltas to dequant(quant(W)); a base stored in bitsandbytes 4 bits, GPTQ or AWQ is dequantized)."""
    import torch

    layers = []
    with torch.inference_mode(), _Rows() as rows:
        for t, m in jobs:
            if t.action is Action.MERGE:
                layers.append(_check_merge(t, m, rows, cb))
            elif t.action is Action.REPLACE:
                layers.append(_check_replace(t, m, rows))
            else:
                if not _same_untouched(t, m, rows):
                    report.untouched_mismatched.append(t.name)
                if cb:
                    cb(2 * t.src.nbytes)
    return layers


# -- the entry points ---------------------------------------------------------------------------

def check_parity(
    base: str | os.PathLike,
    merged: str | os.PathLike,
    adapters,
    forward: bool = False,
    min_top1: float = 0.95,
    progress: Callable[[int, int], None] | None = None,
    *,
    allow_base_mismatch: bool = False,
    require_manifest: bool = False,
    format: str | None = None,
    base_precision: "str | QuantSpec | None" = None,
) -> ParityReport:
    """Check that ``merged`` is ``base`` with ``adapters`` (``"a:0.7,b:0.3"`` or specs) merged,
    tensor by tensor; with ``forward`` also compare logits through transformers + PEFT.

    ``base_precision``: what the merge added the deltas to, as ``merge --base-precision`` spells
    it; None reads it from the merged checkpoint's lineage (``loratool.json``; "keep" without one).
    With a 4-bit spec the tensors are checked against round(dequant(quant(W)) + ΔW) and the
    forward reference is the QLoRA model as trained (``loratool.merge.qlora_forward``).

    Each adapter's manifest is checked against ``base`` first, as ``merge`` does: another base
    raises ``BaseMismatchError`` unless ``allow_base_mismatch``; ``require_manifest`` refuses
    adapters without one. What it could not verify is in ``report.base_warnings``."""
    from loratool.checkpoint import BaseCheckpoint
    from loratool.resolve import resolve_base

    specs = _specs(adapters)
    base_path = resolve_base(base)  # hf://owner/name[@rev]: downloaded into the Hugging Face cache
    base_ck = BaseCheckpoint(base_path)
    loaded = load_adapters(specs, format=format)
    guard = BaseGuard(allow_base_mismatch, require_manifest)
    for la in loaded:  # before the merged checkpoint is read
        guard(la.adapter, base_ck)
    merged_ck = BaseCheckpoint(merged)
    spec = parity_precision(merged, base_precision)
    plan = plan_merge(base_ck, loaded, base_precision=spec)
    report = ParityReport(base=str(base), merged=str(merged), adapters=[str(s) for s in specs],
                          ok=True, layers=[], untouched=0, base_warnings=guard.messages,
                          base_precision=str(spec) if spec is not None else "keep")
    merged_names = set(merged_ck.names())
    report.unexpected = sorted(merged_names - set(base_ck.names()))
    total = sum(t.src.nbytes for t in plan.tensors() if t.name in merged_names) * 2
    cb = (lambda n: progress(n, total)) if progress else None
    # what is streamed in numpy (paritystream), compared as raw bytes, or checked in torch
    streamed: list[paritystream.StreamJob] = []
    raw: list[TensorPlan] = []
    other: list[tuple[TensorPlan, TensorRef]] = []
    order: dict[str, int] = {}
    for t in plan.tensors():
        if t.name not in merged_names:
            report.missing.append(t.name)
            continue
        m = merged_ck.ref(t.name)
        if tuple(m.shape) != t.shape:
            report.problems.append(f"{t.name}: shape {list(m.shape)} in {merged}, {list(t.shape)} in {base}")
            continue
        if m.dtype != t.src.dtype and not {m.dtype, t.src.dtype} <= CONVERTIBLE:
            report.problems.append(f"{t.name}: dtype {m.dtype} in {merged}, {t.src.dtype} in {base}")
            continue
        t.dtype = m.dtype
        order[t.name] = len(order)
        # the base rows as they are, or through --base-precision's round trip: streamed in numpy;
        # a base stored quantized: in torch (``_check_merge``)
        f = (paritystream.factors(t) if t.action is Action.MERGE and m.dtype in paritystream.FORMATS
             and (t.transform is None or isinstance(t.transform, Requantize)) else None)
        if f is not None:
            streamed.append(paritystream.StreamJob(t, m, f, t.transform))
        elif t.action in (Action.MERGE, Action.REPLACE):
            other.append((t, m))
        else:
            report.untouched += 1
            if m.dtype == t.src.dtype and t.transform is None:
                raw.append(t)
            else:
                other.append((t, m))
    with ThreadPoolExecutor(1, thread_name_prefix="loratool-parity-raw") as pool:
        # untouched tensors: raw bytes, in a thread, while the merged ones are computed
        same = pool.submit(paritystream.same_bytes, [(t.src, merged_ck.ref(t.name)) for t in raw], cb)
        stats = paritystream.check_merged(streamed, cb)
        report.layers = [_layer(job.t, job.merged, st) for job, st in zip(streamed, stats)]
        if other:
            report.layers += _check_others(other, report, cb)
        report.untouched_mismatched += [t.name for t, ok in zip(raw, same.result()) if not ok]
    report.layers.sort(key=lambda lay: order[lay.name])
    report.untouched_mismatched.sort(key=order.__getitem__)
    report.max_ulp_err = max((lay.max_ulp_err for lay in report.layers), default=0.0)
    report.max_err_over_tol = max((lay.max_err_over_tol for lay in report.layers), default=0.0)
    if forward:
        report.forward = forward_parity(base_path, merged, loaded, min_top1=min_top1, base_precision=spec)
    report.ok = (all(lay.ok for lay in report.layers) and not report.untouched_mismatched
                 and not report.missing and not report.unexpected and not report.problems
                 and (report.forward is None or report.forward.ok))
    return report


def parity_precision(merged: str | os.PathLike, given: "str | QuantSpec | None") -> "QuantSpec | None":
    """The 4-bit spec a merged checkpoint's deltas were added to: ``given`` (a ``QuantSpec`` or
    ``--base-precision`` text; "keep": none), else its lineage's ``base_precision`` (None when it
    records none, or "stored:..." for a base held in 4 bits, which the plan dequantizes anyway)."""
    from loratool.quant.bnb import QuantSpec, parse_precision

    if isinstance(given, QuantSpec):
        return given
    if given is not None:
        try:
            return parse_precision(str(given))
        except ValueError as e:
            raise UsageError(f"--base-precision {given}: {e}") from None
    recorded = recorded_precision(merged)
    if recorded is None or recorded.startswith("stored:"):
        return None
    try:
        return parse_precision(recorded)
    except ValueError as e:
        raise UsageError(f"{Path(merged) / 'loratool.json'}: base_precision {recorded!r}: {e}; pass "
                         "--base-precision") from None


def recorded_precision(merged: str | os.PathLike) -> str | None:
    """The ``base_precision`` the last merge in ``merged``'s lineage (``loratool.json``) records."""
    from loratool.boundary import read_json

    path = Path(merged) / "loratool.json"
    if not path.is_file():
        return None
    data = read_json(path, what="loratool manifest")
    lineage = data.get("lineage") if isinstance(data, dict) else None
    for entry in reversed(lineage if isinstance(lineage, list) else []):
        params = entry.get("params") if isinstance(entry, dict) else None
        if isinstance(params, dict) and entry.get("operation") == "merged":
            value = params.get("base_precision")
            return value if isinstance(value, str) else None
    return None


def forward_parity(
    base: str | os.PathLike,
    merged: str | os.PathLike,
    adapters: Sequence[LoadedAdapter],
    min_top1: float = 0.95,
    batch: int = 2,
    seq_len: int = 32,
    seed: int = 0,
    base_precision: "QuantSpec | None" = None,
    use_bitsandbytes: bool = True,
) -> ForwardParity:
    """Logits of the base with the adapters applied unmerged (PEFT, weights as scaling factors)
    against the merged checkpoint's, both in float32 on the CPU, on fixed token ids.

    With ``base_precision`` (a 4-bit spec) the reference is the QLoRA model as trained: the base's
    Linear layers in 4 bits as transformers' BitsAndBytesConfig loads them, through bitsandbytes
    when it is installed and ``use_bitsandbytes`` (else loratool's dequant(quant(W))), the adapters
    unmerged by PEFT (``loratool.merge.qlora_forward``); ``reference`` in the result names it.

    Both models run streamed (``loratool.merge.forward``): built on the meta device, each decoder
    layer's weights read from its checkpoint just before its forward and dropped after it, so the
    peak is one float32 layer (or the embeddings/lm_head) plus the activations, whatever the
    model's size. PEFT still applies the adapters: it wraps the empty model and loads their
    weights itself."""
    import torch

    try:
        from peft import PeftModel
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lycoris_utils import LycorisLayer
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    except ImportError as e:
        raise UsageError(f"--forward needs transformers and peft ({e}); install them or drop --forward") from None
    for la in adapters:
        if not get_format(la.adapter.format).peft_loadable or la.adapter.components:
            raise UsageError(f"--forward: {la.spec.path} is a {la.adapter.format} adapter; PEFT applies "
                             "PEFT adapters of transformers models only (convert it with "
                             "`loratool convert --to peft`)")
    from transformers.utils import logging as hf_logging

    from loratool.checkpoint import BaseCheckpoint
    from loratool.merge.forward import NotStreamable, adapters_on_cpu, empty_model, stream_weights

    hf_logging.disable_progress_bar()
    config = AutoConfig.from_pretrained(str(base))
    archs = getattr(config, "architectures", None) or []
    causal = any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    cls = AutoModelForCausalLM if causal else AutoModel
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab <= 0:
        raise UsageError(f"--forward: {base}/config.json has no vocab_size; cannot make token ids")
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)

    via_bnb = False
    if base_precision is not None:
        from loratool.merge import qlora_forward as qf

        via_bnb = use_bitsandbytes and qf.bnb_version() is not None
    quantized: list = []  # the reference's Quantized, once built

    def logits(model, path, stream_cls=None) -> "torch.Tensor":
        stream = (stream_weights(model, BaseCheckpoint(path), **({"cls": stream_cls} if stream_cls else {}))
                  if path is not None else None)
        try:
            out = model(input_ids=ids)
        finally:
            if stream is not None:
                stream.close()
        out = (out.logits if hasattr(out, "logits") else out.last_hidden_state).detach().float()
        if out.is_meta:  # a weight used outside its block's forward, never read
            raise NotImplementedError("logits on the meta device")
        return out

    def streamed(run: Callable[[bool], "torch.Tensor"]) -> "torch.Tensor":
        """``run(True)``; where the checkpoint's tensors are not the model's parameters one for one,
        or the model reads a weight outside the forward of the block that owns it (still on the
        meta device then), ``run(False)``: the whole model loaded."""
        try:
            return run(True)
        except NotStreamable:
            pass
        except (RuntimeError, NotImplementedError) as e:
            if "meta" not in str(e):
                raise
        gc.collect()
        return run(False)

    def peft_logits(stream: bool) -> "torch.Tensor":
        names = [f"adapter{i}" for i in range(len(adapters))]
        stream_cls = None
        with adapters_on_cpu() if stream else contextlib.nullcontext():
            model = empty_model(cls, config) if stream else cls.from_pretrained(str(base), dtype=torch.float32)
            if base_precision is not None:  # the QLoRA model as trained: its Linears in 4 bits
                q = (qf.quantize_empty(model, base_precision, via_bnb) if stream
                     else qf.quantize_loaded(model, BaseCheckpoint(base), base_precision, via_bnb))
                quantized[:] = [q]
                stream_cls = qf.qlora_stream(q)
            pm = PeftModel.from_pretrained(model.eval(), str(adapters[0].spec.path),
                                           adapter_name=names[0], low_cpu_mem_usage=stream)
            for name, la in zip(names[1:], adapters[1:]):
                pm.load_adapter(str(la.spec.path), adapter_name=name, low_cpu_mem_usage=stream)
        for mod in pm.modules():  # an adapter's weight multiplies its scale, as in the merge
            if isinstance(mod, (LoraLayer, LycorisLayer)):  # LoHa/LoKr keep the same ``scaling`` dict
                for name, la in zip(names, adapters):
                    if name in mod.scaling:
                        mod.scaling[name] *= la.spec.weight
        pm.base_model.set_adapter(names if len(names) > 1 else names[0])
        return logits(pm.eval(), base if stream else None, stream_cls)

    def merged_logits(stream: bool) -> "torch.Tensor":
        if stream:
            return logits(empty_model(cls, AutoConfig.from_pretrained(str(merged))), merged)
        return logits(cls.from_pretrained(str(merged), dtype=torch.float32).eval(), None)

    with torch.no_grad():
        want = streamed(peft_logits)
        gc.collect()  # the PEFT model holds reference cycles
        got = streamed(merged_logits)
        gc.collect()
    diff = float((got - want).abs().max())
    top1 = float((got.argmax(-1) == want.argmax(-1)).float().mean())
    result = ForwardParity(model_class=cls.__name__, batch=batch, seq_len=seq_len, max_abs_diff=diff,
                           max_abs_logit=float(want.abs().max()), top1_agreement=top1, min_top1=min_top1,
                           ok=top1 >= min_top1 and diff == diff)
    if base_precision is not None:
        result.reference = qf.describe(base_precision, via_bnb)
        result.notes = _qlora_notes(BaseCheckpoint(base), adapters, base_precision,
                                    quantized[0].names if quantized else [])
    else:
        import peft

        result.reference = f"16-bit base + adapters unmerged, via peft {peft.__version__}"
    return result


def _qlora_notes(base_ck, adapters: Sequence[LoadedAdapter], spec, reference: list[str]) -> list[str]:
    """Where the QLoRA reference and the merge hold different weights in 4 bits: the merge adds the
    deltas to dequant(quant(W)) of the Linear weights it changes only; transformers quantizes every
    Linear but the ones it keeps in 16 bits (lm_head)."""
    plan = plan_merge(base_ck, adapters, base_precision=spec)
    merged = {t.name for t in plan.tensors() if t.transform is not None and t.transform is plan.requantize}
    ref = {base_ck.tensor_name(n) or n for n in reference}
    notes = []

    def some(names: set[str]) -> str:
        first = sorted(names)[:3]
        return ", ".join(first) + (f" and {len(names) - len(first)} more" if len(names) > len(first) else "")

    if ref - merged:
        notes.append(f"{len(ref - merged)} Linear weights no adapter changes ({some(ref - merged)}) are 4-bit in the "
                     "QLoRA model and 16-bit in the merged one (the merge requantizes the weights it changes only)")
    if merged - ref:
        notes.append(f"{some(merged - ref)}: the merge added the delta to dequant(quant(W)); the QLoRA model keeps "
                     "these in 16 bits (transformers does not quantize them)")
    return notes
