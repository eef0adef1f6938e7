"""Planner and diff: pure functions over plain data."""

from natctl.kernel.nft import render
from natctl.model import Client, Endpoint, Forward, Host, Lobby, Snapshot
from natctl.plan import DNAT, FWD, HOSTPORTS, MASQ, NFT_SETS, SNAT, XDP, Element, diff, plan

H = Endpoint("198.18.1.2", 27015)
C1, C2 = Endpoint("198.18.2.2", 40001), Endpoint("198.18.2.2", 40002)


def snap(**kw) -> Snapshot:
    base = dict(relay_ip="198.18.0.1", lobbies=(Lobby(1, "a", created=0.0),), hosts=(Host(1, H, 29999),),
                clients=(Client(1, 1, "udp", C1, 20000), Client(2, 1, "udp", C2, 20001)))
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
