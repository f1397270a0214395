"""Argument types and text tables shared by the subcommands."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def table(rows: list[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """Right-aligned text table; columns are (title, row key, format spec or "" for str)."""
    head = [title for title, _, _ in columns]
    body = [[format(r[key], fmt) if fmt else str(r[key]) for _, key, fmt in columns] for r in rows]
    widths = [max(len(c) for c in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])
