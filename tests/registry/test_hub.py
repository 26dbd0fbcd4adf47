"""The Hub as remote, offline: pulls from a local Hugging Face cache layout (HF_HUB_OFFLINE=1,
set by tests/conftest.py), pushes against a fake API that records its calls."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub.utils import filter_repo_objects
from tinybase import base_tensors, save_base

from loratool.errors import InputError, UsageError
from loratool.formats import load_adapter
from loratool.manifest import record_manifest
from loratool.registry.hub import ADAPTER_PATTERNS, download_adapter, pull, push
from loratool.resolve import resolve_adapter_ref
from loratool.registry.store import CorruptBlobError
from loratool.schemas.manifest import Manifest

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TAGGED = "fedcba9876543210fedcba9876543210fedcba98"


def fake_cache(cache: Path, repo_id: str, files: dict[str, Path | bytes], commit: str = COMMIT,
               refs: dict[str, str] | None = None) -> Path:
    """The layout huggingface_hub reads offline: models--owner--name/{refs/<ref>, snapshots/<commit>/…}."""
    root = cache / ("models--" + repo_id.replace("/", "--"))
    snap = root / "snapshots" / commit
    for name, content in files.items():
        dest = snap / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Path):
            shutil.copyfile(content, dest)
        else:
            dest.write_bytes(content)
    (root / "refs").mkdir(parents=True, exist_ok=True)
    for ref, sha in (refs or {"main": commit}).items():
        (root / "refs" / ref).write_text(sha)
    return snap


@pytest.fixture
def hub_cache(tmp_path, make_adapter):
    src = make_adapter("hub-src", seed=7)
    cache = tmp_path / "hf-cache"
    snap = fake_cache(cache, "owner/sql-lora", {
        "adapter_config.json": src / "adapter_config.json",
        "adapter_model.safetensors": src / "adapter_model.safetensors",
        "README.md": b"# not an adapter file\n",
        "model.safetensors": b"a full model, never read",
    }, refs={"main": COMMIT, "v1": COMMIT})
    return cache, snap, src


def test_adapter_patterns_select_adapter_files_only():
    repo = ["adapter_config.json", "adapter_model.safetensors", "loratool.json", "README.md", "model.safetensors",
            "model-00001-of-00002.safetensors", "config.json", "tokenizer.json", "unet/adapter_config.json",
            "unet/adapter_model.safetensors", "unet/diffusion_pytorch_model.safetensors",
            "pytorch_lora_weights.safetensors", "training_args.bin"]
    assert sorted(filter_repo_objects(repo, allow_patterns=ADAPTER_PATTERNS)) == [
        "adapter_config.json", "adapter_model.safetensors", "loratool.json", "pytorch_lora_weights.safetensors",
        "unet/adapter_config.json", "unet/adapter_model.safetensors"]


@pytest.mark.parametrize("revision", [None, "main", "v1", COMMIT])
def test_download_from_the_cache(hub_cache, revision):
    cache, snap, src = hub_cache
    path = download_adapter("owner/sql-lora", revision, cache_dir=cache)
    assert path == snap
    assert len(load_adapter(path).modules) == 4


def test_download_passes_patterns_to_the_api(hub_cache):
    cache, snap, _ = hub_cache

    class Api:
        calls = []

        def snapshot_download(self, **kwargs):
            self.calls.append(kwargs)
            return str(snap)

    api = Api()
    assert download_adapter("owner/sql-lora", "v1", api=api) == snap
    assert api.calls == [{"repo_id": "owner/sql-lora", "revision": "v1", "allow_patterns": ADAPTER_PATTERNS}]


def test_hf_reference_resolves_into_the_cache(hub_cache):
    cache, snap, _ = hub_cache
    assert resolve_adapter_ref("hf://owner/sql-lora@v1", cache_dir=cache) == snap
    # a caller that went through Path() has lost one '/'
    assert resolve_adapter_ref(Path("hf://owner/sql-lora@v1"), cache_dir=cache) == snap


def test_missing_repo_or_revision(hub_cache):
    cache, _, _ = hub_cache
    with pytest.raises(InputError, match=r"hf://owner/nothing: cannot download the adapter: .*"):
        download_adapter("owner/nothing", cache_dir=cache)
    with pytest.raises(InputError, match=r"hf://owner/sql-lora@dev: cannot download"):
        resolve_adapter_ref("hf://owner/sql-lora@dev", cache_dir=cache)


def test_single_file_repo(tmp_path):
    import torch
    from safetensors.torch import save_file

    t = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.randn(4, 16),
         "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.randn(16, 4)}
    save_file(t, str(tmp_path / "style.safetensors"))
    cache = tmp_path / "hf-cache"
    snap = fake_cache(cache, "owner/style", {"style.safetensors": tmp_path / "style.safetensors", "README.md": b"x"})
    path = download_adapter("owner/style", cache_dir=cache)
    assert path == snap / "style.safetensors" and load_adapter(path).format == "kohya"
    fake_cache(cache, "owner/two", {"a.safetensors": b"x", "b.safetensors": b"y"})
    with pytest.raises(InputError, match="no adapter in this repo: no adapter_config.json, and 2 top-level"):
        download_adapter("owner/two", cache_dir=cache)


def test_pull_adds_with_hub_source(hub_cache, home, blobs):
    cache, snap, src = hub_cache
    r = pull("hf://owner/sql-lora@v1", tags=["prod"], home=home, cache_dir=cache)
    assert (r.name, r.version, r.tags) == ("sql-lora", 1, ["prod"])
    from loratool.registry.core import Registry

    with Registry(home) as reg:
        e = reg.entries().adapters[0]
        assert (e.source.kind, e.source.location, e.source.revision) == ("hub", "owner/sql-lora", COMMIT)
        assert [f.path for f in reg.tree(r.digest).files] == ["adapter_config.json", "adapter_model.safetensors"]
    assert len(blobs()) == 3  # README.md and model.safetensors were not stored
    again = pull("hf://owner/sql-lora", name="sql", home=home, cache_dir=cache)
    assert again.digest == r.digest and again.new_bytes == 0


def test_pull_needs_a_hub_reference(home):
    with pytest.raises(UsageError, match="hf://owner/repo"):
        pull("owner/repo", home=home)


class FakeApi:
    """Records create_repo and create_commit like HfApi would receive them."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        ops = {}
        for op in operations:
            src = op.path_or_fileobj
            ops[op.path_in_repo] = Path(src).read_bytes() if isinstance(src, str) else src
        self.calls.append(("create_commit", {"repo_id": repo_id, "operations": ops, **kwargs}))

        class Info:
            oid = "c0ffee" * 6 + "c0ff"
            commit_url = f"https://huggingface.co/{repo_id}/commit/{oid}"

        return Info()


def card_metadata(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_push_uploads_files_manifest_and_card(tmp_path, make_adapter, home):
    from loratool.registry.core import Registry

    base = save_base(tmp_path / "base", base_tensors())
    src = make_adapter("a", base_model="/local/path/to/llama")  # the config names a path
    record_manifest(src, base)  # the manifest knows the base: tiny-org/tiny-llama
    with Registry(home) as reg:
        added = reg.add(src, "sql", tags=["prod"])
    api = FakeApi()
    r = push("sql:prod", "me/sql-lora", home=home, api=api)
    assert [c[0] for c in api.calls] == ["create_repo", "create_commit"]
    assert api.calls[0][1]["exist_ok"] is True
    commit = api.calls[1][1]
    assert commit["repo_id"] == "me/sql-lora" and "sql@1" in commit["commit_message"]
    ops = commit["operations"]
    assert sorted(ops) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "loratool.json"]
    for name in ("adapter_config.json", "adapter_model.safetensors", "loratool.json"):
        assert ops[name] == (src / name).read_bytes()
    meta = card_metadata(ops["README.md"].decode())
    assert meta["base_model"] == "tiny-org/tiny-llama" and meta["base_model_relation"] == "adapter"
    assert meta["library_name"] == "peft"
    assert added.digest in ops["README.md"].decode()
    assert r.ref == "sql@1" and r.commit and r.url.endswith(r.commit)


def test_push_without_manifest_generates_one(make_adapter, home):
    from loratool.registry.core import Registry

    with Registry(home) as reg:
        reg.add(make_adapter("a"), "sql")  # config: base_model_name_or_path tiny-org/tiny-llama
    api = FakeApi()
    push("sql", "me/sql-lora", home=home, api=api)
    ops = api.calls[1][1]["operations"]
    manifest = Manifest.model_validate_json(ops["loratool.json"])
    assert manifest.adapter.format == "peft" and manifest.base is None
    assert card_metadata(ops["README.md"].decode())["base_model"] == "tiny-org/tiny-llama"


def test_push_needs_a_hub_base(make_adapter, home):
    from loratool.registry.core import Registry

    with Registry(home) as reg:
        reg.add(make_adapter("a", base_model="./my-llama"), "sql")
    api = FakeApi()
    with pytest.raises(UsageError, match="pass --base-model owner/name"):
        push("sql", "me/sql-lora", home=home, api=api)
    assert api.calls == []
    push("sql", "me/sql-lora", home=home, api=api, base_model="meta-llama/Llama-3.2-1B")
    assert card_metadata(api.calls[1][1]["operations"]["README.md"].decode())["base_model"] == "meta-llama/Llama-3.2-1B"
    with pytest.raises(UsageError, match="not a Hub repo id"):
        push("sql", "not a repo", home=home, api=api)


def test_push_refuses_corrupt_blobs(make_adapter, home):
    from loratool.registry.core import Registry

    with Registry(home) as reg:
        added = reg.add(make_adapter("a"), "sql")
        weights = next(f for f in reg.tree(added.digest).files if f.path == "adapter_model.safetensors")
        blob = reg.store.path(weights.sha256)
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-1] ^= 1
    blob.write_bytes(bytes(data))
    api = FakeApi()
    with pytest.raises(CorruptBlobError, match="sql@1: adapter_model.safetensors"):
        push("sql", "me/sql-lora", home=home, api=api)
    assert api.calls == []


def test_cli_pull_offline(hub_cache, home, cli):
    cache, _, _ = hub_cache
    env = {"LORATOOL_HOME": str(home), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    r = cli("registry", "pull", "hf://owner/sql-lora@v1", "--tag", "prod", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("added sql-lora@1")
    r = cli("registry", "list", "--json", env=env)
    entry = json.loads(r.stdout)["adapters"][0]
    assert entry["source"] == {"kind": "hub", "location": "owner/sql-lora", "revision": COMMIT}
    r = cli("registry", "pull", "hf://owner/absent", env=env)
    assert r.returncode == 2 and r.stderr.startswith("loratool: error: hf://owner/absent: cannot download")
    assert len(r.stderr.strip().splitlines()) == 1
