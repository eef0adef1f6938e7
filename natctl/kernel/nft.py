"""nftables backend: table inet natctl, rendered as text, applied in one transaction.

The skeleton (table, sets, chains) goes through libnftables (the python3-nftables
binding) as one script. A sync's elements go as one nfnetlink batch
(natctl.kernel.nlbatch, the ``netlink`` writer) or, with ``writer = "nft"``, as
one libnftables script; either way the kernel takes all of a sync or none of it.
Reads use the JSON listing. natctl owns ``table inet natctl`` alone and touches
no other table.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from natctl.errors import KernelError
from natctl.plan import ALLOW, DNAT, FWD, FWDACCT, HOSTPORTS, MASQ, SNAT, Changes, Element, Owner

TABLE = "natctl"
# An empty set whose name carries the layout version: nft 1.0.6 does not
# show table comments in JSON, and a natctl with another layout must rebuild.
SCHEMA = "schema_v9"
# Packets natctl's daemon sends itself (a client's first packets, delivered to
# the host from relay:client_port) carry this mark and skip conntrack, so they
# never take the tuple the client's own flow will need.
DELIVERY_MARK = 0x4E415443
# Unknown senders to host ports reach the daemon at this rate at most.
# Per source IP: players behind one home router share it, so leave room for a crowd joining.
UNKNOWN_RATE_PER_SOURCE = "200/second burst 100 packets"
UNKNOWN_RATE_TOTAL = "2000/second burst 500 packets"
BLOCK_SECONDS = 60
# A PUNCH starts "NATC", version 2, type 5 (natctl.daemon.wire): 6 bytes after the UDP header.
PUNCH_HEAD = int.from_bytes(b"NATC\x02\x05", "big")
PUNCH_SIZE = 10
CHUNK = 2000  # elements per statement: keeps each line short, still one transaction

CHAINS = ("rawpre", "prerouting", "forward", "input", "output", "postrouting")  # skeleton()'s
# Key and value types of every map/set, in the order plan.py builds tuples.
TYPES: dict[str, tuple[str, str | None]] = {
    DNAT: ("ipv4_addr . inet_proto . inet_service . inet_service", "ipv4_addr . inet_service"),
    SNAT: ("ipv4_addr . inet_proto . inet_service . ipv4_addr . inet_service", "ipv4_addr . inet_service"),
    FWD: ("inet_proto . inet_service", "ipv4_addr . inet_service"),
    FWDACCT: ("ipv4_addr . inet_proto . inet_service", None),
    MASQ: ("ipv4_addr . inet_proto . inet_service", None),
    HOSTPORTS: ("inet_service", None),
    ALLOW: ("inet_service . ipv4_addr", None),
}
# Interval sets: their ipv4_addr fields hold networks (plan.py writes "198.18.2.0/24", "198.18.2.5/32").
INTERVAL = frozenset({ALLOW})
COMMENT_MAX = 128  # nft takes at most 128 characters in an element's comment

L4 = "meta nfproto ipv4 meta l4proto { tcp, udp }"
# Only these sets carry per-element counters (per-CPU memory each, and about a
# sixth of an install's time): the ones whose lookups count packets.
COUNTED = frozenset({SNAT, FWDACCT})
SIZED = frozenset({DNAT, SNAT})  # the maps of every mapping, two elements each
MAX_ELEMENTS = 262144


def skeleton() -> str:
    """The table with its maps and chains; every lookup is a map lookup, never a rule per mapping."""
    sets = []
    for name, (ktype, vtype) in TYPES.items():
        kind = "map" if vtype else "set"
        typ = f"{ktype} : {vtype}" if vtype else ktype
        counter = "\n    counter" if name in COUNTED else ""
        flags = "\n    flags interval" if name in INTERVAL else ""
        # A fixed size makes the kernel use its fixed hash, not the resizable one: 100,000 mappings go in
        # 0.5 s faster and it never rehashes. The cap is the XDP map's (NATCTL_MAX_ENTRIES): 131,072 mappings.
        size = f"\n    size {MAX_ELEMENTS}" if name in SIZED else ""
        sets.append(f"  {kind} {name} {{\n    type {typ}{flags}{size}{counter}\n  }}")
    # nft 1.0.6 wants a newline before the closing brace of a chain ending in a map rule.
    return "\n".join(
        [
            f"table inet {TABLE} {{",
            '  comment "managed by natctl: edit with the natctl command, not by hand"',
            f"  set {SCHEMA} {{\n    type inet_service\n  }}",
            "  set generation {\n    type mark\n  }",
            # The store this table belongs to (one element: its id, its path as the comment; see Changes.owner).
            "  set owner {\n    type mark\n  }",
            *sets,
            # Senders the daemon refused, for a while: dropped here at no cost to it.
            (f"  set blocked4 {{\n    type ipv4_addr . inet_service\n    flags dynamic,timeout\n"
             f"    timeout {BLOCK_SECONDS}s\n  }}"),
            "  set flood4 {\n    type ipv4_addr\n    flags dynamic,timeout\n    timeout 60s\n  }",
            "  counter unknown_blocked {\n  }",
            "  counter unknown_refused {\n  }",
            "  counter unknown_limited {\n  }",
            # An unknown sender's packets to a host port go to the daemon without a
            # conntrack entry, so that once it is admitted its next packet is NATed.
            "  chain rawpre {",
            "    type filter hook prerouting priority raw; policy accept;",
            # A host's PUNCH (natctl.daemon.wire) is for the daemon only: untracked, so never NATed to a client.
            f"    udp length {8 + PUNCH_SIZE} @th,64,48 {PUNCH_HEAD:#x} notrack",
            f"    udp dport @{HOSTPORTS} ip saddr . meta l4proto . udp sport . udp dport != @{DNAT} notrack",
            "  }",
            "  chain prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            f"    {L4} dnat ip to ip saddr . meta l4proto . th sport . th dport map @{DNAT}",
            f"    {L4} fib daddr type local dnat ip to meta l4proto . th dport map @{FWD}",
            "  }",
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            f"    {L4} ct state established ip saddr . meta l4proto . th sport . ip daddr . th dport @{SNAT}",
            f"    {L4} ct status dnat ip daddr . meta l4proto . th dport @{FWDACCT}",
            "  }",
            "  chain input {",
            "    type filter hook input priority filter; policy accept;",
            # A sender outside its lobby's allowed networks never reaches the daemon (nor its rate limits).
            f'    udp dport @{HOSTPORTS} udp dport . ip saddr != @{ALLOW} counter name "unknown_refused" drop',
            f'    udp dport @{HOSTPORTS} ip saddr . udp dport @blocked4 counter name "unknown_blocked" drop',
            (f"    udp dport @{HOSTPORTS} update @flood4 {{ ip saddr limit rate over {UNKNOWN_RATE_PER_SOURCE} }}"
             ' counter name "unknown_limited" drop'),
            f'    udp dport @{HOSTPORTS} limit rate over {UNKNOWN_RATE_TOTAL} counter name "unknown_limited" drop',
            "  }",
            "  chain output {",
            "    type filter hook output priority raw; policy accept;",
            f"    meta mark {DELIVERY_MARK:#x} notrack",
            "  }",
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f"    {L4} snat ip to ip saddr . meta l4proto . th sport . ip daddr . th dport map @{SNAT}",
            f"    {L4} ct status dnat ip daddr . meta l4proto . th dport @{MASQ} masquerade",
            "  }",
            "}",
        ]
    )


def _concat(values: tuple) -> str:
    return " . ".join(str(v) for v in values)


def element_text(e: Element, with_value: bool) -> str:
    text = _concat(e.key)
    if e.comment and with_value:
        text += f' comment "{e.comment}"'
    if e.value is not None and with_value:
        text += " : " + _concat(e.value)
    return text


def _statements(verb: str, elements: Iterable[Element]) -> list[str]:
    by_set: dict[str, list[Element]] = {}
    for e in elements:
        by_set.setdefault(e.set, []).append(e)
    out = []
    for name in sorted(by_set):
        items = by_set[name]
        for i in range(0, len(items), CHUNK):
            body = ", ".join(element_text(e, verb == "add") for e in items[i : i + CHUNK])
            out.append(f"{verb} element inet {TABLE} {name} {{ {body} }}")
    return out


def comment_text(text: str) -> str:
    """``text`` as an nft comment can hold it: printable ASCII without quotes, at most COMMENT_MAX bytes
    (a long path keeps its end)."""
    clean = "".join(c if " " <= c <= "~" and c not in '"\\' else "?" for c in text)
    return clean if len(clean) <= COMMENT_MAX else "..." + clean[-(COMMENT_MAX - 3):]


def render(changes: Changes) -> str:
    """One nft script for a sync: deletes before adds, so changed values swap in place."""
    lines: list[str] = []
    if changes.create_table:
        # 'add' then 'delete' makes the delete safe when the table is absent.
        lines += [f"add table inet {TABLE}", f"delete table inet {TABLE}", skeleton()]
    else:
        lines += _statements("delete", changes.delete)
    lines += _statements("add", changes.add)
    if changes.generation is not None:
        lines += [f"flush set inet {TABLE} generation",
                  f"add element inet {TABLE} generation {{ {changes.generation} }}"]
    if changes.owner is not None:
        lines += [f"flush set inet {TABLE} owner",
                  f'add element inet {TABLE} owner {{ {changes.owner.id} comment "{comment_text(changes.owner.path)}" }}']
    return "\n".join(lines) + "\n"


@dataclass
class Installed:
    """What the kernel holds in table inet natctl."""

    table_ok: bool = False  # exists with the schema this natctl writes
    present: bool = False  # exists at all
    elements: set[Element] = field(default_factory=set)
    counters: dict[tuple[str, tuple], tuple[int, int]] = field(default_factory=dict)
    named: dict[str, tuple[int, int]] = field(default_factory=dict)  # named counter objects
    owner: Owner | None = None  # the store the table belongs to (None: nobody's yet)
    # read_packed's: the elements as bytes per map (natctl.packed), ``elements`` left empty
    packed: dict[str, set[bytes]] | None = None


# IANA protocol numbers, fixed: a listing's protocols never depend on /etc/protocols.
PROTO_NAMES = {6: "tcp", 17: "udp"}


def _port(v: int | str) -> int:
    if isinstance(v, int) or v.isdigit():
        return int(v)
    try:  # only a listing from elsewhere (nft -S) names ports; Nft asks for numbers
        return socket.getservbyname(v)
    except OSError:
        raise KernelError(f"nft printed port {v!r} as a name this machine cannot resolve",
                          "list the table with numeric ports (nft without -S)") from None


def _network(v: Any) -> str:
    """An interval set's address field as plan.py writes it: a CIDR ("198.18.2.0/24", "198.18.2.5/32").

    nft prints a prefix as {"prefix": {"addr", "len"}}, a single address bare, and a range that is
    no prefix as {"range": [low, high]} (kept as "low-high", which no plan holds: a diff replaces it)."""
    if isinstance(v, dict) and "prefix" in v:
        return str(ipaddress.IPv4Network(f"{v['prefix']['addr']}/{v['prefix']['len']}", strict=False))
    if isinstance(v, dict) and "range" in v:
        low, high = (ipaddress.IPv4Address(a) for a in v["range"])
        nets = list(ipaddress.summarize_address_range(low, high))
        return str(nets[0]) if len(nets) == 1 else f"{low}-{high}"
    return str(ipaddress.IPv4Network(str(v), strict=False))


def _field(kind: str, v: Any, interval: bool = False) -> Any:
    if interval and kind == "ipv4_addr":
        return _network(v)
    if kind == "inet_proto":
        return PROTO_NAMES.get(int(v), int(v)) if isinstance(v, int) or v.isdigit() else v.lower()
    if kind == "inet_service":
        return _port(v)
    return v if isinstance(v, (int, str)) else str(v)


def _tuple(obj: Any, typ: str | None, interval: bool = False) -> tuple:
    """An element's key or value as plan.py builds it, whatever names the listing used."""
    kinds = typ.split(" . ") if typ else []
    values = obj["concat"] if isinstance(obj, dict) and "concat" in obj else [obj]
    return tuple(_field(kinds[i] if i < len(kinds) else "", v, interval) for i, v in enumerate(values))


def _owner(elems: list) -> Owner | None:
    for raw in elems:
        inner = raw["elem"] if isinstance(raw, dict) and "elem" in raw else {"val": raw}
        if isinstance(inner.get("val"), int):
            return Owner(inner["val"], inner.get("comment", ""))
    return None


def parse_listing(doc: dict) -> Installed:
    """Parse ``nft -j list table inet natctl`` into elements and counters."""
    out = Installed(present=False)
    names = set()
    for item in doc.get("nftables", []):
        if "table" in item:
            out.present = True
        for kind in ("map", "set", "chain"):
            if kind in item:
                names.add(item[kind]["name"])
        if "counter" in item:
            out.named[item["counter"]["name"]] = (item["counter"]["packets"], item["counter"]["bytes"])
        if item.get("set", {}).get("name") == "owner":
            out.owner = _owner(item["set"].get("elem", []))
        for kind in ("map", "set"):
            obj = item.get(kind)
            if not obj or obj.get("name") not in TYPES:
                continue
            for raw in obj.get("elem", []):
                key_obj, value_obj = (raw if kind == "map" else (raw, None))
                counter, comment = None, ""
                if isinstance(key_obj, dict) and "elem" in key_obj:
                    inner = key_obj["elem"]
                    counter, comment = inner.get("counter"), inner.get("comment", "")
                    key_obj = inner["val"]
                ktype, vtype = TYPES[obj["name"]]
                key = _tuple(key_obj, ktype, obj["name"] in INTERVAL)
                value = _tuple(value_obj, vtype) if value_obj is not None else None
                out.elements.add(Element(obj["name"], key, value, comment))
                if counter:
                    out.counters[(obj["name"], key)] = (counter["packets"], counter["bytes"])
    out.table_ok = out.present and names >= {SCHEMA, "generation", "owner", *TYPES, *CHAINS}
    return out


WRITERS = ("netlink", "nft")  # how a sync's elements are written: one nfnetlink batch, or one libnftables script


def writer_from_env(writer: str | None = None) -> str:
    """The element writer: ``writer``, else NATCTL_WRITER, else netlink."""
    chosen = writer or os.environ.get("NATCTL_WRITER") or WRITERS[0]
    if chosen not in WRITERS:
        raise KernelError(f"invalid writer {chosen!r}", "use netlink or nft")
    return chosen


class Nft:
    """Thin executor over libnftables (and the netlink element writer). One instance per process is enough."""

    def __init__(self, writer: str | None = None) -> None:
        self.writer = writer_from_env(writer)
        self.transactions = 0  # how many the last apply committed: the skeleton and then its elements are two
        try:
            import nftables
        except ImportError:
            raise KernelError(
                "the nftables Python binding is missing",
                "install python3-nftables and make the venv with --system-site-packages (make setup does both)",
            ) from None
        if os.geteuid() != 0:
            raise KernelError("natctl must run as root to change the kernel", "run it with sudo")
        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(False)
        # Numbers, never names: names come from the machine's databases (/etc/protocols,
        # /etc/services, /etc/iproute2/rt_marks), which a minimal system lacks.
        self._nft.set_numeric_proto_output(True)
        self._nft.set_numeric_symbol_output(True)
        self._nft.set_service_output(False)
        self._nft.set_reversedns_output(False)

    def run(self, script: str) -> str:
        rc, out, err = self._nft.cmd(script)
        if rc != 0:
            lines = err.strip().splitlines()
            first = next((ln for ln in lines if "Error" in ln), lines[0] if lines else "")
            raise KernelError(f"nftables refused the change, nothing was applied ({first.strip()})",
                              "check that the kernel has nf_tables with NAT support (modprobe nft_nat)")
        return out

    def read(self, sets: Iterable[str] | None = None) -> Installed:
        """The whole table, or only the counters of the counted maps among ``sets`` (cleanup's idle check:
        no elements, read through netlink, cheap at scale)."""
        if sets is not None:  # the counted maps through netlink dumps (cleanup at 100,000: no JSON of each)
            from natctl import packed
            from natctl.kernel import nldump

            out = Installed()
            counted = sorted(set(sets) & COUNTED)
            try:
                dumps = nldump.counters(TABLE, counted)
            except OSError as why:
                raise KernelError(f"cannot read table inet {TABLE}: {why.strerror}", "is nf_tables available?") \
                    from None
            for name, elements in dumps.items():
                out.counters.update(((name, packed.unpack(name, data).key), counts)
                                    for data, counts in elements.items())
            return out
        rc, out, err = self._nft.cmd(f"list table inet {TABLE}")
        if rc != 0:
            if "No such file" in err or "does not exist" in err:
                return Installed()
            raise KernelError(f"cannot read table inet {TABLE}: {err.strip()}", "is nf_tables available?")
        return parse_listing(json.loads(out))

    def read_packed(self, skip: Collection[str] = ()) -> Installed:
        """Whether the table is there with this layout, and its maps' elements as bytes (natctl.packed), all
        through netlink dumps (libnftables would list every element, even tersely); not those in ``skip``."""
        from natctl.kernel import nldump

        try:
            names = nldump.names(TABLE, nldump.NFT_MSG_GETSET) | nldump.names(TABLE, nldump.NFT_MSG_GETCHAIN)
            found = Installed(present=bool(names), packed={})
            found.table_ok = names >= {SCHEMA, "generation", "owner", *TYPES, *CHAINS}
            if found.table_ok:  # else a diff rebuilds it whole: its elements do not matter
                found.packed = nldump.read(TABLE, sorted(set(TYPES) - set(skip)))
        except OSError as err:
            raise KernelError(f"cannot read table inet {TABLE}: {err.strerror}", "is nf_tables available?") from None
        return found

    def apply(self, changes: Changes) -> None:
        if not changes:
            return
        self.transactions = 1
        if self.writer == "nft":
            self.run(render(changes))
            return
        from natctl.kernel import nlbatch

        if changes.create_table:
            if self.table_present():  # another layout's table: replace it in one script, as nft would
                self.run(render(changes))
                return
            self.run(render(Changes(create_table=True)))  # the skeleton, then its elements
            self.transactions = 2
            try:
                nlbatch.send(changes, TABLE)
            except BaseException:
                self._nft.cmd(f"delete table inet {TABLE}")  # it did not exist before: the kernel is as it was
                raise
            return
        nlbatch.send(changes, TABLE)

    def table_present(self) -> bool:
        """Whether table inet natctl exists (without listing its elements)."""
        rc, out, _ = self._nft.cmd("list tables")
        return rc == 0 and any(item.get("table", {}).get("name") == TABLE
                               and item["table"].get("family") == "inet"
                               for item in json.loads(out).get("nftables", []))

    def ruleset(self) -> int | None:
        """nftables' ruleset generation in this namespace (nldump.ruleset_generation); None if unreadable."""
        from natctl.kernel import nldump

        try:
            return nldump.ruleset_generation()
        except OSError:
            return None

    def generation(self) -> int | None:
        """The tag of the last change applied (see Changes.generation); None without one."""
        rc, out, _ = self._nft.cmd(f"list set inet {TABLE} generation")
        if rc != 0:
            return None
        for item in json.loads(out).get("nftables", []):
            elems = item.get("set", {}).get("elem", [])
            if elems and isinstance(elems[0], int):
                return elems[0]
        return None

    def owner(self) -> Owner | None:
        """The store the table belongs to (Changes.owner); None without a table or an owner."""
        rc, out, _ = self._nft.cmd(f"list set inet {TABLE} owner")
        return parse_listing(json.loads(out)).owner if rc == 0 else None

    def uninstall(self) -> bool:
        """Delete table inet natctl and nothing else. True if it existed."""
        if not self.read().present:
            return False
        self.run(f"delete table inet {TABLE}")
        return True

    def block(self, ip: str, port: int) -> None:
        """Drop a refused sender's packets to one host port in the kernel for BLOCK_SECONDS."""
        self.block_all([(ip, port)])

    def block_all(self, senders: Iterable[tuple[str, int]]) -> None:
        """``block`` for many senders in one command (the daemon blocks a batch of refusals at once)."""
        body = ", ".join(f"{ip} . {port}" for ip, port in dict.fromkeys(senders))
        if body:
            self.run(f"add element inet {TABLE} blocked4 {{ {body} }}")
