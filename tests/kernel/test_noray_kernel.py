"""noray's clients against `natctl serve --noray`, behind stock masquerading home routers.

A host and two players speak noray's protocol as netfox's Noray does (TCP lines, the pid from
the game socket, connect-relay, then a handshake both ways at once); the relayed traffic is
forwarded by the kernel, byte for byte. natctl's own registration works on the same UDP port
meanwhile, garbage changes nothing, and a host that disconnects takes its mappings with it.
"""

from __future__ import annotations

import os
import socket
import time

import pytest

from natctl.lab.gamehost import GameHost
from natctl.lab.traffic import collect, drain, tcp_connect, udp_socket
from support.noray_client import NorayPeer
from support.serve import Daemon

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("engine")]  # each test on both store engines too
TCP, REG = 8890, 8809


@pytest.fixture
def noray(lab, relay, tmp_path):
    d = Daemon(lab, relay.state, str(tmp_path / "serve.log"), "--noray")
    d.start()
    made: list[socket.socket] = []

    def peer(name: str, port: int) -> tuple[NorayPeer, socket.socket]:
        tcp = tcp_connect(lab.ns(name), (lab.relay_ip, TCP))
        udp = udp_socket(lab.ns(name), port=port)
        made.extend([tcp, udp])
        return NorayPeer(tcp, lab.relay_ip, REG), udp

    try:
        yield peer, d
    finally:
        d.kill()
        for s in made:
            s.close()


def handshake(a: socket.socket, a_to: tuple[str, int], b: socket.socket, b_to: tuple[str, int]) -> None:
    """Both sides send until each heard the other (netfox's PacketHandshake does the same); bounded."""
    heard_a = heard_b = False
    for _ in range(50):  # 50 rounds of 0.1 s at most
        a.sendto(b"hs-a", a_to)
        b.sendto(b"hs-b", b_to)
        time.sleep(0.1)
        heard_a = heard_a or any(d == b"hs-b" for d, _ in drain(a))
        heard_b = heard_b or any(d == b"hs-a" for d, _ in drain(b))
        if heard_a and heard_b:
            return
    raise AssertionError(f"handshake failed: a heard b {heard_a}, b heard a {heard_b}")


def test_noray_host_and_two_players_relay_through_the_kernel(lab, relay, noray):
    peer, daemon = noray
    host, hs = peer("host", 27015)
    oid, pid = host.register_host()
    assert len(oid) == 21 and len(pid) == 128 and host.register_remote(hs)
    players = {}
    for i, name in enumerate(("client1", "client2")):
        p, s = peer(name, 41000 + i)
        p.register_host()
        assert p.register_remote(s)
        p.connect_relay(oid)
        host_port = int(p.expect("connect-relay"))
        client_port = int(host.expect("connect-relay"))
        players[name] = (s, host_port, client_port)
    (s1, hp1, cp1), (s2, hp2, cp2) = players.values()
    assert hp1 == hp2 and cp1 != cp2  # the host's relay port is the same for every player
    for s, host_port, client_port in players.values():
        handshake(s, (lab.relay_ip, host_port), hs, (lab.relay_ip, client_port))
    time.sleep(0.3)  # the last handshakes still in flight
    for s in (hs, s1, s2):
        drain(s)
    # Game traffic, byte for byte, from the promised addresses; counted by the kernel.
    for s, host_port, client_port in players.values():
        for size in (1, 700, 1400):
            data = os.urandom(size)
            s.sendto(data, (lab.relay_ip, host_port))
            assert collect(hs, 1) == [(data, (lab.relay_ip, client_port))]
            hs.sendto(data[::-1], (lab.relay_ip, client_port))
            assert collect(s, 1) == [(data[::-1], (lab.relay_ip, host_port))]
    maps = relay.json("map", "list")
    assert len(maps) == 2 and all(m["to_host_packets"] >= 3 and m["to_client_packets"] >= 3 for m in maps)
    # The host leaves (its control connection closes): its mappings leave the kernel within 5 s.
    host.tcp.close()
    deadline = time.monotonic() + 5
    while relay.json("map", "list") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert relay.json("map", "list") == [] and relay.json("lobby", "list") == []
    s1.sendto(b"anyone?", (lab.relay_ip, hp1))
    assert collect(hs, 1, 0.5) == []
    log = open(daemon.log).read()
    assert oid not in log and pid not in log  # peer ids never reach the logs


def test_garbage_on_both_ports_and_natctl_registration_alongside(lab, relay, noray):
    peer, daemon = noray
    junk, js = peer("stranger", 5000)
    for line in (b"\xff\xfe\x00garbage", b"connect-relay nosuchoid", b"x" * 5000, b"register-host"):
        try:
            junk.tcp.sendall(line + b"\n")
        except OSError:
            break  # the over-long line closed it
    for data in (b"", b"NATC", os.urandom(128), b"y" * 3000):
        js.sendto(data, (lab.relay_ip, REG))
    time.sleep(0.3)
    assert all(len(d) <= 3 for d, _ in drain(js))  # never more than a 3-byte refusal, never OK
    # natctl's own protocol on the same UDP port, at the same time: a v2 host registers, a player joins.
    token = relay.json("lobby", "create", "g", "--open")["token"]
    host = GameHost(udp_socket(lab.ns("host"), port=27015), (lab.relay_ip, REG), token)
    try:
        _, host_port = host.start()
        time.sleep(0.3)
        s = udp_socket(lab.ns("client1"), port=41000)
        s.sendto(b"natctl still works", (lab.relay_ip, host_port))
        assert [d for d, _ in collect(host, 1)] == [b"natctl still works"]
        s.close()
    finally:
        host.close()
    # And noray still serves a newcomer.
    p, ps = peer("client2", 41001)
    assert len(p.register_host()[0]) == 21 and p.register_remote(ps)
    assert daemon.proc is not None and daemon.proc.poll() is None
