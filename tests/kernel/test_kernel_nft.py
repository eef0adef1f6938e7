"""The nftables path in the kernel, in the demo's topology, with real traffic."""

from __future__ import annotations

import hashlib
import json
import os
import time

import pytest

from natctl.lab import topology
from natctl.lab.netns import entered, run, spawn, stop
from natctl.lab.traffic import drain, payload, send_and_receive
from support import labs
from support.scenarios import add, lobbies_isolated, pub, udp_both_ways

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("engine")]  # each test on both store engines too
# Hand-made mappings: the lab's home routers are cones here (see support.labs.cone_lab for why).
lab = pytest.fixture(scope="module", name="lab")(labs.cone_lab)


@pytest.fixture(autouse=True, params=["netlink", "nft"])
def writer(request, monkeypatch) -> str:
    """Every test on both element writers (natctl.kernel.nlbatch, libnftables): the CLI reads NATCTL_WRITER."""
    monkeypatch.setenv("NATCTL_WRITER", request.param)
    return request.param


def test_udp_both_ways_payload_and_addresses(lab, relay, socks):
    udp_both_ways(lab, relay, socks)


def test_lobbies_are_isolated(lab, relay, socks):
    lobbies_isolated(lab, relay, socks)


def test_tcp_forward_with_socat_on_both_ends(lab, relay, tmp_path):
    port = 7000
    topology.open_home_port(lab, "host2", port)
    banner = b"natctl-tcp-" + os.urandom(4).hex().encode()
    server = spawn(["socat", f"TCP-LISTEN:{port},reuseaddr,fork", f"SYSTEM:echo {banner.decode()}; cat"],
                   ns=lab.ns("host2"))
    try:
        relay("forward", "add", "--port", str(port), "--to", f"{lab.members['host2'].public_ip}:{port}",
              "--proto", "tcp")
        blob = os.urandom(200_000)
        src = tmp_path / "blob"
        src.write_bytes(blob)
        deadline = time.monotonic() + 5
        while True:  # socat may need a moment to listen
            out = run(["bash", "-o", "pipefail", "-c", f"socat -t 2 - TCP:{lab.relay_ip}:{port} < {src} | sha256sum"],
                      ns=lab.ns("client1"), check=False)
            if out.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split()[0] == hashlib.sha256(banner + b"\n" + blob).hexdigest()
        fwd = relay.json("status")["forwards"][0]
        assert fwd["installed"] and fwd["packets"] > 0
    finally:
        stop(server)


def test_removing_a_mapping_stops_its_flow_within_a_second(lab, relay, socks):
    relay("lobby", "create", "a")
    m = add(relay, lab, socks, "a", "host", "client1")
    r, sent = lab.relay_ip, 0
    client, host = socks["client1"], socks["host"]
    host.settimeout(0.05)
    for _ in range(10):  # an ongoing flow
        client.sendto(b"x", (r, m["host_port"]))
        sent += 1
    time.sleep(0.2)
    assert len(drain(host)) == sent
    relay("map", "remove", "--lobby", "a", "--client", pub(lab, socks, "client1"))
    removed_at = time.monotonic()
    last_arrival = None
    while time.monotonic() - removed_at < 1.5:  # bounded: 1.5 s, about 75 packets
        client.sendto(b"y", (r, m["host_port"]))
        if drain(host):
            last_arrival = time.monotonic()
        time.sleep(0.02)
    assert last_arrival is None or last_arrival - removed_at < 1.0


def listing(lab) -> list:
    """The table as the kernel holds it, without handles (they change when a table is rebuilt)."""
    def strip(obj):
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if k != "handle"}
        return [strip(v) for v in obj] if isinstance(obj, list) else obj

    doc = json.loads(run(["nft", "-j", "list", "table", "inet", "natctl"], ns=lab.relay_ns).stdout)
    # The generation tag is bookkeeping: a fresh random one with every change.
    return strip([item for item in doc["nftables"]
                  if "metainfo" not in item and item.get("set", {}).get("name") != "generation"])


def test_apply_twice_changes_nothing_and_uninstall_touches_only_natctl(lab, relay, socks):
    relay("lobby", "create", "a")
    add(relay, lab, socks, "a", "host", "client1")
    before = listing(lab)
    result = relay.json("apply")
    assert (result["added"], result["deleted"], result["created_table"]) == (0, 0, False)
    assert listing(lab) == before
    run(["nft", "add", "table", "inet", "someone_else"], ns=lab.relay_ns)
    try:
        relay("uninstall")
        assert run(["nft", "list", "table", "inet", "natctl"], ns=lab.relay_ns, check=False).returncode != 0
        assert run(["nft", "list", "table", "inet", "someone_else"], ns=lab.relay_ns, check=False).returncode == 0
        # The store is the truth: apply rebuilds the same table.
        assert relay.json("apply")["created_table"]
        assert listing(lab) == before
    finally:
        run(["nft", "delete", "table", "inet", "someone_else"], ns=lab.relay_ns, check=False)


def test_apply_reads_no_map_until_something_else_changes_nftables(lab, relay, socks):
    """natctl's own changes leave nftables' ruleset generation proving the table as they left it, so apply
    reads none of its maps; a hand edit, or any other program's transaction, makes apply read them all
    again and repair what was changed, traffic included."""
    relay("lobby", "create", "a")
    m = add(relay, lab, socks, "a", "host", "client1")
    before = listing(lab)
    assert relay.json("apply")["checked"] == "ruleset"
    dnat = json.loads(run(["nft", "-j", "list", "map", "inet", "natctl", "dnat4"], ns=lab.relay_ns).stdout)
    elem = next(i["map"]["elem"][0] for i in dnat["nftables"] if "map" in i)
    key = " . ".join(str(v) for v in elem[0]["elem"]["val"]["concat"])  # with its comment: {"elem": {"val": ...}}
    run(["nft", "delete", "element", "inet", "natctl", "dnat4", "{ " + key + " }"], ns=lab.relay_ns)
    assert listing(lab) != before
    result = relay.json("apply")
    assert (result["checked"], result["added"], result["deleted"]) == ("read", 1, 0)
    assert listing(lab) == before
    r = lab.relay_ip
    for src, dst, to, seen in (("client1", "host", m["host_port"], m["client_port"]),
                               ("host", "client1", m["client_port"], m["host_port"])):
        d = send_and_receive(socks[src], socks[dst], (r, to), payload(512))
        assert d.intact and d.seen_from == (r, seen), d
    assert relay.json("apply")["checked"] == "ruleset"
    # A refused sender blocked, as the daemon does it: a transaction too, though of no map apply compares.
    run(["nft", "add", "element", "inet", "natctl", "blocked4", "{ 198.18.9.9 . 4000 }"], ns=lab.relay_ns)
    assert relay.json("apply")["checked"] == "read"
    assert relay.json("apply")["checked"] == "ruleset"
    run(["nft", "add", "table", "inet", "someone_else"], ns=lab.relay_ns)  # any transaction, any table
    try:
        assert relay.json("apply")["checked"] == "read"
    finally:
        run(["nft", "delete", "table", "inet", "someone_else"], ns=lab.relay_ns, check=False)


def test_a_refused_transaction_changes_nothing(lab, relay, socks):
    from natctl.kernel.nft import Nft
    from natctl.plan import DNAT, Changes, Element

    relay("lobby", "create", "a")
    add(relay, lab, socks, "a", "host", "client1")
    before = listing(lab)
    good = Element(DNAT, ("198.18.2.2", "udp", 1, 2), ("198.18.1.2", 3))
    bad = Element(DNAT, ("198.18.2.2", "udp", 1, 70000), ("198.18.1.2", 3))  # port out of range
    with entered(lab.relay_ns):
        nft = Nft()
        with pytest.raises(Exception, match="nothing was applied"):
            nft.apply(Changes(add=(good, bad)))
    assert listing(lab) == before


def test_unknown_senders_to_a_host_port_are_rate_limited_in_the_kernel(lab, relay, socks):
    relay("lobby", "create", "a", "--open")  # open: the stranger is allowed, so only the rate limit stops it
    m = add(relay, lab, socks, "a", "host", "client1")
    for i in range(1000):  # bounded: 1000 datagrams, well over the 100-packet burst
        socks["stranger"].sendto(b"flood %d" % i, (lab.relay_ip, m["host_port"]))
    time.sleep(0.2)
    out = run(["nft", "list", "counter", "inet", "natctl", "unknown_limited"], ns=lab.relay_ns).stdout
    limited = int(out.split("packets ")[1].split()[0])
    assert 800 <= limited <= 1000  # only about the burst got past the kernel
    assert drain(socks["host"]) == []  # and nothing unknown was ever forwarded
