"""Adapter formats: detection, reading and writing.

Each format module exposes:
  ``NAME``                          the format's name ("peft", "kohya", "diffusers")
  ``sniff_keys(keys) -> bool``      whether a safetensors key set looks like this format
  ``read(path, ...) -> Adapter``    build the format-neutral model (lazy tensors)
  ``write(adapter, out, overwrite=False) -> Path``   write atomically, return what was written

``load_adapter`` detects the format of a path (directory or file), or takes ``format=`` to
override detection, and refuses pickle checkpoints without opening them as pickles.
"""

from __future__ import annotations

import os
from pathlib import Path

from loratool.adapter import Adapter
from loratool.boundary import InputRoot, note_input
from loratool.errors import FormatError, InputError, UsageError
from loratool.safetensors_io import PICKLE_SUFFIXES, SafetensorsFile, refuse_pickle, sniff_pickle

FORMATS = ("peft", "kohya", "diffusers")


def _module(name: str):
    if name == "peft":
        from loratool.formats import peft as mod
    elif name == "kohya":
        from loratool.formats import kohya as mod
    elif name == "diffusers":
        from loratool.formats import diffusers as mod
    else:
        raise UsageError(f"unknown format {name!r}; choose one of: {', '.join(FORMATS)}")
    return mod


def _describe_keys(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def detect_format(path: str | os.PathLike) -> str:
    """Return the format name of an adapter at ``path``, or raise a one-line ``InputError``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_file() and path.name == "adapter_config.json":
        path = path.parent
    if path.is_dir():
        if (path / "adapter_config.json").exists():
            return "peft"
        if (path / "pytorch_lora_weights.safetensors").exists():
            return "diffusers"
        if any((p / "adapter_config.json").exists() for p in sorted(path.iterdir()) if p.is_dir()):
            return "peft"  # multi-component PEFT (one sub-directory per model component)
        st_files = sorted(path.glob("*.safetensors"))
        if len(st_files) == 1:
            return detect_format(st_files[0])
        pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise refuse_pickle(pickles[0])
        if not any(path.iterdir()):
            raise InputError(f"{path}: empty directory; expected a PEFT adapter (adapter_config.json "
                             "+ adapter_model.safetensors) or a .safetensors LoRA file")
        if len(st_files) > 1:
            raise InputError(f"{path}: {len(st_files)} .safetensors files and no adapter_config.json; "
                             "pass the file you mean")
        raise InputError(f"{path}: no adapter here: no adapter_config.json and no .safetensors file")
    # a file
    if path.suffix in PICKLE_SUFFIXES or sniff_pickle(path):
        raise refuse_pickle(path, sniff_pickle(path))
    st = SafetensorsFile(path)
    keys = st.keys()
    for name in ("kohya", "diffusers", "peft"):
        if _module(name).sniff_keys(keys):
            if name == "peft":
                raise InputError(
                    f"{path}: PEFT weights without their config: adapter_config.json is missing next "
                    "to them, so rank patterns and alpha are unknown; put the config beside the file"
                )
            return name
    if not keys:
        raise FormatError(f"{path}: holds no tensors; not a LoRA adapter")
    raise FormatError(
        f"{path}: unknown key layout: no LoRA factor names found (keys: {_describe_keys(sorted(keys))}); "
        "expected PEFT (…lora_A.weight), kohya (lora_unet_….lora_down.weight) or diffusers "
        "(unet.….lora_A.weight); pass --format if you know better"
    )


MAX_ADAPTER_ENTRIES = 10_000  # an adapter folder holds a handful of files (a few per component)


def check_links(path: Path) -> None:
    """Refuse an adapter whose folder holds a link leading out of it (its config or weights read
    from elsewhere would be copied into outputs and the registry). A file named directly by the
    user may itself be a link; its sidecar manifest may not leave its folder."""
    root = InputRoot(path)
    if not path.is_dir():
        sidecar = path.with_name(path.stem + ".loratool.json")
        if os.path.islink(sidecar):
            root.inside(sidecar)
        return
    seen = 0
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            seen += 1
            if seen > MAX_ADAPTER_ENTRIES:
                raise InputError(f"{path}: more than {MAX_ADAPTER_ENTRIES} entries; not an adapter folder")
            p = Path(dirpath) / name
            if os.path.islink(p):
                root.inside(p)


def load_adapter(path: str | os.PathLike, format: str | None = None, tolerant: bool = False) -> Adapter:
    """Read the adapter at ``path`` lazily (headers only; tensors load on demand). A registry or
    Hub reference is resolved one layer up, by ``loratool.resolve.load_adapter``.

    With ``tolerant=True`` structural problems of single modules (a missing factor, an A/B rank
    mismatch) are recorded in ``adapter.problems`` instead of raising, so ``validate`` can report
    all of them.
    """
    path = Path(path)
    if not os.path.exists(path):
        if os.path.lexists(path):
            raise InputError(f"{path}: broken symbolic link (its target is missing, or links loop)")
        raise InputError(f"{path}: no such file or directory")
    note_input(path)  # no output of this process may overwrite it (loratool.boundary)
    check_links(path)
    fmt = format or detect_format(path)
    adapter = _module(fmt).read(path)
    if adapter.problems and not tolerant:
        first = adapter.problems[0]
        more = f" (and {len(adapter.problems) - 1} more problems; run `loratool validate`)" if len(adapter.problems) > 1 else ""
        raise FormatError(f"{first}{more}")
    return adapter


def write_adapter(adapter: Adapter, out: str | os.PathLike, format: str, overwrite: bool = False) -> Path:
    return _module(format).write(adapter, Path(out), overwrite=overwrite)
