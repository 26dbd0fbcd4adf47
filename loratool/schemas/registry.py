"""Typed results of registry operations (``--json`` prints them with ``model_dump_json``) and the
registry's stored records (``Tree``, ``Entry``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from loratool.canonical import canonical_bytes
from loratool.schemas.manifest import Manifest


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TreeFile(_Model):
    path: str = Field(description="Path inside the adapter, '/'-separated")
    sha256: str = Field(description="The blob holding the file's bytes")
    size: int = Field(ge=0)


class Tree(_Model):
    """What an adapter is made of. Its canonical JSON (``loratool.canonical``) is stored as a blob;
    the sha256 of that blob is the adapter's digest (``sha256:…`` references), so equal content has
    one digest.

    A digest is the hash of the stored bytes and is never recomputed from a parsed tree: trees
    written before issue 12 (JSON with ``\\uXXXX`` escapes where a path is not ASCII) keep their
    digests, and ``Registry.add`` finds such a tree by its content instead of its bytes."""

    kind: Literal["loratool.tree"] = "loratool.tree"
    format: str
    entry: str = Field(description="'.' for a directory adapter, else the file load_adapter reads")
    files: list[TreeFile]

    def canonical(self) -> bytes:
        """The bytes of the tree blob (files in path order); ``UnicodeEncodeError`` for a path
        that is not UTF-8 (``Registry.add`` refuses those first)."""
        data = self.model_dump()
        data["files"] = sorted(data["files"], key=lambda f: f["path"])
        return canonical_bytes(data)


class Source(_Model):
    kind: Literal["path", "hub"]
    location: str = Field(description="Absolute path, or the Hub repo id")
    revision: str | None = Field(default=None, description="Hub commit sha")


class BaseInfo(_Model):
    """The base fingerprint recorded in the adapter's manifest."""

    name: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    structure: str | None = None
    content: str | None = None


class Entry(_Model):
    """One version of a named adapter."""

    name: str
    version: int
    ref: str = Field(description="name@version")
    tags: list[str] = Field(default_factory=list)
    latest: bool = False
    digest: str
    format: str
    size: int
    num_modules: int
    num_params: int
    ranks: list[int | float]
    alphas: list[int | float]
    targets: list[str]
    base_model: str | None = Field(default=None, description="The base the adapter's config names")
    base: BaseInfo | None = Field(default=None, description="From the manifest, when it records one")
    has_manifest: bool = False
    source: Source
    added_at: str
    fits: Literal["content", "structure"] | None = Field(
        default=None, description="With --fits: how the recorded base matches the base given")


class ListReport(_Model):
    adapters: list[Entry]


class LineageEdge(_Model):
    step: int
    operation: str
    parent: str = Field(description="Tensors digest of the input adapter")
    in_registry: list[str] = Field(default_factory=list, description="name@version of registry adapters with that tensors digest")


class Details(_Model):
    entry: Entry
    files: list[TreeFile]
    same_content: list[str] = Field(default_factory=list, description="Other name@version with this digest")
    tensors_digest: str | None = None
    lineage: list[LineageEdge] = Field(default_factory=list)
    children: list[str] = Field(default_factory=list, description="Registry adapters made from this one")
    manifest: Manifest | None = None


class AddResult(_Model):
    name: str
    version: int
    digest: str
    created: bool = Field(description="False when the latest version of the name already held this content")
    tags: list[str] = Field(default_factory=list)
    new_bytes: int = Field(description="Bytes of blobs this add stored (0 when all were present)")


class TagResult(_Model):
    name: str
    tag: str
    version: int
    previous: int | None = None


class UntagResult(_Model):
    name: str
    tag: str
    version: int = Field(description="The version the tag pointed at (it stays)")


class RemoveResult(_Model):
    removed: list[str] = Field(description="name@version of the versions removed")


class ExportResult(_Model):
    ref: str = Field(description="The reference as given")
    digest: str
    format: str = Field(description="The format written")
    source_format: str = Field(description="The format the adapter was added in")
    converted: bool = Field(description="False: the stored files, byte for byte")
    output: Path


class GcResult(_Model):
    blobs_removed: int = 0
    bytes_freed: int = 0
    temp_files_removed: int = 0
    materialized_removed: int = 0


class CorruptBlob(_Model):
    blob: str
    problem: Literal["corrupt", "missing"]
    adapters: list[str] = Field(description="name@version of the adapters that hold this blob")


class VerifyReport(_Model):
    blobs_checked: int
    bytes_checked: int
    corrupt: list[CorruptBlob] = Field(default_factory=list)
    temp_files: int = Field(default=0, description="Leftovers of interrupted adds (`gc` removes them)")

    @property
    def ok(self) -> bool:
        return not self.corrupt

    @property
    def bad_adapters(self) -> list[str]:
        return sorted({a for c in self.corrupt for a in c.adapters})


class PushResult(_Model):
    repo_id: str
    ref: str
    files: list[str]
    commit: str | None = None
    url: str | None = None
