"""The service over a fake kernel: atomicity, idempotence, and the error cases."""

import pytest

from natctl.config import Settings
from natctl.errors import Conflict, Exhausted, KernelError, NotFound
from natctl.kernel.fake import FakeKernel
from natctl.model import Endpoint, PortRange
from natctl.service import Service

H, C1, C2 = Endpoint("198.18.1.2", 27015), Endpoint("198.18.2.2", 40001), Endpoint("198.18.2.2", 40002)


def test_map_add_allocates_and_installs(svc):
    svc.lobby_create("a")
    (m,) = svc.map_add("a", H, [C1])
    assert (m.host_port, m.client_port) == (20009, 20000)
    assert len(svc.fake.installed.elements) == 5  # 4 for the mapping, 1 host port
    (m2,) = svc.map_add("a", H, [C2])
    assert (m2.host_port, m2.client_port) == (20009, 20001)
    assert svc.apply().changed is False  # a second apply sends nothing
    assert len(svc.fake.scripts) == 3


def test_kernel_refusal_leaves_store_unchanged(svc):
    svc.lobby_create("a")
    svc.map_add("a", H, [C1])
    svc.fake.fail = True
    with pytest.raises(KernelError):
        svc.map_add("a", H, [C2])
    with pytest.raises(KernelError):
        svc.lobby_close("a")
    assert [m.client for m in svc.mappings()] == [str(C1)]
    assert [lb.name for lb in svc.lobbies()] == ["a"]


def test_errors_say_what_to_do(svc):
    svc.lobby_create("a", allow=("198.18.2.0/24",))
    with pytest.raises(Conflict, match="already open"):
        svc.lobby_create("a")
    with pytest.raises(NotFound, match="natctl lobby list"):
        svc.map_add("nope", H, [C1])
    with pytest.raises(Conflict, match="not allowed"):
        svc.map_add("a", H, [Endpoint("198.18.7.7", 1)])
    svc.map_add("a", H, [C1])
    with pytest.raises(Conflict, match="already mapped"):
        svc.map_add("a", H, [C1])
    with pytest.raises(Conflict, match="already has host"):
        svc.map_add("a", Endpoint("198.18.1.3", 1), [C2])
    svc.lobby_create("b")
    with pytest.raises(Conflict, match="hosts another lobby"):
        svc.map_add("b", H, [C2])
    with pytest.raises(NotFound):
        svc.map_remove("a", C2)


def test_port_exhaustion_is_atomic(svc):
    svc.lobby_create("a", open_=True, max_clients=100)
    clients = [Endpoint("198.18.2.2", 40000 + i) for i in range(20)]
    with pytest.raises(Exhausted, match="20000-20009"):
        svc.map_add("a", H, clients)
    assert svc.mappings() == [] and svc.fake.installed.elements == set()


def test_close_frees_ports_for_the_next_lobby(svc):
    svc.lobby_create("a")
    svc.map_add("a", H, [C1])
    svc.lobby_close("a")
    assert svc.fake.installed.elements == set()
    svc.lobby_create("a")  # the name is free again
    (m,) = svc.map_add("a", Endpoint("198.18.1.9", 1), [C1])
    assert m.host_port == 20009


def test_forwards(svc):
    svc.forward_add(8080, Endpoint("198.18.9.9", 80), "both", ttl=3600)
    with pytest.raises(Conflict, match="already forwarded"):
        svc.forward_add(8080, Endpoint("198.18.9.9", 81))
    with pytest.raises(Conflict, match="reserved"):
        svc.forward_add(20005, Endpoint("198.18.9.9", 81))
    assert [f.port for f in svc.forwards()] == [8080]
    svc.forward_remove(8080)
    assert svc.fake.installed.elements == set()


def test_cleanup_removes_what_expired(svc):
    now = [1000.0]
    svc.rec.clock = lambda: now[0]
    svc.lobby_create("short", ttl=60)
    svc.lobby_create("long", ttl=3600)
    svc.map_add("short", H, [C1])
    svc.forward_add(8080, Endpoint("198.18.9.9", 80), ttl=60)
    assert svc.cleanup() == {"lobbies": [], "forwards": [], "idle": [], "lans": [], "members": []}
    now[0] += 61
    assert svc.cleanup() == {"lobbies": ["short"], "forwards": [8080], "idle": [], "lans": [], "members": []}
    assert [lb.name for lb in svc.lobbies()] == ["long"] and svc.fake.installed.elements == set()


def test_idle_mappings_expire_by_kernel_counters(svc):
    from dataclasses import replace

    from natctl.plan import SNAT

    now = [1000.0]
    svc.rec.clock = lambda: now[0]
    svc.rec.settings = replace(svc.settings, idle_timeout=60)
    svc.lobby_create("a")
    svc.map_add("a", H, [C1, C2])
    busy_key = (SNAT, ("198.18.2.2", "udp", 40001, "198.18.1.2", 27015))
    for step in range(1, 4):  # C1 keeps sending; C2 is silent
        now[0] += 30
        svc.fake.installed.counters[busy_key] = (step * 10, step * 640)
        gone = svc.expire_idle()
        assert gone == ([] if step < 2 else ["a/udp/198.18.2.2:40002"] if step == 2 else [])
    assert [m.client for m in svc.mappings()] == [str(C1)]


def test_registration_is_idempotent_and_a_new_address_moves_the_lobby(svc):
    from natctl.plan import DNAT

    _, token = svc.lobby_create("a", open_=True)
    with pytest.raises(NotFound, match="token"):
        svc.register_host("not-the-token-at-all", H)
    first = svc.register_host(token, H)
    host = first.host
    assert first.changed
    scripts = len(svc.fake.scripts)
    repeat = svc.register_host(token, H)
    assert repeat.host == host and not repeat.changed and len(svc.fake.scripts) == scripts  # a repeat sends nothing
    m = svc.admit_client(host.relay_port, C1).mapping
    moved = Endpoint("198.18.1.3", 27016)
    again = svc.register_host(token, moved).host
    assert again.relay_port == host.relay_port
    dnat = {e.key: e.value for e in svc.fake.installed.elements if e.set == DNAT}
    assert dnat[(C1.ip, "udp", C1.port, host.relay_port)] == (moved.ip, moved.port)
    assert dnat[(moved.ip, "udp", moved.port, m.client_port)] == (C1.ip, C1.port)
    assert not any(k[0] == H.ip for k in dnat)


def test_admission_checks_and_scoped_changes(svc):
    from natctl.admission import NotAllowed

    _, token = svc.lobby_create("a", allow=("198.18.2.0/24",), max_clients=2)
    host = svc.register_host(token, H).host
    before, elements, reads = len(svc.fake.scripts), len(svc.fake.installed.elements), svc.fake.reads
    m1 = svc.admit_client(host.relay_port, C1)
    assert m1.new and len(svc.fake.scripts) == before + 1
    # One client's 4 elements went in, and nothing was read back: the change was scoped.
    assert len(svc.fake.installed.elements) == elements + 4 and svc.fake.reads == reads
    again = svc.admit_client(host.relay_port, C1)
    assert again.mapping == m1.mapping and not again.new and len(svc.fake.scripts) == before + 1
    with pytest.raises(NotAllowed, match="not allowed"):
        svc.admit_client(host.relay_port, Endpoint("198.18.9.9", 5))
    svc.admit_client(host.relay_port, C2)
    with pytest.raises(NotAllowed, match="full"):
        svc.admit_client(host.relay_port, Endpoint("198.18.2.7", 5))
    with pytest.raises(NotFound):
        svc.admit_client(20001, C1)
    assert len(svc.mappings()) == 2


def test_changes_are_scoped_while_the_kernel_carries_the_stores_tag(svc):
    svc.lobby_create("a")
    svc.map_add("a", H, [C1])  # the first change verifies in full and tags kernel and store
    reads = svc.fake.reads
    svc.map_add("a", H, [C2])
    svc.map_remove("a", C1)
    svc.forward_add(8080, Endpoint("198.18.9.9", 80))
    assert svc.fake.reads == reads  # no full read of the kernel for any of them
    assert len(svc.fake.installed.elements) == 4 + 1 + 3
    svc.fake.uninstall()  # someone removed the table behind natctl's back
    svc.map_add("a", H, [Endpoint("198.18.2.2", 40003)])
    assert svc.fake.reads == reads + 1  # no tag in the kernel: a full reconcile rebuilds everything
    assert len(svc.fake.installed.elements) == 2 * 4 + 1 + 3
    assert svc.apply().changed is False


@pytest.mark.parametrize("host,client,match", [
    (Endpoint("198.18.0.1", 29999), C1, "relay's own address"),  # the relay as a host
    (H, Endpoint("198.18.0.1", 5), "relay's own address"),
    (Endpoint("127.0.0.1", 27015), C1, "not an address"),
    (H, Endpoint("0.1.2.3", 5), "not an address"),
    (H, Endpoint("224.0.0.251", 5353), "not an address"),
    (H, Endpoint("255.255.255.255", 5), "not an address"),
])
def test_addresses_that_make_no_sense_are_refused(svc, host, client, match):
    from natctl.errors import UsageError

    svc.lobby_create("a")
    with pytest.raises(UsageError, match=match):
        svc.map_add("a", host, [client])
    assert svc.mappings() == [] and svc.lobbies()[0].host is None  # nothing half-made


@pytest.mark.parametrize("allow", ["224.0.0.0/4", "224.0.0.251/32", "127.0.0.0/8", "0.0.0.0/8", "255.255.255.255/32"])
def test_allowed_networks_must_hold_players(svc, allow):
    from natctl.errors import UsageError

    with pytest.raises(UsageError, match="not a network of players"):
        svc.lobby_create("a", allow=(allow,))
    assert svc.lobbies() == []


def test_a_forward_to_the_relay_itself_is_refused(svc):
    from natctl.errors import UsageError

    with pytest.raises(UsageError, match="relay's own address"):
        svc.forward_add(2222, Endpoint("198.18.0.1", 22))
    assert svc.forwards() == []


def test_a_host_that_opens_gets_its_clients_only_after_its_punch(svc):
    """Registration v2: a new client waits outside the kernel until its host's NAT shows its address."""
    from natctl.plan import DNAT

    _, token = svc.lobby_create("a", open_=True)
    host = svc.register_host(token, H, opens=True).host
    assert host.opens and svc.register_host(token, H, opens=True).changed is False
    first = svc.admit_client(host.relay_port, C1)
    assert first.new and first.pending and not first.mapping.installed
    assert not any(e.set == DNAT for e in svc.fake.installed.elements)  # nothing is forwarded yet
    assert svc.admit_client(host.relay_port, C1).pending  # its next packets are held too
    # Behind a symmetric NAT the host's punch comes from another port than its registration.
    seen = Endpoint(H.ip, 61000)
    settled = svc.settle_client(first.client_id, seen)
    assert not settled.pending and settled.mapping.host == str(seen)
    dnat = {e.key: e.value for e in svc.fake.installed.elements if e.set == DNAT}
    assert dnat[(C1.ip, "udp", C1.port, host.relay_port)] == (seen.ip, seen.port)
    assert dnat[(seen.ip, "udp", seen.port, first.mapping.client_port)] == (C1.ip, C1.port)
    # A second client's host that never answers: installed with the registered address.
    second = svc.admit_client(host.relay_port, C2)
    assert svc.settle_client(second.client_id, None).mapping.host == str(H)
    # A punch from another IP is refused and changes nothing.
    elements = set(svc.fake.installed.elements)
    with pytest.raises(Conflict, match="punch"):
        svc.settle_client(second.client_id, Endpoint("198.18.9.9", 1))
    assert set(svc.fake.installed.elements) == elements
    # The host moves: what punches taught is forgotten, mappings follow the new address.
    moved = Endpoint("198.18.1.3", 27016)
    assert svc.register_host(token, moved, opens=True).changed
    dnat = {e.key: e.value for e in svc.fake.installed.elements if e.set == DNAT}
    assert dnat[(C1.ip, "udp", C1.port, host.relay_port)] == (moved.ip, moved.port)


def test_a_store_from_before_punches_gets_the_new_columns(tmp_path):
    import sqlite3

    from natctl.store import Store

    path = str(tmp_path / "old.db")
    db = sqlite3.connect(path)
    db.executescript("CREATE TABLE hosts (lobby_id INTEGER PRIMARY KEY, ip TEXT NOT NULL, port INTEGER NOT NULL,"
                     " relay_port INTEGER NOT NULL UNIQUE, created REAL NOT NULL, UNIQUE (ip, port));"
                     "INSERT INTO hosts VALUES (1, '198.18.1.2', 27015, 29999, 0);")
    db.close()
    store = Store(path)
    host = store.host(1)
    assert host is not None and host.opens is False and host.relay_port == 29999
    store.close()


def test_announced_clients_that_never_arrive_go_with_idle_cleanup(tmp_path, monkeypatch):
    """noray's connect-relay announces a client; its first packet installs it; if none comes, cleanup removes it."""
    from natctl.plan import DNAT

    monkeypatch.setattr("natctl.sync.local_port_overlap", lambda ports: None)
    now = [1000.0]
    kernel = FakeKernel()
    svc = Service(Settings(state=str(tmp_path / "s.db"), relay_ip="198.18.0.1", ports=PortRange(20000, 20009),
                           idle_timeout=60), kernel_factory=lambda: kernel, clock=lambda: now[0])
    _, token = svc.lobby_create("a", open_=True)
    host = svc.register_host(token, H).host
    announced = svc.admit_client(host.relay_port, C1, expect=True)
    assert announced.pending and not announced.new and not any(e.set == DNAT for e in kernel.installed.elements)
    arrived = svc.admit_client(host.relay_port, C1)  # its first packet
    assert arrived.new and not arrived.pending and any(e.set == DNAT for e in kernel.installed.elements)
    assert kernel.forgotten[-1].saddr == H.ip and kernel.forgotten[-1].dport == arrived.mapping.client_port
    svc.admit_client(host.relay_port, C2, expect=True)
    now[0] += 61
    gone = svc.expire_idle()
    assert [g for g in gone if "never arrived" in g] == [f"udp/{C2} (never arrived)"]  # C1 went as idle
    assert svc.store.clients() == []
    svc.close()


def test_more_mappings_than_a_relay_holds_are_refused_before_the_kernel(svc, monkeypatch):
    monkeypatch.setattr("natctl.kernel.nft.MAX_ELEMENTS", 4)  # two mappings' DNAT elements
    svc.lobby_create("a", open_=True)
    svc.map_add("a", Endpoint("198.18.1.1", 5000), [Endpoint("198.18.2.1", 1), Endpoint("198.18.2.2", 2)])
    svc.fake.installed = type(svc.fake.installed)()  # the kernel lost its table: the next change reconciles in full
    before = svc.mappings()
    with pytest.raises(Exhausted, match="3 mappings are more than one relay holds") as err:
        svc.map_add("a", Endpoint("198.18.1.1", 5000), [Endpoint("198.18.2.3", 3)])
    assert err.value.exit_code == 5 and svc.mappings() == before


def test_a_full_reconcile_reads_no_map_while_nftables_is_as_natctl_left_it(svc):
    """nftables' ruleset generation (FakeKernel.commits) proves the kernel as the store's last write left it:
    a full reconcile then plans and reads no nftables map; any other commit, a TTL run out or another relay
    IP makes it read them all again, and it repairs what was changed."""
    from dataclasses import replace

    from natctl.plan import HOSTPORTS

    now = [1000.0]
    svc.rec.clock = lambda: now[0]
    svc.fake.commits = 0  # model the kernel's count of transactions
    reads = svc.fake.reads
    svc.lobby_create("a", ttl=600)  # the first change reconciles in full: read, then proven by its one commit
    assert svc.fake.reads == reads + 1
    svc.map_add("a", H, [C1])  # scoped, the one commit since: still proven
    assert svc.apply().changed is False and svc.map_add("a", H, [C2]) and svc.apply().changed is False
    assert svc.fake.reads == reads + 1

    # Another program's transaction: an element gone behind natctl's back, and the count moved on.
    port = next(e for e in svc.fake.installed.elements if e.set == HOSTPORTS)
    svc.fake.installed = replace(svc.fake.installed, elements=svc.fake.installed.elements - {port})
    svc.fake.commits += 1
    result = svc.apply()
    assert svc.fake.reads == reads + 2 and result.added == 1 and port in svc.fake.installed.elements
    assert svc.apply().changed is False and svc.fake.reads == reads + 2

    svc.fake.block("198.18.7.7", 20000)  # the daemon's blocks are transactions too
    assert svc.apply().changed is False and svc.fake.reads == reads + 3
    svc.map_add("a", H, [Endpoint("198.18.2.2", 40003)], apply=False)  # rows without the kernel
    assert svc.apply().added == 4 and svc.fake.reads == reads + 4
    reads += 1

    now[0] += 601  # the lobby's TTL ran out, no row changed: the plan at this time has none of it
    result = svc.apply()
    assert svc.fake.reads == reads + 4 and result.deleted > 0
    assert not [e for e in svc.fake.installed.elements if e.set != HOSTPORTS and e.comment == "lobby a"]

    svc.lobby_close("a")
    svc.lobby_create("b")
    svc.map_add("b", H, [C1])
    assert svc.apply().changed is False
    reads = svc.fake.reads
    svc.rec._relay_ip = "198.18.0.2"  # a new relay IP (in every snat element): no proof holds
    result = svc.apply()
    assert svc.fake.reads == reads + 1 and result.added == result.deleted > 0
