"""loratool.resize and `loratool resize`, with PEFT as the oracle: resized adapters load with
``PeftModel.from_pretrained`` and their deltas are the optimal truncations of the originals."""

from __future__ import annotations

import json

import pytest
import torch

from loratool.cli import main
from loratool.formats import load_adapter
from loratool.lowrank import RankRule
from loratool.resize import resize_adapter, resize_path
from loratool.safetensors_io import SafetensorsFile
from peft_oracle import load_peft, lora_modules, make_adapter, optimal, peft_deltas, rel

KINDS = {
    "linear": ("llama", ("q_proj", "v_proj", "down_proj"), {}),
    "conv2d+embedding+linear": ("kinds", ("lin", "conv", "emb"), {}),
    "conv1d": ("kinds", ("c1d",), {"fan_in_fan_out": True}),
}


def check_truncated(orig_dir, out_dir, model, ranks, report=None, tol=2e-6):
    """Every module of out_dir, loaded by PEFT, is the optimal rank-k truncation of orig_dir's."""
    before = peft_deltas(load_peft(orig_dir, model))
    after_pm = load_peft(out_dir, model)
    after = peft_deltas(after_pm)
    assert set(after) == set(before)
    rows = {m.name: m for m in report.modules} if report else {}
    for name, delta in before.items():
        k = ranks[name] if isinstance(ranks, dict) else ranks
        best, err = optimal(delta, k)
        assert rel(after[name], best) < tol, name
        if name in rows:
            assert rows[name].relative_error == pytest.approx(err, rel=1e-6, abs=1e-7), name
    return after_pm


@pytest.mark.parametrize("kind", list(KINDS))
def test_resize_rank_is_the_optimal_truncation_in_peft(tmp_path, kind):
    model, targets, extra = KINDS[kind]
    src = make_adapter(tmp_path / "a", 1, model=model, r=8, alpha=16, targets=targets, **extra)
    report = resize_path(src, tmp_path / "out", RankRule(rank=3))
    assert report.num_resized == report.num_modules == len(load_adapter(src).modules)
    pm = check_truncated(src, tmp_path / "out", model, 3, report)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 16 and not cfg["alpha_pattern"]  # alpha kept
    for mod in lora_modules(pm).values():
        assert mod.r["default"] == 3 and mod.scaling["default"] == pytest.approx(16 / 3)
    assert report.old_params > report.new_params


def _spectra(pm):
    """Give every module a known spectrum: A with orthonormal rows, B with orthogonal columns
    scaled by σ; layer 0 q_proj rank-deficient (rank 3), layer 1 v_proj all zero."""
    g = torch.Generator().manual_seed(3)
    for i, (name, mod) in enumerate(sorted(lora_modules(pm).items())):
        A, B = mod.lora_A["default"].weight, mod.lora_B["default"].weight
        r = A.shape[0]
        qa = torch.linalg.qr(torch.randn(A.shape[1], r, generator=g))[0]
        qb = torch.linalg.qr(torch.randn(B.shape[0], r, generator=g))[0]
        decay = (0.2, 0.5, 0.8, 0.95)[i % 4]
        sigma = decay ** torch.arange(r, dtype=torch.float32)
        A.copy_(qa.T)
        B.copy_(qb * sigma)
        if name.endswith("0.self_attn.q_proj"):
            B[:, 3:] = B[:, [0, 1, 2, 0, 1]]
        if name.endswith("1.self_attn.v_proj"):
            B.zero_()


def test_energy_rule_gives_ranks_per_module_and_loads_in_peft(tmp_path):
    src = make_adapter(tmp_path / "a", 2, r=8, alpha=8, targets=("q_proj", "v_proj"), edit=_spectra)
    report = resize_path(src, tmp_path / "out", RankRule(energy=0.9))
    rows = {m.name: m for m in report.modules}
    ranks = {}
    for name, delta in peft_deltas(load_peft(src)).items():
        S = torch.linalg.svdvals(delta.double())
        e = torch.cumsum(S ** 2, 0) / (S ** 2).sum() if float(S.sum()) > 0 else None
        ranks[name] = 1 if e is None else int((e < 0.9 - 1e-9).sum()) + 1
        assert rows[name].new_rank == ranks[name], name
        assert rows[name].energy_kept >= 0.9 or (e is not None and ranks[name] == 8)
    assert rows["model.layers.1.self_attn.v_proj"].new_rank == 1  # zero module: rank 1 of zeros
    assert rows["model.layers.1.self_attn.v_proj"].numerical_rank == 0
    assert rows["model.layers.0.self_attn.q_proj"].numerical_rank == 3
    assert len(set(ranks.values())) >= 3
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and not cfg["alpha_pattern"]
    pm = check_truncated(src, tmp_path / "out", "llama", ranks, report)
    for name, mod in lora_modules(pm).items():
        assert mod.r["default"] == ranks[name]
    zero = peft_deltas(pm)["model.layers.1.self_attn.v_proj"]
    assert not zero.any()


def test_rank_deficient_module_is_exact_at_its_rank(tmp_path):
    src = make_adapter(tmp_path / "a", 2, r=8, targets=("q_proj",), edit=_spectra)
    adapter = load_adapter(src)
    out, report = resize_adapter(adapter, RankRule(rank=3))
    name = "model.layers.0.self_attn.q_proj"
    row = next(m for m in report.modules if m.name == name)
    assert row.new_rank == 3 and row.relative_error < 1e-7 and row.energy_kept == pytest.approx(1.0)
    assert rel(out.modules[name].delta(torch.float64), adapter.modules[name].delta(torch.float64)) < 1e-7


def test_rank_above_current_is_left_as_it_is_with_a_warning(tmp_path, capsys):
    src = make_adapter(tmp_path / "a", 3, r=4, targets=("q_proj",))
    with pytest.raises(SystemExit) as e:
        main(["resize", str(src), "-o", str(tmp_path / "out"), "--rank", "8", "--json"])
    rc = e.value.code
    captured = capsys.readouterr()
    assert rc == 0
    report = json.loads(captured.out)
    assert {m["status"] for m in report["modules"]} == {"kept"}
    assert "warning: module 'model.layers.0.self_attn.q_proj': asked rank 8 is above its rank 4" in captured.err
    a = SafetensorsFile(src / "adapter_model.safetensors")
    b = SafetensorsFile(tmp_path / "out" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(a.read_bytes(k) == b.read_bytes(k) for k in a.keys())


@pytest.mark.parametrize("variant", ["rslora", "dora", "bf16"])
def test_rslora_dora_and_dtype(tmp_path, variant):
    extra = {"rslora": {"use_rslora": True}, "dora": {"use_dora": True}, "bf16": {"dtype": torch.bfloat16}}[variant]
    src = make_adapter(tmp_path / "a", 4, r=8, alpha=16, targets=("q_proj", "v_proj"), **extra)
    report = resize_path(src, tmp_path / "out", RankRule(rank=4))
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == 16 and cfg["r"] == 4
    assert cfg["use_rslora"] is (variant == "rslora") and cfg["use_dora"] is (variant == "dora")
    dtype = torch.bfloat16 if variant == "bf16" else torch.float32
    # bf16 factors: the output is rounded to bf16 too, so compare at bf16 precision
    pm = check_truncated(src, tmp_path / "out", "llama", 4, report, tol=1e-2 if variant == "bf16" else 2e-6)
    for mod in lora_modules(pm).values():
        want = 16 / 2 if variant == "rslora" else 16 / 4
        assert mod.scaling["default"] == pytest.approx(want)
    a = SafetensorsFile(src / "adapter_model.safetensors")
    b = SafetensorsFile(tmp_path / "out" / "adapter_model.safetensors")
    assert {b.info(k).dtype for k in b.keys()} == {"BF16" if dtype == torch.bfloat16 else "F32"}
    if variant == "dora":  # the magnitude vectors are kept byte for byte
        mags = [k for k in a.keys() if "magnitude" in k]
        assert mags and all(a.read_bytes(k) == b.read_bytes(k) for k in mags)


@pytest.mark.filterwarnings("ignore:.*invalid shape")  # PEFT's own warning on saving lora_B.bias
def test_lora_bias_contribution_is_kept(tmp_path):
    src = make_adapter(tmp_path / "a", 5, model="kinds", r=8, alpha=8, targets=("lin",), lora_bias=True)
    resize_path(src, tmp_path / "out", RankRule(rank=2))
    before = lora_modules(load_peft(src, "kinds"))["lin"]
    after = lora_modules(load_peft(tmp_path / "out", "kinds"))["lin"]
    b0 = before.lora_B["default"].bias * before.scaling["default"]
    b1 = after.lora_B["default"].bias * after.scaling["default"]
    torch.testing.assert_close(b1, b0, rtol=1e-6, atol=1e-7)
    assert after.scaling["default"] == pytest.approx(4.0)


def test_cli_resize_errors_are_one_line(tmp_path, capsys):
    src = make_adapter(tmp_path / "a", 6, r=4, targets=("q_proj",))
    with pytest.raises(SystemExit) as e:
        main(["resize", str(src), "-o", str(tmp_path / "out"), "--rank", "2", "--energy", "0.9"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and "give one rank rule, found --rank, --energy" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit) as e:
        main(["resize", str(src), "-o", str(tmp_path / "out"), "--sv-ratio", "4"])
    assert e.value.code == 0
    assert "modules resized" in capsys.readouterr().out


def test_kohya_resize_keeps_format_alpha_and_dtype(tmp_path):
    from peft_oracle import kohya_file

    src = kohya_file(tmp_path / "k.safetensors", 1, rank=8, alpha=4.0)
    report = resize_path(src, tmp_path / "out.safetensors", RankRule(rank=3))
    before, after = load_adapter(src), load_adapter(tmp_path / "out.safetensors")
    assert after.format == "kohya" and set(after.modules) == set(before.modules)
    rows = {m.name: m for m in report.modules}
    for name, m in before.modules.items():
        n = after.modules[name]
        assert n.rank == 3 and n.alpha == 4.0 and n.dtypes() == {"F16"} and n.kind is m.kind
        best, err = optimal(m.delta(torch.float64), 3)
        assert rel(n.delta(torch.float64), best) < 2e-3, name  # float16 factors
        assert rows[name].relative_error == pytest.approx(err, rel=1e-9)


# -- kohya sd-scripts' resize_lora.py options (issue 14) ------------------------------------------

def _resize_cli(capsys, *args) -> dict:
    with pytest.raises(SystemExit) as e:
        main(["resize", *map(str, args), "--json"])
    captured = capsys.readouterr()
    assert e.value.code == 0, captured.err
    return json.loads(captured.out)


def test_conv_rank_and_network_metadata_on_the_kohya_sd_fixture(fixtures_dir, tmp_path, capsys):
    from loratool.formats.kohya import is_conv_kernel

    src = fixtures_dir / "kohya_sd.safetensors"
    out = tmp_path / "out.safetensors"
    report = _resize_cli(capsys, src, "-o", out, "--rank", "2", "--conv-rank", "1")
    before, after = load_adapter(src), load_adapter(out)
    convs = {n for n, m in before.modules.items() if is_conv_kernel(m)}
    assert convs and any(m.kind.value == "conv2d" and n not in convs for n, m in before.modules.items())  # 1×1 too
    for name, m in after.modules.items():
        assert m.rank == (1 if name in convs else 2), name
    assert report["rule"] == "rank 2" and report["conv_rule"] == "rank 1"
    md_in, md = SafetensorsFile(src).metadata, SafetensorsFile(out).metadata
    assert (md_in["ss_network_dim"], md_in["ss_network_alpha"]) == ("4", "1.0")
    assert json.loads(md_in["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    # one module of the fixture has alpha 8, the rest 1: the alphas differ, as kohya writes it
    assert (md["ss_network_dim"], md["ss_network_alpha"]) == ("2", "Dynamic")
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "1", "conv_alpha": "1.0"}
    assert {k: v for k, v in md.items() if not k.startswith(("ss_network", "loratool."))} == \
        {k: v for k, v in md_in.items() if not k.startswith(("ss_network", "loratool."))}
    # a dynamic rule gives different ranks per module: "Dynamic"
    _resize_cli(capsys, src, "-o", tmp_path / "dyn.safetensors", "--sv-fro", "0.9")
    dyn = SafetensorsFile(tmp_path / "dyn.safetensors").metadata
    assert len({m.rank for m in load_adapter(tmp_path / "dyn.safetensors").modules.values()
                if not is_conv_kernel(m)}) > 1
    assert dyn["ss_network_dim"] == "Dynamic"


def test_network_metadata_keeps_true_values_and_reads_rslora_alpha():
    from types import SimpleNamespace as NS

    from loratool.formats.kohya import network_metadata

    lin = NS(rank=4, alpha=2.0, use_rslora=False, base_weight_shape=(8, 8))
    conv = NS(rank=2, alpha=1.0, use_rslora=False, base_weight_shape=(8, 8, 3, 3))
    md = {"ss_network_dim": "4", "ss_network_alpha": "2", "ss_network_args": '{"conv_dim":"2","conv_alpha":"1"}',
          "other": "x"}
    assert network_metadata(md, [lin, conv]) == md  # already true: the text is kept
    rs = NS(rank=4, alpha=2.0, use_rslora=True, base_weight_shape=(8, 8))
    assert network_metadata(md, [rs, conv])["ss_network_alpha"] == "4.0"  # kohya's alpha: 2·√4
    assert network_metadata({"other": "x"}, [lin]) == {"other": "x"}  # no ss_* keys: none added


def test_dynamic_method_is_an_alias_of_the_rule(fixtures_dir, tmp_path, capsys):
    src = fixtures_dir / "kohya_sd.safetensors"
    for method, flag, value in (("sv_fro", "--sv-fro", "0.9"), ("sv_ratio", "--sv-ratio", "2"),
                                ("sv_cumulative", "--sv-cumulative", "0.7")):
        a = _resize_cli(capsys, src, "-o", tmp_path / f"a_{method}.safetensors", "--dynamic-method", method,
                        "--dynamic-param", value)
        b = _resize_cli(capsys, src, "-o", tmp_path / f"b_{method}.safetensors", flag, value)
        assert a["rule"] == b["rule"] == f"{flag[2:]} {float(value):g}"
        assert [m["new_rank"] for m in a["modules"]] == [m["new_rank"] for m in b["modules"]]
    for args, msg in ((["--dynamic-method", "sv_fro"], "--dynamic-method and --dynamic-param go together"),
                      (["--dynamic-method", "sv_fro", "--dynamic-param", "0.9", "--rank", "2"],
                       "give one rank rule, found --rank, --sv-fro"),
                      (["--dynamic-method", "sv_ratio", "--dynamic-param", "2", "--sv-ratio", "3"], "disagree")):
        with pytest.raises(SystemExit) as e:
            main(["resize", str(src), "-o", str(tmp_path / "bad.safetensors"), *args])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and msg in err, err
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("precision,dtype", [("fp32", "F32"), ("bf16", "BF16"), ("keep", "F16")])
def test_save_precision_sets_every_tensor_dtype(fixtures_dir, tmp_path, capsys, precision, dtype):
    src = fixtures_dir / "kohya_sd.safetensors"
    out = tmp_path / "out.safetensors"
    # rank 4: the rank-8 module is resized, the others (rank ≤ 4) are left whole, and cast
    report = _resize_cli(capsys, src, "-o", out, "--rank", "4", "--save-precision", precision)
    assert report["save_precision"] == precision
    assert {m["status"] for m in report["modules"]} == {"resized", "unchanged", "kept"}
    a, b = SafetensorsFile(src), SafetensorsFile(out)
    assert a.keys() == b.keys() and {b.info(k).dtype for k in b.keys()} == {dtype}  # alphas included
    before, after = load_adapter(src), load_adapter(out)
    for name, m in before.modules.items():
        n = after.modules[name]
        if m.rank <= 4:  # unchanged: the same values, cast (fp16 values are exact in fp32; bf16 rounds)
            assert n.alpha == m.alpha
            tol = 0 if precision != "bf16" else 1e-2
            assert rel(n.delta(torch.float64), m.delta(torch.float64)) <= tol, name
            if precision == "keep":
                assert all(a.read_bytes(k) == b.read_bytes(k) for k in m.source_keys.values())


def test_resize_table_fits_80_columns(fixtures_dir, tmp_path):
    import io

    from rich.console import Console

    from loratool.cli.resize import render

    report = resize_path(fixtures_dir / "kohya_sd.safetensors", tmp_path / "o.safetensors", RankRule(rank=2))
    con = Console(width=80, file=io.StringIO(), color_system=None, record=True)
    render(report, con)
    text = con.export_text()
    assert all(len(line) <= 80 for line in text.splitlines()) and "…" not in text
    assert "4 → 2" in text and f"{report.modules[0].energy_kept:.4%}" in text
