"""Structured logs: one JSON object per line on stderr (journald keeps them as they are)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any


def log(event: str, **fields: Any) -> None:
    """Log an event. Never pass a token here: tokens are secrets."""
    record = {"ts": round(time.time(), 3), "event": event, **fields}
    sys.stderr.write(json.dumps(record, default=str) + "\n")
    sys.stderr.flush()
