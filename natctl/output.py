"""Printing for people (tables) and for scripts (--json)."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any


def emit_json(obj: Any) -> None:
    import json

    from natctl.views import as_json

    json.dump(as_json(obj), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], empty: str = "") -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    if not rows and empty:
        console.print(empty)
        return
    t = Table(title=title, title_justify="left", show_edge=False, header_style="bold")
    for col in columns:
        t.add_column(col, justify="right" if col.endswith(("port", "packets", "bytes", "clients")) else "left")
    for row in rows:
        t.add_row(*("-" if v is None else str(v) for v in row))
    console.print(t)


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
