"""The model card of a merged checkpoint: the Hub's lineage keys (``base_model``,
``base_model_relation: merge``) when the base has a repo id, the base card's license carried
over, every adapter with its weight, no absolute paths; an unmerge drops the card."""

from __future__ import annotations

import json
import shutil

from loratool.merge import merge, unmerge
from loratool.modelcard import front_matter, merge_card, repo_id


def _base_with_card(fixtures_dir, tmp_path, name_or_path=None, card=None):
    base = tmp_path / "base"
    shutil.copytree(fixtures_dir / "base_llama", base)
    if name_or_path is not None:
        cfg = json.loads((base / "config.json").read_text())
        cfg["_name_or_path"] = name_or_path
        (base / "config.json").write_text(json.dumps(cfg))
    if card is not None:
        (base / "README.md").write_text(card)
    return base


def test_merged_output_has_its_own_card(fixtures_dir, tmp_path):
    base_card = "---\nlicense: apache-2.0\nlanguage:\n- en\npipeline_tag: text-generation\n---\n# The base\n"
    base = _base_with_card(fixtures_dir, tmp_path, "TinyOrg/tiny-llama", base_card)
    out = tmp_path / "merged"
    merge(base, f"{fixtures_dir / 'llama_r8'}:0.7,{fixtures_dir / 'llama_rslora_patterns'}:0.3", out, device="cpu")
    text = (out / "README.md").read_text()
    head = text.split("---")[1]
    assert "base_model:\n- TinyOrg/tiny-llama\nbase_model_relation: merge\n" in head
    assert "license: apache-2.0" in head and "pipeline_tag: text-generation" in head
    assert "# The base" not in text  # the base's card describes another model
    assert "| `llama_r8` | 0.7 |" in text and "| `llama_rslora_patterns` | 0.3 |" in text
    assert str(fixtures_dir) not in text and str(tmp_path) not in text  # no absolute paths

    back = tmp_path / "unmerged"
    unmerge(out, f"{fixtures_dir / 'llama_r8'}:0.7,{fixtures_dir / 'llama_rslora_patterns'}:0.3", back, device="cpu")
    assert not (back / "README.md").exists()


def test_a_local_base_gets_no_base_model_key(fixtures_dir, tmp_path):
    base = _base_with_card(fixtures_dir, tmp_path, "/home/me/models/llama")
    out = tmp_path / "merged"
    merge(base, str(fixtures_dir / "llama_r8"), out, device="cpu")
    head = (out / "README.md").read_text().split("---")[1]
    assert "base_model" not in head and "tags:\n- lora\n- merge\n- loratool" in head


def test_card_helpers():
    assert repo_id("hf://org/name@main") == "org/name" and repo_id("org/name") == "org/name"
    assert repo_id("/abs/path") is None and repo_id("name") is None and repo_id("a/../b") is None
    assert front_matter("---\nlicense: mit\nfoo: bar\n---\nlicense: gpl\n") == {"license": "mit"}
    assert front_matter("# no front matter\nlicense: mit\n") == {}
    card = merge_card("org/base", [("hf://org/ad", 1.0, "org/base")], None, "9.9")
    assert card.startswith("---\nbase_model:\n- org/base\nbase_model_relation: merge\n")
    assert "| `hf://org/ad` | 1 | `org/base` |" in card and "loratool 9.9" in card
