"""The lab: a relay with one interface, an "internet", and home routers that masquerade.

```
            relay (eth0 198.18.0.1, default via inet)
              │
            inet  (routes between everyone: 198.18.N.254 per router)
          ┌───┴──────────────┐
   router home-host      router home-clients     (wan 198.18.N.2, a NAT of each kind: home_router())
          │               │            │
        host           client1      client2      (198.19.N.10+, behind br0)
```
"""

from __future__ import annotations

import secrets
import socket
from dataclasses import dataclass, field

from natctl.lab.netns import delete, need, run

RELAY_IP = "198.18.0.1"
INET_RELAY_SIDE = "198.18.0.254"

# Home routers come in the kinds RFC 4787 names. Each masquerades its LAN
# behind its wan address; they differ in which packets from outside they let in.
PORT_RESTRICTED = "port-restricted"  # stock Linux masquerade: replies only from the exact address:port sent to
ADDRESS_RESTRICTED = "address-restricted"  # from any port of an address the machine sent to
FULL_CONE = "full-cone"  # from anyone, once the machine has sent anything out
SYMMETRIC = "symmetric"  # masquerade random: a new external port for every new destination
NAT_KINDS = (PORT_RESTRICTED, ADDRESS_RESTRICTED, FULL_CONE, SYMMETRIC)
DEFAULT_NAT = PORT_RESTRICTED


def home_router(kind: str = DEFAULT_NAT) -> str:
    """The nftables ruleset of a home router of ``kind``.

    The cones keep masquerade's port (it keeps the source port when free) and
    let matching packets in through a map that outbound UDP refreshes, keyed by
    that port (full cone) or by port and remote address (address-restricted).
    """
    if kind not in NAT_KINDS:
        raise ValueError(f"unknown NAT kind {kind!r}: one of {', '.join(NAT_KINDS)}")
    masq = "masquerade random" if kind == SYMMETRIC else "masquerade"
    cone = {FULL_CONE: ("inet_service", "udp dport", "udp sport"),
            ADDRESS_RESTRICTED: ("inet_service . ipv4_addr", "udp dport . ip saddr", "udp sport . ip daddr")}
    lines = ["table ip home {"]
    if kind in cone:
        ktype, inbound, outbound = cone[kind]
        lines += [
            "  map cone {", f"    type {ktype} : ipv4_addr", "    flags dynamic,timeout", "    timeout 10m", "  }",
            "  chain prerouting {", "    type nat hook prerouting priority dstnat; policy accept;",
            f'    iifname "wan" meta l4proto udp dnat to {inbound} map @cone', "  }",
            "  chain forward {", "    type filter hook forward priority filter; policy accept;",
            f'    oifname "wan" meta l4proto udp update @cone {{ {outbound} : ip saddr }}', "  }",
        ]
    lines += ["  chain postrouting {", "    type nat hook postrouting priority srcnat; policy accept;",
              f'    oifname "wan" {masq}', "  }", "}", ""]
    return "\n".join(lines)


# router name -> members behind it. Order matters: it fixes the addresses.
DEFAULT_SITES: dict[str, list[str]] = {"home-host": ["host"], "home-clients": ["client1", "client2"]}


@dataclass
class Member:
    name: str
    ns: str
    ip: str  # private address behind the router
    public_ip: str  # the router's wan address: what the relay sees
    router: str


@dataclass
class Lab:
    prefix: str
    relay_ns: str
    inet_ns: str
    relay_ip: str = RELAY_IP
    members: dict[str, Member] = field(default_factory=dict)
    routers: dict[str, str] = field(default_factory=dict)  # router name -> ns
    nat: dict[str, str] = field(default_factory=dict)  # router name -> NAT kind
    created: list[str] = field(default_factory=list)  # namespaces, in creation order
    # Every relay as (namespace, relay IP): the first is relay_ns/relay_ip, the others a fleet's (build(relays=N)).
    relays: list[tuple[str, str]] = field(default_factory=list)

    def ns(self, name: str) -> str:
        if name == "relay":
            return self.relay_ns
        if name.startswith("relay") and name[5:].isdigit():  # relay1 is relay, relay2 the fleet's second...
            return self.relays[int(name[5:]) - 1][0]
        if name == "inet":
            return self.inet_ns
        if name in self.routers:
            return self.routers[name]
        return self.members[name].ns

    def teardown(self) -> None:
        for ns in reversed(self.created):
            delete(ns)
        self.created.clear()


def _ns(lab: Lab, name: str) -> str:
    ns = f"{lab.prefix}-{name}"
    run(["ip", "netns", "add", ns])
    lab.created.append(ns)
    run(["ip", "-n", ns, "link", "set", "lo", "up"])
    return ns


def _veth(a_ns: str, a_if: str, b_ns: str, b_if: str) -> None:
    run(["ip", "-n", a_ns, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b_ns])
    run(["ip", "-n", a_ns, "link", "set", a_if, "up"])
    run(["ip", "-n", b_ns, "link", "set", b_if, "up"])


def _sysctl(ns: str, *settings: str) -> None:
    run(["sysctl", "-q", "-w", *settings], ns=ns)


def build(sites: dict[str, list[str]] | None = None, prefix: str | None = None,
          nat: str | dict[str, str] = DEFAULT_NAT, relays: int = 1) -> Lab:
    """Create the lab; on any failure, remove what was made and re-raise.

    ``nat`` is the kind of every home router, or a kind per router name (the rest get the default).
    ``relays``: more than one makes a fleet's relays, relay N (N >= 2) at 198.18.(100+N).1 on a link of its own.
    """
    need("ip", "nft", "sysctl")
    sites = DEFAULT_SITES if sites is None else sites
    prefix = prefix or "nl" + secrets.token_hex(3)
    lab = Lab(prefix, f"{prefix}-relay", f"{prefix}-inet")
    kinds = nat if isinstance(nat, dict) else dict.fromkeys(sites, nat)
    lab.nat = {router: kinds.get(router, DEFAULT_NAT) for router in sites}
    for kind in lab.nat.values():
        home_router(kind)  # an unknown kind fails here, before anything is made
    try:
        _build(lab, sites)
        lab.relays.append((lab.relay_ns, lab.relay_ip))
        for n in range(2, relays + 1):
            lab.relays.append(_relay(lab, n))
    except BaseException:
        lab.teardown()
        raise
    return lab


def _build(lab: Lab, sites: dict[str, list[str]]) -> None:
    inet, relay = _ns(lab, "inet"), _ns(lab, "relay")
    _sysctl(inet, "net.ipv4.ip_forward=1")
    # The relay starts as a fresh VPS does, with forwarding off: natctl turns it on (natctl.preflight).
    _sysctl(relay, "net.ipv4.ip_forward=0", "net.ipv4.conf.all.send_redirects=0")
    _veth(relay, "eth0", inet, "p0")
    run(["ip", "-n", relay, "addr", "add", f"{lab.relay_ip}/24", "dev", "eth0"])
    run(["ip", "-n", inet, "addr", "add", f"{INET_RELAY_SIDE}/24", "dev", "p0"])
    run(["ip", "-n", relay, "route", "add", "default", "via", INET_RELAY_SIDE])
    for n, (router, members) in enumerate(sites.items(), start=1):
        rns = _ns(lab, router)
        lab.routers[router] = rns
        wan = f"198.18.{n}.2"
        _sysctl(rns, "net.ipv4.ip_forward=1")
        _veth(rns, "wan", inet, f"p{n}")
        run(["ip", "-n", rns, "addr", "add", f"{wan}/24", "dev", "wan"])
        run(["ip", "-n", inet, "addr", "add", f"198.18.{n}.254/24", "dev", f"p{n}"])
        run(["ip", "-n", rns, "route", "add", "default", "via", f"198.18.{n}.254"])
        run(["ip", "-n", rns, "link", "add", "br0", "type", "bridge"])
        run(["ip", "-n", rns, "addr", "add", f"198.19.{n}.1/24", "dev", "br0"])
        run(["ip", "-n", rns, "link", "set", "br0", "up"])
        run(["nft", "-f", "-"], ns=rns, input=home_router(lab.nat[router]))
        for m, member in enumerate(members):
            mns = _ns(lab, member)
            ip = f"198.19.{n}.{10 + m}"
            _veth(rns, f"m{m}", mns, "eth0")
            run(["ip", "-n", rns, "link", "set", f"m{m}", "master", "br0"])
            run(["ip", "-n", mns, "addr", "add", f"{ip}/24", "dev", "eth0"])
            run(["ip", "-n", mns, "route", "add", "default", "via", f"198.19.{n}.1"])
            lab.members[member] = Member(member, mns, ip, wan, router)


def _relay(lab: Lab, n: int) -> tuple[str, str]:
    """A fleet's relay N, set up as a fresh VPS (forwarding off), routed through the internet namespace."""
    ns, ip = _ns(lab, f"relay{n}"), f"198.18.{100 + n}.1"
    _sysctl(ns, "net.ipv4.ip_forward=0", "net.ipv4.conf.all.send_redirects=0")
    _veth(ns, "eth0", lab.inet_ns, f"r{n}")
    run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0"])
    run(["ip", "-n", lab.inet_ns, "addr", "add", f"198.18.{100 + n}.254/24", "dev", f"r{n}"])
    run(["ip", "-n", ns, "route", "add", "default", "via", f"198.18.{100 + n}.254"])
    return ns, ip


def say_hello(sock: socket.socket, lab: Lab) -> None:
    """Send one datagram from a game socket to the relay (port 9, discard), as registering does.

    It opens the sender's home router toward the relay's address.
    """
    sock.sendto(b"hello", (lab.relay_ip, 9))


def open_home_port(lab: Lab, member: str, port: int, proto: str = "tcp") -> None:
    """What a player does on their own router: forward one port to a machine at home."""
    m = lab.members[member]
    run(["nft", "-f", "-"], ns=lab.routers[m.router], input=(
        f"table ip fw_{member}_{port} {{\n chain pre {{\n"
        "  type nat hook prerouting priority dstnat - 1; policy accept;\n"
        f'  iifname "wan" {proto} dport {port} dnat to {m.ip}\n }}\n}}\n'))
