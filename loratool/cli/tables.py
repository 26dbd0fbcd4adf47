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
    style: str | None = None  # a rich style for the column ("bold" for keys)


def _width(cells: Sequence[str], header: str) -> int:
    from rich.text import Text

    return max([Text.from_markup(c).cell_len for c in cells] + [len(header)])


def _table(columns: Sequence[Column], rows: Sequence[Sequence[str]], keep: list[int], widths: dict[int, int],
           caption: str | None = None, header: bool = True):
    from rich import box
    from rich.table import Table

    t = Table(box=box.SIMPLE_HEAD if header else None, header_style="bold", pad_edge=False, show_edge=False,
              show_header=header, caption=caption, caption_justify="left")
    for i in keep:
        c = columns[i]
        if c.flexible:  # wraps onto more lines rather than cutting
            t.add_column(c.header, overflow="fold", width=widths[i], style=c.style)
        else:
            t.add_column(c.header, justify="right" if c.right else "left", no_wrap=True, width=widths[i],
                         style=c.style)
    for r in rows:
        t.add_row(*(r[i] for i in keep))
    return t


def _rendered_width(table) -> int:
    from rich.console import Console

    con = Console(width=100_000, file=None, color_system=None, record=True, highlight=False)
    with con.capture() as cap:
        con.print(table)
    return max((len(line) for line in cap.get().splitlines()), default=0)  # lines are as wide as the table


def _share(room: int, natural: dict[int, int]) -> dict[int, int]:
    """``room`` split among the flexible columns: each its natural width if all fit, else the
    narrow ones whole and the rest an even share of what is left (at least one character)."""
    out: dict[int, int] = {}
    left = sorted(natural, key=natural.__getitem__)
    while left:
        even = max(1, room // len(left))
        i = left[0]
        if natural[i] <= even:
            out[i] = natural[i]
            room -= natural[i]
            left.pop(0)
        else:
            for i in left:
                out[i] = even
            break
    return out


def fitted(columns: Sequence[Column], rows: Sequence[Sequence[str]], width: int, header: bool = True):
    """A rich ``Table`` of ``rows`` that fits ``width`` columns (see the module docstring);
    ``header=False`` for a two-column key/value listing."""
    natural = {i: _width([r[i] for r in rows], c.header if header else "") for i, c in enumerate(columns)}
    flex = [i for i, c in enumerate(columns) if c.flexible]
    keep = list(range(len(columns)))
    optional = sorted((i for i, c in enumerate(columns) if c.drop), key=lambda i: -columns[i].drop)
    dropped: list[str] = []
    while True:
        # the width of the table with one-character flexible columns: rules and padding included
        probe = {i: (1 if i in flex else natural[i]) for i in keep}
        overhead = _rendered_width(_table(columns, [["0"] * len(columns)], keep, probe, header=header))
        kept_flex = [i for i in flex if i in keep]
        room = width - (overhead - len(kept_flex))  # what the flexible columns can share
        fits = room >= sum(min(natural[i], MIN_FLEX) for i in kept_flex) if kept_flex else overhead <= width
        if fits or not optional:
            break
        i = optional.pop(0)
        keep.remove(i)
        dropped.append(columns[i].header)
    widths = {i: natural[i] for i in keep}
    widths.update(_share(max(room, len(kept_flex)), {i: natural[i] for i in kept_flex}))
    caption = f"(left out to fit {width} columns: {', '.join(dropped)}; --json has them)" if dropped else None
    return _table(columns, rows, keep, widths, caption, header=header)
