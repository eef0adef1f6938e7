"""The nftables rules of the LANs, on the relay and on a member (pure: text in, text out).

On the relay, two tables, replaced together in one transaction on every change:

- ``table inet natctl_lan`` isolates: a packet that came in on the LAN interface may leave only on it,
  and only when its source and destination lie in the same LAN (one interval set of
  ``subnet . subnet`` pairs); nothing from the LAN reaches the relay itself, nothing from elsewhere
  goes into the LAN.
- ``table netdev natctl_lan_fanout`` fans broadcasts and multicast out at the interface's ingress,
  before routing: the sender (its source address is authenticated by WireGuard) selects its own
  chain through a verdict map, which rewrites the destination to each other member of its LAN in
  turn and duplicates the packet to the interface (WireGuard then picks that member's peer); the
  last copy takes the original (``fwd``). Unicast leaves the chain at its first rule.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from natctl.lan.model import LIMITED_BROADCAST, MULTICAST, Lan, Member

TABLE = "natctl_lan"
FANOUT = "natctl_lan_fanout"
PER_RULE = 24  # copies per rule: a rule holds at most 128 expressions, a copy takes 4


def chain_name(address: str) -> str:
    return "m_" + address.replace(".", "_")


def _set(items: Iterable[str]) -> str:
    return "{ " + ", ".join(items) + " }"


@dataclass(frozen=True)
class Fanout:
    """One sender's copies: who gets its broadcasts (the other members of its LAN)."""

    sender: str
    broadcast: str
    to: tuple[str, ...]


def fanouts(lans: Sequence[Lan], members: Sequence[Member]) -> list[Fanout]:
    by_lan: dict[int, list[Member]] = {}
    for m in members:
        by_lan.setdefault(m.lan_id, []).append(m)
    out = []
    for lan in lans:
        group = sorted(by_lan.get(lan.id, []), key=lambda m: ipaddress.IPv4Address(m.address))
        for m in group:
            out.append(Fanout(m.address, lan.broadcast, tuple(o.address for o in group if o.id != m.id)))
    return out


def relay_ruleset(iface: str, lans: Sequence[Lan], members: Sequence[Member]) -> str:
    """Both tables, as one ``nft -f`` script that replaces them atomically (or removes them: no LANs)."""
    lines = [f"table inet {TABLE}", f"delete table inet {TABLE}",
             f"table netdev {FANOUT}", f"delete table netdev {FANOUT}"]
    if not lans:
        return "\n".join(lines) + "\n"
    pairs = [f"{lan.subnet} . {lan.subnet}" for lan in sorted(lans, key=lambda x: x.id)]
    dev = f'"{iface}"'
    lines += [
        f"table inet {TABLE} {{",
        '  comment "managed by natctl lan: isolation of the virtual LANs"',
        "  set lans {", "    type ipv4_addr . ipv4_addr", "    flags interval",
        f"    elements = {_set(pairs)}", "  }",
        "  counter refused {", "  }",
        "  chain forward {",
        "    type filter hook forward priority filter - 5; policy accept;",
        f"    iifname {dev} oifname {dev} ip saddr . ip daddr @lans accept",
        f'    iifname {dev} counter name "refused" drop',
        f'    oifname {dev} counter name "refused" drop',
        "  }",
        "  chain input {",
        "    type filter hook input priority filter - 5; policy accept;",
        f'    iifname {dev} counter name "refused" drop',
        "  }",
        "}",
    ]
    fans = fanouts(lans, members)
    groups = sorted({MULTICAST, LIMITED_BROADCAST, *(lan.broadcast for lan in lans)})
    lines += [
        f"table netdev {FANOUT} {{",
        '  comment "managed by natctl lan: broadcast and multicast fan-out"',
        "  chain ingress {",
        f"    type filter hook ingress device {dev} priority filter; policy accept;",
        "    meta protocol != ip accept",
        "    ip protocol != udp accept",  # games broadcast UDP; IGMP reports and the like stay on their link
        f"    ip daddr != {_set(groups)} accept",
    ]
    if fans:
        lines.append("    ip saddr vmap " + _set(f"{f.sender} : jump {chain_name(f.sender)}" for f in fans))
    lines += ["    drop", "  }"]  # a broadcast from no member: nobody's
    for f in fans:
        lines += [f"  chain {chain_name(f.sender)} {{",
                  f"    ip daddr != {_set(sorted({f.broadcast, LIMITED_BROADCAST, MULTICAST}))} drop"]
        if not f.to:
            lines.append("    counter drop")  # alone in its LAN: counted, nobody to tell
        else:
            chunks = [f.to[i:i + PER_RULE] for i in range(0, len(f.to), PER_RULE)]
            for n, chunk in enumerate(chunks):
                last = n == len(chunks) - 1
                copies = [f"ip daddr set {to} {'fwd' if last and i == len(chunk) - 1 else 'dup'} to {dev}"
                          for i, to in enumerate(chunk)]
                lines.append("    " + ("counter " if n == 0 else "") + " ".join(copies))
        lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def fanout_counters(listing: str) -> dict[str, tuple[int, int]]:
    """Sender address -> (broadcasts it sent, copies the kernel made of them), from
    ``nft -j list table netdev natctl_lan_fanout``."""
    try:
        doc = json.loads(listing)
    except ValueError:
        return {}
    packets: dict[str, int] = {}
    copies: dict[str, int] = {}
    for item in doc.get("nftables", []):
        rule = item.get("rule")
        if not rule or not rule.get("chain", "").startswith("m_"):
            continue
        sender = rule["chain"][2:].replace("_", ".")
        exprs = rule.get("expr", [])
        copies[sender] = copies.get(sender, 0) + sum(1 for e in exprs if "dup" in e or "fwd" in e)
        for e in exprs:
            if "counter" in e and isinstance(e["counter"], dict):
                packets[sender] = packets.get(sender, 0) + int(e["counter"].get("packets", 0))
    return {s: (n, n * copies.get(s, 0)) for s, n in packets.items()}


def refused_count(listing: str) -> int:
    """Packets the isolation table dropped, from ``nft -j list counter inet natctl_lan refused``."""
    try:
        doc = json.loads(listing)
    except ValueError:
        return 0
    for item in doc.get("nftables", []):
        if "counter" in item:
            return int(item["counter"].get("packets", 0))
    return 0


# --- a member's side: the game's interface <-> its tunnel


def member_table(name: str) -> str:
    return f"natctl_lan_{name}".replace("-", "_")


def member_ruleset(name: str, tunnel: str, port: str, address: str) -> str:
    """Packets from the tunnel to the member's address go to the game's interface (with an Ethernet
    header, through the neighbour entry natctl sets). ``fwd ip`` counts one hop and drops a packet
    whose TTL is 1: such a packet (a multicast sent with TTL 1, say) gets one more, so the game sees
    the TTL its peer sent. Everything else from the tunnel is dropped: the machine never routes it."""
    table = member_table(name)
    return "\n".join([
        f"table netdev {table}", f"delete table netdev {table}",
        f"table netdev {table} {{",
        '  comment "managed by natctl lan: a member\'s tunnel"',
        "  chain from_tunnel {",
        f'    type filter hook ingress device "{tunnel}" priority filter; policy drop;',
        f"    ip daddr {address} ip ttl 1 ip ttl set 2",
        f'    ip daddr {address} counter fwd ip to {address} device "{port}"',
        "  }",
        "}",
        "",
    ])
