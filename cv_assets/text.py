"""Text for people: markdown tables for Dagster metadata, and safe rendering of untrusted
names (ids, paths) in messages. No Dagster, no store."""

from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

# C0/C1 control characters (NUL, ESC, DEL, ...) but not plain spaces.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def printable(text: object) -> str:
    """`text` with control characters escaped (\\x1b, \\x00 ...), so a hostile id or path
    never writes raw escape sequences to a terminal or a log."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


def markdown_cell(value) -> str:
    if isinstance(value, float):
        value = f"{value:.3f}" if math.isfinite(value) else str(value)
    return printable("" if value is None else value).replace("|", "\\|").replace("\n", " ").replace("\t", " ")


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence], limit: int | None = None, noun: str = "rows") -> str:
    """A markdown table (pipes and control characters in cells escaped). With `limit`, only
    the first `limit` rows are shown and a last line counts the others."""
    rows = list(rows)
    shown = rows if limit is None else rows[:limit]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(markdown_cell(v) for v in row) + " |" for row in shown]
    if len(rows) > len(shown):
        lines.append(f"\n…and {len(rows) - len(shown)} more {noun}")
    return "\n".join(lines)
