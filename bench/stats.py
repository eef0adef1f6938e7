"""The one way the bench reduces many measurements to a few figures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100) of ``values``: one of them, never an interpolation (None if empty).

    The rule of udpblast.c's ``pct()`` (index ``q/100 * (n-1)``, rounded half
    up), so the round trips it reports and the figures measured in Python
    agree: with 50 samples p99 is the slowest one, p50 of an even count the
    upper middle value.
    """
    if not values:
        return None
    ordered = sorted(values)
    return ordered[int(q / 100 * (len(ordered) - 1) + 0.5)]


def summarize(values: Sequence[float]) -> dict[str, Any]:
    """Median with min and max (and every run, for the JSON)."""
    if not values:
        return {"median": None, "min": None, "max": None, "runs": []}
    return {"median": percentile(values, 50), "min": min(values), "max": max(values), "runs": list(values)}
