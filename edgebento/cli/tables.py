"""Tables of the listing commands (``fleet status``, ``rollout list``, ``rollout status``,
``registry list``) and the key-value tables of ``registry show`` and ``pack inspect``.

An identifier is never cut: the ids a table shows are what ``rollout status ID``, ``resume ID``
and a grep need. On a terminal the table is drawn by rich with its id columns unwrapped at their
full width, and other values fold onto more lines rather than end in ``…``; piped, it is plain
text, one row per line, columns aligned by spaces (as kubectl prints), with no markup and no
width limit, so ``grep``, ``awk`` and ``cut`` see whole ids, hashes and figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from modelpack.errors import clip


@dataclass(frozen=True)
class Column:
    name: str
    ident: bool = False  # an identifier: never wrapped, shrunk or cut
    right: bool = False  # numbers


@dataclass(frozen=True)
class Cell:
    """A value and the rich style it is shown in on a terminal."""

    text: str
    style: str = ""


def print_table(
    title: str, columns: Sequence[Column], rows: Sequence[Sequence[str | Cell]]
) -> None:
    console = Console()
    if not console.is_terminal:
        print(plain_table(title, columns, rows), flush=True)
        return
    table = Table(title=escape(title))
    for i, col in enumerate(columns):
        widest = max((len(_text(row[i])) for row in rows), default=0)
        table.add_column(
            col.name,
            justify="right" if col.right else "left",
            no_wrap=col.ident,
            min_width=max(widest, len(col.name)) if col.ident else None,
            overflow="fold",  # a figure cut to "0.…" reads as another figure
        )
    for row in rows:
        table.add_row(*(_rich(cell) for cell in row))
    console.print(table)


def print_pairs(title: str, pairs: Sequence[tuple[str, str]]) -> None:
    """A key-value table (``registry show``, ``pack inspect``): values never cut, so a hash
    can be copied whole; piped, a ``key  value`` line each."""
    console = Console()
    if not console.is_terminal:
        width = max((len(key) for key, _ in pairs), default=0)
        lines = [title, *(f"{key.ljust(width)}  {_text(value)}".rstrip() for key, value in pairs)]
        print("\n".join(lines), flush=True)
        return
    table = Table(title=escape(title), show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in pairs:
        table.add_row(escape(key), escape(_text(value)))
    console.print(table)


def plain_table(title: str, columns: Sequence[Column], rows: Sequence[Sequence[str | Cell]]) -> str:
    texts = [[c.name for c in columns], *([_text(cell) for cell in row] for row in rows)]
    widths = [max(len(row[i]) for row in texts) for i in range(len(columns))]
    lines = [title]
    for row in texts:
        cells = [
            text.rjust(width) if col.right else text.ljust(width)
            for text, width, col in zip(row, widths, columns, strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _text(cell: str | Cell) -> str:
    # One line per row: a newline in a device's text would look like another row.
    text = cell.text if isinstance(cell, Cell) else cell
    return text.replace("\n", " ")


def _rich(cell: str | Cell) -> str:
    if isinstance(cell, Cell) and cell.style:
        return f"[{cell.style}]{escape(_text(cell))}[/]"
    return escape(_text(cell))


def printable(text: str) -> str:
    """A name read from the store or a device as one printable line: a key may hold control
    characters (an ESC sequence would reach the operator's terminal), shown escaped."""
    return clip(text if text.isprintable() else ascii(text)[1:-1], 200)
