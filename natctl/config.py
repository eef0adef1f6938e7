"""Settings, one loader for all of them: defaults < /etc/natctl/natctl.toml < NATCTL_* environment < options.

The file's top level holds the relay's settings; each table holds one
feature's (``[gm]`` today). Every table is read the same way: known keys
only, each parsed from text by its parser, ``NATCTL_<TABLE>_<KEY>`` in the
environment, then the command line's options.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from natctl.errors import NatctlError, UsageError
from natctl.model import PortRange, parse_cidr, parse_duration, parse_ipv4, parse_port, parse_port_range

CONFIG_PATH = "/etc/natctl/natctl.toml"
VPNS = ("wireguard", "openvpn")


@dataclass(frozen=True)
class GmSettings:
    """The ``[gm]`` table: game masters' VPN and public ports."""

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


DEFAULT_LAN_POOL = "10.198.0.0/16"  # see the README: private (games treat it as a LAN), used by no common router or VPN


@dataclass(frozen=True)
class LanSettings:
    """The ``[lan]`` settings: the relay's LAN interface and the pool LANs' subnets come from."""

    interface: str = "natctl-lan"  # one WireGuard interface for every LAN; unique on the machine
    listen_port: int = 51821  # the GMs' VPN has 51820
    pool: str = DEFAULT_LAN_POOL  # each LAN gets a /prefix of it unless created with --subnet
    prefix: int = 24
    endpoint: str = ""  # what members dial; empty: the relay IP
    key_file: str = ""  # empty: INTERFACE.key beside the store
    mtu: int = 1420  # the tunnel's, and so the game's interface's on every member
    idle_timeout: int = 900  # seconds without a handshake before cleanup removes a member
    max_members: int = 64
    ttl: int = 6 * 3600

    @property
    def network(self) -> ipaddress.IPv4Network:
        return ipaddress.IPv4Network(self.pool)



@dataclass(frozen=True)
class FleetSettings:
    """The ``[fleet]`` table: how relays sharing one PostgreSQL store watch each other (natctl.fleet)."""

    heartbeat: float = 2.0  # seconds between a relay daemon's heartbeats (and its safety-net checks)
    dead_after: float = 10.0  # seconds without a heartbeat before a relay is dead and its lobbies move
    failover: str = "region"  # where a dead relay's lobbies go: a live relay of its region, or "any" relay


@dataclass(frozen=True)
class Settings:
    """Everything a command or the daemon is configured with (defaults < file < NATCTL_* < options)."""

    state: str = "/var/lib/natctl/natctl.db"
    # The store: empty for the SQLite file at ``state``; a postgresql:// URL makes this relay a fleet member.
    store: str = ""
    relay_ip: str = ""  # empty: the address of the default route's interface
    ports: PortRange = PortRange(20000, 29999)
    registration_port: int = 8809
    accel: str = "auto"  # xdp, none or auto
    interface: str = ""  # for XDP; empty: the default route's interface
    idle_timeout: int = 300  # seconds without packets before a mapping expires
    cleanup_interval: int = 30
    metrics: str = ""  # host:port for the Prometheus endpoint; empty: off
    # The daemon's local control API (natctl.daemon.control), a root-only Unix socket; empty: STATE.sock, "off": none
    control_socket: str = ""
    lock_timeout: float = 5.0  # seconds to wait for another natctl's store transaction
    fix_forwarding: bool = True  # turn net.ipv4.ip_forward on before installing mappings (natctl.preflight)
    # Take over a kernel table that another store owns (natctl.sync); for one command, never from the file.
    adopt: bool = False
    noray: bool = False  # serve noray's protocol too (natctl.noray): TCP control port, pid datagrams on 8809
    noray_port: int = 8890
    noray_allow: tuple[str, ...] = ()  # networks allowed to use it; empty: everyone (as noray)
    # How a sync's elements reach the kernel: one nfnetlink batch (natctl.kernel.nlbatch) or one libnftables script.
    writer: str = "netlink"
    gm: GmSettings = field(default_factory=GmSettings)  # the [gm] table
    lan: LanSettings = field(default_factory=LanSettings)  # the [lan] table
    fleet: FleetSettings = field(default_factory=FleetSettings)  # the [fleet] table

    @property
    def store_location(self) -> str:
        """Where the store is: the PostgreSQL URL of a fleet, or the SQLite file."""
        return self.store or self.state


def _choice(allowed: tuple[str, ...], what: str) -> Any:
    def parse(value: str) -> str:
        if value not in allowed:
            raise UsageError(f"invalid {what} {value!r}", "use " + (" or ".join(allowed) if len(allowed) == 2
                                                                  else "one of " + ", ".join(allowed)))
        return value
    return parse


def _duration(v: Any) -> int:
    return v if isinstance(v, int) else parse_duration(str(v))


def _ports(v: Any) -> PortRange:
    return v if isinstance(v, PortRange) else parse_port_range(str(v))


def _switch(what: str) -> Any:
    def parse(v: Any) -> bool:
        text = str(v).strip().lower()  # a TOML boolean prints as True/False
        if text not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise UsageError(f"invalid {what} {v!r}", "use true or false")
        return text in ("1", "true", "yes", "on")
    return parse


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


# How each setting is parsed from text (config file values may already be typed).
PARSERS: dict[str, Any] = {
    "state": str,
    "store": lambda v: _store_url(str(v)),
    "relay_ip": lambda v: parse_ipv4(v) if v else "",
    "ports": _ports,
    "registration_port": lambda v: parse_port(v, "registration port"),
    "accel": _choice(("xdp", "none", "auto"), "accel"),
    "interface": str,
    "idle_timeout": _duration,
    "cleanup_interval": _duration,
    "metrics": str,
    "control_socket": str,
    "lock_timeout": float,
    "fix_forwarding": _switch("fix_forwarding"),
    "adopt": _switch("adopt"),
    "noray": _switch("noray"),
    "noray_port": lambda v: parse_port(v, "noray port"),
    "writer": _choice(("netlink", "nft"), "writer"),
    "noray_allow": lambda v: tuple(parse_cidr(c.strip()) for c in (v.split(",") if isinstance(v, str) else v)
                                   if c.strip()),
}
# Settings an operator gives one command (an option or NATCTL_*), never the config file.
NOT_IN_FILE = ("adopt",)
GM_PARSERS: dict[str, Any] = {
    "vpn": _choice(VPNS, "VPN"),
    "interface": _interface,
    "subnet": _subnet,
    "listen_port": lambda v: parse_port(v, "VPN listen port") if v not in (0, "0", "") else 0,
    "ports": _ports,
    "endpoint": str,
    "key_file": str,
    "handshake_timeout": _duration,
    "openvpn_ccd": str,
    "openvpn_pki": str,
    "openvpn_status": str,
    "openvpn_tls_crypt": str,
}
def _lan_pool(text: str) -> str:
    return str(ipaddress.IPv4Network(parse_cidr(text)))


def _int_in(low: int, high: int, what: str) -> Any:
    def parse(v: Any) -> int:
        try:
            n = int(str(v))
        except ValueError:
            n = low - 1
        if not low <= n <= high:
            raise UsageError(f"invalid {what} {v!r}", f"use a number from {low} to {high}")
        return n
    return parse


LAN_PARSERS: dict[str, Any] = {
    "interface": _interface,
    "listen_port": lambda v: parse_port(v, "LAN listen port"),
    "pool": _lan_pool,
    "prefix": _int_in(16, 29, "LAN prefix length"),
    "endpoint": str,
    "key_file": str,
    "mtu": _int_in(576, 1420, "LAN MTU"),
    "idle_timeout": lambda v: v if isinstance(v, int) else parse_duration(str(v)),
    "max_members": _int_in(2, 1000, "maximum of members"),
    "ttl": lambda v: v if isinstance(v, int) else parse_duration(str(v)),
}

def _seconds(what: str) -> Any:
    def parse(v: Any) -> float:
        try:
            n = float(str(v))
        except ValueError:
            n = -1.0
        if not 0.1 <= n <= 86400:
            raise UsageError(f"invalid {what} {v!r}", "use seconds from 0.1 to 86400")
        return n
    return parse


FLEET_PARSERS: dict[str, Any] = {
    "heartbeat": _seconds("heartbeat"),
    "dead_after": _seconds("dead_after"),
    "failover": _choice(("region", "any"), "failover"),
}


def _store_url(text: str) -> str:
    if text and not text.startswith(("postgresql://", "postgres://")):
        raise UsageError(f"invalid store {text.split('@')[-1]!r}",
                         "use a postgresql://USER@HOST/DB URL (or leave it empty for the SQLite file at state)")
    return text


# table name -> (its parsers, how its keys are named in messages)
TABLES: dict[str, tuple[dict[str, Any], str]] = {"gm": (GM_PARSERS, "GM setting"), "lan": (LAN_PARSERS, "LAN setting"),
                                                 "fleet": (FLEET_PARSERS, "fleet setting")}

T = TypeVar("T")


def _read(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    import tomllib  # only when there is a file to read

    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as err:
        raise NatctlError(f"cannot read config {path}: {err}", "fix the file or remove it") from None


def _table(defaults: T, parsers: dict[str, Any], what: str, prefix: str, from_file: Mapping[str, Any],
           env: Mapping[str, str], overrides: Mapping[str, Any] | None, path: str) -> T:
    """One table's settings from its sources in order; the last one that sets a value wins."""
    values: dict[str, Any] = dict(from_file)
    values.update({k: env[prefix + k.upper()] for k in parsers if prefix + k.upper() in env})
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    unknown = sorted(set(values) - set(parsers))
    if unknown:
        raise UsageError(f"unknown {what} {unknown[0]!r} (config file {path})",
                         "see the README for the settings natctl knows")
    return replace(defaults, **{k: parsers[k](v) for k, v in values.items()})  # type: ignore[type-var]


def load(overrides: Mapping[str, Any] | None = None, path: str | None = None,
         environ: Mapping[str, str] | None = None, tables: Mapping[str, Mapping[str, Any]] | None = None) -> Settings:
    """Every setting, from the file at ``path`` (or NATCTL_CONFIG), the environment and options.

    ``overrides`` are the top level's options, ``tables`` each table's (``{"gm": {...}}``).
    """
    env = os.environ if environ is None else environ
    path = path or env.get("NATCTL_CONFIG", CONFIG_PATH)
    doc = _read(path)
    for key in NOT_IN_FILE:
        if key in doc:
            raise UsageError(f"{key!r} cannot be set in the config file {path}",
                             f"remove it; pass --{key} (or NATCTL_{key.upper()}=1) to the one command that needs it")
    parsed: dict[str, Any] = {}
    for name, (parsers, what) in TABLES.items():
        section = doc.pop(name, {})
        if not isinstance(section, dict):
            raise UsageError(f"[{name}] in {path} must be a table", "see the README for the settings natctl knows")
        default = getattr(Settings(), name)
        parsed[name] = _table(default, parsers, what, f"NATCTL_{name.upper()}_", section, env,
                              (tables or {}).get(name), path)
    settings = _table(Settings(**parsed), PARSERS, "setting", "NATCTL_", doc, env, overrides, path)
    check_ports(settings)
    return settings


def check_ports(s: Settings) -> None:
    """Relay ports must not collide with the registration port."""
    if s.registration_port in s.ports:
        raise UsageError(f"the registration port {s.registration_port} lies inside the relay range {s.ports}",
                         "move one of them (--ports or registration_port)")


def local_port_overlap(ports: PortRange) -> str | None:
    """A warning if the kernel may pick relay ports for its own sockets."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            low, high = (int(x) for x in fh.read().split())
    except (OSError, ValueError):
        return None
    if ports.low <= high and low <= ports.high:
        return (f"the relay range {ports} overlaps the kernel's ip_local_port_range {low}-{high}: "
                f"pick --ports outside it, or narrow the kernel's range with sysctl")
    return None
