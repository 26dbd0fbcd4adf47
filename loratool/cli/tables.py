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


class _Grid:
    """What ``_table`` draws, laid out directly: rich's Table measures and wraps every cell
    through its Text machinery, about 2 ms a row, which was most of ``inspect --spectrum``'s
    time on a 154-module adapter. Used for plain cells (no markup, one terminal cell per
    character); the same look: three spaces between columns under a header rule, two without a
    header, the flexible column folded onto more lines, the caption wrapped below."""

    def __init__(self, columns, rows, keep, widths, caption, header):
        self.columns, self.rows, self.keep, self.widths = columns, rows, keep, widths
        self.caption, self.header = caption, header

    def lines(self) -> list[tuple[list[tuple[str, str | None]], bool]]:
        """(cells as (text, style), is_header) per output line, each cell padded to its width."""
        import textwrap

        gap = "   " if self.header else "  "
        out = []

        def emit(cells: list[str], styles: list[str | None], is_header: bool) -> None:
            parts: list[tuple[str, str | None]] = []
            for n, (i, text, style) in enumerate(zip(self.keep, cells, styles)):
                w = self.widths[i]
                if n:
                    parts.append((gap, None))
                parts.append((text.rjust(w) if self.columns[i].right else text.ljust(w), style))
            out.append((parts, is_header))

        if self.header:
            emit([self.columns[i].header for i in self.keep], ["bold"] * len(self.keep), True)
            total = sum(self.widths[i] for i in self.keep) + len(gap) * (len(self.keep) - 1)
            out.append(([("─" * total, None)], False))
        for row in self.rows:
            pieces = []
            for i in self.keep:
                text = row[i]
                if self.columns[i].flexible and len(text) > self.widths[i]:
                    pieces.append(textwrap.wrap(text, self.widths[i], break_on_hyphens=False) or [""])
                else:
                    pieces.append([text])
            for k in range(max(len(p) for p in pieces)):
                emit([p[k] if k < len(p) else "" for p in pieces], [self.columns[i].style for i in self.keep], False)
        return out

    def __rich_console__(self, console, options):
        import textwrap

        from rich.segment import Segment
        from rich.style import Style

        styles: dict[str, Style] = {}
        width = 0
        for parts, _ in self.lines():
            width = max(width, sum(len(t) for t, _ in parts))
            for text, style in parts:
                yield Segment(text, styles.setdefault(style, Style.parse(style)) if style else None)
            yield Segment.line()
        if self.caption:
            dim = Style.parse("dim italic")
            for line in textwrap.wrap(self.caption, max(width, 1)):
                yield Segment(line, dim)
                yield Segment(" " * (max(width, 1) - len(line)))  # rich pads the caption to the table's width
                yield Segment.line()


def _plain(rows: Sequence[Sequence[str]], columns: Sequence[Column]) -> bool:
    """Whether every cell is plain text that ``_Grid`` lays out as rich would: no markup, and
    one terminal cell per character."""
    from rich.cells import cell_len

    cells = [c for r in rows for c in r] + [c.header for c in columns]
    return all("[" not in c and cell_len(c) == len(c) for c in cells)


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
        overhead = sum(probe.values()) + (3 if header else 2) * (len(keep) - 1)  # rich's layout: see _Grid
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
    if _plain(rows, columns):
        return _Grid(columns, rows, keep, widths, caption, header)
    return _table(columns, rows, keep, widths, caption, header=header)
