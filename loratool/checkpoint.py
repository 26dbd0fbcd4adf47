"""Base checkpoints: safetensors models, one file or sharded, read from headers.

Layouts understood:
* a transformers model directory: ``model.safetensors`` or shards listed by
  ``model.safetensors.index.json``, plus ``config.json``;
* a diffusers pipeline directory (``model_index.json`` with ``unet/``, ``text_encoder/``,
  ``text_encoder_2/``, ``transformer/`` …, each one file or sharded): tensor names are then
  prefixed with the component, ``unet.down_blocks.0….weight``, which is how multi-component
  adapters name their modules;
* a single ``.safetensors`` file.

Only headers are read up front (names, shapes, dtypes, offsets); tensors are read one at a time.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

from loratool.errors import FormatError, InputError
from loratool.safetensors_io import PICKLE_SUFFIXES, SafetensorsFile, TensorRef, refuse_pickle

INDEX_NAMES = ("model.safetensors.index.json", "diffusion_pytorch_model.safetensors.index.json")
SINGLE_NAMES = ("model.safetensors", "diffusion_pytorch_model.safetensors")
PIPELINE_COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from None


def _model_files(d: Path) -> tuple[list[Path], Path | None]:
    """The safetensors files of one model directory, and its index file if sharded."""
    for name in INDEX_NAMES:
        idx = d / name
        if idx.exists():
            index = _read_json(idx)
            wm = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(wm, dict) or not wm:
                raise FormatError(f"{idx}: no weight_map; not a safetensors index")
            files: list[Path] = []
            for fname in wm.values():
                p = d / fname
                if p not in files:
                    files.append(p)
            missing = [p.name for p in files if not p.exists()]
            if missing:
                raise InputError(f"{idx}: lists shard {missing[0]} which is missing from {d}")
            return files, idx
    for name in SINGLE_NAMES:
        if (d / name).exists():
            return [d / name], None
    files = sorted(d.glob("*.safetensors"))
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
        if self.path.is_file():
            if self.path.suffix in PICKLE_SUFFIXES:
                raise refuse_pickle(self.path)
            self._add_files("", [self.path])
        elif (self.path / "model_index.json").exists():
            comps = [c for c in PIPELINE_COMPONENTS if (self.path / c).is_dir()]
            for c in comps:
                try:
                    files, idx = _model_files(self.path / c)
                except InputError:
                    continue  # e.g. a tokenizer-only folder
                if idx:
                    self.index_files.append(idx)
                self._add_files(c + ".", files)
            self.components = tuple(c for c in comps if any(k.startswith(c + ".") for k in self._tensors))
        else:
            files, idx = _model_files(self.path)
            if idx:
                self.index_files.append(idx)
                wm = _read_json(idx)["weight_map"]
            self._add_files("", files)
            if idx:
                for name, fname in wm.items():
                    if name not in self._tensors:
                        raise FormatError(f"{idx}: lists tensor {name!r} in {fname} but that shard does not hold it")
            cfg = self.path / "config.json"
            if cfg.exists():
                data = _read_json(cfg)
                self.config = data if isinstance(data, dict) else {}

    def _add_files(self, prefix: str, files: list[Path]) -> None:
        for f in files:
            st = SafetensorsFile(f)
            self.files.append(f)
            for name in st.keys():
                full = prefix + name
                if full in self._tensors:
                    raise FormatError(f"{f}: tensor {name!r} also appears in {self._tensors[full].file.path}")
                self._tensors[full] = st.ref(name)

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
