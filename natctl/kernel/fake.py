"""An in-memory ``Kernel`` for unit tests, in the manner of knftables' fake.

It takes all of a transaction or none of it, refuses what nft would refuse
(an element of the wrong shape, a set the table lacks, a delete of an element
that is not there, a key added twice with two values), and dumps its state as
sorted text. ``trace`` follows a packet through the maps as the chains of
``skeleton()`` do. Never instead of the kernel tests: it checks what natctl
asks for, not what the kernel does with it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable

from natctl import packed
from natctl.errors import KernelError
from natctl.kernel.nft import DELIVERY_MARK, INTERVAL, TABLE, TYPES, Installed, comment_text, element_text, render
from natctl.model import Endpoint
from natctl.plan import DNAT, FWD, MASQ, NFT_SETS, SNAT, Changes, Element, Flow, Owner


def _ok(kind: str, v: object, interval: bool = False) -> bool:
    if kind == "ipv4_addr" and interval:  # a network, written as plan.py writes it (198.18.2.0/24)
        try:
            return isinstance(v, str) and str(ipaddress.IPv4Network(v)) == v
        except ValueError:
            return False
    if kind == "ipv4_addr":
        try:
            ipaddress.IPv4Address(v if isinstance(v, str) else "")
            return True
        except ValueError:
            return False
    if kind == "inet_proto":
        return v in ("udp", "tcp")
    if kind == "inet_service":
        return type(v) is int and 0 <= v <= 0xFFFF
    return False


def _shape_ok(values: tuple | None, typ: str | None, interval: bool = False) -> bool:
    if values is None or typ is None:
        return values is None and typ is None
    kinds = typ.split(" . ")
    return len(values) == len(kinds) and all(_ok(k, v, interval) for k, v in zip(kinds, values))


def _refuse(why: str) -> KernelError:
    return KernelError(f"nftables refused the change, nothing was applied ({why})", "fake")


def check(e: Element, with_value: bool = True) -> None:
    """Refuse an element that does not fit its set's declared type, as nft would."""
    if e.set not in TYPES:
        raise _refuse(f"no set {e.set} in table inet {TABLE}")
    ktype, vtype = TYPES[e.set]
    if not (_shape_ok(e.key, ktype, e.set in INTERVAL) and (not with_value or _shape_ok(e.value, vtype))):
        raise _refuse(f"{e} does not fit {ktype}{' : ' + vtype if vtype else ''}")


def transact(have: Iterable[Element], changes: Changes) -> set[Element]:
    """The elements after one transaction (deletes first, then adds), or KernelError and nothing."""
    by_key = {} if changes.create_table else {(e.set, e.key): e for e in have}
    for e in changes.delete:
        check(e, with_value=False)  # nft deletes by key alone
        if by_key.pop((e.set, e.key), None) is None:
            raise _refuse(f"no element {e} to delete")
    for e in changes.add:
        check(e)
        old = by_key.setdefault((e.set, e.key), e)
        if old.value != e.value:  # same key, another value: nft says "File exists"
            raise _refuse(f"{e} clashes with {old}")
    return set(by_key.values())


class FakeKernel:
    """In-memory kernel: all of a transaction or nothing, and a log of scripts sent."""

    name = "fake"
    owns = NFT_SETS
    transactions = 1
    delivery_mark = DELIVERY_MARK

    def __init__(self, fail: bool = False) -> None:
        self.installed = Installed()
        self.scripts: list[str] = []
        self.fail = fail
        self.gen: int | None = None
        self.reads = 0  # full reads: tests check that scoped changes avoid them
        # nftables' ruleset generation, one more per committed change; None: not modelled (tests that edit
        # ``installed`` by hand, as a foreign program would, must then add one themselves)
        self.commits: int | None = None
        self.blocked: list[tuple[str, int]] = []
        self.forgotten: list[Flow] = []  # conntrack flows natctl asked to forget

    def read(self, sets: Iterable[str] | None = None) -> Installed:
        if sets is not None:
            keep = set(sets)
            return Installed(elements={e for e in self.installed.elements if e.set in keep},
                             counters={k: v for k, v in self.installed.counters.items() if k[0] in keep})
        self.reads += 1
        return Installed(self.installed.table_ok, self.installed.present, set(self.installed.elements),
                         dict(self.installed.counters), owner=self.installed.owner)

    def read_packed(self, skip: Collection[str] = ()) -> Installed:
        """``read`` as a full reconcile reads the real kernel: its elements as bytes (natctl.packed)."""
        self.reads += 1 if self.owns - set(skip) else 0  # only the table's layout: no map read
        held = packed.held(e for e in self.installed.elements if e.set not in skip)
        return Installed(self.installed.table_ok, self.installed.present, owner=self.installed.owner, packed=held)

    def ruleset(self) -> int | None:
        return self.commits

    def apply(self, changes: Changes) -> None:
        if not changes:
            return
        if self.fail:
            raise _refuse("fake")
        if not self.installed.present and not changes.create_table:
            raise _refuse(f"no table inet {TABLE}")
        elements = transact(self.installed.elements, changes)
        self.scripts.append(render(changes))
        # Counters live with their elements: those that stay keep counting.
        keys = {(e.set, e.key) for e in elements}
        counters = {} if changes.create_table else {k: v for k, v in self.installed.counters.items() if k in keys}
        owner = None if changes.create_table else self.installed.owner
        self.installed = Installed(True, True, elements, counters, owner=changes.owner or owner)
        if changes.create_table or changes.generation is not None:
            self.gen = changes.generation
        if self.commits is not None:
            self.commits += 1

    def generation(self) -> int | None:
        return self.gen

    def owner(self) -> Owner | None:
        owner = self.installed.owner
        return Owner(owner.id, comment_text(owner.path)) if owner else None  # as nft keeps the comment

    def forget(self, flows: list[Flow]) -> int:
        self.forgotten.extend(flows)
        return len(flows)

    def block(self, ip: str, port: int) -> None:
        self.block_all([(ip, port)])

    def block_all(self, senders: Iterable[tuple[str, int]]) -> None:
        self.blocked.extend(dict.fromkeys(senders))
        if self.commits is not None:  # a transaction of its own, as in the kernel
            self.commits += 1

    def uninstall(self) -> bool:
        existed = self.installed.present
        self.installed = Installed()
        self.gen = None
        return existed

    def dump(self) -> str:
        """The table's elements as sorted nft text, one per line: for assertions and golden files."""
        if not self.installed.present:
            return ""
        lines = [f"add element inet {TABLE} {e.set} {{ {element_text(e, True)} }}" for e in self.installed.elements]
        lines += [f"add element inet {TABLE} blocked4 {{ {ip} . {port} }}" for ip, port in self.blocked]
        if self.installed.owner is not None:
            owner = self.installed.owner
            lines.append(f'add element inet {TABLE} owner {{ {owner.id} comment "{comment_text(owner.path)}" }}')
        return "\n".join([f"add table inet {TABLE}", *sorted(lines)]) + "\n"


def trace(elements: Iterable[Element], proto: str, src: Endpoint, dst: Endpoint) -> tuple[Endpoint, Endpoint] | None:
    """Where the first packet of a flow from ``src`` to ``dst`` (an address of the relay) goes.

    Follows skeleton()'s NAT chains over the maps: prerouting DNAT by dnat4 or,
    failing that, fwd4; postrouting SNAT by snat4, or masquerade by masq4
    (the relay has one NIC, so it masquerades as the address the packet was
    sent to). Returns the rewritten (source, destination), or None when nothing
    relays the packet: it goes to the relay itself (the daemon, or nowhere).
    """
    maps: dict[str, dict[tuple, tuple | None]] = {}
    for e in elements:
        maps.setdefault(e.set, {})[e.key] = e.value
    if proto not in ("udp", "tcp"):
        return None
    to = maps.get(DNAT, {}).get((src.ip, proto, src.port, dst.port))
    if to is None:
        to = maps.get(FWD, {}).get((proto, dst.port))
    if to is None:
        return None
    new_dst = Endpoint(to[0], to[1])
    new_src = maps.get(SNAT, {}).get((src.ip, proto, src.port, new_dst.ip, new_dst.port))
    if new_src is not None:
        return Endpoint(new_src[0], new_src[1]), new_dst
    if (new_dst.ip, proto, new_dst.port) in maps.get(MASQ, {}):
        return Endpoint(dst.ip, src.port), new_dst
    return src, new_dst
