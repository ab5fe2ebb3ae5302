"""Markdown tables: the one writer behind every table the package prints or writes into a report."""
from __future__ import annotations

from typing import Iterable, Sequence


def markdown_table(columns: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub Markdown table of ``rows`` under the header ``columns``, each cell as ``str`` gives it (format and
    escape the cells first); no newline at the end."""
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)
