"""Planning and diffing in bytes (pure): a full reconcile of 400,000 elements without an object each.

Each element of a map or set is one ``bytes``: its key then its value, every field as nftables keeps it
in its registers (an address 4 bytes, a protocol 1 and a port 2, both big-endian, each field of a
concatenation padded to 4 bytes; an interval set's key then its key end). That is also what the
kernel's netlink dump answers (natctl.kernel.nldump), so planned and installed compare as bytes, and the
netlink writer frames them as they are. ``unpack`` makes an ``Element`` again where one is needed (the
nft writer, the fake kernel, the XDP map, the conntrack flows of a delete).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from typing import overload

from natctl.model import Snapshot
from natctl.plan import ALLOW, DNAT, FWD, FWDACCT, HOSTPORTS, MASQ, SNAT, XDP, Changes, Element, live_hosts, others

# Fields of each key and value: a(ddress), p(rotocol), s(ervice, a port); the orders of plan.py's tuples.
FIELDS: dict[str, tuple[str, str]] = {
    DNAT: ("apss", "as"), SNAT: ("apsas", "as"), FWD: ("ps", "as"), FWDACCT: ("aps", ""), MASQ: ("aps", ""),
    HOSTPORTS: ("s", ""), ALLOW: ("sa", ""), XDP: ("ass", "asas"),
}
INTERVAL = frozenset({ALLOW})  # key, then key end: the first and last address of each network
PROTO = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}
PROTO_NAMES = {v: k for k, v in PROTO.items()}

Desired = dict[str, dict[bytes, str]]  # per map: element bytes -> comment
Held = Mapping[str, Collection[bytes]]  # per map: the element bytes the kernel holds


def _fmt(fields: str) -> str:
    """A lone field is as wide as it is; a concatenation pads each field to 4 bytes."""
    if len(fields) == 1:
        return {"a": "4s", "p": "B", "s": "H"}[fields]
    return "".join({"a": "4s", "p": "B3x", "s": "H2x"}[f] for f in fields)


class Layout:
    """One map's element bytes: key size, and the struct of key and value together."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.kf, self.vf = FIELDS[name]
        self.interval = name in INTERVAL
        key = _fmt(self.kf)
        self.ksize = struct.calcsize("!" + key) * (2 if self.interval else 1)
        self.struct = struct.Struct("!" + key * (2 if self.interval else 1) + (_fmt(self.vf) if self.vf else ""))
        self.size = self.struct.size


LAYOUTS = {name: Layout(name) for name in FIELDS}


class _Addresses(dict):
    """Dotted address -> its 4 bytes, remembered (a plan repeats the same few addresses many times)."""

    def __missing__(self, key: str) -> bytes:
        if len(self) > 1 << 17:  # bounded: the hot ones (relay, hosts) come back at once
            self.clear()
        b = self[key] = socket.inet_aton(key)
        return b


_ADDR = _Addresses()


def _conv(kind: str, v: object) -> object:
    if kind == "a":
        return _ADDR[v] if isinstance(v, str) else socket.inet_aton(str(v))
    if kind == "p":
        return PROTO[v] if isinstance(v, str) else int(v)  # type: ignore[call-overload]
    return int(v)  # type: ignore[call-overload]


def _ends(net: object) -> tuple[str, str]:
    n = ipaddress.IPv4Network(str(net), strict=False)
    return str(n.network_address), str(n.broadcast_address)


def pack(e: Element) -> bytes:
    """One element as bytes (ValueError, KeyError, struct.error, OSError: it does not fit its map)."""
    lay = LAYOUTS[e.set]
    if lay.interval:
        ends = [_ends(v) if k == "a" else (v, v) for k, v in zip(lay.kf, e.key, strict=True)]
        args = [_conv(k, end[i]) for i in (0, 1) for k, end in zip(lay.kf, ends, strict=True)]
    else:
        args = [_conv(k, v) for k, v in zip(lay.kf, e.key, strict=True)]
    if lay.vf:
        if e.value is None:
            raise ValueError(f"{e.set} element without a value")
        args += [_conv(k, v) for k, v in zip(lay.vf, e.value, strict=True)]
    return lay.struct.pack(*args)


def _field(kind: str, v: object) -> object:
    if kind == "a":
        return socket.inet_ntoa(v)  # type: ignore[arg-type]
    if kind == "p":
        return PROTO_NAMES.get(v, v)  # type: ignore[call-overload]
    return v


def _network(low: str, high: str) -> str:
    """An interval's ends as plan.py writes them: a CIDR, or "low-high" when they make none."""
    nets = list(ipaddress.summarize_address_range(ipaddress.IPv4Address(low), ipaddress.IPv4Address(high)))
    return str(nets[0]) if len(nets) == 1 else f"{low}-{high}"


def unpack(name: str, data: bytes, comment: str = "") -> Element:
    """The Element of one element's bytes (with a value only if its map has one)."""
    lay = LAYOUTS[name]
    raw = lay.struct.unpack(data)
    n = len(lay.kf)
    if lay.interval:
        low = [_field(k, v) for k, v in zip(lay.kf, raw[:n], strict=True)]
        high = [_field(k, v) for k, v in zip(lay.kf, raw[n:2 * n], strict=True)]
        key = tuple(_network(str(a), str(b)) if k == "a" else a for k, a, b in zip(lay.kf, low, high, strict=True))
        n *= 2
    else:
        key = tuple(_field(k, v) for k, v in zip(lay.kf, raw[:n], strict=True))
    value = tuple(_field(k, v) for k, v in zip(lay.vf, raw[n:], strict=True)) if lay.vf else None
    return Element(name, key, value, comment)


# A client as plan() reads it: lobby id, proto, ip, port, relay port, host ip, host port (None: its host's
# registered address), pending. Store.client_rows gives these without a Client object per row.
ClientRow = tuple[int, str, str, int, int, "str | None", "int | None", int]
MAPPING_SETS = frozenset({DNAT, SNAT, XDP})  # the maps planned from the clients' rows


def plan(snap: Snapshot, now: float | None, sets: Collection[str] | None = None,
         rows: Iterable[ClientRow] | None = None) -> Desired:
    """``natctl.plan.plan`` as bytes: per map, element bytes -> comment (a dict: each element once).

    A mapping's four (six with XDP) elements are packed straight from the clients' rows (``rows``, else the
    snapshot's clients), one struct call each; the few other elements (host ports, networks, forwards) go
    through plan.others."""
    keep = set(FIELDS) if sets is None else set(sets)
    out: Desired = {name: {} for name in keep if name in FIELDS}
    hosts = live_hosts(snap, now)
    for e in others(snap, now, hosts):
        if e.set in out:
            out[e.set][pack(e)] = e.comment
    dnat, snat, xdp = out.get(DNAT), out.get(SNAT), out.get(XDP)
    dn, sn, xd = LAYOUTS[DNAT].struct.pack, LAYOUTS[SNAT].struct.pack, LAYOUTS[XDP].struct.pack
    names = {lb.id: f"lobby {lb.name}" for lb in snap.lobbies}
    relay, addr, proto = socket.inet_aton(snap.relay_ip), _ADDR, PROTO
    if rows is None:
        rows = ((c.lobby_id, c.proto, c.addr.ip, c.addr.port, c.relay_port, c.host.ip if c.host else None,
                 c.host.port if c.host else None, c.pending) for c in snap.clients)
    for lobby_id, pr, cip, cport, cp, hip, hport, pending in rows:  # as plan.mappings and mapping_elements
        host = hosts.get(lobby_id)
        if host is None or pending:
            continue
        if hip is None:
            hip, hport = host.addr.ip, host.addr.port
        tag, hp = names[lobby_id], host.relay_port
        ca, ha, p = addr[cip], addr[hip], proto[pr]
        if dnat is not None:
            dnat[dn(ca, p, cport, hp, ha, hport)] = tag
            dnat[dn(ha, p, hport, cp, ca, cport)] = tag
        if snat is not None:
            snat[sn(ca, p, cport, ha, hport, relay, cp)] = tag
            snat[sn(ha, p, hport, ca, cport, relay, hp)] = tag
        if xdp is not None and pr == "udp":
            xdp[xd(ca, cport, hp, relay, cp, ha, hport)] = tag
            xdp[xd(ha, hport, cp, relay, hp, ca, cport)] = tag
    return out


class PackedElements(Sequence[Element]):
    """One side of a diff, as element bytes per map: ``len`` at once, Elements only when iterated.

    Iterated (the nft writer, the fake kernel) it makes each Element then; the netlink writer reads
    ``groups`` and frames the bytes as they are."""

    def __init__(self, groups: dict[str, tuple[list[bytes], Mapping[bytes, str] | None]]) -> None:
        self.groups = {name: g for name, g in groups.items() if g[0]}
        self._n = sum(len(g[0]) for g in self.groups.values())
        self._made: tuple[Element, ...] | None = None

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[Element]:
        for name in sorted(self.groups):
            items, comments = self.groups[name]
            for data in items:
                yield unpack(name, data, comments.get(data, "") if comments is not None else "")

    @overload
    def __getitem__(self, i: int) -> Element: ...

    @overload
    def __getitem__(self, i: slice) -> Sequence[Element]: ...

    def __getitem__(self, i: int | slice) -> Element | Sequence[Element]:
        if self._made is None:
            self._made = tuple(self)
        return self._made[i]

    def __repr__(self) -> str:
        return f"PackedElements({', '.join(f'{k}: {len(v[0])}' for k, v in sorted(self.groups.items()))})"

    def only(self, names: Collection[str]) -> PackedElements:
        return PackedElements({k: v for k, v in self.groups.items() if k in names})

    def without(self, names: Collection[str]) -> PackedElements:
        return PackedElements({k: v for k, v in self.groups.items() if k not in names})


def diff(desired: Desired, held: Held, table_ok: bool = True) -> Changes:
    """``natctl.plan.diff`` in bytes: what to delete and add so that the kernel holds exactly ``desired``.

    Each side is a list of references to bytes that exist already (the plan's, the read's), in the
    order they were planned or read: no copies, no sorting."""
    adds: dict[str, tuple[list[bytes], Mapping[bytes, str] | None]] = {}
    deletes: dict[str, tuple[list[bytes], Mapping[bytes, str] | None]] = {}
    for name in sorted(set(desired) | (set(held) if table_ok else set())):
        want = desired.get(name, {})
        have = held.get(name, ()) if table_ok else ()
        if not have:
            adds[name] = (list(want), want)
            continue
        have_set = have if isinstance(have, (set, frozenset, dict)) else set(have)
        adds[name] = ([d for d in want if d not in have_set], want)
        deletes[name] = ([d for d in have_set if d not in want], None)
    return Changes(add=PackedElements(adds), delete=PackedElements(deletes), create_table=not table_ok)


def held(elements: Iterable[Element]) -> dict[str, set[bytes]]:
    """Elements (a kernel's read, a fake's) as bytes per map, as natctl.kernel.nldump reads them."""
    out: dict[str, set[bytes]] = {}
    for e in elements:
        if e.set in LAYOUTS:
            out.setdefault(e.set, set()).add(pack(e))
    return out
