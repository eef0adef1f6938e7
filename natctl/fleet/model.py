"""A fleet's pure part: relays, where a lobby goes, and kernel changes as rows (no I/O).

Relays share one PostgreSQL store; each reconciles only its own lobbies into its own kernel. A change
made elsewhere to a relay's lobby is planned where it is made and waits in that relay's outbox
(``encode``), which the relay's daemon applies in one kernel transaction (``compose``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from natctl import plan as planner
from natctl.errors import Exhausted, NotFound, UsageError

LIVE, DRAINING, DEAD = "live", "draining", "dead"
STATES = (LIVE, DRAINING, DEAD)


@dataclass(frozen=True)
class Relay:
    """One relay of the fleet, as its row says. Times are the database's clock, never a relay's own."""

    name: str
    ip: str
    region: str
    capacity: int  # mappings it should carry at most (0: no limit); placement fills the emptiest first
    registration_port: int
    state: str
    joined: float
    heartbeat: float
    mappings: int = 0  # when it last said (its heartbeat)
    packets: int = 0
    pps: float = 0.0
    lobbies: int = 0  # open lobbies placed on it (counted by the listing)

    def alive(self, now: float, dead_after: float) -> bool:
        return self.state != DEAD and now - self.heartbeat < dead_after

    def load(self) -> float:
        """How full it is: a share of its capacity, or its mapping count when it has none."""
        return self.mappings / self.capacity if self.capacity else float(self.mappings)


def check_name(name: str, what: str = "relay name") -> str:
    if not (1 <= len(name) <= 63) or not all(c.isascii() and (c.isalnum() or c in "-_.") for c in name):
        raise UsageError(f"invalid {what} {name!r}", "use 1-63 letters, digits or -_.")
    return name


def place(relays: Sequence[Relay], now: float, dead_after: float, region: str | None = None,
          relay: str | None = None, exclude: Iterable[str] = ()) -> Relay:
    """The relay a new (or moved) lobby goes to: ``relay`` if named, else the least loaded live relay
    of ``region`` (of any region when none is given). A draining or dead relay takes nothing new."""
    skip = set(exclude)
    if relay is not None:
        for r in relays:
            if r.name == relay:
                if not r.alive(now, dead_after) or r.state != LIVE or r.name in skip:
                    raise Exhausted(f"relay {relay!r} is {r.state if r.state != LIVE else 'not answering'}",
                                    "pick another with --relay, or leave it out to place by region and load")
                return r
        raise NotFound(f"no relay named {relay!r} in the fleet", "see 'natctl relay list'")
    live = [r for r in relays if r.state == LIVE and r.alive(now, dead_after) and r.name not in skip]
    if region is not None:
        live = [r for r in live if r.region == region]
    full = [r for r in live if r.capacity and r.mappings >= r.capacity]
    live = [r for r in live if r not in full] or full  # a full relay still beats none: say so in its load
    if not live:
        where = f" in region {region!r}" if region is not None else ""
        raise Exhausted(f"no live relay{where} can take a lobby",
                        "start or join a relay there (natctl relay join), or place it with --region/--relay")
    return min(live, key=lambda r: (r.load(), r.lobbies, r.name))


# --- kernel changes as rows

def _element(e: planner.Element) -> list:
    return [e.set, list(e.key), None if e.value is None else list(e.value), e.comment]


def encode(changes: planner.Changes) -> str:
    return json.dumps({"add": [_element(e) for e in changes.add], "delete": [_element(e) for e in changes.delete]},
                      separators=(",", ":"))


def decode(text: str) -> planner.Changes:
    doc = json.loads(text)

    def elements(rows: list) -> tuple[planner.Element, ...]:
        return tuple(planner.Element(s, tuple(k), None if v is None else tuple(v), c) for s, k, v, c in rows)

    return planner.Changes(add=elements(doc["add"]), delete=elements(doc["delete"]))


def compose(first: planner.Changes, then: planner.Changes) -> planner.Changes:
    """One change that does ``first`` and then ``then`` (an element added and deleted again is neither)."""
    adds, deletes = set(first.add), set(first.delete)
    for e in then.delete:
        if e in adds:
            adds.discard(e)  # never reached the kernel
        else:
            deletes.add(e)
    for e in then.add:
        if e in deletes:
            deletes.discard(e)  # it was there before; it stays
        else:
            adds.add(e)
    return planner.Changes(add=tuple(sorted(adds)), delete=tuple(sorted(deletes)))
