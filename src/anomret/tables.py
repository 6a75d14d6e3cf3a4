"""Rich tables that fit the console width without breaking a word.

A table is laid out in the first of these forms that fits (:func:`plan_layout`):

1. boxed, full headers (as wide as it needs);
2. compact: no outer box, a rule under the header, two spaces between columns;
3. compact with short headers (abbreviations, or headers wrapped at their spaces);
4. columns whose value is the same in every row move to the caption ("method: rad");
5. one space between columns;
6. text columns marked ``shrinkable`` are cut with an ellipsis (…), the widest first.

Cells never wrap: a cell is shown whole or shortened with an ellipsis, so a piped table never splits a
name across lines. Logs and pipes are not terminals: rich gives them 80 columns unless ``COLUMNS`` says
otherwise, and the tables fit that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from rich import box
from rich.cells import cell_len
from rich.table import Table

__all__ = ["Column", "Layout", "Row", "fitted_table", "plan_layout"]

# Narrowest a shrinkable column gets: two characters and the ellipsis.
_MIN_SHRUNK = 3


@dataclass(frozen=True)
class Column:
    """A table column: its header, an optional short header, and how it may give way to a narrow console.

    Attributes:
        header: the full header (may hold ``\\n`` for a header on several lines).
        short: the header where space is short (an abbreviation, or the header broken at its spaces).
        numeric: right-aligned.
        shrinkable: cells may be cut with an ellipsis as the last resort (names, not numbers).
        movable: when every row holds the same value, the column may move to the caption.
    """

    header: str
    short: str | None = None
    numeric: bool = False
    shrinkable: bool = False
    movable: bool = False


@dataclass(frozen=True)
class Row:
    cells: Sequence[str]
    style: str | None = None
    rule_above: bool = False


@dataclass(frozen=True)
class Layout:
    """How a table is drawn (see the module docstring for the order in which forms are tried)."""

    boxed: bool = True
    short_headers: bool = False
    separator: int = 2  # spaces between columns of a compact table
    moved: tuple[int, ...] = ()  # columns shown in the caption instead
    max_widths: dict[int, int] = field(default_factory=dict)  # shrunk columns

    def headers(self, columns: Sequence[Column]) -> list[str]:
        return [(c.short or c.header) if self.short_headers else c.header for c in columns]


def _text_width(text: str) -> int:
    return max((cell_len(line) for line in str(text).split("\n")), default=0)


def _natural_widths(columns: Sequence[Column], rows: Sequence[Row], layout: Layout) -> list[int]:
    headers = layout.headers(columns)
    widths = []
    for i, header in enumerate(headers):
        width = max([_text_width(header), *(_text_width(row.cells[i]) for row in rows)])
        widths.append(min(width, layout.max_widths.get(i, width)))
    return widths


def table_width(columns: Sequence[Column], rows: Sequence[Row], layout: Layout) -> int:
    """Characters the widest line of the table takes in ``layout`` (title and caption wrap to it)."""
    widths = [w for i, w in enumerate(_natural_widths(columns, rows, layout)) if i not in layout.moved]
    if not widths:
        return 0
    if layout.boxed:  # padding of one on both sides, a bar before each column and after the last
        return sum(widths) + 3 * len(widths) + 1
    return sum(widths) + layout.separator * (len(widths) - 1)


def _constant(rows: Sequence[Row], index: int) -> bool:
    values = {row.cells[index] for row in rows if row.cells[index] != ""}
    return len(values) == 1


def plan_layout(columns: Sequence[Column], rows: Sequence[Row], width: int | None) -> Layout:
    """The first layout of the module docstring's list whose table fits ``width`` (None: no limit).

    When even the last one does not fit, it is returned anyway: rich then cuts cells with an ellipsis.
    """
    layout = Layout()
    if width is None or table_width(columns, rows, layout) <= width:
        return layout
    for step in (
        lambda lay: replace(lay, boxed=False),
        lambda lay: replace(lay, short_headers=True),
        lambda lay: replace(
            lay, moved=tuple(i for i, c in enumerate(columns) if c.movable and _constant(rows, i))
        ),
        lambda lay: replace(lay, separator=1),
    ):
        layout = step(layout)
        if table_width(columns, rows, layout) <= width:
            return layout
    # Last resort: cut the widest shrinkable column, one character at a time, until the table fits.
    widths = _natural_widths(columns, rows, layout)
    shrunk = dict(layout.max_widths)
    candidates = [i for i, c in enumerate(columns) if c.shrinkable and i not in layout.moved]
    while table_width(columns, rows, replace(layout, max_widths=shrunk)) > width:
        current = {i: shrunk.get(i, widths[i]) for i in candidates}
        widest = max(current, key=lambda i: current[i], default=None)
        if widest is None or current[widest] <= _MIN_SHRUNK:
            break
        shrunk[widest] = current[widest] - 1
    return replace(layout, max_widths=shrunk)


def fitted_table(
    columns: Sequence[Column],
    rows: Sequence[Row],
    *,
    width: int | None = None,
    title: str | None = None,
    caption: str | None = None,
) -> Table:
    """A rich table of ``rows`` laid out by :func:`plan_layout` for a console ``width`` wide."""
    layout = plan_layout(columns, rows, width)
    moved = [f"{columns[i].header.replace(chr(10), ' ')}: {rows[0].cells[i]}" for i in layout.moved if rows]
    captions = [text for text in (" · ".join(moved), caption) if text]
    joined = "\n".join(captions) or None
    if layout.boxed:
        table = Table(title=title, caption=joined)
    else:
        table = Table(
            title=title,
            caption=joined,
            box=box.SIMPLE_HEAD,
            show_edge=False,
            pad_edge=False,
            # Right padding only; the box's blank divider adds the rest of the gap.
            padding=(0, layout.separator - 1, 0, 0),
        )
    headers = layout.headers(columns)
    kept = [i for i in range(len(columns)) if i not in layout.moved]
    for i in kept:
        table.add_column(
            headers[i],
            justify="right" if columns[i].numeric else "left",
            no_wrap=True,
            overflow="ellipsis",
            max_width=layout.max_widths.get(i),
        )
    for row in rows:
        if row.rule_above and table.row_count:
            table.add_section()
        table.add_row(*(row.cells[i] for i in kept), style=row.style)
    return table
