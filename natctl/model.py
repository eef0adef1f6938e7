"""Plain data: what natctl stores and plans with, and parsers for user input.

Everything here is immutable and free of I/O, so the allocator and the planner
can be tested without root or a kernel.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from typing import Literal

from natctl.errors import UsageError

Proto = Literal["udp", "tcp"]
PROTOS: tuple[Proto, ...] = ("udp", "tcp")
FORWARD_PROTOS = ("udp", "tcp", "both")


@dataclass(frozen=True, order=True, slots=True)
class Endpoint:
    """An IPv4 address and port, as a packet carries them."""

    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.ip}:{self.port}"


@dataclass(frozen=True, slots=True)
class PortRange:
    """An inclusive range of ports (the relay's, --ports LOW-HIGH)."""

    low: int
    high: int

    def __contains__(self, port: object) -> bool:
        return isinstance(port, int) and self.low <= port <= self.high

    def __len__(self) -> int:
        return self.high - self.low + 1

    def __str__(self) -> str:
        return f"{self.low}-{self.high}"


@dataclass(frozen=True, slots=True)
class Lobby:
    """A lobby as the store keeps it: who may join, for how long, and where it is placed."""

    id: int
    name: str
    allow: tuple[str, ...] = ()
    ttl: int | None = None  # seconds from creation
    created: float = 0.0
    closed: float | None = None
    token_hash: str = ""
    open: bool = False
    max_clients: int = 64
    relay: str = ""  # the fleet relay it is placed on (natctl.fleet); "" on a single relay

    def expired(self, now: float) -> bool:
        return self.ttl is not None and now >= self.created + self.ttl

    def allows(self, ip: str) -> bool:
        if self.open:
            return True
        addr = ipaddress.ip_address(ip)
        return any(addr in ipaddress.ip_network(net) for net in self.allow)


@dataclass(frozen=True, slots=True)
class Host:
    """A lobby's host: its public address and its relay port P_h."""

    lobby_id: int
    addr: Endpoint
    relay_port: int
    opens: bool = False  # it speaks registration v2: it opens its NAT toward each new client's relay port


@dataclass(frozen=True, slots=True)
class Client:
    """A lobby member: its public address, protocol and relay port P_c."""

    id: int
    lobby_id: int
    proto: str  # udp or tcp (see PROTOS)
    addr: Endpoint
    relay_port: int
    created: float = 0.0
    last_seen: float = 0.0
    # The host's address as seen from this client's relay port, learned from the host's punch
    # (behind a symmetric NAT it differs per destination); None: the host's registered address.
    host: Endpoint | None = None
    pending: bool = False  # admitted, waiting for the host to open its NAT: nothing in the kernel yet


@dataclass(frozen=True, slots=True)
class Forward:
    """A static port forward: relay:port -> target, for a session or forever."""

    port: int
    target: Endpoint
    proto: str = "tcp"  # udp, tcp or both
    ttl: int | None = None
    created: float = 0.0
    masquerade: bool = True
    owner: str = ""  # e.g. "gm:alice"; free text shown in listings

    @property
    def protos(self) -> tuple[Proto, ...]:
        return PROTOS if self.proto == "both" else (self.proto,)  # type: ignore[return-value]

    def expired(self, now: float) -> bool:
        return self.ttl is not None and now >= self.created + self.ttl


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything the planner needs, read from the store in one transaction."""

    relay_ip: str
    lobbies: tuple[Lobby, ...] = ()
    hosts: tuple[Host, ...] = ()
    clients: tuple[Client, ...] = ()
    forwards: tuple[Forward, ...] = field(default=())


# --- parsers: every one raises UsageError with a message that says what is expected


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def parse_name(text: str, what: str = "name") -> str:
    if not _NAME.match(text):
        raise UsageError(
            f"invalid {what} {text!r}",
            "use 1-63 letters, digits, '.', '_' or '-', starting with a letter or digit",
        )
    return text


def parse_ipv4(text: str) -> str:
    try:
        return str(ipaddress.IPv4Address(text.strip()))
    except ValueError:
        raise UsageError(f"invalid IPv4 address {text!r}", "write it like 198.18.0.1") from None


def parse_int(text: str | int, what: str, low: int, high: int) -> int:
    """A whole number from ``low`` to ``high``, written in ASCII digits (``int()`` alone also takes
    '١٢', '1_000' and ' 7 ', and no bound protects the store from 20-digit numbers)."""
    if isinstance(text, bool) or not isinstance(text, (int, str)):
        raise UsageError(f"invalid {what} {text!r}", f"use a number from {low} to {high}")
    digits = str(text)
    if not (digits.isascii() and digits.isdigit()) or len(digits) > 12 or not low <= int(digits) <= high:
        raise UsageError(f"invalid {what} {text!r}", f"use a number from {low} to {high}")
    return int(digits)


def parse_port(text: str | int, what: str = "port") -> int:
    return parse_int(text, what, 1, 65535)


def parse_endpoint(text: str) -> Endpoint:
    ip, sep, port = text.strip().rpartition(":")
    if not sep or not ip:
        raise UsageError(f"invalid address {text!r}", "write IP:PORT, like 198.18.0.7:27015")
    return Endpoint(parse_ipv4(ip), parse_port(port))


# Addresses no player, host or forward target can have on the internet.
_NOT_UNICAST = tuple(ipaddress.IPv4Network(n) for n in ("0.0.0.0/8", "127.0.0.0/8", "224.0.0.0/4", "240.0.0.0/4"))


# The same networks as (network, netmask) integers, for a file of 100,000 addresses.
_NOT_UNICAST_INT = tuple((int(n.network_address), int(n.netmask)) for n in _NOT_UNICAST)


def check_unicast(ip: str, what: str, relay_ip: str | None = None) -> None:
    """Refuse an address a peer cannot have: loopback, 0.0.0.0/8, multicast, broadcast, or the relay itself."""
    check_unicast_int(int(ipaddress.IPv4Address(ip)), ip, what, relay_ip)


def check_unicast_int(addr: int, ip: str, what: str, relay_ip: str | None = None) -> None:
    """``check_unicast`` of ``ip`` already read as the integer ``addr``."""
    if any(addr & mask == net for net, mask in _NOT_UNICAST_INT):
        raise UsageError(f"{what} {ip} is not an address a player or a server can have",
                         "use the peer's public IPv4 address (not loopback, 0.0.0.0/8, multicast or broadcast)")
    if relay_ip and ip == relay_ip:
        raise UsageError(f"{what} {ip} is the relay's own address",
                         "use the address of the peer as the relay sees it, not the relay's")


def check_allowed_network(cidr: str) -> None:
    """An --allow network must hold unicast addresses (a multicast or loopback network admits no one)."""
    net = ipaddress.IPv4Network(cidr)
    for bad in _NOT_UNICAST:
        if net.overlaps(bad) and net.prefixlen >= bad.prefixlen:
            raise UsageError(f"--allow {cidr} is not a network of players",
                             "allow the public networks players come from (loopback, 0.0.0.0/8, multicast "
                             "and broadcast are refused); use --open to admit anyone")


def parse_cidr(text: str) -> str:
    try:
        return str(ipaddress.IPv4Network(text.strip(), strict=False))
    except ValueError:
        raise UsageError(f"invalid network {text!r}", "write a CIDR like 198.18.0.0/15") from None


def parse_proto(text: str, allowed: tuple[str, ...] = PROTOS) -> str:
    if text not in allowed:
        raise UsageError(f"invalid protocol {text!r}", "use one of " + ", ".join(allowed))
    return text


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"([0-9]{1,12})([smhd])")  # ASCII digits only: \d would take '١٢' too
MAX_DURATION = 3650 * 86400  # ten years: longer is a typo, and it must fit the store


def parse_duration(text: str) -> int:
    """'90s', '15m', '4h', '1d', '1h30m' or plain seconds -> seconds (> 0, at most ten years)."""
    text = text.strip().lower()
    if text.isascii() and text.isdigit() and len(text) <= 12:
        seconds = int(text)
    else:
        parts = _DURATION.findall(text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise UsageError(f"invalid duration {text!r}", "write it like 90s, 15m, 4h or 1h30m")
        seconds = sum(int(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise UsageError(f"invalid duration {text!r}", "it must be longer than zero")
    if seconds > MAX_DURATION:
        raise UsageError(f"invalid duration {text!r}", "use at most 3650d (ten years)")
    return seconds


def format_duration(seconds: float | None) -> str:
    """Inverse of parse_duration for display: 5400 -> '1h30m'."""
    if seconds is None:
        return "-"
    rest, out = int(max(seconds, 0)), ""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if rest >= size:
            out += f"{rest // size}{unit}"
            rest %= size
    return out + f"{rest}s" if rest or not out else out


def parse_port_range(text: str) -> PortRange:
    low, sep, high = text.strip().partition("-")
    if not sep:
        raise UsageError(f"invalid port range {text!r}", "write LOW-HIGH, like 20000-29999")
    lo, hi = parse_port(low, "port range"), parse_port(high, "port range")
    if lo > hi:
        raise UsageError(f"invalid port range {text!r}", "LOW must not be above HIGH")
    if lo < 1024:
        raise UsageError(f"port range {text} includes privileged ports", "start the range at 1024 or above")
    return PortRange(lo, hi)


# --- a file of mappings (natctl map add/remove --from FILE): one per line, read as it streams

# One line: (line number, lobby, host ip, host port, client ip, client port, proto), addresses as integers.
MappingLine = tuple[int, str, int, int, int, int, str]


def ipv4_int(text: str) -> int:
    """A dotted quad as an integer, accepting exactly what ``parse_ipv4`` accepts (else UsageError as it)."""
    parts = text.split(".")
    if len(parts) == 4:
        value = 0
        for part in parts:
            if not (0 < len(part) <= 3 and part.isascii() and part.isdigit()) or (part[0] == "0" and len(part) > 1):
                break
            octet = int(part)
            if octet > 255:
                break
            value = value << 8 | octet
        else:
            return value
    return int(ipaddress.IPv4Address(parse_ipv4(text)))  # raises the one error for a bad address


def int_ipv4(addr: int) -> str:
    return f"{addr >> 24}.{addr >> 16 & 255}.{addr >> 8 & 255}.{addr & 255}"


def _endpoint_ints(text: str) -> tuple[int, int]:
    ip, sep, port = text.rpartition(":")
    if not sep or not ip:
        parse_endpoint(text)  # raises its error
    return ipv4_int(ip), parse_port(port)


_OCTET = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_ADDR = rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}:([0-9]{{1,5}})"
# The common line, read by one match: a subset of what the parsers below accept, with the same result.
_LINE = re.compile(rf"[ \t]*([A-Za-z0-9][A-Za-z0-9_.-]{{0,62}})[ \t]+{_ADDR}[ \t]+{_ADDR}(?:[ \t]+(udp|tcp))?[ \t]*\n?")


def parse_mapping_line(text: str, number: int = 0) -> MappingLine | None:
    """``LOBBY HOST_IP:PORT CLIENT_IP:PORT [udp|tcp]``; None for a blank line or a ``#`` comment."""
    m = _LINE.fullmatch(text)
    if m is not None:
        g = m.groups()
        host_port, client_port = int(g[5]), int(g[10])
        if 0 < host_port < 65536 and 0 < client_port < 65536:
            return (number, g[0], int(g[1]) << 24 | int(g[2]) << 16 | int(g[3]) << 8 | int(g[4]), host_port,
                    int(g[6]) << 24 | int(g[7]) << 16 | int(g[8]) << 8 | int(g[9]), client_port, g[11] or "udp")
    words = text.split("#", 1)[0].split()
    if not words:
        return None
    if len(words) not in (3, 4):
        raise UsageError(f"expected 'LOBBY HOST_IP:PORT CLIENT_IP:PORT [udp|tcp]', got {len(words)} fields",
                         "write one mapping per line")
    lobby = parse_name(words[0], "lobby name")
    host_ip, host_port = _endpoint_ints(words[1])
    client_ip, client_port = _endpoint_ints(words[2])
    proto = parse_proto(words[3]) if len(words) == 4 else "udp"
    return number, lobby, host_ip, host_port, client_ip, client_port, proto
