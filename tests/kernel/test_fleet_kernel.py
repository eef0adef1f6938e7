"""A fleet of three relay namespaces (each a fresh VPS: forwarding off) on one real PostgreSQL, hosts and
players behind stock routers, driven as the README drives it: placement by region and load, traffic through
each lobby's relay only, a relay killed (daemon and kernel table) and its lobby forwarding again on another
relay of its region, and the database stopped and started with forwarding never stopping.

The tests of this module run in order on one fleet (they are one story; each says what it leaves).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from natctl.lab import fleet as fleetlab
from natctl.lab.fleet import Echo, echoed
from natctl.lab.traffic import payload, udp_socket

pytestmark = pytest.mark.kernel

SITES = {"home-a": ["host-a"], "home-b": ["host-b"], "home-p": ["p1", "p2", "p3"]}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[fleetlab.FleetLab]:
    with fleetlab.running(str(tmp_path_factory.mktemp("fleet")), sites=SITES) as f:
        yield f


@pytest.fixture(scope="module")
def world(fleet) -> Iterator[dict]:
    """Lobbies a (on relay1), b (region us: relay3) and c (placed by load in eu: relay2), hosts a and b
    registered at the fleet's one well-known address (relay3), players' sockets."""
    r1, _, r3 = fleet.relays
    made = {name: fleet.json(r1, "lobby", "create", name, "--open", *args)
            for name, args in (("a", ["--relay", "relay1"]), ("b", ["--region", "us"]), ("c", []))}
    hosts = {name: Echo(fleet.lab.ns(f"host-{name}"), r3.ip, made[name]["token"]) for name in ("a", "b")}
    players = {p: udp_socket(fleet.lab.ns(p), port=41000 + i) for i, p in enumerate(("p1", "p2", "p3"))}
    time.sleep(0.5)  # each relay's daemon opens its new host port's listener within a second
    yield {"made": made, "hosts": hosts, "players": players}
    for s in players.values():
        s.close()
    for h in hosts.values():
        h.close()


def test_lobbies_are_placed_and_forwarded_by_their_own_relay(fleet, world):
    made, hosts, players = world["made"], world["hosts"], world["players"]
    assert [made[n]["relay"] for n in "abc"] == ["relay1", "relay3", "relay2"]
    # Registered at relay3, each host was sent on to its lobby's relay and registered there.
    assert hosts["a"].address[0] == fleet.relay("relay1").ip and hosts["a"].host.session.moves == 1
    assert hosts["b"].address[0] == fleet.relay("relay3").ip and hosts["b"].host.session.moves == 0
    data = payload(1200)
    assert echoed(players["p1"], hosts["a"].address, data)
    assert echoed(players["p2"], hosts["b"].address, data)
    # Each mapping is in its lobby's relay's kernel, and only there (2 DNAT elements per mapping).
    assert [fleet.mappings(r) for r in fleet.relays] == [2, 0, 2]
    listing = {r["name"]: r for r in fleet.json(fleet.relay("relay2"), "relay", "list")}
    assert {n: (r["region"], r["state"], r["lobbies"]) for n, r in listing.items()} == {
        "relay1": ("eu", "live", 1), "relay2": ("eu", "live", 1), "relay3": ("us", "live", 1)}


def test_a_dead_relays_lobby_forwards_again_on_a_live_relay_of_its_region(fleet, world):
    hosts, players = world["hosts"], world["players"]
    r1, r2 = fleet.relay("relay1"), fleet.relay("relay2")
    before = hosts["a"].address
    killed = time.monotonic()
    fleet.kill(r1)
    data = payload(800)
    took = fleetlab.wait_for("lobby a forwarding on another relay",
                             lambda: hosts["a"].address[0] == r2.ip and echoed(players["p1"], hosts["a"].address,
                                                                               data, tries=1, wait=0.3),
                             seconds=30)
    print(f"failover: {took:.1f} s from the kill to the host's players passing traffic again")  # noqa: T201
    assert hosts["a"].address != before and time.monotonic() - killed < 30
    listing = {r["name"]: r["state"] for r in fleet.json(r2, "relay", "list")}
    assert listing["relay1"] == "dead" and listing["relay2"] == "live"
    assert fleet.mappings(r2) >= 2 and fleet.mappings(r1) == 0
    # Lobby b, on relay3, never noticed.
    assert echoed(players["p2"], hosts["b"].address, data)


def test_forwarding_goes_on_while_the_database_is_down_and_waiting_changes_apply_after(fleet, world):
    hosts, players = world["hosts"], world["players"]
    r3 = fleet.relay("relay3")
    fleet.pg.stop()
    try:
        data = payload(600)
        down = time.monotonic()
        passed = sum(echoed(players["p2"], hosts["b"].address, data + bytes([i]), tries=1) for i in range(20))
        assert passed == 20  # every datagram of an established player, both ways
        # A change says what happened and that it waits, in one line; nothing else changes.
        refused = fleet.natctl(r3, "lobby", "create", "during", check=False)
        assert refused.returncode == 8 and refused.stderr.count("\n") == 1 and "unreachable" in refused.stderr
        # A new player's first packet waits in the daemon for the database.
        players["p3"].sendto(b"first", hosts["b"].address)
        time.sleep(max(0.0, 4.0 - (time.monotonic() - down)))  # longer than dead_after: nobody may look dead
    finally:
        fleet.pg.start()
    players["p3"].settimeout(10)
    got, src = players["p3"].recvfrom(65535)
    assert (got, src) == (b"first", hosts["b"].address)
    states = {r["name"]: r["state"] for r in fleet.json(r3, "relay", "list")}
    assert states["relay2"] != "dead" and states["relay3"] != "dead"  # stale heartbeats after the outage are no death

    def beating() -> bool:  # "silent" (late) until each beats again
        states = {r["name"]: r["state"] for r in fleet.json(r3, "relay", "list")}
        return states["relay2"] == states["relay3"] == "live"
    fleetlab.wait_for("relay2 and relay3 beating again", beating, seconds=10, every=0.2)
    assert echoed(players["p3"], hosts["b"].address, payload(300))
    # A change made on one relay for another's lobby reaches it by NOTIFY, without waiting for the safety net.
    start = time.monotonic()
    fleet.natctl(r3, "map", "add", "--lobby", "c", "--host", "198.18.2.2:27016", "--client", "198.18.3.2:45000")
    fleetlab.wait_for("relay2 applying relay3's change", lambda: fleet.mappings(fleet.relay("relay2")) >= 4,
                      seconds=5)
    assert time.monotonic() - start < 5
