"""A token bucket per source address (pure: time is passed in)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RateLimiter:
    rate: float  # tokens per second
    burst: float
    max_sources: int = 100_000  # bounded memory under a flood of spoofed sources
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)

    def allow(self, source: str, now: float) -> bool:
        tokens, last = self._buckets.get(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1:
            self._buckets[source] = (tokens, now)
            return False
        if len(self._buckets) >= self.max_sources and source not in self._buckets:
            self._buckets.clear()  # crude but bounded; a full bucket per new source is the default anyway
        self._buckets[source] = (tokens - 1, now)
        return True
