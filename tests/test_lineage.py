"""Every adapter loratool writes carries its manifest (embedded and beside it) with lineage."""

import json
import shutil

import jsonschema

from loratool.compose import compose_paths
from loratool.convert import convert
from loratool.lowrank import RankRule
from loratool.manifest import load_manifest, record_manifest
from loratool.resize import resize_path
from loratool.safetensors_io import SafetensorsFile
from loratool.schemas.export import SCHEMA_DIR


def test_outputs_carry_manifest_and_lineage(fixtures_dir, tmp_path):
    src = tmp_path / "a"
    shutil.copytree(fixtures_dir / "llama_r8", src)
    record_manifest(src, base=fixtures_dir / "base_llama")
    resize_path(src, tmp_path / "r4", RankRule(rank=4))
    compose_paths([(str(tmp_path / "r4"), 0.5), (str(src), 0.5)], tmp_path / "c")
    convert(tmp_path / "c", "peft", tmp_path / "c2")
    schema = json.loads((SCHEMA_DIR / "manifest.schema.json").read_text())
    for out, ops in (("r4", ["created", "resized"]), ("c", ["created", "resized", "composed"]),
                     ("c2", ["created", "resized", "composed", "converted"])):
        beside = json.loads((tmp_path / out / "loratool.json").read_text())
        jsonschema.validate(beside, schema)
        assert [e["operation"] for e in beside["lineage"]] == ops
        embedded = json.loads(SafetensorsFile(tmp_path / out / "adapter_model.safetensors").metadata["loratool.manifest"])
        jsonschema.validate(embedded, schema)
        assert embedded["lineage"] == beside["lineage"]
        assert embedded["adapter"]["tensors_digest"] == beside["adapter"]["tensors_digest"]
        # the base recorded for the input follows it through every operation
        assert load_manifest(tmp_path / out).base == load_manifest(src).base
    composed = json.loads((tmp_path / "c" / "loratool.json").read_text())["lineage"][-1]
    assert composed["params"]["weights"] == [0.5, 0.5] and len(composed["inputs"]) == 2
