"""GM data, settings and the address/port pool (pure: no I/O but reading a settings file)."""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from natctl.config import CONFIG_PATH
from natctl.errors import Conflict, Exhausted, NatctlError, UsageError
from natctl.model import PortRange, parse_cidr, parse_port, parse_port_range

VPNS = ("wireguard", "openvpn")
OWNER = "gm:"  # forwards owned by "gm:NAME" are that GM's session


@dataclass(frozen=True)
class GmSettings:
    vpn: str = "wireguard"
    interface: str = "natctl-wg"  # WireGuard interface natctl owns; unique on the machine
    subnet: str = "10.77.0.0/24"  # the relay takes the first address, GMs the next ones
    listen_port: int = 0  # 0: 51820 for WireGuard, 1194 for OpenVPN
    ports: PortRange = PortRange(1802, 1901)  # public ports handed to GMs
    endpoint: str = ""  # host GMs dial; empty: the relay IP
    key_file: str = ""  # WireGuard server key; empty: IFACE.key beside the store
    handshake_timeout: int = 180  # seconds: WireGuard renews every 2 minutes while up
    openvpn_ccd: str = "/etc/openvpn/server/ccd"
    openvpn_pki: str = "/etc/openvpn/server/easy-rsa/pki"
    openvpn_status: str = "/run/openvpn-server/status-server.log"
    openvpn_tls_crypt: str = ""

    @property
    def port(self) -> int:
        """The VPN's own UDP port on the relay."""
        return self.listen_port or (51820 if self.vpn == "wireguard" else 1194)

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.subnet)

    @property
    def relay_address(self) -> str:
        """The relay's own address inside the VPN (GMs' replies go there)."""
        return str(next(self.network.hosts()))


def _interface(name: str) -> str:
    # Linux interface names: at most 15 bytes, no '/' or spaces; wg-quick is stricter still.
    if not (1 <= len(name) <= 15) or not all(c.isalnum() or c in "_=+.-" for c in name):
        raise UsageError(f"invalid interface name {name!r}", "use 1-15 letters, digits or _=+.-")
    return name


def _subnet(text: str) -> str:
    net = ipaddress.IPv4Network(parse_cidr(text))
    if net.num_addresses < 4:
        raise UsageError(f"VPN subnet {net} is too small", "use a /30 or larger (a /24 holds 253 GMs)")
    return str(net)


def _choice(text: str) -> str:
    if text not in VPNS:
        raise UsageError(f"invalid VPN {text!r}", "use wireguard or openvpn")
    return text


PARSERS: dict[str, Any] = {
    "vpn": _choice,
    "interface": _interface,
    "subnet": _subnet,
    "listen_port": lambda v: parse_port(v, "VPN listen port") if v not in (0, "0", "") else 0,
    "ports": lambda v: v if isinstance(v, PortRange) else parse_port_range(str(v)),
    "endpoint": str,
    "key_file": str,
    "handshake_timeout": int,
    "openvpn_ccd": str,
    "openvpn_pki": str,
    "openvpn_status": str,
    "openvpn_tls_crypt": str,
}


def load_settings(overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
                  path: str | None = None) -> GmSettings:
    """Defaults < the [gm] table of natctl's config file < NATCTL_GM_* variables < options."""
    env = os.environ if environ is None else environ
    path = path or env.get("NATCTL_CONFIG", CONFIG_PATH)
    known = {f.name for f in fields(GmSettings)}
    values: dict[str, Any] = {}
    if os.path.exists(path):
        try:
            with open(path, "rb") as fh:
                values.update(tomllib.load(fh).get("gm", {}))
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise NatctlError(f"cannot read GM config {path}: {err}", "fix the file or remove it") from None
    values.update({k: env[f"NATCTL_GM_{k.upper()}"] for k in known if f"NATCTL_GM_{k.upper()}" in env})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = set(values) - known
    if unknown:
        raise UsageError(f"unknown GM setting {sorted(unknown)[0]!r}", "see 'Game masters on one IP' in the README")
    return replace(GmSettings(), **{k: PARSERS[k](v) for k, v in values.items()})


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
