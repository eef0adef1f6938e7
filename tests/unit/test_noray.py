"""noray's protocol in natctl's daemon, on the fake kernel over loopback (no root)."""

from __future__ import annotations

import socket
import time

import pytest
from test_daemon_logic import _listening, wait_for

from natctl.config import Settings
from natctl.kernel.fake import FakeKernel
from natctl.model import PortRange
from natctl.noray import protocol
from natctl.plan import DNAT
from natctl.service import Service
from support.noray_client import NorayPeer
from support.running import Running, free_udp_ports


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def noray(tmp_path):
    base, tcp_port = free_udp_ports(11), free_tcp_port()
    kernel = FakeKernel()
    settings = Settings(state=str(tmp_path / "s.db"), relay_ip="127.0.0.1", ports=PortRange(base + 1, base + 10),
                        registration_port=base, cleanup_interval=3600, noray=True, noray_port=tcp_port)
    make = lambda: Service(settings, kernel_factory=lambda: kernel)  # noqa: E731
    with Running(make) as running:
        peers: list[NorayPeer] = []

        def peer() -> NorayPeer:
            p = NorayPeer(socket.create_connection(("127.0.0.1", tcp_port), timeout=2), "127.0.0.1", base)
            peers.append(p)
            return p

        peer.running = running  # type: ignore[attr-defined]
        yield peer, kernel, base, make
        for p in peers:
            p.tcp.close()


def udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    return s


def test_ids_and_lines():
    ids = {protocol.new_id(protocol.PID_LENGTH) for _ in range(200)}
    assert len(ids) == 200 and all(len(i) == 128 and set(i) <= set(protocol.ALPHABET) for i in ids)
    assert not any(i.startswith("NATC") for i in ids)
    assert protocol.parse_line(b"connect-relay abc") == ("connect-relay", "abc")
    assert protocol.parse_line(b"register-host") == ("register-host", "")
    assert protocol.parse_line(b"\xff\xfe") is None and protocol.parse_line(b"a\x00b") is None
    assert protocol.pid_reply(True, 128) == b"OK" and protocol.pid_reply(False, 0) is None
    assert len(protocol.pid_reply(False, 3) or b"") <= 3 and protocol.pid_reply(False, 2) is None


def test_register_relay_and_disconnect(noray):
    peer, kernel, reg, make = noray
    host, client = peer(), peer()
    oid, pid = host.register_host()
    assert len(oid) == 21 and len(pid) == 128
    client.register_host()
    hs, cs = udp(), udp()
    assert host.register_remote(hs) and client.register_remote(cs)
    assert host.register_remote(hs)  # OK every time it is sent
    client.send(f"connect {oid}")
    assert client.expect("connect") == f"127.0.0.1:{hs.getsockname()[1]}"
    assert host.expect("connect") == f"127.0.0.1:{cs.getsockname()[1]}"
    client.connect_relay(oid)
    host_port, client_port = int(client.expect("connect-relay")), int(host.expect("connect-relay"))
    # Announced, not installed: the host's handshakes reach no one until the client has sent.
    assert not any(e.set == DNAT for e in kernel.installed.elements)
    wait_for("the host port's listener", lambda: _listening(host_port))
    cs.sendto(b"hello host", ("127.0.0.1", host_port))
    wait_for("the first packet", lambda: peer.running.sent)
    assert peer.running.sent == [(client_port, f"127.0.0.1:{hs.getsockname()[1]}", b"hello host")]
    dnat = {e.key: e.value for e in kernel.installed.elements if e.set == DNAT}
    assert dnat[("127.0.0.1", "udp", cs.getsockname()[1], host_port)] == ("127.0.0.1", hs.getsockname()[1])
    assert dnat[("127.0.0.1", "udp", hs.getsockname()[1], client_port)] == ("127.0.0.1", cs.getsockname()[1])
    client.connect_relay(oid)  # again: the same ports
    assert (int(client.expect("connect-relay")), int(host.expect("connect-relay"))) == (host_port, client_port)
    # The host's control connection closes: its lobby and every mapping leave the kernel.
    host.tcp.close()
    wait_for("the lobby to close", lambda: not any(e.set == DNAT for e in kernel.installed.elements))
    svc = make()
    assert svc.lobbies() == []
    svc.close()
    for s in (hs, cs):
        s.close()


def test_unknown_ids_junk_and_long_lines_never_stop_it(noray):
    peer, kernel, reg, make = noray
    host, other = peer(), peer()
    oid, _ = host.register_host()
    s = udp()
    s.settimeout(0.3)
    s.sendto(b"", ("127.0.0.1", reg))  # noray answers 17 bytes even to this
    s.sendto(b"x" * 128, ("127.0.0.1", reg))
    s.sendto(b"xy", ("127.0.0.1", reg))
    assert s.recvfrom(64)[0] == b"ERR"  # the 128-byte unknown pid: never OK
    with pytest.raises(TimeoutError):
        s.recvfrom(64)  # nothing for the empty and the 2-byte datagram
    other.register_host()
    for line in ("connect-relay nosuchoid", f"connect-relay {oid}", "connect", "bogus stuff", "\x01\x02"):
        other.send(line)  # unknown oid; a host without a UDP registration; junk: no line at all
    other.tcp.sendall(b"\xff\xfe\n")
    assert other.lines(0.5) == []
    other.send("echo still here")
    assert other.expect("echo") == "still here"
    long = peer()
    long.tcp.sendall(b"a" * (protocol.MAX_LINE * 2) + b"\n")
    assert long.tcp.recv(10) == b""  # closed
    host.send("echo alive")
    assert host.expect("echo") == "alive"
    s.close()


def test_the_registration_port_still_speaks_natctl(noray):
    from natctl.daemon import wire

    peer, kernel, reg, make = noray
    svc = make()
    _, token = svc.lobby_create("a", open_=True)
    svc.close()
    s = udp()
    s.settimeout(2)
    s.sendto(wire.encode_request(token, 5, 1), ("127.0.0.1", reg))
    kind, nonce, _ = wire.decode_reply(s.recvfrom(64)[0])
    assert (kind, nonce) == (wire.REGISTERED, 5)
    s.close()


def test_idle_unregistered_connections_are_capped(noray, monkeypatch):
    from natctl.noray import server

    peer, *_ = noray
    conns = [peer() for _ in range(server.MAX_PER_SOURCE)]
    extra = peer()
    time.sleep(0.2)
    assert extra.tcp.recv(10) == b""  # over the per-source cap: closed at once
    conns[0].send("echo ok")
    assert conns[0].expect("echo") == "ok"
