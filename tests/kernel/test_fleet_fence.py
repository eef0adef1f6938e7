"""The fleet's kernel lease (natctl.fleet.fence) on three relay namespaces and a real PostgreSQL: a relay
whose daemon died but whose kernel lives (nftables table and XDP program stay) stops forwarding before its
lobby moves; a database outage fences nobody; a clean stop (SIGTERM) keeps forwarding.

The tests of this module run in order on one fleet (one story; each says what it leaves). The lab's
daemons run with accel auto: XDP in generic mode on each relay's veth.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from natctl.fleet.fence import SET, TABLE
from natctl.kernel.xdp import Program
from natctl.lab import fleet as fleetlab
from natctl.lab.fleet import Echo, echoed
from natctl.lab.netns import entered, run
from natctl.lab.traffic import payload, udp_socket

pytestmark = pytest.mark.kernel

SITES = {"home-a": ["host-a"], "home-b": ["host-b"], "home-p": ["p1", "p2"]}
DEAD_AFTER = 3.0  # the lab's: heartbeat 0.5 s, so the lease holds 2.5 s


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[fleetlab.FleetLab]:
    with fleetlab.running(str(tmp_path_factory.mktemp("fence")), sites=SITES, dead_after=DEAD_AFTER) as f:
        yield f


@pytest.fixture(scope="module")
def world(fleet) -> Iterator[dict]:
    """Lobby a on relay1 (host a, player p1), lobby b on relay3 (region us: no other relay can take it;
    host b, player p2); both hosts registered at relay3."""
    r1, _, r3 = fleet.relays
    made = {name: fleet.json(r1, "lobby", "create", name, "--open", *args)
            for name, args in (("a", ["--relay", "relay1"]), ("b", ["--region", "us"]))}
    hosts = {name: Echo(fleet.lab.ns(f"host-{name}"), r3.ip, made[name]["token"]) for name in ("a", "b")}
    players = {p: udp_socket(fleet.lab.ns(p), port=42000 + i) for i, p in enumerate(("p1", "p2"))}
    time.sleep(0.5)  # each relay's daemon opens its new host port's listener within a second
    yield {"hosts": hosts, "players": players}
    for s in players.values():
        s.close()
    for h in hosts.values():
        h.close()


def xdp(relay: fleetlab.Relay) -> tuple[bool, dict[str, int], int]:
    """(attached, counters, lease deadline) of natctl's XDP program on the relay's eth0."""
    with entered(relay.ns):
        prog = Program.find("eth0", pin_root=None)
        try:
            return prog.attached, prog.counters(), prog.lease()
        finally:
            prog.close()


def fence(relay: fleetlab.Relay) -> tuple[bool, int]:
    """(the relay IP is in the lease set, packets the fence dropped); (False, -1) without a fence table."""
    out = run(["nft", "list", "table", "inet", TABLE], ns=relay.ns, check=False)
    if out.returncode != 0:
        return False, -1
    leased = re.search(rf"set {SET} \{{[^}}]*elements = \{{ {re.escape(relay.ip)} ", out.stdout) is not None
    return leased, int(re.search(r"counter packets (\d+)", out.stdout)[1])  # type: ignore[index]


def test_a_relay_whose_daemon_died_stops_forwarding_before_its_lobby_moves(fleet, world):
    r1, r2, r3 = fleet.relays
    host, p1 = world["hosts"]["a"], world["players"]["p1"]
    old = host.address
    data = payload(700)
    assert old[0] == r1.ip and echoed(p1, old, data)
    attached, before, lease = xdp(r1)
    assert attached and before["tx"] > 0  # the player's traffic went through XDP
    assert 0 < lease - time.monotonic_ns() <= 2.5e9 and fence(r1) == (True, 0)
    assert fence(r2)[0] and fence(r3)[0]

    killed, killed_wall = time.monotonic(), time.time()
    r1.daemon.kill()  # the daemon only: its table, XDP program and lease stay in the kernel
    old_echo: list[float] = []  # when each echo through the old relay had come back
    new_echo: list[float] = []  # when each probe of the new relay that came back was sent
    for _ in range(1000):  # bounded: 30 s at most, a round every 0.05-0.25 s
        if time.monotonic() - killed > 30:
            break
        time.sleep(0.05)
        if echoed(p1, old, data, tries=1, wait=0.1):
            old_echo.append(time.monotonic())
        addr, sent = host.address, time.monotonic()
        if addr != old and echoed(p1, addr, data, tries=1, wait=0.1):
            new_echo.append(sent)
        if new_echo and time.monotonic() - new_echo[0] > 2.0:
            break
    assert new_echo, "lobby a never forwarded again on another relay"
    stopped = (old_echo[-1] if old_echo else killed) - killed
    print(f"fence: the old relay stopped echoing {stopped:.2f} s after its daemon was killed; "  # noqa: T201
          f"the new relay echoed {new_echo[0] - killed:.2f} s after")
    assert stopped <= DEAD_AFTER + 0.5
    assert not old_echo or old_echo[-1] < new_echo[0]  # never both: the old one was silent before the new one
    assert host.address[0] == r2.ip
    # The dead relay's kernel still holds the mappings: the lease, not a cleanup, stopped them.
    assert fleet.mappings(r1) >= 2
    attached, after, lease = xdp(r1)
    assert attached and 0 < lease < time.monotonic_ns() and after["pass_fenced"] > before["pass_fenced"]
    assert fence(r1)[0] is False and fence(r1)[1] > 0
    # The others moved the lobby only after the old relay had gone quiet.
    dead = [e["ts"] for r in (r2, r3) for e in r.daemon.events("relay_dead") if "relay1" in e["relays"]]
    assert dead and min(dead) > killed_wall + (old_echo[-1] - killed if old_echo else 0)
    print(f"fence: relay1 declared dead {min(dead) - killed_wall:.2f} s after the kill")  # noqa: T201


def test_a_database_outage_longer_than_dead_after_fences_nobody(fleet, world):
    r2, r3 = fleet.relay("relay2"), fleet.relay("relay3")
    hosts, players = world["hosts"], world["players"]
    data = payload(500)
    assert echoed(players["p2"], hosts["b"].address, data) and echoed(players["p1"], hosts["a"].address, data)
    drops = fence(r2)[1], fence(r3)[1]
    fleet.pg.stop()
    try:
        down = time.monotonic()
        passed = total = 0
        for i in range(200):  # bounded: until the database was down 1.5 s longer than dead_after
            if time.monotonic() - down > DEAD_AFTER + 1.5:
                break
            for name in ("b", "a"):
                total += 1
                passed += echoed(players["p2" if name == "b" else "p1"], hosts[name].address, data + bytes([i]),
                                 tries=1, wait=0.3)
        assert total >= 10 and passed == total, f"{passed} of {total} echoed with the database down"
        for r in (r2, r3):
            assert fence(r)[0] and xdp(r)[2] > time.monotonic_ns()  # leases renewed while the database was down
        assert (fence(r2)[1], fence(r3)[1]) == drops
    finally:
        fleet.pg.start()

    def beating() -> bool:
        states = {r["name"]: r["state"] for r in fleet.json(r3, "relay", "list")}
        return states["relay2"] == states["relay3"] == "live"
    fleetlab.wait_for("relay2 and relay3 beating again", beating, seconds=10, every=0.2)


def test_a_clean_stop_keeps_forwarding(fleet, world):
    r3 = fleet.relay("relay3")
    host, p2 = world["hosts"]["b"], world["players"]["p2"]
    data = payload(400)
    assert host.address[0] == r3.ip and echoed(p2, host.address, data)
    assert r3.daemon.stop() == 0  # SIGTERM: mappings stay, and so does forwarding
    assert fence(r3) == (False, -1)  # the fence went with the daemon's clean stop
    attached, _, lease = xdp(r3)
    assert attached and lease == 0
    start = time.monotonic()
    passed = total = 0
    for i in range(100):  # bounded: 2 × dead_after
        if time.monotonic() - start > 2 * DEAD_AFTER:
            break
        total += 1
        passed += echoed(p2, host.address, data + bytes([i]), tries=1, wait=0.3)
        time.sleep(0.1)
    assert total >= 10 and passed == total, f"{passed} of {total} echoed after a clean stop"
