"""Export the JSON Schema of loratool's models into the top-level ``schemas/`` directory: the
manifests, and the model of every command's ``--json`` output (``COMMAND_SCHEMAS`` says which).

    python -m loratool.schemas.export            # regenerate schemas/*.json
    python -m loratool.schemas.export --check    # exit 1 if a file is out of date

``tests/test_schemas.py`` fails when a file is out of date. To publish a new model's schema, add
it to ``SCHEMAS`` (a command's ``--json`` model: to ``COMMAND_SCHEMAS`` too).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel

from loratool.schemas.convert import ConvertResult
from loratool.schemas.extract import ExtractReport
from loratool.schemas.lowrank import ComposeReport, ResizeReport
from loratool.schemas.manifest import BaseFingerprint, Manifest, MergedManifest
from loratool.schemas.merge import MergeResult, ParityReport, UnmergeResult
from loratool.schemas.registry import (
    AddResult,
    Details,
    ExportResult,
    GcResult,
    ListReport,
    RemoveResult,
    TagResult,
    UntagResult,
    VerifyReport,
)
from loratool.schemas.reports import InspectReport, ValidationReport

SCHEMAS: dict[str, type[BaseModel]] = {
    "manifest.schema.json": Manifest,
    "fingerprint.schema.json": BaseFingerprint,
    "merged-manifest.schema.json": MergedManifest,
    "inspect-report.schema.json": InspectReport,
    "validation-report.schema.json": ValidationReport,
    "resize-report.schema.json": ResizeReport,
    "compose-report.schema.json": ComposeReport,
    "extract-report.schema.json": ExtractReport,
    "convert-result.schema.json": ConvertResult,
    "merge-result.schema.json": MergeResult,
    "unmerge-result.schema.json": UnmergeResult,
    "parity-report.schema.json": ParityReport,
    "registry-add-result.schema.json": AddResult,
    "registry-list.schema.json": ListReport,
    "registry-details.schema.json": Details,
    "registry-gc-result.schema.json": GcResult,
    "registry-verify-report.schema.json": VerifyReport,
    "registry-tag-result.schema.json": TagResult,
    "registry-untag-result.schema.json": UntagResult,
    "registry-rm-result.schema.json": RemoveResult,
    "registry-export-result.schema.json": ExportResult,
}

# The schema of each command's ``--json`` output (commands without ``--json`` are not listed).
COMMAND_SCHEMAS: dict[str, str] = {
    "inspect": "inspect-report.schema.json",
    "validate": "validation-report.schema.json",
    "convert": "convert-result.schema.json",
    "resize": "resize-report.schema.json",
    "compose": "compose-report.schema.json",
    "extract": "extract-report.schema.json",
    "merge": "merge-result.schema.json",
    "unmerge": "unmerge-result.schema.json",
    "parity": "parity-report.schema.json",
    "fingerprint": "fingerprint.schema.json",
    "manifest": "manifest.schema.json",
    "registry add": "registry-add-result.schema.json",
    "registry pull": "registry-add-result.schema.json",
    "registry list": "registry-list.schema.json",
    "registry show": "registry-details.schema.json",
    "registry gc": "registry-gc-result.schema.json",
    "registry verify": "registry-verify-report.schema.json",
    "registry tag": "registry-tag-result.schema.json",
    "registry untag": "registry-untag-result.schema.json",
    "registry rm": "registry-rm-result.schema.json",
    "registry export": "registry-export-result.schema.json",
}
SCHEMA_DIR = Path(__file__).resolve().parents[2] / "schemas"
DIALECT = "https://json-schema.org/draft/2020-12/schema"


def render() -> dict[str, str]:
    """file name -> the exact text of its schema file."""
    out = {}
    for name, model in SCHEMAS.items():
        schema = {"$schema": DIALECT, "$id": name, **model.model_json_schema()}
        out[name] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def stale(directory: Path = SCHEMA_DIR) -> list[str]:
    """Schema files that are missing or differ from what the models export."""
    bad = []
    for name, text in render().items():
        path = directory / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            bad.append(name)
    return bad


def write(directory: Path = SCHEMA_DIR) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render().items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loratool.schemas.export", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=SCHEMA_DIR, help="directory (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="report out-of-date files, write nothing")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale(args.out)
        for name in bad:
            print(f"{args.out / name}: out of date; run `python -m loratool.schemas.export`", file=sys.stderr)
        return 1 if bad else 0
    for path in write(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
