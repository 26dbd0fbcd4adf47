"""Extract a LoRA adapter from a base checkpoint and its fine-tune (``loratool extract``).

For each target weight ΔW = TUNED − BASE is formed in float32 (float64 when the sources or the
requested accuracy need it), one tensor pair at a time, and factored by the randomized range
finder of ``loratool.extract_ranks`` with the rank its rule picks; the output is an adapter whose
modules have alpha = rank (PEFT's scale 1), so B·A is the truncated delta whatever the reader.

Before any tensor is read the two checkpoints are compared from their headers: tensor names,
shapes, dtypes, vocabulary (embedding rows, config vocab_size) and tied embeddings; any difference
is refused with one line (mergekit #328 found a shape mismatch after a 3-hour run).

Memory stays flat in the model's size: tensors are read a block of rows at a time (``pread``)
into the delta of the module being factored, a few modules at a time (threads; numpy's BLAS
releases the GIL), and only the factors are kept. ``--budget`` needs every module's spectrum
before it can choose ranks: a first pass keeps each module's leading singular values only, the
second computes the factors for the ranks chosen. On CUDA (``device``) the same code runs with
torch: each block of rows is copied to the device and the delta formed there; the range finder is
written once against the two backends of ``extract_ranks`` (same sketch, same stopping rule).

Layouts (PEFT's, ``kinds/layout.py``): Linear ΔW (out, in) = B·A; Embedding ΔW (num, dim) and
Conv1D ΔW (in, out) are the transpose of B·A; Conv2d ΔW (out, in, kh, kw) is B·A reshaped, with A
(k, in, kh, kw) and B (out, k, 1, 1). Changed 1-D tensors (norms, biases), other shapes, and
modules whose factors would be no smaller than the dense delta are reported as dropped, or saved
whole as ``modules_to_save`` when asked; the changed bias of a module that has factors can be
written as PEFT's ``lora_B.bias`` (``lora_bias``), chosen so that PEFT's merge gives TUNED's bias.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from loratool import boundary
from loratool.errors import FormatError, InputError, UsageError
from loratool.extract_pairs import Pair, _Files, check_pair, plan_pairs, read_delta, read_delta_torch
from loratool.extract_ranks import Accuracy, ExtractRule, Sketch, allocate, factors, frobenius2, range_finder, residual
from loratool.kinds.layout import TRANSPOSED_LAYOUT, LayerKind
from loratool.text import natural_key

if TYPE_CHECKING:  # pragma: no cover

    from loratool.adapter import AdapterModule
    from loratool.schemas.extract import ExtractReport

ALPHA_POLICY = "alpha = rank (PEFT's scale 1); singular values split evenly between the factors, sqrt(sigma) in each"
OUTPUT_DTYPES = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
SAVE_DROPPED = ("none", "modules_to_save", "lora_bias")
DEVICES = ("auto", "cpu", "cuda")  # and "cpu-torch": the torch path on the CPU (tests)
TASK_TYPES = (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
              ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS"),
              ("ForConditionalGeneration", "SEQ_2_SEQ_LM"), ("Model", "FEATURE_EXTRACTION"))


# -- one module -------------------------------------------------------------------------------------

@dataclass
class Done:
    """What one pair gave: nothing (unchanged), a spectrum (budget's first pass), or factors."""

    pair: Pair
    total: float = 0.0  # ‖ΔW‖²_F
    base_norm2: float = 0.0  # ‖W_base‖²_F (dropped tensors: their relative change)
    sketch: Sketch | None = None
    rank: int = 0
    module: "AdapterModule | None" = None  # the factors, already in the output dtype
    error: float = 0.0
    optimal: float = 0.0


def _backend(device: str) -> str | None:
    """The torch device the deltas are factored on, or None for numpy on the CPU. ``auto``: CUDA
    when torch sees a device (found without importing torch where it cannot: a CPU-only build,
    no GPU device node), else numpy; ``cpu-torch`` forces torch on the CPU."""
    if device == "cpu-torch":
        return "cpu"
    if device not in DEVICES:
        raise UsageError(f"--device must be one of {', '.join(DEVICES)}, found {device!r}")
    from loratool.merge.engines import resolve_device

    where = resolve_device(device)
    return None if where == "cpu" else where


def _rng(seed: int, name: str):
    import numpy as np

    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def factor_pair(files: _Files, pair: Pair, rule: ExtractRule, accuracy: Accuracy, seed: int, dtype,
                rank: int | None = None, spectrum_only: bool = False, k_first: int = 32,
                out_dtype: str = "F32", device: str | None = None) -> Done:
    """Read ``pair``'s delta and factor it into a module with factors in ``out_dtype`` (or,
    ``spectrum_only``, keep its leading spectrum): at ``rank`` when given, else at the rank
    ``rule`` picks. ``device``: a torch device to form the delta and run the range finder on
    (None: numpy)."""
    if device is None:
        M = read_delta(files, pair, dtype)
    else:
        import torch

        M = read_delta_torch(files, pair, torch.float64 if dtype.__name__ == "float64" else torch.float32, device)
    total = frobenius2(M)
    if not math.isfinite(total):
        raise FormatError(f"tensor {pair.name}: TUNED − BASE holds NaN or Inf (in {pair.tuned.file.path} or "
                          f"{pair.base.file.path}); nothing to factor")
    if total == 0.0:
        return Done(pair)
    shape = M.shape
    if rank is not None:
        k_of, k0 = (lambda S, t: min(rank, min(shape))), rank
    else:
        k_of = (lambda S, t: rule.choose(S, t, shape))
        k0 = rule.rank if rule.rank is not None else (rule.max_rank or k_first)
    sk, k = range_finder(M, k_of, k0, accuracy, _rng(seed, pair.name), total)
    if spectrum_only:
        sk.left = sk.right = sk.Uc = sk.Vch = None  # the spectrum is all the budget needs
        return Done(pair, total, sketch=sk)
    U, S, Vh = factors(sk, k)
    sk.left = sk.right = sk.Uc = sk.Vch = None  # the bases (on the device with torch) are done with
    if sk.exact:
        error = optimal = sk.error(k)
    else:
        error = residual(M, U, S, Vh, total)
        optimal = math.sqrt(max(error ** 2 - sk.remaining / total, 0.0))
    del M
    root = S ** 0.5
    if pair.layer in TRANSPOSED_LAYOUT:  # ΔW = (B·A)ᵀ: B = V·√S, A = √S·Uᵀ
        B2, A2 = Vh.T * root, root[:, None] * U.T
    else:  # ΔW (out, in·kh·kw) = B·A
        B2, A2 = U * root, root[:, None] * Vh
    return Done(pair, total, sketch=sk, rank=k, module=_module(pair, B2, A2, out_dtype), error=error,
                optimal=min(optimal, error))


def _module(pair: Pair, B2, A2, out_dtype: str):
    from loratool.adapter import module_of
    from loratool.safetensors_io import host_tensor

    k = A2.shape[0]
    if pair.layer is LayerKind.CONV2D:
        A2 = A2.reshape(k, *pair.shape[1:])
        B2 = B2.reshape(B2.shape[0], k, 1, 1)
    return module_of(name=pair.module, kind=pair.layer, lora_A=host_tensor(A2, out_dtype),
                     lora_B=host_tensor(B2, out_dtype), alpha=float(k), config_rank=k, config_alpha=float(k))


def _too_small(k: int, shape: tuple[int, ...]) -> bool:
    """Rank-k factors hold at least as many numbers as the dense delta."""
    d, n = shape[0], math.prod(shape[1:])
    return k * (d + n) >= d * n


# -- the command ------------------------------------------------------------------------------------

def _task_type(config: dict) -> str | None:
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else ""
    return next((t for suffix, t in TASK_TYPES if arch.endswith(suffix)), None)


def _compute_dtype(pairs: list[Pair], rule: ExtractRule, accuracy: Accuracy):
    """float64 when a source is float64 or the accuracy asked for is below float32's reach."""
    import numpy as np

    f64 = any(p.base.dtype == "F64" or p.tuned.dtype == "F64" for p in pairs if p.layer is not None)
    fine = (rule.rel_error is not None and rule.rel_error < 1e-4) or accuracy.tolerance < 1e-5
    return np.float64 if f64 or fine else np.float32


def extract(base: str | os.PathLike, tuned: str | os.PathLike, out: str | os.PathLike, rule: ExtractRule, *,
            targets: str | None = None, format: str | None = None, dtype: str = "fp32", save_dropped: str = "none",
            seed: int = 0, accuracy: float = 1e-3, overwrite: bool = False, allow_dtype_mismatch: bool = False,
            workers: int | None = None, progress: Callable[[int, int], None] | None = None,
            device: str = "auto") -> "ExtractReport":
    """Write at ``out`` an adapter of BASE whose delta approximates TUNED − BASE (module docstring),
    in ``format`` with factors in ``dtype`` (fp32, bf16, fp16), with a manifest pinned to BASE
    whose lineage names TUNED. ``save_dropped``: ``none`` or a comma-separated choice of
    ``modules_to_save`` and ``lora_bias``. ``device``: auto, cpu, cuda (``_backend``).
    ``progress(bytes, total)``: bytes of tensor pairs done."""
    from loratool._threads import default_workers, map_modules
    from loratool.checkpoint import BaseCheckpoint
    from loratool.formats import COMMON_FORMAT, get_format
    from loratool.schemas.extract import ExtractedModule, ExtractReport

    t0 = time.perf_counter()
    if dtype not in OUTPUT_DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, found {dtype!r}")
    saving = {c.strip() for c in save_dropped.split(",")}
    if not saving <= set(SAVE_DROPPED) or ("none" in saving and len(saving) > 1):
        raise UsageError(f"--save-dropped must be none, or one or more of modules_to_save,lora_bias (comma-separated), "
                         f"found {save_dropped!r}")
    save_mts, save_bias = "modules_to_save" in saving, "lora_bias" in saving
    if not 0 < accuracy < 1:
        raise UsageError(f"--accuracy must be in (0, 1), found {accuracy}")
    fmt = get_format(format or COMMON_FORMAT)
    base_p, tuned_p, out = Path(base), Path(tuned), Path(out)
    for p in (base_p, tuned_p):
        if not os.path.exists(p):
            raise InputError(f"{p}: no such file or directory")
    if os.path.realpath(base_p) == os.path.realpath(tuned_p):
        raise UsageError(f"{tuned_p}: TUNED is BASE itself; give the fine-tuned checkpoint")
    boundary.check_output(out, overwrite=overwrite, inputs=[base_p, tuned_p],
                          kind="dir" if fmt.writes_directory else "file")
    ckpt_b, ckpt_t = BaseCheckpoint(base_p), BaseCheckpoint(tuned_p)
    boundary.note_input(base_p)
    boundary.note_input(tuned_p)
    check_pair(ckpt_b, ckpt_t, allow_dtype_mismatch)
    if fmt.check_writable is not None:  # kohya and diffusers need pipeline components: refused before any work
        from loratool.adapter import Adapter

        fmt.check_writable(Adapter(format=fmt.name, modules={}, path=out, components=ckpt_b.components))
        if save_bias:  # and a format without a place for a lora_B bias is refused now too
            _check_bias_writable(fmt, out, ckpt_b.components)
    pairs = plan_pairs(ckpt_b, ckpt_t, targets)
    if save_bias:  # PEFT's lora_bias is one flag for every module, and its Embedding refuses it
        emb = next((p.module for p in pairs if p.layer is LayerKind.EMBEDDING), None)
        if emb is not None:
            raise UsageError(f"--save-dropped lora_bias: PEFT cannot load lora_bias=True with an embedding module "
                             f"({emb}); leave embeddings out with --targets, or drop lora_bias")
    where = _backend(device)
    acc = Accuracy(accuracy)
    cdtype = _compute_dtype(pairs, rule, acc)
    work = sorted((p for p in pairs if p.layer is not None), key=lambda p: -p.nbytes)
    others = [p for p in pairs if p.layer is None]
    passes = 2 if rule.budget is not None else 1
    total_bytes = passes * sum(p.nbytes for p in work) + sum(p.nbytes for p in others)
    lock = threading.Lock()

    def advance(n: int) -> None:
        if progress is not None:
            with lock:
                progress(n, total_bytes)

    files = _Files()
    workers = workers or (2 if where == "cuda" else default_workers())
    out_dtype = OUTPUT_DTYPES[dtype]
    try:
        def run(fn, items, pair_of=lambda item: item):
            def one(item):
                r = fn(item)
                advance(pair_of(item).nbytes)
                return r
            return map_modules(one, items, workers=workers)

        bytes_per = DTYPE_BYTES[dtype]
        if rule.budget is not None:
            average = rule.budget // max(1, sum(_rank_cost(q, bytes_per) for q in work))
            first = run(lambda p: factor_pair(files, p, rule, acc, seed, cdtype, rank=_budget_cap(p, rule, average),
                                              spectrum_only=True, device=where), work)
            ranks = _allocate(first, rule, bytes_per)
            todo = [(d.pair, ranks[d.pair.name]) for d in first if d.sketch is not None]
            done = [d for d in first if d.sketch is None]  # unchanged
            done += run(lambda pk: factor_pair(files, pk[0], rule, acc, seed, cdtype, rank=pk[1], out_dtype=out_dtype,
                                                  device=where),
                        todo, pair_of=lambda pk: pk[0])
        else:
            done = run(lambda p: factor_pair(files, p, rule, acc, seed, cdtype, out_dtype=out_dtype, device=where),
                       work)
        dropped_done = [_compare(files, p) for p in others]
        for p in others:
            advance(p.nbytes)
    finally:
        files.close()

    modules, rows, dropped, mts = {}, [], [], {}
    unchanged = 0
    kept = total = 0.0
    for d in sorted(done, key=lambda d: natural_key(d.pair.name)):
        p = d.pair
        if d.sketch is None:
            unchanged += 1
            continue
        if _too_small(d.rank, p.shape):
            dropped.append(_dropped_row(p, d, f"too small to factor: rank {d.rank} factors hold no fewer numbers "
                                              "than the dense delta", save_mts))
            if save_mts:
                mts[p.name] = p.tuned
            continue
        modules[p.module] = d.module
        sk = d.sketch
        rows.append(ExtractedModule(
            name=p.module, kind=p.layer.value, shape=list(p.shape), rank=d.rank, alpha=float(d.rank),
            relative_error=d.error, optimal_error=d.optimal, energy_kept=1.0 - d.error ** 2,
            method="exact" if sk.exact else "randomized", sketch_size=sk.sketch_size, num_passes=sk.passes))
        total += d.total
        kept += d.total * (1.0 - d.error ** 2)
    by_name = {r.name: r for r in rows}
    inexact: dict[str, tuple[int, float]] = {}
    for d in dropped_done:
        if d is None:
            continue
        owner, _, leaf = d.pair.name.rpartition(".")
        if owner in modules and save_bias and leaf == "bias" and d.pair.shape == (modules[owner].out_features,):
            bias, misses, worst = _lora_bias(d.pair)
            modules[owner] = dataclasses.replace(modules[owner], lora_B_bias=bias)
            by_name[owner].lora_bias = True
            if misses:
                inexact[owner] = (misses, worst)
            continue
        if owner in modules:  # PEFT cannot both adapt a module and save it whole
            row = _dropped_row(d.pair, d, d.pair.reason + "; its module has LoRA factors, which PEFT cannot save "
                                                        "whole (modules_to_save)" +
                               ("" if save_bias else "; --save-dropped lora_bias writes a bias as lora_B.bias"), False)
        else:
            row = _dropped_row(d.pair, d, d.pair.reason, save_mts)
            if save_mts:
                mts[d.pair.name] = d.pair.tuned
        dropped.append(row)
    warnings = _bias_warnings(modules, inexact, ckpt_b)
    if not modules:
        warnings.append(f"no module changed between {base_p} and {tuned_p}"
                        + (f" among --targets {targets!r}" if targets else "") + "; the adapter is empty")
    report = _write(ckpt_b, ckpt_t, modules, mts, out, fmt, overwrite, params={
        "extracted_from": str(tuned_p.name), "rule": rule.describe(), "targets": targets, "dtype": dtype,
        "seed": seed, "accuracy": accuracy, "save_dropped": save_dropped, "device": device})
    return ExtractReport(
        base=str(base_p), tuned=str(tuned_p), output=str(out), format=fmt.name, rule=rule.describe(),
        accuracy=accuracy, seed=seed, dtype=dtype, compute_dtype=str(cdtype.__name__),
        device="numpy on the CPU" if where is None else f"torch on {where}", alpha_policy=ALPHA_POLICY,
        target_spec=targets, num_tensors=len(ckpt_b), num_unchanged=unchanged, num_modules=len(rows),
        num_dropped=len(dropped), num_params=report, energy_kept=1.0 if total == 0 else kept / total,
        max_relative_error=max((r.relative_error for r in rows), default=0.0),
        seconds=round(time.perf_counter() - t0, 3), modules=rows, dropped=dropped, warnings=warnings)


def _check_bias_writable(fmt, out: Path, components) -> None:
    """Whether ``fmt`` can hold a lora_B bias: its writer's check, on a one-module probe."""
    if fmt.check_writable is None:
        return
    import numpy as np

    from loratool.adapter import Adapter, module_of
    from loratool.errors import LoratoolError
    from loratool.formats import COMMON_FORMAT
    from loratool.safetensors_io import host_tensor

    one = host_tensor(np.zeros((1, 1), np.float32), "F32")
    name = f"{next(iter(components))}.probe" if components else "probe"
    probe = module_of(name=name, kind=LayerKind.LINEAR, lora_A=one, lora_B=one, alpha=1.0,
                      lora_B_bias=host_tensor(np.zeros(1, np.float32), "F32"))
    try:
        fmt.check_writable(Adapter(format=fmt.name, modules={name: probe}, path=out, components=components))
    except LoratoolError:
        raise UsageError(f"--save-dropped lora_bias: a {fmt.name} adapter has no place for a lora_B bias; use "
                         f"--format {COMMON_FORMAT}") from None


def _rank_cost(pair: Pair, bytes_per: int) -> int:
    """Bytes of one rank of the pair's factors."""
    return (pair.shape[0] + math.prod(pair.shape[1:])) * bytes_per


def _budget_cap(pair: Pair, rule: ExtractRule, average: int) -> int:
    """The most rank a module may get from ``--budget`` (its first pass's sketch): max_rank, the
    rank at which factors stop being smaller than the dense delta, and 4× the rank the budget
    buys every module on average (at least 8)."""
    d, n = pair.shape[0], math.prod(pair.shape[1:])
    cap = min(max(8, 4 * average), (d * n) // (d + n) - 1 if d * n > d + n else 1)
    if rule.max_rank is not None:
        cap = min(cap, rule.max_rank)
    return max(1, cap, rule.min_rank if rule.min_rank * (d + n) < d * n else 1)


def _allocate(first: list[Done], rule: ExtractRule, bytes_per: int) -> dict[str, int]:
    changed = [d for d in first if d.sketch is not None]
    costs = [_rank_cost(d.pair, bytes_per) for d in changed]
    spectra = [d.sketch.S[: d.sketch.reliable] for d in changed]
    caps = [max(1, len(s)) for s in spectra]
    ranks = allocate(costs, spectra, caps, rule.budget, rule.min_rank)
    return {d.pair.name: k for d, k in zip(changed, ranks)}


def _compare(files: _Files, pair: Pair) -> Done | None:
    """A tensor extract does not factor: None when unchanged, else its relative change."""
    import numpy as np

    M = read_delta(files, pair, np.float64)
    total = frobenius2(M)
    if total == 0.0:
        return None
    from loratool.adapter import float_values

    return Done(pair, total, base_norm2=frobenius2(np.asarray(float_values(pair.base), np.float64).reshape(M.shape)))


def _in_dtype(x, st: str):
    """float64 values rounded to the safetensors float dtype ``st`` (as torch casts), as float64."""
    import numpy as np

    from loratool.safetensors_io import bf16_bits, host_tensor

    if st == "F64":
        return np.asarray(x, np.float64)
    if st == "BF16":
        bits = bf16_bits(np.asarray(x, np.float32)).astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64)
    return np.asarray(host_tensor(x, st).array, np.float64)


def _lora_bias(pair: Pair):
    """TUNED − BASE of a bias as PEFT's ``lora_B.bias`` (scale 1), in BASE's dtype (the nearest
    value to the difference), with the number of elements where PEFT's merge in that dtype,
    ``bias + lora_B.bias``, does not give TUNED's value and the largest such miss. Where TUNED and
    BASE are within a factor 2 of each other the difference is exact and so is the merge
    (Sterbenz); elsewhere TUNED can lie off the grid of sums BASE + d, and then no d reaches it
    (the nearest d misses by about an ulp of TUNED)."""
    import numpy as np

    from loratool.adapter import float_values
    from loratool.safetensors_io import host_tensor

    st = pair.base.dtype
    b = np.asarray(float_values(pair.base), np.float64).reshape(-1)
    t = _in_dtype(np.asarray(float_values(pair.tuned), np.float64).reshape(-1), st)
    d = _in_dtype(t - b, st)
    # torch adds two float32 (or half) values in float32, then rounds once to the dtype
    merged = b + d if st == "F64" else _in_dtype((b.astype(np.float32) + d.astype(np.float32)).astype(np.float64), st)
    miss = np.abs(merged - t)
    return host_tensor(d.reshape(pair.shape), st), int(np.count_nonzero(miss)), float(miss.max(initial=0.0))


def _bias_warnings(modules: dict, inexact: dict[str, tuple[int, float]], ckpt_b) -> list[str]:
    """What PEFT will make of lora_bias: one flag for every module, so modules whose base layer has
    no bias load with a zero lora_B bias but PEFT's merge refuses them; and biases not exact."""
    out = []
    if any(m.lora_B_bias is not None for m in modules.values()):
        bare = [n for n in modules if n + ".bias" not in ckpt_b]
        if bare:
            out.append(f"lora_bias=True applies to every module in PEFT: {len(bare)} modules have no bias in BASE "
                       f"(e.g. {bare[0]}); PEFT loads them with a zero lora_B bias, but its merge_and_unload refuses "
                       "them (loratool merge does not)")
    for name, (n, worst) in inexact.items():
        out.append(f"{name}.bias: {n} element{'s' * (n != 1)} of TUNED's bias cannot be reached as BASE + lora_B.bias in BASE's "
                   f"dtype (they changed by more than half their value); PEFT's merge misses them by up to {worst:.3g}")
    return out


def _dropped_row(p: Pair, d: Done, reason: str, saved: bool):
    from loratool.schemas.extract import DroppedTensor

    base_norm2 = d.base_norm2
    if base_norm2 == 0.0 and d.total:
        import numpy as np

        from loratool.adapter import float_values

        base_norm2 = frobenius2(np.asarray(float_values(p.base), np.float64).reshape(p.shape[0] if p.shape else 1, -1))
    change = math.sqrt(d.total / base_norm2) if base_norm2 > 0 else math.inf
    return DroppedTensor(name=p.name, shape=list(p.shape), reason=reason,
                         relative_change=change if math.isfinite(change) else 1.0,
                         saved=saved)


def _write(ckpt_b, ckpt_t, modules: dict, mts: dict, out: Path, fmt, overwrite: bool, params: dict) -> int:
    """Write the adapter with its manifest (pinned to BASE by content; lineage naming TUNED);
    returns its parameter count."""
    from loratool.adapter import Adapter
    from loratool.fingerprint import HashCache, fingerprint_base
    from loratool.formats import write_adapter
    from loratool.manifest import build_manifest, finish_output, lineage_entry, manifest_metadata

    cache = HashCache.default()
    base_fp = fingerprint_base(ckpt_b, cache=cache)
    tuned_fp = fingerprint_base(ckpt_t, cache=cache)
    adapter = Adapter(format=fmt.name, modules=dict(sorted(modules.items(), key=lambda kv: natural_key(kv[0]))),
                      base_model=base_fp.repo_id or base_fp.name, base_revision=base_fp.revision,
                      task_type=_task_type(ckpt_t.config or ckpt_b.config), modules_to_save=mts,
                      components=ckpt_b.components)
    entry = lineage_entry("extracted", inputs=[base_fp, tuned_fp], params=params)
    manifest = build_manifest(adapter, base_fp=base_fp, lineage=[entry], files=False)
    adapter.metadata = {**adapter.metadata, **manifest_metadata(manifest)}
    write_adapter(adapter, out, fmt.name, overwrite=overwrite)
    finish_output(manifest, out)
    return adapter.num_params
