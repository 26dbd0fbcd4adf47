"""Getting an adapter out of the registry (``loratool registry export``), in any format.

In the format it was added in, the stored files come back byte for byte (``Registry.export``): a
registered kohya file comes out as that kohya file. In another format it is converted by
``loratool.convert`` (the one conversion: kohya's metadata and layout travel along, the
manifest gains a "converted" step). This module sits above ``loratool.convert``, which resolves
references through the registry core; the core never imports it.
"""

from __future__ import annotations

import os
from pathlib import Path

from loratool.boundary import note_input
from loratool.errors import UsageError
from loratool.formats import FORMATS
from loratool.registry.core import Registry, protected_home
from loratool.schemas.registry import ExportResult


def export(ref: str, out: str | os.PathLike, format: str | None = None, overwrite: bool = False,
           home: str | os.PathLike | None = None) -> ExportResult:
    """Write the adapter ``ref`` names at ``out`` in ``format`` (default: the format it was added
    in). Atomic, through the output boundary; the registry home is an input, never written."""
    if format is not None and format not in FORMATS:
        raise UsageError(f"unknown format {format!r}; choose one of: {', '.join(FORMATS)}")
    with Registry(home, create=False) as reg:
        digest = reg.resolve_digest(ref)
        tree = reg.tree(digest)
        fmt = format or tree.format
        if fmt == tree.format:
            path = reg.export(f"sha256:{digest}", out, overwrite=overwrite)  # the content resolved above
        else:
            from loratool.convert import convert

            src = reg.materialize(digest)
            for p in protected_home(reg.home):  # the default home is protected already
                note_input(p)
            path = convert(src, fmt, out, overwrite=overwrite, format=tree.format).output
    return ExportResult(ref=ref, digest=digest, format=fmt, source_format=tree.format,
                        converted=fmt != tree.format, output=Path(path))
