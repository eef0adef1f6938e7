"""Port allocation invariants, checked with hypothesis."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natctl.alloc import Allocator
from natctl.errors import Exhausted
from natctl.model import Endpoint, PortRange

hosts = st.integers(0, 5).map(lambda i: Endpoint(f"198.18.1.{i + 2}", 27015))
ops = st.lists(st.tuples(st.sampled_from(["host", "client", "free"]), hosts, st.integers(0, 1000)), max_size=120)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_no_two_live_mappings_share_a_key(operations):
    rng = PortRange(20000, 20040)
    alloc = Allocator(rng, reserved=[20007])
    host_port: dict[Endpoint, int] = {}
    clients: list[tuple[Endpoint, int]] = []
    for op, host, pick in operations:
        try:
            if op == "host" and host not in host_port:
                host_port[host] = alloc.host_port()
            elif op == "client":
                clients.append((host, alloc.client_port(host)))
            elif op == "free" and clients:
                # A removed client frees its port when the next change builds the allocator from the store.
                clients.pop(pick % len(clients))
                alloc = Allocator(rng, host_port.values(), clients, reserved=[20007])
        except Exhausted as err:
            assert str(rng) in str(err)
        # Forward keys (dport = host port) unique per relay IP; reverse keys (host, client port) unique.
        assert len(set(host_port.values())) == len(host_port)
        assert len(set(clients)) == len(clients)
        every_port = list(host_port.values()) + [p for _, p in clients]
        assert all(p in rng and p != 20007 for p in every_port)
        # A host port is never also a client port: an unknown sender's packet is never taken for a reply.
        assert not set(host_port.values()) & {p for _, p in clients}


def test_client_ports_reused_across_hosts():
    alloc = Allocator(PortRange(20000, 29999))
    a, b = Endpoint("198.18.1.2", 1), Endpoint("198.18.1.3", 1)
    assert alloc.client_port(a) == alloc.client_port(b) == 20000
    assert alloc.client_port(a) == 20001


def test_freed_ports_come_back():
    alloc = Allocator(PortRange(20000, 20002))
    h = Endpoint("198.18.1.2", 1)
    ports = [alloc.client_port(h) for _ in range(3)]
    with pytest.raises(Exhausted, match="20000-20002"):
        alloc.client_port(h)
    alloc = Allocator(PortRange(20000, 20002), (), [(h, ports[0]), (h, ports[2])])  # as the store has them now
    assert alloc.client_port(h) == ports[1]


def test_host_ports_exhaust_with_a_clear_error():
    alloc = Allocator(PortRange(20000, 20001))
    assert {alloc.host_port(), alloc.host_port()} == {20000, 20001}
    with pytest.raises(Exhausted, match="no free host relay port in 20000-20001"):
        alloc.host_port()
    assert Allocator(PortRange(20000, 20001), [20000]).host_port() == 20001
