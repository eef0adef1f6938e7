"""Fixtures of the kernel tests: a lab of namespaces, natctl's CLI in its relay, game sockets.

Every namespace a fixture makes is removed in its teardown, also when the test fails.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from natctl.lab import topology
from natctl.lab.netns import run
from natctl.lab.traffic import udp_socket
from support import labs
from support.cli import Cli

HOST_PORT = 27015


@pytest.fixture(scope="module")
def lab() -> Iterator[topology.Lab]:
    """The demo's topology plus a second lobby's host and a stranger, one per test module.

    Home routers are stock Linux masquerade (port-restricted). Modules about hand-made mappings
    override it with ``support.labs.cone_lab`` and say why."""
    yield from labs.built(topology.DEFAULT_NAT)


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


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, monkeypatch, relay: Cli) -> str:
    """A module that asks for it runs each test on both store engines: the relay's SQLite file, and a fresh
    PostgreSQL database where the relay is a fleet of one (the CLI and the daemon read NATCTL_STORE)."""
    if request.param == "postgresql":
        monkeypatch.setenv("NATCTL_STORE", request.getfixturevalue("pg_db").url)
        relay("relay", "join", "--region", "lab", "--name", "lab-relay")
    return request.param


@pytest.fixture
def socks(lab: topology.Lab) -> Iterator[dict]:
    """A game socket per lab member; each says hello to the relay, as registering does."""
    out = {name: udp_socket(lab.ns(name), port=HOST_PORT if name.startswith("host") else 40000 + i)
           for i, name in enumerate(lab.members)}
    for s in out.values():
        topology.say_hello(s, lab)
    yield out
    for s in out.values():
        s.close()


@pytest.fixture
def game(lab: topology.Lab) -> Iterator[dict]:
    """Game sockets: the hosts on 27015, the players on their own ports (none has talked to the relay yet)."""
    socks = {name: udp_socket(lab.ns(name), port=HOST_PORT if name.startswith("host") else 41000 + i)
             for i, name in enumerate(lab.members)}
    yield socks
    for s in socks.values():
        s.close()
