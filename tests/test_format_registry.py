"""Formats own format details (issue 12): one registry of formats, typed configs, reader problems
that carry their check id.

* ``loratool.formats.REGISTRY`` is the one list: detection, ``FORMATS`` (the CLI's choices),
  ``convert`` and ``write_adapter`` go through it, so a format added there is detected, read and
  written with no other change.
* ``adapter.config`` is typed by the format; digests of it are those of the config as read.
* ``adapter.problems`` are ``ReadProblem``s: validate reports each under the reader's check id.
* No module outside ``formats/`` branches on a format's name or probes raw config keys.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from loratool import formats
from loratool.adapter import Adapter
from loratool.canonical import canonical_json
from loratool.convert import TARGETS, convert
from loratool.errors import FormatError, UsageError
from loratool.fingerprint import config_digest
from loratool.formats import FORMATS, REGISTRY, get_format, load_adapter, write_adapter
from loratool.formats.base import Format, ReadProblem
from loratool.formats.kohya import KohyaLayout
from loratool.formats.loraconfig import ComponentConfigs, LoraConfig, lora_config
from loratool.validation import validate

LIB = Path(__file__).resolve().parents[1] / "loratool"


def _digest(doc) -> str:
    return hashlib.sha256(canonical_json(doc).encode("utf-8")).hexdigest()


# -- the registry ---------------------------------------------------------------------------------

def test_one_list_of_formats():
    from loratool.cli.render import FORMAT_CHOICE

    assert FORMATS == tuple(f.name for f in REGISTRY) == ("peft", "kohya", "diffusers")
    assert list(FORMAT_CHOICE.choices) == list(FORMATS) and TARGETS == FORMATS
    assert len({f.sniff_order for f in REGISTRY}) == len(REGISTRY)  # one order to try them in
    assert all(f.writes_directory or f.writes_file for f in REGISTRY)
    assert all(get_format(f.name) is f for f in REGISTRY)
    with pytest.raises(UsageError, match="unknown format 'lycoris'; choose one of: peft, kohya, diffusers$"):
        get_format("lycoris")


def test_a_format_added_to_the_registry_is_detected_read_and_written(monkeypatch, tmp_path):
    """A format is one ``Format`` in the registry: detection, reading and writing need nothing else."""
    def read(path):
        return Adapter(format="toy", modules={}, path=Path(path), config=None)

    def write(adapter, out, overwrite=False):
        out.mkdir()
        (out / "toy.json").write_text("{}")
        return out

    toy = Format(name="toy", title="Toy", read=read, write=write, sniff_keys=lambda keys: False, sniff_order=9,
                 key_example="toy.…", writes_directory=True, writes_file=False, marker="toy.json")
    monkeypatch.setattr(formats, "REGISTRY", (*REGISTRY, toy))
    src = tmp_path / "src"
    src.mkdir()
    (src / "toy.json").write_text("{}")
    assert formats.detect_format(src) == "toy"
    adapter = load_adapter(src)
    assert adapter.format == "toy"
    assert (write_adapter(adapter, tmp_path / "out", "toy") / "toy.json").exists()


def test_unknown_layout_names_every_format(tmp_path):
    path = tmp_path / "x.safetensors"
    save_file({"something.weight": torch.ones(2)}, str(path))
    with pytest.raises(FormatError) as e:
        load_adapter(path)
    msg = str(e.value)
    assert ("expected PEFT (base_model.model.….lora_A.weight, with adapter_config.json beside it); kohya "
            "(lora_unet_….lora_down.weight); or diffusers (unet.….lora_A.weight") in msg
    assert "takes --format NAME" in msg and f"loratool convert {path} --format NAME" in msg


# -- typed configs ----------------------------------------------------------------------------------

def test_peft_config_is_typed_and_keeps_every_field(fixtures_dir, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(fixtures_dir / "llama_rslora_patterns", src)
    raw = json.loads((src / "adapter_config.json").read_text())
    raw["zzz_unknown_field"] = {"nested": [1, 2.5, "x"]}  # a field loratool does not know
    (src / "adapter_config.json").write_text(json.dumps(raw))
    a = load_adapter(src)
    cfg = lora_config(a)
    assert isinstance(cfg, LoraConfig) and cfg.file == src / "adapter_config.json"
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora) == (raw["r"], raw["lora_alpha"], raw["use_rslora"])
    assert cfg.rank_pattern == raw["rank_pattern"] and cfg.alpha_pattern == raw.get("alpha_pattern", {})
    assert config_digest(a.config) == config_digest(raw)  # the digest of the file, as stored ones were
    out = write_adapter(a, tmp_path / "out", "peft")
    assert json.loads((out / "adapter_config.json").read_text())["zzz_unknown_field"] == raw["zzz_unknown_field"]


def test_component_and_kohya_configs_digest_as_before(fixtures_dir, tmp_path):
    kohya_file = fixtures_dir / "kohya_sdxl.safetensors"
    k = load_adapter(kohya_file)
    assert isinstance(k.config, KohyaLayout) and k.config.sgm_unet and lora_config(k) is None
    assert config_digest(k.config) == _digest({"kohya_layout": k.config.as_json()})
    assert KohyaLayout.from_json(k.config.as_json()) == k.config
    assert KohyaLayout.from_json({"te_prefix": 5, "no_alpha": "some", "alpha_shape": ["1"]}) == KohyaLayout()

    convert(kohya_file, "peft", tmp_path / "multi")  # one PEFT directory per component
    m = load_adapter(tmp_path / "multi")
    assert isinstance(m.config, ComponentConfigs) and lora_config(m) is None
    raw = {c: json.loads((tmp_path / "multi" / c / "adapter_config.json").read_text()) for c in m.components}
    assert set(m.config.components) == set(raw)
    raw["unet"]["peft_version"] = "0.17.0"  # left out of every component's config
    m.config.components["unet"].fields["peft_version"] = "0.17.0"
    assert config_digest(m.config) == _digest(
        {"components": {c: {f: v for f, v in cfg.items() if f != "peft_version"} for c, cfg in raw.items()}})

    assert load_adapter(fixtures_dir / "diffusers_old.safetensors").config is None  # no metadata, no config


# -- reader problems carry their check id --------------------------------------------------------

N = "lora_unet_down_blocks_0_attentions_0_proj_in"
KOHYA = {f"{N}.lora_down.weight": torch.ones(4, 8), f"{N}.lora_up.weight": torch.ones(8, 4), f"{N}.alpha": torch.tensor(1.0)}
DIFFUSERS = {"unet.a.lora_A.weight": torch.ones(4, 8), "unet.a.lora_B.weight": torch.ones(8, 4)}


@pytest.mark.parametrize("tensors,check,module", [
    # a LyCORIS LoHa missing three of its four factors (issue 15: the kind is read, its gap named)
    ({**KOHYA, "lora_unet_mid_block_attentions_0_proj_out.hada_w1_a": torch.ones(8, 2)}, "LT102",
     "lora_unet_mid_block_attentions_0_proj_out"),
    ({**KOHYA, f"{N}.alpha": torch.ones(2)}, "LT206", N),
    ({f"{N}.lora_down.weight": torch.ones(4, 8), f"{N}.alpha": torch.tensor(1.0)}, "LT102", N),
    ({**KOHYA, f"{N}.lora_up.weight": torch.ones(8, 3)}, "LT101", N),
    ({**KOHYA, f"{N}.lora_up.weight": torch.ones(8, 4, 3, 3)}, "LT106", N),
    ({**DIFFUSERS, "unet.zzz": torch.ones(1)}, "LT106", None),
    ({"unet.a.lora_A.weight": torch.ones(4, 8)}, "LT102", "unet.a"),
    ({**DIFFUSERS, "b.lora_A.weight": torch.ones(4, 8), "b.lora_B.weight": torch.ones(8, 4)}, "LT106", "b"),
], ids=["kohya-loha", "kohya-alpha-shape", "kohya-missing", "kohya-rank", "kohya-dims", "diffusers-unknown",
        "diffusers-missing", "diffusers-no-component"])
def test_reader_problems_carry_their_check(tmp_path, tensors, check, module):
    path = tmp_path / "lora.safetensors"
    save_file(tensors, str(path))
    problems = load_adapter(path, tolerant=True).problems
    assert [(p.check, p.module) for p in problems] == [(check, module)]
    assert isinstance(problems[0], ReadProblem) and str(path) in problems[0].message
    findings = [f for f in validate(path).findings if f.severity.value == "error"]
    assert [(f.id, f.module, f.message) for f in findings] == [(check, module, problems[0].message)]
    with pytest.raises(FormatError) as e:
        load_adapter(path)
    assert str(e.value) == problems[0].message  # one line, the reader's own


@pytest.mark.parametrize("case,check,module", [("missing_B", "LT102", "model.layers.0.mlp.down_proj"),
                                               ("rank_mismatch", "LT101", None)])
def test_peft_reader_problems(fixtures_dir, case, check, module):
    problems = load_adapter(fixtures_dir / "broken" / case, tolerant=True).problems
    assert problems and all(p.check == check for p in problems)
    assert module is None or problems[0].module == module
    assert all(p.module and f"module {p.module!r}" in p.message for p in problems)


# -- no format details outside formats/ -----------------------------------------------------------

# compose.py still names the format it writes a mix of formats in ("peft"); its owner is to use
# loratool.formats.COMMON_FORMAT instead.
LITERALS_ALLOWED: set[str] = set()
PROBES = re.compile(r"\.format\s*[!=]=|(?<!ckpt)(?<!base)\.config(\.get\(|\[)|\"components\" in")


def test_no_format_branches_or_raw_config_keys_outside_formats():
    found = []
    for path in sorted(LIB.rglob("*.py")):
        rel = path.relative_to(LIB).as_posix()
        if rel.startswith("formats/"):
            continue
        text = path.read_text(encoding="utf-8")
        found += [f"{rel}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1) if PROBES.search(line)]
        if rel not in LITERALS_ALLOWED:
            found += [f"{rel}:{n.lineno}: {n.value!r}" for n in ast.walk(ast.parse(text))
                      if isinstance(n, ast.Constant) and n.value in FORMATS]
    assert not found, found
