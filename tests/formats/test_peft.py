"""PEFT is the oracle: what loratool reads must mean what PEFT means, and what it writes must load
in PEFT and give the same outputs."""

import json
import math
import os
import shutil
import subprocess
import sys
import time
import warnings

import pytest
import torch
from safetensors.torch import load_file

from fixtures.generate import SEED, make_gpt2, make_llama
from loratool.adapter import LayerKind
from loratool.cli import main
from loratool.formats import detect_format, load_adapter, write_adapter

PEFT_FIXTURES = ["llama_r8", "llama_r8_bf16", "llama_dora", "llama_rslora_patterns", "llama_bias",
                 "llama_embed_mts", "gpt2_conv1d"]


def _model_for(name):
    return make_gpt2(SEED) if name.startswith("gpt2") else make_llama(SEED)


def _peft_model(name, path):
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(_model_for(name), str(path)).eval()


def _lora_layers(peft_model):
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {n[len(prefix):]: m for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("name", PEFT_FIXTURES)
def test_reader_agrees_with_peft(fixtures_dir, name):
    path = fixtures_dir / name
    assert detect_format(path) == "peft"
    adapter = load_adapter(path)
    layers = _lora_layers(_peft_model(name, path))
    assert set(adapter.modules) == set(layers)
    for mod_name, layer in layers.items():
        m = adapter.modules[mod_name]
        assert m.rank == layer.r["default"]
        assert m.scale == pytest.approx(layer.scaling["default"], rel=1e-12)
        ours = m.delta(torch.float32)
        theirs = layer.get_delta_weight("default").float()
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
        if m.use_dora:
            mag = layer.lora_magnitude_vector["default"].weight.detach()
            assert torch.equal(m.magnitude.load().to(mag.dtype), mag)
    expected_kinds = {"gpt2_conv1d": LayerKind.CONV1D}
    if name in expected_kinds:
        assert {m.kind for m in adapter.modules.values()} == {expected_kinds[name]}
    if name == "llama_embed_mts":
        assert adapter.modules["model.embed_tokens"].kind is LayerKind.EMBEDDING
        assert list(adapter.modules_to_save) == ["lm_head.weight"]


def test_rank_and_alpha_patterns(fixtures_dir):
    a = load_adapter(fixtures_dir / "llama_rslora_patterns")
    m = a.modules
    assert m["model.layers.0.self_attn.q_proj"].rank == 4
    assert m["model.layers.1.mlp.down_proj"].rank == 2
    assert m["model.layers.0.mlp.down_proj"].rank == 8
    assert m["model.layers.1.self_attn.v_proj"].alpha == 3
    assert m["model.layers.0.mlp.up_proj"].alpha == 32
    assert m["model.layers.1.mlp.up_proj"].alpha == 16
    assert m["model.layers.0.self_attn.q_proj"].scale == pytest.approx(16 / 4 ** 0.5)


@pytest.mark.parametrize("name", PEFT_FIXTURES)
def test_round_trip_loads_in_peft_with_same_outputs(fixtures_dir, tmp_path, name):
    src = fixtures_dir / name
    out = tmp_path / "copy"
    write_adapter(load_adapter(src), out, "peft")
    # every tensor byte for byte, same keys
    a = load_file(str(src / "adapter_model.safetensors"))
    b = load_file(str(out / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # the config means the same to PEFT: same outputs
    x = torch.randint(0, 90, (2, 7))
    with torch.no_grad():
        y1 = _peft_model(name, src)(x).logits
        y2 = _peft_model(name, out)(x).logits
    assert torch.equal(y1, y2)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA"


def test_written_patterns_reproduce_per_module_scales(fixtures_dir, tmp_path):
    """Changing per-module ranks/alphas must come out as rank_pattern/alpha_pattern that PEFT
    applies to exactly those modules."""
    adapter = load_adapter(fixtures_dir / "llama_r8")
    m = adapter.modules["model.layers.1.self_attn.k_proj"]
    m.alpha = 5.0
    m.lora_A = m.A()[:3].clone()
    m.lora_B = m.B()[:, :3].clone()
    out = write_adapter(adapter, tmp_path / "patched", "peft")
    layers = _lora_layers(_peft_model("llama_r8", out))
    for name, layer in layers.items():
        assert layer.r["default"] == adapter.modules[name].rank
        assert layer.scaling["default"] == pytest.approx(adapter.modules[name].scale)


# -- hostile configs (issue 11): one line, exit 2, bounded time ------------------------------------

CONFIG = "adapter_config.json"


def _copy_adapter(fixtures_dir, tmp_path, name="adapter", text=None, **changes):
    """llama_r8 with its config changed (``changes``) or replaced (``text``)."""
    d = tmp_path / name
    shutil.copytree(fixtures_dir / "llama_r8", d)
    if text is None:
        cfg = json.loads((d / CONFIG).read_text())
        cfg.update(changes)
        text = json.dumps(cfg)  # NaN and Infinity come out as JSON's non-standard literals
    (d / CONFIG).write_text(text)
    return d


def _run(*args, timeout=120, env=None):
    """`loratool ARGS` in a subprocess, and how long it took (a hang fails at ``timeout``)."""
    full_env = dict(os.environ, **(env or {}))
    full_env.pop("LORATOOL_DEBUG", None)
    start = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "loratool", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=full_env)
    return p, time.monotonic() - start


def _one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("loratool: error: ") and "Traceback" not in stderr
    return lines[0]


@pytest.mark.parametrize("field, value, merge_rc", [
    ("rank_pattern", {"(.|.)*Z": 4}, 0),
    ("alpha_pattern", {r"(\w+\s?)*$x": 3, "v_proj": 3}, 0),
    ("exclude_modules", "(.|.)*Z", 0),
    ("target_modules", "(.|.)*Z", 2),  # selects nothing: merge refuses, in one line
])
def test_catastrophic_pattern_answers_at_once(fixtures_dir, tmp_path, field, value, merge_rc):
    """Each of these patterns takes Python's re hours on a 31-character module name: the commands
    answer (a hang fails at _run's timeout); their speed is bench/bench_patterns.py's."""
    adapter = _copy_adapter(fixtures_dir, tmp_path, **{field: value})
    p, _ = _run("inspect", adapter)
    assert p.returncode == 0, p.stderr
    p, _ = _run("merge", "--base", fixtures_dir / "base_llama", "--adapters", adapter,
                   "-o", tmp_path / "merged", "-q")
    assert p.returncode == merge_rc, p.stderr
    if merge_rc:
        assert "leave it out" in _one_line_error(p.stderr)


def test_100k_key_rank_pattern_answers_at_once(fixtures_dir, tmp_path):
    pattern = {f"model.layers.{i}.self_attn.q_proj": 8 for i in range(100_000)}
    pattern["model.layers.1.mlp.down_proj"] = 8
    adapter = _copy_adapter(fixtures_dir, tmp_path, rank_pattern=pattern)
    p, _ = _run("inspect", adapter)
    assert p.returncode == 0, p.stderr
    p, _ = _run("merge", "--base", fixtures_dir / "base_llama", "--adapters", adapter,
                   "-o", tmp_path / "merged", "-q")
    assert p.returncode == 0, p.stderr
    modules = load_adapter(adapter).modules
    assert {m.config_rank for m in modules.values()} == {8}


def test_registry_add_with_catastrophic_pattern(fixtures_dir, tmp_path):
    adapter = _copy_adapter(fixtures_dir, tmp_path, rank_pattern={"(.|.)*Z": 4})
    p, _ = _run("registry", "add", adapter, "--name", "hostile", env={"LORATOOL_HOME": str(tmp_path / "home")})
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("field, value, phrase", [
    ("rank_pattern", {r"(?<=self_attn\.)q_proj": 4}, "lookbehind"),
    ("rank_pattern", {r"(q)_proj\1": 4}, "backreference"),
    ("alpha_pattern", {r"(?<!vision\.)v_proj": 4}, "lookbehind"),
    ("target_modules", r"(?!.*vision).*_proj", "lookahead"),
    ("exclude_modules", r"(\w+)\.\1", "backreference"),
    ("rank_pattern", {r"(q_proj": 4}, "not a valid regular expression"),
])
def test_patterns_re2_cannot_run_are_refused_in_one_line(fixtures_dir, tmp_path, field, value, phrase):
    adapter = _copy_adapter(fixtures_dir, tmp_path, **{field: value})
    p, _ = _run("inspect", adapter)
    assert p.returncode == 2 and p.stdout == ""
    line = _one_line_error(p.stderr)
    assert str(adapter / CONFIG) in line and field in line and phrase in line, line


NAN, INF = math.nan, math.inf
BAD_FIELDS = [
    ("exclude_modules", 5, "exclude_modules must be"),
    ("exclude_modules", [1], "exclude_modules must be"),
    ("target_modules", 5, "target_modules must be"),
    ("target_modules", [1, 2], "target_modules must be"),
    ("target_modules", ["q_proj", None], "target_modules must be"),
    ("target_modules", {"q_proj": 1}, "target_modules must be"),
    ("r", True, "r must be a positive integer"),
    ("r", "8", "r must be a positive integer"),
    ("r", [8], "r must be a positive integer"),
    ("r", None, "r must be a positive integer"),
    ("r", -8, "r must be a positive integer"),
    ("r", 0, "r must be a positive integer"),
    ("r", NAN, "r must be a positive integer"),
    ("r", 8.5, "r must be a positive integer"),
    ("r", 1e300, "r must be a positive integer no larger than"),
    ("lora_alpha", True, "lora_alpha must be a positive finite number"),
    ("lora_alpha", "16", "lora_alpha must be a positive finite number"),
    ("lora_alpha", {}, "lora_alpha must be a positive finite number"),
    ("lora_alpha", 0, "lora_alpha must be a positive finite number"),
    ("lora_alpha", -1.5, "lora_alpha must be a positive finite number"),
    ("lora_alpha", NAN, "lora_alpha must be a positive finite number"),
    ("lora_alpha", INF, "lora_alpha must be a positive finite number"),
    ("rank_pattern", [], "rank_pattern must map"),
    ("rank_pattern", "q_proj", "rank_pattern must map"),
    ("rank_pattern", {"q_proj": True}, "rank_pattern['q_proj'] must be a positive integer"),
    ("rank_pattern", {"q_proj": "4"}, "rank_pattern['q_proj'] must be a positive integer"),
    ("rank_pattern", {"q_proj": 2.5}, "rank_pattern['q_proj'] must be a positive integer"),
    ("rank_pattern", {"q_proj": NAN}, "rank_pattern['q_proj'] must be a positive integer"),
    ("alpha_pattern", 5, "alpha_pattern must map"),
    ("alpha_pattern", {"v_proj": None}, "alpha_pattern['v_proj'] must be a positive finite number"),
    ("alpha_pattern", {"v_proj": False}, "alpha_pattern['v_proj'] must be a positive finite number"),
    ("alpha_pattern", {"v_proj": -1}, "alpha_pattern['v_proj'] must be a positive finite number"),
    ("base_model_name_or_path", 5, "base_model_name_or_path must be a string"),
    ("revision", ["main"], "revision must be a string"),
    ("task_type", {}, "task_type must be a string"),
    ("peft_type", 5, "peft_type must be a string"),
    ("peft_type", ["LORA"], "peft_type must be a string"),
    ("use_dora", "yes", "use_dora must be true or false"),
    ("use_rslora", 1, "use_rslora must be true or false"),
    ("fan_in_fan_out", "false", "fan_in_fan_out must be true or false"),
    ("modules_to_save", "lm_head", "modules_to_save must be a list"),
]


def _inspect_in_process(capsys, monkeypatch, path):
    monkeypatch.delenv("LORATOOL_DEBUG", raising=False)
    with pytest.raises(SystemExit) as e:
        main(["inspect", str(path)])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


@pytest.mark.parametrize("field, value, phrase", BAD_FIELDS, ids=[f"{f}={v!r}" for f, v, _ in BAD_FIELDS])
def test_config_field_of_wrong_type_or_value(fixtures_dir, tmp_path, capsys, monkeypatch, field, value, phrase):
    """Types before values: every field loratool uses is checked before it is used."""
    adapter = _copy_adapter(fixtures_dir, tmp_path, **{field: value})
    rc, out, err = _inspect_in_process(capsys, monkeypatch, adapter)
    assert rc == 2 and out == ""
    line = _one_line_error(err)
    assert f"{adapter / CONFIG}: {phrase}" in line, line


BIG = "9" * 5000
RAW_CONFIGS = [
    ("surrogate_key", '{"r": 8, "lora_alpha": 16, "\\udc80": 1}', "surrogate"),
    ("surrogate_pattern_key", '{"r": 8, "lora_alpha": 16, "rank_pattern": {"q\\udc80": 4}}', "surrogate"),
    ("surrogate_value", '{"r": 8, "lora_alpha": 16, "base_model_name_or_path": "\\ud800x"}', "surrogate"),
    ("huge_int_r", '{"r": ' + BIG + ', "lora_alpha": 16}', "digits"),
    ("huge_int_unused", '{"r": 8, "lora_alpha": 16, "peft_version": ' + BIG + "}", "digits"),
    ("huge_negative_int", '{"r": -' + BIG + ', "lora_alpha": 16}', "digits"),
    ("deep", '{"r": 8, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested"),
    ("array", "[1, 2]", "expected a JSON object"),
    ("not_json", '{"r": 8,', "not valid JSON"),
    ("not_utf8", b'{"r": 8, "task_type": "\xff"}', "UTF-8"),
]


@pytest.mark.parametrize("name, text, phrase", RAW_CONFIGS, ids=[c[0] for c in RAW_CONFIGS])
def test_config_json_out_of_bounds(fixtures_dir, tmp_path, capsys, monkeypatch, name, text, phrase):
    adapter = _copy_adapter(fixtures_dir, tmp_path)
    if isinstance(text, bytes):
        (adapter / CONFIG).write_bytes(text)
    else:
        (adapter / CONFIG).write_text(text)
    rc, out, err = _inspect_in_process(capsys, monkeypatch, adapter)
    assert rc == 2 and out == ""
    line = _one_line_error(err)
    assert str(adapter / CONFIG) in line and phrase in line, line


@pytest.mark.parametrize("kind", ["fifo", "folder"])
def test_config_that_is_no_regular_file(fixtures_dir, tmp_path, kind):
    """A FIFO with no writer would block a plain open() for ever: refused at once instead."""
    adapter = _copy_adapter(fixtures_dir, tmp_path)
    (adapter / CONFIG).unlink()
    if kind == "fifo":
        os.mkfifo(adapter / CONFIG)
    else:
        (adapter / CONFIG).mkdir()
    p, _ = _run("inspect", adapter, timeout=60)
    assert p.returncode == 2  # a FIFO is opened non-blocking: a hang fails at the timeout
    line = _one_line_error(p.stderr)
    assert str(adapter / CONFIG) in line and ("FIFO" if kind == "fifo" else "folder") in line, line


@pytest.mark.parametrize("changes", [
    {"r": 8.0, "lora_alpha": 16.0},
    {"exclude_modules": None, "target_modules": r"model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj"},
    {"exclude_modules": "lm_head", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"]},
    {"exclude_modules": ["vision_tower"], "target_modules": "all-linear"},
    {"rank_pattern": {r"layers\.9\..*": 4, "z_proj": 2}, "alpha_pattern": {r".*\.mlp\..*": 16}},
    {"base_model_name_or_path": None, "revision": "main", "task_type": "CAUSAL_LM", "use_dora": None},
])
def test_config_fields_that_peft_accepts_still_load(fixtures_dir, tmp_path, changes):
    adapter = _copy_adapter(fixtures_dir, tmp_path, **changes)
    a = load_adapter(adapter)
    assert len(a.modules) == 14 and {m.rank for m in a.modules.values()} == {8}
    assert {m.config_rank for m in a.modules.values()} == {8}
