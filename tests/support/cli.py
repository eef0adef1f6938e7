"""natctl's command line as the tests run it: inside a namespace, on its own store."""

from __future__ import annotations

import json
import os
import subprocess

from natctl.lab.netns import natctl_argv


class Cli:
    """natctl's command line inside a namespace, with its own store and no config file."""

    def __init__(self, ns: str | None, state: str, relay_ip: str | None = None,
                 prefix: list[str] | None = None) -> None:
        self.ns, self.state, self.relay_ip = ns, state, relay_ip
        self.prefix = prefix or []  # runs natctl under it (e.g. unshare), before ip netns exec

    def argv(self, *args: str) -> list[str]:
        return self.prefix + natctl_argv(self.state, *args, ns=self.ns, relay_ip=self.relay_ip)

    def __call__(self, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(*args), capture_output=True, text=True, timeout=60,
                              env={**os.environ, "NATCTL_CONFIG": "/nonexistent", **(env or {})})
        if check and proc.returncode != 0:
            raise AssertionError(f"natctl {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def json(self, *args: str) -> object:
        return json.loads(self(*args, "--json").stdout)
