"""Cleanup: lobbies, forwards and LANs past their TTL, mappings whose kernel counters stopped moving,
and LAN members whose tunnel went quiet.

The daemon runs it every ``cleanup_interval``; ``natctl cleanup`` (cron, the
systemd timer) runs the same code once.
"""

from __future__ import annotations

from natctl import plan as planner
from natctl.store import Store
from natctl.sync import Reconciler


def cleanup(rec: Reconciler, apply: bool = True) -> dict[str, list]:
    """Close lobbies past their TTL, remove forwards past theirs, then mappings that went idle."""
    now = rec.clock()
    lobbies, forwards = rec.store.expired(now)
    scopes = [rec.lobby_scope(lb.name) for lb in lobbies] + [rec.forward_scope(f.port) for f in forwards]
    with rec.change(lambda st: frozenset().union(*(scope(st) for scope in scopes)), apply) as txn:
        for lb in lobbies:
            txn.store.close_lobby(lb.id, now)
        for f in forwards:
            txn.store.remove_forward(f.port)
    idle = expire_idle(rec, apply) if apply else []
    lans = _lans(rec) if apply and not rec.store.fleet else {"lans": [], "members": []}
    return {"lobbies": [lb.name for lb in lobbies], "forwards": [f.port for f in forwards], "idle": idle, **lans}


def _lans(rec: Reconciler) -> dict[str, list[str]]:
    """Virtual LANs past their TTL and members whose tunnel went quiet (natctl.lan), in the same cleanup."""
    from natctl.lan.service import LanService

    return LanService(rec).cleanup()


def expire_idle(rec: Reconciler, apply: bool = True) -> list[str]:
    """Remove mappings whose kernel packet counters have not moved for ``idle_timeout``.

    Activity is the sum of every counter the kernel keeps for a mapping's
    elements (nftables and XDP alike); the store remembers the last sum, so
    this works the same from the daemon and from a cron job.
    """
    if rec.settings.idle_timeout <= 0:
        return []
    # Only the maps whose elements count packets: reading them is most of the cost at scale.
    installed = rec.kernel.read(rec.kernel.owns & {planner.SNAT, planner.XDP})
    now = rec.clock()
    moved: dict[int, tuple[int, float]] = {}
    idle: list[planner.Mapping] = []
    seen = rec.store.activity()
    snap = rec.store.snapshot(rec.relay_ip)
    lobby_of = {c.id: c.lobby_id for c in snap.clients}
    for m in planner.mappings(snap, now):
        count = sum(installed.counters.get((e.set, e.key), (0, 0))[0]
                    for e in planner.mapping_elements(m, rec.relay_ip))
        last_count, last_seen = seen.get(m.client_id, (0, now))
        if count != last_count:
            moved[m.client_id] = (count, now)
        elif now - last_seen >= rec.settings.idle_timeout:
            idle.append(m)

    def scope(store: Store) -> frozenset[planner.Element]:  # the idle clients' elements, nothing else
        return frozenset().union(*(rec.plan_lobby(store, lobby_of[m.client_id], client=(m.proto, m.client))
                                   for m in idle))

    # Clients admitted or announced that never got into the kernel (a host that never punched while
    # the daemon died, a noray peer that never sent): nothing to scope, their rows just go.
    stale = [c for c in snap.clients if c.pending and now - c.created >= rec.settings.idle_timeout]
    with rec.change(scope, apply) as txn:
        txn.store.touch_clients(moved)
        for m in idle:
            txn.store.remove_client(m.client_id)
        for c in stale:
            txn.store.remove_client(c.id)
    return [f"{m.lobby}/{m.proto}/{m.client}" for m in idle] + [f"{c.proto}/{c.addr} (never arrived)" for c in stale]
