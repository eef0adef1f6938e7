"""Planner and diff: pure functions over plain data."""

import pytest

from natctl.errors import KernelError
from natctl.kernel.fake import FakeKernel, trace
from natctl.kernel.nft import render
from natctl.model import Client, Endpoint, Forward, Host, Lobby, Snapshot
from natctl.plan import DNAT, FWD, HOSTPORTS, MASQ, NFT_SETS, SNAT, XDP, Changes, Element, diff, plan

H = Endpoint("198.18.1.2", 27015)
C1, C2 = Endpoint("198.18.2.2", 40001), Endpoint("198.18.2.2", 40002)


def snap(**kw) -> Snapshot:
    base = {"relay_ip": "198.18.0.1", "lobbies": (Lobby(1, "a", created=0.0),), "hosts": (Host(1, H, 29999),),
            "clients": (Client(1, 1, "udp", C1, 20000), Client(2, 1, "udp", C2, 20001))}
    base.update(kw)
    return Snapshot(**base)


def test_both_directions_of_every_mapping():
    want = plan(snap(), now=1.0, sets=NFT_SETS)
    assert Element(DNAT, ("198.18.2.2", "udp", 40001, 29999), ("198.18.1.2", 27015)) in want
    assert Element(DNAT, ("198.18.1.2", "udp", 27015, 20000), ("198.18.2.2", 40001)) in want
    assert Element(SNAT, ("198.18.2.2", "udp", 40001, "198.18.1.2", 27015), ("198.18.0.1", 20000)) in want
    assert Element(SNAT, ("198.18.1.2", "udp", 27015, "198.18.2.2", 40001), ("198.18.0.1", 29999)) in want
    assert Element(HOSTPORTS, (29999,)) in want  # where unknown senders reach the daemon
    assert len(want) == 9


def test_closed_expired_and_hostless_lobbies_plan_nothing():
    assert plan(snap(lobbies=(Lobby(1, "a", closed=5.0),)), 1.0) == frozenset()
    assert plan(snap(lobbies=(Lobby(1, "a", ttl=10, created=0.0),)), 10.0) == frozenset()
    assert plan(snap(hosts=()), 1.0) == frozenset()


def test_forwards_and_their_expiry():
    f = Forward(8080, Endpoint("198.18.9.9", 80), "both", ttl=60, created=0.0)
    want = plan(snap(clients=(), hosts=(), forwards=(f,)), 1.0)
    assert {e.key for e in want if e.set == FWD} == {("udp", 8080), ("tcp", 8080)}
    assert {e.key for e in want if e.set == MASQ} == {("198.18.9.9", "udp", 80), ("198.18.9.9", "tcp", 80)}
    assert plan(snap(clients=(), hosts=(), forwards=(f,)), 60.0) == frozenset()


def test_diff_is_empty_when_kernel_matches_and_minimal_otherwise():
    want = plan(snap(), 1.0, NFT_SETS)
    assert not diff(want, want)
    one_less = plan(snap(clients=(Client(1, 1, "udp", C1, 20000),)), 1.0, NFT_SETS)
    changes = diff(want, one_less)
    assert len(changes.add) == 4 and not changes.delete  # only client2's elements
    changes = diff(one_less, want)
    assert len(changes.delete) == 4 and not changes.add
    assert [(f.saddr, f.sport, f.dport, f.daddr) for f in changes.flows()] == [
        ("198.18.1.2", 27015, 20001, "198.18.0.1"), ("198.18.2.2", 40002, 29999, "198.18.0.1")]


def test_changed_relay_ip_swaps_values_in_one_transaction():
    old, new = plan(snap(), 1.0, NFT_SETS), plan(snap(relay_ip="198.18.0.9"), 1.0, NFT_SETS)
    changes = diff(new, old)
    assert {e.set for e in changes.add} == {SNAT} and len(changes.add) == len(changes.delete) == 4
    script = render(changes)
    assert script.index("delete element") < script.index("add element")


def test_missing_table_recreates_everything():
    want = plan(snap(), 1.0, NFT_SETS)
    changes = diff(want, set(), table_ok=False)
    assert changes.create_table and len(changes.add) == len(want)
    script = render(changes)
    assert script.startswith("add table inet natctl\ndelete table inet natctl\ntable inet natctl {")
    assert "dnat ip to ip saddr . meta l4proto . th sport . th dport map @dnat4" in script


def test_xdp_entries_mirror_both_udp_directions():
    want = plan(snap(), 1.0)
    xdp = {e.key: e.value for e in want if e.set == XDP}
    assert xdp[("198.18.2.2", 40001, 29999)] == ("198.18.0.1", 20000, "198.18.1.2", 27015)
    assert xdp[("198.18.1.2", 27015, 20000)] == ("198.18.0.1", 29999, "198.18.2.2", 40001)
    assert len(xdp) == 4
    tcp = snap(clients=(Client(1, 1, "tcp", C1, 20000),))
    assert not [e for e in plan(tcp, 1.0) if e.set == XDP]


# Packets traced through the fake kernel's maps, as the chains of skeleton() route them.

R = "198.18.0.1"
H2, C3 = Endpoint("198.18.1.3", 27015), Endpoint("198.18.2.4", 40001)


CLIENTS = (Client(1, 1, "udp", C1, 20000), Client(2, 1, "udp", C2, 20001), Client(3, 2, "udp", C3, 20000))


def two_lobbies(clients: tuple = CLIENTS) -> Snapshot:
    """Lobby b reuses client port 20000."""
    return snap(lobbies=(Lobby(1, "a"), Lobby(2, "b")), hosts=(Host(1, H, 29999), Host(2, H2, 29998)),
                clients=clients)


def installed(s: Snapshot) -> FakeKernel:
    fake = FakeKernel()
    fake.apply(diff(plan(s, 1.0, fake.owns), set(), table_ok=False))
    return fake


def test_a_clients_packet_reaches_the_host_from_its_client_port_and_the_reply_comes_back():
    elements = installed(two_lobbies()).installed.elements
    assert trace(elements, "udp", C1, Endpoint(R, 29999)) == (Endpoint(R, 20000), H)
    assert trace(elements, "udp", C2, Endpoint(R, 29999)) == (Endpoint(R, 20001), H)
    assert trace(elements, "udp", H, Endpoint(R, 20000)) == (Endpoint(R, 29999), C1)
    assert trace(elements, "udp", H2, Endpoint(R, 20000)) == (Endpoint(R, 29998), C3)  # same port, other lobby
    assert trace(elements, "tcp", C1, Endpoint(R, 29999)) is None  # a UDP mapping relays UDP only


def test_lobbies_are_isolated_and_strangers_reach_only_the_daemon():
    elements = installed(two_lobbies()).installed.elements
    ports = {20000, 20001, 29998, 29999}
    assert {p: trace(elements, "udp", C1, Endpoint(R, p)) for p in ports} == {
        20000: None, 20001: None, 29998: None, 29999: (Endpoint(R, 20000), H)}
    assert all(trace(elements, "udp", C3, Endpoint(R, p)) is None for p in ports - {29998})
    stranger = Endpoint("198.18.7.7", 40001)
    assert all(trace(elements, "udp", stranger, Endpoint(R, p)) is None for p in ports)


def test_a_removed_mapping_traces_to_nothing():
    fake = installed(two_lobbies())
    after = two_lobbies(CLIENTS[1:])
    fake.apply(diff(plan(after, 1.0, fake.owns), fake.read().elements))
    elements = fake.installed.elements
    assert trace(elements, "udp", C1, Endpoint(R, 29999)) is None
    assert trace(elements, "udp", H, Endpoint(R, 20000)) is None
    assert trace(elements, "udp", C2, Endpoint(R, 29999)) == (Endpoint(R, 20001), H)  # its neighbour stays


def test_a_forwards_packets_reach_their_target():
    target, player = Endpoint("198.18.9.9", 1802), Endpoint("198.18.7.7", 50000)
    fwds = (Forward(7001, target), Forward(7002, target, "both", masquerade=False))
    elements = installed(snap(clients=(), hosts=(), forwards=fwds)).installed.elements
    assert trace(elements, "tcp", player, Endpoint(R, 7001)) == (Endpoint(R, 50000), target)  # masqueraded
    assert trace(elements, "udp", player, Endpoint(R, 7001)) is None  # TCP only
    assert trace(elements, "udp", player, Endpoint(R, 7002)) == (player, target)  # the target sees the player


# The fake refuses what nft would, and then nothing is applied.

@pytest.mark.parametrize("bad", [
    Element(DNAT, ("198.18.2.2", "udp", 1, 70000), ("198.18.1.2", 3)),  # port out of range
    Element(DNAT, ("198.18.2.2", 17, 1, 2), ("198.18.1.2", 3)),  # a protocol number, not a name
    Element(DNAT, ("198.18.2.2", "udp", 1), ("198.18.1.2", 3)),  # a key one field short
    Element(DNAT, ("198.18.2.2", "udp", 1, 2), None),  # a map element without a value
    Element(SNAT, ("198.18.2.2", "udp", 1, "nowhere", 2), ("198.18.0.1", 3)),  # not an address
    Element(HOSTPORTS, ("29999",)),  # a port as text
    Element(XDP, ("198.18.2.2", 1, 2), ("198.18.0.1", 3, "198.18.1.2", 4)),  # no such set in the table
])
def test_the_fake_refuses_an_element_of_the_wrong_shape(bad):
    fake = installed(two_lobbies())
    before, scripts = fake.dump(), len(fake.scripts)
    good = Element(HOSTPORTS, (20005,))
    with pytest.raises(KernelError, match="nothing was applied"):
        fake.apply(Changes(add=(good, bad)))
    assert fake.dump() == before and len(fake.scripts) == scripts


def test_the_fake_refuses_deleting_what_is_not_there_and_clashing_values():
    fake = installed(two_lobbies())
    before = fake.dump()
    gone = Element(HOSTPORTS, (20005,))
    with pytest.raises(KernelError, match="no element"):
        fake.apply(Changes(delete=(Element(HOSTPORTS, (29999,)), gone)))
    clash = Element(DNAT, (C1.ip, "udp", C1.port, 29999), ("198.18.1.9", 1))
    with pytest.raises(KernelError, match="clashes"):
        fake.apply(Changes(add=(clash,)))
    assert fake.dump() == before
    assert "add element inet natctl hostports4 { 29999 }\n" in before


def test_the_fake_keeps_counters_of_elements_that_stay():
    fake = installed(two_lobbies())
    stay, go = (SNAT, (C2.ip, "udp", C2.port, H.ip, H.port)), (SNAT, (C1.ip, "udp", C1.port, H.ip, H.port))
    fake.installed.counters.update({stay: (5, 500), go: (7, 700)})
    after = two_lobbies(CLIENTS[1:])
    fake.apply(diff(plan(after, 1.0, fake.owns), fake.read().elements))
    assert fake.read().counters == {stay: (5, 500)}
