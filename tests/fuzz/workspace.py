"""One fuzz case's folder, the fixtures copied into it, and the command lines run on it.

Layout of a case (everything a command may touch is in here; nothing is shared between cases)::

    ROOT/adapter[.safetensors]   the adapter under test (mutated)        input
    ROOT/adapter2[.safetensors]  a good second adapter (compose)          input
    ROOT/base/                   a base checkpoint (validate --base, merge) input
    ROOT/out/                    OUT: the -o path is OUT/result[.safetensors]
    ROOT/out/victim/             a sentinel inside OUT that no output may touch
    ROOT/victim/                 a sentinel next to the inputs (``../victim/x`` from base/)
    ROOT/secret/secret.txt       a file no output may copy (a token that is found by bytes)
    ROOT/scratch/home            $LORATOOL_HOME (scratch: writes allowed)
    ROOT/scratch/tmp             $TMPDIR (scratch)
    ROOT/fakehome                $HOME: nothing may be written there
    ROOT/cwd                     the working directory: nothing may be written there

Paths in the command lines are absolute; reports print them relative to ROOT.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

# Fixture adapters: name -> (base for validate --base / merge, good partner for compose).
# Stable Diffusion adapters get the llama base on purpose: a mismatch must be refused cleanly.
ADAPTERS: dict[str, tuple[str, str]] = {
    "llama_r8": ("base_llama", "llama_r8_bf16"),
    "llama_r8_bf16": ("base_llama", "llama_r8"),
    "llama_rslora_patterns": ("base_llama", "llama_r8"),
    "llama_dora": ("base_llama", "llama_r8"),
    "llama_bias": ("base_llama", "llama_r8"),
    "llama_embed_mts": ("base_llama", "llama_r8"),
    "gpt2_conv1d": ("base_gpt2", "gpt2_conv1d"),
    "kohya_sd.safetensors": ("base_llama", "kohya_sd.safetensors"),
    "kohya_sdxl.safetensors": ("base_llama", "kohya_sd.safetensors"),
    "diffusers_old.safetensors": ("base_llama", "kohya_sd.safetensors"),
    "diffusers_sd": ("base_llama", "kohya_sd.safetensors"),
}
PEFT_ADAPTERS = [n for n in ADAPTERS if not n.endswith(".safetensors") and n != "diffusers_sd"]
LLAMA_ADAPTERS = [n for n in PEFT_ADAPTERS if n.startswith("llama")]
BASES = ["base_llama", "base_gpt2"]

# Every command the harness runs. {A}: adapter, {A2}: second adapter, {B}: base, {O}: output.
COMMANDS: dict[str, list[str]] = {
    "inspect": ["inspect", "{A}"],
    "inspect_json": ["inspect", "--json", "{A}"],
    "validate": ["validate", "{A}"],
    "validate_base": ["validate", "{A}", "--base", "{B}"],
    "convert_kohya": ["convert", "{A}", "--to", "kohya", "-o", "{O}"],
    "convert_peft": ["convert", "{A}", "--to", "peft", "-o", "{O}"],
    "resize": ["resize", "{A}", "--rank", "2", "-o", "{O}"],
    "compose": ["compose", "--adapters", "{A}:0.7,{A2}:0.3", "-o", "{O}"],
    "merge": ["merge", "--base", "{B}", "--adapters", "{A}", "-o", "{O}", "--quiet"],
    "registry_add": ["registry", "add", "{A}", "--name", "fuzz"],
}
ADAPTER_COMMANDS = tuple(COMMANDS)
BASE_COMMANDS = ("validate_base", "merge")
OUTPUT_COMMANDS = ("convert_peft", "resize", "compose", "merge")
NEEDS_BASE = {"validate_base", "merge"}
NEEDS_PARTNER = {"compose"}


class Fixtures:
    """The fixture tree read once into memory: {fixture name: {relative path: bytes}}."""

    def __init__(self, root: Path):
        self.root = root
        self.files: dict[str, dict[str, bytes]] = {}
        for name in list(ADAPTERS) + BASES:
            p = root / name
            if p.is_file():
                self.files[name] = {"": p.read_bytes()}
            else:
                self.files[name] = {str(f.relative_to(p)): f.read_bytes()
                                    for f in sorted(p.rglob("*")) if f.is_file() and f.name != "README.md"}

    def materialize(self, name: str, dest: Path) -> Path:
        files = self.files[name]
        if "" in files:
            dest.write_bytes(files[""])
            return dest
        dest.mkdir()
        for rel, data in files.items():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes(data)
        return dest


@dataclass
class Workspace:
    root: Path
    fixtures: Fixtures
    token: bytes  # the secret's marker: no output may contain it
    adapter: Path | None = None
    adapter_name: str = ""
    adapter2: Path | None = None
    base: Path | None = None
    base_name: str = ""
    out: Path | None = None  # the -o path
    overwrite: bool = False
    protect_home: bool = False  # dest.home: pre-existing files in $LORATOOL_HOME are protected
    protected: list[Path] = field(default_factory=list)  # more paths inside OUT no output may change
    setup: list[list[str]] = field(default_factory=list)  # commands run before the snapshot
    after_setup: list[Callable[[], str]] = field(default_factory=list)  # damage done after them
    skip: str | None = None  # why this case cannot run here (counted SKIPPED)

    @property
    def out_dir(self) -> Path:
        return self.root / "out"

    @property
    def home(self) -> Path:
        return self.root / "scratch" / "home"

    @property
    def victim(self) -> Path:
        return self.root / "victim"

    @property
    def secret(self) -> Path:
        return self.root / "secret" / "secret.txt"

    def create(self) -> None:
        for d in ("out/victim", "victim/sub", "secret", "scratch/home", "scratch/tmp", "fakehome", "cwd"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        token = self.token.decode()
        # the token marks every byte outside the inputs: found in an output or in what a command
        # prints, it shows that something outside the input's folder was read (a leak)
        (self.root / "victim" / "notes.txt").write_text(f"victim {token}: no output may touch this folder\n")
        (self.root / "victim" / "sub" / "deep.txt").write_text(f"deep {token}\n")
        (self.out_dir / "victim" / "keep.txt").write_text("a sentinel inside OUT\n")
        # a secret that reads as a plausible adapter config, so that commands echo its fields
        self.secret.write_text(json.dumps({
            "secret": token, "base_model_name_or_path": token, "revision": token, "peft_type": "LORA",
            "task_type": "CAUSAL_LM", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"],
        }) + "\n")

    def inputs(self) -> list[Path]:
        return [p for p in (self.adapter, self.adapter2, self.base) if p is not None]

    # -- fixtures ----------------------------------------------------------------------------

    def use_adapter(self, name: str) -> Path:
        self.adapter_name = name
        dest = self.root / ("adapter.safetensors" if name.endswith(".safetensors") else "adapter")
        self.adapter = self.fixtures.materialize(name, dest)
        return self.adapter

    def use_partner(self) -> Path:
        name = ADAPTERS[self.adapter_name][1]
        dest = self.root / ("adapter2.safetensors" if name.endswith(".safetensors") else "adapter2")
        self.adapter2 = self.fixtures.materialize(name, dest)
        return self.adapter2

    def use_base(self, name: str | None = None) -> Path:
        self.base_name = name or ADAPTERS[self.adapter_name][0]
        self.base = self.fixtures.materialize(self.base_name, self.root / "base")
        return self.base

    def adapter_weights(self) -> Path:
        """The adapter's safetensors file."""
        assert self.adapter is not None
        if self.adapter.is_file():
            return self.adapter
        return min(self.adapter.glob("*.safetensors"))

    def adapter_config(self) -> Path:
        assert self.adapter is not None
        return self.adapter / "adapter_config.json"

    def base_shards(self) -> list[Path]:
        assert self.base is not None
        return sorted(self.base.glob("*.safetensors"))

    # -- the command line --------------------------------------------------------------------

    def default_out(self, command: str) -> Path:
        return self.out_dir / ("result.safetensors" if command == "convert_kohya" else "result")

    def argv(self, command: str) -> list[str]:
        values = {"{A}": str(self.adapter), "{A2}": str(self.adapter2), "{B}": str(self.base),
                  "{O}": str(self.out)}
        argv = []
        for part in COMMANDS[command]:
            for k, v in values.items():
                part = part.replace(k, v)
            argv.append(part)
        if self.overwrite:
            argv.append("--overwrite")
        return argv

    def env(self, base_env: dict[str, str]) -> dict[str, str]:
        env = dict(base_env)
        env.update({
            "HOME": str(self.root / "fakehome"),
            "LORATOOL_HOME": str(self.home),
            "TMPDIR": str(self.root / "scratch" / "tmp"),
        })
        env.pop("XDG_CACHE_HOME", None)
        return env

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
