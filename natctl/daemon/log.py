"""Structured logs: one JSON object per line on stderr (journald keeps them as they are).

Events a stranger can cause at will (wrong tokens, refused senders) go
through ``Repeats``: the first of a kind in an interval is logged as it is,
the rest are counted and summed up in one line when the interval ends, so a
flood cannot fill a VPS's disk. Their counts are in the metrics too.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any


def log(event: str, **fields: Any) -> None:
    """Log an event. Never pass a token here: tokens are secrets."""
    record = {"ts": round(time.time(), 3), "event": event, **fields}
    sys.stderr.write(json.dumps(record, default=str) + "\n")
    sys.stderr.flush()


class Repeats:
    """At most two lines per kind of event per ``interval`` seconds, however many happen (time is passed in)."""

    def __init__(self, interval: float = 10.0, write: Callable[..., None] = log) -> None:
        self.interval, self.write = interval, write
        self._open: dict[str, tuple[float, int]] = {}  # event -> (interval start, events not logged)

    def note(self, now: float, event: str, **fields: Any) -> None:
        self.flush(now)
        start, hidden = self._open.get(event, (None, 0))
        if start is None:
            self._open[event] = (now, 0)
            self.write(event, **fields, note=f"further {event} events are counted for {self.interval:g} s")
        else:
            self._open[event] = (start, hidden + 1)

    def flush(self, now: float, force: bool = False) -> None:
        """End the intervals that are over: one line each with how many events were not logged."""
        for event, (start, hidden) in list(self._open.items()):
            if force or now - start >= self.interval:
                del self._open[event]
                if hidden:
                    self.write(f"{event}_repeated", count=hidden, seconds=round(now - start, 1))
