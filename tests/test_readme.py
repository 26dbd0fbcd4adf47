"""The README's Python section runs as it is: every ```python block of it, in a folder holding
`my-adapter`, `other-adapter`, `base-model` and `sd-style.safetensors` (fixtures), with its own registry home."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_section_runs(fixtures_dir, tmp_path, monkeypatch, capsys):
    section = README.read_text(encoding="utf-8").split("## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "the README's Python section has no example"
    shutil.copytree(fixtures_dir / "llama_r8", tmp_path / "my-adapter")
    shutil.copytree(fixtures_dir / "llama_rslora_patterns", tmp_path / "other-adapter")
    shutil.copytree(fixtures_dir / "base_llama", tmp_path / "base-model")
    shutil.copy(fixtures_dir / "kohya_sd.safetensors", tmp_path / "sd-style.safetensors")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LORATOOL_HOME", str(tmp_path / "home"))
    for code in blocks:
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj lora linear 8 2.0" in out and "mine@1" in out
    for made in ("copy", "smaller", "composed", "ties", "sd-style-peft", "merged", "unmerged"):
        assert os.path.exists(made), made
    assert (tmp_path / "my-adapter" / "loratool.json").exists()
