"""Shared rendering helpers for commands: rich tables for people, JSON for machines."""

from __future__ import annotations

import sys

import click

from loratool.formats import FORMATS

# --format / --to: the formats loratool reads and writes
FORMAT_CHOICE = click.Choice(list(FORMATS))


WARNINGS_SHOWN = 3  # warnings of one shape printed before "... and N more like these"


def warn(messages, shown: int = WARNINGS_SHOWN) -> None:
    """Warnings on stderr, one line each; warnings that differ only in the names they quote (the
    same finding about many modules) are grouped: the first ``shown``, then a count (``--json``
    lists every one)."""
    import re

    groups: dict[str, list[str]] = {}
    for m in messages:
        m = " ".join(str(m).split())  # one line, as errors are (a path may hold a newline)
        groups.setdefault(re.sub(r"'[^']*'", "''", m), []).append(m)
    for group in groups.values():
        for m in group[:shown]:
            click.echo(f"loratool: warning: {m}", err=True)
        if len(group) > shown:
            click.echo(f"loratool: warning: ... and {len(group) - shown} more like these ({len(group)} in all; "
                       "--json lists them)", err=True)


def emit(report, as_json: bool, render) -> None:
    """A command's result: ``--json`` from its pydantic model, else ``render(report)``."""
    if as_json:
        print_json(report)
    else:
        render(report)


def human_bytes(n: int) -> str:
    """Binary sizes with their binary units (1 MiB = 1024² bytes)."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def human_count(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    # Piped output (CI logs, files) gets a wide fixed width instead of rich's 80 columns, so
    # tables are not squeezed into ellipses.
    width = None if stream.isatty() else 200
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


def print_json(model) -> None:
    sys.stdout.write(model.model_dump_json(indent=2) + "\n")


def fmt_num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return str(int(x)) if x.is_integer() else f"{x:.6g}"
    return str(x)
