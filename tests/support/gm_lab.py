"""The GM scenario's machines as network namespaces: a relay, two GMs and two players behind home routers.

Everything it makes has a unique name (namespaces, WireGuard interfaces and
so their control sockets, which all namespaces share) and ``teardown``
removes it all, also after a failure. Only 198.18.0.0/15 and loopback are
used, the VPN included.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence

from natctl.gm.wireguard import socket_path, stale_socket
from natctl.lab import topology
from natctl.lab.netns import natctl_argv, need, run, stop
from support.unprivileged import NOBODY, python  # players need no admin rights

SITES = {"home-gm1": ["gm1"], "home-gm2": ["gm2"], "home-players": ["player1", "player2"]}
VPN_SUBNET = "198.18.250.0/24"
SITES_GMS = ["gm1", "gm2"]


class NetnsProc:
    def __init__(self, argv: list[str], log: str, cwd: str | None) -> None:
        self.path = log
        with open(log, "w") as fh:
            self.popen = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, cwd=cwd,
                                          start_new_session=True, env=_env())

    def log(self) -> str:
        with open(self.path) as fh:
            return fh.read()

    def interrupt(self) -> int | None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signal.SIGINT)  # `ip netns exec` execs: this is the command itself
            try:
                return self.popen.wait(5)
            except subprocess.TimeoutExpired:
                stop(self.popen)
                return None
        return self.popen.returncode


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **dict(python()[1])}


class NetnsMachines:
    """``Machines`` (see gm_scenario) over a lab of namespaces."""

    def __init__(self, lab: topology.Lab, tmp: str) -> None:
        self.lab, self.tmp = lab, tmp
        self.relay_ip = lab.relay_ip
        self.vpn_subnet = VPN_SUBNET
        self.relay_interface = f"{lab.prefix}wg"
        self.state = os.path.join(tmp, "relay", "natctl.db")
        self.env = {"NATCTL_CONFIG": "/nonexistent",
                    "NATCTL_GM_INTERFACE": self.relay_interface, "NATCTL_GM_SUBNET": VPN_SUBNET}
        self.procs: list[NetnsProc] = []
        self._seq = 0

    def _argv(self, machine: str, argv: Sequence[str], user: bool) -> list[str]:
        return ["ip", "netns", "exec", self.lab.ns(machine), *(NOBODY if user else []), *argv]

    def run(self, machine: str, argv: Sequence[str], input: str | None = None, check: bool = True,
            user: bool = False) -> str:
        proc = subprocess.run(self._argv(machine, argv, user), input=input, capture_output=True, text=True,
                              timeout=60, env={**_env(), **self.env})
        if check and proc.returncode != 0:
            raise AssertionError(f"on {machine}: {' '.join(argv)} exited {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def start(self, machine: str, argv: Sequence[str], user: bool = False) -> NetnsProc:
        self._seq += 1
        log = os.path.join(self.tmp, f"{machine}-{self._seq}.log")
        proc = NetnsProc(self._argv(machine, argv, user), log, self.workdir(machine) if user else None)
        self.procs.append(proc)
        return proc

    def natctl(self) -> list[str]:
        return natctl_argv(self.state)

    def python(self) -> list[str]:
        return list(python()[0])  # one that uid 65534 can run, wherever the checkout is

    def workdir(self, machine: str) -> str:
        path = os.path.join(self.tmp, "home", machine)
        if not os.path.isdir(path):
            os.makedirs(path)
            os.chmod(path, 0o777)
        return path

    def interface(self, gm: str) -> str:
        return f"{self.lab.prefix}{gm}"[:15]

    def interfaces(self) -> list[str]:
        return [self.relay_interface, *(self.interface(gm) for gm in SITES_GMS)]


def build() -> NetnsMachines:
    need("wireguard-go", "wg", "wg-quick", "socat", "setpriv", "ss")
    lab = topology.build(SITES)
    tmp = tempfile.mkdtemp(prefix=f"{lab.prefix}-")
    os.chmod(tmp, 0o755)  # players run as nobody and read nothing else here
    os.makedirs(os.path.join(tmp, "relay"))
    return NetnsMachines(lab, tmp)


def teardown(m: NetnsMachines) -> None:
    """Stop what was started, delete the tunnels (wireguard-go exits and drops its socket), the lab,
    and any control socket a killed wireguard-go left behind."""
    for proc in m.procs:
        stop(proc.popen)
    for machine, iface in [("relay", m.relay_interface), *((gm, m.interface(gm)) for gm in SITES_GMS)]:
        run(["ip", "link", "delete", "dev", iface], ns=m.lab.ns(machine), check=False)
    m.lab.teardown()
    for iface in m.interfaces():
        path = socket_path(iface)
        if stale_socket(path):
            os.unlink(path)
    shutil.rmtree(m.tmp, ignore_errors=True)
