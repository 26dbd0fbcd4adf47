"""Adapter formats: the registry, detection, reading and writing.

Each format module (peft.py, kohya.py, diffusers.py) describes itself with one ``Format``
(``formats/base.py``): its name, ``sniff_keys``, ``read``, ``write``, the order in which it is
sniffed, its directory marker and output layout, and what other modules may ask of it.
``REGISTRY`` lists them, once: detection, ``FORMATS`` (the CLI's --format/--to choices),
``convert`` and the writers go through it. A reader gives each adapter its format's typed config
(``adapter.config``: ``LoraConfig``, ``ComponentConfigs``, ``KohyaLayout``) and typed problems
(``ReadProblem``, with validate's check id).

To add a format: its module (with its ``FORMAT``), plus one line in ``REGISTRY`` below.

``load_adapter`` detects the format of a path (directory or file), or takes ``format=`` to
override detection, and refuses pickle checkpoints without opening them as pickles.
"""

from __future__ import annotations

import os
from pathlib import Path

from loratool.adapter import Adapter
from loratool.boundary import InputRoot, note_input
from loratool.errors import FormatError, InputError, UsageError
from loratool.formats import diffusers, kohya, peft
from loratool.formats.base import Format
from loratool.safetensors_io import PICKLE_SUFFIXES, SafetensorsFile, refuse_pickle, sniff_pickle

REGISTRY: tuple[Format, ...] = (peft.FORMAT, kohya.FORMAT, diffusers.FORMAT)
FORMATS = tuple(f.name for f in REGISTRY)  # the CLI's --format / --to choices
# The format every loader reads (transformers, diffusers, vLLM): an adapter composed from
# adapters of several formats is written in it.
COMMON_FORMAT = peft.NAME


def get_format(name: str) -> Format:
    """The registered format called ``name``, or a one-line ``UsageError``."""
    for f in REGISTRY:
        if f.name == name:
            return f
    raise UsageError(f"unknown format {name!r}; choose one of: {', '.join(FORMATS)}")


# The commands whose --format overrides detection (a test keeps this in step with the CLI); any
# other command reads what one of them wrote.
FORMAT_OPTION_COMMANDS = ("compose", "convert", "inspect", "manifest", "merge", "parity", "registry add",
                          "registry pull", "resize", "unmerge", "validate")
FORMAT_HINT = ("If you know its format, every command that takes an adapter takes --format NAME (registry add "
               "records it); to make a file that detection reads: `loratool convert {path} --format NAME --to "
               "peft -o DIR`")


def _describe_keys(keys: list[str], n: int = 3) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" (and {len(keys) - n} more)" if len(keys) > n else "")


def as_component(adapter: Adapter, component: str) -> Adapter:
    """``adapter`` (of one model, e.g. a UNet that PEFT saved) as the ``component`` of a
    diffusers pipeline: module names get the ``component.`` prefix the kohya and diffusers formats
    key modules by, and the config becomes that component's. ``convert --component``."""
    import dataclasses

    from loratool.formats.diffusers import COMPONENTS
    from loratool.formats.loraconfig import ComponentConfigs, LoraConfig

    where = adapter.path or "adapter"
    if component not in COMPONENTS:
        raise UsageError(f"--component {component!r} is not a pipeline component; choose one of: {', '.join(COMPONENTS)}")
    if adapter.components:
        raise UsageError(f"{where}: already holds components ({', '.join(adapter.components)}); --component is "
                         "for an adapter of one model, such as a UNet that PEFT saved")
    if adapter.modules_to_save or adapter.extra_tensors:
        extra = next(iter({**adapter.modules_to_save, **adapter.extra_tensors}))
        raise UsageError(f"{where}: {extra!r} is not a LoRA factor and has no place in a pipeline component's LoRA")
    modules = {f"{component}.{n}": dataclasses.replace(m, name=f"{component}.{n}") for n, m in adapter.modules.items()}
    config = adapter.config
    if isinstance(config, LoraConfig):
        config = ComponentConfigs({component: config})
    return dataclasses.replace(adapter, modules=modules, components=(component,), config=config)


def detect_format(path: str | os.PathLike) -> str:
    """Return the format name of an adapter at ``path``, or raise a one-line ``InputError``."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_file() and path.name in {f.marker for f in REGISTRY if f.needs_marker}:
        path = path.parent  # a config named directly (adapter_config.json): its directory
    if path.is_dir():
        for f in REGISTRY:  # a marker file names the format (PEFT's config before diffusers' weights)
            if f.marker and (path / f.marker).exists():
                return f.name
        subdirs = [p for p in sorted(path.iterdir()) if p.is_dir()]
        for f in REGISTRY:  # multi-component: one sub-directory with the marker per model component
            if f.component_dirs and any((p / f.marker).exists() for p in subdirs):
                return f.name
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
    ordered = sorted(REGISTRY, key=lambda f: f.sniff_order)
    found = next((f for f in ordered if f.sniff_metadata and f.sniff_metadata(keys, st.metadata)), None) \
        or next((f for f in ordered if f.sniff_keys(keys)), None)
    if found is not None:
        if found.needs_marker:
            raise InputError(f"{path}: {found.needs_marker}")
        return found.name
    if not keys:
        raise FormatError(f"{path}: holds no tensors; not a LoRA adapter")
    expected = [f"{f.title} ({f.key_example})" for f in REGISTRY]
    raise FormatError(
        f"{path}: unknown key layout (keys: {_describe_keys(sorted(keys))}); expected "
        f"{'; '.join(expected[:-1])}; or {expected[-1]}. {FORMAT_HINT.format(path=path)}"
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
    fmt = get_format(format or detect_format(path))
    adapter = fmt.read(path)
    if adapter.problems and not tolerant:
        first = adapter.problems[0]
        more = f" (and {len(adapter.problems) - 1} more problems; run `loratool validate`)" if len(adapter.problems) > 1 else ""
        raise FormatError(f"{first.message}{more}")
    return adapter


def write_adapter(adapter: Adapter, out: str | os.PathLike, format: str, overwrite: bool = False,
                  converting: bool = False) -> Path:
    """Write ``adapter`` at ``out`` in ``format``, atomically; ``converting``: for ``convert``,
    which may carry more of the source along (``Format.write_converted``)."""
    fmt = get_format(format)
    write = fmt.write_converted if converting and fmt.write_converted else fmt.write
    return write(adapter, Path(out), overwrite=overwrite)
