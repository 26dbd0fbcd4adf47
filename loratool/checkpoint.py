"""Base checkpoints: safetensors models, one file or sharded, read from headers.

Layouts understood:
* a transformers model directory: ``model.safetensors`` or shards listed by
  ``model.safetensors.index.json``, plus ``config.json``;
* a diffusers pipeline directory (``model_index.json`` with ``unet/``, ``text_encoder/``,
  ``text_encoder_2/``, ``transformer/`` …, each one file or sharded): tensor names are then
  prefixed with the component, ``unet.down_blocks.0….weight``, which is how multi-component
  adapters name their modules;
* a single ``.safetensors`` file, among them single-file SD/SDXL checkpoints (LDM names,
  ``model.diffusion_model.input_blocks.1.1.proj_in.weight``), and a bare pipeline component
  (``unet/``) given on its own.

Adapter names meet base tensors through one rule, ``target`` (``weight_target`` for a module):
the fit check (``kinds``: validate, the manifest's base check) and the merge plan (merge, parity,
unmerge) all use it. A target is a whole tensor or a block of its rows (``Target``: q, k and v of
OpenCLIP's fused ``in_proj_weight`` in a single-file SDXL checkpoint); ``tensor_name`` is the rule
for what needs a whole tensor (modules_to_save, streamed forward passes).

A checkpoint that transformers saved with bitsandbytes 4-bit weights is read as the 16-bit model
they dequantize to (``loratool.quant.stored``): ``ref(name)`` of such a weight is a
``QuantizedRef`` whose dtype and shape are the original's; ``quantized`` names them.

Only headers are read up front (names, shapes, dtypes, offsets); tensors are read one at a time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from loratool.boundary import InputRoot, read_json
from loratool.errors import FormatError, InputError, UnsafePathError
from loratool.quant.gptq import group as group_packed, model_packing
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
        # GPTQ/AWQ layers (qweight, qzeros, scales, g_idx): each one presented as the weight it
        # dequantizes to, its packed tensors hidden (``loratool.quant.gptq``)
        self.unread: str | None = None  # why GPTQ/AWQ layers are left packed (a layout not read)
        try:
            self._tensors, self.packed = group_packed(self._tensors, *self._packing())
        except FormatError as e:  # header-only commands (fingerprint) go on; a merge says it (``missing``)
            self.packed, self.unread = [], e.message
        from loratool.formats import sdnames

        # how adapter names find tensors here (``tensor_name``): a single-file SD/SDXL checkpoint
        # (LDM names), or the one pipeline component a bare folder or file holds
        self.ldm = not self.components and sdnames.is_ldm(self._tensors)
        self.component = None if self.components or self.ldm else _component_of(self.path, list(self._tensors), self.config)

    def _packing(self) -> tuple[dict | None, str | None, str, bool]:
        """The quantization_config that says how GPTQ/AWQ weights are packed (config.json's, else
        AutoGPTQ's quantize_config.json or AutoAWQ's quant_config.json beside it), the dtype
        config.json gives the model, the file that said it, and whether it is such a side file."""
        qc, dtype = model_packing(self.config)
        if qc is not None:
            return qc, dtype, str(self.path / "config.json"), False
        if self.path.is_dir():
            for name in ("quantize_config.json", "quant_config.json"):
                p = self.path / name
                if os.path.lexists(p):
                    data = _read_json(self.root.inside(p))
                    return (data if isinstance(data, dict) else None), dtype, str(p), True
        return None, dtype, str(self.path), False

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

    # -- adapter names -> base tensors (issue 13): the one rule ----------------------------------
    def target(self, name: str) -> "Target | None":
        """Where an adapter's tensor ``name`` (loratool's canonical naming:
        ``unet.down_blocks.0.….weight``, ``text_encoder.text_model.encoder.….weight``,
        ``model.layers.0.….weight``) lands in this base: a whole tensor, or a block of rows of one
        (``Target.rows``: OpenCLIP's q/k/v in a single-file SD checkpoint, fused by rows into
        ``in_proj_weight``); None when it refers to no tensor or to several.

        The name itself, if the base has it; else the one tensor that exactly one of these forms
        names (zero or several: None, never a guess):

        * the ``model.`` prefix added or removed (an adapter of the bare backbone, LlamaModel, on
          a ForCausalLM checkpoint: vLLM's and PEFT's loaders tolerate the same);
        * a CLIP text encoder's path with or without ``text_model.`` (transformers 4 and every SD
          checkpoint vs transformers 5's flattened CLIPTextModel), both ways;
        * in a pipeline folder, an adapter name without a component prefix (a UNet that PEFT
          saved) under each component;
        * in a bare component folder (``unet/``, or a diffusers UNet's weights on their own), the
          component prefix dropped;
        * in a single-file SD/SDXL checkpoint, the UNet's, CLIP-L's and OpenCLIP's LDM names
          (``sdnames.ldm_targets``), q/k/v as row blocks of the fused tensor.
        """
        if name in self._tensors:
            return Target(name)
        found = self._matches(name)
        return found[0] if len(found) == 1 else None

    def weight_target(self, module: str) -> "Target | None":
        """``target`` of ``<module>.weight``: where a module's delta is added."""
        return self.target(f"{module}.weight")

    def target_shape(self, t: "Target") -> tuple[int, ...]:
        """The shape of what ``t`` names: the tensor's, or its rows'."""
        shape = tuple(self.shape(t.tensor))
        return shape if t.rows is None else (t.rows[1] - t.rows[0],) + shape[1:]

    def weight_name(self, module: str) -> str | None:
        """The base tensor that a module's delta is added to as a whole, or None: ``tensor_name``
        of ``<module>.weight``."""
        return self.tensor_name(f"{module}.weight")

    def tensor_name(self, name: str) -> str | None:
        """The whole base tensor that an adapter's tensor ``name`` refers to (``target``), or None:
        also where it is only a block of rows of one (what replaces a whole tensor, as
        modules_to_save do, or reads one, cannot use those)."""
        t = self.target(name)
        return t.tensor if t is not None and t.rows is None else None

    def missing(self, name: str) -> str:
        """Why ``tensor_name(name)`` (or ``target``) is None, as one clause for messages."""
        found = self._matches(name)
        if len(found) > 1:
            return (f"{name} matches {len(found)} base tensors ({', '.join(map(str, found[:3]))}); the adapter's "
                    "name does not say which (a component prefix would: convert --component NAME)")
        t = found[0] if found else None
        if t is not None and t.rows is not None:
            return (f"{name} is {t} (q, k and v fused in one tensor in this single-file SD checkpoint); only a "
                    "LoRA module's delta can be added to part of a tensor, nothing can replace it")
        text = f"the base has no tensor {name}"
        if self.unread and name.endswith(".weight") and name[:-len("weight")] + "qweight" in self._tensors:
            return f"{text}, only its packed form {name[:-len('weight')]}qweight: {self.unread}"
        if self.ldm:
            from loratool.formats import sdnames

            comp, _, rest = name.rpartition(".")[0].partition(".")
            why = sdnames.ldm_refusal(comp, rest, self._tensors)
            if why:
                return f"{text}: {why}"
            tried = [c for c, _, _ in self._candidates(name) if "." in c and not c.startswith(comp + ".")]
            if tried:
                return f"{text} (as {tried[0]} in this single-file SD checkpoint)"
        return text

    def _matches(self, name: str) -> list["Target"]:
        found: set[Target] = set()
        for tensor, part, parts in self._candidates(name):
            if tensor not in self._tensors:
                continue
            if parts == 1:
                found.add(Target(tensor))
                continue
            shape = self.shape(tensor)
            if shape and shape[0] % parts == 0:  # equal row blocks, or no match
                d = shape[0] // parts
                found.add(Target(tensor, (part * d, (part + 1) * d)))
        return sorted(found, key=lambda t: (t.tensor, t.rows or (0, 0)))

    def _candidates(self, name: str) -> list[tuple[str, int, int]]:
        """(tensor name, part, parts) that ``name`` may be: a whole tensor (0, 1) or its row block
        ``part`` of ``parts`` equal ones."""
        head, dot, leaf = name.rpartition(".")
        if not dot:
            return []
        comp, _, path = head.partition(".")
        if comp not in PIPELINE_COMPONENTS or not path:
            comp, path = "", head
        if self.ldm:
            from loratool.formats import sdnames

            return [n for c in ([comp] if comp else ("unet", "text_encoder")) for p in _clip_forms(c, path)
                    for n in sdnames.ldm_targets(c, p, leaf)]
        out: list[str] = []
        if self.components:  # a pipeline folder: every tensor is component-prefixed
            for c in ([comp] if comp else self.components):
                out += [f"{c}.{p}" for p in _clip_forms(c, path)]
        else:  # one model: a bare component folder drops its own prefix, nothing else
            stem = path if comp and comp == self.component else head
            out += [stem, stem[len("model."):] if stem.startswith("model.") else f"model.{stem}"]
            out += _clip_forms("", stem)
        return [(f"{n}.{leaf}", 0, 1) for n in out]


@dataclass(frozen=True)
class Target:
    """Where an adapter module's weight (or bias) lands in a base (``BaseCheckpoint.target``): the
    tensor ``tensor``, whole, or its rows [lo, hi) (``rows``: OpenCLIP's q, k or v, fused by rows
    into one tensor in a single-file SD checkpoint)."""

    tensor: str
    rows: tuple[int, int] | None = None

    def __str__(self) -> str:
        return self.tensor if self.rows is None else f"rows [{self.rows[0]}, {self.rows[1]}) of {self.tensor}"


def _clip_forms(component: str, path: str) -> list[str]:
    """``path`` and, for a CLIP text encoder's module (or one of no known component), the same
    module under the other transformers version's naming (``text_model.`` added or removed)."""
    if component and not component.startswith("text_encoder"):
        return [path]
    from loratool.formats import sdnames

    t4 = sdnames.canonical_text_encoder_path(path)
    if t4 != path:
        return [path, t4]
    return [path, path[len("text_model."):]] if path.startswith("text_model.") else [path]


def _component_of(path: Path, names: list[str], config: dict[str, Any]) -> str | None:
    """Which pipeline component a checkpoint that is not a pipeline holds, when it says so: its
    folder's name (``unet/``, or the folder of a file given as the base), its diffusers config's
    ``_class_name``, or a diffusers UNet's tensor names; else None."""
    folder = path if path.is_dir() else path.parent
    if folder.name in PIPELINE_COMPONENTS:
        return folder.name
    cls = str(config.get("_class_name", ""))
    if "UNet" in cls:
        return "unet"
    if "Transformer" in cls:
        return "transformer"
    if "conv_in.weight" in names and any(n.startswith("down_blocks.") for n in names) \
            and any(n.startswith("up_blocks.") for n in names):
        return "unet"
    return None
