"""Planning (pure): store snapshot -> desired kernel elements -> changes.

The kernel state natctl owns is a handful of nftables maps and sets (and the
XDP map, which mirrors the same mappings). Each entry is an ``Element``; the
desired state is a frozenset of them, and a sync applies only the difference
from what the kernel holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import attrgetter

from natctl.admission import sender_networks
from natctl.model import Endpoint, Host, Snapshot

# Map and set names in table inet natctl. Keys are concatenations, values too.
DNAT = "dnat4"  # saddr . proto . sport . dport        : new daddr . new dport
# snat4's element counters are also the per-mapping packet counters: the
# postrouting NAT lookup counts a flow's first packet, a lookup in the forward
# chain every established one (both directions: a reply's de-NATed tuple is
# the other direction's key).
SNAT = "snat4"  # saddr . proto . sport . daddr . dport : new saddr . new sport
FWD = "fwd4"  # proto . dport                         : daddr . dport
FWDACCT = "fwdacct4"  # daddr . proto . dport (post-DNAT, counts packets)
MASQ = "masq4"  # daddr . proto . dport                  : masquerade these
HOSTPORTS = "hostports4"  # dport: host relay ports, where unknown senders reach the daemon
# host port . source network (an interval set): who a lobby admits (Lobby.allow; 0.0.0.0/0 when --open).
# An unknown sender to a host port outside these is dropped by the kernel, before the daemon.
ALLOW = "allow4"
# The XDP accelerator's map (UDP only): the whole rewrite of one direction.
XDP = "xdp4"  # saddr . sport . dport : new saddr . new sport . new daddr . new dport
NFT_SETS = frozenset({DNAT, SNAT, FWD, FWDACCT, MASQ, HOSTPORTS, ALLOW})


@dataclass(order=True, slots=True, unsafe_hash=True)
class Element:
    """One entry of an nftables map or set (value is None for a set).

    Hashed and compared by set, key and value (never the comment); never changed after it is made.
    Not ``frozen``: a frozen dataclass's constructor costs three times as much, and a full apply of
    100,000 mappings makes 400,000 of these."""

    set: str
    key: tuple
    value: tuple | None = None
    comment: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class Flow:
    """A conntrack original tuple whose entries die with a removed element."""

    proto: str
    saddr: str | None
    sport: int | None
    dport: int
    daddr: str | None = None  # the relay IP when known: then one exact delete, no table dump


@dataclass(frozen=True, slots=True)
class Owner:
    """The store a kernel table belongs to: its random id (see Store.store_id) and, for messages, its path."""

    id: int
    path: str = ""


@dataclass(frozen=True, slots=True)
class Changes:
    """What one kernel transaction adds and deletes, and the generation tag it leaves."""

    # Tuples, sorted (see diff); a full reconcile's are natctl.packed.PackedElements, which the netlink
    # writer packs without making an Element of each.
    add: Sequence[Element] = ()
    delete: Sequence[Element] = ()
    create_table: bool = False
    # A fresh random tag written to the kernel with the change (and to the store
    # with its commit): when both still hold the same tag, the kernel is known
    # to mirror the store, and a change may plan only the elements it touches.
    generation: int | None = None
    # The store that writes this change, written to the kernel with it (a full reconcile sets it):
    # another store then refuses to reconcile over this table unless told to adopt it.
    owner: Owner | None = None

    def __bool__(self) -> bool:
        return bool(self.add or self.delete or self.create_table or self.generation is not None
                    or self.owner is not None)

    def flows(self) -> list[Flow]:
        """Conntrack tuples to flush after the deletes: flows to relay ports that went away."""
        out = []
        # A removed mapping's SNAT values name the relay IP its flows were sent to.
        relay = {e.value[0] for e in self.delete if e.set == SNAT and e.value}
        daddr = relay.pop() if len(relay) == 1 else None
        for e in self.delete:
            if e.set == DNAT:
                saddr, proto, sport, dport = e.key
                out.append(Flow(proto, saddr, sport, dport, daddr))
            elif e.set == FWD:
                proto, dport = e.key
                out.append(Flow(proto, None, None, dport))
        return out


@dataclass(frozen=True, slots=True)
class Mapping:
    """One client <-> host pairing, the unit users add and remove."""

    lobby: str
    proto: str
    host: Endpoint
    client: Endpoint
    host_port: int
    client_port: int
    client_id: int = 0


def live_hosts(snap: Snapshot, now: float | None) -> dict[int, Host]:
    """Hosts of open, unexpired lobbies, by lobby id (``now`` None: TTLs are not looked at)."""
    live = {lb.id for lb in snap.lobbies if lb.closed is None and not (now is not None and lb.expired(now))}
    return {h.lobby_id: h for h in snap.hosts if h.lobby_id in live}


def mappings(snap: Snapshot, now: float | None) -> list[Mapping]:
    """The live mappings: settled clients of open, unexpired lobbies that have a host.

    A client's host side is the host's address as seen from that client's relay
    port when its punch taught one (a symmetric NAT), else its registered address.
    """
    live = {lb.id: lb for lb in snap.lobbies}
    hosts = live_hosts(snap, now)
    out = []
    for c in snap.clients:
        host = hosts.get(c.lobby_id)
        if host is not None and not c.pending:  # a pending client waits for its host's punch
            out.append(Mapping(live[c.lobby_id].name, c.proto, c.host or host.addr, c.addr, host.relay_port,
                               c.relay_port, c.id))
    return out


def mapping_elements(m: Mapping, relay_ip: str) -> list[Element]:
    """Both directions of one mapping: client->relay:P_h->host and host->relay:P_c->client."""
    c, h, tag = m.client, m.host, f"lobby {m.lobby}"
    return [
        Element(DNAT, (c.ip, m.proto, c.port, m.host_port), (h.ip, h.port), tag),
        Element(DNAT, (h.ip, m.proto, h.port, m.client_port), (c.ip, c.port), tag),
        Element(SNAT, (c.ip, m.proto, c.port, h.ip, h.port), (relay_ip, m.client_port), tag),
        Element(SNAT, (h.ip, m.proto, h.port, c.ip, c.port), (relay_ip, m.host_port), tag),
    ] + ([
        Element(XDP, (c.ip, c.port, m.host_port), (relay_ip, m.client_port, h.ip, h.port), tag),
        Element(XDP, (h.ip, h.port, m.client_port), (relay_ip, m.host_port, c.ip, c.port), tag),
    ] if m.proto == "udp" else [])


def plan(snap: Snapshot, now: float | None, sets: frozenset[str] | None = None) -> frozenset[Element]:
    """Desired kernel elements for a snapshot at time ``now`` (expired things are left out).

    ``sets`` keeps only the maps a backend owns (nftables alone has no XDP map). A full reconcile plans
    the same elements as bytes (natctl.packed.plan), without an object per element.
    """
    hosts = live_hosts(snap, now)
    out = others(snap, now, hosts)
    for m in mappings(snap, now):
        out += mapping_elements(m, snap.relay_ip)
    return frozenset(e for e in out if sets is None or e.set in sets)


def others(snap: Snapshot, now: float | None, hosts: dict[int, Host]) -> list[Element]:
    """Every element that is not a mapping's: host ports, allowed networks, forwards (a few per lobby)."""
    out: list[Element] = [Element(HOSTPORTS, (h.relay_port,)) for h in hosts.values()]
    for lb in snap.lobbies:
        if lb.id in hosts:
            # The networks admission.check admits a sender from: the kernel drops the others.
            out += [Element(ALLOW, (hosts[lb.id].relay_port, net), None, f"lobby {lb.name}")
                    for net in sender_networks(lb)]
    for f in snap.forwards:
        if now is not None and f.expired(now):
            continue
        tag = f"forward {f.port}" + (f" {f.owner}" if f.owner else "")
        for proto in f.protos:
            target = (f.target.ip, proto, f.target.port)
            out.append(Element(FWD, (proto, f.port), (f.target.ip, f.target.port), tag))
            out.append(Element(FWDACCT, target, None, tag))
            if f.masquerade:
                out.append(Element(MASQ, target, None, tag))
    return out


def diff(desired: Iterable[Element], actual: Iterable[Element], table_ok: bool = True) -> Changes:
    """What to delete and add so that the kernel holds exactly ``desired``.

    An element whose value changed is deleted and added again; both happen in
    the same transaction, so no packet sees the key missing.
    """
    want = desired if isinstance(desired, (set, frozenset)) else set(desired)
    have = (actual if isinstance(actual, (set, frozenset)) else set(actual)) if table_ok else set()
    return Changes(
        add=_sorted(want - have),
        delete=_sorted(have - want),
        create_table=not table_ok,
    )


_BY_KEY = attrgetter("key")
# Above this many elements a side of a diff is grouped by map but not sorted by key: sorting 400,000 keys
# (tuples of strings) costs more than writing them, and the kernel takes them in any order. Scripts and
# golden files of ordinary changes stay sorted.
SORT_MAX = 20_000


def _sorted(elements: set[Element] | frozenset[Element]) -> tuple[Element, ...]:
    """By map, then key: stable scripts and golden tests. A map holds a key once, so one side of a diff
    lists it once: each map sorts apart by its keys (all alike), with a C-level getter, not a tuple built
    per element."""
    by_set: dict[str, list[Element]] = {}
    for e in elements:
        by_set.setdefault(e.set, []).append(e)
    out: list[Element] = []
    for name in sorted(by_set):
        out += sorted(by_set[name], key=_BY_KEY) if len(elements) <= SORT_MAX else by_set[name]
    return tuple(out)
