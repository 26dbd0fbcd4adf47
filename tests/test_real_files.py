"""Adapters as other tools write them (issue 13), each made by that tool's own code where it is
installed here (PEFT, transformers), else in the exact layout its source writes, and read as the
tool means it: detection, names, scale, modules_to_save."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from loratool.cli import main
from loratool.errors import FormatError
from loratool.formats import FORMAT_OPTION_COMMANDS, detect_format, load_adapter

# PEFT's own note when it targets GPT-2's Conv1D layers
pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False")

UNET_MODULES = {  # diffusers UNet2DConditionModel names, tiny sizes
    "down_blocks.0.attentions.0.proj_in": nn.Conv2d(8, 8, 1),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": nn.Linear(8, 8, bias=False),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": nn.Linear(8, 8, bias=False),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": nn.Linear(8, 8),
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v": nn.Linear(12, 8, bias=False),
}


def module_tree(leaves: dict[str, nn.Module]) -> nn.Module:
    """A torch model whose named_modules are ``leaves`` (and the paths above them)."""
    root = nn.Module()
    for path, leaf in leaves.items():
        parent = root
        *heads, last = path.split(".")
        for h in heads:
            if not hasattr(parent, h):
                parent.add_module(h, nn.Module())
            parent = getattr(parent, h)
        parent.add_module(last, leaf)
    return root


def run(capsys, *args) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


# -- diffusers -------------------------------------------------------------------------------------

def save_lora_adapter(model: nn.Module, path):
    """What diffusers' ``ModelMixin.save_lora_adapter`` writes (loaders/peft.py): PEFT's
    ``get_peft_model_state_dict`` (no prefix), the adapter's LoraConfig ``to_dict`` (sets as
    lists) as JSON under ``lora_adapter_metadata``, beside ``format: pt``."""
    from peft.utils import get_peft_model_state_dict

    config = model.peft_config["default"].to_dict()
    config = {k: list(v) if isinstance(v, set) else v for k, v in config.items()}
    metadata = {"format": "pt", "lora_adapter_metadata": json.dumps(config, indent=2, sort_keys=True)}
    save_file(get_peft_model_state_dict(model, adapter_name="default"), str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def unet_lora(tmp_path_factory):
    """A UNet LoRA injected by PEFT (as diffusers' ``add_adapter`` does) and saved as diffusers saves it."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = module_tree(UNET_MODULES)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, alpha_pattern={"to_k": 2},
                        target_modules=["proj_in", "to_q", "to_k", "to_out.0", "to_v"])
    model = inject_adapter_in_model(config, model)
    path = save_lora_adapter(model, tmp_path_factory.mktemp("diffusers") / "pytorch_lora_weights.safetensors")
    return path, model


def test_current_diffusers_model_save_is_detected_and_read_with_its_config(unet_lora, capsys):
    from peft.tuners.lora import LoraLayer

    path, model = unet_lora
    assert detect_format(path) == detect_format(path.parent) == "diffusers"
    adapter = load_adapter(path)
    peft_layers = {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}
    assert set(adapter.modules) == set(peft_layers) == set(UNET_MODULES)
    for name, layer in peft_layers.items():
        m = adapter.modules[name]
        assert m.scale == layer.scaling["default"], name  # alpha from the metadata, not alpha = r
        expected = layer.get_delta_weight("default")
        assert torch.allclose(m.delta(torch.float32).reshape(expected.shape), expected, rtol=1e-6, atol=0), name
    code, out, err = run(capsys, "inspect", path, "--json")
    assert code == 0 and json.loads(out)["format"] == "diffusers", err


def test_attention_processor_layout_without_prefix_is_diffusers(tmp_path):
    """diffusers <= 0.18 ``unet.save_attn_procs``: ``LoRAAttnProcessor`` layers named
    ``<attention>.processor.to_q_lora.down/up.weight``, no component prefix, no alpha (scale 1);
    ``to_out_lora`` is the UNet's ``to_out.0``."""
    torch.manual_seed(1)
    attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    tensors = {}
    for proj in ("to_q", "to_k", "to_v", "to_out"):
        tensors[f"{attn}.processor.{proj}_lora.down.weight"] = torch.randn(4, 8)
        tensors[f"{attn}.processor.{proj}_lora.up.weight"] = torch.randn(8, 4)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(path))
    assert detect_format(path) == "diffusers"
    adapter = load_adapter(path)
    assert set(adapter.modules) == {f"{attn}.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0")}
    m = adapter.modules[f"{attn}.to_out.0"]
    up, down = tensors[f"{attn}.processor.to_out_lora.up.weight"], tensors[f"{attn}.processor.to_out_lora.down.weight"]
    assert m.scale == 1.0 and torch.equal(m.delta(torch.float32), up @ down)


def test_unknown_layout_message_is_true_and_advises_what_the_command_has(tmp_path, capsys):
    # PEFT's factor names with no prefix, no config beside them and no metadata: whose is unknown
    path = tmp_path / "bare.safetensors"
    save_file({"layers.0.q.lora_A.weight": torch.ones(2, 4), "layers.0.q.lora_B.weight": torch.ones(4, 2)}, str(path))
    with pytest.raises(FormatError) as e:
        load_adapter(path)
    msg = str(e.value)
    assert "expected PEFT (base_model.model.….lora_A.weight, with adapter_config.json beside it)" in msg
    assert "no LoRA factor names found" not in msg
    assert f"`loratool convert {path} --format NAME --to peft -o DIR`" in msg
    code, _, err = run(capsys, "compose", "--adapters", path, "-o", tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and "every command that takes an adapter takes --format NAME" in err


def test_the_commands_named_as_taking_format_are_those_that_do():
    import click

    from loratool.cli import cli

    ctx = click.Context(cli)
    takes = set()
    for name in cli.list_commands(ctx):
        cmd = cli.get_command(ctx, name)
        subs = [(f"{name} {s}", cmd.get_command(ctx, s)) for s in cmd.list_commands(ctx)] \
            if isinstance(cmd, click.Group) else [(name, cmd)]
        for full, sub in subs:  # a --format that overrides detection (registry export's names an output)
            if any("--format" in p.opts and "detection" in (p.help or "") for p in sub.params):
                takes.add(full)
    assert takes == set(FORMAT_OPTION_COMMANDS)


# -- PEFT task types -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gpt2_seq_cls(tmp_path_factory):
    """A GPT-2 SEQ_CLS adapter made by PEFT (its config as other tools leave it: modules_to_save
    null, which PEFT's PeftModelForSequenceClassification fills with classifier/score on load),
    the base it was made on, and PEFT's own merge."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2ForSequenceClassification

    d = tmp_path_factory.mktemp("seq_cls")
    torch.manual_seed(0)
    config = GPT2Config(n_embd=16, n_layer=2, n_head=2, vocab_size=50, n_positions=16, num_labels=3,
                        pad_token_id=0, bos_token_id=0, eos_token_id=0)
    base = GPT2ForSequenceClassification(config)
    base.save_pretrained(str(d / "base"))
    pm = get_peft_model(base, LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["c_attn"],
                                         init_lora_weights=False))
    with torch.no_grad():  # the trained head, saved whole
        pm.base_model.model.score.modules_to_save["default"].weight.normal_()
    pm.save_pretrained(str(d / "adapter"))
    cfg_path = d / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["modules_to_save"] = None
    cfg_path.write_text(json.dumps(cfg))
    merged = {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}
    return d / "adapter", d / "base", merged


def test_seq_cls_head_is_modules_to_save_as_peft_loads_it(gpt2_seq_cls, capsys):
    adapter_dir, base, _ = gpt2_seq_cls
    adapter = load_adapter(adapter_dir)
    assert set(adapter.modules_to_save) == {"score.weight"} and not adapter.extra_tensors
    code, out, err = run(capsys, "validate", adapter_dir, "--base", base)
    assert code == 0 and "LT110" not in out + err, out + err


def test_seq_cls_adapter_merges_as_peft_does(gpt2_seq_cls, tmp_path, capsys):
    from safetensors.torch import load_file

    adapter_dir, base, expected = gpt2_seq_cls
    code, _, err = run(capsys, "merge", "--adapters", adapter_dir, "--base", base, "-o", tmp_path / "out", "-q")
    assert code == 0, err
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.attn.c_attn.weight", "score.weight"):
        assert torch.equal(got[name], expected[name]), name  # PEFT's merge_and_unload, bit for bit
    assert not torch.equal(got["score.weight"], load_file(str(base / "model.safetensors"))["score.weight"])


@pytest.mark.parametrize("task,head,mts", [("TOKEN_CLS", "classifier.weight", None),
                                           ("SEQ_CLS", "classifier.dense.weight", None),  # RoBERTa's head module
                                           ("QUESTION_ANS", "qa_outputs.weight", None),
                                           ("CAUSAL_LM", "score.weight", ["score"])])
def test_task_heads_are_modules_to_save(tmp_path, task, head, mts):
    """PEFT's task models add their heads (TOKEN_CLS: classifier/score; QUESTION_ANS: qa_outputs)
    to modules_to_save; other tasks save only what the config lists."""
    d = tmp_path / "a"
    d.mkdir()
    save_file({f"base_model.model.{head}": torch.ones(2, 4), "base_model.model.q.lora_A.weight": torch.ones(1, 4),
               "base_model.model.q.lora_B.weight": torch.ones(4, 1)}, str(d / "adapter_model.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": task, "r": 1,
                                                       "lora_alpha": 1, "modules_to_save": mts}))
    assert list(load_adapter(d).modules_to_save) == [head]
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 1,
                                                       "lora_alpha": 1, "modules_to_save": None}))
    assert list(load_adapter(d).extra_tensors) == [head]


def test_compose_takes_format_for_files_detection_cannot_place(tmp_path, capsys):
    """A bare file with diffusers' current key names but no metadata: detection refuses it, and
    ``compose --format diffusers`` reads every input as that format (issue 13)."""
    path = tmp_path / "bare.safetensors"
    torch.manual_seed(0)
    save_file({"layers.0.q.lora_A.weight": torch.randn(2, 4), "layers.0.q.lora_B.weight": torch.randn(4, 2)},
              str(path))
    code, _, err = run(capsys, "compose", "--adapters", f"{path}:0.5,{path}:0.5", "-o", tmp_path / "x")
    assert code == 2 and not (tmp_path / "x").exists()
    code, out, err = run(capsys, "compose", "--adapters", f"{path}:0.5,{path}:0.5", "-o", tmp_path / "out",
                         "--format", "diffusers", "--quiet")
    assert code == 0, err
    composed = load_adapter(tmp_path / "out")
    (m,) = composed.modules.values()
    expected = load_adapter(path, format="diffusers").modules["layers.0.q"].delta(torch.float64)
    assert torch.allclose(m.delta(torch.float64), expected, atol=1e-6)


def bare_llama_file(fixtures_dir, path, n: int):
    """The first ``n`` modules of the llama_r8 fixture as bare lora_A/lora_B keys in one file, with
    no metadata: a layout detection refuses (diffusers' current names without their metadata)."""
    src = load_adapter(fixtures_dir / "llama_r8")
    tensors = {}
    for name, m in list(src.modules.items())[:n]:
        tensors[f"{name}.lora_A.weight"] = m.lora_A.load().float()
        tensors[f"{name}.lora_B.weight"] = m.lora_B.load().float()
    save_file(tensors, str(path))
    return path


def test_merge_parity_unmerge_take_format(fixtures_dir, tmp_path, capsys):
    """merge, parity and unmerge read every adapter as --format says (issue 13): a file of bare
    lora_A/lora_B keys that detection cannot place merges into the base it names, checks out
    within one rounding, and unmerges to within an ulp of the base."""
    path = bare_llama_file(fixtures_dir, tmp_path / "bare.safetensors", 3)
    base = fixtures_dir / "base_llama"
    code, _, err = run(capsys, "merge", "--base", base, "--adapters", path, "-o", tmp_path / "refused", "--quiet")
    assert code == 2 and not (tmp_path / "refused").exists()
    code, _, err = run(capsys, "merge", "--base", base, "--adapters", path, "-o", tmp_path / "m", "--quiet",
                       "--format", "diffusers")
    assert code == 0, err
    code, out, err = run(capsys, "parity", "--base", base, "--merged", tmp_path / "m", "--adapters", path,
                         "--format", "diffusers", "--quiet", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["ok"] and sum(lay["action"] == "merge" for lay in report["layers"]) == 3
    code, out, err = run(capsys, "unmerge", "--merged", tmp_path / "m", "--adapters", path, "-o", tmp_path / "u",
                         "--base", base, "--format", "diffusers", "--quiet", "--json")
    assert code == 0, err
    assert json.loads(out)["max_ulp"] <= 1.0


def test_registry_add_records_format_and_reads_the_reference_so(fixtures_dir, tmp_path, capsys, monkeypatch):
    """``registry add --format`` (issue 13): a file detection cannot place is stored with the
    format given, and every later use of the reference reads it so (merge, inspect), without
    --format; export gives the file back byte for byte, or converted from that format."""
    path = bare_llama_file(fixtures_dir, tmp_path / "bare.safetensors", 2)
    home = tmp_path / "home"
    code, _, err = run(capsys, "registry", "--home", home, "add", path, "--name", "bare")
    assert code == 2 and "--format NAME" in err and err.count("\n") == 1
    code, _, err = run(capsys, "manifest", path)  # manifest takes --format too
    assert code == 2 and "--format NAME" in err
    code, _, err = run(capsys, "manifest", path, "--format", "diffusers", "--base", fixtures_dir / "base_llama")
    assert code == 0, err
    assert json.loads(path.with_name("bare.safetensors.loratool.json").read_text())["base"] is not None
    code, out, err = run(capsys, "registry", "--home", home, "add", path, "--name", "bare", "--format", "diffusers",
                         "--json")
    assert code == 0, err
    assert json.loads(out)["version"] == 1
    monkeypatch.setenv("LORATOOL_HOME", str(home))
    code, out, err = run(capsys, "inspect", "bare", "--json")
    assert code == 0, err
    assert json.loads(out)["format"] == "diffusers" and json.loads(out)["num_modules"] == 2
    base = fixtures_dir / "base_llama"
    code, _, err = run(capsys, "merge", "--base", base, "--adapters", "bare", "-o", tmp_path / "m", "--quiet")
    assert code == 0, err
    code, _, err = run(capsys, "merge", "--base", base, "--adapters", path, "-o", tmp_path / "ref", "--quiet",
                       "--format", "diffusers")
    assert code == 0, err
    shards = sorted((tmp_path / "ref").glob("*.safetensors"))
    assert shards
    for f in shards:
        assert (tmp_path / "m" / f.name).read_bytes() == f.read_bytes()
    code, _, err = run(capsys, "registry", "--home", home, "export", "bare", "-o", tmp_path / "back.safetensors")
    assert code == 0, err
    assert (tmp_path / "back.safetensors").read_bytes() == path.read_bytes()
    code, _, err = run(capsys, "registry", "--home", home, "export", "bare", "-o", tmp_path / "peft", "--format", "peft")
    assert code == 0, err
    peft_out = load_adapter(tmp_path / "peft")
    assert peft_out.format == "peft" and len(peft_out.modules) == 2
    for name, m in load_adapter(path, format="diffusers").modules.items():
        (got,) = [g for n, g in peft_out.modules.items() if n.endswith(name)]
        assert torch.equal(got.delta(torch.float64), m.delta(torch.float64))
