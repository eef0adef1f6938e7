"""A fleet's rows in the shared PostgreSQL store: relays, lobby placement, and each relay's outbox.

Times come from the database's clock (``now``), so relays whose clocks disagree still agree on
who is alive. Writes happen inside ``Store.write()`` like every other row.
"""

from __future__ import annotations

from typing import Any

from natctl import plan as planner
from natctl.errors import NatctlError
from natctl.fleet.model import Relay, decode, encode
from natctl.store import Store

CHANNEL = "natctl_fleet"  # one LISTEN channel; the payload names the relay that has new work
_COLUMNS = "name, ip, region, capacity, registration_port, state, joined, heartbeat, mappings, packets, pps"


def _relay(r: Any, lobbies: int = 0) -> Relay:
    return Relay(r["name"], r["ip"], r["region"], r["capacity"], r["registration_port"], r["state"],
                 r["joined"], r["heartbeat"], r["mappings"], r["packets"], r["pps"], lobbies)


class FleetRows:
    def __init__(self, store: Store) -> None:
        if not store.fleet:
            raise NatctlError("this relay's store is not shared: a fleet needs a PostgreSQL store",
                              "set store = \"postgresql://...\" (README: When one VPS is not enough)")
        self.store = store
        self.db = store.db

    def now(self) -> float:
        return float(self.db.execute("SELECT extract(epoch FROM clock_timestamp())::float8").fetchone()[0])

    # --- relays

    def relays(self) -> list[Relay]:
        counts = {r[0]: r[1] for r in self.db.execute(
            "SELECT relay, COUNT(*) FROM lobbies WHERE closed IS NULL GROUP BY relay")}
        return [_relay(r, counts.get(r["name"], 0))
                for r in self.db.execute(f"SELECT {_COLUMNS} FROM relays ORDER BY region, name")]

    def relay(self, name: str) -> Relay | None:
        r = self.db.execute(f"SELECT {_COLUMNS} FROM relays WHERE name=?", (name,)).fetchone()
        return _relay(r) if r else None

    def relay_at(self, ip: str) -> Relay | None:
        r = self.db.execute(f"SELECT {_COLUMNS} FROM relays WHERE ip=?", (ip,)).fetchone()
        return _relay(r) if r else None

    def add_relay(self, name: str, ip: str, region: str, capacity: int, registration_port: int) -> Relay:
        now = self.now()
        self.db.execute(f"INSERT INTO relays ({_COLUMNS}, packets_at) VALUES (?,?,?,?,?,'live',?,?,0,0,0,?)",
                        (name, ip, region, capacity, registration_port, now, now, now))
        relay = self.relay(name)
        assert relay is not None
        return relay

    def update_relay(self, name: str, region: str, capacity: int, registration_port: int) -> None:
        self.db.execute("UPDATE relays SET region=?, capacity=?, registration_port=?, state='live', "
                        "heartbeat=extract(epoch FROM clock_timestamp()) WHERE name=?",
                        (region, capacity, registration_port, name))

    def set_state(self, name: str, state: str) -> None:
        self.db.execute("UPDATE relays SET state=? WHERE name=?", (state, name))

    def heartbeat(self, name: str, mappings: int, packets: int, quiet_after: float) -> Relay | None:
        """This relay is alive; its load as its kernel counts it. The count moves when cleanup reads the
        counters (every cleanup interval): packets/s is its last move over the time since the one before,
        and 0 once it has not moved for ``quiet_after`` seconds. A relay marked dead that beats again comes
        back live, with none of its old lobbies."""
        r = self.db.execute(
            "WITH t AS (SELECT extract(epoch FROM clock_timestamp())::float8 AS now) "
            "UPDATE relays SET "
            "pps = CASE WHEN ? > packets AND packets_at > 0 THEN (? - packets) / GREATEST(t.now - packets_at, 0.001) "
            "           WHEN ? = packets AND t.now - packets_at > ? THEN 0 ELSE pps END, "
            "packets_at = CASE WHEN ? <> packets THEN t.now ELSE packets_at END, "
            "mappings=?, packets=?, heartbeat=t.now, state = CASE WHEN state='dead' THEN 'live' ELSE state END "
            f"FROM t WHERE name=? RETURNING {_COLUMNS}",
            (packets, packets, packets, quiet_after, packets, mappings, packets, name)).fetchone()
        return _relay(r) if r else None

    def remove_relay(self, name: str) -> None:
        self.db.execute("DELETE FROM outbox WHERE relay=?", (name,))
        self.db.execute("DELETE FROM relays WHERE name=?", (name,))

    # --- placement

    def lobby_relay(self, lobby_id: int) -> tuple[str, str] | None:
        """(relay name, relay IP) of a lobby's relay."""
        r = self.db.execute("SELECT r.name, r.ip FROM lobbies l JOIN relays r ON r.name = l.relay WHERE l.id=?",
                            (lobby_id,)).fetchone()
        return (r[0], r[1]) if r else None

    def open_lobbies(self, relay: str) -> list[tuple[int, str]]:
        return [(r[0], r[1]) for r in self.db.execute(
            "SELECT id, name FROM lobbies WHERE relay=? AND closed IS NULL ORDER BY id", (relay,))]

    def move_lobby(self, lobby_id: int, relay: str, host_port: int | None) -> None:
        """Place an open lobby on another relay; its host keeps its address, its port is the new relay's."""
        self.db.execute("UPDATE lobbies SET relay=? WHERE id=?", (relay, lobby_id))
        if host_port is not None:
            self.db.execute("UPDATE hosts SET relay=?, relay_port=? WHERE lobby_id=?", (relay, host_port, lobby_id))

    # --- outbox: kernel changes waiting for a relay's daemon

    def post(self, relay: str, changes: planner.Changes) -> None:
        self.db.execute("INSERT INTO outbox (relay, changes, created) VALUES (?,?,extract(epoch FROM now()))",
                        (relay, encode(changes)))
        self.db.execute("SELECT pg_notify(?, ?)", (CHANNEL, relay))  # delivered when the change commits

    def take(self, relay: str) -> list[planner.Changes]:
        """A relay's waiting changes, oldest first, removed (inside the change that applies them)."""
        rows = self.db.execute("DELETE FROM outbox WHERE relay=? RETURNING id, changes", (relay,)).fetchall()
        return [decode(r[1]) for r in sorted(rows, key=lambda r: r[0])]

    def pending(self, relay: str) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM outbox WHERE relay=?", (relay,)).fetchone()[0])

    def clear(self, relay: str) -> None:
        self.db.execute("DELETE FROM outbox WHERE relay=?", (relay,))
