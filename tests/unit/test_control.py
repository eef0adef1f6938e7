"""The daemon's control API (natctl.daemon.control) without root: the protocol on the fake kernel, its
errors next to the CLI's for the same input, and the real Daemon serving it on a Unix socket.

The kernel test (tests/kernel/test_control_kernel.py) runs it for real, with traffic flowing meanwhile.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Callable, Iterator

import pytest
from typer.testing import CliRunner

from natctl.cli.app import app
from natctl.config import Settings
from natctl.daemon import control
from natctl.daemon.control_client import Control, ControlError
from natctl.errors import NatctlError
from natctl.kernel.fake import FakeKernel
from natctl.model import PortRange
from natctl.plan import HOSTPORTS
from natctl.service import Service
from support.running import Running, free_udp_ports

RELAY = "198.18.0.1"


def ask(svc: Service, **req: object) -> dict:
    response, _ = control.handle(lambda: svc, json.dumps(req))
    return response


def ok(svc: Service, **req: object) -> object:
    response = ask(svc, **req)
    assert response["ok"], response
    return response["result"]


# --- the protocol, on the fake kernel


def test_lobbies_and_mappings_round_trip(svc):
    made = ok(svc, op="lobby.create", name="a", allow=["198.18.2.0/24"], ttl="4h", max_clients=8)
    assert set(made) == {"name", "id", "token", "allow", "ttl", "open", "relay"} and made["ttl"] == 4 * 3600
    m = ok(svc, op="map.add", lobby="a", host="198.18.1.2:27015", client="198.18.2.2:40001")
    assert m["client"] == "198.18.2.2:40001" and m["installed"] is True
    two = ok(svc, op="map.add", lobby="a", host="198.18.1.2:27015", client=["198.18.2.2:40002", "198.18.2.3:40002"])
    assert [r["client"] for r in two] == ["198.18.2.2:40002", "198.18.2.3:40002"]
    assert (HOSTPORTS, (m["host_port"],)) in {(e.set, e.key) for e in svc.fake.installed.elements}
    listed = ok(svc, op="map.list", lobby="a")
    assert sorted(r["client"] for r in listed) == ["198.18.2.2:40001", "198.18.2.2:40002", "198.18.2.3:40002"]
    assert ok(svc, op="map.remove", lobby="a", client="198.18.2.2:40001") == \
        {"lobby": "a", "client": "198.18.2.2:40001", "proto": "udp"}
    (lobby,) = ok(svc, op="lobby.list")
    assert lobby["name"] == "a" and lobby["clients"] == 2
    assert ok(svc, op="lobby.close", name="a") == {"name": "a", "id": made["id"]}
    assert ok(svc, op="lobby.list") == [] and len(ok(svc, op="lobby.list", all=True)) == 1
    assert not [e for e in svc.fake.installed.elements if e.set == HOSTPORTS]


def test_forwards_status_apply_cleanup(svc):
    assert ok(svc, op="forward.add", port=8080, to="198.18.1.2:80", ttl=60) == \
        {"port": 8080, "proto": "tcp", "to": "198.18.1.2:80", "ttl": 60}
    (fwd,) = ok(svc, op="forward.list")
    assert fwd["port"] == 8080 and fwd["installed"] is True
    status = ok(svc, op="status")
    assert set(status) == {"relay_ip", "backend", "lobbies", "mappings", "forwards", "failing_checks"}
    assert status["relay_ip"] == RELAY and len(status["forwards"]) == 1
    assert ok(svc, op="forward.remove", port="8080")["port"] == 8080
    assert ok(svc, op="apply")["added"] == 0
    assert set(ok(svc, op="cleanup")) >= {"lobbies", "forwards", "idle"}


def test_the_id_comes_back_and_reads_change_nothing(svc):
    response, changed = control.handle(lambda: svc, b'{"op": "lobby.list", "id": "x-1"}\n')
    assert response == {"id": "x-1", "ok": True, "result": []} and not changed
    _, changed = control.handle(lambda: svc, json.dumps({"op": "lobby.create", "name": "a"}))
    assert changed


@pytest.mark.parametrize("line, code, says", [
    (b"not json", 2, "the request is not JSON"),
    (b"[1, 2]", 2, "not a JSON object"),
    (b'{"name": "a"}', 2, "unknown op None"),
    (b'{"op": "lobby.explode"}', 2, "unknown op 'lobby.explode'"),
    (b'{"op": "lobby.create"}', 2, "lobby.create needs 'name'"),
    (b'{"op": "lobby.create", "name": "a", "color": "red"}', 2, "lobby.create has no field 'color'"),
    (b'{"op": "lobby.create", "name": "a", "open": "yes"}', 2, "invalid open 'yes'"),
    (b'{"op": "lobby.create", "name": ["a"]}', 2, "invalid name ['a']"),
    (b'{"op": "map.add", "lobby": "a", "host": "198.18.1.2:1", "client": []}', 2, "map.add needs 'client'"),
    (b'{"op": "lobby.close", "name": "nope"}', 3, "no open lobby named 'nope'"),
])
def test_malformed_requests_get_one_line_errors_with_exit_codes(svc, line, code, says):
    response, changed = control.handle(lambda: svc, line)
    assert response["ok"] is False and response["code"] == code and says in response["error"], response
    assert "\n" not in response["error"] and not changed


# --- the same errors as the CLI: each bad input through both, on one store and one fake kernel

CASES = [  # (CLI arguments, the same request)
    (["lobby", "create", "a", "--max-clients", "99999999999999999999"], {"op": "lobby.create", "name": "a",
                                                                          "max_clients": "99999999999999999999"}),
    (["lobby", "create", "a", "--max-clients", "0"], {"op": "lobby.create", "name": "a", "max_clients": 0}),
    (["lobby", "create", "a", "--ttl", "12x"], {"op": "lobby.create", "name": "a", "ttl": "12x"}),
    (["lobby", "create", "a", "--allow", "198.18.0.0/33"], {"op": "lobby.create", "name": "a", "allow": ["198.18.0.0/33"]}),
    (["lobby", "create", "bad name!"], {"op": "lobby.create", "name": "bad name!"}),
    (["lobby", "create", "taken"], {"op": "lobby.create", "name": "taken"}),
    (["lobby", "close", "nope"], {"op": "lobby.close", "name": "nope"}),
    (["map", "add", "--lobby", "nope", "--host", "198.18.1.2:27015", "--client", "198.18.2.2:1"],
     {"op": "map.add", "lobby": "nope", "host": "198.18.1.2:27015", "client": "198.18.2.2:1"}),
    (["map", "add", "--lobby", "taken", "--host", "198.18.1.2:99999", "--client", "198.18.2.2:1"],
     {"op": "map.add", "lobby": "taken", "host": "198.18.1.2:99999", "client": "198.18.2.2:1"}),
    (["map", "add", "--lobby", "taken", "--host", "198.18.1.2:27015", "--client", "198.18.2.2:1", "--proto", "sctp"],
     {"op": "map.add", "lobby": "taken", "host": "198.18.1.2:27015", "client": "198.18.2.2:1", "proto": "sctp"}),
    (["map", "remove", "--lobby", "taken", "--client", "198.18.2.2:9"],
     {"op": "map.remove", "lobby": "taken", "client": "198.18.2.2:9"}),
    (["forward", "add", "--port", "0", "--to", "198.18.1.2:80"], {"op": "forward.add", "port": 0, "to": "198.18.1.2:80"}),
    (["forward", "add", "--port", "80", "--to", "nowhere"], {"op": "forward.add", "port": 80, "to": "nowhere"}),
    (["forward", "remove", "81"], {"op": "forward.remove", "port": "81"}),
]


@pytest.fixture
def shared(tmp_path, monkeypatch) -> Iterator[tuple[Settings, FakeKernel]]:
    monkeypatch.setattr("natctl.sync.local_port_overlap", lambda ports: None)
    monkeypatch.setenv("NATCTL_CONFIG", "/nonexistent")
    kernel = FakeKernel()
    settings = Settings(state=str(tmp_path / "s.db"), relay_ip=RELAY, ports=PortRange(20000, 20009))
    svc = Service(settings, kernel_factory=lambda: kernel)
    svc.lobby_create("taken")
    svc.close()
    yield settings, kernel


def cli_error(settings: Settings, kernel: FakeKernel, args: list[str]) -> tuple[int, str]:
    """(exit code, message) as `natctl` prints them: natctl.cli.main turns a NatctlError into both."""
    result = CliRunner().invoke(app, ["--state", settings.state, "--relay-ip", RELAY, "--ports", "20000-20009", *args],
                                obj={"kernel_factory": lambda: kernel})
    err = result.exception
    assert isinstance(err, NatctlError), (args, result.output, err)
    return err.exit_code, str(err)


@pytest.mark.parametrize("args, req", CASES, ids=[" ".join(a[:2]) + f"-{i}" for i, (a, _) in enumerate(CASES)])
def test_errors_are_the_clis(shared, args, req):
    settings, kernel = shared
    expected = cli_error(settings, kernel, args)
    svc = Service(settings, kernel_factory=lambda: kernel)
    try:
        response, _ = control.handle(lambda: svc, json.dumps(req))
    finally:
        svc.close()
    assert (response["code"], response["error"]) == expected


# --- the real Daemon, serving its socket (fake kernel, loopback)


@pytest.fixture
def served(tmp_path, monkeypatch) -> Iterator[tuple[Callable[[], Service], Settings, FakeKernel]]:
    monkeypatch.setattr("natctl.sync.local_port_overlap", lambda ports: None)
    base = free_udp_ports(11)
    kernel = FakeKernel()
    settings = Settings(state=str(tmp_path / "s.db"), relay_ip="127.0.0.1", ports=PortRange(base + 1, base + 10),
                        registration_port=base, cleanup_interval=3600)
    yield (lambda: Service(settings, kernel_factory=lambda: kernel)), settings, kernel


def connect(path: str, seconds: float = 5.0) -> Control:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return Control(path)
        except NatctlError:
            assert time.monotonic() < deadline, f"nothing listens on {path}"
            time.sleep(0.02)


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def test_the_daemon_serves_its_socket_root_only_and_listens_on_new_host_ports(served):
    make, settings, kernel = served
    path = settings.state + ".sock"
    with Running(make), connect(path) as ctl:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_ISSOCK(os.stat(path).st_mode)
        token = ctl.call("lobby.create", name="a", open=True)["token"]
        assert len(token) > 20
        m = ctl.call("map.add", lobby="a", host="198.18.1.2:40000", client="198.18.2.2:40001")
        assert any(e.set == HOSTPORTS and e.key == (m["host_port"],) for e in kernel.installed.elements)
        deadline = time.monotonic() + 2  # the daemon opens the new host port's listener right after the change
        while not _listening(m["host_port"]):
            assert time.monotonic() < deadline, "the daemon did not listen on the new lobby's host port"
            time.sleep(0.02)
        with pytest.raises(ControlError) as refused:
            ctl.call("lobby.create", name="a")
        assert refused.value.exit_code == 4 and "already open" in str(refused.value)
        # Pipelined: answers in order, one per request.
        replies = ctl.many([{"op": "lobby.create", "name": f"p{i}", "id": i} for i in range(50)]
                           + [{"op": "lobby.close", "name": f"p{i}", "id": 50 + i} for i in range(50)])
        assert [r["id"] for r in replies] == list(range(100)) and all(r["ok"] for r in replies)
        ctl.call("lobby.close", name="a")
        deadline = time.monotonic() + 2
        while _listening(m["host_port"]):
            assert time.monotonic() < deadline, "the daemon still listens on a closed lobby's host port"
            time.sleep(0.02)
    assert not os.path.exists(path)  # removed when the daemon stops
    svc = make()
    assert [lb.name for lb in svc.lobbies(include_closed=True) if lb.closed is None] == []
    svc.close()


def test_a_stale_socket_is_replaced_and_a_live_one_left_alone(served, tmp_path):
    make, settings, _ = served
    path = settings.state + ".sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)  # a killed daemon's: bound, nobody listening
    stale.close()
    with Running(make), connect(path) as ctl:
        assert ctl.call("lobby.list") == []
    # Someone else listens there: the daemon runs without its socket, and leaves theirs alone.
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(path)
    other.listen(1)
    try:
        with Running(make):
            time.sleep(0.3)
            assert os.path.exists(path)
            conn = Control(path)  # reaches the other listener, not the daemon
            other.settimeout(2)
            peer, _ = other.accept()
            peer.close()
            conn.close()
    finally:
        other.close()
        os.unlink(path)


def test_control_socket_off_and_elsewhere(served, tmp_path):
    make, settings, kernel = served
    assert control.socket_path(settings) == settings.state + ".sock"
    assert control.socket_path(Settings(state=settings.state, control_socket="off")) is None
    elsewhere = str(tmp_path / "ctl" / "natctl.sock")
    moved = Settings(**{**settings.__dict__, "control_socket": elsewhere})
    with Running(lambda: Service(moved, kernel_factory=lambda: kernel)), connect(elsewhere) as ctl:
        assert ctl.call("status")["relay_ip"] == "127.0.0.1"
    assert not os.path.exists(settings.state + ".sock")


# --- the CLI hands its changes to a running daemon of the same store and settings, transparently


@pytest.fixture
def cli_and_daemon(served, monkeypatch):
    """The CLI of the served store; making a change itself (the real kernel) fails the test."""
    make, settings, kernel = served

    def no_kernel(*args: object, **kw: object) -> None:
        raise AssertionError("the CLI made the change itself instead of the daemon")

    monkeypatch.setattr("natctl.kernel.accel.select", no_kernel)
    monkeypatch.setenv("NATCTL_CONFIG", "/nonexistent")
    monkeypatch.setenv("NATCTL_REGISTRATION_PORT", str(settings.registration_port))
    base = ["--state", settings.state, "--relay-ip", "127.0.0.1", "--ports", f"{settings.ports.low}-{settings.ports.high}"]

    def natctl(capsys, *args: str) -> str:
        from natctl.cli import command

        capsys.readouterr()
        command().main([*base, *args], prog_name="natctl", standalone_mode=False)
        return capsys.readouterr().out

    with Running(make):
        connect(settings.state + ".sock").close()
        yield natctl, make, settings, kernel


def test_the_cli_changes_through_the_daemon_with_the_same_output_and_errors(cli_and_daemon, capsys):
    natctl, make, settings, kernel = cli_and_daemon
    out = natctl(capsys, "lobby", "create", "a", "--open")
    assert out.startswith("lobby a created (id 1); token: ") and len(out.split()[-1]) > 20
    made = json.loads(natctl(capsys, "map", "add", "--lobby", "a", "--host", "198.18.1.2:27015", "--client",
                             "198.18.2.2:40001", "--json"))
    assert made["client"] == "198.18.2.2:40001" and made["installed"] is True and made["relay_ip"] == "127.0.0.1"
    assert any(e.set == HOSTPORTS and e.key == (made["host_port"],) for e in kernel.installed.elements)
    out = natctl(capsys, "map", "add", "--lobby", "a", "--host", "198.18.1.2:27015", "--client", "198.18.2.3:40001")
    port = settings.ports.low + 1  # the second client port of that host (the first went to 198.18.2.2)
    assert out == (f"udp 198.18.2.3:40001 -> 127.0.0.1:{made['host_port']} reaches host 198.18.1.2:27015; "
                   f"the host sees it as 127.0.0.1:{port}\nhost_port {made['host_port']} client_port {port}\n")
    with pytest.raises(ControlError) as refused:  # natctl.cli.main prints it and exits with its code
        natctl(capsys, "lobby", "create", "a")
    assert (refused.value.exit_code, str(refused.value)) == (4, "a lobby named 'a' is already open: "
                                                                "pick another name or close it first")
    with pytest.raises(ControlError) as refused:
        natctl(capsys, "lobby", "create", "b", "--max-clients", "0")
    assert refused.value.exit_code == 2 and "--max-clients" in str(refused.value)
    assert natctl(capsys, "map", "remove", "--lobby", "a", "--client", "198.18.2.2:40001") == \
        "removed udp client 198.18.2.2:40001 from lobby a\n"
    assert natctl(capsys, "forward", "add", "--port", "8080", "--to", "198.18.1.2:80", "--ttl", "1h") == \
        "forwarding tcp port 8080 to 198.18.1.2:80 for 1h\n"
    assert natctl(capsys, "forward", "remove", "8080") == "removed forward of port 8080\n"
    assert natctl(capsys, "lobby", "close", "a") == "lobby a closed\n"
    svc = make()
    assert [lb.name for lb in svc.lobbies()] == [] and svc.forwards() == []
    svc.close()


def test_the_cli_makes_the_change_itself_when_the_daemon_differs_or_for_no_apply(cli_and_daemon, capsys):
    from natctl.daemon.control_client import through_daemon

    natctl, make, settings, kernel = cli_and_daemon
    other = Settings(**{**settings.__dict__, "ports": PortRange(settings.ports.low, settings.ports.high - 1)})
    assert through_daemon(other, "lobby.create", {"name": "x"}) == (False, None)  # other ports: not the daemon's job
    gone = Settings(**{**settings.__dict__, "state": settings.state + ".other"})
    assert through_daemon(gone, "lobby.create", {"name": "x"}) == (False, None)  # no socket there
    assert natctl(capsys, "lobby", "create", "y", "--no-apply").startswith("lobby y created")  # the store only
    svc = make()
    assert [lb.name for lb in svc.lobbies()] == ["y"]
    svc.close()


def test_through_the_daemon_the_cli_imports_no_service_store_or_kernel(cli_and_daemon):
    """What `natctl map add` costs a script while the daemon runs: typer and natctl's parsers, no more."""
    import subprocess
    import sys

    _, make, settings, _ = cli_and_daemon
    svc = make()
    svc.lobby_create("a", open_=True)
    svc.close()
    code = ("import sys\n"
            "class Guard:  # the direct path starts with natctl.service: it must not be taken here\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'natctl.service':\n"
            "            raise SystemExit('the CLI made the change itself')\n"
            "sys.meta_path.insert(0, Guard())\n"
            "from natctl.cli import main\n"
            "main()\n")
    argv = ["--state", settings.state, "--relay-ip", "127.0.0.1", "--ports", f"{settings.ports.low}-{settings.ports.high}",
            "map", "add", "--lobby", "a", "--host", "198.18.1.2:27015", "--client", "198.18.2.2:40001"]
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *argv], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "NATCTL_CONFIG": "/nonexistent",
                                           "NATCTL_REGISTRATION_PORT": str(settings.registration_port)})
    assert proc.returncode == 0 and "reaches host 198.18.1.2:27015" in proc.stdout, proc.stderr[-2000:]
    modules = {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    heavy = {"natctl.service", "natctl.store", "natctl.sync", "natctl.plan", "sqlite3", "nftables", "pydantic", "rich",
             "pyroute2", "asyncio", "natctl.views"}
    assert modules & heavy == set()


def test_a_big_pipeline_is_answered_in_order_and_an_endless_line_hung_up(served):
    make, settings, _ = served
    path = settings.state + ".sock"
    with Running(make), connect(path) as ctl:
        # All sent before any answer is read: the daemon keeps reading while its answers wait.
        replies = ctl.many([{"op": "lobby.list", "id": i} for i in range(3000)])
        assert [r["id"] for r in replies] == list(range(3000)) and all(r["ok"] for r in replies)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as raw:
            raw.settimeout(5)
            raw.connect(path)
            chunk, hung_up = b"x" * (1 << 16), False
            for _ in range(40):  # 2.5 MiB without a newline: hung up on once past the 1 MiB limit
                try:
                    raw.sendall(chunk)
                except OSError:
                    hung_up = True
                    break
            assert hung_up
            answer = raw.recv(4096)
        assert b'"code": 2' in answer and b"longer than" in answer
        assert ctl.call("lobby.list") == []  # the others are served as before
