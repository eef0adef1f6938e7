"""`map list` and `forward list` tell what the kernel carried, as `status` does, with real traffic."""

from __future__ import annotations

import json
import os
import socket
import threading
import time

import pytest

from natctl.lab import topology
from natctl.lab.netns import entered, run
from natctl.lab.traffic import payload, send_and_receive, tcp_connect
from support.scenarios import pub

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("engine")]  # each test on both store engines too

TCP_PORT = 7100  # outside the relay ports and the registration port


def udp_through(lab, socks, client, m, rounds):
    """``rounds`` datagrams each way between ``client`` and the host, through the relay, checked."""
    r, host = lab.relay_ip, socks["host"]
    for _ in range(rounds):
        d = send_and_receive(socks[client], host, (r, m["host_port"]), payload(300))
        assert d.intact and d.seen_from == (r, m["client_port"]), d
        d = send_and_receive(host, socks[client], (r, m["client_port"]), payload(300))
        assert d.intact and d.seen_from == (r, m["host_port"]), d


def echo_server(ns: str, port: int) -> tuple[socket.socket, threading.Thread]:
    """A TCP server in ``ns`` that echoes one connection back to its sender."""
    with entered(ns):
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("0.0.0.0", port))
    srv.listen()
    srv.settimeout(10)

    def serve() -> None:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            while data := conn.recv(65536):
                conn.sendall(data)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return srv, thread


def tcp_echo(lab, port: int, size: int) -> bytes:
    """client1 sends ``size`` bytes to the relay's ``port`` and reads them back; what came back."""
    blob = os.urandom(size)
    deadline = time.monotonic() + 5
    while True:
        try:
            conn = tcp_connect(lab.ns("client1"), (lab.relay_ip, port))
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    with conn:
        conn.sendall(blob)
        conn.shutdown(socket.SHUT_WR)
        got = b""
        while data := conn.recv(65536):
            got += data
    assert got == blob
    return got


def add(relay, lab, socks, lobby, host, client, *extra):
    return relay.json("map", "add", "--lobby", lobby, "--host", pub(lab, socks, host), "--client",
                      pub(lab, socks, client), *extra)


def by_client(rows):
    return {m["client"]: m for m in rows}


def test_listings_tell_what_the_kernel_carried(lab, relay, socks):
    relay("lobby", "create", "a")
    m1 = add(relay, lab, socks, "a", "host", "client1", "--no-apply")
    m2 = add(relay, lab, socks, "a", "host", "client2", "--no-apply")
    r = lab.relay_ip
    assert all(m["installed"] is False for m in relay.json("map", "list"))  # in the store, not in the kernel
    # The host talks first, to each client relay port, while the relay does not relay them yet: its
    # router then lets each client's packets in, whatever its NAT kind. (Relayed, such a packet would
    # reach a client's router unasked, and a port-restricted one would then give the client's first
    # packet another port.) The relay's conntrack forgets these unrelayed packets.
    for m in (m1, m2):
        socks["host"].sendto(b"open", (r, m["client_port"]))
    time.sleep(0.2)
    run(["conntrack", "-F"], ns=lab.relay_ns, check=False)
    relay("apply")
    # Installed, nothing carried yet.
    before = by_client(relay.json("map", "list"))
    assert all(m["installed"] is True and m["to_host_packets"] == 0 and m["to_client_packets"] == 0
               for m in before.values()), json.dumps(before, indent=1)

    # Real UDP both ways: the clients speak first, the host answers.
    udp_through(lab, socks, "client1", m1, 3)
    udp_through(lab, socks, "client2", m2, 1)

    # A forward carries TCP: client1 -> relay:TCP_PORT -> the host's router -> the host, and back.
    topology.open_home_port(lab, "host", TCP_PORT)
    srv, thread = echo_server(lab.ns("host"), TCP_PORT)
    try:
        relay("forward", "add", "--port", str(TCP_PORT), "--to", f"{lab.members['host'].public_ip}:{TCP_PORT}",
              "--proto", "tcp")
        (fwd,) = relay.json("forward", "list")
        assert fwd["port"] == TCP_PORT and fwd["installed"] is True and fwd["packets"] == 0, fwd
        tcp_echo(lab, TCP_PORT, 100_000)
        thread.join(5)
    finally:
        srv.close()

    maps = relay.json("map", "list")
    got = by_client(maps)
    c1, c2 = got[pub(lab, socks, "client1")], got[pub(lab, socks, "client2")]
    assert c1["installed"] is True and c1["to_host_packets"] >= 3 and c1["to_client_packets"] >= 3, c1
    assert c1["to_host_bytes"] > 0 and c1["to_client_bytes"] > 0, c1
    assert c2["installed"] is True and c2["to_host_packets"] >= 1 and c2["to_client_packets"] >= 1, c2
    assert c1["to_host_packets"] > c2["to_host_packets"], (c1, c2)  # each mapping its own counters
    (fwd,) = relay.json("forward", "list")
    assert fwd["installed"] is True and fwd["packets"] > 0 and fwd["bytes"] > 100_000, fwd
    # The listings and status are one and the same truth.
    status = relay.json("status")
    assert by_client(status["mappings"]) == got and status["forwards"] == [fwd]
    table = relay("map", "list").stdout
    assert "installed" in table and "yes" in table and "NO" not in table

    # The table deleted behind natctl's back: nothing is installed any more, and the listings say so.
    run(["nft", "delete", "table", "inet", "natctl"], ns=lab.relay_ns)
    maps = relay.json("map", "list")
    assert len(maps) == 2 and all(m["installed"] is False for m in maps), maps
    (fwd,) = relay.json("forward", "list")
    assert fwd["installed"] is False, fwd
    assert "NO" in relay("map", "list").stdout and "NO" in relay("forward", "list").stdout
    # 'natctl apply' puts it all back, and the listings see it.
    relay("apply")
    assert all(m["installed"] is True for m in relay.json("map", "list"))
    assert relay.json("forward", "list")[0]["installed"] is True
