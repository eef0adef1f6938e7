"""Shared fixtures: a lab of namespaces, and natctl's CLI run inside the relay namespace.

Kernel tests run by default (CI is root). Every namespace a fixture makes is
removed in its teardown, also when the test fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from natctl.lab import topology
from natctl.lab.netns import run

ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ROOT:
        return
    skip = pytest.mark.skip(reason="kernel test: needs root (CI runs as root)")
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)


class Cli:
    """natctl's command line inside a namespace, with its own store."""

    def __init__(self, ns: str | None, state: str, relay_ip: str | None = None) -> None:
        self.ns, self.state, self.relay_ip = ns, state, relay_ip

    def __call__(self, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "natctl", "--state", self.state]
        if self.relay_ip:
            argv += ["--relay-ip", self.relay_ip]
        full = (["ip", "netns", "exec", self.ns] if self.ns else []) + argv + list(args)
        proc = subprocess.run(full, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "NATCTL_CONFIG": "/nonexistent", **(env or {})})
        if check and proc.returncode != 0:
            raise AssertionError(f"natctl {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
        return proc

    def json(self, *args: str) -> object:
        return json.loads(self(*args, "--json").stdout)


@pytest.fixture(scope="module")
def lab() -> Iterator[topology.Lab]:
    """The demo's topology plus a second lobby's host and a stranger, one per test module."""
    sites = {"home-host": ["host"], "home-clients": ["client1", "client2"], "home-host2": ["host2"],
             "elsewhere": ["stranger"]}
    lab = topology.build(sites)
    try:
        yield lab
    finally:
        lab.teardown()


@pytest.fixture
def relay(lab: topology.Lab, tmp_path) -> Iterator[Cli]:
    """natctl in the lab's relay, with a fresh store; its table is removed afterwards."""
    cli = Cli(lab.relay_ns, str(tmp_path / "natctl.db"))
    try:
        yield cli
    finally:
        run(["nft", "delete", "table", "inet", "natctl"], ns=lab.relay_ns, check=False)
        run(["conntrack", "-F"], ns=lab.relay_ns, check=False)
        for router in lab.routers.values():
            run(["conntrack", "-F"], ns=router, check=False)
