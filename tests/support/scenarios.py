"""Kernel scenarios shared by the nftables and the XDP tests (the same checks, two backends)."""

from __future__ import annotations

import time

from natctl.lab.traffic import drain, payload, send_and_receive


def pub(lab, socks, name):
    return f"{lab.members[name].public_ip}:{socks[name].getsockname()[1]}"


def add(relay, lab, socks, lobby, host, client):
    return relay.json("map", "add", "--lobby", lobby, "--host", pub(lab, socks, host), "--client",
                      pub(lab, socks, client))


def udp_both_ways(lab, relay, socks) -> None:
    """Two clients of one lobby: payloads intact both ways, addresses as promised, packets counted."""
    relay("lobby", "create", "a", "--allow", "198.18.2.0/24")
    m1 = add(relay, lab, socks, "a", "host", "client1")
    m2 = add(relay, lab, socks, "a", "host", "client2")
    assert m1["host_port"] == m2["host_port"]
    # Two clients behind one home router (one public IP) get different client ports.
    assert m1["client_port"] != m2["client_port"]
    r = lab.relay_ip
    for size in (1, 64, 512, 1472):
        d = send_and_receive(socks["client1"], socks["host"], (r, m1["host_port"]), payload(size))
        assert d.intact and d.seen_from == (r, m1["client_port"]), d
        d = send_and_receive(socks["host"], socks["client1"], (r, m1["client_port"]), payload(size))
        assert d.intact and d.seen_from == (r, m1["host_port"]), d
    # Host first: client2 has never sent to the lobby, yet the host's packet reaches it.
    d = send_and_receive(socks["host"], socks["client2"], (r, m2["client_port"]), payload(300))
    assert d.intact and d.seen_from == (r, m2["host_port"]), d
    d = send_and_receive(socks["client2"], socks["host"], (r, m2["host_port"]), payload(300))
    assert d.intact and d.seen_from == (r, m2["client_port"]), d
    status = relay.json("status")
    counts = {m["client"]: (m["to_host_packets"], m["to_client_packets"]) for m in status["mappings"]}
    assert counts[pub(lab, socks, "client1")] == (4, 4)
    assert counts[pub(lab, socks, "client2")] == (1, 1)


def lobbies_isolated(lab, relay, socks) -> None:
    """Two lobbies that reuse client ports: nothing crosses from one to the other, nor from a stranger."""
    relay("lobby", "create", "a")
    relay("lobby", "create", "b")
    ma = add(relay, lab, socks, "a", "host", "client1")
    mb = add(relay, lab, socks, "b", "host2", "client2")
    assert ma["client_port"] == mb["client_port"]  # client ports are reused across lobbies
    r = lab.relay_ip
    # client1 (lobby a) tries every relay port in use: lobby b's host never hears it.
    for port in {ma["host_port"], ma["client_port"], mb["host_port"], mb["client_port"]}:
        socks["client1"].sendto(b"probe %d" % port, (r, port))
        socks["stranger"].sendto(b"stranger %d" % port, (r, port))
    time.sleep(0.3)
    assert drain(socks["host2"]) == []
    got = drain(socks["host"])
    assert [data for data, _ in got] == [b"probe %d" % ma["host_port"]]
    assert drain(socks["client2"]) == []
    # Lobby b still works on its own.
    d = send_and_receive(socks["client2"], socks["host2"], (r, mb["host_port"]), payload(100))
    assert d.intact and d.seen_from == (r, mb["client_port"])
