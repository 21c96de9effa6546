"""Markdown tables for the reports: one cell format and one table layout for every section."""

from __future__ import annotations

from typing import Any


def cell(value: Any, digits: int = 2) -> str:
    """A table cell: ``—`` for a missing value, floats to ``digits`` decimals."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> list[str]:
    """A Markdown table's lines: the header, its rule, one line per row of :func:`cell` values."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return lines
