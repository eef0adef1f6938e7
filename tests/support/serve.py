"""`natctl serve` in a lab's relay namespace, its JSON log in a file (the kernel tests' daemon)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from natctl.lab.gamehost import GameHost
from natctl.lab.netns import natctl_argv, spawn, stop

REG = 8809  # the registration port


class Daemon:
    """`natctl serve` in the relay namespace, its JSON log in a file."""

    def __init__(self, lab, state: str, log: str, *args: str) -> None:
        self.lab, self.state, self.log, self.args = lab, state, log, args
        self.proc: subprocess.Popen | None = None

    def events(self, name: str | None = None) -> list[dict]:
        out = []
        for line in open(self.log).read().splitlines():
            if line.startswith("{"):
                rec = json.loads(line)
                if name is None or rec["event"] == name:
                    out.append(rec)
        return out

    def start(self) -> Daemon:
        started = len(self.events("started")) if os.path.exists(self.log) else 0
        with open(self.log, "ab") as out:
            self.proc = spawn(natctl_argv(self.state, "serve", *self.args), ns=self.lab.relay_ns, stdout=out, stderr=out,
                              env={**os.environ, "NATCTL_CONFIG": "/nonexistent"})
        deadline = time.monotonic() + 10
        while len(self.events("started")) == started:
            assert self.proc.poll() is None, open(self.log).read()
            assert time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)
        time.sleep(0.2)  # the registration port opens right after the start line
        return self

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def stop(self) -> int | None:
        if self.proc:
            stop(self.proc)
            return self.proc.returncode
        return None


def host_lobby(lab, relay, daemon: Daemon, game: dict, *create_args: str) -> tuple[str, int, str]:
    """Create lobby g, start the daemon, register the host from its game socket with the reference
    client (registration v2: it opens its stock router toward each new client); the host's loop owns
    ``game["host"]`` from here on. Returns (relay_ip, host_port, token) once the host port listens."""
    token = relay.json("lobby", "create", "g", *create_args)["token"]
    daemon.start()
    game["host"] = GameHost(game["host"], (lab.relay_ip, REG), token)
    relay_ip, host_port = game["host"].start()
    time.sleep(0.3)  # the daemon opens its listener on the new host port
    return relay_ip, host_port, token
