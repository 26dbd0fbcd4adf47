"""loratool.manifest: building, writing and loading manifests; check_base enforcement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
from tinybase import FakeHubApi, base_tensors, save_adapter, save_base

from loratool.errors import EXIT_BASE_MISMATCH, EXIT_FINDINGS, BaseMismatchError, FormatError, InputError, MisfitError
from loratool.fingerprint import HashCache, config_digest, fingerprint_base
from loratool.formats import load_adapter
from loratool.formats import peft as peft_format
from loratool.manifest import (
    METADATA_KEY,
    build_manifest,
    check_base,
    lineage_entry,
    load_manifest,
    manifest_metadata,
    manifest_path,
    record_manifest,
    write_manifest,
)
from loratool.schemas.export import SCHEMA_DIR
from loratool.schemas.manifest import Manifest

ROOT = Path(__file__).resolve().parents[1]


def assert_valid(manifest: Manifest) -> None:
    schema = json.loads((SCHEMA_DIR / "manifest.schema.json").read_text())
    jsonschema.validate(json.loads(manifest.model_dump_json()), schema)


@pytest.fixture
def setup(tmp_path):
    """A base, an adapter for it, and a manifest recording that base."""
    base = save_base(tmp_path / "base", base_tensors(), shards=2)
    adapter = save_adapter(tmp_path / "adapter")
    cache = HashCache(tmp_path / "home")
    manifest, path = record_manifest(adapter, base=base, cache=cache)
    return base, adapter, cache, manifest, path


# -- building and storing --------------------------------------------------------------------------

def test_record_manifest_writes_loratool_json(setup):
    base, adapter, cache, manifest, path = setup
    assert path == adapter / "loratool.json"
    assert load_manifest(adapter) == manifest
    assert_valid(manifest)
    a = manifest.adapter
    assert a.format == "peft" and a.num_modules == 4
    assert (a.rank.distinct, a.alpha.distinct, a.targets) == ([4], [8], ["q_proj", "v_proj"])
    assert [f.path for f in a.files] == ["adapter_config.json", "adapter_model.safetensors"]
    assert a.config_digest == config_digest(json.loads((adapter / "adapter_config.json").read_text()))
    assert a.base_model == "tiny-org/tiny-llama"
    assert manifest.base == fingerprint_base(base, cache=cache)
    (entry,) = manifest.lineage
    assert entry.operation == "created" and entry.inputs[0].kind == "base"
    assert entry.inputs[0].digest == manifest.base.content
    # no temporary files left beside it
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "loratool.json"]


def test_rerecording_keeps_lineage(setup, tmp_path):
    base, adapter, cache, manifest, _ = setup
    again, _ = record_manifest(adapter, cache=cache)  # no --base: keeps the recorded one
    assert again.lineage == manifest.lineage and again.base == manifest.base


def test_manifest_paths(tmp_path):
    d = save_adapter(tmp_path / "a")
    assert manifest_path(d) == d / "loratool.json"
    assert manifest_path(d / "adapter_model.safetensors") == d / "loratool.json"
    single = tmp_path / "style.safetensors"
    single.write_bytes(b"")
    assert manifest_path(single) == tmp_path / "style.safetensors.loratool.json"


def test_single_file_adapter_sidecar(tmp_path):
    import torch
    from safetensors.torch import save_file

    k = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    f = tmp_path / "style.safetensors"
    save_file({k + ".lora_down.weight": torch.ones(4, 16), k + ".lora_up.weight": torch.ones(16, 4),
               k + ".alpha": torch.tensor(4.0)}, str(f))
    manifest, path = record_manifest(f)
    assert path == tmp_path / "style.safetensors.loratool.json"
    assert manifest.adapter.format == "kohya" and [d.path for d in manifest.adapter.files] == ["style.safetensors"]
    assert manifest.base is None and load_manifest(f) == manifest
    assert_valid(manifest)


def test_embedded_manifest_roundtrip(tmp_path):
    src = save_adapter(tmp_path / "src")
    adapter = load_adapter(src)
    entry = lineage_entry("converted", inputs=[adapter], params={"to": "peft", "targets": {"v", "q"}}, time="2024-01-01T00:00:00Z")
    manifest = build_manifest(adapter, lineage=[entry], files=False)
    assert manifest.adapter.files == []
    out = peft_format.write(adapter, tmp_path / "out", metadata=manifest_metadata(manifest))
    loaded = load_manifest(out)
    assert loaded == manifest
    assert loaded.lineage[0].params == {"targets": ["q", "v"], "to": "peft"}
    assert_valid(loaded)
    # the tensors digest survives the metadata it is embedded in
    assert build_manifest(out).adapter.tensors_digest == manifest.adapter.tensors_digest
    assert METADATA_KEY in load_adapter(out).metadata


def test_no_manifest_is_none(tmp_path):
    assert load_manifest(save_adapter(tmp_path / "a")) is None


@pytest.mark.parametrize("text,match", [
    ("{not json", "invalid JSON"),
    ('{"kind": "loratool.manifest", "schema_version": 1}', "adapter: Field required"),
    ('{"kind": "loratool.manifest", "schema_version": 99, "adapter": {}}', "schema version 99 is newer"),
    ('{"a": ' + "[" * 5000 + "]" * 5000 + "}", "nested"),  # bounded like every JSON read
    ('{"schema_version": 1' + "0" * 5000 + "}", "digits"),
    ('{"adapter": "\\ud800"}', "surrogate"),
])
def test_bad_manifest_is_a_format_error(tmp_path, text, match):
    d = save_adapter(tmp_path / "a")
    (d / "loratool.json").write_text(text)
    with pytest.raises(FormatError, match=match) as e:
        load_manifest(d)
    assert str(d / "loratool.json") in str(e.value)


def test_sidecar_that_is_not_a_regular_file_is_refused(tmp_path):
    """A FIFO named loratool.json is refused at once (never opened for a blocking read), and is
    not mistaken for "no manifest" either, which would skip the base check."""
    d = save_adapter(tmp_path / "a")
    os.mkfifo(d / "loratool.json")
    with pytest.raises(InputError, match="FIFO"):
        load_manifest(d)


@pytest.mark.parametrize("field,value", [("base_model_name_or_path", ["a"]), ("base_model_name_or_path", 3),
                                         ("revision", {"sha": "x"})])
def test_odd_base_names_in_the_config_are_one_line(tmp_path, field, value):
    d = save_adapter(tmp_path / "a")
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg[field] = value
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=field):  # the PEFT reader refuses it, or the manifest does
        record_manifest(d)
    assert not (d / "loratool.json").exists()
    # whatever a reader lets through, the manifest never hands a non-string to its schema
    adapter = load_adapter(save_adapter(tmp_path / "clean"))
    setattr(adapter, "base_model" if field == "base_model_name_or_path" else "base_revision", value)
    with pytest.raises(FormatError, match=f"{field} is {type(value).__name__}"):
        build_manifest(adapter)


def test_manifest_of_a_reference_is_refused(tmp_path):
    with pytest.raises(InputError, match="writes beside a local adapter only"):
        record_manifest("some-registry-name@2")
    with pytest.raises(InputError, match="writes beside a local adapter only"):
        record_manifest("hf://owner/repo")


def test_manifest_identical_across_hash_seeds(tmp_path):
    """Same adapter, same base: byte-identical manifests whatever PYTHONHASHSEED is; and a config
    whose target_modules was written from a Python set (as PEFT does) has one digest."""
    base = save_base(tmp_path / "base", base_tensors())
    adapter = save_adapter(tmp_path / "adapter")
    script = (
        "import json, sys\n"
        "from loratool.fingerprint import HashCache, config_digest, fingerprint_base\n"
        "from loratool.manifest import build_manifest, lineage_entry\n"
        "targets = list({'q_proj', 'k_proj', 'v_proj', 'o_proj', 'up_proj', 'down_proj', 'gate_proj'})\n"
        "cfg = {'r': 8, 'target_modules': targets, 'modules_to_save': list({'lm_head', 'embed_tokens', 'score'})}\n"
        "fp = fingerprint_base(sys.argv[1], cache=None)\n"
        "entry = lineage_entry('resized', inputs=[sys.argv[2], fp], params={'ranks': {8, 4, 16}, 'rule': 'energy'})\n"
        "m = build_manifest(sys.argv[2], base_fp=fp, lineage=[entry])\n"
        "print(json.dumps({'targets': targets, 'digest': config_digest(cfg), 'manifest': m.model_dump_json()}))\n"
    )
    outs = []
    for seed in ("0", "1", "2", "3"):
        env = dict(os.environ, PYTHONHASHSEED=seed, SOURCE_DATE_EPOCH="1700000000")
        r = subprocess.run([sys.executable, "-c", script, str(base), str(adapter)], capture_output=True,
                           text=True, env=env, cwd=ROOT)
        assert r.returncode == 0, r.stderr
        outs.append(json.loads(r.stdout))
    assert len({tuple(o["targets"]) for o in outs}) > 1  # the seeds do reorder the set
    assert len({o["digest"] for o in outs}) == 1
    assert len({o["manifest"] for o in outs}) == 1
    m = Manifest.model_validate_json(outs[0]["manifest"])
    assert m.lineage[0].time == "2023-11-14T22:13:20Z" and m.lineage[0].params["ranks"] == [4, 8, 16]
    assert_valid(m)


# -- check_base ------------------------------------------------------------------------------------

def test_check_base_match(setup, tmp_path):
    base, adapter, _, manifest, _ = setup
    cache = HashCache(tmp_path / "home")  # the same cache directory, fresh counters
    result = check_base(adapter, base, cache=cache)
    assert (result.status, result.structure, result.content) == ("match", "match", "match")
    assert result.ok and result.mismatch is None and result.warnings == []
    assert result.base.content == manifest.base.content
    assert cache.hits == 2 and cache.misses == 0  # the base was hashed once, by record_manifest


def test_changed_tensor_is_a_content_mismatch_naming_the_file(setup, tmp_path):
    base, adapter, cache, manifest, _ = setup
    t = base_tensors()
    t["model.norm.weight"] = t["model.norm.weight"] * 2
    other = save_base(tmp_path / "other", t, shards=2)
    with pytest.raises(BaseMismatchError) as e:
        check_base(adapter, other, cache=cache)
    msg = str(e.value)
    assert e.value.exit_code == EXIT_BASE_MISMATCH == 3
    changed = next(f.path for f in fingerprint_base(other).files
                   if f.sha256 not in {g.sha256 for g in manifest.base.files})
    assert "same tensor names, shapes and dtypes but different values" in msg
    assert f"{changed} has sha256" in msg and "\n" not in msg
    assert sum(f.path in msg for f in manifest.base.files) == 1  # only the changed shard is named
    assert "--allow-base-mismatch" in msg


def test_allow_mismatch_returns_it_for_lineage(setup, tmp_path):
    base, adapter, cache, manifest, _ = setup
    t = base_tensors()
    t["model.norm.weight"] = t["model.norm.weight"] * 2
    other = save_base(tmp_path / "other", t, shards=2)
    result = check_base(adapter, other, cache=cache, allow_mismatch=True)
    assert (result.status, result.structure, result.content) == ("mismatch", "match", "mismatch")
    assert result.mismatch.startswith("base mismatch: ") and "has sha256" in result.mismatch
    assert "--allow-base-mismatch" not in result.mismatch
    entry = lineage_entry("merged", inputs=[adapter, result.base], base_mismatch=result.mismatch)
    assert entry.base_mismatch == result.mismatch
    assert entry.inputs[1].digest == result.base.content != manifest.base.content


def test_structure_mismatch_names_tensors_and_skips_hashing(setup, tmp_path):
    base, adapter, cache, manifest, _ = setup
    t = base_tensors()
    t["model.layers.1.self_attn.v_proj.weight"] = t["model.layers.1.self_attn.v_proj.weight"][:8]
    other = save_base(tmp_path / "other", t, shards=2)
    cache = HashCache(tmp_path / "home")
    with pytest.raises(MisfitError) as e:
        check_base(adapter, other, cache=cache)
    msg = str(e.value)
    assert "differs from the base the manifest records" in msg and "do not fit" in msg
    assert ("module model.layers.1.self_attn.v_proj: base tensor model.layers.1.self_attn.v_proj.weight has shape "
            "[8, 16], the adapter's linear delta has [16, 16]") in msg
    assert cache.misses == 0 and cache.hits == 0  # structure first: nothing was hashed
    # modules that do not fit: no override helps, so none is offered, and it refuses even with one
    assert "--allow-base-mismatch" not in msg
    with pytest.raises(MisfitError):
        check_base(adapter, other, cache=cache, allow_mismatch=True)


def test_misfit_without_manifest_is_not_a_recorded_base(fixtures_dir):
    """No manifest: a base the modules do not fit is named as such, never as 'not the base
    recorded', and --allow-base-mismatch is not suggested (it cannot make the shapes fit)."""
    with pytest.raises(MisfitError) as e:
        check_base(fixtures_dir / "llama_r8", fixtures_dir / "base_llama_wrong", allow_mismatch=True)
    msg = str(e.value)
    assert "is not a base of" in msg and "recorded" not in msg and "--allow-base-mismatch" not in msg
    assert "[64, 96]" in msg and "[64, 128]" in msg


def test_content_check_can_be_skipped(setup):
    base, adapter, cache, manifest, _ = setup
    result = check_base(manifest, base, content=False, cache=None)
    assert (result.status, result.structure, result.content) == ("match", "match", "skipped")


def test_check_against_hub_base_uses_lfs_oids(setup):
    base, adapter, cache, manifest, _ = setup
    result = check_base(adapter, "hf://tiny-org/tiny-llama", api=FakeHubApi(base))
    assert (result.status, result.structure, result.content) == ("match", "match", "match")
    assert result.base.revision is not None


def test_without_manifest(tmp_path):
    base = save_base(tmp_path / "base", base_tensors())
    adapter = save_adapter(tmp_path / "adapter", base_model="someone/another-model")
    with pytest.raises(BaseMismatchError, match=r"has no loratool manifest.*--require-manifest.*loratool manifest") as e:
        check_base(adapter, base, require_manifest=True)
    assert e.value.exit_code == 3
    result = check_base(adapter, base)
    assert result.status == "unverified" and result.structure == "match"
    assert "no loratool manifest" in result.warnings[0]
    assert "names its base 'someone/another-model'" in result.warnings[1] and "tiny-org/tiny-llama" in result.warnings[1]
    assert result.base.structure == fingerprint_base(base, content=False).structure


def test_without_manifest_same_name_by_last_component(tmp_path):
    base = save_base(tmp_path / "base", base_tensors())
    adapter = save_adapter(tmp_path / "adapter", base_model="/models/Tiny-Llama")
    assert len(check_base(adapter, base).warnings) == 1  # only "no manifest"


def test_without_manifest_shape_misfit_is_a_misfit(tmp_path):
    base = save_base(tmp_path / "base", base_tensors())
    adapter = save_adapter(tmp_path / "adapter", seed=3)
    t = base_tensors()
    del t["model.layers.0.self_attn.q_proj.weight"]
    wrong = save_base(tmp_path / "wrong", t)
    with pytest.raises(MisfitError, match="the base has no tensor model.layers.0.self_attn.q_proj.weight") as e:
        check_base(adapter, wrong)
    assert e.value.exit_code == 1
    assert check_base(adapter, base).status == "unverified"


def test_manifest_without_base(tmp_path):
    base = save_base(tmp_path / "base", base_tensors())
    adapter = save_adapter(tmp_path / "adapter")
    write_manifest(build_manifest(adapter), adapter)
    with pytest.raises(BaseMismatchError, match="without a base fingerprint"):
        check_base(adapter, base, require_manifest=True)
    assert check_base(adapter, base).status == "unverified"


# -- the command -----------------------------------------------------------------------------------

def test_cli_manifest(tmp_path, cli):
    base = save_base(tmp_path / "base", base_tensors())
    adapter = save_adapter(tmp_path / "adapter")
    r = cli("manifest", adapter, "--base", base, env={"LORATOOL_HOME": str(tmp_path / "home")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote {adapter / 'loratool.json'}"
    m = load_manifest(adapter)
    assert m.base.content == fingerprint_base(base).content
    assert_valid(m)


@pytest.mark.parametrize("adapter,base,found", [
    # an SD kohya LoRA is no Llama adapter (issue 13: it was pinned there, exit 0)
    ("kohya_sd.safetensors", "base_llama", "the base has no tensor text_encoder."),
    # the right names, the wrong shapes (intermediate_size 96, not 128)
    ("llama_r8", "base_llama_wrong", "has shape [96, 64]"),
])
def test_cli_manifest_refuses_a_base_the_adapter_does_not_fit(fixtures_dir, tmp_path, cli, adapter, base, found):
    import shutil

    src = tmp_path / adapter
    (shutil.copytree if (fixtures_dir / adapter).is_dir() else shutil.copy)(fixtures_dir / adapter, src)
    r = cli("manifest", src, "--base", fixtures_dir / base, env={"LORATOOL_HOME": str(tmp_path / "home")})
    assert r.returncode == EXIT_FINDINGS and r.stderr.count("\n") == 1, r.stderr
    assert f"{src} does not fit {fixtures_dir / base}" in r.stderr and found in r.stderr
    assert not os.path.lexists(manifest_path(src))  # nothing pinned
    if base == "base_llama_wrong":  # the base it was trained on is accepted
        assert cli("manifest", src, "--base", fixtures_dir / "base_llama",
                   env={"LORATOOL_HOME": str(tmp_path / "home")}).returncode == 0
