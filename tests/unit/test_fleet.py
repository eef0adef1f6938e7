"""A fleet on one real PostgreSQL store, each relay with its own (fake) kernel: placement, changes made
on one relay for another's lobby, registration anywhere, drain and failover, bad input."""

from __future__ import annotations

from dataclasses import replace

import pytest

from natctl import plan as planner
from natctl.config import FleetSettings, Settings
from natctl.errors import Conflict, Exhausted, NatctlError, NotFound, UsageError
from natctl.fleet.model import Relay, compose, decode, encode, place
from natctl.fleet.service import Fleet
from natctl.kernel.fake import FakeKernel
from natctl.model import Endpoint, PortRange
from natctl.service import Service

H1, H2 = Endpoint("198.18.40.1", 5000), Endpoint("198.18.40.2", 5000)
P1, P2 = Endpoint("198.18.50.1", 6000), Endpoint("198.18.50.2", 6000)


class Relays:
    """Relays by name, each a Service with its own fake kernel on the one store."""

    def __init__(self, url: str, tmp_path) -> None:
        self.url, self.tmp = url, tmp_path
        self.svc: dict[str, Service] = {}

    def add(self, name: str, ip: str, region: str, capacity: int = 0) -> Service:
        kernel = FakeKernel()
        settings = Settings(state=str(self.tmp / f"{name}.db"), store=self.url, relay_ip=ip,
                            ports=PortRange(20000, 20999), fleet=FleetSettings(dead_after=5.0))
        s = Service(settings, kernel_factory=lambda: kernel)
        s.fake = kernel
        Fleet(s.rec).join(name, region, capacity)
        self.svc[name] = s
        return s

    def __getitem__(self, name: str) -> Service:
        return self.svc[name]

    def close(self) -> None:
        for s in self.svc.values():
            s.close()


@pytest.fixture
def fleet(pg_db, tmp_path, monkeypatch):
    monkeypatch.setattr("natctl.sync.local_port_overlap", lambda ports: None)
    relays = Relays(pg_db.url, tmp_path)
    relays.add("eu-1", "198.18.0.1", "eu")
    relays.add("eu-2", "198.18.0.2", "eu")
    relays.add("us-1", "198.18.0.3", "us")
    yield relays
    relays.close()


def mapped(svc: Service) -> set[tuple]:
    """The DNAT keys a relay's kernel holds."""
    return {e.key for e in svc.fake.installed.elements if e.set == planner.DNAT}


def test_lobbies_are_placed_by_region_then_load_and_forwarded_by_their_relay_only(fleet):
    eu1 = fleet["eu-1"]
    a, _ = eu1.lobby_create("a", open_=True)  # this relay's region, the emptiest relay of it: itself first
    b, _ = eu1.lobby_create("b", open_=True)
    c, _ = eu1.lobby_create("c", open_=True, region="us")
    d, _ = eu1.lobby_create("d", open_=True, relay="eu-2")
    assert (a.relay, c.relay, d.relay) == ("eu-1", "us-1", "eu-2") and b.relay in ("eu-1", "eu-2")
    # A mapping made on eu-1 for us-1's lobby waits in us-1's outbox: not in eu-1's kernel, in us-1's once it drains.
    eu1.map_add("c", H1, [P1])
    assert mapped(eu1) == set() and mapped(fleet["us-1"]) == set()
    assert fleet["us-1"].rec.drain().added >= 4  # (its first change also makes its table)
    assert len(mapped(fleet["us-1"])) == 2 and mapped(fleet["eu-2"]) == set()
    # A change on us-1 itself is applied to its kernel at once, as on a single relay.
    fleet["us-1"].map_add("c", H1, [P2])
    assert len(mapped(fleet["us-1"])) == 4
    # Its listing shows where each lobby lives; its relay's full reconcile agrees with what drained.
    assert {v.name: v.relay for v in eu1.lobbies()} == {"a": "eu-1", "b": b.relay, "c": "us-1", "d": "eu-2"}
    assert fleet["us-1"].apply().changed is False


def test_registration_anywhere_answers_with_the_relay_that_holds_the_lobby(fleet):
    _, token = fleet["eu-1"].lobby_create("far", open_=True, region="us")
    reg = fleet["eu-1"].register_host(token, H2)
    assert reg.relay_ip == "198.18.0.3" and not reg.here and reg.changed
    again = fleet["us-1"].register_host(token, H2)  # the host follows the reply: a keepalive there changes nothing
    assert again.here and not again.changed and again.host.relay_port == reg.host.relay_port
    fleet["us-1"].rec.drain()
    assert planner.Element(planner.HOSTPORTS, (reg.host.relay_port,)) in fleet["us-1"].fake.installed.elements


def test_drain_moves_lobbies_and_their_kernel_elements(fleet):
    eu1, eu2 = fleet["eu-1"], fleet["eu-2"]
    eu1.lobby_create("a", open_=True, relay="eu-1")
    eu1.map_add("a", H1, [P1, P2])
    assert len(mapped(eu1)) == 4
    moved = Fleet(eu2.rec).drain("eu-1")
    assert [(m.lobby, m.source) for m in moved] == [("a", "eu-1")]
    target = fleet[moved[0].target]
    target.rec.drain()
    eu1.rec.drain()
    # The host port moved; its players are admitted again there, at their first packets (its NAT opens first).
    assert mapped(eu1) == set() and mapped(target) == set() and eu1.clients(1) == []
    assert any(e.set == planner.HOSTPORTS for e in target.fake.installed.elements)
    with pytest.raises(Exhausted, match="draining"):
        eu2.lobby_create("b", relay="eu-1")


def test_a_dead_relays_lobbies_move_to_its_region_and_nothing_is_lost(fleet):
    eu1, eu2, us1 = fleet["eu-1"], fleet["eu-2"], fleet["us-1"]
    for i in range(4):
        eu1.lobby_create(f"l{i}", open_=True, relay="eu-1")
        eu1.map_add(f"l{i}", Endpoint("198.18.41.1", 5000 + i), [P1])
    moved = Fleet(eu2.rec).failover(["eu-1"])
    assert len(moved) == 4 and {m.target for m in moved} == {"eu-2"}  # its region first, never us-1
    eu2.rec.drain()
    assert sum(e.set == planner.HOSTPORTS for e in eu2.fake.installed.elements) == 4
    assert all(e.set != planner.HOSTPORTS for e in us1.fake.installed.elements)
    assert {r.name: r.state for r in Fleet(eu2.rec).relays()}["eu-1"] == "dead"
    # With no live relay left in the region the lobbies stay (not lost), and move once one can take them.
    Fleet(us1.rec).failover(["eu-2"])
    assert {v.name: v.relay for v in us1.lobbies()} == {f"l{i}": "eu-2" for i in range(4)}
    # eu-1 comes back: its heartbeat makes it live again, empty; its outbox removes what moved away.
    assert Fleet(eu1.rec).beat().state == "live"
    eu1.rec.drain()
    assert mapped(eu1) == set()


def test_bad_input_is_refused_and_changes_nothing(fleet, tmp_path):
    eu1 = fleet["eu-1"]
    with pytest.raises(Conflict, match="already joined the fleet as 'eu-1'"):
        Fleet(eu1.rec).join("other", "eu")
    with pytest.raises(Conflict, match="already joined with IP 198.18.0.1"):
        fleet.add("eu-1", "198.18.0.9", "eu")
    with pytest.raises(NotFound, match="no relay named 'nope'"):
        eu1.lobby_create("x", relay="nope")
    with pytest.raises(Exhausted, match="no live relay in region 'mars'"):
        eu1.lobby_create("x", region="mars")
    with pytest.raises(UsageError):
        Fleet(eu1.rec).join("bad name!", "eu")
    assert eu1.lobbies() == []
    Fleet(eu1.rec).drain("eu-2")
    Fleet(eu1.rec).drain("us-1")
    with pytest.raises(Exhausted, match="last live relay"):
        Fleet(fleet["eu-2"].rec).drain("eu-1")


def test_a_machine_that_is_not_a_relay_places_and_reads_but_forwards_nothing(fleet, pg_db, tmp_path):
    kernel = FakeKernel()
    ops = Service(Settings(state=str(tmp_path / "ops.db"), store=pg_db.url, relay_ip="198.18.0.99"),
                  kernel_factory=lambda: kernel)

    def touched(_settings: Settings) -> None:
        raise AssertionError("an operator's machine turned IP forwarding on")
    ops.rec.preflight = touched  # it forwards nothing: it must not change its own kernel's settings either
    lobby, _ = ops.lobby_create("from-ops", open_=True, region="us")
    ops.map_add("from-ops", H1, [P1])
    assert lobby.relay == "us-1" and kernel.installed.elements == frozenset()
    assert fleet["us-1"].rec.drain().added >= 4
    ops.close()


@pytest.mark.parametrize("svc", ["sqlite"], indirect=True)
def test_a_single_relay_store_has_no_fleet(svc):
    with pytest.raises(NatctlError, match="its own SQLite file"):
        Fleet(svc.rec).relays()
    with pytest.raises(UsageError, match="place lobbies in a fleet"):
        svc.lobby_create("a", region="eu")


def test_placement_and_outbox_rows_are_pure():
    live = [Relay("a", "198.18.0.1", "eu", 100, 8809, "live", 0, 99, mappings=90),
            Relay("b", "198.18.0.2", "eu", 100, 8809, "live", 0, 99, mappings=10),
            Relay("c", "198.18.0.3", "us", 0, 8809, "live", 0, 99)]
    assert place(live, 100, 10, "eu").name == "b"
    with pytest.raises(Exhausted):
        place(live, 200, 10, "eu")  # every heartbeat 101 s old
    e = planner.Element(planner.DNAT, ("198.18.1.1", "udp", 1, 2), ("198.18.1.2", 3), "lobby x")
    f = replace(e, value=("198.18.1.3", 4))
    ch = planner.Changes(add=(f,), delete=(e,))
    assert decode(encode(ch)).add == (f,) and decode(encode(ch)).delete == (e,)
    assert compose(planner.Changes(add=(e,)), planner.Changes(delete=(e,))) == planner.Changes()
    assert compose(planner.Changes(delete=(e,)), planner.Changes(add=(e,))) == planner.Changes()
    assert compose(ch, planner.Changes(add=(e,), delete=(f,))) == planner.Changes()


def test_two_relays_that_see_one_death_move_its_lobbies_once(fleet):
    eu1 = fleet["eu-1"]
    for i in range(3):
        eu1.lobby_create(f"l{i}", open_=True, relay="eu-1")
    first = Fleet(fleet["eu-2"].rec).failover(["eu-1"])
    second = Fleet(fleet["us-1"].rec).failover(["eu-1"])  # it saw the same silence: nothing left to move
    assert len(first) == 3 and second == []
    assert {v.relay for v in eu1.lobbies()} == {"eu-2"}


def test_a_read_only_database_refuses_changes_in_one_line_and_keeps_everything(fleet, pg_db):
    eu1 = fleet["eu-1"]
    eu1.lobby_create("a", open_=True, relay="eu-1")
    pg_db.server.sql(f"ALTER DATABASE {pg_db.name} SET default_transaction_read_only = on")
    kernel = FakeKernel()
    ro = Service(replace(eu1.settings), kernel_factory=lambda: kernel)  # a new connection: read-only
    try:
        with pytest.raises(NatctlError, match="cannot be written") as err:
            ro.lobby_create("b", open_=True)
        assert err.value.exit_code == 8 and "\n" not in str(err.value)
        assert [v.name for v in ro.lobbies()] == ["a"] and kernel.installed.elements == frozenset()
    finally:
        ro.close()
        pg_db.server.sql(f"ALTER DATABASE {pg_db.name} SET default_transaction_read_only = off")


def test_per_relay_features_say_so_on_a_fleet(fleet):
    from natctl.gm.service import GmService
    from natctl.lan.service import LanService

    eu1 = fleet["eu-1"]
    with pytest.raises(UsageError, match="virtual LANs run on one relay with its own store"):
        _ = LanService(eu1.rec, kernel=FakeKernel()).rows
    with pytest.raises(UsageError, match="game masters' VPN run on one relay"):
        _ = GmService(eu1.rec).gms
    assert eu1.cleanup()["lans"] == []  # the daemon's cleanup does not trip over them


def test_load_is_counted_from_the_kernel_counters_cleanup_keeps(fleet, monkeypatch):
    eu1 = fleet["eu-1"]
    f = Fleet(eu1.rec)
    counts = iter([(0, 0.0), (0, 0.0), (600, 0.0), (600, 0.0)])
    monkeypatch.setattr(eu1.store, "activity", lambda: {1: next(counts), 2: (0, 0.0)})
    assert (f.beat().mappings, f.beat().pps) == (2, 0)
    moved = f.beat()  # the count moved by 600 since it was last seen moving (at the join)
    assert moved.packets == 600 and moved.pps == pytest.approx(600 / (moved.heartbeat - moved.joined), rel=0.05)
    assert f.beat().pps == moved.pps  # unchanged between cleanups: the last rate stands


def test_doctor_checks_the_store_the_membership_and_the_heartbeat(fleet):
    from natctl.fleet.service import facts
    from natctl.preflight import Facts, evaluate

    def fleet_checks(settings, ip):
        return {c.name: c for c in evaluate(Facts(relay_ip=ip, **facts(settings, ip)))
                if c.name in ("store", "fleet member", "heartbeat")}

    eu1 = fleet["eu-1"]
    Fleet(eu1.rec).beat()
    checks = fleet_checks(eu1.settings, "198.18.0.1")
    assert [(n, c.status) for n, c in checks.items()] == [("store", "pass"), ("fleet member", "pass"),
                                                          ("heartbeat", "pass")]
    assert "eu-1 (live)" in checks["fleet member"].detail
    stranger = fleet_checks(eu1.settings, "198.18.0.77")
    assert stranger["fleet member"].status == "fail" and "relay join" in stranger["fleet member"].fix
    gone = replace(eu1.settings, store="postgresql:///natctl?host=/nonexistent-dir&user=postgres")
    down = fleet_checks(gone, "198.18.0.1")
    assert list(down) == ["store"] and down["store"].status == "fail" and "start the database" in down["store"].fix


def test_a_relay_is_dead_only_after_this_daemon_watched_its_heartbeat_stand_still(fleet, monkeypatch):
    """Heartbeats are stamped by the database's clock and judged by how long the watcher itself saw them
    not move: a relay whose stamp is far off (its clock, an outage everyone had) is alive while it moves."""
    from types import SimpleNamespace

    from natctl.fleet.watch import Watch

    eu1, db = fleet["eu-1"], fleet["eu-1"].store.db
    eu1.lobby_create("x", open_=True, relay="eu-2")
    clock = [1000.0]
    monkeypatch.setattr("natctl.fleet.watch.time.monotonic", lambda: clock[0])
    watch = Watch(SimpleNamespace(svc=eu1))

    def stamp(name: str, when: float) -> None:
        with eu1.store.write():
            db.execute("UPDATE relays SET heartbeat=? WHERE name=?", (when, name))

    stamp("eu-2", 5.0)  # a stamp from 1970: stale by any clock, as after an outage everyone had
    stamp("us-1", 7.0)
    watch._watch()
    for step in range(1, 4):  # eu-2 keeps beating (its stamps move, whatever their value); us-1 stands still
        clock[0] += 2.0
        stamp("eu-2", 5.0 + step)
        watch._watch()
    states = {r.name: r.state for r in Fleet(eu1.rec).relays()}
    assert states == {"eu-1": "live", "eu-2": "live", "us-1": "dead"}  # us-1: 6 s >= dead_after 5 s
    assert {v.name: v.relay for v in eu1.lobbies()} == {"x": "eu-2"}
