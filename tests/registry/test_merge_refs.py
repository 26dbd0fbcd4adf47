"""Registry references in the commands that take adapters: merge by name, by tag (following a
rollback), and `list --fits` showing only the adapters pinned to that base."""

import json
import shutil

from safetensors.torch import load_file

from loratool.manifest import record_manifest


def _same_tensors(a, b) -> bool:
    ta = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    tb = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    return ta.keys() == tb.keys() and all(ta[k].equal(tb[k]) for k in ta)


def test_merge_by_name_and_tag(cli, fixtures_dir, tmp_path, monkeypatch):
    from loratool.merge import merge

    env = {"LORATOOL_HOME": str(tmp_path / "home")}
    monkeypatch.setenv("LORATOOL_HOME", env["LORATOOL_HOME"])  # the in-process merges below
    base = fixtures_dir / "base_llama"
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    shutil.copytree(fixtures_dir / "llama_r8", v1)
    shutil.copytree(fixtures_dir / "llama_rslora_patterns", v2)
    record_manifest(v1, base=base)
    record_manifest(v2, base=base)
    other = tmp_path / "other"  # pinned to another base: --fits must leave it out
    shutil.copytree(fixtures_dir / "gpt2_conv1d", other)
    record_manifest(other, base=fixtures_dir / "base_gpt2")
    for path, name in ((v1, "chat"), (v2, "chat"), (other, "gpt")):
        p = cli("registry", "add", path, "--name", name, env=env)
        assert p.returncode == 0, p.stderr
    assert cli("registry", "tag", "chat@2", "prod", env=env).returncode == 0

    # by name (latest = v2) with a weight, against the same merge from the path
    p = cli("merge", "--base", base, "--adapters", "chat:0.5", "-o", tmp_path / "by_name", "--quiet", env=env)
    assert p.returncode == 0, p.stderr
    merge(base, f"{v2}:0.5", tmp_path / "by_path", device="cpu")  # the library, in process: the same merge
    assert _same_tensors(tmp_path / "by_name", tmp_path / "by_path")

    # by tag; moving the tag back to version 1 is the rollback, and the merge follows it
    cli("merge", "--base", base, "--adapters", "chat:prod", "-o", tmp_path / "prod2", "--quiet", env=env)
    assert cli("registry", "tag", "chat@1", "prod", env=env).returncode == 0
    merge(base, "chat:prod", tmp_path / "prod1", device="cpu")
    merge(base, str(v1), tmp_path / "v1_merged", device="cpu")
    assert _same_tensors(tmp_path / "prod1", tmp_path / "v1_merged")
    assert not _same_tensors(tmp_path / "prod1", tmp_path / "prod2")

    p = cli("registry", "list", "--fits", base, "--json", env=env)
    assert p.returncode == 0, p.stderr
    listed = json.loads(p.stdout)
    rows = listed if isinstance(listed, list) else listed.get("adapters", listed.get("entries"))
    names = {(r["name"], r["version"]) for r in rows}
    assert names == {("chat", 1), ("chat", 2)}
