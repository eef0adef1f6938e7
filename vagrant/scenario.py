#!/usr/bin/env python3
"""Play the GM scenario on the Vagrant VMs: the same story, step for step, that the kernel tests
play on network namespaces (tests/support/gm_scenario.py).

    cd vagrant && vagrant up && python3 scenario.py

Runs on the host with the standard library only. It reaches the VMs over ssh
(with the config 'vagrant ssh-config' prints) and starts background programs
as transient systemd units, so that Ctrl-C reaches them as it would from a
terminal. It resets what an earlier run left (GMs, tunnels, units) first, so
it can run again.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from support import gm_scenario  # noqa: E402

RELAY_IP = "192.168.56.10"
VENV = "/opt/natctl/.venv/bin"
WORK = "/tmp/natctl-scenario"
UNIT = "natctl-scenario"
MACHINES = ("relay", *gm_scenario.GMS, *gm_scenario.PLAYERS)


class VmProc:
    def __init__(self, vms: VagrantMachines, machine: str, unit: str, log: str) -> None:
        self.vms, self.machine, self.unit, self.path = vms, machine, unit, log

    def log(self) -> str:
        return self.vms.run(self.machine, ["cat", self.path], check=False)

    def interrupt(self) -> int | None:
        show = ["systemctl", "show", "--value", "-p"]
        self.vms.run(self.machine, ["systemctl", "kill", "-s", "INT", "--kill-whom=main", self.unit], check=False)
        deadline = time.monotonic() + 5
        while self.vms.run(self.machine, [*show, "SubState", self.unit]).strip() in ("running", "stop-sigterm"):
            if time.monotonic() > deadline:
                self.vms.run(self.machine, ["systemctl", "stop", self.unit], check=False)
                return None
            time.sleep(0.2)
        status = self.vms.run(self.machine, [*show, "ExecMainStatus", self.unit]).strip()
        self.vms.run(self.machine, ["systemctl", "stop", self.unit], check=False)
        return int(status) if status.isdigit() else None


class VagrantMachines:
    """``Machines`` (see tests/support/gm_scenario.py) over the Vagrant VMs."""

    relay_ip = RELAY_IP
    vpn_subnet = "10.77.0.0/24"  # natctl's default

    def __init__(self) -> None:
        self.tmp = tempfile.mkdtemp(prefix="natctl-vagrant-")
        config = subprocess.run(["vagrant", "ssh-config"], cwd=HERE, capture_output=True, text=True, check=True)
        self.config = os.path.join(self.tmp, "ssh-config")
        with open(self.config, "w") as fh:
            fh.write(config.stdout)
        self._seq = 0

    def run(self, machine: str, argv: Sequence[str], input: str | None = None, check: bool = True,
            user: bool = False) -> str:
        command = shlex.join(argv) if user else "sudo -n " + shlex.join(argv)
        proc = subprocess.run(["ssh", "-F", self.config, "-o", "ControlMaster=auto", "-o", "ControlPersist=60",
                               "-o", f"ControlPath={self.tmp}/%h", machine, command],
                              input=input, capture_output=True, text=True, timeout=120)
        if check and proc.returncode != 0:
            raise gm_scenario.ScenarioFailed(f"on {machine}: {command} exited {proc.returncode}: {proc.stderr}")
        return proc.stdout

    def start(self, machine: str, argv: Sequence[str], user: bool = False) -> VmProc:
        self._seq += 1
        unit, log = f"{UNIT}-{self._seq}", f"{WORK}/logs/{self._seq}.log"
        props = ["-p", "RemainAfterExit=yes", "-p", f"StandardOutput=truncate:{log}", "-p", "StandardError=inherit"]
        if user:
            props += ["--uid=vagrant", "-p", f"WorkingDirectory={self.workdir(machine)}"]
        self.run(machine, ["systemd-run", "--quiet", f"--unit={unit}", *props, *argv])
        return VmProc(self, machine, unit, log)

    def natctl(self) -> list[str]:
        return [f"{VENV}/natctl", "--relay-ip", RELAY_IP]

    def python(self) -> list[str]:
        return [f"{VENV}/python"]

    def workdir(self, machine: str) -> str:
        return f"{WORK}/home"

    def interface(self, gm: str) -> str:
        return f"natctl-{gm}"

    def reset(self) -> None:
        """Undo an earlier run: units, tunnels, GMs (and their sessions), scratch directories."""
        for machine in MACHINES:
            self.run(machine, ["sh", "-c", f"systemctl stop '{UNIT}-*'; systemctl reset-failed '{UNIT}-*'; "
                               f"rm -rf {WORK} && mkdir -p {WORK}/logs {WORK}/home && chmod 777 {WORK}/home"],
                     check=False)
        for gm in gm_scenario.GMS:
            self.run(gm, ["ip", "link", "delete", "dev", self.interface(gm)], check=False)
            self.run("relay", [*self.natctl(), "gm", "remove", gm], check=False)


def main() -> int:
    vms = VagrantMachines()
    vms.reset()
    try:
        gm_scenario.run(vms)
    except gm_scenario.ScenarioFailed as err:
        print(f"FAILED: {err}", file=sys.stderr)
        return 1
    finally:
        vms.reset()
    print("the GM scenario passed on the Vagrant VMs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
