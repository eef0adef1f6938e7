"""LAN settings, rows and the address pool (pure: no I/O)."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from natctl import config
from natctl.config import LanSettings
from natctl.errors import Conflict, Exhausted, UsageError
from natctl.model import parse_cidr

DEFAULT_POOL = config.DEFAULT_LAN_POOL
LIMITED_BROADCAST = "255.255.255.255"
MULTICAST = "224.0.0.0/4"




@dataclass(frozen=True)
class Lan:
    id: int
    name: str
    subnet: str
    token_hash: str
    ttl: int | None
    max_members: int
    created: float

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def broadcast(self) -> str:
        return str(self.network.broadcast_address)

    def expired(self, now: float) -> bool:
        return self.ttl is not None and now >= self.created + self.ttl


@dataclass(frozen=True)
class Member:
    id: int
    lan_id: int
    name: str
    address: str
    public_key: str
    created: float


def pick_subnet(settings: LanSettings, taken: Iterable[str], wanted: str | None = None,
                avoid: Iterable[str] = ()) -> str:
    """``wanted`` if it overlaps no LAN and none of ``avoid`` (the relay's own networks), else the
    lowest free /prefix of the pool."""
    used = [ipaddress.IPv4Network(t) for t in taken]
    own = [ipaddress.IPv4Network(a, strict=False) for a in avoid]
    if wanted is not None:
        net = ipaddress.IPv4Network(parse_cidr(wanted))
        if net.prefixlen > 29:
            raise UsageError(f"LAN subnet {net} is too small", "use a /29 or larger (a /24 holds 254 members)")
        for other in used:
            if net.overlaps(other):
                raise Conflict(f"LAN subnet {net} overlaps another LAN's subnet {other}",
                               "pick another --subnet, or leave it out to get a free one from the pool")
        for other in own:
            if net.overlaps(other):
                raise Conflict(f"LAN subnet {net} overlaps the relay's own network {other}",
                               "pick another --subnet, outside the relay's networks")
        return str(net)
    for net in settings.network.subnets(new_prefix=max(settings.prefix, settings.network.prefixlen)):
        if not any(net.overlaps(o) for o in used + own):
            return str(net)
    raise Exhausted(f"the LAN pool {settings.pool} is full ({len(used)} LANs)",
                    "close a LAN (natctl lan close NAME) or use a larger pool (NATCTL_LAN_POOL)")


def next_address(subnet: str, used: Iterable[str], lan: str, max_members: int) -> str:
    """The lowest free host address of ``subnet``; Exhausted when the LAN is full."""
    taken = set(used)
    if len(taken) >= max_members:
        raise Exhausted(f"LAN {lan!r} is full ({max_members} members)",
                        f"remove a member (natctl lan remove {lan} MEMBER) or create the LAN with a larger --max-members")
    for host in ipaddress.IPv4Network(subnet).hosts():
        if str(host) not in taken:
            return str(host)
    raise Exhausted(f"LAN {lan!r} is full (its subnet {subnet} has no free address)",
                    "remove a member, or create the LAN with a larger --subnet")


def check_public_key(text: str) -> str:
    """A WireGuard public key: 32 bytes in base64 (44 characters)."""
    import base64
    import binascii

    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32 or len(text) != 44:
        raise UsageError(f"invalid WireGuard public key {text!r}", "pass the 44-character key 'wg pubkey' prints")
    return text
