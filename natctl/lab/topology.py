"""The lab: a relay with one interface, an "internet", and home routers that masquerade.

```
            relay (eth0 198.18.0.1, default via inet)
              │
            inet  (routes between everyone: 198.18.N.254 per router)
          ┌───┴──────────────┐
   router home-host      router home-clients     (wan 198.18.N.2, masquerade)
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

# A home router as most are: masquerade (keeping the port when it is free) and
# address-restricted cone filtering: once a machine behind it has sent UDP to
# an address, replies from any port of that address come in. That is what lets
# a relay reach a host from a new relay port after the host registered.
HOME_ROUTER = """table ip home {
  map cone {
    type inet_service . ipv4_addr : ipv4_addr
    flags dynamic,timeout
    timeout 10m
  }
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    iifname "wan" meta l4proto udp dnat to udp dport . ip saddr map @cone
  }
  chain forward {
    type filter hook forward priority filter; policy accept;
    oifname "wan" meta l4proto udp update @cone { udp sport . ip daddr : ip saddr }
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    oifname "wan" masquerade
  }
}
"""

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
    created: list[str] = field(default_factory=list)  # namespaces, in creation order

    def ns(self, name: str) -> str:
        if name == "relay":
            return self.relay_ns
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


def build(sites: dict[str, list[str]] | None = None, prefix: str | None = None) -> Lab:
    """Create the lab; on any failure, remove what was made and re-raise."""
    need("ip", "nft", "sysctl")
    sites = DEFAULT_SITES if sites is None else sites
    prefix = prefix or "nl" + secrets.token_hex(3)
    lab = Lab(prefix, f"{prefix}-relay", f"{prefix}-inet")
    try:
        _build(lab, sites)
    except BaseException:
        lab.teardown()
        raise
    return lab


def _build(lab: Lab, sites: dict[str, list[str]]) -> None:
    inet, relay = _ns(lab, "inet"), _ns(lab, "relay")
    _sysctl(inet, "net.ipv4.ip_forward=1")
    _sysctl(relay, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0")
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
        run(["nft", "-f", "-"], ns=rns, input=HOME_ROUTER)
        for m, member in enumerate(members):
            mns = _ns(lab, member)
            ip = f"198.19.{n}.{10 + m}"
            _veth(rns, f"m{m}", mns, "eth0")
            run(["ip", "-n", rns, "link", "set", f"m{m}", "master", "br0"])
            run(["ip", "-n", mns, "addr", "add", f"{ip}/24", "dev", "eth0"])
            run(["ip", "-n", mns, "route", "add", "default", "via", f"198.19.{n}.1"])
            lab.members[member] = Member(member, mns, ip, wan, router)


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
