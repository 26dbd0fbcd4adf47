"""Adapter manifests (``loratool.json``) and base enforcement.

A manifest records what an adapter is (format, file digests, canonical config digest, tensors
digest, rank/alpha/targets), which base it belongs to (``BaseFingerprint``), and how it was made
(lineage). It lives beside the adapter (``<dir>/loratool.json``, or ``<file>.loratool.json`` for a
single-file adapter), or inside the weights' safetensors ``__metadata__`` under
``loratool.manifest`` (``manifest_metadata``).

Commands that take an adapter and a base call ``check_base`` before they do anything else::

    result = check_base(adapter_path, base, allow_mismatch=opts.allow_base_mismatch,
                        require_manifest=opts.require_manifest)
    entry = lineage_entry("merged", inputs=[adapter, result.base], params={...},
                          base_mismatch=result.mismatch)

Commands that write an adapter record its manifest after writing it (a file cannot hold its own
digest; embedded manifests are built with ``files=False``)::

    parent = load_manifest(src)
    write_manifest(build_manifest(out, base_fp=parent.base if parent else None,
                                  lineage=[*(parent.lineage if parent else []), entry]), out)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Union

from pydantic import ValidationError

from loratool._version import __version__
from loratool.boundary import default_home, parse_json, read_bytes
from loratool.text import listed, utc_now
from loratool.errors import BaseMismatchError, FormatError, InputError, MisfitError
from loratool.fingerprint import (
    DerivationStore,
    HashCache,
    adapter_tensors_digest,
    canonical_json,
    config_digest,
    fingerprint_base,
    hash_files,
    parse_hub_ref,
)
from loratool.registry.refs import is_reference
from loratool.schemas.manifest import (
    SCHEMA_VERSION,
    AdapterRecord,
    BaseCheckResult,
    BaseFingerprint,
    FileDigest,
    InputRef,
    LineageEntry,
    Manifest,
    QuantDerivation,
    Summary,
)

if TYPE_CHECKING:  # pragma: no cover
    from loratool.adapter import Adapter
    from loratool.checkpoint import BaseCheckpoint
    from loratool.schemas.manifest import MergedManifest

MANIFEST_FILE = "loratool.json"
SIDECAR_SUFFIX = ".loratool.json"
METADATA_KEY = "loratool.manifest"
OVERRIDE_HINT = ("pass --allow-base-mismatch to use this base anyway (the mismatch is then recorded "
                 "in the output's lineage)")
_LIST_LIMIT = 3

PathLike = Union[str, "os.PathLike[str]"]
BaseLike = Union[str, "os.PathLike[str]", "BaseCheckpoint", BaseFingerprint]


# -- where manifests live ---------------------------------------------------------------------------

def manifest_path(adapter_path: PathLike) -> Path:
    """``<dir>/loratool.json`` for an adapter directory (or a file inside a PEFT directory),
    ``<file>.loratool.json`` for a single-file adapter."""
    p = Path(adapter_path)
    if p.is_dir():
        return p / MANIFEST_FILE
    if p.name == "adapter_config.json" or (p.parent / "adapter_config.json").exists():
        return p.parent / MANIFEST_FILE
    return p.with_name(p.name + SIDECAR_SUFFIX)


def _weight_files(adapter_path: Path) -> list[Path]:
    """Safetensors files that may carry an embedded manifest."""
    if adapter_path.is_file():
        if adapter_path.suffix == ".safetensors":
            return [adapter_path]
        adapter_path = adapter_path.parent
    if not adapter_path.is_dir():
        return []
    # only an adapter's own weight files: a directory may hold other safetensors (a Hub snapshot
    # with a full model beside the adapter)
    own = [adapter_path / n for n in ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")]
    return [p for p in own if p.is_file()] + sorted(adapter_path.glob("*/adapter_model.safetensors"))


def parse_manifest(text: str | bytes, source: str) -> Manifest:
    """A manifest from its JSON (a file's bytes, or the text embedded in safetensors metadata),
    parsed within ``loratool.boundary``'s bounds; ``source`` names it in the one-line error."""
    try:
        data = parse_json(text, source, what="loratool manifest")
    except InputError as e:
        detail = e.message[len(f"{source}: "):] if e.message.startswith(f"{source}: ") else e.message
        raise FormatError(f"{source}: not a loratool manifest: invalid JSON ({detail})") from None
    version = data.get("schema_version") if isinstance(data, dict) else None
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise FormatError(f"{source}: manifest schema version {version} is newer than this loratool "
                          f"understands ({SCHEMA_VERSION}); upgrade loratool")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as e:
        errors = e.errors()
        where = ".".join(str(x) for x in errors[0]["loc"]) or "(top level)"
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        raise FormatError(f"{source}: not a valid loratool manifest: {where}: {errors[0]['msg']}{more}; "
                          "regenerate it with `loratool manifest`") from None
    return manifest


def read_manifest_file(path: PathLike) -> Manifest:
    """``loratool.json`` (or ``<file>.loratool.json``): a regular file, read through the boundary
    (a FIFO or a device put there is refused without blocking)."""
    return parse_manifest(read_bytes(path), str(path))


def load_manifest(adapter: "PathLike | Adapter") -> Manifest | None:
    """The adapter's manifest: ``loratool.json`` beside it, else the one embedded in its weights'
    metadata; None when there is none."""
    from loratool.adapter import Adapter

    if isinstance(adapter, Adapter):
        embedded = adapter.metadata.get(METADATA_KEY)
        if adapter.path is None or (embedded and not os.path.lexists(manifest_path(adapter.path))):
            return parse_manifest(embedded, f"{adapter.path or 'adapter'} (metadata {METADATA_KEY})") if embedded else None
        adapter = adapter.path
    path = Path(adapter)
    sidecar = manifest_path(path)
    if os.path.lexists(sidecar):
        return read_manifest_file(sidecar)
    from loratool.safetensors_io import SafetensorsFile

    for f in _weight_files(path):
        meta = SafetensorsFile(f).metadata
        if METADATA_KEY in meta:
            return parse_manifest(meta[METADATA_KEY], f"{f} (metadata {METADATA_KEY})")
    return None


def write_manifest(manifest: Manifest, adapter_path: PathLike, inputs: Iterable[PathLike] = ()) -> Path:
    """Write the manifest beside the adapter, atomically (replacing an older one). The adapter and
    ``inputs`` are protected: the manifest is the one file written beside them (``sidecar``)."""
    from loratool.safetensors_io import atomic_path

    dest = manifest_path(adapter_path)
    with atomic_path(dest, overwrite=True, inputs=[adapter_path, *inputs], sidecar=True) as tmp:
        tmp.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return dest


def manifest_metadata(manifest: Manifest) -> dict[str, str]:
    """For a safetensors ``__metadata__``: ``{"loratool.manifest": <compact JSON>}``."""
    return {METADATA_KEY: manifest.model_dump_json()}


# -- building -------------------------------------------------------------------------------------

def _summary(values: Iterable[float]) -> Summary:
    vals = sorted({int(v) if float(v).is_integer() else float(v) for v in values})
    return Summary(min=vals[0], max=vals[-1], distinct=vals) if vals else Summary()


def _adapter_root(adapter: "Adapter") -> Path | None:
    if adapter.path is None:
        return None
    return adapter.path if adapter.path.is_dir() else adapter.path.parent


def _as_adapter(adapter: "PathLike | Adapter") -> "Adapter":
    from loratool.adapter import Adapter
    from loratool.formats import load_adapter

    return adapter if isinstance(adapter, Adapter) else load_adapter(adapter)


def declared_base(adapter: "Adapter") -> tuple[str | None, str | None]:
    """The base the adapter's own config names: (``base_model_name_or_path``, ``revision``).

    A config is a stranger's JSON: a list, number or object there is refused with one line here,
    before it can reach the manifest schema or the registry index (which expect text)."""
    out: list[str | None] = []
    for field, value in (("base_model_name_or_path", adapter.base_model), ("revision", adapter.base_revision)):
        if value is not None and not isinstance(value, str):
            shown = repr(value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise FormatError(f"{adapter.path or 'adapter'}: its config's {field} is {type(value).__name__} "
                              f"{shown}, not a string; fix the config (or remove the field)")
        out.append(value)
    return out[0], out[1]


def adapter_record(adapter: "PathLike | Adapter", files: bool = True, cache: HashCache | None = None) -> AdapterRecord:
    """What the manifest says about the adapter itself. ``files=False`` skips file digests (for a
    manifest that will be embedded in the file it describes)."""
    adapter = _as_adapter(adapter)
    base_model, base_revision = declared_base(adapter)
    digests: list[FileDigest] = []
    root = _adapter_root(adapter)
    if files and root is not None and adapter.files:
        shas = hash_files(adapter.files, cache=cache)
        digests = sorted(
            (FileDigest(path=f.relative_to(root).as_posix(), size=f.stat().st_size, sha256=shas[f])
             for f in adapter.files),
            key=lambda d: d.path,
        )
    return AdapterRecord(
        format=adapter.format,
        files=digests,
        config_digest=config_digest(adapter.config) if adapter.config else None,
        tensors_digest=adapter_tensors_digest(adapter),
        num_modules=len(adapter.modules),
        num_params=adapter.num_params,
        rank=_summary(adapter.ranks),
        alpha=_summary(adapter.alphas),
        targets=adapter.target_names(),
        dtypes=dict(sorted(adapter.dtypes().items())),
        use_dora=adapter.use_dora,
        use_rslora=adapter.use_rslora,
        components=list(adapter.components),
        base_model=base_model,
        base_revision=base_revision,
    )


def build_manifest(
    adapter: "PathLike | Adapter",
    base_fp: BaseFingerprint | None = None,
    lineage: Iterable[LineageEntry] | None = None,
    files: bool = True,
    cache: HashCache | None = None,
) -> Manifest:
    """A manifest for ``adapter`` (an ``Adapter`` or a path), with the base's fingerprint and the
    lineage entries given (oldest first)."""
    return Manifest(adapter=adapter_record(adapter, files=files, cache=cache), base=base_fp,
                    lineage=list(lineage or []))


def _jsonable(obj: Any) -> Any:
    return json.loads(canonical_json(obj))


def input_ref(obj: "InputRef | Adapter | Manifest | BaseFingerprint | PathLike") -> InputRef:
    """An operation input by digest: an adapter (object, manifest or path) or a base fingerprint."""
    from loratool.adapter import Adapter

    if isinstance(obj, InputRef):
        return obj
    if isinstance(obj, BaseFingerprint):
        return InputRef(kind="base", name=obj.name, digest=obj.content or obj.structure)
    if isinstance(obj, Manifest):
        a = obj.adapter
        return InputRef(kind="adapter", format=a.format, digest=a.tensors_digest, config_digest=a.config_digest)
    adapter = obj if isinstance(obj, Adapter) else _as_adapter(obj)
    return InputRef(
        kind="adapter",
        name=adapter.path.name if adapter.path else None,
        format=adapter.format,
        digest=adapter_tensors_digest(adapter),
        config_digest=config_digest(adapter.config) if adapter.config else None,
    )


def lineage_entry(
    operation: str,
    inputs: Iterable[Any] = (),
    params: dict[str, Any] | None = None,
    base_mismatch: str | None = None,
    time: str | None = None,
) -> LineageEntry:
    """One lineage step. ``operation``: created | converted | resized | composed | merged;
    ``inputs``: adapters (objects, paths, manifests) and base fingerprints; ``params``: anything
    JSON-able (sets and tuples become sorted/plain lists); ``base_mismatch``: the
    ``BaseCheckResult.mismatch`` of a run with --allow-base-mismatch."""
    return LineageEntry(
        operation=operation,
        inputs=[input_ref(i) for i in inputs],
        params=_jsonable(params or {}),
        loratool_version=__version__,
        time=time or utc_now(),
        base_mismatch=base_mismatch,
    )


def record_manifest(
    adapter_path: PathLike,
    base: BaseLike | None = None,
    cache: HashCache | None = None,
    refresh: bool = False,
    api: Any = None,
    format: str | None = None,
) -> tuple[Manifest, Path]:
    """``loratool manifest``: fingerprint the base (if given), keep the lineage of an existing
    manifest (else start it with "created"), and write ``loratool.json`` beside the adapter (read
    as ``format`` when given, else detected). A local base the adapter does not fit (``check_fit``)
    is refused: a manifest pins the base that every later command trusts.

    Only an adapter at a local path gets one: a registry adapter's files are its content (their
    digest is its name), and a Hub snapshot belongs to the Hugging Face cache."""
    if not os.path.lexists(adapter_path) and is_reference(os.fspath(adapter_path)):
        raise InputError(f"{adapter_path}: no such file or directory; `loratool manifest` writes beside a local "
                         "adapter only, never into the registry (an adapter's files there are its content) or the "
                         f"Hub cache: for a reference, `loratool registry export {adapter_path} -o DIR`, write the "
                         "manifest in DIR, then add DIR again")
    if format is not None:
        from loratool.formats import load_adapter

        adapter = load_adapter(adapter_path, format=format)
    else:
        adapter = _as_adapter(adapter_path)
    existing = load_manifest(adapter_path)
    if base is not None:
        check_fit(adapter, base)
    base_fp = _fingerprint(base, cache, True, refresh, api) if base is not None else (existing.base if existing else None)
    lineage = existing.lineage if existing else [lineage_entry("created", inputs=[base_fp] if base_fp else [])]
    manifest = build_manifest(adapter, base_fp=base_fp, lineage=lineage, cache=cache)
    return manifest, write_manifest(manifest, adapter_path, inputs=[adapter.path] if adapter.path else [])


# -- enforcement ------------------------------------------------------------------------------------

def _fingerprint(base: BaseLike, cache: HashCache | None, content: bool, refresh: bool = False,
                 api: Any = None) -> BaseFingerprint:
    if isinstance(base, BaseFingerprint):
        return base
    return fingerprint_base(base, cache=cache, content=content, refresh=refresh, api=api)


def _short(sha: str | None) -> str:
    return f"{sha[:12]}…" if sha else "unknown"


def _file_diffs(recorded: BaseFingerprint, found: BaseFingerprint, attr: str) -> list[str]:
    """Files whose ``attr`` (sha256 or structure) differs, by path; missing and extra files."""
    rec = {f.path: f for f in recorded.files}
    now = {f.path: f for f in found.files}
    out: list[str] = []
    for path in sorted(rec.keys() & now.keys()):
        a, b = getattr(rec[path], attr), getattr(now[path], attr)
        if a and b and a != b:
            if attr == "sha256":
                out.append(f"{path} has sha256 {_short(b)}, the manifest records {_short(a)}")
            else:
                out.append(f"{path} holds different tensors ({now[path].num_tensors} now, "
                           f"{rec[path].num_tensors} recorded)")
    out += [f"{p} is recorded but missing" for p in sorted(rec.keys() - now.keys())]
    out += [f"{p} is not in the manifest" for p in sorted(now.keys() - rec.keys())]
    return out


def _fit_problems(adapter: "Adapter", ckpt: "BaseCheckpoint") -> list[str]:
    """Modules whose base tensor is missing from ``ckpt`` or has another shape (the modules' own
    fit check, as validate and the merge plan use it). A Linear or Conv1D delta fits the
    transposed shape too: PEFT decides the kind per layer from the base module and flips
    fan_in_fan_out itself, and so does ``merge.plan_merge``."""
    out: list[str] = []
    for name, module in adapter.modules.items():
        fit = module.fit_in(ckpt)
        if not fit.mergeable:
            out.append(f"module {name}: {fit.message}")
    for name, t in adapter.modules_to_save.items():
        if name in ckpt and tuple(ckpt.shape(name)) != tuple(t.shape):
            out.append(f"{name} has shape {list(ckpt.shape(name))}, modules_to_save holds {list(t.shape)}")
    return out


def check_fit(adapter: "Adapter", base: BaseLike) -> None:
    """Refuse (``MisfitError``, exit 1, one line) a local ``base`` whose tensors the
    adapter's modules do not fit (``_fit_problems``: each module's own ``fit_in``). A Hub base or
    a bare fingerprint has no headers here to check."""
    from loratool.checkpoint import BaseCheckpoint

    if isinstance(base, BaseFingerprint) or (isinstance(base, str) and parse_hub_ref(base) is not None):
        return
    ckpt = base if isinstance(base, BaseCheckpoint) else BaseCheckpoint(base)
    problems = _fit_problems(adapter, ckpt)
    if problems:
        total = len(adapter.modules) + len(adapter.modules_to_save)
        raise MisfitError(
            f"{adapter.path or 'the adapter'} does not fit {ckpt.path} ({len(problems)} of its {total} modules "
            f"and tensors): {listed(problems, _LIST_LIMIT)}; no manifest written: give the base the adapter "
            "was trained on")


def same_base_name(a: str, b: str) -> bool:
    """Names as PEFT and transformers record them: Hub ids or local paths; compare the last part
    (``meta-llama/Llama-3.2-1B`` and ``/models/Llama-3.2-1B`` are one base)."""
    def last(s: str) -> str:
        return s.rstrip("/").rsplit("/", 1)[-1].lower()

    return last(a) == last(b)


def same_base_fingerprint(a: BaseFingerprint, b: BaseFingerprint) -> bool | None:
    """Whether two recorded bases are one: by content where both record it, else by structure
    (tensor names, shapes, dtypes); None when they record nothing comparable."""
    for attr in ("content", "structure"):
        x, y = getattr(a, attr), getattr(b, attr)
        if x and y:
            return x == y
    return None


def _record_hint(adapter_path: Path | None) -> str:
    """How to give the adapter a manifest: `loratool manifest` beside a local adapter; for one
    materialized from the registry (whose files are its content), at its source, then add it."""
    if adapter_path is not None:
        real, home = Path(os.path.realpath(adapter_path)), Path(os.path.realpath(default_home()))
        if home in real.parents:
            return ("it comes from the registry: record one beside its source with `loratool manifest SOURCE "
                    "--base BASE` and `loratool registry add SOURCE` again")
    return f"record one with `loratool manifest {adapter_path or 'ADAPTER'} --base BASE`"


def _quant_relation(recorded: BaseFingerprint, found: BaseFingerprint,
                    cache: HashCache | None) -> tuple[str, QuantDerivation] | None:
    """Whether ``found`` is the verified 4-bit derivative of the ``recorded`` base, or its 16-bit
    source: from a ``derived_from`` either fingerprint carries, else from the relations that
    ``loratool fingerprint --source`` recorded (``DerivationStore``). Content fingerprints only:
    they name every byte of both bases."""
    if not (recorded.content and found.content):
        return None
    store = DerivationStore.beside(cache)
    for seen, quant, source in (("4-bit derivative", found, recorded), ("16-bit source", recorded, found)):
        d = quant.derived_from
        if d is None or d.source_content != source.content:
            d = store.get(quant.content, source.content)
        if d is not None:
            return seen, d
    return None


def _relation_note(relation: tuple[str, QuantDerivation], base_label: str, label: str) -> str:
    seen, d = relation
    if seen == "4-bit derivative":
        return (f"{base_label} is the 4-bit derivative ({d.base_precision}) of the base recorded for {label}, verified "
                f"bit for bit by `loratool fingerprint --source` ({d.time}): its weights read as dequant(quant(W)), "
                "which differ from the recorded base's by the quantization term")
    return (f"{base_label} is the 16-bit base that the 4-bit base recorded for {label} quantizes ({d.base_precision}), "
            f"verified bit for bit by `loratool fingerprint --source` ({d.time}): the adapter saw dequant(quant(W)); "
            f"merge with --base-precision {d.base_precision.split('; ')[0]} to merge onto those weights")


def check_base(
    manifest_or_adapter: "Manifest | Adapter | PathLike",
    base: BaseLike,
    allow_mismatch: bool = False,
    require_manifest: bool = False,
    cache: HashCache | None = None,
    content: bool = True,
    api: Any = None,
) -> BaseCheckResult:
    """Check that ``base`` is the base the adapter's manifest records.

    Structure first (headers only), then content (per-file sha256, cached in ``cache``; skipped
    with ``content=False``). A mismatch raises ``BaseMismatchError`` (exit 3) with one line naming
    the files or tensors that differ, unless ``allow_mismatch``: then the result's ``mismatch``
    says what differed, for the caller to record in lineage.

    Quantized derivatives (issue 16): when the contents differ but one base is the verified
    bitsandbytes 4-bit quantization of the other (``_quant_relation``: a ``derived_from`` in either
    fingerprint, or a relation ``loratool fingerprint BASE4 --source BASE16`` recorded), the check
    passes with ``content="derived"`` and ``seen`` saying which one it saw ("4-bit derivative" of
    the recorded base, or its "16-bit source"), and a warning saying so. A 4-bit base without a
    recorded relation fails with the command that records it.

    Without a manifest (or one without a base): ``require_manifest`` raises; otherwise the result
    is "unverified", with a warning, and what can still be checked is: the adapter's modules fit
    the base's tensor shapes (local bases), and the adapter's ``base_model_name_or_path`` against
    the base's name (a warning only: names are often local paths, so they are weak evidence).
    """
    from loratool.adapter import Adapter
    from loratool.checkpoint import BaseCheckpoint

    manifest: Manifest | None
    adapter: Adapter | None = None
    adapter_path: Path | None = None
    if isinstance(manifest_or_adapter, Manifest):
        manifest = manifest_or_adapter
    elif isinstance(manifest_or_adapter, Adapter):
        adapter = manifest_or_adapter
        adapter_path = adapter.path
        manifest = load_manifest(adapter)
    else:
        adapter_path = Path(manifest_or_adapter)
        manifest = load_manifest(adapter_path)
    label = str(adapter_path) if adapter_path else "the adapter"

    hub = isinstance(base, str) and parse_hub_ref(base) is not None
    ckpt: BaseCheckpoint | None = None
    if not hub and not isinstance(base, BaseFingerprint):
        ckpt = base if isinstance(base, BaseCheckpoint) else BaseCheckpoint(base)
    base_label = str(base) if isinstance(base, (str, os.PathLike)) else (
        str(ckpt.path) if ckpt else (base.name or "the base"))

    def load_adapter_lazily() -> Adapter | None:
        nonlocal adapter
        if adapter is None and adapter_path is not None:
            from loratool.formats import load_adapter

            adapter = load_adapter(adapter_path, tolerant=True)
        return adapter

    def fail(result: BaseCheckResult, what: str) -> BaseCheckResult:
        text = f"base mismatch: {base_label} is not the base recorded for {label}: {what}"
        if not allow_mismatch:
            raise BaseMismatchError(f"{text}; {OVERRIDE_HINT}")
        result.status = "mismatch"
        result.mismatch = text
        return result

    def misfit(problems: list[str], recorded: bool) -> MisfitError:
        """Modules that do not fit the base: no override can make a merge of them work, so none
        is suggested, and without a manifest nothing was 'recorded' (issue 13)."""
        why = ("it differs from the base the manifest records, and " if recorded else "")
        return MisfitError(f"{base_label} is not a base of {label}: {why}the adapter's modules do not fit "
                                 f"its tensors: {listed(problems, _LIST_LIMIT)}; give the base the adapter was "
                                 "trained on")

    if manifest is None or manifest.base is None:
        why = "has no loratool manifest" if manifest is None else "has a manifest without a base fingerprint"
        if require_manifest:
            raise BaseMismatchError(
                f"{label} {why}, so its base cannot be verified and --require-manifest is set; "
                f"{_record_hint(adapter_path)}"
            )
        result = BaseCheckResult(status="unverified", warnings=[
            f"{label} {why}; the base is not verified by fingerprint "
            f"({_record_hint(adapter_path)})"])
        if ckpt is not None or isinstance(base, BaseFingerprint):
            result.base = _fingerprint(ckpt or base, cache, content=False)  # headers only
        found_name = base.name if isinstance(base, BaseFingerprint) else (
            parse_hub_ref(base)[0] if hub else ckpt.config.get("_name_or_path"))
        declared = manifest.adapter.base_model if manifest else None
        a = load_adapter_lazily()
        declared = declared or (a.base_model if a else None)
        # names from configs are a stranger's JSON: compared only when both are text
        if isinstance(declared, str) and isinstance(found_name, str) and declared and found_name \
                and not same_base_name(declared, found_name):
            result.warnings.append(f"{label} names its base {declared!r}, but {base_label} is {found_name!r}")
        if a is not None and ckpt is not None:
            result.structure = "match"
            problems = _fit_problems(a, ckpt)
            if problems:
                raise misfit(problems, recorded=False)
        return result

    recorded = manifest.base
    result = BaseCheckResult(status="unverified")
    found = _fingerprint(ckpt or base, cache, content=hub, api=api)  # headers only for local bases
    if recorded.structure and found.structure:
        if recorded.structure != found.structure:
            result.structure = "mismatch"
            result.base = found
            details = _file_diffs(recorded, found, "structure")
            a = load_adapter_lazily()
            if a is not None and ckpt is not None and (problems := _fit_problems(a, ckpt)):
                raise misfit(problems, recorded=True)
            counts = f"{found.num_tensors} tensors, the manifest records {recorded.num_tensors}"
            return fail(result, f"different tensor names, shapes or dtypes ({counts})"
                        + (f": {listed(details, _LIST_LIMIT)}" if details else ""))
        result.structure = "match"
    else:
        result.warnings.append("structure not compared: "
                               + ("the manifest records none" if not recorded.structure else f"unknown for {base_label}"))

    if not content:
        result.content = "skipped"
    else:
        if not hub and ckpt is not None:
            found = _fingerprint(ckpt, cache, content=True)
        if recorded.content and found.content:
            relation = _quant_relation(recorded, found, cache) if recorded.content != found.content else None
            if relation is not None:
                result.content, result.seen, result.derivation = "derived", relation[0], relation[1]
                if relation[0] == "4-bit derivative":  # the base as found, with the relation it was accepted by
                    found = found.model_copy(update={"derived_from": relation[1]})
                result.warnings.append(_relation_note(relation, base_label, label))
            elif recorded.content != found.content:
                result.content = "mismatch"
                result.base = found
                details = _file_diffs(recorded, found, "sha256")
                what = ("same tensor names, shapes and dtypes but different values"
                        if result.structure == "match" else "different file contents")
                what += f": {listed(details, _LIST_LIMIT)}" if details else ""
                if ckpt is not None and ckpt.quantized:
                    what += (f"; {base_label} holds bitsandbytes 4-bit weights, and no relation to the recorded base "
                             f"is recorded: if it is the 4-bit quantization of that base, record it with `loratool "
                             f"fingerprint {base_label} --source BASE16` (BASE16: the recorded base"
                             + (f", {recorded.name}" if recorded.name else "") + ")")
                return fail(result, what)
            else:
                result.content, result.seen = "match", "recorded"
        else:
            result.warnings.append("content not compared: "
                                   + ("the manifest records none" if not recorded.content else f"unknown for {base_label}"))
    result.base = found
    compared = "match" in (result.structure, result.content) or result.content == "derived"
    result.status = "match" if compared else "unverified"
    return result


# -- outputs ------------------------------------------------------------------------------------
# Every adapter that loratool writes (convert, resize, compose) carries a manifest: embedded in
# its safetensors __metadata__ (written with the file, so never out of step) and as loratool.json
# beside it (with the digests of the files, which a file cannot hold about itself).

def stamp_adapter(
    adapter: "Adapter",
    operation: str,
    inputs: "Iterable[Adapter]",
    params: dict[str, Any] | None = None,
    base_mismatch: str | None = None,
) -> Manifest:
    """Before writing ``adapter``: build its manifest (base: the one the inputs' manifests agree
    on; lineage: the first input's lineage plus this step) and put it in ``adapter.metadata``."""
    inputs = list(inputs)
    parents = [load_manifest(a) for a in inputs]
    bases = {}
    for p in parents:
        if p is not None and p.base is not None:
            bases[p.base.content or p.base.structure] = p.base
    base_fp = next(iter(bases.values())) if len(bases) == 1 else None
    first = parents[0] if parents else None
    lineage = list(first.lineage) if first is not None else []
    lineage.append(lineage_entry(operation, inputs=inputs, params=params, base_mismatch=base_mismatch))
    manifest = build_manifest(adapter, base_fp=base_fp, lineage=lineage, files=False)
    adapter.metadata = {**adapter.metadata, **manifest_metadata(manifest)}
    return manifest


def finish_output(manifest: Manifest, out_path: PathLike) -> Path:
    """After writing: ``loratool.json`` beside the output, with its file digests."""
    final = build_manifest(out_path, base_fp=manifest.base, lineage=manifest.lineage)
    return write_manifest(final, out_path)


# -- merged checkpoints ---------------------------------------------------------------------------

class BaseGuard:
    """What ``merge``/``unmerge``/``parity`` call per adapter before touching a base: the manifest
    check (exit 3 on a mismatch unless allowed), remembering what it found for the lineage."""

    def __init__(self, allow_mismatch: bool = False, require_manifest: bool = False,
                 cache: HashCache | None = None):
        self.allow_mismatch = allow_mismatch
        self.require_manifest = require_manifest
        self.cache = cache if cache is not None else HashCache.default()
        self.results: list[tuple["Adapter", BaseCheckResult]] = []

    def __call__(self, adapter: "Adapter", ckpt: Any) -> None:
        result = check_base(adapter, ckpt, allow_mismatch=self.allow_mismatch,
                            require_manifest=self.require_manifest, cache=self.cache)
        self.results.append((adapter, result))

    @property
    def warnings(self) -> list[str]:
        return [w for _, r in self.results for w in r.warnings]

    @property
    def mismatch(self) -> str | None:
        found = [r.mismatch for _, r in self.results if r.mismatch]
        return "; ".join(found) if found else None

    @property
    def messages(self) -> list[str]:
        """What the commands say on stderr: the warnings, then the mismatch that was allowed."""
        return self.warnings + ([f"base mismatch allowed: {self.mismatch}"] if self.mismatch else [])

    @property
    def base(self) -> BaseFingerprint | None:
        for _, r in self.results:
            if r.base is not None:
                return r.base
        return None


def merged_manifest(operation: str, base: BaseFingerprint | None, adapters: Iterable["Adapter"],
                    params: dict[str, Any], base_mismatch: str | None = None) -> "MergedManifest":
    from loratool.schemas.manifest import MergedManifest

    inputs: list[Any] = ([base] if base is not None else []) + list(adapters)
    entry = lineage_entry(operation, inputs=inputs, params=params, base_mismatch=base_mismatch)
    return MergedManifest(base=base, lineage=[entry])


def write_merged_manifest(manifest: "MergedManifest", directory: PathLike) -> Path:
    """``loratool.json`` inside a merged checkpoint directory (called before its atomic rename)."""
    path = Path(directory) / MANIFEST_FILE
    path.write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return path
