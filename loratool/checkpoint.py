"""Base checkpoints: safetensors models, one file or sharded, read from headers.

Layouts understood:
* a transformers model directory: ``model.safetensors`` or shards listed by
  ``model.safetensors.index.json``, plus ``config.json``;
* a diffusers pipeline directory (``model_index.json`` with ``unet/``, ``text_encoder/``,
  ``text_encoder_2/``, ``transformer/`` …, each one file or sharded): tensor names are then
  prefixed with the component, ``unet.down_blocks.0….weight``, which is how multi-component
  adapters name their modules;
* a single ``.safetensors`` file.

A checkpoint that transformers saved with bitsandbytes 4-bit weights is read as the 16-bit model
they dequantize to (``loratool.quant.stored``): ``ref(name)`` of such a weight is a
``QuantizedRef`` whose dtype and shape are the original's; ``quantized`` names them.

Only headers are read up front (names, shapes, dtypes, offsets); tensors are read one at a time.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

from loratool.boundary import InputRoot, read_json
from loratool.errors import FormatError, InputError, UnsafePathError
from loratool.quant.stored import group as group_quantized
from loratool.safetensors_io import PICKLE_SUFFIXES, SafetensorsFile, TensorRef, refuse_pickle

INDEX_NAMES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
SINGLE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
PIPELINE_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")


def _read_json(path: Path) -> Any:
    return read_json(path)


def _weight_map(idx: Path) -> dict[str, str]:
    """An index's weight_map, with its types checked: tensor name -> shard file name."""
    index = _read_json(idx)
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise FormatError(f"{idx}: no weight_map; not a safetensors index")
    bad = next((v for v in wm.values() if not isinstance(v, str)), None)
    if bad is not None:
        raise FormatError(f"{idx}: weight_map maps a tensor to {bad!r}; expected a shard file name")
    return wm


def _model_files(d: Path, root: InputRoot) -> tuple[list[Path], Path | None]:
    """The safetensors files of one model directory, and its index file if sharded; every file
    inside the input's ``root``."""
    for name in INDEX_NAMES:
        idx = d / name
        if os.path.lexists(idx):
            root.inside(idx)
            files: list[Path] = []
            for fname in _weight_map(idx).values():
                p = root.entry(fname, idx, folder=d)
                if p not in files:
                    files.append(p)
            missing = [p.name for p in files if not p.exists()]
            if missing:
                raise InputError(f"{idx}: lists shard {missing[0]} which is missing from {d}")
            return files, idx
    for name in SINGLE_NAMES:
        if os.path.lexists(d / name):
            return [root.inside(d / name)], None
    files = sorted(root.inside(p) for p in d.glob("*.safetensors"))
    if files:
        return files, None
    pickles = sorted(p for p in d.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise refuse_pickle(pickles[0])
    raise InputError(f"{d}: no .safetensors weights found")


class BaseCheckpoint:
    """Header-level view of a base model; ``read(name)`` loads one tensor."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise InputError(f"{self.path}: no such file or directory")
        self.config: dict[str, Any] = {}
        self.index_files: list[Path] = []
        self.components: tuple[str, ...] = ()
        self._tensors: dict[str, TensorRef] = {}
        self.files: list[Path] = []
        self.root = InputRoot(self.path)
        if self.path.is_file():
            if self.path.suffix in PICKLE_SUFFIXES:
                raise refuse_pickle(self.path)
            self._add_files("", [self.path])
        elif (self.path / "model_index.json").exists():
            comps = [c for c in PIPELINE_COMPONENTS if (self.path / c).is_dir()]
            for c in comps:
                self.root.inside(self.path / c)  # a component folder linked from elsewhere is refused
                try:
                    files, idx = _model_files(self.path / c, self.root)
                except (FormatError, UnsafePathError):
                    raise
                except InputError:
                    continue  # e.g. a tokenizer-only folder
                if idx:
                    self.index_files.append(idx)
                self._add_files(c + ".", files)
            self.components = tuple(c for c in comps if any(k.startswith(c + ".") for k in self._tensors))
        else:
            files, idx = _model_files(self.path, self.root)
            if idx:
                self.index_files.append(idx)
                wm = _weight_map(idx)
            self._add_files("", files)
            if idx:
                for name, fname in wm.items():
                    if name not in self._tensors:
                        raise FormatError(f"{idx}: lists tensor {name!r} in {fname} but that shard does not hold it")
            cfg = self.path / "config.json"
            if os.path.lexists(cfg):
                data = _read_json(self.root.inside(cfg))
                self.config = data if isinstance(data, dict) else {}
        # bitsandbytes 4-bit weights (a ``*-bnb-4bit`` checkpoint): each one presented as the 16-bit
        # tensor it dequantizes to, its quant-state tensors hidden (``loratool.quant.stored``)
        self._tensors, self.quantized = group_quantized(self._tensors)

    def _add_files(self, prefix: str, files: list[Path]) -> None:
        for f in files:
            st = SafetensorsFile(f)
            self.files.append(f)
            for name in st.keys():
                full = prefix + name
                if full in self._tensors:
                    raise FormatError(f"{f}: tensor {name!r} also appears in {self._tensors[full].file.path}")
                self._tensors[full] = st.ref(name)

    def other_files(self) -> list[tuple[Path, str]]:
        """The model directory's files besides its weights and indexes (config, tokenizer,
        generation config...), as (source, path relative to the directory), sorted; hidden
        entries are left out. A link is followed only when its target stays inside the
        directory (``InputRoot``); anything else that is not a regular file is refused."""
        if self.path.is_file():
            return []
        weights = set(self.files) | set(self.index_files)
        found: list[tuple[Path, str]] = []
        for dirpath, dirnames, filenames in os.walk(self.path):
            d = Path(dirpath)
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))
            for n in list(dirnames):
                if (d / n).is_symlink():  # os.walk does not descend into it: check where it leads
                    self.root.inside(d / n)
            for n in sorted(filenames):
                src = d / n
                if n.startswith(".") or src in weights:
                    continue
                self.root.inside(src)
                if not src.is_file():
                    raise UnsafePathError(f"{src}: not a regular file; a model directory's files are copied along "
                                          "into the output, so it must hold only regular files")
                found.append((src, src.relative_to(self.path).as_posix()))
        return found

    # -- access -------------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def names(self) -> list[str]:
        return list(self._tensors)

    def items(self) -> Iterator[tuple[str, TensorRef]]:
        return iter(self._tensors.items())

    def ref(self, name: str) -> TensorRef:
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name].shape

    def dtype(self, name: str) -> str:
        return self._tensors[name].dtype

    def read(self, name: str):
        return self._tensors[name].load()

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self._tensors.values())

    # -- adapter module -> base tensor ---------------------------------------------------------
    def weight_name(self, module: str) -> str | None:
        """The base tensor that a module's delta is added to, or None.

        Exact ``<module>.weight`` first; then the ``model.`` prefix added or removed, which is
        how an adapter trained on the bare backbone (LlamaModel) meets a ForCausalLM checkpoint
        (vLLM and PEFT's loaders tolerate the same difference).
        """
        candidates = [f"{module}.weight"]
        if module.startswith("model."):
            candidates.append(f"{module[len('model.'):]}.weight")
        else:
            candidates.append(f"model.{module}.weight")
        for c in candidates:
            if c in self._tensors:
                return c
        return None
