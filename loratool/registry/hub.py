"""The Hugging Face Hub as the registry's remote: download adapters, pull, push.

Downloads go through ``snapshot_download`` with patterns that select the adapter's files only,
into the Hugging Face cache (``HF_HUB_CACHE``, or ``cache_dir``), so a repo that also holds a full
model costs only the adapter. With ``HF_HUB_OFFLINE=1`` the cached snapshot is used.

Pushes are one commit: the adapter's files (read from blobs; ``CommitOperationAdd`` hashes each
one, and the hash must be the blob's name), ``loratool.json`` and a model card whose metadata says
``base_model: <repo>`` and ``base_model_relation: adapter`` (how the Hub links an adapter to its
base). ``api`` is an ``HfApi`` or any object with the same methods; tests pass a fake.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable

from loratool.boundary import default_home
from loratool.text import HUB_PREFIX
from loratool.errors import InputError, UsageError
from loratool.formats import get_format
from loratool.schemas.registry import AddResult, PushResult, Source
from loratool.registry.store import CorruptBlobError

# PEFT (also one folder per component), diffusers, and loratool manifests beside any of them.
ADAPTER_PATTERNS = [
    "adapter_config.json",
    "adapter_model.safetensors",
    "*/adapter_config.json",
    "*/adapter_model.safetensors",
    "pytorch_lora_weights.safetensors",
    "loratool.json",
    "*/loratool.json",
    "*.safetensors.loratool.json",
]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def _label(repo_id: str, revision: str | None) -> str:
    return f"{HUB_PREFIX}{repo_id}" + (f"@{revision}" if revision else "")


def _hub_error(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def _is_adapter_dir(folder: Path) -> bool:
    return ((folder / "adapter_config.json").exists() or (folder / "pytorch_lora_weights.safetensors").exists()
            or any((p / "adapter_config.json").exists() for p in folder.iterdir() if p.is_dir()))


def _repo_files(repo_id: str, revision: str, folder: Path, api: Any) -> list[str]:
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        from loratool.fingerprint import _hub_errors

        try:
            if api is None:
                from huggingface_hub import HfApi

                api = HfApi()
            return list(api.list_repo_files(repo_id, revision=revision))
        except _hub_errors():
            pass  # fall back to what the cache holds
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink())


def check_cache_dir(cache_dir: str | os.PathLike | None, home: str | os.PathLike | None = None) -> Path:
    """The Hugging Face cache downloads go to (``cache_dir``, else ``HF_HUB_CACHE``), refused with
    one line when it is or lies inside the registry's home: ``gc`` deletes what it does not know
    under ``materialized/``, and the registry's folders are its own. (A cache that *contains* the
    home is harmless: the Hub client writes only its own ``models--*`` folders there.)"""
    from huggingface_hub import constants

    cache = Path(cache_dir) if cache_dir is not None else Path(constants.HF_HUB_CACHE)
    reg = Path(home) if home is not None else default_home()
    real_cache, real_home = Path(os.path.realpath(cache)), Path(os.path.realpath(reg))
    if real_cache == real_home or real_home in real_cache.parents:
        raise UsageError(f"{cache}: the Hugging Face cache is or lies inside the registry home {reg}; downloads "
                         "never go there: set HF_HUB_CACHE (or LORATOOL_HOME) so that they are apart")
    return cache


def download_adapter(repo_id: str, revision: str | None = None, api: Any = None,
                     cache_dir: str | os.PathLike | None = None, home: str | os.PathLike | None = None) -> Path:
    """Download only the adapter's files of a Hub repo into the Hugging Face cache and return
    the snapshot directory (or, for a repo holding one LoRA ``.safetensors`` file, that file).
    ``home``: the registry's home, which the cache must stay out of (``check_cache_dir``)."""
    from loratool.fingerprint import _hub_errors

    check_cache_dir(cache_dir, home)
    if api is not None and hasattr(api, "snapshot_download"):
        download = api.snapshot_download
    else:
        from huggingface_hub import snapshot_download as download
    kwargs: dict[str, Any] = {"repo_id": repo_id, "revision": revision}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    label = _label(repo_id, revision)
    try:
        folder = Path(download(allow_patterns=ADAPTER_PATTERNS, **kwargs))
        if _is_adapter_dir(folder):
            return folder
        # A single-file LoRA repo (kohya, diffusers under another name): its one top-level file.
        names = _repo_files(repo_id, folder.name, folder, api)
        weights = [n for n in names if "/" not in n and n.endswith(".safetensors")]
        if len(weights) != 1:
            found = ", ".join(names[:6]) or "no files"
            raise InputError(f"{label}: no adapter in this repo: no adapter_config.json, and "
                             f"{len(weights)} top-level .safetensors files where a single-file LoRA has one "
                             f"(found {found})")
        folder = Path(download(allow_patterns=[weights[0], weights[0] + ".loratool.json"], **kwargs))
    except _hub_errors() as e:
        raise InputError(f"{label}: cannot download the adapter: {_hub_error(e)}") from None
    return folder / weights[0]


def snapshot_commit(path: Path, revision: str | None) -> str | None:
    """The commit of a Hugging Face cache snapshot path (``…/snapshots/<commit>[/file]``)."""
    for p in (path, path.parent):
        if p.parent.name == "snapshots":
            return p.name
    return revision


def pull(ref: str, name: str | None = None, tags: Iterable[str] = (), home: str | os.PathLike | None = None,
         api: Any = None, cache_dir: str | os.PathLike | None = None, format: str | None = None) -> AddResult:
    """``loratool registry pull hf://owner/repo[@rev]``: download the adapter's files into the
    Hugging Face cache and add them to the registry, as ``name`` (default: the repo's name);
    ``format`` overrides detection, as for ``Registry.add``."""
    from loratool.fingerprint import parse_hub_ref
    from loratool.registry.core import Registry
    from loratool.registry.refs import validate_name, validate_tag

    parsed = parse_hub_ref(ref)
    if parsed is None:
        raise UsageError(f"{ref}: pull takes a Hub reference hf://owner/repo[@revision]")
    repo_id, revision = parsed
    name = validate_name(name or repo_id.rsplit("/", 1)[-1])
    tags = [validate_tag(t) for t in tags]
    path = download_adapter(repo_id, revision, api=api, cache_dir=cache_dir, home=home)
    source = Source(kind="hub", location=repo_id, revision=snapshot_commit(path, revision))
    with Registry(home) as reg:
        return reg.add(path, name, tags=tags, source=source, format=format)


# -- push ---------------------------------------------------------------------------------------

def _repo_like(name: str | None) -> str | None:
    """A Hub repo id, or None for a local path (a base named by path cannot be linked to)."""
    if not name or name.startswith(("/", ".", "~")) or "\\" in name or ":" in name:
        return None
    return name if _REPO_ID.fullmatch(name) else None


def base_model_of(manifest, entry) -> str | None:
    """The Hub repo of the adapter's base: the manifest's fingerprint first (what was verified),
    then the name the adapter's config gives."""
    base = manifest.base if manifest is not None else None
    for name in (base.repo_id if base else None, base.name if base else None, entry.base_model):
        if _repo_like(name):
            return name
    return None


def model_card(entry, base_model: str, manifest_file: str) -> str:
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=base_model, base_model_relation="adapter",
                         library_name=get_format(entry.format).library_name, tags=["lora", "loratool"])
    ranks = ", ".join(str(r) for r in entry.ranks) or "-"
    alphas = ", ".join(str(a) for a in entry.alphas) or "-"
    return (
        f"---\n{data.to_yaml()}\n---\n\n"
        f"# {entry.name}\n\n"
        f"A LoRA adapter for [{base_model}](https://huggingface.co/{base_model}) ({entry.format} format, "
        f"{entry.num_modules} modules; rank {ranks}, alpha {alphas}; targets: {', '.join(entry.targets) or '-'}).\n\n"
        f"Pushed with loratool from the registry entry `{entry.ref}` (sha256:{entry.digest}). "
        f"`{manifest_file}` is its loratool manifest: the fingerprint of the base it was made for and "
        "its lineage; `loratool validate ADAPTER --base BASE` checks a base against it.\n"
    )


def push(ref: str, repo_id: str, home: str | os.PathLike | None = None, api: Any = None,
         base_model: str | None = None, private: bool | None = None, message: str | None = None) -> PushResult:
    """``loratool registry push REF owner/repo``: one commit with the adapter's files, its
    manifest (generated when none was stored) and a model card."""
    from huggingface_hub import CommitOperationAdd

    from loratool.fingerprint import _hub_errors
    from loratool.manifest import build_manifest
    from loratool.registry.core import Registry

    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo_id):
        raise UsageError(f"{repo_id!r} is not a Hub repo id; expected owner/name")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    with Registry(home, create=False) as reg:
        row = reg.find_version(ref)
        entry = reg._entries("WHERE v.id = ?", (row["id"],))[0]
        tree = reg.tree(entry.digest)
        manifest = reg.manifest(entry.digest)
        ops = []
        for f in tree.files:
            op = CommitOperationAdd(path_in_repo=f.path, path_or_fileobj=str(reg.store.path(f.sha256)))
            sha = op.upload_info.sha256
            sha = sha.hex() if isinstance(sha, bytes) else str(sha)
            if sha != f.sha256:
                raise CorruptBlobError(f"{entry.ref}: {f.path}: blob {reg.store.path(f.sha256)} is corrupt "
                                       f"(hashes to {sha[:12]}…); run `loratool registry verify`")
            ops.append(op)
        manifest_file = next((f.path for f in tree.files if f.path.endswith("loratool.json")), None)
        if manifest is None:
            manifest = build_manifest(reg.materialize(entry.digest))
            manifest_file = "loratool.json" if tree.entry == "." else f"{tree.entry}.loratool.json"
            ops.append(CommitOperationAdd(path_in_repo=manifest_file,
                                          path_or_fileobj=(manifest.model_dump_json(indent=2) + "\n").encode()))
    base = base_model or base_model_of(manifest, entry)
    if base is None:
        raise UsageError(f"{entry.ref}: cannot tell which Hub model it adapts (its manifest records no Hub base "
                         f"and its config names {entry.base_model!r}); pass --base-model owner/name")
    if not _repo_like(base):
        raise UsageError(f"--base-model {base!r} is not a Hub repo id; expected owner/name")
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=model_card(entry, base, manifest_file).encode()))
    try:
        api.create_repo(repo_id, repo_type="model", exist_ok=True, private=private)
        info = api.create_commit(repo_id=repo_id, operations=ops, repo_type="model",
                                 commit_message=message or f"Upload {entry.ref} (sha256:{entry.digest[:12]}) with loratool")
    except _hub_errors() as e:
        raise InputError(f"{HUB_PREFIX}{repo_id}: push failed: {_hub_error(e)}") from None
    return PushResult(repo_id=repo_id, ref=entry.ref, files=[op.path_in_repo for op in ops],
                      commit=getattr(info, "oid", None), url=getattr(info, "commit_url", None))
