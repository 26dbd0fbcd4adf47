"""Models for base identity (fingerprints) and adapter manifests (``loratool.json``).

These classes are the contract: ``loratool fingerprint --json`` prints a ``BaseFingerprint``,
``loratool manifest`` writes a ``Manifest``, and the JSON Schema files in the top-level
``schemas/`` directory are exported from them (``python -m loratool.schemas.export``).

Digest conventions (all lowercase hex sha256 strings):

* ``FileDigest.sha256`` is the sha256 of the file's bytes: the value the Hub shows as the file's
  LFS oid, so a local copy and its Hub repo can be compared without downloading anything.
* ``BaseFingerprint.structure`` is the sha256 of the canonical JSON of the sorted
  ``[name, dtype, shape]`` triples of every tensor. It does not depend on how the base is split
  into shards, so a re-sharded copy of a model keeps its structure fingerprint.
* ``BaseFingerprint.content`` is the sha256 of the sorted per-file sha256 values, joined by
  newlines. File names are left out on purpose: a single-file base saved as ``llama.safetensors``
  holds the same bytes as ``model.safetensors`` and is the same base.
* ``AdapterRecord.config_digest`` is the sha256 of the adapter config as canonical JSON (sorted
  keys, PEFT's set-valued fields sorted), so it does not change with the order PEFT happened to
  write ``target_modules`` in.
* ``AdapterRecord.tensors_digest`` is the sha256 over every tensor of the adapter in the
  format-neutral model (module name, role, dtype, shape, raw bytes), sorted by name, so it survives
  metadata changes and does not need the file it may be embedded in.

A manifest with a newer ``schema_version`` than this loratool knows is refused, not guessed at.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
MANIFEST_KIND = "loratool.manifest"

Operation = Literal["created", "converted", "resized", "composed", "merged", "unmerged", "extracted"]
# lowercase hex sha256
Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileDigest(_Model):
    """One file of an adapter or base, relative to its root directory (``/`` separators)."""

    path: str = Field(description="Path relative to the adapter or base root, '/'-separated")
    size: int | None = Field(default=None, ge=0, description="Size in bytes, when known")
    sha256: Sha256 | None = Field(
        default=None,
        description="sha256 of the file's bytes (equal to the Hub's LFS oid); None when unknown",
    )
    git_blob_id: str | None = Field(
        default=None,
        description="The Hub's git blob id (a SHA-1 of the git object, NOT a sha256 of the file), "
        "recorded for files the Hub does not store with LFS",
    )
    structure: Sha256 | None = Field(
        default=None,
        description="Structure fingerprint of this file's tensors alone (safetensors files)",
    )
    num_tensors: int | None = Field(default=None, ge=0)


class QuantDerivation(_Model):
    """A 4-bit base verified to be, bit for bit, bitsandbytes' quantization of a 16-bit base
    (``loratool fingerprint QUANT_BASE --source BASE16``): every 4-bit weight's packed codes and
    absmax (and nested state) equal ``quantize_4bit`` of the 16-bit weight with the recorded
    quant config, every other tensor the 16-bit base's bytes."""

    source_content: Sha256 = Field(description="The 16-bit base's content fingerprint")
    source_structure: Sha256 | None = Field(default=None, description="The 16-bit base's structure fingerprint")
    source_name: str | None = Field(default=None, description="The 16-bit base's name when verified")
    base_precision: str = Field(
        description="The quant config, as merge --base-precision spells it: nf4|fp4,blocksize=N[,double-quant] "
        "(several joined by '; ' when the weights differ)")
    quantized_tensors: int = Field(ge=0, description="4-bit weights that matched quantize_4bit of the 16-bit ones")
    copied_tensors: int = Field(ge=0, description="Tensors kept in 16 bits, byte-equal to the 16-bit base's")
    loratool_version: str = Field(description="The loratool that verified it")
    time: str = Field(description="When it was verified (UTC, ISO 8601)")


class BaseFingerprint(_Model):
    """The identity of a base model: where it came from, its files, and two fingerprints."""

    schema_version: int = Field(default=SCHEMA_VERSION, ge=1)
    name: str | None = Field(
        default=None,
        description="The base's name: the Hub repo id, else its config's _name_or_path, else the "
        "name of its directory or file (never an absolute path: manifests get shared)",
    )
    repo_id: str | None = Field(default=None, description="Hub repo id, when resolved from the Hub")
    revision: str | None = Field(default=None, description="Hub commit sha (or the revision asked for)")
    files: list[FileDigest] = Field(
        default_factory=list, description="The safetensors files holding the weights, sorted by path"
    )
    structure: Sha256 | None = Field(
        default=None,
        description="sha256 over sorted (name, dtype, shape) of all tensors; shard-layout independent",
    )
    content: Sha256 | None = Field(
        default=None,
        description="sha256 over the sorted per-file sha256 values; None when any file's sha256 is unknown",
    )
    num_tensors: int | None = Field(default=None, ge=0)
    num_params: int | None = Field(default=None, ge=0)
    notes: list[str] = Field(default_factory=list, description="What could not be determined, and why")
    derived_from: QuantDerivation | None = Field(
        default=None,
        description="For a bitsandbytes 4-bit base: the 16-bit base it was verified to quantize bit for bit "
        "(recorded by `loratool fingerprint BASE --source BASE16`); None when no relation is recorded")


class Summary(_Model):
    """Distinct values of a per-module quantity, e.g. ranks [8, 16]."""

    min: int | float | None = None
    max: int | float | None = None
    distinct: list[int | float] = Field(default_factory=list)


class AdapterRecord(_Model):
    format: str = Field(description="peft | kohya | diffusers")
    files: list[FileDigest] = Field(
        default_factory=list,
        description="The adapter's files with their sha256; empty when the manifest is embedded "
        "in the weights file (a file cannot hold its own digest)",
    )
    config_digest: Sha256 | None = None
    tensors_digest: Sha256 | None = None
    num_modules: int = Field(ge=0)
    num_params: int = Field(ge=0)
    rank: Summary
    alpha: Summary
    targets: list[str] = Field(description="Short target names (last path component), sorted")
    dtypes: dict[str, int] = Field(default_factory=dict, description="dtype -> number of tensors")
    use_dora: bool = False
    use_rslora: bool = False
    components: list[str] = Field(default_factory=list)
    base_model: str | None = Field(
        default=None, description="The base the adapter names itself (PEFT base_model_name_or_path)"
    )
    base_revision: str | None = None


class InputRef(_Model):
    """An input of an operation: an adapter or a base, by digest."""

    kind: Literal["adapter", "base"]
    name: str | None = Field(default=None, description="File or directory name (not a full path)")
    format: str | None = None
    digest: Sha256 | None = Field(
        default=None,
        description="adapter: tensors_digest; base: content fingerprint, else structure fingerprint",
    )
    config_digest: Sha256 | None = None


class LineageEntry(_Model):
    operation: Operation
    inputs: list[InputRef] = Field(default_factory=list)
    params: dict[str, Any] = Field(default_factory=dict)
    loratool_version: str
    time: str = Field(description="UTC, ISO 8601 (SOURCE_DATE_EPOCH when set, for reproducible output)")
    base_mismatch: str | None = Field(
        default=None, description="Set when the operation ran with --allow-base-mismatch: what differed"
    )


class Manifest(_Model):
    kind: Literal["loratool.manifest"] = MANIFEST_KIND
    schema_version: int = Field(default=SCHEMA_VERSION, ge=1)
    adapter: AdapterRecord
    base: BaseFingerprint | None = None
    lineage: list[LineageEntry] = Field(default_factory=list)


class MergedManifest(_Model):
    """``loratool.json`` of a merged (or unmerged) checkpoint: the base it was made from and the
    step that made it (inputs: the base and each adapter by digest; params: weights, dtype, device;
    ``base_mismatch`` when it ran with --allow-base-mismatch)."""

    kind: Literal["loratool.merged"] = "loratool.merged"
    schema_version: int = Field(default=SCHEMA_VERSION, ge=1)
    base: BaseFingerprint | None = None
    lineage: list[LineageEntry] = Field(default_factory=list)


class BaseCheckResult(_Model):
    """What ``check_base`` found. ``mismatch`` is one line, for the caller to record in lineage."""

    status: Literal["match", "mismatch", "unverified"]
    structure: Literal["match", "mismatch", "unknown"] = "unknown"
    content: Literal["match", "mismatch", "unknown", "skipped", "derived"] = Field(
        default="unknown", description="'derived': the bytes differ, but one base is the recorded "
        "4-bit quantization of the other (``seen``)")
    seen: Literal["recorded", "4-bit derivative", "16-bit source"] | None = Field(
        default=None, description="Which base the check saw: the recorded one, the verified 4-bit derivative "
        "of the recorded base, or the 16-bit base the recorded 4-bit base quantizes; None when not verified")
    derivation: QuantDerivation | None = Field(
        default=None, description="The verified relation, when ``seen`` is a derivative or a source")
    mismatch: str | None = None
    warnings: list[str] = Field(default_factory=list)
    base: BaseFingerprint | None = Field(default=None, description="The base as found now")

    @property
    def ok(self) -> bool:
        return self.status == "match"
