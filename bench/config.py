"""A run's settings and the constants every part of the bench shares.

Imports nothing else of the bench, so that any module may import it (the
runner, the scale rows and the report all need ``INCREMENTAL_AT``, say)
without the modules importing one another.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

from natctl.errors import UsageError
from natctl.model import PortRange

ROOT = Path(__file__).resolve().parents[1]  # the checkout: the bench lives beside natctl, not inside it

# The lab's addresses (198.18.0.0/15 only) and the ports its flows use.
RELAY_IP = "198.18.0.1"
CLIENT_IP = "198.18.1.2"
CLIENT_NET = "198.18.1.0/24"  # the lobby the daemon is measured on admits this network only
HOST_IP = "198.18.2.2"
STRANGER_IP = "198.18.3.2"  # outside CLIENT_NET: floods the daemon in the admission study
SINK_PORT = 27015  # flood packets end here, counted and dropped
ECHO_PORT = 27016  # round-trip probes are echoed from here
DAEMON_HOST_PORT = 27017  # the game socket of the host that registers with natctl serve
REGISTRATION_PORT = 8809
PORTS = PortRange(10000, 32000)  # natctl's relay ports: below ip_local_port_range; 8809 stays outside
USER_HOST_PORTS = 30000  # P_h of the userspace relays; their P_c start at 20000

METHOD_NAMES = ("asyncio", "socat", "nftables", "xdp")  # methods.METHODS has one class for each
SIZES = (64, 512)
INCREMENTAL_AT = 10_000  # the installed count at which one more client is timed


@dataclass(frozen=True)
class Config:
    quick: bool = False
    methods: tuple[str, ...] = METHOD_NAMES
    sizes: tuple[int, ...] = SIZES
    runs: int = 5
    seconds: float = 2.0  # per flood
    packets: int = 3_000_000  # per flood, whichever bound comes first
    search_steps: int = 7
    probes: int = 2000
    probe_rate: float = 1000.0
    scale: bool = True
    install_counts: tuple[int, ...] = (1000, 10_000, 100_000)
    forwarding_counts: tuple[int, ...] = (10, 10_000, 100_000)
    scale_runs: int = 3
    daemon_clients: int = 50
    out: str = "bench/results"


def make_config(quick: bool = False, methods: str | None = None, runs: int | None = None,
                seconds: float | None = None, packets: int | None = None, scale: bool = True,
                out: str = "bench/results") -> Config:
    """Validated settings for a run; --quick is a short run of everything (about a minute)."""
    base = Config(quick=True, runs=1, seconds=1.0, packets=1_000_000, search_steps=4, probes=300,
                  install_counts=(1000, 10_000), forwarding_counts=(10, 10_000), scale_runs=1,
                  daemon_clients=10) if quick else Config()
    chosen = base.methods
    if methods:
        chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
        unknown = [m for m in chosen if m not in METHOD_NAMES]
        if unknown or not chosen:
            raise UsageError(f"unknown method {', '.join(unknown) or repr(methods)}",
                             f"choose from {', '.join(METHOD_NAMES)} (comma-separated)")
    if runs is not None and not 1 <= runs <= 50:
        raise UsageError(f"invalid --runs {runs}", "use 1 to 50")
    if seconds is not None and not 0.2 <= seconds <= 30:
        raise UsageError(f"invalid --seconds {seconds}", "use 0.2 to 30 seconds per flood")
    if packets is not None and not 1000 <= packets <= 100_000_000:
        raise UsageError(f"invalid --packets {packets}", "use 1000 to 100000000 packets per flood")
    return Config(**{**asdict(base), "methods": chosen, "runs": runs or base.runs,
                     "seconds": seconds or base.seconds, "packets": packets or base.packets,
                     "scale": scale, "out": out})


def child_env(**extra: str) -> dict[str, str]:
    """Environment of the processes the bench starts (also through ``ip netns exec``, which keeps it).

    ``python -m bench.worker`` needs the checkout on its path: the bench is not
    part of the installed package. natctl itself reads no config file there.
    """
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{path}" if path else str(ROOT),
            "NATCTL_CONFIG": "/nonexistent", **extra}
