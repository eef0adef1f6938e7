"""The daemon's logic on the fake kernel, without root: real UDP sockets on loopback, no namespaces.

Registration, admission on a first packet (delivered once, installed in the
kernel), refusal (blocked in the kernel), the registration rate limit, and
registration v2 (OPEN, PUNCH, held packets).
The kernel tests (tests/kernel/test_daemon.py) run the same daemon for real.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest

from natctl.config import Settings
from natctl.daemon import metrics, wire
from natctl.kernel.fake import FakeKernel
from natctl.model import PortRange
from natctl.plan import DNAT, HOSTPORTS
from natctl.service import Service
from support.running import Running, free_udp_ports

TOKEN_WAIT = 2.0  # seconds any reply may take on a loaded CI machine


@pytest.fixture
def relay(tmp_path) -> Iterator[tuple[Callable[[], Service], FakeKernel, int]]:
    base = free_udp_ports(11)
    kernel = FakeKernel()
    settings = Settings(state=str(tmp_path / "s.db"), relay_ip="127.0.0.1", ports=PortRange(base + 1, base + 10),
                        registration_port=base, cleanup_interval=3600)
    yield (lambda: Service(settings, kernel_factory=lambda: kernel)), kernel, base


def udp() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(TOKEN_WAIT)
    return s


def register(sock: socket.socket, reg_port: int, token: str, nonce: int = 7, version: int = 1) -> tuple[str, int] | None:
    sock.sendto(wire.encode_request(token, nonce, version), ("127.0.0.1", reg_port))
    try:
        data, _ = sock.recvfrom(64)
    except TimeoutError:
        return None
    kind, got_nonce, body = wire.decode_reply(data)
    assert kind == wire.REGISTERED and got_nonce == nonce
    return body  # type: ignore[return-value]


def wait_for(what: str, cond, seconds: float = TOKEN_WAIT) -> None:
    deadline = time.monotonic() + seconds
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_register_admit_deliver_and_refuse(relay):
    make, kernel, reg_port = relay
    svc = make()
    _, token = svc.lobby_create("a", open_=True, max_clients=1)
    host, client, second = udp(), udp(), udp()
    with Running(make) as daemon:
        assert register(host, reg_port, "x" * 20) is None  # a wrong token gets no answer at all
        relay_ip, host_port = register(host, reg_port, token)
        assert relay_ip == "127.0.0.1" and (HOSTPORTS, (host_port,)) in {(e.set, e.key) for e in kernel.installed.elements}
        # A client's first packet: admitted, installed in the kernel, delivered to the host exactly once.
        wait_for("the host port's listener", lambda: _listening(host_port))
        client.sendto(b"hello host", ("127.0.0.1", host_port))
        wait_for("the delivery", lambda: daemon.sent)
        (client_port, to, data), = daemon.sent
        assert (to, data) == (f"127.0.0.1:{host.getsockname()[1]}", b"hello host")
        up = ("127.0.0.1", "udp", client.getsockname()[1], host_port)
        assert any(e.set == DNAT and e.key == up for e in kernel.installed.elements)
        # The lobby is full (one client): the next sender is refused and blocked in the kernel, nothing delivered.
        second.sendto(b"me too", ("127.0.0.1", host_port))
        wait_for("the block", lambda: kernel.blocked)
        assert kernel.blocked == [("127.0.0.1", host_port)] and len(daemon.sent) == 1
    assert [m.client for m in svc.mappings()] == [f"127.0.0.1:{client.getsockname()[1]}"]
    svc.close()
    for s in (host, client, second):
        s.close()


def test_registration_is_rate_limited_per_source(relay):
    make, _, reg_port = relay
    svc = make()
    _, token = svc.lobby_create("a", open_=True)
    svc.close()
    host = udp()
    host.settimeout(0.3)
    before = metrics.REGISTRATION_REJECTS.labels("rate")._value.get()
    with Running(make):
        answered = sum(register(host, reg_port, token, nonce=i) is not None for i in range(16))
    # A burst of 10, then 2 a second: the rest are dropped without an answer, and counted.
    assert 10 <= answered <= 12
    assert metrics.REGISTRATION_REJECTS.labels("rate")._value.get() - before >= 4
    host.close()


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def test_a_flood_of_refusals_writes_two_lines_per_interval():
    from natctl.daemon.log import Repeats

    lines: list[tuple[str, dict]] = []
    repeats = Repeats(interval=10, write=lambda event, **f: lines.append((event, f)))
    for i in range(100_000):  # 100,000 wrong tokens from as many sources within 5 s
        repeats.note(i * 0.00005, "registration_refused", source=f"198.18.{i % 250}.{i % 200}:{i}")
    repeats.note(4.0, "rejected", source="198.18.9.9:1")
    repeats.flush(11.0)
    assert [e for e, _ in lines] == ["registration_refused", "rejected", "registration_refused_repeated"]
    assert lines[-1][1]["count"] == 99_999
    repeats.note(12.0, "registration_refused", source="198.18.1.1:1")  # a new interval logs again
    assert len(lines) == 4


def test_replies_leave_from_the_address_the_host_sent_to(tmp_path):
    """The relay IP is a second address (127.0.0.2 on lo, like a VPS's floating IP): the answer must come
    from it, not from the address the kernel would pick for 0.0.0.0 (127.0.0.1 here), or a NAT drops it."""
    base = free_udp_ports(11)
    kernel = FakeKernel()
    settings = Settings(state=str(tmp_path / "s.db"), relay_ip="127.0.0.2", ports=PortRange(base + 1, base + 10),
                        registration_port=base, cleanup_interval=3600)
    svc = Service(settings, kernel_factory=lambda: kernel)
    _, token = svc.lobby_create("a", open_=True)
    svc.close()
    host = udp()
    with Running(lambda: Service(settings, kernel_factory=lambda: kernel)):
        host.sendto(wire.encode_request(token, 9), ("127.0.0.2", base))
        data, source = host.recvfrom(64)
    assert source == ("127.0.0.2", base) and wire.decode_reply(data)[2][0] == "127.0.0.2"
    host.close()


def _open_for(host: socket.socket, reg_port: int) -> tuple[int, int]:
    """The next OPEN the host's game socket receives from the registration port: (ticket, client port)."""
    while True:
        data, src = host.recvfrom(64)
        if src == ("127.0.0.1", reg_port) and len(data) == wire.OPEN_SIZE:
            return wire.decode_open(data)


def test_v2_a_client_waits_for_the_hosts_punch_and_strangers_punch_in_vain(relay):
    make, kernel, reg_port = relay
    svc = make()
    _, token = svc.lobby_create("a", open_=True)
    host, client, natted = udp(), udp(), udp()  # natted: the host's game socket as a symmetric NAT shows it
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind(("127.0.0.2", 0))
    rejects = {r: metrics.PUNCH_REJECTS.labels(r)._value.get() for r in ("unknown_ticket", "wrong_source", "malformed")}
    with Running(make) as daemon:
        _, host_port = register(host, reg_port, token, version=2)
        wait_for("the host port's listener", lambda: _listening(host_port))
        for i in range(3):
            client.sendto(b"early %d" % i, ("127.0.0.1", host_port))
        ticket, client_port = _open_for(host, reg_port)
        time.sleep(0.1)
        assert not daemon.sent and not any(e.set == DNAT for e in kernel.installed.elements)  # held, not forwarded
        relay_port = ("127.0.0.1", client_port)
        host.sendto(wire.encode_punch(ticket ^ 1), relay_port)  # a wrong ticket
        stranger.sendto(wire.encode_punch(ticket), relay_port)  # the right ticket from another address
        host.sendto(b"NATC junk", relay_port)
        wait_for("the rejections", lambda: metrics.PUNCH_REJECTS.labels("malformed")._value.get()
                 > rejects["malformed"])
        assert not daemon.sent
        natted.sendto(wire.encode_punch(ticket), relay_port)
        wait_for("the held packets", lambda: len(daemon.sent) == 3)
        seen = f"127.0.0.1:{natted.getsockname()[1]}"
        assert daemon.sent == [(client_port, seen, b"early %d" % i) for i in range(3)]
        up = ("127.0.0.1", "udp", client.getsockname()[1], host_port)
        assert {e.key: e.value for e in kernel.installed.elements if e.set == DNAT}[up] == (
            "127.0.0.1", natted.getsockname()[1])
        host.sendto(wire.encode_punch(ticket), relay_port)  # late: the ticket is spent
        time.sleep(0.1)
        assert len(daemon.sent) == 3
    for reason in rejects:
        assert metrics.PUNCH_REJECTS.labels(reason)._value.get() > rejects[reason], reason
    svc.close()
    for s in (host, client, natted, stranger):
        s.close()


def test_v2_a_host_that_never_answers_gets_its_client_with_its_registered_address(relay):
    from natctl.daemon.punch import GIVE_UP

    make, kernel, reg_port = relay
    svc = make()
    _, token = svc.lobby_create("a", open_=True)
    host, client = udp(), udp()
    unanswered = metrics.PUNCHES.labels("unanswered")._value.get()
    with Running(make) as daemon:
        _, host_port = register(host, reg_port, token, version=2)
        wait_for("the host port's listener", lambda: _listening(host_port))
        client.sendto(b"anyone?", ("127.0.0.1", host_port))
        wait_for("the give-up", lambda: daemon.sent, GIVE_UP + TOKEN_WAIT)
        opens = 0
        host.settimeout(0.1)
        try:
            while host.recvfrom(64):
                opens += 1
        except TimeoutError:
            pass
    assert daemon.sent == [(daemon.sent[0][0], f"127.0.0.1:{host.getsockname()[1]}", b"anyone?")]
    assert opens == 3 and metrics.PUNCHES.labels("unanswered")._value.get() == unanswered + 1
    up = ("127.0.0.1", "udp", client.getsockname()[1], host_port)
    assert {e.key: e.value for e in kernel.installed.elements if e.set == DNAT}[up] == (
        "127.0.0.1", host.getsockname()[1])
    svc.close()
    for s in (host, client):
        s.close()


def test_v2_reference_client_answers_opens_and_ignores_game_traffic(relay):
    from natctl.daemon.client import HostSession

    make, kernel, reg_port = relay
    svc = make()
    _, token = svc.lobby_create("a", open_=True)
    host, client = udp(), udp()
    with Running(make) as daemon:
        session = HostSession(host, ("127.0.0.1", reg_port), token)
        _, host_port = session.register()
        wait_for("the host port's listener", lambda: _listening(host_port))
        client.sendto(b"join", ("127.0.0.1", host_port))
        data, src = host.recvfrom(64)
        assert session.handle(data, src) and session.punched == 1
        assert not session.handle(b"NATC game bytes", ("127.0.0.1", host_port))  # from a relay port: the game's
        wait_for("the held packet", lambda: daemon.sent)
        assert daemon.sent[0][1:] == (f"127.0.0.1:{host.getsockname()[1]}", b"join")
    svc.close()
    for s in (host, client):
        s.close()
