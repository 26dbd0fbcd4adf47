"""What a user names as an adapter, made a path: a local path, a registry reference or ``hf://``.

This module sits above ``loratool.formats`` (which reads paths only) and ``loratool.registry``
(which reads adapters through ``formats`` when it stores them), so neither imports the other to
resolve a name: commands that take an adapter from a user call ``load_adapter`` here.
"""

from __future__ import annotations

import os
from pathlib import Path

from typing import Any

from loratool import formats
from loratool.adapter import Adapter
from loratool.boundary import note_input
from loratool.errors import InputError, UsageError
from loratool.registry.refs import HUB_PREFIX, parse_ref


def resolve_adapter(ref: str | os.PathLike) -> Path:
    """The local path of an adapter reference: an existing path as it is; otherwise a registry
    reference (``name``, ``name@3``, ``name:prod``, ``sha256:…``) or ``hf://owner/repo[@rev]``,
    materialized locally (see ``loratool.registry.refs``)."""
    text = os.fspath(ref)
    if os.path.lexists(text):  # a path, even a broken link (formats.load_adapter names it)
        return Path(text)
    return resolve_adapter_ref(text)


def load_adapter(ref: str | os.PathLike, format: str | None = None, tolerant: bool = False) -> Adapter:
    """``formats.load_adapter`` of what ``ref`` names (``resolve_adapter``). A registry reference
    is read in the format the registry recorded when it was added (``registry add --format``
    included), unless ``format`` says otherwise."""
    text = os.fspath(ref)
    if os.path.lexists(text):
        return formats.load_adapter(Path(text), format=format, tolerant=tolerant)
    path, stored = _resolve_ref(text)
    return formats.load_adapter(path, format=format or stored, tolerant=tolerant)


def resolve_adapter_ref(ref: str | os.PathLike, home: str | os.PathLike | None = None, api: Any = None,
                        cache_dir: str | os.PathLike | None = None) -> Path:
    """The local path ``load_adapter`` should read for ``ref``.

    * an existing path: returned unchanged (as a ``Path``), without opening the registry;
    * ``hf://owner/repo[@rev]``: the adapter's files are downloaded into the Hugging Face cache
      (``cache_dir``, default ``HF_HUB_CACHE``) and the snapshot directory is returned (the file,
      for a single-file LoRA repo); ``api`` is an ``HfApi`` or a stand-in;
    * a registry reference: the adapter is materialized from its blobs as read-only copies under
      ``$LORATOOL_HOME/materialized/<digest>/`` (checked, blobs included, every time it is used,
      and made again when it does not check out), and that directory is returned (the file inside
      it for a single-file adapter, so that its ``.loratool.json`` sidecar is found beside it).
      The registry's home is recorded as an input of this process (``boundary.note_input``): no
      output may be, contain or lie inside it, whichever home ``home`` names.

    Raises ``InputError`` (exit 2, one line) when nothing matches, naming what was looked for and
    what exists; ``CorruptBlobError`` (exit 2) naming the reference and the adapter when a blob
    it is made of rotted or is missing; and ``AmbiguousRefError`` (a ``UsageError``, exit 2) for a
    digest prefix that matches several adapters, listing them.
    """
    return _resolve_ref(ref, home=home, api=api, cache_dir=cache_dir)[0]


def _resolve_ref(ref: str | os.PathLike, home: str | os.PathLike | None = None, api: Any = None,
                 cache_dir: str | os.PathLike | None = None) -> tuple[Path, str | None]:
    """``resolve_adapter_ref`` and, for a registry reference, the format its tree records (None
    for a path or a Hub reference: those are detected)."""
    text = os.fspath(ref)
    if os.path.exists(text):
        return Path(text), None
    if text.startswith("hf:/") and not text.startswith(HUB_PREFIX):
        text = HUB_PREFIX + text[len("hf:/"):]  # Path("hf://o/r") collapses the '//'
    try:
        parsed = parse_ref(text)
    except UsageError as e:
        raise InputError(f"{text}: no such file or directory (nor a registry reference: {e.message})") from None
    # The registry (sqlite, pydantic) and the Hub client are imported only for a reference: a
    # plain path, the common case, keeps `inspect` fast. (No cycle: this module is above both.)
    if parsed.kind == "hub":
        from loratool.registry.hub import download_adapter

        return download_adapter(parsed.repo_id, parsed.revision, api=api, cache_dir=cache_dir, home=home), None
    from loratool.registry.core import NotInRegistryError, Registry, protected_home
    from loratool.registry.store import CorruptBlobError

    try:
        with Registry(home, create=False) as reg:
            for p in protected_home(reg.home):
                note_input(p)
            digest = reg.resolve_digest(parsed)
            return reg.materialize(digest), reg.tree(digest).format
    except NotInRegistryError as e:
        raise InputError(f"{text}: no such file or directory, and {e.message}") from None
    except CorruptBlobError as e:
        raise CorruptBlobError(f"{text}: refusing to use this registry adapter: {e.message}") from None


# A base model's files from the Hub: weights as safetensors (pickles are never downloaded, so
# never read), their indexes, configs, tokenizers and the model card; not other weight formats
# (.bin, .pt, .ckpt, .gguf, .onnx, .msgpack, .h5).
BASE_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.tiktoken", "*.md", "*.jinja", "*.py"]


def resolve_base(ref: str | os.PathLike, api: Any = None, cache_dir: str | os.PathLike | None = None,
                 home: str | os.PathLike | None = None) -> Path:
    """The local path of a base: an existing path (or anything that is not ``hf://``) as it is;
    ``hf://owner/name[@revision]`` downloaded into the Hugging Face cache (``cache_dir``, default
    ``HF_HUB_CACHE``; offline, ``HF_HUB_OFFLINE=1``, what the cache holds) and its snapshot
    directory returned, whose path names the repo and commit (``fingerprint._local_name``).
    Only safetensors weights and the model's small files are fetched (``BASE_PATTERNS``)."""
    text = os.fspath(ref)
    if os.path.lexists(text):
        return Path(text)
    if text.startswith("hf:/") and not text.startswith(HUB_PREFIX):
        text = HUB_PREFIX + text[len("hf:/"):]  # Path("hf://o/r") collapses the '//'
    from loratool.fingerprint import parse_hub_ref

    hub = parse_hub_ref(text)
    if hub is None:
        return Path(text)  # BaseCheckpoint names what is missing
    from loratool.fingerprint import _hub_errors
    from loratool.registry.hub import check_cache_dir

    repo_id, revision = hub
    check_cache_dir(cache_dir, home)
    if api is not None and hasattr(api, "snapshot_download"):
        download = api.snapshot_download
    else:
        from huggingface_hub import snapshot_download as download
    kwargs: dict[str, Any] = {"repo_id": repo_id, "revision": revision, "allow_patterns": BASE_PATTERNS}
    if cache_dir is not None:
        kwargs["cache_dir"] = str(cache_dir)
    try:
        folder = Path(download(**kwargs))
    except _hub_errors() as e:
        raise InputError(f"{text}: cannot download the base: {type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    if not any(folder.glob("*.safetensors")) and not any(folder.glob("*/*.safetensors")):
        raise InputError(f"{text}: no safetensors weights in this repo (loratool never reads pickle weights: "
                         ".bin/.pt files are not downloaded); convert the model to safetensors first")
    note_input(folder)
    return folder
