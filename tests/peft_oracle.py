"""Tiny models and PEFT adapters for the resize/compose tests: PEFT itself is the oracle.

Models are small (hidden 64) and seeded; adapters are made with ``LoraConfig(init_lora_weights=
False)`` and saved with ``save_pretrained``, so that the files are exactly what PEFT writes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

PREFIX = "base_model.model."


class Kinds(nn.Module):
    """One layer of each kind PEFT's LoRA supports: Linear (with bias, for lora_bias), Conv2d
    (3×3 kernel), Embedding, and transformers' Conv1D (GPT-2 layout)."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.emb = nn.Embedding(40, 24)
        self.conv = nn.Conv2d(3, 20, 3)
        self.lin = nn.Linear(24, 30, bias=True)
        self.c1d = Conv1D(18, 24)  # (out, in): weight is (24, 18)

    def forward(self, ids, img):
        return self.lin(self.emb(ids)), self.conv(img), self.c1d(self.emb(ids))


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def kinds_model(seed: int = 0) -> Kinds:
    torch.manual_seed(seed)
    return Kinds().eval()


def base_model(name: str):
    return tiny_llama() if name == "llama" else kinds_model()


def make_adapter(path: Path, seed: int, model: str = "llama", r: int = 8, alpha: float = 16,
                 targets=("q_proj", "v_proj"), dtype=None, edit=None, **config) -> Path:
    """Save a PEFT adapter of ``model`` with random (init_lora_weights=False) factors.

    ``edit(peft_model)`` may change the factors before saving (rank-deficient, zero, decaying
    spectra)."""
    from peft import LoraConfig, get_peft_model

    m = base_model(model)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **config)
    pm = get_peft_model(m, cfg)
    if edit is not None:
        with torch.no_grad():
            edit(pm)
    if dtype is not None:
        pm = pm.to(dtype)
    pm.save_pretrained(str(path))
    return Path(path)


def load_peft(path: Path, model: str = "llama", dtype=torch.float32, extra: dict | None = None):
    """``PeftModel.from_pretrained`` of ``path`` (adapter "default") plus ``extra`` {name: path}."""
    from peft import PeftModel

    pm = PeftModel.from_pretrained(base_model(model).to(dtype), str(path))
    for name, p in (extra or {}).items():
        pm.load_adapter(str(p), adapter_name=name)
    return pm


def lora_layers(pm):
    from peft.tuners.lora import LoraLayer

    for name, mod in pm.named_modules():
        if isinstance(mod, LoraLayer):
            yield name[len(PREFIX):] if name.startswith(PREFIX) else name, mod


def peft_deltas(pm, adapter: str = "default") -> dict[str, torch.Tensor]:
    """{module name: PEFT's get_delta_weight} for the modules ``adapter`` targets."""
    out = {}
    for name, mod in lora_layers(pm):
        if adapter in mod.lora_A or adapter in mod.lora_embedding_A:
            out[name] = mod.get_delta_weight(adapter).detach().clone()
    return out


def lora_modules(pm, adapter: str = "default") -> dict:
    return {n: m for n, m in lora_layers(pm) if adapter in m.lora_A or adapter in m.lora_embedding_A}


def optimal(M: torch.Tensor, k: int):
    """(best rank-k approximation, its relative Frobenius error) of a dense delta by full SVD;
    conv deltas are flattened to (out, in·kh·kw) the way PEFT's svd combination does."""
    M64 = M.to(torch.float64)
    M2 = M64.reshape(M64.shape[0], -1)
    U, S, Vh = torch.linalg.svd(M2, full_matrices=False)
    Mk = (U[:, :k] * S[:k]) @ Vh[:k]
    err = float(torch.linalg.norm(M2 - Mk) / torch.linalg.norm(M2)) if float(S.sum()) > 0 else 0.0
    return Mk.reshape(M64.shape), err


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.to(torch.float64), b.to(torch.float64)
    nb = float(torch.linalg.norm(b))
    return float(torch.linalg.norm(a - b)) / (nb if nb > 0 else 1.0)


def kohya_file(path: Path, seed: int, rank: int = 8, alpha: float = 4.0, dtype=torch.float16) -> Path:
    """A small kohya (sd-scripts) LoRA file: a UNet Linear, a UNet 3×3 Conv2d and a text-encoder
    Linear, with scalar alphas in the factors' dtype (as sd-scripts saves them)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    shapes = {
        "lora_unet_mid_block_attentions_0_proj_in": ((rank, 32), (24, rank)),
        "lora_unet_down_blocks_0_resnets_0_conv1": ((rank, 6, 3, 3), (16, rank, 1, 1)),
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": ((rank, 20), (20, rank)),
    }
    t = {}
    for key, (a, b) in shapes.items():
        t[f"{key}.lora_down.weight"] = torch.randn(*a, generator=g).to(dtype)
        t[f"{key}.lora_up.weight"] = torch.randn(*b, generator=g).to(dtype)
        t[f"{key}.alpha"] = torch.tensor(alpha, dtype=dtype)
    save_file(t, str(path), {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})
    return Path(path)
