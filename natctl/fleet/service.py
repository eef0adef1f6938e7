"""The fleet's operations: join, list, drain, heartbeat, and moving a dead relay's lobbies.

Every move is one change through the Reconciler: the lobby's elements are planned for the relay it
leaves and the one it goes to, and each relay's part reaches its kernel (this one's now, the others'
through their outboxes), in the same store transaction as the rows.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

from natctl.config import Settings
from natctl.errors import Conflict, Exhausted, NatctlError, NotFound
from natctl.fleet.model import DEAD, DRAINING, LIVE, Relay, check_name, place
from natctl.fleet.rows import FleetRows
from natctl.store import Store
from natctl.sync import Reconciler


@dataclass(frozen=True)
class Moved:
    lobby: str
    source: str
    target: str


class Fleet:
    def __init__(self, rec: Reconciler) -> None:
        self.rec = rec

    @property
    def rows(self) -> FleetRows:
        rows = self.rec.fleet
        if rows is None:
            raise NatctlError("this relay's store is its own SQLite file: there is no fleet to show or change",
                              "set store = \"postgresql://...\" on every relay (README: When one VPS is not enough)")
        return rows

    def me(self) -> Relay | None:
        return self.rows.relay(self.rec.store.relay) if self.rec.store.relay else None

    def join(self, name: str | None, region: str, capacity: int = 0) -> Relay:
        """Register this machine (its relay IP) as a relay of the fleet; again to change its region or capacity,
        or to bring it back after a drain."""
        rows, store = self.rows, self.rec.store
        ip = self.rec.relay_ip
        name = check_name(name or socket.gethostname().split(".")[0])
        check_name(region, "region")
        with store.write():
            by_ip, by_name = rows.relay_at(ip), rows.relay(name)
            if by_ip is not None and by_ip.name != name:
                raise Conflict(f"relay IP {ip} already joined the fleet as {by_ip.name!r}",
                               f"run 'natctl relay join --name {by_ip.name}', or give this relay its own IP")
            if by_name is not None and by_name.ip != ip:
                raise Conflict(f"a relay named {name!r} already joined with IP {by_name.ip}",
                               "pick another --name (each relay has its own name and IP)")
            if by_name is None:
                relay = rows.add_relay(name, ip, region, capacity, self.rec.settings.registration_port)
            else:
                rows.update_relay(name, region, capacity, self.rec.settings.registration_port)
                relay = rows.relay(name)  # type: ignore[assignment]
        store.relay = name
        return relay

    def relays(self) -> list[Relay]:
        return self.rows.relays()

    def now(self) -> float:
        return self.rows.now()

    def beat(self) -> Relay | None:
        """This relay is alive; its load as its rows and kernel counters say (natctl.expiry keeps them)."""
        store = self.rec.store
        if not store.relay:
            return None
        activity = store.activity()
        quiet_after = 2.5 * self.rec.settings.cleanup_interval
        return self.rows.heartbeat(store.relay, len(activity), sum(count for count, _ in activity.values()),
                                   quiet_after)

    def drain(self, name: str) -> list[Moved]:
        """Take no new lobbies on ``name``, and move its open lobbies to the other live relays."""
        rows = self.rows
        relay = rows.relay(name)
        if relay is None:
            raise NotFound(f"no relay named {name!r} in the fleet", "see 'natctl relay list'")
        others = [r for r in rows.relays() if r.name != name and r.state == LIVE
                  and r.alive(rows.now(), self.rec.settings.fleet.dead_after)]
        if not others:
            raise Exhausted(f"relay {name!r} is the last live relay: its lobbies have nowhere to go",
                            "join another relay first (natctl relay join on it), then drain this one")
        with self.rec.store.write():
            rows.set_state(name, DRAINING)
        return self.evacuate(relay, any_region=True)

    def evacuate(self, relay: Relay, any_region: bool = False) -> list[Moved]:
        """Move every open lobby of ``relay`` to a live relay (of its region unless ``any_region``), in one change.
        A lobby that finds no relay stays where it is (nothing is lost) and is tried again next time."""
        rec, rows = self.rec, self.rows
        lobbies = rows.open_lobbies(relay.name)
        if not lobbies:
            return []
        ids = [lobby_id for lobby_id, _ in lobbies]
        moved: list[Moved] = []

        def scope(store: Store) -> frozenset:
            return frozenset().union(*(rec.plan_lobby(store, i) for i in ids))

        with rec.change(scope) as txn:
            moved.clear()
            relays, now = rows.relays(), rows.now()
            counts = {r.name: r.lobbies for r in relays}
            for lobby_id, name in rows.open_lobbies(relay.name):
                target = self._target(relays, now, relay, any_region, counts)
                if target is None:
                    continue
                self._move(txn.store, lobby_id, target.name)
                counts[target.name] = counts.get(target.name, 0) + 1
                moved.append(Moved(name, relay.name, target.name))
        return moved

    def _target(self, relays: list[Relay], now: float, source: Relay, any_region: bool,
                counts: dict[str, int]) -> Relay | None:
        dead_after = self.rec.settings.fleet.dead_after
        spread = [r if r.lobbies == counts.get(r.name, 0) else Relay(**{**r.__dict__, "lobbies": counts[r.name]})
                  for r in relays]  # the lobbies moved so far count as load
        regions: list[str | None] = [source.region]
        if any_region or self.rec.settings.fleet.failover == "any":
            regions.append(None)
        for region in regions:
            try:
                return place(spread, now, dead_after, region, exclude=(source.name,))
            except Exhausted:
                continue
        return None

    def _move(self, store: Store, lobby_id: int, target: str) -> None:
        """Place a lobby on ``target``: its host keeps its relay port when that is free there, else gets one.

        Its clients go: each is admitted again at its first packet to the new relay, with the host opening
        its NAT toward it first (registration v2), as after any host move. Kept, they would be forwarded
        to a host whose router never saw the new relay's client ports and drops what comes from them."""
        host = store.host(lobby_id)
        port = None
        if host is not None:
            port = host.relay_port
            if store.is_host_port(port, target) or port in set(store.client_port_numbers(target)):
                port = self.rec.allocator(store, relay=target).host_port()
        store.remove_clients(c.id for c in store.clients(lobby_id))
        self.rows.move_lobby(lobby_id, target, port)

    def failover(self, dead: list[str]) -> list[Moved]:
        """Mark these relays dead (their heartbeats stopped, as the daemon watched them) and move their lobbies."""
        rows, moved = self.rows, []
        for name in dead:
            relay = rows.relay(name)
            if relay is None:
                continue
            if relay.state != DEAD:
                with self.rec.store.write():
                    rows.set_state(name, DEAD)
            moved += self.evacuate(rows.relay(name) or relay)
        return moved

    def remove(self, name: str) -> None:
        """Forget a relay that has left for good (it must hold no open lobby)."""
        rows = self.rows
        with self.rec.store.write():
            if rows.relay(name) is None:
                raise NotFound(f"no relay named {name!r} in the fleet", "see 'natctl relay list'")
            if rows.open_lobbies(name):
                raise Conflict(f"relay {name!r} still holds open lobbies", f"drain it first: natctl relay drain {name}")
            rows.remove_relay(name)



def facts(settings: Settings, relay_ip: str) -> dict[str, Any]:
    """What natctl doctor checks of a fleet's relay (natctl.preflight.Facts' fleet fields); never fails."""
    from natctl.db import redact

    out: dict[str, Any] = {"store": redact(settings.store), "dead_after": settings.fleet.dead_after}
    try:
        store = Store(settings.store, timeout=min(settings.lock_timeout, 3.0))
    except NatctlError as err:
        return {**out, "store_error": err.message.rsplit("(", 1)[-1].rstrip(")") or err.message}
    try:
        rows = FleetRows(store)
        me = rows.relay_at(relay_ip) if relay_ip else None
        if me is not None:
            out.update(member=me.name, member_state=me.state, heartbeat_age=max(0.0, rows.now() - me.heartbeat))
    except NatctlError as err:
        out["store_error"] = err.message
    finally:
        store.close()
    return out
