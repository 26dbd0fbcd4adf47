import json

import pytest

from tinybase import base_with_one_changed_tensor
from loratool.validation import CHECKS, validate

CLEAN = ["llama_r8", "llama_r8_bf16", "llama_dora", "llama_rslora_patterns", "llama_bias",
         "llama_embed_mts", "gpt2_conv1d"]


@pytest.mark.parametrize("name", CLEAN)
def test_clean_fixtures_pass(fixtures_dir, name):
    base = "base_gpt2" if name.startswith("gpt2") else "base_llama"
    r = validate(fixtures_dir / name, base=fixtures_dir / base)
    assert r.passed and r.exit_code == 0 and r.num_errors == 0, r.findings
    # the fixtures carry no manifest: a note says the base was checked by shape only, and that is
    # not a warning, so --strict --base passes on a good third-party adapter (issue 13)
    assert [f.id for f in r.findings if f.severity.value == "warning"] == []
    assert "LT307" in {f.id for f in r.findings if f.severity.value == "info"}
    assert validate(fixtures_dir / name, strict=True).exit_code == 0
    assert validate(fixtures_dir / name, base=fixtures_dir / base, strict=True).exit_code == 0


def _copy_with_manifest(src, dst, base):
    import shutil

    from loratool.manifest import record_manifest

    shutil.copytree(src, dst)
    record_manifest(dst, base=base)
    return dst


def test_manifest_pins_the_base_by_content(cli, fixtures_dir, tmp_path):
    adapter = _copy_with_manifest(fixtures_dir / "llama_r8", tmp_path / "a", fixtures_dir / "base_llama")
    r = validate(adapter, base=fixtures_dir / "base_llama", strict=True)
    assert r.exit_code == 0 and r.num_warnings == 0, r.findings
    other = base_with_one_changed_tensor(fixtures_dir / "base_llama", tmp_path / "other_base")
    p = cli("validate", adapter, "--base", other)
    assert p.returncode == 3, p.stdout + p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "--allow-base-mismatch" in lines[0] and "model-0000" in lines[0]
    p = cli("validate", adapter, "--base", other, "--allow-base-mismatch", "--json")
    assert p.returncode == 0
    assert [f["id"] for f in json.loads(p.stdout)["findings"] if f["severity"] == "warning"] == ["LT308"]


def test_require_manifest(cli, fixtures_dir):
    p = cli("validate", fixtures_dir / "llama_r8", "--base", fixtures_dir / "base_llama", "--require-manifest")
    assert p.returncode == 3 and "no manifest" in p.stderr


def test_wrong_base_names_module_and_both_shapes(cli, fixtures_dir):
    p = cli("validate", fixtures_dir / "llama_r8", "--base", fixtures_dir / "base_llama_wrong")
    assert p.returncode == 1
    line = next(l for l in p.stdout.splitlines() if "model.layers.0.mlp.up_proj" in l)
    assert "LT302" in line and "[96, 64]" in line and "[128, 64]" in line
    assert "Traceback" not in p.stdout + p.stderr


def test_conv1d_layout_mismatch(fixtures_dir, tmp_path):
    import json as _json
    import shutil

    d = tmp_path / "no_fifo"
    shutil.copytree(fixtures_dir / "gpt2_conv1d", d)
    cfg = _json.loads((d / "adapter_config.json").read_text())
    cfg["fan_in_fan_out"] = False
    (d / "adapter_config.json").write_text(_json.dumps(cfg))
    r = validate(d, base=fixtures_dir / "base_gpt2")
    assert r.exit_code == 1
    # c_fc is (32 -> 128): stored (32, 128) by Conv1D; only the non-square modules can tell
    assert any(f.id == "LT303" and "fan_in_fan_out=True" in f.message for f in r.findings)


def test_target_missing_in_base(fixtures_dir):
    r = validate(fixtures_dir / "llama_r8", base=fixtures_dir / "base_gpt2")
    assert r.exit_code == 1 and any(f.id == "LT301" for f in r.findings)


def test_vllm_target(fixtures_dir):
    ids = lambda r: {f.id for f in r.findings if f.severity.value == "error"}
    assert ids(validate(fixtures_dir / "llama_dora", target="vllm")) == {"LT402"}
    assert ids(validate(fixtures_dir / "llama_bias", target="vllm")) == {"LT403"}
    assert ids(validate(fixtures_dir / "llama_rslora_patterns", target="vllm")) == {"LT406"}
    r = validate(fixtures_dir / "llama_embed_mts", target="vllm")
    assert r.exit_code == 0 and any(f.id == "LT404" for f in r.findings)
    assert validate(fixtures_dir / "llama_embed_mts", target="vllm", strict=True).exit_code == 1
    assert validate(fixtures_dir / "llama_r8", target="vllm", strict=True).exit_code == 0


@pytest.mark.parametrize("case,check", [("nan_values", "LT201"), ("inf_values", "LT201"),
                                        ("zero_B", "LT203"), ("rank_mismatch", "LT101"),
                                        ("missing_B", "LT102"), ("config_rank_mismatch", "LT103")])
def test_findings_have_stable_ids(fixtures_dir, case, check):
    r = validate(fixtures_dir / "broken" / case)
    assert r.exit_code == 1
    assert check in {f.id for f in r.findings}
    for f in r.findings:
        assert CHECKS[f.id] == f.check


def test_json_report(cli, fixtures_dir):
    p = cli("validate", "--json", fixtures_dir / "broken" / "nan_values")
    assert p.returncode == 1
    data = json.loads(p.stdout)
    assert data["passed"] is False and data["num_errors"] == 1
    assert data["findings"][0]["id"] == "LT201" and data["findings"][0]["file"].endswith("adapter_model.safetensors")


def test_modules_the_config_leaves_out(cli, fixtures_dir, tmp_path):
    """Weights for a module that target_modules/exclude_modules leave out: PEFT ignores them, so
    validate warns and merge refuses rather than give a model PEFT would not."""
    import shutil

    d = tmp_path / "excluded"
    shutil.copytree(fixtures_dir / "llama_r8", d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg["exclude_modules"] = ["layers.1.mlp.down_proj"]
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    r = validate(d)
    assert [f.module for f in r.findings if f.id == "LT104"] == ["model.layers.1.mlp.down_proj"]
    p = cli("merge", "--base", fixtures_dir / "base_llama", "--adapters", d, "-o", tmp_path / "out")
    assert p.returncode == 2 and "model.layers.1.mlp.down_proj" in p.stderr and not (tmp_path / "out").exists()


def test_exploding_singular_value_is_exact_not_a_bound(fixtures_dir, tmp_path):
    """LT204 compares the delta's largest singular value with 1e3. validate settles most modules
    with the bound σ₁ ≤ ‖B‖_F‖A‖_F; a module whose bound is above the threshold but whose σ₁ is
    below must not warn, and one whose σ₁ is above must."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file, save_file

    d = tmp_path / "explode"
    shutil.copytree(fixtures_dir / "llama_r8", d)
    cfg = json.loads((d / "adapter_config.json").read_text())
    st = d / "adapter_model.safetensors"
    tensors = load_file(st)
    keys = sorted(k for k in tensors if k.endswith("lora_B.weight"))
    scale = cfg["lora_alpha"] / cfg["r"]

    def ortho(rows, cols, c):  # c · (orthonormal columns), as float32
        q, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((rows, cols)))
        return (q * c).astype(np.float32)

    # first module: B, Aᵀ with orthonormal columns scaled so σ₁ = 600 < 1e3, bound = 600·r > 1e3
    # second: σ₁ = 2000
    for key, sigma in ((keys[0], 600.0), (keys[1], 2000.0)):
        a_key = key.replace("lora_B", "lora_A")
        (out, r), k = tensors[key].shape, tensors[a_key].shape[1]
        c = np.sqrt(sigma / scale)
        tensors[key] = ortho(out, r, c)
        tensors[a_key] = np.ascontiguousarray(ortho(k, r, c).T)
        lr = (np.float64(scale) * tensors[key].astype(np.float64) @ tensors[a_key].astype(np.float64))
        assert abs(np.linalg.svd(lr, compute_uv=False)[0] - sigma) < 1e-2 * sigma
        assert scale * np.linalg.norm(tensors[key]) * np.linalg.norm(tensors[a_key]) > 1e3
    save_file(tensors, st, metadata={"format": "pt"})
    r = validate(d)
    warned = [f.module for f in r.findings if f.id == "LT204"]
    second = keys[1].split(".lora_B")[0].removeprefix("base_model.model.")
    assert len(warned) == 1 and warned[0].endswith(second), r.findings


def test_json_on_every_exit_code(cli, fixtures_dir, tmp_path):
    """validate --json prints a report whatever stops it: an unreadable adapter (exit 2) and a
    base that is not the one the manifest records (exit 3) give one error finding each, and the
    one-line error still goes to stderr."""
    p = cli("validate", "--json", fixtures_dir / "broken" / "truncated_file")
    assert p.returncode == 2
    data = json.loads(p.stdout)
    assert data["passed"] is False and data["exit_code"] == 2 and data["num_errors"] == 1
    assert [f["id"] for f in data["findings"]] == ["LT001"] and "truncated" in data["findings"][0]["message"]
    assert len(p.stderr.strip().splitlines()) == 1 and "truncated" in p.stderr
    adapter = _copy_with_manifest(fixtures_dir / "llama_r8", tmp_path / "a", fixtures_dir / "base_llama")
    other = base_with_one_changed_tensor(fixtures_dir / "base_llama", tmp_path / "other_base")
    p = cli("validate", "--json", adapter, "--base", other)
    assert p.returncode == 3
    data = json.loads(p.stdout)
    assert data["exit_code"] == 3 and [f["id"] for f in data["findings"]] == ["LT309"]
    assert data["findings"][0]["check"] == CHECKS["LT309"] == "base-not-recorded"
    assert "--allow-base-mismatch" in p.stderr


def test_vllm_refuses_diffusion_adapters_even_without_conv(fixtures_dir, tmp_path):
    """vLLM serves language models: an SD adapter is refused for what it is (LT407), also when
    every module is linear (attention-only UNet LoRA), never passed."""
    r = validate(fixtures_dir / "kohya_sd.safetensors", target="vllm")
    assert "LT407" in {f.id for f in r.findings} and not r.passed
    assert "LT407" not in {f.id for f in validate(fixtures_dir / "llama_r8", target="vllm").findings}
    # a PEFT adapter of a UNet's attention layers only: no components recorded, no conv modules
    import numpy as np
    from safetensors.numpy import save_file

    d = tmp_path / "unet_attn"
    d.mkdir()
    rng = np.random.default_rng(0)
    tensors = {}
    for proj in ("to_q", "to_k", "to_v"):
        stem = f"base_model.model.down_blocks.0.attentions.0.transformer_blocks.0.attn1.{proj}"
        tensors[f"{stem}.lora_A.weight"] = rng.standard_normal((4, 32)).astype(np.float32)
        tensors[f"{stem}.lora_B.weight"] = rng.standard_normal((32, 4)).astype(np.float32)
    save_file(tensors, d / "adapter_model.safetensors")
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 4,
                                                       "target_modules": ["to_q", "to_k", "to_v"]}))
    r = validate(d, target="vllm")
    assert [f.id for f in r.findings if f.severity.value == "error"] == ["LT407"], r.findings
