"""Tiny Llama-shaped bases and PEFT adapters for the fingerprint and manifest tests.

Made with ``safetensors.torch.save_file`` (seeded, a few KB), so these tests need neither
transformers nor PEFT and run in well under a second each.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from huggingface_hub.errors import NotASafetensorsRepoError
from huggingface_hub.hf_api import ModelInfo
from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo
from safetensors.torch import save_file

from loratool.safetensors_io import SafetensorsFile

HIDDEN, INTER, VOCAB = 16, 24, 32
BASE_NAME = "tiny-org/tiny-llama"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def base_tensors(seed: int = 0, inter: int = INTER) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g),
         "model.norm.weight": torch.ones(HIDDEN)}
    for i in range(2):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g)
        t[p + "self_attn.v_proj.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g)
        t[p + "mlp.up_proj.weight"] = torch.randn(inter, HIDDEN, generator=g)
    return t


def save_base(d: Path, tensors: dict[str, torch.Tensor], shards: int = 1,
              name_or_path: str | None = BASE_NAME) -> Path:
    """A transformers-style directory: model.safetensors, or shards with an index; config.json."""
    d.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::shards]}
            save_file(part, str(d / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in part})
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"model_type": "llama", "hidden_size": HIDDEN}
    if name_or_path:
        config["_name_or_path"] = name_or_path
    (d / "config.json").write_text(json.dumps(config))
    return d


def save_adapter(d: Path, r: int = 4, alpha: int = 8, base_model: str | None = BASE_NAME,
                 targets: list[str] | None = None, seed: int = 1) -> Path:
    """A PEFT directory targeting q_proj and v_proj of both layers."""
    d.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(2):
        for m in ("q_proj", "v_proj"):
            k = f"base_model.model.model.layers.{i}.self_attn.{m}"
            t[k + ".lora_A.weight"] = torch.randn(r, HIDDEN, generator=g)
            t[k + ".lora_B.weight"] = torch.randn(HIDDEN, r, generator=g)
    save_file(t, str(d / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "task_type": "CAUSAL_LM",
              "target_modules": targets or ["q_proj", "v_proj"], "base_model_name_or_path": base_model}
    (d / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return d


class FakeHubApi:
    """Answers like HfApi for one repo, built from a local directory (no network)."""

    def __init__(self, d: Path, lfs: bool = True, headers: bool = True, extra_files=("config.json",)):
        self.d, self.lfs, self.headers = d, lfs, headers
        self.extra_files = extra_files
        self.calls = []

    def model_info(self, repo_id, revision=None, files_metadata=False, **kw):
        self.calls.append(("model_info", repo_id, revision, files_metadata))
        siblings = []
        for p in sorted(self.d.iterdir()):
            s = {"rfilename": p.name, "size": p.stat().st_size, "blobId": "f" * 40}
            if self.lfs and p.suffix == ".safetensors":
                s["lfs"] = {"size": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "pointerSize": 134}
            siblings.append(s)
        return ModelInfo(id=repo_id, sha=COMMIT, siblings=siblings)

    def get_safetensors_metadata(self, repo_id, revision=None, **kw):
        self.calls.append(("get_safetensors_metadata", repo_id, revision))
        if not self.headers:
            raise NotASafetensorsRepoError(f"{repo_id} is not a safetensors repo")
        files = {}
        weight_map = {}
        for p in sorted(self.d.glob("*.safetensors")):
            st = SafetensorsFile(p)
            files[p.name] = SafetensorsFileMetadata(metadata=st.metadata, tensors={
                n: TensorInfo(dtype=i.dtype, shape=list(i.shape),
                              data_offsets=(i.start - st.data_start, i.end - st.data_start))
                for n, i in st.tensors.items()})
            weight_map.update({n: p.name for n in st.tensors})
        return SafetensorsRepoMetadata(metadata=None, sharded=len(files) > 1, weight_map=weight_map,
                                       files_metadata=files)


def base_with_one_changed_tensor(src, dst):
    """A copy of the sharded base at ``src`` whose last shard has one element changed: same
    names, shapes and dtypes (same structure fingerprint), other content."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    shard = sorted(dst.glob("model-*.safetensors"))[-1]
    t = load_file(str(shard))
    name = sorted(t)[0]
    t[name] = t[name].clone()
    t[name].view(-1)[0] += 1
    save_file(t, str(shard), metadata={"format": "pt"})
    return dst
