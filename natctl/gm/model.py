"""GM data and the address/port pool (pure: no I/O). Their settings are the [gm] table (natctl.config)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from natctl.config import VPNS, GmSettings
from natctl.errors import Conflict, Exhausted, UsageError
from natctl.model import PortRange

__all__ = ["VPNS", "GmSettings", "Gm", "Tunnel", "check_ports", "next_address", "pick_port"]
OWNER = "gm:"  # forwards owned by "gm:NAME" are that GM's session


def check_ports(gm: GmSettings, relay_ports: PortRange, registration_port: int) -> None:
    """GM ports must not collide with the relay's lobby ports, its registration port or the VPN port."""
    if gm.ports.low <= relay_ports.high and relay_ports.low <= gm.ports.high:
        raise UsageError(f"the GM port range {gm.ports} overlaps the relay ports {relay_ports}",
                         "move one of them (natctl gm --ports, or --ports)")
    for port, what in ((registration_port, "registration port"), (gm.port, "VPN port")):
        if port in gm.ports:
            raise UsageError(f"the {what} {port} lies inside the GM port range {gm.ports}",
                             "move one of them (natctl gm --ports / --listen-port)")


@dataclass(frozen=True)
class Gm:
    """A game master: fixed VPN address, fixed public port, and the VPN identity the relay knows."""

    name: str
    vpn: str
    address: str
    port: int
    public_key: str = ""  # WireGuard only; OpenVPN knows a GM by its certificate's CN (the name)
    created: float = 0.0


def next_address(settings: GmSettings, used: Iterable[str]) -> str:
    """The lowest free address after the relay's own; Exhausted when the subnet is full."""
    taken = set(used) | {settings.relay_address}
    for host in settings.network.hosts():
        if str(host) not in taken:
            return str(host)
    raise Exhausted(f"the VPN address pool {settings.subnet} is full ({len(taken) - 1} GMs)",
                    "remove a GM (natctl gm remove NAME) or use a larger subnet (natctl gm --subnet)")


def pick_port(settings: GmSettings, taken: Iterable[int], wanted: int | None = None) -> int:
    """``wanted`` if it is inside the GM range and free, else the lowest free port of the range."""
    busy = set(taken)
    if wanted is not None:
        if wanted not in settings.ports:
            raise UsageError(f"public port {wanted} is outside the GM port range {settings.ports}",
                             "pick a port inside it, or change the range (natctl gm --ports LOW-HIGH)")
        if wanted in busy:
            raise Conflict(f"public port {wanted} is already taken (another GM or a forward)",
                           "pick another --port, or leave it out to get a free one")
        return wanted
    for port in range(settings.ports.low, settings.ports.high + 1):
        if port not in busy:
            return port
    raise Exhausted(f"every GM port in {settings.ports} is taken",
                    "remove a GM, or widen the range (natctl gm --ports LOW-HIGH)")


@dataclass(frozen=True)
class Tunnel:
    """A GM's tunnel as the relay sees it. ``problem`` says why it is not up and what to do."""

    state: str  # up, down or unknown
    last_handshake: float | None = None
    endpoint: str | None = None
    problem: str = ""
