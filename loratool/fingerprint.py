"""Base identity: per-file sha256, structure and content fingerprints, canonical digests.

* ``fingerprint_base(BASE)`` takes a local base (directory or ``.safetensors`` file, anything
  ``BaseCheckpoint`` reads) or a Hub reference ``hf://owner/name[@revision]`` and returns a
  ``BaseFingerprint`` (see ``loratool.schemas.manifest`` for the exact definitions).
* Local files are hashed at disk speed: large ``readinto`` reads into one buffer per thread, one
  thread per file (hashlib releases the GIL while it hashes, so threads run in parallel). Results
  are cached under ``$LORATOOL_HOME/hashes`` keyed by (real path, device, inode, size, mtime and
  ctime in ns), so a second run does not read the weights again. The ctime is what makes the key
  trustworthy: anyone can set a file's mtime back (``touch -d``, ``os.utime``) after changing its
  bytes in place, but every change (of the bytes, or of the mtime itself) sets the ctime to now,
  and nothing short of changing the clock sets it back (issue 11).
* The structure fingerprint needs only the safetensors headers. From the Hub it comes from
  ``HfApi.get_safetensors_metadata`` (HTTP range reads of the headers); the per-file sha256 comes
  from ``model_info(files_metadata=True)`` (the LFS oid). Nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from loratool.boundary import default_home, open_regular, read_json
from loratool.canonical import canonical_json
from loratool.text import HUB_PREFIX, utc_now
from loratool.errors import BaseMismatchError, InputError
from loratool.schemas.manifest import BaseFingerprint, FileDigest, QuantDerivation

if TYPE_CHECKING:  # pragma: no cover
    from loratool.adapter import Adapter
    from loratool.formats.base import FormatConfig
    from loratool.checkpoint import BaseCheckpoint

CHUNK_BYTES = 8 * 1024 * 1024  # large reads: per-call overhead vanishes, memory stays small
# Bookkeeping about who wrote the config, not what the adapter is.
IGNORED_CONFIG_KEYS = frozenset({"peft_version"})


# -- hashing ------------------------------------------------------------------------------------

# ``default_home`` (imported above from loratool.boundary, the one place that decides which folder
# the registry home is and protects it from outputs) stays importable from here.


class HashCache:
    """sha256 of files, cached on disk by file identity (path, device, inode, size, mtime_ns,
    ctime_ns: see the module docstring for why the ctime).

    One small JSON file per entry, written atomically, so concurrent runs never corrupt it. A
    cache that cannot be written (read-only home) only costs speed. ``hits``, ``misses`` and
    ``hashed_bytes`` count this object's lookups.
    """

    def __init__(self, home: str | os.PathLike):
        self.dir = Path(home) / "hashes"
        self.hits = 0
        self.misses = 0
        self.hashed_bytes = 0

    @classmethod
    def default(cls) -> "HashCache":
        return cls(default_home())

    @staticmethod
    def _identity(path: Path, st: os.stat_result) -> dict[str, Any]:
        return {"path": str(path.resolve()), "dev": st.st_dev, "inode": st.st_ino,
                "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}

    def _entry(self, ident: dict[str, Any]) -> Path:
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        return self.dir / key[:2] / f"{key}.json"

    def get(self, path: Path, st: os.stat_result) -> str | None:
        ident = self._identity(path, st)
        entry = self._entry(ident)
        if not entry.is_file():
            return None
        try:  # bounded like any JSON read: a damaged entry is a miss, never an error
            data = read_json(entry, what="hash cache entry", limit=64 * 1024)
        except InputError:
            return None
        if not isinstance(data, dict) or data.get("identity") != ident:
            return None
        sha = data.get("sha256")
        return sha if isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha) else None

    def put(self, path: Path, st: os.stat_result, sha256: str) -> None:
        ident = self._identity(path, st)
        entry = self._entry(ident)
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=entry.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"identity": ident, "sha256": sha256}, f)
            os.replace(tmp, entry)
        except OSError:
            pass  # a cache we cannot write only costs speed


class DerivationStore:
    """Verified quantization relations (``QuantDerivation``), under ``$LORATOOL_HOME/derivations``:
    one small JSON file per (4-bit base's content fingerprint, 16-bit base's content fingerprint),
    written atomically like the hash cache's entries. Content fingerprints name the bytes of every
    file, so a relation verified once holds for any copy of the two bases. Only relations that
    were verified are stored; a damaged or foreign entry is ignored."""

    def __init__(self, home: str | os.PathLike):
        self.dir = Path(home) / "derivations"

    @classmethod
    def default(cls) -> "DerivationStore":
        return cls(default_home())

    @classmethod
    def beside(cls, cache: "HashCache | None") -> "DerivationStore":
        """The store in the hash cache's home (the default home without a cache)."""
        return cls(cache.dir.parent) if cache is not None else cls.default()

    def _entry(self, quant: str, source: str) -> Path:
        return self.dir / quant[:2] / f"{quant}-{source}.json"

    def _read(self, entry: Path, quant: str) -> QuantDerivation | None:
        try:
            data = read_json(entry, what="derivation record", limit=64 * 1024)
            if isinstance(data, dict) and data.get("quant_content") == quant:
                found = QuantDerivation.model_validate(data.get("derivation"))
                if entry.name == f"{quant}-{found.source_content}.json":
                    return found
        except (InputError, ValueError):
            pass
        return None

    def get(self, quant: str | None, source: str | None) -> QuantDerivation | None:
        """The recorded relation of the 4-bit base ``quant`` to the 16-bit base ``source`` (content
        fingerprints), or None."""
        if not (quant and source and re.fullmatch(r"[0-9a-f]{64}", quant) and re.fullmatch(r"[0-9a-f]{64}", source)):
            return None
        entry = self._entry(quant, source)
        return self._read(entry, quant) if entry.is_file() else None

    def sources(self, quant: str | None) -> list[QuantDerivation]:
        """Every recorded 16-bit source of the 4-bit base ``quant``, the latest verified first."""
        if not (quant and re.fullmatch(r"[0-9a-f]{64}", quant)):
            return []
        found = [d for e in sorted((self.dir / quant[:2]).glob(f"{quant}-*.json")) if (d := self._read(e, quant))]
        return sorted(found, key=lambda d: d.time, reverse=True)

    def put(self, quant: str, derivation: QuantDerivation) -> None:
        entry = self._entry(quant, derivation.source_content)
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".", suffix=".tmp", dir=entry.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump({"quant_content": quant, "derivation": derivation.model_dump(mode="json")}, f)
            os.replace(tmp, entry)
        except OSError:
            pass  # unrecorded: `fingerprint --source` says so


def sha256_file(path: str | os.PathLike, chunk_bytes: int = CHUNK_BYTES) -> str:
    """sha256 of a file's bytes, streamed with large reads into one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(chunk_bytes)
    view = memoryview(buf)
    fd = open_regular(path)  # a FIFO or a device is refused, never read
    try:
        with os.fdopen(fd, "rb", buffering=0, closefd=False) as f:
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            while n := f.readinto(buf):
                h.update(view[:n])
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    finally:
        os.close(fd)
    return h.hexdigest()


def hash_files(
    paths: Sequence[str | os.PathLike],
    cache: HashCache | None = None,
    refresh: bool = False,
    workers: int | None = None,
) -> dict[Path, str]:
    """sha256 of each file, in parallel threads; cached results are used unless ``refresh``.

    Fresh results are stored in ``cache`` (also with ``refresh``). A file that changes while it is
    hashed (its stat differs afterwards) is not cached.
    """
    out: dict[Path, str] = {}
    todo: list[tuple[Path, os.stat_result]] = []
    for p in map(Path, paths):
        try:
            st = p.stat()
        except OSError as e:
            raise InputError(f"{p}: cannot read: {e.strerror or e}") from None
        cached = cache.get(p, st) if cache is not None and not refresh else None
        if cached is not None:
            cache.hits += 1
            out[p] = cached
        else:
            todo.append((p, st))
    if not todo:
        return out
    todo.sort(key=lambda item: -item[1].st_size)  # largest first: the pool ends together
    n = max(1, min(len(todo), workers or os.cpu_count() or 4))
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="sha256") as pool:
        digests = list(pool.map(lambda item: sha256_file(item[0]), todo))
    for (p, st), sha in zip(todo, digests):
        out[p] = sha
        if cache is not None:
            cache.misses += 1
            cache.hashed_bytes += st.st_size
            try:
                unchanged = _same_stat(p.stat(), st)
            except OSError:
                unchanged = False
            if unchanged:
                cache.put(p, st, sha)
    return out


def _same_stat(a: os.stat_result, b: os.stat_result) -> bool:
    return ((a.st_dev, a.st_ino, a.st_size, a.st_mtime_ns, a.st_ctime_ns)
            == (b.st_dev, b.st_ino, b.st_size, b.st_mtime_ns, b.st_ctime_ns))


# -- canonical digests ----------------------------------------------------------------------------

# ``canonical_json`` (imported above) lives in loratool.canonical: one serialization for config
# digests and registry trees.


def config_digest(config: "FormatConfig | dict[str, Any]") -> str:
    """sha256 of an adapter config's canonical JSON, ``peft_version`` left out: an adapter's typed
    config (its ``document``, per-component configs each without it) or a config as read."""
    doc = config if isinstance(config, dict) else config.document(IGNORED_CONFIG_KEYS)
    kept = {k: v for k, v in doc.items() if k not in IGNORED_CONFIG_KEYS}
    return hashlib.sha256(canonical_json(kept).encode("utf-8")).hexdigest()


def adapter_tensors_digest(adapter: "Adapter") -> str:
    """sha256 over the adapter's tensors in the format-neutral model, sorted by name.

    Each tensor contributes a JSON line ``[name, role, dtype, shape]`` then its raw bytes (their
    length follows from dtype and shape, so the stream is unambiguous). Metadata does not enter,
    so a manifest can be embedded in the weights without changing the digest.
    """
    from loratool.adapter import dtype_of, shape_of
    from loratool.safetensors_io import TensorRef, _tensor_bytes

    entries: list[tuple[str, str, Any]] = []
    for name, module in adapter.modules.items():
        entries += [(name, role, t) for role, t in module.tensors().items()]
    entries += [(name, "modules_to_save", t) for name, t in adapter.modules_to_save.items()]
    entries += [(name, "extra", t) for name, t in adapter.extra_tensors.items()]
    entries.sort(key=lambda e: (e[0], e[1]))
    # Tensors in files are immutable here (inputs are never written): a command that records an
    # input in both the manifest and the lineage hashes it once. In-memory tensors are not cached.
    token = tuple((name, role, id(t.file), t.info.start, t.info.end) if isinstance(t, TensorRef) else None
                  for name, role, t in entries)
    cached = getattr(adapter, "_tensors_digest_memo", None)
    if None not in token and cached is not None and cached[0] == token:
        return cached[1]
    h = hashlib.sha256()
    for name, role, t in entries:
        head = [name, role, dtype_of(t), list(shape_of(t))]
        h.update(json.dumps(head, separators=(",", ":")).encode("utf-8") + b"\n")
        h.update(t.raw() if isinstance(t, TensorRef) else _tensor_bytes(t))
    if None not in token:
        adapter._tensors_digest_memo = (token, h.hexdigest())
    return h.hexdigest()



def structure_fingerprint(tensors: Iterable[tuple[str, str, Sequence[int]]]) -> str:
    """sha256 of the canonical JSON of sorted ``[name, dtype, shape]`` triples (shard-independent)."""
    triples = sorted([str(n), str(d), [int(x) for x in s]] for n, d, s in tensors)
    return hashlib.sha256(json.dumps(triples, separators=(",", ":")).encode("utf-8")).hexdigest()


def content_fingerprint(sha256s: Iterable[str]) -> str:
    """sha256 of the sorted file sha256 values, one per line (independent of file names)."""
    return hashlib.sha256("\n".join(sorted(sha256s)).encode("ascii")).hexdigest()


# -- local bases ----------------------------------------------------------------------------------

# ~/.cache/huggingface/hub/models--owner--name/snapshots/<commit>/...
_HF_SNAPSHOT = re.compile(r"/models--([^/]+?)--([^/]+)/snapshots/([0-9a-f]{40})(/|$)")


def _local_name(ckpt: "BaseCheckpoint") -> tuple[str, str | None, str | None]:
    """(name, repo_id, revision) of a local base; repo and revision from an HF cache snapshot path."""
    m = _HF_SNAPSHOT.search(ckpt.path.resolve().as_posix())
    if m:
        repo = f"{m.group(1)}/{m.group(2)}"
        return repo, repo, m.group(3)
    declared = ckpt.config.get("_name_or_path")
    # A declared name that is a local path says where the model was saved, not what it is.
    if isinstance(declared, str) and declared and not declared.startswith(("/", ".", "~")) and ":" not in declared:
        return declared, None, None
    return ckpt.path.name, None, None


def fingerprint_local(
    base: "str | os.PathLike | BaseCheckpoint",
    cache: HashCache | None = None,
    content: bool = True,
    refresh: bool = False,
    workers: int | None = None,
) -> BaseFingerprint:
    """Fingerprint a local base. ``content=False`` reads headers only (no hashing)."""
    from loratool.checkpoint import BaseCheckpoint

    ckpt = base if isinstance(base, BaseCheckpoint) else BaseCheckpoint(base)
    root = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    per_file: dict[Path, list[tuple[str, str, tuple[int, ...]]]] = defaultdict(list)
    triples = []
    num_params = 0
    from loratool.quant.gptq import PackedRef

    # GPTQ/AWQ layers count as their stored tensors (qweight, qzeros, scales, g_idx), as the Hub's
    # headers give them (``fingerprint_hub``) and as loratool recorded them before it read them.
    # bitsandbytes 4-bit weights count as the 16-bit weights they stand for: a 4-bit base then has
    # its 16-bit source's structure, which ``fingerprint --source`` relations rely on.
    stored: dict[Path, str] = {}  # files holding GPTQ/AWQ layers -> the names' prefix
    for name, ref in ckpt.items():
        num_params += ref.info.numel
        if isinstance(ref, PackedRef):  # its stored tensors, below
            stored[ref.file.path] = name[: len(name) - len(ref.info.name)]
            continue
        triples.append((name, ref.dtype, ref.shape))
        per_file[ref.file.path].append((ref.info.name, ref.dtype, ref.shape))
    for f, prefix in stored.items():
        from loratool.safetensors_io import SafetensorsFile

        st, shown = SafetensorsFile(f), {n for n, _, _ in per_file[f]}
        for key in st.keys():
            if key not in shown:
                r = st.ref(key)
                triples.append((prefix + key, r.dtype, r.shape))
                per_file[f].append((key, r.dtype, r.shape))
    digests = hash_files(ckpt.files, cache=cache, refresh=refresh, workers=workers) if content else {}
    files = [
        FileDigest(
            path=f.relative_to(root).as_posix(),
            size=f.stat().st_size,
            sha256=digests.get(f),
            structure=structure_fingerprint(per_file[f]),
            num_tensors=len(per_file[f]),
        )
        for f in ckpt.files
    ]
    files.sort(key=lambda fd: fd.path)
    name, repo_id, revision = _local_name(ckpt)
    fp = BaseFingerprint(
        name=name,
        repo_id=repo_id,
        revision=revision,
        files=files,
        structure=structure_fingerprint(triples),
        content=content_fingerprint(digests.values()) if content else None,
        num_tensors=len(triples),
        num_params=num_params,
    )
    if content and ckpt.quantized and cache is not None:  # a 4-bit base: the relation recorded earlier
        sources = DerivationStore.beside(cache).sources(fp.content)
        if sources:
            fp.derived_from = sources[0]
            if len(sources) > 1:
                fp.notes.append(f"{len(sources)} 16-bit bases are recorded as its source; derived_from names "
                                "the latest verified")
    return fp


def fingerprint_derived(
    base: "str | os.PathLike",
    source: "str | os.PathLike",
    cache: HashCache | None = None,
    refresh: bool = False,
) -> tuple[BaseFingerprint, bool]:
    """``loratool fingerprint BASE --source BASE16``: the fingerprint of the 4-bit ``base`` with
    ``derived_from`` filled in once ``loratool.quant.identity.verify_derived`` finds it is, bit for
    bit, bitsandbytes' quantization of the 16-bit ``source``; and whether the verdict came from the
    record of an earlier run (``DerivationStore``, skipped with ``refresh``). The relation is
    recorded for ``check_base``. Not derived: ``BaseMismatchError`` (exit 3) naming the first
    difference."""
    from loratool.checkpoint import BaseCheckpoint
    from loratool.quant.identity import verify_derived

    for ref, what in ((base, "BASE"), (source, "--source")):
        if isinstance(ref, str) and parse_hub_ref(ref) is not None:
            raise InputError(f"{ref}: --source compares the weights of two local bases; download {what} first "
                             "(`huggingface-cli download`) and give its folder")
    ckpt4, ckpt16 = BaseCheckpoint(base), BaseCheckpoint(source)
    if not ckpt4.quantized:
        raise InputError(f"{base}: holds no bitsandbytes 4-bit weights; --source relates a 4-bit base (a "
                         "*-bnb-4bit checkpoint) to the 16-bit base it was quantized from")
    if ckpt16.quantized:
        raise InputError(f"{source}: holds bitsandbytes 4-bit weights itself; --source names the 16-bit base")
    fp4 = fingerprint_local(ckpt4, cache=cache, refresh=refresh)
    fp16 = fingerprint_local(ckpt16, cache=cache, refresh=refresh)
    store = DerivationStore.beside(cache)
    found = None if refresh else store.get(fp4.content, fp16.content)
    cached = found is not None
    if found is None:
        result = verify_derived(ckpt16, ckpt4)
        if not result.derived:
            raise BaseMismatchError(f"{base} is not bitsandbytes' 4-bit quantization of {source}: {result.mismatch}")
        from loratool._version import __version__

        found = QuantDerivation(
            source_content=fp16.content, source_structure=fp16.structure, source_name=fp16.name,
            base_precision=result.spec or "; ".join(result.specs), quantized_tensors=len(result.quantized),
            copied_tensors=len(result.copied), loratool_version=__version__, time=utc_now())
        store.put(fp4.content, found)
        if store.get(fp4.content, fp16.content) is None:
            fp4.notes.append(f"the relation could not be recorded under {store.dir} (not writable?): check_base "
                             "will not accept the one base for the other")
    fp4.derived_from = found
    fp4.notes = [n for n in fp4.notes if "derived_from names" not in n]
    return fp4, cached


# -- Hub ------------------------------------------------------------------------------------------

def parse_hub_ref(ref: str) -> tuple[str, str | None] | None:
    """``hf://owner/name[@revision]`` -> (repo_id, revision); None for anything else."""
    if not isinstance(ref, str) or not ref.startswith(HUB_PREFIX):
        return None
    body = ref[len(HUB_PREFIX):]
    repo, _, revision = body.partition("@")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", repo):
        raise InputError(f"{ref}: not a Hub reference; expected hf://owner/name or hf://owner/name@revision")
    return repo, revision or None


def _hub_errors(headers: bool = False) -> tuple[type[BaseException], ...]:
    """What a Hub call raises for a network or repo problem (not for a bug of ours); with
    ``headers``, also what reading remote safetensors headers raises."""
    import importlib

    errors: list[type[BaseException]] = [OSError]  # HfHubHTTPError and OfflineModeIsEnabled are OSErrors
    # Transport errors (no network, DNS) come from the HTTP client of this huggingface_hub version.
    for module, name in (("httpx2", "HTTPError"), ("httpx", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    if headers:
        try:
            from huggingface_hub.errors import NotASafetensorsRepoError, SafetensorsParsingError

            errors += [NotASafetensorsRepoError, SafetensorsParsingError]
        except ImportError:  # pragma: no cover - old huggingface_hub
            pass
    return tuple(errors)


def _weight_files_by_name(names: list[str]) -> list[str]:
    """The files a local ``BaseCheckpoint`` would read, chosen from a repo's file names alone:
    per model folder (root, or pipeline components), the shards ``model-0000i-of-0000n`` when an
    index is present, else ``model.safetensors``, else every ``.safetensors`` file there."""
    by_dir: dict[str, list[str]] = defaultdict(list)
    for n in names:
        if n.endswith(".safetensors"):
            by_dir[n.rpartition("/")[0]].append(n)
    if "model_index.json" in names:  # diffusers pipeline: the component folders only
        dirs = [d for d in by_dir if d in ("unet", "transformer", "text_encoder", "text_encoder_2",
                                          "text_encoder_3", "vae")]
    else:
        dirs = [""] if "" in by_dir else []
    out: list[str] = []
    for d in dirs:
        files = by_dir[d]
        prefix = f"{d}/" if d else ""
        for stem in ("model", "diffusion_pytorch_model"):
            shards = [f for f in files if re.fullmatch(re.escape(prefix + stem) + r"-\d+-of-\d+\.safetensors", f)]
            if f"{prefix}{stem}.safetensors.index.json" in names and shards:
                out += shards
                break
            if f"{prefix}{stem}.safetensors" in files:
                out.append(f"{prefix}{stem}.safetensors")
                break
        else:
            out += files
    return sorted(out)


def fingerprint_hub(repo_id: str, revision: str | None = None, api: Any = None) -> BaseFingerprint:
    """Fingerprint a Hub model from its file metadata (LFS sha256) and remote safetensors headers.

    ``api`` is an ``HfApi`` (or an object with the same ``model_info`` and, optionally,
    ``get_safetensors_metadata``); tests pass a fake. Nothing is downloaded.
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    label = f"{HUB_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")
    try:
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    except _hub_errors() as e:
        msg = " ".join(str(e).split())[:300]
        raise InputError(f"{label}: cannot read the repo's file list from the Hub: {type(e).__name__}: {msg}") from None
    commit = getattr(info, "sha", None) or revision
    siblings = {s.rfilename: s for s in (getattr(info, "siblings", None) or [])}
    notes: list[str] = []

    # Structure: remote header reads, when this huggingface_hub (or api object) offers them.
    headers: dict[str, list[tuple[str, str, tuple[int, ...]]]] | None = None
    if hasattr(api, "get_safetensors_metadata"):
        try:
            meta = api.get_safetensors_metadata(repo_id, revision=commit)
            headers = {
                fname: [(n, t.dtype, tuple(t.shape)) for n, t in fm.tensors.items()]
                for fname, fm in meta.files_metadata.items()
            }
        except _hub_errors(headers=True) as e:
            notes.append(f"structure unknown: the Hub could not give the safetensors headers "
                         f"({type(e).__name__}: {' '.join(str(e).split())[:200]})")
    else:
        notes.append("structure unknown: this huggingface_hub has no get_safetensors_metadata")

    weight_names = sorted(headers) if headers else _weight_files_by_name(list(siblings))
    if not weight_names:
        found = ", ".join(sorted(siblings)[:5]) or "no files"
        raise InputError(f"{label}: no .safetensors weights in the repo (found {found}); loratool "
                         "reads safetensors bases only")
    files: list[FileDigest] = []
    for fname in weight_names:
        s = siblings.get(fname)
        lfs = getattr(s, "lfs", None) if s is not None else None
        sha = (getattr(lfs, "sha256", None) or (lfs.get("sha256") if isinstance(lfs, dict) else None)) if lfs else None
        blob = None if sha else getattr(s, "blob_id", None)
        if s is None:
            notes.append(f"{fname}: listed by the repo's index but not in its file list")
        elif not sha:
            notes.append(f"{fname}: not stored with LFS on the Hub, so no sha256 is published for it; "
                         "its git blob id (a SHA-1 of the git object) is recorded instead")
        h = headers.get(fname) if headers else None
        files.append(FileDigest(
            path=fname,
            size=getattr(s, "size", None) if s is not None else None,
            sha256=sha,
            git_blob_id=blob,
            structure=structure_fingerprint(h) if h is not None else None,
            num_tensors=len(h) if h is not None else None,
        ))
    triples = [t for h in (headers or {}).values() for t in h]
    known = [f.sha256 for f in files if f.sha256]
    if len(known) < len(files):
        notes.append("content unknown: not every weight file has a published sha256")
    return BaseFingerprint(
        name=repo_id,
        repo_id=repo_id,
        revision=commit,
        files=files,
        structure=structure_fingerprint(triples) if headers else None,
        content=content_fingerprint(known) if len(known) == len(files) else None,
        num_tensors=len(triples) if headers else None,
        num_params=sum(math.prod(shape) for _, _, shape in triples) if headers else None,
        notes=notes,
    )


def fingerprint_base(
    base: "str | os.PathLike | BaseCheckpoint",
    cache: HashCache | None = None,
    content: bool = True,
    refresh: bool = False,
    api: Any = None,
) -> BaseFingerprint:
    """Fingerprint a local base or ``hf://owner/name[@revision]`` (see the module docstring)."""
    hub = parse_hub_ref(base) if isinstance(base, str) else None
    if hub:
        return fingerprint_hub(hub[0], hub[1], api=api)
    return fingerprint_local(base, cache=cache, content=content, refresh=refresh)
