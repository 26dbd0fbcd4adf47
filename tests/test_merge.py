"""`loratool merge` / `unmerge` against PEFT itself.

Bases are tiny transformers models (Llama-like, GPT-2) and a model with one layer of each kind PEFT
supports, saved by ``save_pretrained`` (sharded with ``max_shard_size="200KB"``) or
``safetensors``; adapters are made by PEFT with ``init_lora_weights=False`` and saved by it. The
oracle is ``PeftModel.from_pretrained(...).merge_and_unload()``; where we promise bits we compare
bytes, elsewhere ulps of the float64 value. Row blocks are made small (``_merge(block_bytes=)``) so that
these small matrices still go through several blocks and a folded tail.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft_oracle import Kinds

from loratool.checkpoint import BaseCheckpoint
from loratool.errors import MisfitError, OutputError, UsageError
from loratool.merge import AdapterSpec, merge, parse_adapter_specs, parse_size, row_spans, unmerge
from loratool.merge.api import _merge  # merge, with the executor's test parameters
from loratool.merge.parity import ulp
from loratool.safetensors_io import SafetensorsFile

SMALL_BLOCKS = 16 << 10  # float32 bytes per row block: 64-row blocks for these widths
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
ST = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16"}


# -- builders -----------------------------------------------------------------------------------

def tiny_llama(dtype, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=96, intermediate_size=300, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=200, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def tiny_gpt2(dtype, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=96, n_layer=2, n_head=4, vocab_size=200, n_positions=64)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def save_adapter(model, path: Path, seed: int, edit=None, **config) -> Path:
    """PEFT adapter of ``model`` (random factors); ``model`` is left without LoRA layers."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **config))
    if edit is not None:
        with torch.no_grad():
            edit(pm)
    pm.save_pretrained(str(path))
    pm.unload()
    return path


def peft_merged(make_base, base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's merge_and_unload of ``adapter`` on the base loaded from ``base_dir``."""
    from peft import PeftModel

    model = make_base()
    model.load_state_dict(load_dir(base_dir), strict=False)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    ck = BaseCheckpoint(d)
    return {n: ck.read(n) for n in ck.names()}


def digest_tree(d: Path) -> dict[str, str]:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(d.rglob("*")) if p.is_file()}


def raw(ck: BaseCheckpoint, name: str) -> bytes:
    return ck.ref(name).raw()


def max_ulp(got: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor | None = None) -> float:
    """max |got − exact| in ulps of got's dtype at |exact| (or at ``scale``)."""
    at = exact if scale is None else scale
    return float(((got.double() - exact).abs() / ulp(at, ST[got.dtype])).max())


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """bf16 and fp32 Llama-like bases (sharded), with two all-linear adapters each."""
    root = tmp_path_factory.mktemp("llama")
    out = {}
    for name, dtype in DTYPES.items():
        model = tiny_llama(dtype)
        base = root / f"base_{name}"
        model.save_pretrained(str(base), max_shard_size="200KB")
        a = save_adapter(model, root / f"a_{name}", 1, r=8, lora_alpha=12, target_modules="all-linear")
        b = save_adapter(model, root / f"b_{name}", 2, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
        out[name] = (base, a, b, dtype)
    # scale 2 = alpha/r: a power of two, which takes the fused addmm path
    base, _, b, dtype = out["bf16"]
    out["bf16_pow2"] = (base, save_adapter(tiny_llama(dtype), root / "a_pow2", 3, r=8, lora_alpha=16,
                                           target_modules="all-linear"), b, dtype)
    return out


# -- PEFT parity, bit for bit ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["bf16", "bf16_pow2", "fp32"])
def test_one_adapter_equals_peft_merge_and_unload_bit_for_bit(llama, tmp_path, name):
    base, a, _, dtype = llama[name]
    assert len(list(base.glob("model-*.safetensors"))) > 1, "the fixture base should be sharded"
    before = {**digest_tree(base), **{f"adapter/{k}": v for k, v in digest_tree(a).items()}}

    result = _merge(base, [AdapterSpec(a)], tmp_path / "out", device="cpu", block_bytes=SMALL_BLOCKS)

    assert result.num_merged == 14 and result.num_copied == 7 and result.num_replaced == 0
    ours = BaseCheckpoint(tmp_path / "out")
    want = peft_merged(lambda: tiny_llama(dtype), base, a)
    assert sorted(ours.names()) == sorted(want)
    for n, t in want.items():
        got = ours.read(n)
        assert got.dtype == t.dtype and torch.equal(got.view(torch.uint8), t.contiguous().view(torch.uint8)), n

    # untouched tensors byte-identical; shard layout, index, metadata and other files kept
    orig = BaseCheckpoint(base)
    for n in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight",
              "model.layers.0.input_layernorm.weight"):
        assert raw(ours, n) == raw(orig, n)
    # the lineage (issue 12) and the merge's own model card (issue 14)
    files = sorted([*(p.name for p in base.iterdir()), "loratool.json", "README.md"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == files
    for f in ("model.safetensors.index.json", "config.json", "generation_config.json"):
        assert (tmp_path / "out" / f).read_bytes() == (base / f).read_bytes()
    for shard in base.glob("*.safetensors"):
        mine, theirs = SafetensorsFile(tmp_path / "out" / shard.name), SafetensorsFile(shard)
        assert mine.metadata == theirs.metadata and sorted(mine.keys()) == sorted(theirs.keys())
        assert mine.size == theirs.size

    after = {**digest_tree(base), **{f"adapter/{k}": v for k, v in digest_tree(a).items()}}
    assert after == before, "inputs changed"


def test_gpt2_conv1d_equals_peft_bit_for_bit(tmp_path):
    model = tiny_gpt2(torch.bfloat16)
    model.save_pretrained(str(tmp_path / "base"), max_shard_size="200KB")
    a = save_adapter(model, tmp_path / "a", 3, r=8, lora_alpha=16, fan_in_fan_out=True,
                     target_modules=["c_attn", "c_proj", "c_fc"])
    _merge(tmp_path / "base", str(a), tmp_path / "out", device="cpu", block_bytes=SMALL_BLOCKS)
    ours = BaseCheckpoint(tmp_path / "out")
    want = peft_merged(lambda: tiny_gpt2(torch.bfloat16), tmp_path / "base", a)
    touched = [n for n in ours.names() if any(k in n for k in ("c_attn.weight", "c_proj.weight", "c_fc.weight"))]
    assert len(touched) == 8
    for n in ours.names():
        got = ours.read(n)
        assert torch.equal(got.view(torch.uint8), want[n].contiguous().view(torch.uint8)), n


# -- several adapters ---------------------------------------------------------------------------

def test_weighted_adapters_within_one_ulp_of_float64(llama, tmp_path, capsys):
    from peft import PeftModel

    base, a, b, dtype = llama["bf16"]
    _merge(base, f"{a}:0.7,{b}:0.3", tmp_path / "out", device="cpu", block_bytes=SMALL_BLOCKS)
    ours = BaseCheckpoint(tmp_path / "out")
    orig = load_dir(base)

    from loratool.formats import load_adapter

    exact: dict[str, torch.Tensor] = {n: t.double() for n, t in orig.items()}
    for path, w in ((a, 0.7), (b, 0.3)):
        for name, m in load_adapter(path).modules.items():
            exact[name + ".weight"] += w * m.scale * (m.B().double() @ m.A().double())

    # PEFT's own route for a weighted combination: add_weighted_adapter(cat) + merge_and_unload
    model = tiny_llama(dtype)
    model.load_state_dict(orig, strict=False)
    pm = PeftModel.from_pretrained(model, str(a), adapter_name="a")
    pm.load_adapter(str(b), adapter_name="b")
    pm.add_weighted_adapter(["a", "b"], [0.7, 0.3], "ab", combination_type="cat")
    pm.set_adapter("ab")
    peft_sd = pm.merge_and_unload().state_dict()

    # Errors in ulps of the output dtype, at max(|X|, |W|) and at |X| itself (PEFT's route rounds
    # the combined factors to bf16 first, so it is far off where W and the delta cancel).
    ours_err, peft_err, ours_x, peft_x, beyond = 0.0, 0.0, 0.0, 0.0, 0
    for n, x in exact.items():
        got = ours.read(n)
        if torch.equal(x, orig[n].double()):
            assert raw(ours, n) == raw(BaseCheckpoint(base), n)
            continue
        scale = torch.maximum(x.abs(), orig[n].double().abs())
        ours_err = max(ours_err, max_ulp(got, x, scale))
        peft_err = max(peft_err, max_ulp(peft_sd[n], x, scale))
        ours_x, peft_x = max(ours_x, max_ulp(got, x)), max(peft_x, max_ulp(peft_sd[n], x))
        far = (got.double() - x).abs() > ulp(x, "BF16")
        beyond += int(far.sum())
    with capsys.disabled():
        print(f"\n  a:0.7,b:0.3 (bf16) vs float64, max error in ulps at max(|X|,|W|) [at |X|]: "
              f"ours {ours_err:.3f} [{ours_x:.1f}], PEFT add_weighted_adapter(cat)+merge_and_unload "
              f"{peft_err:.3f} [{peft_x:.1f}]; {beyond} elements of ours beyond 1 ulp of X (cancellation)")
    # weighted merges accumulate in float64 (no PEFT bits to match): every element is the exact
    # value rounded once, give or take one ulp of X itself, even where W and ΔW cancel
    assert beyond == 0 and ours_x <= 1.0
    assert ours_err <= 1.0
    assert ours_err <= peft_err


def test_two_adapters_replacing_one_tensor_are_refused(tmp_path):
    def noisy_head(pm):
        head = pm.base_model.model.lm_head.modules_to_save["default"]
        head.weight.add_(0.01)

    model = tiny_llama(torch.float32)
    model.save_pretrained(str(tmp_path / "base"))
    a = save_adapter(model, tmp_path / "a", 1, r=4, target_modules=["q_proj"], modules_to_save=["lm_head"], edit=noisy_head)
    b = save_adapter(model, tmp_path / "b", 2, r=4, target_modules=["v_proj"], modules_to_save=["lm_head"], edit=noisy_head)
    with pytest.raises(UsageError, match="lm_head.weight.*cannot both replace"):
        merge(tmp_path / "base", f"{a}:0.5,{b}:0.5", tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists()


# -- every layer kind, within 1 ulp of PEFT -------------------------------------------------------

def _edit_mts(pm):
    pm.base_model.model.emb.modules_to_save["default"].weight.mul_(1.5)


KIND_CASES = {
    "plain": dict(r=4, lora_alpha=8, target_modules=["emb", "conv", "lin", "c1d"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["emb", "conv", "lin", "c1d"]),
    "lora_bias": dict(r=4, lora_alpha=8, lora_bias=True, target_modules=["conv", "lin", "c1d"]),
    "rslora_patterns": dict(r=4, lora_alpha=6, use_rslora=True, rank_pattern={"lin": 6}, alpha_pattern={"conv": 5},
                            target_modules=["emb", "conv", "lin", "c1d"]),
    "modules_to_save": dict(r=4, lora_alpha=8, target_modules=["lin", "conv"], modules_to_save=["emb"]),
}


def kinds_model(dtype):
    torch.manual_seed(0)
    return Kinds().to(dtype).eval()


def exact_embedding(w: torch.Tensor, adapter: Path) -> torch.Tensor:
    from loratool.formats import load_adapter

    m = load_adapter(adapter).modules["emb"]
    x = w.double() + m.scale * (m.B().double() @ m.A().double()).T
    if m.use_dora:
        x = x * (m.magnitude.load().double() / torch.linalg.norm(x, dim=0)).view(1, -1)
    return x


@pytest.mark.parametrize("case", sorted(KIND_CASES))
def test_layer_kinds_within_one_ulp_of_peft(tmp_path, case):
    from safetensors.torch import save_file

    dtype = torch.bfloat16
    model = kinds_model(dtype)
    (tmp_path / "base").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "base" / "model.safetensors"),
              metadata={"format": "pt"})
    config = dict(KIND_CASES[case])
    if "c1d" in config["target_modules"]:
        config["fan_in_fan_out"] = True  # Conv1D; PEFT would set it itself (with a warning)
    edit = _edit_mts if case == "modules_to_save" else None
    a = save_adapter(model, tmp_path / "a", 5, edit=edit, **config)

    result = _merge(tmp_path / "base", str(a), tmp_path / "out", device="cpu", block_bytes=SMALL_BLOCKS)
    ours = BaseCheckpoint(tmp_path / "out")
    want = peft_merged(lambda: kinds_model(dtype), tmp_path / "base", a)
    orig = BaseCheckpoint(tmp_path / "base")
    changed = 0
    for n in orig.names():
        got, ref = ours.read(n), want[n]
        if torch.equal(ref, orig.read(n)):
            assert raw(ours, n) == raw(orig, n), f"{n} should be copied raw"
            continue
        changed += 1
        # ulps at the scale of the values involved (W and the merged value): PEFT's Embedding.merge
        # rounds the delta to bf16 before adding it, so where W and ΔW cancel PEFT is many ulps of
        # the small result away from the exact value; we round once and are closer (checked below)
        scale = torch.stack([got.double().abs(), ref.double().abs(), orig.read(n).double().abs()]).amax(0)
        err = float(((got.double() - ref.double()).abs() / ulp(scale, "BF16")).max())
        assert err <= 1.0, f"{case}: {n} differs from PEFT by {err:.2f} ulp"
        if n == "emb.weight" and not result.num_replaced:
            x = exact_embedding(orig.read(n), a)
            assert max_ulp(got, x) <= min(1.0, max_ulp(ref, x))
    expected = {"plain": 4, "dora": 4, "lora_bias": 6, "rslora_patterns": 4, "modules_to_save": 3}[case]
    assert changed == expected
    assert result.num_replaced == (1 if case == "modules_to_save" else 0)


# -- outputs: atomicity, dtype, shards, single files ----------------------------------------------

def test_failure_midway_leaves_no_output(llama, tmp_path):
    base, a, _, _ = llama["bf16"]
    with pytest.raises(OutputError, match="simulated failure"):
        _merge(base, str(a), tmp_path / "out", device="cpu", fail_after_tensors=5)
    assert list(tmp_path.iterdir()) == []  # neither OUT nor the temporary directory


KILL_SCRIPT = """
import os, signal, sys
from loratool.merge import merge
sig = getattr(signal, sys.argv[4])
def progress(n, total):
    progress.seen += n
    if progress.seen > total // 3:
        os.kill(os.getpid(), sig)
progress.seen = 0
merge(sys.argv[1], sys.argv[2], sys.argv[3], device="cpu", progress=progress)
"""


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killed_merge_leaves_no_output(llama, tmp_path, sig):
    base, a, _, _ = llama["bf16"]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(base), str(a), str(out), sig],
                          capture_output=True, text=True, timeout=120)
    assert not out.exists()
    left = [p.name for p in tmp_path.iterdir()]
    if sig == "SIGKILL":
        assert proc.returncode == -signal.SIGKILL
        assert all(n.startswith(".out.") and n.endswith(".tmp") for n in left)  # hidden, never OUT
    else:
        assert proc.returncode != 0 and "interrupted (SIGTERM)" in proc.stderr
        assert left == []


def test_dtype_conversion_and_index(llama, tmp_path):
    base, a, _, _ = llama["bf16"]
    result = merge(base, str(a), tmp_path / "out", dtype="fp32", device="cpu")
    assert result.num_cast == 7 and result.num_merged == 14
    ours, orig = BaseCheckpoint(tmp_path / "out"), BaseCheckpoint(base)
    for n in orig.names():
        assert ours.dtype(n) == "F32"
    assert torch.equal(ours.read("model.norm.weight"), orig.read("model.norm.weight").float())
    # touched: the float32 sum itself, not rounded to bf16 first
    from loratool.formats import load_adapter

    m = load_adapter(a).modules["model.layers.0.self_attn.q_proj"]
    w = orig.read("model.layers.0.self_attn.q_proj.weight").float()
    assert torch.equal(ours.read("model.layers.0.self_attn.q_proj.weight"), w + (m.B() @ m.A()) * m.scale)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(ours.ref(n).nbytes for n in ours.names())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "float32"


def test_max_shard_size_reshards_and_loads(llama, tmp_path):
    from transformers import LlamaForCausalLM

    base, a, _, _ = llama["bf16"]
    merge(base, str(a), tmp_path / "one", device="cpu", max_shard_size="10GB")
    merge(base, str(a), tmp_path / "many", device="cpu", max_shard_size="100KB")
    assert sorted(p.name for p in (tmp_path / "one").glob("*.safetensors")) == ["model.safetensors"]
    assert not (tmp_path / "one" / "model.safetensors.index.json").exists()
    shards = sorted((tmp_path / "many").glob("model-*.safetensors"))
    assert len(shards) > 2 and all(p.stat().st_size < 200_000 for p in shards)
    one, many = load_dir(tmp_path / "one"), load_dir(tmp_path / "many")
    assert one.keys() == many.keys() and all(torch.equal(one[k], many[k]) for k in one)
    model = LlamaForCausalLM.from_pretrained(str(tmp_path / "many"), dtype=torch.bfloat16)
    assert torch.equal(model.state_dict()["model.layers.1.mlp.up_proj.weight"], one["model.layers.1.mlp.up_proj.weight"])


def test_single_file_base_gives_a_single_file(llama, tmp_path):
    from safetensors.torch import save_file

    base, a, _, _ = llama["fp32"]
    tensors = load_dir(base)
    save_file(tensors, str(tmp_path / "base.safetensors"), metadata={"format": "pt", "note": "kept"})
    merge(tmp_path / "base.safetensors", str(a), tmp_path / "merged.safetensors", device="cpu")
    st = SafetensorsFile(tmp_path / "merged.safetensors")
    assert st.metadata == {"format": "pt", "note": "kept"}
    merge(base, str(a), tmp_path / "dir", device="cpu")
    d = load_dir(tmp_path / "dir")
    for n in st.keys():
        assert torch.equal(st.read(n), d[n]), n


def test_existing_output_needs_overwrite_and_inputs_are_protected(llama, tmp_path):
    base, a, _, _ = llama["bf16"]
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        merge(base, str(a), tmp_path / "out", device="cpu")
    merge(base, str(a), tmp_path / "out", device="cpu", overwrite=True)
    assert (tmp_path / "out" / "config.json").exists()
    with pytest.raises(UsageError, match="the output is the input"):
        merge(base, str(a), base, device="cpu", overwrite=True)


def test_adapter_for_another_base_is_refused(llama, tmp_path):
    base, _, _, _ = llama["bf16"]
    other = tiny_gpt2(torch.bfloat16)
    a = save_adapter(other, tmp_path / "gpt2", 1, r=4, fan_in_fan_out=True, target_modules=["c_attn"])
    # the base check refuses it (exit 1, the shapes named) before the plan would (the same fit check, LT301)
    with pytest.raises(MisfitError, match="the base has no tensor .*c_attn.weight") as e:
        merge(base, str(a), tmp_path / "out", device="cpu")
    assert e.value.exit_code == 1 and "--allow-base-mismatch" not in e.value.message
    assert not (tmp_path / "out").exists()


# -- unmerge --------------------------------------------------------------------------------------

def test_unmerge_returns_close_to_the_base(llama, tmp_path):
    base, a, b, _ = llama["bf16"]
    merge(base, f"{a}:0.7,{b}:0.3", tmp_path / "merged", device="cpu")
    result = unmerge(tmp_path / "merged", f"{a}:0.7,{b}:0.3", tmp_path / "restored", base=base, device="cpu")
    assert result.num_merged == 14 and len(result.distance) == 14
    assert result.max_ulp <= 1.0  # one rounding in the merge, one in the unmerge
    ours, orig = BaseCheckpoint(tmp_path / "restored"), BaseCheckpoint(base)
    assert raw(ours, "model.embed_tokens.weight") == raw(orig, "model.embed_tokens.weight")


def test_unmerge_restores_modules_to_save_from_the_base(tmp_path):
    from safetensors.torch import save_file

    model = kinds_model(torch.float32)
    (tmp_path / "base").mkdir()
    save_file(dict(model.state_dict()), str(tmp_path / "base" / "model.safetensors"))
    a = save_adapter(model, tmp_path / "a", 5, edit=_edit_mts, **KIND_CASES["modules_to_save"])
    merge(tmp_path / "base", str(a), tmp_path / "merged", device="cpu")
    orig = BaseCheckpoint(tmp_path / "base")
    assert raw(BaseCheckpoint(tmp_path / "merged"), "emb.weight") != raw(orig, "emb.weight")
    without = unmerge(tmp_path / "merged", str(a), tmp_path / "kept", device="cpu")
    assert any("emb.weight" in w and "--base" in w for w in without.warnings)
    result = unmerge(tmp_path / "merged", str(a), tmp_path / "restored", base=tmp_path / "base", device="cpu")
    assert result.num_replaced == 1 and result.max_ulp <= 1.0
    assert raw(BaseCheckpoint(tmp_path / "restored"), "emb.weight") == raw(orig, "emb.weight")


def test_unmerge_refuses_dora(tmp_path):
    model = tiny_llama(torch.float32)
    model.save_pretrained(str(tmp_path / "base"))
    a = save_adapter(model, tmp_path / "a", 1, r=4, use_dora=True, target_modules=["q_proj"])
    merge(tmp_path / "base", str(a), tmp_path / "merged", device="cpu")
    with pytest.raises(UsageError, match="DoRA"):
        unmerge(tmp_path / "merged", str(a), tmp_path / "restored", device="cpu")
    with pytest.raises(UsageError, match="weight 0.5"):
        merge(tmp_path / "base", f"{a}:0.5", tmp_path / "half", device="cpu")


# -- parsing --------------------------------------------------------------------------------------

def test_parse_adapter_specs():
    assert parse_adapter_specs("a:0.7,b:0.3") == [AdapterSpec(Path("a"), 0.7), AdapterSpec(Path("b"), 0.3)]
    assert parse_adapter_specs(["x", "y:2", "dir:with:colons", "w:1e-1"]) == [
        AdapterSpec(Path("x"), 1.0), AdapterSpec(Path("y"), 2.0), AdapterSpec(Path("dir:with:colons"), 1.0),
        AdapterSpec(Path("w"), 0.1)]
    assert parse_adapter_specs("neg:-0.5")[0].weight == -0.5
    for bad in ("", ",", ":0.5"):
        with pytest.raises(UsageError):
            parse_adapter_specs(bad)


def test_parse_size_and_row_spans():
    assert parse_size("200KB") == 200_000 and parse_size("5GB") == 5 * 10**9 and parse_size("1GiB") == 2**30
    assert parse_size(1234) == 1234
    with pytest.raises(UsageError):
        parse_size("lots")
    # the tail is folded into the last span (a short tail would take another BLAS kernel)
    assert row_spans(300, 64) == [(0, 64), (64, 128), (128, 192), (192, 300)]
    assert row_spans(50, 64) == [(0, 50)]


# -- the command ----------------------------------------------------------------------------------

def test_merge_command(llama, tmp_path, capsys):
    from loratool.cli import main

    base, a, b, _ = llama["bf16"]
    with pytest.raises(SystemExit) as e:
        main(["merge", "--base", str(base), "--adapters", f"{a}:0.7,{b}:0.3", "-o", str(tmp_path / "out"),
              "--device", "cpu", "--json"])
    assert e.value.code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_merged"] == 14 and report["num_copied"] == 7 and report["adapters"] == [f"{a}:0.7", f"{b}:0.3"]
    with pytest.raises(SystemExit) as e:
        main(["merge", "--base", str(base), "--adapters", str(a), "-o", str(tmp_path / "out"), "--device", "cpu"])
    assert e.value.code == 2
    assert "already exists" in capsys.readouterr().err


def test_cuda_engine_arguments_match_the_cpu_math(tmp_path):
    """The CUDA engine's calls into loratool.kernels.merge (row slices, Conv1D/Embedding passed as
    transposes, DoRA magnitudes), run here through the kernels' torch reference on CPU tensors."""
    from safetensors.torch import save_file

    from loratool.merge import Action, LoadedAdapter, TensorMath, plan_merge
    from loratool.merge.engines import _CudaMath
    from loratool.formats import load_adapter

    model = kinds_model(torch.bfloat16)
    (tmp_path / "base").mkdir()
    save_file(dict(model.state_dict()), str(tmp_path / "base" / "model.safetensors"))
    for case in ("plain", "dora"):
        a = save_adapter(model, tmp_path / case, 5, fan_in_fan_out=True, **KIND_CASES[case])
        ck = BaseCheckpoint(tmp_path / "base")
        plan = plan_merge(ck, [LoadedAdapter(AdapterSpec(a), load_adapter(a))])
        for t in plan.tensors():
            if t.action is not Action.MERGE:
                continue
            w = ck.read(t.name)
            rows = w.shape[0]
            for i, j in ((0, rows), (rows // 3, rows)):
                if t.dora and t.kind.value in ("conv1d", "embedding") and i:
                    continue  # their norm runs over all rows: never sliced
                want = TensorMath(t, torch.float32).rows(w[i:j], i, j).to(torch.bfloat16)
                got = _CudaMath(t, torch.float32, "cpu").rows(w[i:j], i, j).to(torch.bfloat16)
                d = (got.double() - want.double()).abs()
                assert bool((d <= ulp(want.double(), "BF16") * 1.01 + 1e-30).all()), (case, t.name, i, j)


def test_other_files_are_copied_and_stale_weights_skipped(llama, tmp_path):
    base, a, _, _ = llama["fp32"]
    src = tmp_path / "base"
    shutil.copytree(base, src)
    (src / "tokenizer.json").write_text("{}")
    (src / "extra").mkdir()
    (src / "extra" / "notes.txt").write_text("kept")
    (src / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")  # stale pickle weights
    (src / ".cache").mkdir()
    (src / ".cache" / "lock").write_text("")
    result = merge(src, str(a), tmp_path / "out", device="cpu")
    out = tmp_path / "out"
    assert (out / "tokenizer.json").read_text() == "{}" and (out / "extra" / "notes.txt").read_text() == "kept"
    assert not (out / "pytorch_model.bin").exists() and not (out / ".cache").exists()
    assert any("pytorch_model.bin" in w for w in result.warnings)


def test_pipeline_components(tmp_path):
    """A diffusers-style pipeline directory and a multi-component PEFT adapter (one per folder)."""
    from safetensors.torch import save_file

    model = kinds_model(torch.float32)
    base = tmp_path / "pipe"
    (base / "unet").mkdir(parents=True)
    (base / "model_index.json").write_text('{"_class_name": "Tiny"}')
    (base / "unet" / "config.json").write_text("{}")
    save_file(dict(model.state_dict()), str(base / "unet" / "diffusion_pytorch_model.safetensors"))
    (tmp_path / "adapter").mkdir()
    save_adapter(model, tmp_path / "adapter" / "unet", 5, **KIND_CASES["plain"], fan_in_fan_out=True)
    merge(base, str(tmp_path / "adapter"), tmp_path / "out", device="cpu")
    assert sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file()) == [
        "README.md", "loratool.json", "model_index.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors"]
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(base / "unet" / "diffusion_pytorch_model.safetensors", single / "model.safetensors")
    merge(single, str(tmp_path / "adapter" / "unet"), tmp_path / "ref", device="cpu")
    got = SafetensorsFile(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    want = SafetensorsFile(tmp_path / "ref" / "model.safetensors")
    assert sorted(got.keys()) == sorted(want.keys())
    assert all(got.read_bytes(k) == want.read_bytes(k) for k in got.keys())
    assert any(got.read_bytes(k) != SafetensorsFile(single / "model.safetensors").read_bytes(k) for k in got.keys())
