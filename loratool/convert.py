"""Convert an adapter between formats: any two of ``loratool.formats.REGISTRY`` (PEFT, kohya
(sd-scripts), diffusers).

Reading gives the format-neutral ``Adapter``; the target format's writer lays it out again. Factor
tensors are copied raw, so every conversion is lossless in the tensors; what a target cannot hold
(DoRA or modules_to_save in a kohya file, an LLM adapter in the diffusers or kohya format) is
refused with the reason, never dropped. Metadata (kohya's ss_* training notes) travels along, and
so does the kohya layout that dotted names cannot express (see ``formats/kohya.py``), so kohya ->
PEFT -> kohya and kohya -> diffusers -> kohya give back the original file's keys and bytes.
"""

from __future__ import annotations

import os
from pathlib import Path

from loratool.errors import UsageError
from loratool.formats import FORMATS
from loratool.schemas.convert import ConvertResult

TARGETS = FORMATS  # every format loratool reads, it writes


def convert(
    src: str | os.PathLike,
    to: str,
    out: str | os.PathLike,
    format: str | None = None,
    overwrite: bool = False,
) -> ConvertResult:
    """Read the adapter at ``src`` (format detected unless ``format`` is given) and write it to
    ``out`` in the ``to`` format, atomically."""
    from loratool.formats import write_adapter
    from loratool.resolve import load_adapter

    if to not in TARGETS:
        raise UsageError(f"unknown target format {to!r}; choose one of: {', '.join(TARGETS)}")
    adapter = load_adapter(src, format=format)
    if not adapter.modules:
        raise UsageError(f"{src}: holds no LoRA modules; nothing to convert")
    from loratool.manifest import finish_output, stamp_adapter

    manifest = stamp_adapter(adapter, "converted", [adapter], {"from": adapter.format, "to": to})
    # converting carries the source's metadata (ss_* notes, kohya layout) where the target's
    # writer would not by itself, so that a later conversion back can restore them
    path = write_adapter(adapter, out, to, overwrite=overwrite, converting=True)
    finish_output(manifest, path)
    return ConvertResult(
        input=str(src),
        input_format=adapter.format,
        format=to,
        output=Path(path),
        num_modules=len(adapter.modules),
        components=list(adapter.components),
    )
