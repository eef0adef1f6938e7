"""A fleet in namespaces: relays (each a fresh VPS of its own) on one throwaway PostgreSQL, players and
hosts behind home routers. The fleet's kernel tests and its bench share it; it drives natctl only as
the README does: `natctl relay join`, `natctl serve`, `natctl lobby create`, from each relay's shell.

Everything it makes (namespaces, kernel tables, daemons, the database) goes in ``close()``, also
after a failure.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from natctl.lab import topology
from natctl.lab.netns import natctl_argv, run
from natctl.lab.postgres import Postgres, launch
from natctl.lab.serve import Daemon


@dataclass
class Relay:
    name: str
    region: str
    ns: str
    ip: str
    state: str  # its own SQLite path: the daemon's lock and control socket live beside it
    daemon: Daemon


@dataclass
class FleetLab:
    lab: topology.Lab
    pg: Postgres
    env: dict[str, str]
    relays: list[Relay] = field(default_factory=list)

    def natctl(self, relay: Relay, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """natctl's command line on a relay's machine, as its operator runs it."""
        proc = subprocess.run(natctl_argv(relay.state, *args, ns=relay.ns), capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **self.env})
        if check and proc.returncode != 0:
            raise AssertionError(f"natctl {' '.join(args)} on {relay.name} exited {proc.returncode}: {proc.stderr}")
        return proc

    def json(self, relay: Relay, *args: str) -> Any:
        return json.loads(self.natctl(relay, *args, "--json").stdout)

    def relay(self, name: str) -> Relay:
        return next(r for r in self.relays if r.name == name)

    def at(self, ip: str) -> Relay:
        return next(r for r in self.relays if r.ip == ip)

    def start(self) -> None:
        for r in self.relays:
            r.daemon.start()

    def kill(self, relay: Relay) -> None:
        """The relay dies: its daemon is killed and its kernel table is gone (as after a crash and reboot)."""
        relay.daemon.kill()
        run(["nft", "delete", "table", "inet", "natctl"], ns=relay.ns, check=False)

    def mappings(self, relay: Relay) -> int:
        """DNAT elements in a relay's kernel (two per mapping)."""
        out = run(["nft", "-j", "list", "map", "inet", "natctl", "dnat4"], ns=relay.ns, check=False)
        if out.returncode != 0:
            return 0
        doc = json.loads(out.stdout)
        return sum(len(x["map"].get("elem", [])) for x in doc["nftables"] if "map" in x)

    def close(self) -> None:
        for r in self.relays:
            r.daemon.stop()
            run(["nft", "delete", "table", "inet", "natctl"], ns=r.ns, check=False)
        self.lab.teardown()
        self.pg.close()


def build(tmpdir: str, regions: tuple[str, ...] = ("eu", "eu", "us"),
          sites: dict[str, list[str]] | None = None, heartbeat: float = 0.5, dead_after: float = 3.0,
          nat: str = topology.DEFAULT_NAT) -> FleetLab:
    """The lab, its database, and one joined relay per region given (relay1, relay2, ...); daemons not started."""
    pg = launch()
    fleet: FleetLab | None = None
    try:
        lab = topology.build(sites, nat=nat, relays=len(regions))
        env = {"NATCTL_CONFIG": "/nonexistent", "NATCTL_STORE": pg.url, "NATCTL_FLEET_HEARTBEAT": str(heartbeat),
               "NATCTL_FLEET_DEAD_AFTER": str(dead_after)}
        fleet = FleetLab(lab, pg, env)
        for n, ((ns, ip), region) in enumerate(zip(lab.relays, regions, strict=True), start=1):
            state = os.path.join(tmpdir, f"relay{n}.db")
            daemon = Daemon(lab, state, os.path.join(tmpdir, f"relay{n}.log"), ns=ns, env=env)
            relay = Relay(f"relay{n}", region, ns, ip, state, daemon)
            fleet.relays.append(relay)
            fleet.natctl(relay, "relay", "join", "--region", region, "--name", relay.name)
        return fleet
    except BaseException:
        if fleet is not None:
            fleet.close()
        else:
            pg.close()
        raise


def wait_for(what: str, check: Any, seconds: float = 20.0, every: float = 0.05) -> float:
    """Poll ``check()`` until true; the seconds it took (AssertionError naming ``what`` after ``seconds``)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"{what}: not within {seconds:g} s")
        time.sleep(every)
    return time.monotonic() - start
