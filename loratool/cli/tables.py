"""Tables that fit the terminal without cutting numbers.

Rich squeezes every column of a table wider than the console and ends cells with ``…``: at 80
columns ``inspect --spectrum --modules`` lost every digit. ``fitted`` builds the table so that
every cell of a fixed column (numbers, shapes, short words) is printed whole: the one flexible
column (a module or tensor name) wraps onto more lines instead, and when even that does not fit,
columns marked optional are dropped, lowest priority first, and the table's caption says which
(``--json`` always has everything).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

MIN_FLEX = 16  # the narrowest a wrapped name column gets before optional columns are dropped


@dataclass(frozen=True)
class Column:
    header: str
    right: bool = False  # numbers: right-aligned
    flexible: bool = False  # the one column that may wrap (names)
    drop: int = 0  # 0: always shown; otherwise dropped when the table does not fit, highest first


def _width(cells: Sequence[str], header: str) -> int:
    from rich.text import Text

    return max([Text.from_markup(c).cell_len for c in cells] + [len(header)])


def _table(columns: Sequence[Column], rows: Sequence[Sequence[str]], keep: list[int], widths: list[int],
           flex_width: int, caption: str | None = None):
    from rich import box
    from rich.table import Table

    t = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False, show_edge=False, caption=caption,
              caption_justify="left")
    for i in keep:
        c = columns[i]
        if c.flexible:  # wraps onto more lines rather than cutting
            t.add_column(c.header, overflow="fold", width=flex_width)
        else:
            t.add_column(c.header, justify="right" if c.right else "left", no_wrap=True, width=widths[i])
    for r in rows:
        t.add_row(*(r[i] for i in keep))
    return t


def _rendered_width(table) -> int:
    from rich.console import Console

    con = Console(width=100_000, file=None, color_system=None, record=True, highlight=False)
    with con.capture() as cap:
        con.print(table)
    return max((len(line.rstrip()) for line in cap.get().splitlines()), default=0)


def fitted(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int):
    """A rich ``Table`` of ``rows`` that fits ``width`` columns (see the module docstring)."""
    widths = [_width([r[i] for r in rows], c.header) for i, c in enumerate(columns)]
    flex = next((i for i, c in enumerate(columns) if c.flexible), None)
    keep = list(range(len(columns)))
    optional = sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: -columns[i].drop)
    dropped: list[str] = []
    while True:
        # the width of the table with a one-character name column: borders and padding included
        overhead = _rendered_width(_table(columns, [["0"] * len(columns)], keep, widths, 1))
        if flex is None:
            room = 0
            fits = overhead <= width
        else:
            room = width - (overhead - 1)  # what the flexible column can have
            fits = room >= min(widths[flex], MIN_FLEX)
        if fits or not optional:
            break
        i = optional.pop(0)
        keep.remove(i)
        dropped.append(columns[i].header)
    flex_width = max(1, min(widths[flex], room)) if flex is not None else 1
    caption = f"(left out to fit {width} columns: {', '.join(dropped)}; --json has them)" if dropped else None
    return _table(columns, rows, keep, widths, flex_width, caption)
