"""The lab's home routers behave as the NAT kinds they are named after (RFC 4787).

A machine behind each router sends one datagram to relay:9000; then the relay
and a stranger try to reach the external address it was given.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from natctl.lab import topology
from natctl.lab.netns import entered
from natctl.lab.traffic import udp_socket

pytestmark = pytest.mark.kernel

KINDS = topology.NAT_KINDS
# Which senders get in, per kind: (relay, same port) (relay, other port) (stranger)
GETS_IN = {
    topology.FULL_CONE: (True, True, True),
    topology.ADDRESS_RESTRICTED: (True, True, False),
    topology.PORT_RESTRICTED: (True, False, False),
    topology.SYMMETRIC: (True, False, False),
}


@pytest.fixture(scope="module")
def natlab() -> Iterator[topology.Lab]:
    sites = {f"r-{kind}": [f"m-{kind}"] for kind in KINDS} | {"elsewhere": ["stranger"]}
    lab = topology.build(sites, nat={f"r-{kind}": kind for kind in KINDS})
    try:
        yield lab
    finally:
        lab.teardown()


def _seen(lab: topology.Lab, member: str, dest_port: int) -> tuple[str, int]:
    """The external address the relay sees for ``member``'s socket 27015 sending to ``dest_port``."""
    with entered(lab.relay_ns):
        import socket

        probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with probe, udp_socket(lab.ns(member), port=27015) as s:
        probe.bind((lab.relay_ip, dest_port))
        probe.settimeout(2)
        s.sendto(b"out", (lab.relay_ip, dest_port))
        data, src = probe.recvfrom(100)
        assert data == b"out"
        return src


@pytest.mark.parametrize("kind", KINDS)
def test_router_filters_as_its_kind(natlab: topology.Lab, kind: str) -> None:
    member = f"m-{kind}"
    host = udp_socket(natlab.ns(member), port=27015)
    senders = [udp_socket(natlab.relay_ns, natlab.relay_ip, 9000), udp_socket(natlab.relay_ns, natlab.relay_ip, 9001),
               udp_socket(natlab.ns("stranger"), port=9000)]
    try:
        host.sendto(b"open", (natlab.relay_ip, 9000))
        data, external = senders[0].recvfrom(100)
        assert data == b"open"
        got = []
        for n, s in enumerate(senders):
            s.sendto(b"in%d" % n, external)
            host.settimeout(0.5)
            try:
                got.append(host.recvfrom(100)[0] == b"in%d" % n)
            except TimeoutError:
                got.append(False)
        assert tuple(got) == GETS_IN[kind]
    finally:
        for s in [host, *senders]:
            s.close()


@pytest.mark.parametrize("kind", KINDS)
def test_mapping_per_destination_only_when_symmetric(natlab: topology.Lab, kind: str) -> None:
    a, b = _seen(natlab, f"m-{kind}", 9100), _seen(natlab, f"m-{kind}", 9101)
    assert a[0] == b[0] == natlab.members[f"m-{kind}"].public_ip
    if kind == topology.SYMMETRIC:
        assert a[1] != b[1]
    else:
        assert a[1] == b[1] == 27015
