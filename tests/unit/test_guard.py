"""Issue 14, items 2 and 8 without root: a second store cannot undo the kernel, and who a lobby admits is
decided in the kernel (allow4) by the same rule as the daemon's, which refuses the rest without the store."""

from __future__ import annotations

import ipaddress
import json
import socket
import time
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_daemon_logic import Running, free_udp_ports, register, udp, wait_for

from natctl import admission
from natctl.config import Settings
from natctl.daemon import metrics
from natctl.errors import Conflict, OwnedElsewhere
from natctl.kernel.fake import FakeKernel, check
from natctl.kernel.nft import COMMENT_MAX, comment_text, parse_listing, render
from natctl.model import Endpoint, Host, Lobby, PortRange, Snapshot
from natctl.plan import ALLOW, HOSTPORTS, Changes, Element, Owner, diff, plan
from natctl.service import Service

H = Endpoint("198.18.1.2", 27015)


def snap(*lobbies: Lobby) -> Snapshot:
    return Snapshot("198.18.0.1", lobbies=lobbies, hosts=tuple(Host(lb.id, replace(H, port=27000 + lb.id), 29990 + lb.id)
                                                              for lb in lobbies))


def allowed(elements: frozenset[Element]) -> set[tuple]:
    return {e.key for e in elements if e.set == ALLOW}


# --- the allow set, planned from Lobby.allow

def test_the_allow_set_holds_each_lobbys_networks_by_host_port():
    lobbies = (Lobby(1, "allow", allow=("198.18.2.0/24", "198.18.2.128/25", "198.18.9.9/32")),
               Lobby(2, "open", open=True), Lobby(3, "neither"), Lobby(4, "closed", allow=("198.18.3.0/24",), closed=1.0),
               Lobby(5, "expired", allow=("198.18.4.0/24",), ttl=5, created=0.0))
    want = plan(snap(*lobbies), now=10.0)
    # Overlaps merge (one interval per range); open is everyone; neither, closed or expired: nothing.
    assert allowed(want) == {(29991, "198.18.2.0/24"), (29991, "198.18.9.9/32"), (29992, "0.0.0.0/0")}
    assert {e.comment for e in want if e.set == ALLOW} == {"lobby allow", "lobby open"}
    for e in want:
        check(e)  # each fits the set's declared type, as nft would take it
    # A lobby without a host has no host port yet, so nothing to admit to.
    assert allowed(plan(Snapshot("198.18.0.1", lobbies=lobbies[:1]), 10.0)) == set()


def test_closing_a_lobby_removes_its_networks_in_the_same_transaction():
    a = Lobby(1, "a", allow=("198.18.2.0/24",))
    changes = diff(plan(snap(replace(a, closed=5.0)), None), plan(snap(a), None))
    assert {(e.set, e.key) for e in changes.delete} >= {(ALLOW, (29991, "198.18.2.0/24")), (HOSTPORTS, (29991,))}
    assert "delete element inet natctl allow4 { 29991 . 198.18.2.0/24 }" in render(changes)


def test_the_fake_takes_only_networks_as_plan_writes_them():
    check(Element(ALLOW, (29991, "198.18.2.0/24")))
    for bad in [(29991, "198.18.2.1/24"), (29991, "198.18.2.1"), (29991, "nowhere"), (70000, "0.0.0.0/0")]:
        with pytest.raises(Exception, match="does not fit"):
            check(Element(ALLOW, bad))


def test_scoped_changes_plan_the_allow_set_too(svc):
    lobby, token = svc.lobby_create("a", allow=("198.18.2.0/24",))
    svc.register_host(token, H)
    port = svc.lobbies()[0].host_port
    assert (ALLOW, (port, "198.18.2.0/24")) in {(e.set, e.key) for e in svc.fake.installed.elements}
    reads = svc.fake.reads
    svc.admit_client(port, Endpoint("198.18.2.7", 4000))  # a client's scope: its lobby's networks stay as they are
    assert svc.fake.reads == reads
    svc.lobby_close("a")
    assert not any(e.set == ALLOW for e in svc.fake.installed.elements)


NETS = st.builds(lambda a, p: str(ipaddress.IPv4Network((a, p), strict=False)),
                 st.integers(0, 2**32 - 1), st.integers(0, 32))


@settings(max_examples=300, deadline=None)
@given(allow=st.lists(NETS, max_size=4), open_=st.booleans(), ip=st.integers(0, 2**32 - 1))
def test_one_rule_the_kernel_set_admits_exactly_whom_check_admits(allow, open_, ip):
    lobby = Lobby(1, "a", allow=tuple(allow), open=open_)
    sender = Endpoint(str(ipaddress.IPv4Address(ip)), 40000)
    nets = [ipaddress.IPv4Network(net) for _, net in allowed(plan(snap(lobby), None))]
    in_kernel = any(ipaddress.IPv4Address(ip) in net for net in nets)
    try:
        admission.check(lobby, sender, H, 0, "sender")
        refused = False
    except admission.NotAllowed:
        refused = True
    assert in_kernel == (not refused)


# --- listings: interval elements back to the text plan.py writes

def listing(*elems: object) -> dict:
    return {"nftables": [{"table": {"name": "natctl"}},
                         {"set": {"name": "allow4", "type": ["inet_service", "ipv4_addr"], "flags": ["interval"],
                                  "elem": list(elems)}},
                         {"set": {"name": "owner", "type": "mark",
                                  "elem": [{"elem": {"val": 77, "comment": "/var/lib/natctl/natctl.db"}}]}}]}


def test_parse_listing_reads_prefixes_bare_addresses_and_ranges_back_as_cidrs():
    got = parse_listing(listing(
        {"concat": [29991, {"prefix": {"addr": "198.18.2.0", "len": 24}}]},
        {"concat": [29991, "198.18.9.9"]},  # a /32 lists bare
        {"elem": {"val": {"concat": [29992, {"prefix": {"addr": "0.0.0.0", "len": 0}}]}, "comment": "lobby open"}},
        {"concat": [29993, {"range": ["198.18.4.0", "198.18.4.255"]}]},  # a range that is a prefix
        {"concat": [29994, {"range": ["198.18.4.1", "198.18.4.9"]}]},  # one that is not: no plan holds it
    ))
    assert allowed(frozenset(got.elements)) == {(29991, "198.18.2.0/24"), (29991, "198.18.9.9/32"),
                                                (29992, "0.0.0.0/0"), (29993, "198.18.4.0/24"),
                                                (29994, "198.18.4.1-198.18.4.9")}
    assert got.owner == Owner(77, "/var/lib/natctl/natctl.db")
    assert parse_listing(json.loads(json.dumps(listing()))).elements == set()


def test_the_owner_is_written_with_a_comment_nft_can_hold():
    script = render(Changes(generation=5, owner=Owner(42, '/srv/"odd"\\path\nx.db')))
    assert 'flush set inet natctl owner\nadd element inet natctl owner { 42 comment "/srv/?odd??path?x.db" }' in script
    long = "/" + "d/" * 200 + "natctl.db"
    assert len(comment_text(long)) == COMMENT_MAX and comment_text(long).endswith("/natctl.db")


# --- store identity: one kernel, two stores

# Two store files on one kernel: about SQLite files (a fleet's relays share one store by design).
SQLITE_FILES = pytest.mark.parametrize("svc", ["sqlite"], indirect=True)

def other(svc: Service, path: str, **kw) -> Service:
    """A second natctl on the same (fake) kernel with its own store."""
    s = Service(replace(svc.settings, state=path, **kw), kernel_factory=lambda: svc.fake)
    s.fake = svc.fake
    return s


@SQLITE_FILES
def test_second_store_refused_adopt_takes_over(svc, tmp_path):
    svc.lobby_create("a", open_=True)
    svc.map_add("a", H, [Endpoint("198.18.2.2", 40001)])
    mine = svc.store.store_id()
    assert svc.fake.owner() == Owner(mine, str(tmp_path / "s.db"))
    before = svc.fake.dump()
    b = other(svc, str(tmp_path / "other.db"))
    for attempt in (b.apply, b.cleanup, lambda: b.lobby_create("b", open_=True)):
        with pytest.raises(OwnedElsewhere) as err:
            attempt()
        text = str(err.value)
        assert err.value.exit_code == 7 and "\n" not in text
        assert f"belongs to {tmp_path / 's.db'}, not to {tmp_path / 'other.db'}" in text
        assert f"--state {tmp_path / 's.db'}" in text and "--adopt" in text
    assert svc.fake.dump() == before and b.lobbies() == []  # nothing changed, kernel or store
    assert not b.in_sync() and svc.in_sync()
    # --adopt: the other store's state replaces the kernel's, and now the first one is the stranger.
    adopted = other(svc, str(tmp_path / "other.db"), adopt=True)
    assert adopted.apply().deleted > 0
    assert svc.fake.owner().id == adopted.store.store_id() != mine
    assert not any(e.set == HOSTPORTS for e in svc.fake.installed.elements)
    with pytest.raises(OwnedElsewhere):
        svc.map_add("a", H, [Endpoint("198.18.2.2", 40002)])
    # 'natctl uninstall' from the store that lost the kernel is refused too; from its owner it works,
    # and then (as after a reboot) the table names nobody: any store takes it silently.
    with pytest.raises(OwnedElsewhere):
        svc.uninstall()
    assert adopted.uninstall()
    assert svc.apply().created_table and svc.fake.owner().id == mine
    for s in (b, adopted):
        s.close()


@SQLITE_FILES
def test_a_replaced_store_file_is_told_apart_from_its_path(svc, tmp_path):
    svc.lobby_create("a", open_=True)
    svc.apply()
    svc.close()
    (tmp_path / "s.db").unlink()
    again = other(svc, str(tmp_path / "s.db"))
    with pytest.raises(OwnedElsewhere, match="belongs to an earlier store at .*s.db"):
        again.apply()
    again.close()


def test_the_port_range_check_comes_before_any_change(svc, monkeypatch):
    svc.lobby_create("a", open_=True)
    before, lobbies = svc.fake.dump(), svc.lobbies()
    monkeypatch.setattr("natctl.sync.local_port_overlap", lambda ports: "the relay range 1-2 overlaps x: pick another")
    for attempt in (svc.apply, lambda: svc.lobby_create("b", open_=True), lambda: svc.lobby_close("a")):
        with pytest.raises(Conflict, match="overlaps"):
            attempt()
    assert svc.fake.dump() == before and svc.lobbies() == lobbies


def test_adopt_is_an_option_never_a_file_setting(tmp_path):
    from natctl.config import load

    assert load({"adopt": True}, str(tmp_path / "none.toml")).adopt
    assert load({}, str(tmp_path / "none.toml"), environ={"NATCTL_ADOPT": "1"}).adopt
    (tmp_path / "natctl.toml").write_text("adopt = true\n")
    with pytest.raises(Exception, match="cannot be set in the config file"):
        load({}, str(tmp_path / "natctl.toml"), environ={})


# --- the daemon: refused senders cost it no store transaction

def test_a_flood_at_a_full_lobby_is_refused_without_the_store(tmp_path, monkeypatch):
    base = free_udp_ports(11)
    kernel = FakeKernel()
    st_ = Settings(state=str(tmp_path / "s.db"), relay_ip="127.0.0.1", ports=PortRange(base + 1, base + 10),
                   registration_port=base, cleanup_interval=3600)
    svc = Service(st_, kernel_factory=lambda: kernel)
    _, token = svc.lobby_create("a", open_=True, max_clients=1)
    calls = {"admit": 0, "block": 0}
    real_admit, real_block = Service.admit_client, FakeKernel.block_all

    def counting_admit(self, *a, **kw):
        calls["admit"] += 1
        return real_admit(self, *a, **kw)

    def counting_block(self, senders):
        calls["block"] += 1
        real_block(self, senders)

    monkeypatch.setattr(Service, "admit_client", counting_admit)
    monkeypatch.setattr(FakeKernel, "block_all", counting_block)
    host, member = udp(), udp()
    strangers = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(40)]
    refused = metrics.REJECTIONS.labels("not_allowed")
    with Running(lambda: Service(st_, kernel_factory=lambda: kernel)) as daemon:
        _, host_port = register(host, base, token)
        deadline = time.monotonic() + 5
        while not daemon.sent:  # until the daemon listens on the new host port (within a second)
            assert time.monotonic() < deadline, "the member was never admitted"
            member.sendto(b"first", ("127.0.0.1", host_port))
            time.sleep(0.05)
        admits, before = calls["admit"], refused._value.get()
        for round_ in range(5):  # 200 datagrams from 40 senders, all refused: the lobby is full
            for s in strangers:
                s.sendto(b"let me in %d" % round_, ("127.0.0.1", host_port))
        wait_for("the refusals", lambda: refused._value.get() - before >= 200)
    assert calls["admit"] == admits  # not one store transaction for a refused sender
    assert ("127.0.0.1", host_port) in kernel.blocked
    assert 1 <= calls["block"] < 200  # blocked in batches, one kernel command each
    assert len(daemon.sent) == 1
    for s in (host, member, *strangers):
        s.close()
    svc.close()


def test_the_cache_lets_a_member_and_a_newcomer_reach_the_store():
    lobby = Lobby(1, "a", open=True, max_clients=2)
    member = Endpoint("198.18.2.2", 1)
    admission.check_sender(lobby, member, H, {member}, 2)  # full, but a member: the store delivers its packet
    admission.check_sender(lobby, Endpoint("198.18.2.3", 1), H, {member}, 1)  # room for one more
    with pytest.raises(admission.NotAllowed, match="full"):
        admission.check_sender(lobby, Endpoint("198.18.2.3", 1), H, {member}, 2)
    with pytest.raises(admission.NotAllowed, match="not allowed"):
        admission.check_sender(Lobby(2, "b", allow=("198.18.9.0/24",)), member, H, set(), 0)


def test_clients_are_still_counted_by_the_store(svc):
    """The daemon's count (distinct relay ports) is the allocator's: a refusal from the cache is the store's."""
    lobby, token = svc.lobby_create("a", open_=True, max_clients=2)
    svc.register_host(token, H)
    port = svc.lobbies()[0].host_port
    for i in range(2):
        svc.admit_client(port, Endpoint("198.18.2.2", 4000 + i))
    clients = svc.clients(lobby.id)
    assert len({c.relay_port for c in clients}) == 2
    with pytest.raises(admission.NotAllowed, match="full"):
        svc.admit_client(port, Endpoint("198.18.2.2", 5000))


@SQLITE_FILES
def test_adopt_takes_over_once_then_defends_like_any_owner(svc, tmp_path):
    svc.lobby_create("a", open_=True)
    b = other(svc, str(tmp_path / "b.db"), adopt=True)
    b.apply()
    svc.rec.settings = replace(svc.rec.settings, adopt=True)
    svc.apply()  # the first store takes it back, explicitly
    with pytest.raises(OwnedElsewhere):
        b.apply()  # b's --adopt was for its one take-over, not for a tug of war
    b.close()


def test_the_flood_bench_sends_valid_udp_from_spoofed_sources():
    from bench.flood import _checksum, datagram, spoofed_sources

    sources = spoofed_sources(10_000)
    assert len(set(sources)) == 10_000
    assert all(ipaddress.IPv4Address(ip) in ipaddress.IPv4Network("198.18.64.0/18") for ip in sources)
    frame = datagram("198.18.64.1", 40000, "198.18.0.1", 27017, b"natctl-flood-1")
    ip, udp = frame[:20], frame[20:]
    assert ip[9] == socket.IPPROTO_UDP and int.from_bytes(ip[2:4], "big") == len(frame)
    pseudo = ip[12:20] + bytes([0, socket.IPPROTO_UDP]) + len(udp).to_bytes(2, "big")
    assert _checksum(pseudo + udp) == 0  # a receiver's check of the UDP checksum passes
