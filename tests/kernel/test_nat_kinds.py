"""Hosts and players behind every kind of home NAT, through `natctl serve` and the kernel.

A host of each kind registers with the reference client (registration v2: it
answers OPEN with a PUNCH); four players, two behind one stock masquerading
router and two behind one symmetric router, speak first. Every payload must
arrive both ways byte for byte, from the promised relay addresses, and after
the first packets the kernel forwards (its counters move, the daemon's do not).
A v1 host (no punches) is reached only where its NAT lets traffic in: that is
asserted too, as documented in the README.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from natctl.daemon import wire
from natctl.daemon.client import register
from natctl.lab import topology
from natctl.lab.gamehost import GameHost
from natctl.lab.netns import run, spawn, stop
from natctl.lab.traffic import collect, udp_socket
from support.cli import Cli
from support.serve import Daemon

pytestmark = pytest.mark.kernel
REG = 8809
KINDS = topology.NAT_KINDS
PLAYERS = {"p1": "c-pr", "p2": "c-pr", "p3": "c-sym", "p4": "c-sym"}


@pytest.fixture(scope="module")
def natlab() -> Iterator[topology.Lab]:
    sites = {f"h-{kind}": [f"host-{kind}"] for kind in KINDS}
    sites |= {"c-pr": ["p1", "p2"], "c-sym": ["p3", "p4"], "elsewhere": ["stranger"]}
    nat = {f"h-{kind}": kind for kind in KINDS} | {"c-pr": topology.PORT_RESTRICTED, "c-sym": topology.SYMMETRIC}
    lab = topology.build(sites, nat=nat)
    try:
        yield lab
    finally:
        lab.teardown()


@pytest.fixture
def relay(natlab: topology.Lab, tmp_path) -> Iterator[tuple[Cli, Daemon]]:
    cli = Cli(natlab.relay_ns, str(tmp_path / "natctl.db"))
    daemon = Daemon(natlab, cli.state, str(tmp_path / "serve.log"))
    try:
        yield cli, daemon
    finally:
        daemon.kill()
        run(["nft", "delete", "table", "inet", "natctl"], ns=natlab.relay_ns, check=False)
        for ns in [natlab.relay_ns, *natlab.routers.values()]:
            run(["conntrack", "-F"], ns=ns, check=False)


@pytest.fixture
def players(natlab: topology.Lab) -> Iterator[dict]:
    socks = {name: udp_socket(natlab.ns(name), port=41000 + i) for i, name in enumerate(PLAYERS)}
    yield socks
    for s in socks.values():
        s.close()


def kernel_packets(cli: Cli) -> int:
    """Packets the kernel forwarded for all mappings, both ways (nftables and XDP counters, as natctl reads them)."""
    return sum(m["to_host_packets"] + m["to_client_packets"] for m in cli.json("map", "list"))


def start(lab: topology.Lab, cli: Cli, daemon: Daemon) -> str:
    token = cli.json("lobby", "create", "g", "--open")["token"]
    daemon.start()
    return token


def round_trip(lab: topology.Lab, host, players: dict, host_port: int, tag: bytes) -> dict[str, tuple[str, int]]:
    """Each player sends 3 datagrams first; the host answers each; returns where the host saw each player."""
    sent = {name: [tag + b"%s-%d-" % (name.encode(), i) + os.urandom(100 + i) for i in range(3)] for name in players}
    for i in range(3):
        for name, s in players.items():
            s.sendto(sent[name][i], (lab.relay_ip, host_port))
    got = collect(host, 3 * len(players))
    by_name: dict[str, list[bytes]] = {}
    seen: dict[str, tuple[str, int]] = {}
    for data, src in got:
        name = data[len(tag):].split(b"-")[0].decode()
        by_name.setdefault(name, []).append(data)
        assert seen.setdefault(name, src) == src  # one relay address per player
    assert {n: sorted(d) for n, d in by_name.items()} == {n: sorted(d) for n, d in sent.items()}
    assert {src[0] for src in seen.values()} == {lab.relay_ip} and len(set(seen.values())) == len(players)
    for name, src in seen.items():
        reply = tag + os.urandom(300)
        host.sendto(reply, src)
        assert collect(players[name], 1) == [(reply, (lab.relay_ip, host_port))], name
    return seen


@pytest.mark.parametrize("kind", KINDS)
def test_a_v2_host_behind_each_nat_kind_reaches_players_behind_stock_and_symmetric_nat(natlab, relay, players,
                                                                                       kind):
    cli, daemon = relay
    token = start(natlab, cli, daemon)
    host = GameHost(udp_socket(natlab.ns(f"host-{kind}"), port=27015), (natlab.relay_ip, REG), token)
    try:
        relay_ip, host_port = host.start()
        time.sleep(0.3)  # the daemon opens the host port's listener
        first = round_trip(natlab, host, players, host_port, b"a")
        punched = daemon.events("punched")
        assert len(punched) == len(players) and host.session.punched == len(players)
        if kind == topology.SYMMETRIC:  # the host's NAT showed another port for every client port
            assert len({p["host"] for p in punched}) == len(players)
        before = kernel_packets(cli)
        assert round_trip(natlab, host, players, host_port, b"b") == first  # stable relay addresses
        assert kernel_packets(cli) >= before + (3 + 1) * len(players)  # 3 in, 1 back per player, by the kernel
        assert len(daemon.events("admitted")) == len(players)
    finally:
        host.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_v1_host_is_reached_only_where_its_nat_lets_traffic_in(natlab, relay, players, kind):
    cli, daemon = relay
    token = start(natlab, cli, daemon)
    sock = udp_socket(natlab.ns(f"host-{kind}"), port=27015)
    try:
        _, host_port = register(sock, (natlab.relay_ip, REG), token, version=1)
        time.sleep(0.3)
        players["p1"].sendto(b"knock", (natlab.relay_ip, host_port))
        got = collect(sock, 1, 1.5)
        if kind in (topology.FULL_CONE, topology.ADDRESS_RESTRICTED):
            assert [d for d, _ in got] == [b"knock"]
        else:  # the README: such a host needs the v2 client (or a port forward)
            assert got == []
    finally:
        sock.close()


def test_a_symmetric_host_whose_nat_changes_re_registers_and_its_players_follow(natlab, relay, players):
    cli, daemon = relay
    token = start(natlab, cli, daemon)
    kind = topology.SYMMETRIC
    host = GameHost(udp_socket(natlab.ns(f"host-{kind}"), port=27015), (natlab.relay_ip, REG), token)
    two = {n: players[n] for n in ("p1", "p3")}
    try:
        _, host_port = host.start()
        time.sleep(0.3)
        round_trip(natlab, host, two, host_port, b"a")
        # The router forgets every mapping (a reboot, a new public port): the next keepalive comes from
        # a new port, the relay asks for new punches, and the mappings follow.
        run(["conntrack", "-F"], ns=natlab.routers[f"h-{kind}"])
        host.session._next_keepalive = 0
        deadline = time.monotonic() + 5
        while len(daemon.events("punched")) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(daemon.events("registered")) == 2 and len(daemon.events("punched")) == 4, open(daemon.log).read()
        round_trip(natlab, host, two, host_port, b"b")
    finally:
        host.close()


def test_strangers_probing_client_ports_reach_nobody(natlab, relay, players):
    cli, daemon = relay
    token = start(natlab, cli, daemon)
    host = GameHost(udp_socket(natlab.ns("host-port-restricted"), port=27015), (natlab.relay_ip, REG), token)
    stranger = udp_socket(natlab.ns("stranger"), port=5000)
    try:
        _, host_port = host.start()
        time.sleep(0.3)
        seen = round_trip(natlab, host, {"p1": players["p1"]}, host_port, b"a")
        client_port = seen["p1"][1]
        for i in range(50):  # bounded: 50 datagrams to the client's relay port, also shaped like punches
            stranger.sendto(b"NATC\x02\x05" + i.to_bytes(4, "big") if i % 2 else b"hello %d" % i,
                            (natlab.relay_ip, client_port))
        time.sleep(0.5)
        assert collect(host, 1, 0.3) == [] and collect(players["p1"], 1, 0.3) == []
        assert len(cli.json("map", "list")) == 1
        # A late punch from the host itself (its OPEN was answered twice) never reaches the player;
        # the host's game traffic on the same path does.
        host.sendto(wire.encode_punch(12345), (natlab.relay_ip, client_port))
        host.sendto(b"game state", (natlab.relay_ip, client_port))
        assert collect(players["p1"], 2, 1.0) == [(b"game state", (natlab.relay_ip, host_port))]
    finally:
        host.close()
        stranger.close()


def test_the_readme_toy_host_behind_symmetric_nat_echoes_to_socat_players(natlab, relay, tmp_path):
    """As the README says to try it: the reference client's toy host (a subprocess, standard library only)
    behind a symmetric NAT, players with socat behind stock and symmetric NAT; echoes come back intact."""
    cli, daemon = relay
    token = start(natlab, cli, daemon)
    out = open(tmp_path / "host.out", "wb")
    host = spawn([sys.executable, "-m", "natctl.daemon.client", natlab.relay_ip, "--token", token, "--seconds", "20"],
                 ns=natlab.ns(f"host-{topology.SYMMETRIC}"), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 5
        while b"registered" not in (tmp_path / "host.out").read_bytes():
            assert host.poll() is None and time.monotonic() < deadline, (tmp_path / "host.out").read_text()
            time.sleep(0.05)
        host_port = int((tmp_path / "host.out").read_text().split("send to ")[1].split(";")[0].split(":")[1])
        time.sleep(0.3)
        for player in ("p1", "p3"):
            data = os.urandom(700)
            got = subprocess.run(["ip", "netns", "exec", natlab.ns(player), "socat", "-T", "3", "-",
                                  f"UDP4:{natlab.relay_ip}:{host_port}"], input=data, capture_output=True, timeout=10)
            assert got.stdout == data, player
    finally:
        stop(host)
        out.close()
