"""Adapter references, accepted wherever loratool takes an adapter.

    path/to/adapter        an existing local path always wins (checked first, nothing opened)
    name                   the latest version of a registry name (also ``name:latest``)
    name@3                 version 3 of that name
    name:prod              the version the tag ``prod`` points at
    sha256:abcd…           the adapter whose digest starts with these hex digits (at least 4;
                           more than one match is an error listing them)
    hf://owner/repo[@rev]  a Hub repo: only the adapter's files are downloaded, into the Hugging
                           Face cache

In ``--adapters`` lists a weight is the last ``:number`` of an item (``name:prod:0.5``), which is
why tags may not be numbers (``split_weight``).

This module imports nothing heavy: ``resolve_adapter_ref`` is called from ``load_adapter`` for any
path that does not exist.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

from loratool.text import HUB_PREFIX
from loratool.errors import InputError, UsageError

DIGEST_PREFIX = "sha256:"
MIN_DIGEST_PREFIX = 4
LATEST = "latest"
RESERVED_NAMES = frozenset({"sha256", "hf"})

_SEGMENT = r"[A-Za-z0-9][A-Za-z0-9._-]*"
NAME_RE = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
TAG_RE = re.compile(r"[A-Za-z][A-Za-z0-9._-]*")
_WEIGHT_RE = re.compile(r"^(?P<ref>.+):(?P<weight>[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)$")
MAX_NAME = 200
MAX_TAG = 64


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 80 else repr(text[:77] + "...")


def validate_name(name: str) -> str:
    """A registry name: letters, digits, ``.``, ``_``, ``-``, segments joined by ``/``; each
    segment starts with a letter or digit (so no ``..``, no absolute paths, no control characters,
    no ``@`` or ``:`` that references use)."""
    if not isinstance(name, str) or not name:
        raise UsageError("a registry name must not be empty")
    if len(name) > MAX_NAME or not NAME_RE.fullmatch(name):
        raise UsageError(
            f"invalid registry name {_shown(name)}: use letters, digits, '.', '_' and '-', optionally in "
            "'/'-separated parts each starting with a letter or digit (e.g. llama-sql or team/llama-sql), "
            f"at most {MAX_NAME} characters")
    if name.lower() in RESERVED_NAMES:
        raise UsageError(f"invalid registry name {name!r}: reserved for references ({name}:…); choose another")
    return name


def validate_tag(tag: str) -> str:
    """A tag starts with a letter (a number after ':' is a weight in ``--adapters``)."""
    if not isinstance(tag, str) or len(tag) > MAX_TAG or not TAG_RE.fullmatch(tag):
        raise UsageError(
            f"invalid tag {_shown(str(tag))}: a tag starts with a letter and holds letters, digits, '.', '_' "
            f"and '-' (at most {MAX_TAG} characters), e.g. prod or v1.2")
    if tag == LATEST:
        raise UsageError(f"invalid tag {tag!r}: 'latest' always means the newest version; choose another tag")
    return tag


@dataclass(frozen=True)
class Ref:
    """A parsed registry or Hub reference."""

    text: str
    kind: Literal["name", "version", "tag", "digest", "hub"]
    name: str | None = None
    version: int | None = None
    tag: str | None = None
    digest: str | None = None  # a lowercase hex prefix
    repo_id: str | None = None
    revision: str | None = None


def parse_ref(text: str) -> Ref:
    """Parse a reference (not a local path; ``resolve_adapter_ref`` checks paths first)."""
    if not isinstance(text, str) or not text.strip():
        raise UsageError("empty adapter reference")
    if text.startswith(HUB_PREFIX):
        from loratool.fingerprint import parse_hub_ref

        repo_id, revision = parse_hub_ref(text)
        return Ref(text, "hub", repo_id=repo_id, revision=revision)
    if text.lower().startswith(DIGEST_PREFIX):
        prefix = text[len(DIGEST_PREFIX):].lower()
        if not re.fullmatch(r"[0-9a-f]{%d,64}" % MIN_DIGEST_PREFIX, prefix):
            raise UsageError(f"{_shown(text)}: a digest reference is sha256: followed by {MIN_DIGEST_PREFIX} "
                             "to 64 hex digits (a unique prefix of the digest `loratool registry list` shows)")
        return Ref(text, "digest", digest=prefix)
    if "@" in text:
        name, _, version = text.rpartition("@")
        if not version.isdigit() or int(version) < 1:
            raise UsageError(f"{_shown(text)}: the version after '@' must be a number from 1, found {version!r}")
        return Ref(text, "version", name=validate_name(name), version=int(version))
    if ":" in text:
        name, _, tag = text.rpartition(":")
        validate_name(name)
        if tag == LATEST:
            return Ref(text, "name", name=name)
        return Ref(text, "tag", name=name, tag=validate_tag(tag))
    return Ref(text, "name", name=validate_name(text))


def is_reference(text: str) -> bool:
    """Whether ``text`` is a well-formed registry or Hub reference (nothing is looked up)."""
    if text.startswith("hf:/") and not text.startswith(HUB_PREFIX):
        text = HUB_PREFIX + text[len("hf:/"):]  # Path("hf://o/r") collapses the '//'
    try:
        parse_ref(text)
    except (UsageError, InputError):
        return False
    return True


def split_weight(spec: str) -> tuple[str, float | None]:
    """``"name:prod:0.5"`` -> ``("name:prod", 0.5)``; no weight -> ``(spec, None)``.

    The weight is the last ``:number``, except when the whole item is an existing path or a digest
    reference (``sha256:1234`` is a digest prefix, not ``sha256`` weighted 1234)."""
    if os.path.exists(spec):
        return spec, None
    m = _WEIGHT_RE.match(spec)
    if m is None or m.group("ref").lower() == DIGEST_PREFIX.rstrip(":"):
        return spec, None
    return m.group("ref"), float(m.group("weight"))
