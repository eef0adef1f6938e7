"""Settings: defaults < /etc/natctl/natctl.toml < NATCTL_* environment < command line."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, fields, replace
from typing import Any

from natctl.errors import NatctlError, UsageError
from natctl.model import PortRange, parse_duration, parse_ipv4, parse_port, parse_port_range

CONFIG_PATH = "/etc/natctl/natctl.toml"


@dataclass(frozen=True)
class Settings:
    state: str = "/var/lib/natctl/natctl.db"
    relay_ip: str = ""  # empty: the address of the default route's interface
    ports: PortRange = PortRange(20000, 29999)
    registration_port: int = 8809
    accel: str = "auto"  # xdp, none or auto
    interface: str = ""  # for XDP; empty: the default route's interface
    idle_timeout: int = 300  # seconds without packets before a mapping expires
    cleanup_interval: int = 30
    metrics: str = ""  # host:port for the Prometheus endpoint; empty: off
    lock_timeout: float = 5.0  # seconds to wait for another natctl's store transaction


# How each setting is parsed from text (config file values may already be typed).
PARSERS: dict[str, Any] = {
    "state": str,
    "relay_ip": lambda v: parse_ipv4(v) if v else "",
    "ports": lambda v: v if isinstance(v, PortRange) else parse_port_range(str(v)),
    "registration_port": lambda v: parse_port(v, "registration port"),
    "accel": lambda v: _choice(v, ("xdp", "none", "auto"), "accel"),
    "interface": str,
    "idle_timeout": lambda v: v if isinstance(v, int) else parse_duration(str(v)),
    "cleanup_interval": lambda v: v if isinstance(v, int) else parse_duration(str(v)),
    "metrics": str,
    "lock_timeout": float,
}


def _choice(value: str, allowed: tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise UsageError(f"invalid {what} {value!r}", "use one of " + ", ".join(allowed))
    return value


def load(overrides: dict[str, Any] | None = None, path: str | None = None,
         environ: dict[str, str] | None = None) -> Settings:
    """Merge the sources in order; the last one that sets a value wins."""
    env = os.environ if environ is None else environ
    path = path or env.get("NATCTL_CONFIG", CONFIG_PATH)
    values: dict[str, Any] = {}
    if os.path.exists(path):
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise NatctlError(f"cannot read config {path}: {err}", "fix the file or remove it") from None
        doc.pop("gm", None)  # the [gm] table: natctl.gm.model reads it
        unknown = set(doc) - {f.name for f in fields(Settings)}
        if unknown:
            raise UsageError(f"unknown setting {sorted(unknown)[0]!r} in {path}",
                             "see the README for the settings natctl knows")
        values.update(doc)
    for f in fields(Settings):
        if f"NATCTL_{f.name.upper()}" in env:
            values[f.name] = env[f"NATCTL_{f.name.upper()}"]
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    settings = Settings()
    for name, raw in values.items():
        settings = replace(settings, **{name: PARSERS[name](raw)})
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
