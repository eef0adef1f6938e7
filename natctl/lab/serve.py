"""`natctl serve` in a lab's relay namespace, its JSON log in a file (the kernel tests', the fleet lab's)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

from natctl.lab.netns import natctl_argv, spawn, stop


class Daemon:
    """`natctl serve` in the relay namespace, its JSON log in a file."""

    def __init__(self, lab, state: str, log: str, *args: str, ns: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.lab, self.state, self.log, self.args = lab, state, log, args
        self.ns = ns or lab.relay_ns  # another relay of a fleet lab
        self.env = env or {}
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
            self.proc = spawn(natctl_argv(self.state, "serve", *self.args), ns=self.ns, stdout=out, stderr=out,
                              env={**os.environ, "NATCTL_CONFIG": "/nonexistent", **self.env})
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
