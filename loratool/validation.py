"""`validate`: every finding about an adapter, each with a stable id and a severity.

Check ids are stable (CI configurations may filter on them); never renumber, only add.

  LT001 unreadable              error    the adapter cannot be read (exit 2; --json reports it)
  LT002 usage                   error    the command line is wrong (exit 2; --json reports it)
  LT101 ab-rank-mismatch        error    lora_A and lora_B disagree on the rank
  LT102 missing-factor          error    a module has only one of its two factors
  LT103 config-rank-mismatch    error    the config's r/rank_pattern disagrees with the tensors
  LT104 not-targeted            warning  weights for a module the config's target_modules skips
  LT105 unused-pattern          warning  a rank_pattern/alpha_pattern key that matches no module
  LT106 bad-factor-shape        error    factors that fit no layer kind (dimensions, rank 0, dtype)
  LT107 no-modules              error    no LoRA module at all
  LT108 dora-magnitude-shape    error    DoRA magnitude length is not the output size
  LT109 bias-shape              error    lora_B bias length is not the output size
  LT110 unknown-tensor          warning  a tensor that is neither a factor nor modules_to_save
  LT111 layer-not-in-file       warning  flattened LoHa/LoKr factors whose layer (1×1 conv or Linear)
                                         neither the file nor --base says; read Linear-shaped
  LT201 non-finite              error    NaN or Inf values
  LT202 zero-b                  warning  a module whose lora_B is all zero (contributes nothing)
  LT203 never-trained           error    every lora_B is all zero: the adapter does nothing
  LT204 exploding-norm          warning  a delta whose largest singular value is implausibly large
  LT205 mixed-dtypes            warning  LoRA factors in more than one floating dtype
  LT206 bad-scale               error    alpha/scale that is not a positive finite number
  LT207 overflow                error    scale × factors (or a value) past the largest value of the
                                         factors' dtype or float32: applying or merging it gives Inf
  LT301 target-missing          error    (--base) a module has no weight in the base
  LT302 shape-mismatch          error    (--base) the delta does not fit the base weight
  LT303 fan-in-fan-out          error    (--base) Conv1D layout mismatch (fan_in_fan_out wrong)
  LT304 modules-to-save-shape   error    (--base) a modules_to_save tensor does not fit
  LT305 base-name-mismatch      warning  (--base) the adapter names another base model
  LT306 base-dtype              info     (--base) the base's dtype differs from the adapter's
  LT307 no-manifest             info     (--base) no manifest records the base: checked by shape only
                                         (an error with --require-manifest)
  LT308 base-mismatch-allowed   warning  (--base --allow-base-mismatch) the manifest's base differs
  LT309 base-not-recorded       error    (--base) not the base the manifest records (exit 3)
  LT401 vllm-rank               error/info (--target vllm) rank above 512 / needs --max-lora-rank
  LT402 vllm-dora               error    (--target vllm) DoRA is not supported by vLLM
  LT403 vllm-lora-bias          error    (--target vllm) lora_bias is not supported by vLLM
  LT404 vllm-modules-to-save    warning  (--target vllm) modules_to_save is loaded only for some layers
  LT405 vllm-layer-kind         error    (--target vllm) conv layers are not supported
  LT406 vllm-scale-patterns     error    (--target vllm) per-module scales (rank/alpha patterns) are
                                         applied as one alpha/r by vLLM
  LT407 vllm-not-a-language-model error  (--target vllm) a diffusion-model adapter (UNet, DiT)
  LT408 vllm-algorithm          error    (--target vllm) LoHa, LoKr, ... modules (LoRA and DoRA only)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from loratool.adapter import DTYPE_MAX, Adapter, LayerKind, count_nonfinite, shape_of
from loratool.errors import EXIT_FINDINGS, EXIT_OK, MisfitError
from loratool.formats.loraconfig import lora_config
from loratool.safetensors_io import FLOAT_DTYPES
from loratool.schemas.reports import Finding, Severity, ValidationReport

if TYPE_CHECKING:  # pragma: no cover
    from loratool.checkpoint import BaseCheckpoint
    from loratool.errors import LoratoolError

CHECKS: dict[str, str] = {
    # what stops validation itself: in --json they are the report's one finding (exits 2 and 3)
    "LT001": "unreadable", "LT002": "usage", "LT309": "base-not-recorded",
    "LT101": "ab-rank-mismatch", "LT102": "missing-factor", "LT103": "config-rank-mismatch",
    "LT104": "not-targeted", "LT105": "unused-pattern", "LT106": "bad-factor-shape",
    "LT107": "no-modules", "LT108": "dora-magnitude-shape", "LT109": "bias-shape", "LT110": "unknown-tensor",
    "LT111": "layer-not-in-file",
    "LT201": "non-finite", "LT202": "zero-b", "LT203": "never-trained", "LT204": "exploding-norm",
    "LT205": "mixed-dtypes", "LT206": "bad-scale", "LT207": "overflow",
    "LT301": "target-missing", "LT302": "shape-mismatch", "LT303": "fan-in-fan-out",
    "LT304": "modules-to-save-shape", "LT305": "base-name-mismatch", "LT306": "base-dtype",
    "LT307": "no-manifest", "LT308": "base-mismatch-allowed",
    "LT401": "vllm-rank", "LT402": "vllm-dora", "LT403": "vllm-lora-bias",
    "LT404": "vllm-modules-to-save", "LT405": "vllm-layer-kind", "LT406": "vllm-scale-patterns",
    "LT407": "vllm-not-a-language-model", "LT408": "vllm-algorithm",
}

# vLLM's accepted values of --max-lora-rank (vllm/config/lora.py); any rank up to the chosen
# maximum loads, padded.
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
EXPLODING_SIGMA = 1e3  # largest singular value of scale·B@A above which we warn
TARGETS = ("vllm",)


class Findings:
    def __init__(self, default_file: str | None = None):
        self.items: list[Finding] = []
        self.default_file = default_file

    def add(self, check_id: str, severity: Severity, message: str, module: str | None = None,
            file: str | None = None) -> None:
        self.items.append(Finding(id=check_id, check=CHECKS[check_id], severity=severity,
                                  message=" ".join(message.split()), module=module,
                                  file=file or self.default_file))

    def error(self, check_id, message, module=None, file=None):
        self.add(check_id, Severity.ERROR, message, module, file)

    def warning(self, check_id, message, module=None, file=None):
        self.add(check_id, Severity.WARNING, message, module, file)

    def info(self, check_id, message, module=None, file=None):
        self.add(check_id, Severity.INFO, message, module, file)


def _weights_file(adapter: Adapter) -> str | None:
    st = [p for p in adapter.files if p.suffix == ".safetensors"]
    return str(st[0]) if st else (str(adapter.path) if adapter.path else None)


# -- structure and config ---------------------------------------------------------------------

def check_layer_notes(adapter: Adapter, f: Findings) -> None:
    """LT111, once for the file: modules whose layer neither the file nor a base has said (old
    LyCORIS files with flattened factors on SD's proj_in/proj_out and no SD family in their
    metadata; ``formats/kohya_legacy.py``). A base that fits settles them (``kernel_fit``), so this
    runs after ``check_base``."""
    unsaid = [m for m in adapter.modules.values() if getattr(m, "layer_note", None)]
    if unsaid:
        more = f" ({len(unsaid) - 1} more modules alike)" if len(unsaid) > 1 else ""
        f.warning("LT111", f"module {unsaid[0].name}: {unsaid[0].layer_note}{more}", unsaid[0].name)


def check_structure(adapter: Adapter, f: Findings) -> None:
    for p in adapter.problems:  # what the reader found, with its check id (loratool.formats.base)
        f.error(p.check, p.message, module=p.module)
    if not adapter.modules and not adapter.problems:
        f.error("LT107", f"{adapter.path}: no LoRA modules found")
    for m in adapter.modules.values():
        for problem in m.structure_problems():  # the kind's own checks (LT106, LT108, LT109)
            f.error(problem.check, f"module {m.name}: {problem.message}", m.name)
    for name in adapter.extra_tensors:
        if not name.endswith(".base_layer.weight"):  # PEFT's saved embedding layers are expected
            f.warning("LT110", f"tensor {name}: neither a LoRA factor nor a modules_to_save tensor of the config; "
                      "loaders ignore it (a modules_to_save entry missing from the config?)")


MAX_UNUSED_LISTED = 20  # unused pattern keys reported one by one; more are summarised


def check_config(adapter: Adapter, f: Findings) -> None:
    from loratool.patterns import key_table

    config = lora_config(adapter)  # the one LoraConfig PEFT loads the adapter with, if any
    if not config:
        return
    cfg_file = str(config.file) if config.file else None
    for m in adapter.modules.values():
        if m.config_rank is not None and m.config_rank != m.rank:
            f.error("LT103", f"module {m.name}: the config asks for rank {m.config_rank} (r / rank_pattern) "
                    f"but the tensors have rank {m.rank}; PEFT will refuse to load it", m.name, cfg_file)
        if config.targeted(m.name) is False:
            f.warning("LT104", f"module {m.name}: has weights but target_modules {config.target_modules!r} "
                      f"(exclude_modules {config.exclude_modules!r}) does not select it; PEFT will ignore "
                      "them, and merge refuses the adapter", m.name, cfg_file)
    names = list(adapter.modules)

    for field, pattern in (("rank_pattern", config.rank_pattern), ("alpha_pattern", config.alpha_pattern)):
        if not pattern:
            continue
        table = key_table(tuple(pattern))  # built once: linear in modules + keys (issue 11)
        used = {table.first(n) for n in names}
        unused = [key for key in pattern if key not in used]
        if len(unused) <= MAX_UNUSED_LISTED:
            for key in unused:
                f.warning("LT105", f"{field} key {key!r} matches no module of the adapter", file=cfg_file)
        else:  # a config with thousands of keys: one finding, not thousands of lines
            shown = ", ".join(repr(k) for k in unused[:5])
            f.warning("LT105", f"{field}: {len(unused)} of its {len(pattern)} keys match no module of the adapter "
                      f"({shown}, …)", file=cfg_file)


# -- numbers ----------------------------------------------------------------------------------

def check_values(adapter: Adapter, f: Findings) -> None:
    zero_b = 0
    dtypes = {d for m in adapter.modules.values() for d in m.delta_dtypes()}
    for m in adapter.modules.values():
        if not m.scale_is_valid:
            f.error("LT206", f"module {m.name}: alpha {m.alpha!r} gives scale {m.scale!r}; it must be a positive "
                    "finite number", m.name)
            continue
        loaded = m.load()  # each tensor read once, as numpy values, for all the checks below (no torch)
        finite = True
        for role, t in loaded.items():
            nan, inf = count_nonfinite(t)
            if nan or inf:
                finite = False
                what = ", ".join(x for x in (f"{nan} NaN" if nan else "", f"{inf} Inf" if inf else "") if x)
                key = m.source_keys.get(role, role)
                f.error("LT201", f"module {m.name}: {key} holds {what} of {t.size} values", m.name)
        if not finite:
            continue
        why = _overflow(m, loaded)
        if why:
            f.error("LT207", f"module {m.name}: {why}", m.name)
            continue
        if m.needs_base:  # ΔW depends on the base weight (OFT, IA3, GLoRA): the merge checks its blocks
            continue
        lr = m.low_rank(loaded=loaded)  # None for a kind without a low-rank form: its dense delta
        if not bool(lr.B2.any() if lr is not None else m.delta().any()):
            zero_b += 1
            what = "lora_B is all zero" if lr is not None else "its delta is all zero"
            f.warning("LT202", f"module {m.name}: {what}, so the module changes nothing "
                      "(initialised and never trained?)", m.name)
            continue
        if lr is not None and _sigma1_bound(lr) <= EXPLODING_SIGMA:
            continue  # σ₁ ≤ |s|·‖B‖_F·‖A‖_F: no SVD needed to know it is below the threshold
        sigma1 = float(m.singular_values(lr)[0])
        if sigma1 > EXPLODING_SIGMA:
            f.warning("LT204", f"module {m.name}: the delta's largest singular value is {sigma1:.3g} "
                      f"(> {EXPLODING_SIGMA:g}); training may have diverged", m.name)
    if adapter.modules and zero_b == len(adapter.modules):
        f.error("LT203", f"{adapter.path}: every lora_B is all zero: the adapter does nothing (never trained)")
    floats = sorted(d for d in dtypes if d in FLOAT_DTYPES)
    if len(floats) > 1:
        f.warning("LT205", f"LoRA factors mix dtypes {', '.join(floats)}; loaders cast them to one")


def _sigma1_bound(lr) -> float:
    """An upper bound of the largest singular value of scale·B2@A2 (σ₁(BA) ≤ σ₁(B)σ₁(A) ≤
    ‖B‖_F‖A‖_F), from two sums of squares in float64: validate needs σ₁ only to compare it with
    a threshold, and the bound settles almost every module without the QR core."""
    import numpy as np

    def fro(x) -> float:  # a float32 dot, widened by its worst-case rounding error (n·2⁻²⁴ per term)
        x = np.asarray(x).reshape(-1)
        if x.dtype != np.float64:
            x = x.astype(np.float32, copy=False)
        with np.errstate(over="ignore"):  # past float32's range: an infinite bound, which settles nothing
            return float(np.sqrt(float(np.dot(x, x)) * (1 + x.size * 2.0 ** -23)))

    return abs(float(lr.scale)) * fro(lr.B2) * fro(lr.A2) * (1 + 1e-9)


def _overflow(m, loaded) -> str | None:
    """LT207 (issue 11): whether applying ``m`` overflows its factors' dtype (float16 and
    bfloat16 adapters are often applied in it) or float32 (PEFT's arithmetic, and the merge's)."""
    own = [d for d in m.delta_dtypes() if d in ("F16", "BF16")]
    dtype = min(own, key=DTYPE_MAX.__getitem__) if own else "F32"  # float8 and float64 are upcast
    effect = "merging or applying it gives Inf"
    return (m.scale_overflow(DTYPE_MAX[dtype], dtype, effect=effect)
            or m.overflow(DTYPE_MAX[dtype], dtype, mags=m.magnitudes(loaded), effect=effect))


# -- against a base ---------------------------------------------------------------------------

def check_base(adapter: Adapter, base: "BaseCheckpoint", f: Findings) -> None:
    base_dtypes: set[str] = set()
    for m in adapter.modules.values():
        fit = m.fit_in(base)  # the one fit check (LT301, LT302, LT303), as merge and manifest use it
        if fit.target is not None:
            base_dtypes.add(base.dtype(fit.target))
        if not fit.ok:
            f.error(fit.check, f"module {m.name}: {fit.message}", m.name, str(base.path))
    for name, src in adapter.modules_to_save.items():
        target = base.tensor_name(name)  # the one name rule, as merge uses it
        if target is None:
            f.error("LT304", f"modules_to_save {name}: {base.missing(name)}", name, str(base.path))
        elif tuple(base.shape(target)) != shape_of(src):
            f.error("LT304", f"modules_to_save {name}: base {target} is {list(base.shape(target))}, the adapter's is "
                    f"{list(shape_of(src))}", name, str(base.path))
    base_name = base.config.get("_name_or_path") if base.config else None
    if adapter.base_model and base_name and adapter.base_model != base_name:
        f.warning("LT305", f"the adapter names base model {adapter.base_model!r} but {base.path} calls "
                  f"itself {base_name!r}", file=str(base.path))
    ad = {d for m in adapter.modules.values() for d in m.dtypes()}
    if base_dtypes and ad and base_dtypes != ad:
        f.info("LT306", f"base weights are {', '.join(sorted(base_dtypes))}, the adapter's factors "
               f"{', '.join(sorted(ad))}; merges round to the base's dtype", file=str(base.path))


# -- serving targets --------------------------------------------------------------------------

# module names that only diffusion models have (diffusers' UNet and DiT blocks)
_DIFFUSION_NAME = re.compile(r"(^|\.)(down_blocks|up_blocks|mid_block|single_transformer_blocks|transformer_blocks"
                            r"|time_embedding|conv_in|conv_out)(\.|$)")


def check_vllm(adapter: Adapter, f: Findings) -> None:
    diffusion = [c for c in adapter.components if c not in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    named = next((m.name for m in adapter.modules.values() if _DIFFUSION_NAME.search(m.name)), None)
    if diffusion or named:
        what = f"its components are {', '.join(adapter.components)}" if diffusion else f"module {named} is a diffusion block"
        f.error("LT407", f"this is a diffusion-model adapter ({what}); vLLM serves language models only")
    max_rank = max(adapter.ranks, default=0)
    if max_rank > VLLM_MAX_LORA_RANKS[-1]:
        f.error("LT401", f"rank {max_rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")
    elif max_rank:
        need = next(r for r in VLLM_MAX_LORA_RANKS if r >= max_rank)
        f.info("LT401", f"vLLM needs --max-lora-rank {need} or more for rank {max_rank}")
    other = sorted({m.algorithm for m in adapter.modules.values()} - {"LoRA", "DoRA"})
    if other:
        f.error("LT408", f"{', '.join(other)} modules: vLLM loads LoRA only; `loratool convert ADAPTER --to peft -o DIR` "
                "writes them as plain LoRA (exactly, or optimally at --rank)")
    if adapter.use_dora:
        f.error("LT402", "DoRA (lora_magnitude_vector) is not supported by vLLM; merge it into the base instead")
    if adapter.lora_bias:
        f.error("LT403", "lora_bias (lora_B.bias) is not supported by vLLM")
    if adapter.modules_to_save:
        f.warning("LT404", f"modules_to_save ({', '.join(sorted(adapter.modules_to_save))}): vLLM loads only "
                  "embedding/lm_head replacements and only with extra-vocab support; check your model")
    convs = [m.name for m in adapter.modules.values() if m.kind is LayerKind.CONV2D]
    if convs:
        f.error("LT405", f"{len(convs)} conv2d modules (e.g. {convs[0]}): vLLM supports linear and embedding LoRA only")
    cfg = lora_config(adapter)
    if cfg and cfg.r is not None and cfg.lora_alpha is not None:
        from loratool.adapter import peft_scale

        global_scale = peft_scale(cfg.lora_alpha, cfg.r, cfg.use_rslora)
        off = [m for m in adapter.modules.values() if abs(m.scale - global_scale) > 1e-12 * max(1.0, abs(global_scale))]
        if off:
            f.error("LT406", f"{len(off)} modules (e.g. {off[0].name}: scale {off[0].scale:g}) have a scale other "
                    f"than lora_alpha/r = {global_scale:g} through rank_pattern/alpha_pattern; vLLM applies one "
                    "scale to all modules, so their outputs would be wrong (resize or re-save with uniform alpha/r)")


# -- entry point ------------------------------------------------------------------------------

def check_manifest(adapter: Adapter, base: "BaseCheckpoint", f: Findings, allow_mismatch: bool,
                   require_manifest: bool) -> None:
    """Base identity (issue 4): with a manifest, its recorded base must be this one, by structure
    and then by content; a mismatch raises BaseMismatchError (exit 3) unless allowed. Without one,
    the shape checks above are all we have (and PEFT's base name, LT305)."""
    from loratool.errors import BaseMismatchError
    from loratool.manifest import check_base as check_manifest_base
    from loratool.manifest import load_manifest

    manifest = load_manifest(adapter)
    if manifest is None or manifest.base is None:
        if require_manifest:
            raise BaseMismatchError(f"{adapter.path}: no manifest records its base (--require-manifest); "
                                    "write one with `loratool manifest ADAPTER --base BASE`")
        # info, not a warning: almost no published adapter carries a manifest, and --strict --base
        # must pass on a good one (README's CI recipe); --require-manifest makes it an error
        f.info("LT307", f"{adapter.path}: no manifest records the base it was trained on, so the base is "
                  "checked by tensor shapes only; `loratool manifest ADAPTER --base BASE` pins it by content")
        return
    result = check_manifest_base(manifest, base, allow_mismatch=allow_mismatch)
    if result.mismatch:
        f.warning("LT308", f"{result.mismatch} (allowed by --allow-base-mismatch)")


def failed_report(path: str | Path, error: "LoratoolError", base: str | Path | None = None,
                  target: str | None = None, strict: bool = False) -> ValidationReport:
    """The report of a validation that could not run to the end: the input could not be read
    (LT001, exit 2), the usage was wrong (LT002, exit 2), or the base is not the one the manifest
    records (LT309, exit 3). ``validate --json`` prints it, so a CI job parses one shape of JSON
    whatever happened; the one-line error still goes to stderr."""
    from loratool.errors import BaseMismatchError, UsageError

    cid = ("LT309" if isinstance(error, BaseMismatchError) else "LT002" if isinstance(error, UsageError)
           else "LT302" if isinstance(error, MisfitError) else "LT001")
    f = Findings()
    f.error(cid, error.message)
    return ValidationReport(path=str(path), base=str(base) if base else None, target=target, strict=strict,
                            num_errors=1, num_warnings=0, passed=False, exit_code=error.exit_code,
                            findings=f.items, counts={cid: 1})


def validate(path: str | Path, base: str | Path | None = None, target: str | None = None,
             strict: bool = False, format: str | None = None, allow_base_mismatch: bool = False,
             require_manifest: bool = False, ignore: Iterable[str] = ()) -> ValidationReport:
    """Validate the adapter at ``path``. Unreadable input raises ``InputError`` (exit 2), a base
    that its manifest does not match raises ``BaseMismatchError`` (exit 3); every other problem
    becomes a finding in the report. ``ignore``: check ids (``LT202``) or names (``zero-b``) whose
    findings are left out of the report and the verdict (counted in ``report.ignored``)."""
    from loratool.resolve import load_adapter

    ignored_ids = ignored_checks(ignore)
    adapter = load_adapter(path, format=format, tolerant=True)
    f = Findings(default_file=_weights_file(adapter))
    from loratool._threads import single_threaded

    check_structure(adapter, f)
    check_config(adapter, f)
    with single_threaded():
        check_values(adapter, f)
    if base is not None:
        from loratool.checkpoint import BaseCheckpoint
        from loratool.resolve import resolve_base

        ckpt = BaseCheckpoint(resolve_base(base))  # a path, or hf://owner/name[@rev] from the HF cache
        check_base(adapter, ckpt, f)
        try:
            check_manifest(adapter, ckpt, f, allow_base_mismatch, require_manifest)
        except MisfitError:  # the modules do not fit: check_base's findings (LT301-LT303) say where
            if not any(x.id in ("LT301", "LT302", "LT303") for x in f.items):
                raise
    check_layer_notes(adapter, f)
    if target == "vllm":
        check_vllm(adapter, f)
    kept = _grouped([x for x in f.items if x.id not in ignored_ids])
    errors = sum(1 for x in kept if x.severity is Severity.ERROR)
    warnings = sum(1 for x in kept if x.severity is Severity.WARNING)
    failed = errors > 0 or (strict and warnings > 0)
    return ValidationReport(
        path=str(path), format=adapter.format, base=str(base) if base else None, target=target,
        strict=strict, num_modules=len(adapter.modules), num_errors=errors, num_warnings=warnings,
        passed=not failed, exit_code=EXIT_FINDINGS if failed else EXIT_OK, findings=kept,
        counts=_counts(kept), ignored=_counts(x for x in f.items if x.id in ignored_ids),
    )


def _grouped(findings: list[Finding]) -> list[Finding]:
    """Findings grouped by check id (in the order each id first appears), modules in natural
    order within a group (``layers.2`` before ``layers.10``)."""
    from loratool.text import natural_key

    first: dict[str, int] = {}
    for i, x in enumerate(findings):
        first.setdefault(x.id, i)
    return sorted(findings, key=lambda x: (first[x.id], natural_key(x.module or "")))


def _counts(findings: Iterable[Finding]) -> dict[str, int]:
    out: dict[str, int] = {}
    for x in findings:
        out[x.id] = out.get(x.id, 0) + 1
    return dict(sorted(out.items()))


def ignored_checks(ignore: Iterable[str]) -> set[str]:
    """Check ids from ``--ignore`` values (ids or names, comma-separated or repeated); an unknown
    one is a ``UsageError`` naming the valid ones."""
    from loratool.errors import UsageError

    names = {name: cid for cid, name in CHECKS.items()}
    out: set[str] = set()
    for value in ignore:
        for item in filter(None, (v.strip() for v in value.split(","))):
            cid = item.upper() if item.upper() in CHECKS else names.get(item.lower())
            if cid is None:
                ranges = {}
                for c in sorted(CHECKS):
                    ranges.setdefault(c[:3], []).append(c)
                known = ", ".join(f"{v[0]}-{v[-1]}" for v in ranges.values())
                raise UsageError(f"--ignore {item!r}: no such check; checks are {known} or their names "
                                 "(listed in `loratool validate --help`)")
            out.add(cid)
    return out
