"""A fleet in namespaces: relays (each a fresh VPS of its own) on one throwaway PostgreSQL, players and
hosts behind home routers. The fleet's kernel tests and its bench share it; it drives natctl only as
the README does: `natctl relay join`, `natctl serve`, `natctl lobby create`, from each relay's shell.

Everything it makes (namespaces, kernel tables, daemons, the database) goes in ``close()``, also
after a failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from natctl.daemon import wire
from natctl.kernel.nft import parse_listing
from natctl.lab import topology
from natctl.lab.gamehost import GameHost
from natctl.lab.netns import natctl_argv, run
from natctl.lab.postgres import Postgres, launch
from natctl.lab.serve import Daemon
from natctl.lab.traffic import udp_socket
from natctl.lab.xdp import detach_all
from natctl.plan import DNAT, Element

REG = 8809  # every relay's registration port


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
        """The relay dies: its daemon is killed and its kernel table is gone (as after a crash and reboot), and
        its XDP program too, which outlives the daemon and would go on forwarding established flows."""
        relay.daemon.kill()
        run(["nft", "delete", "table", "inet", "natctl"], ns=relay.ns, check=False)
        detach_all(relay.ns, "eth0")  # every relay of the lab has one interface, eth0

    def mappings(self, relay: Relay) -> int:
        """DNAT elements in a relay's kernel (two per mapping)."""
        return len(self.dnat(relay))

    def dnat(self, relay: Relay) -> set[Element]:
        """The DNAT elements in a relay's kernel: two per mapping, keyed by the client's address and by the
        host's (key: sender IP, proto, sender port, relay port)."""
        out = run(["nft", "-j", "list", "map", "inet", "natctl", DNAT], ns=relay.ns, check=False)
        if out.returncode != 0:
            return set()
        return {e for e in parse_listing(json.loads(out.stdout)).elements if e.set == DNAT}

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


@contextmanager
def running(tmpdir: str, regions: tuple[str, ...] = ("eu", "eu", "us"), sites: dict[str, list[str]] | None = None,
            **settings: Any) -> Iterator[FleetLab]:
    """``build`` with every relay's daemon started; all of it removed on exit, also after a failure."""
    fleet = build(tmpdir, regions, sites, **settings)
    try:
        fleet.start()
        yield fleet
    finally:
        fleet.close()


def wait_for(what: str, check: Any, seconds: float = 20.0, every: float = 0.05) -> float:
    """Poll ``check()`` until true; the seconds it took (AssertionError naming ``what`` after ``seconds``)."""
    start = time.monotonic()
    while not check():
        if time.monotonic() - start > seconds:
            raise AssertionError(f"{what}: not within {seconds:g} s")
        time.sleep(every)
    return time.monotonic() - start


class Echo:
    """A game host that echoes every game datagram, registered with the reference client (v3: it follows
    the relay its lobby lives on, and goes home when keepalives stop)."""

    def __init__(self, ns: str, home: str, token: str, port: int = 27015, keepalive: float = 1.0,
                 retry: float = 0.3) -> None:
        self.host = GameHost(udp_socket(ns, port=port), (home, REG), token, version=3, keepalive=keepalive,
                             retry=retry)
        self.registered: dict[str, float] = {}  # relay IP -> when it first acknowledged a registration (monotonic)
        handle = self.host.session.handle

        def spy(data: bytes, src: tuple[str, int]) -> bool:
            with contextlib.suppress(wire.WireError):
                if src[1] == REG and wire.decode_reply(data)[0] == wire.REGISTERED:
                    self.registered.setdefault(src[0], time.monotonic())
            return handle(data, src)

        self.host.session.handle = spy  # type: ignore[method-assign]
        self.relay_ip, self.port = self.host.start()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        """Where players send: the relay and port its last registration reply named."""
        s = self.host.session
        return s.relay_ip or self.relay_ip, s.host_port or self.port

    def _loop(self) -> None:
        self.host.settimeout(0.05)
        while not self._stop.is_set():
            try:
                data, src = self.host.recvfrom()
            except TimeoutError:
                continue
            self.host.sendto(data, src)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.host.close()


def echoed(sock: socket.socket, to: tuple[str, int], data: bytes, tries: int = 3, wait: float = 0.5) -> bool:
    """Send ``data`` to ``to`` until the same bytes come back from there."""
    sock.settimeout(wait)
    for _ in range(tries):
        sock.sendto(data, to)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                got, src = sock.recvfrom(65535)
            except TimeoutError:
                break
            if got == data and src == to:
                return True
    return False


class Player(threading.Thread):
    """A player sending a numbered datagram every ``every`` seconds (at most ``most``) to wherever its host's
    last registration names, as a game's clients follow their host; notes when each was sent, and when and
    through which relay IP it came back."""

    MAGIC = b"natctl-seq"

    def __init__(self, sock: socket.socket, host: Echo, every: float = 0.02, most: int = 3000) -> None:
        super().__init__(daemon=True)
        self.sock, self.host, self.every, self.most = sock, host, every, most
        self.sent: list[float] = []
        self.got: dict[int, tuple[float, str]] = {}
        self.sending, self.stopped = threading.Event(), threading.Event()
        self.sending.set()

    def run(self) -> None:
        t0, n = time.monotonic(), len(self.MAGIC)
        while not self.stopped.is_set():
            due = t0 + len(self.sent) * self.every
            if self.sending.is_set() and len(self.sent) < self.most and time.monotonic() >= due:
                with contextlib.suppress(OSError):
                    self.sock.sendto(self.MAGIC + len(self.sent).to_bytes(4, "big"), self.host.address)
                self.sent.append(time.monotonic())
            self.sock.settimeout(max(0.001, t0 + len(self.sent) * self.every - time.monotonic()))
            with contextlib.suppress(OSError):  # a timeout, or an ICMP error from a dead relay
                data, src = self.sock.recvfrom(64)
                if data.startswith(self.MAGIC):
                    self.got.setdefault(int.from_bytes(data[n:], "big"), (time.monotonic(), src[0]))

    def back_after(self, t: float, via: str) -> float | None:
        """When the first datagram sent after ``t`` came back through the relay at ``via``."""
        return min((at for seq, (at, ip) in list(self.got.items()) if self.sent[seq] >= t and ip == via), default=None)

    def lost(self, start: float, end: float = float("inf")) -> int:
        """Datagrams sent between ``start`` and ``end`` that never came back."""
        return sum(1 for seq, at in enumerate(self.sent) if start <= at < end and seq not in self.got)

    def close(self) -> None:
        self.stopped.set()
        self.join(5)
        self.sock.close()
