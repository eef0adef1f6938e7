"""`natctl map add/remove --from FILE`: a file of mappings in one store transaction and one kernel change.

Over the fake kernel (it logs one script a change): 2,000 lines of 40 lobbies in one change, lobbies made on
the way, JSON lines, standard input, removal from the same file, and a bad line that refuses the whole file
with its number, the store and the kernel left as they were.
"""

import json
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from natctl import plan as planner
from natctl.cli.app import app
from natctl.config import Settings
from natctl.errors import Conflict, Exhausted, NatctlError, NotFound, UsageError
from natctl.kernel.fake import FakeKernel
from natctl.model import Endpoint, PortRange, check_unicast, ipv4_int, parse_mapping_line
from natctl.service import Service

RELAY = "198.18.0.1"
PORTS = "20000-29999"


@pytest.fixture
def relay(tmp_path, monkeypatch):
    """As conftest's ``svc`` (a Service over the fake kernel), with a port range that holds 2,000 lobbies."""
    monkeypatch.setattr("natctl.sync.local_port_overlap", lambda ports: None)
    monkeypatch.setenv("NATCTL_CONFIG", "/nonexistent")
    kernel = FakeKernel()
    settings = Settings(state=str(tmp_path / "s.db"), relay_ip=RELAY, ports=PortRange(20000, 29999))
    s = Service(settings, kernel_factory=lambda: kernel)
    s.fake = kernel
    yield s
    s.close()


def mapping_lines(lobbies: int, per: int, proto: str = "") -> list[str]:
    out = []
    for j in range(lobbies):
        host = f"198.18.{1 + j // 200}.{1 + j % 200}:27015"
        out += [f"l{j} {host} 198.19.{j % 250}.{1 + k}:{40000 + j} {proto}".rstrip() for k in range(per)]
    return out


def cli(svc, *args, stdin=None, code=0):
    """natctl's command line on the fake kernel: (exit code, what it printed), a NatctlError as main() prints it."""
    result = CliRunner().invoke(app, ["--state", svc.settings.state, "--relay-ip", RELAY, "--ports", PORTS,
                                            *args], input=stdin, obj={"kernel_factory": lambda: svc.fake})
    exit_code, output = result.exit_code, result.output
    if isinstance(result.exception, NatctlError):
        exit_code, output = result.exception.exit_code, f"natctl: error: {result.exception}\n"
    assert exit_code == code, (output, result.exception)
    return SimpleNamespace(output=output)


def state(svc):
    """Everything a refused file must leave as it was: rows, and the kernel's elements and log."""
    db = svc.store.db
    rows = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in ("lobbies", "hosts", "clients")}
    return ({t: [tuple(r) for r in v] for t, v in rows.items()}, set(svc.fake.installed.elements),
            len(svc.fake.scripts))


def test_a_file_of_2000_mappings_in_40_lobbies_is_one_kernel_change(relay, tmp_path):
    for j in range(40):
        relay.lobby_create(f"l{j}")
    path = tmp_path / "m.txt"
    path.write_text("# lobby host client\n\n" + "\n".join(mapping_lines(40, 50)) + "\n")
    before = len(relay.fake.scripts)
    out = cli(relay, "map", "add", "--from", str(path))
    assert "added 2000 mappings" in out.output
    assert len(relay.fake.scripts) == before + 1  # one kernel change for the whole file
    maps = relay.mappings()
    assert len(maps) == 2000
    assert len({m.host_port for m in maps}) == 40
    # the same ports the single-mapping path gives: host ports from the top, client ports from the bottom
    first = [m for m in maps if m.lobby == "l0"]
    assert {m.client_port for m in first} == set(range(20000, 20050))
    assert relay.store.generation() == relay.fake.gen  # the kernel mirrors the store
    assert relay.apply().added == 0 and relay.apply().deleted == 0  # a full reconcile finds nothing to do


def test_json_lines_and_create_lobbies(relay, tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("\n".join(mapping_lines(3, 4, "tcp")) + "\n")
    out = cli(relay, "map", "add", "--from", str(path), "--create-lobbies", "--json")
    rows = [json.loads(line) for line in out.output.splitlines()]
    assert len(rows) == 12 and [r["lobby"] for r in rows] == ["l0"] * 4 + ["l1"] * 4 + ["l2"] * 4
    single = cli(relay, "map", "add", "--lobby", "l0", "--host", rows[0]["host"], "--client", "198.19.9.9:1",
                 "--proto", "tcp", "--json")
    assert set(rows[0]) == set(json.loads(single.output))  # the keys of 'map add --json'
    assert rows[0]["proto"] == "tcp" and rows[0]["installed"] is True
    assert {lb.name for lb in relay.lobbies()} == {"l0", "l1", "l2"}
    assert sorted((m.lobby, m.client, m.client_port) for m in relay.mappings() if m.client != "198.19.9.9:1") == \
        sorted((r["lobby"], r["client"], r["client_port"]) for r in rows)


def test_unknown_lobby_needs_create_lobbies(relay, tmp_path):
    path = tmp_path / "m.txt"
    path.write_text("\n".join(mapping_lines(2, 2)) + "\n")
    relay.lobby_create("l0")
    before = state(relay)
    out = cli(relay, "map", "add", "--from", str(path), code=NotFound.exit_code)
    assert "natctl: error: line 3: no open lobby named 'l1'" in out.output
    assert state(relay) == before


@pytest.mark.parametrize("bad, error, code", [
    ("l3 198.18.1.4:27015 198.19.3.1", "line 1500: invalid address '198.19.3.1'", UsageError.exit_code),
    ("l3 198.18.1.4:27015 198.19.3.1:99999", "line 1500: invalid port '99999'", UsageError.exit_code),
    ("l3 198.18.1.4:27015 198.19.3.1:5 sctp", "line 1500: invalid protocol 'sctp'", UsageError.exit_code),
    ("l3 198.18.1.4:27015", "line 1500: expected 'LOBBY HOST_IP:PORT CLIENT_IP:PORT [udp|tcp]'",
     UsageError.exit_code),
    ("l3 198.18.1.4:27015 127.0.0.1:5", "line 1500: client 127.0.0.1 is not an address", UsageError.exit_code),
    ("l3 198.18.1.4:27015 198.18.0.1:5", "line 1500: client 198.18.0.1 is the relay's own address",
     UsageError.exit_code),
    ("l3 198.18.1.4:27015 198.19.3.1:40003", "line 1500: udp client 198.19.3.1:40003 is already mapped in lobby "
     "'l3' (client port 20000)", Conflict.exit_code),
    ("l3 198.18.1.4:27015 198.18.1.4:27015", "line 1500: client 198.18.1.4:27015 is the lobby's host",
     Conflict.exit_code),
    ("l3 198.18.1.9:27015 198.19.3.1:5", "line 1500: lobby 'l3' already has host 198.18.1.4:27015 (line 151)",
     Conflict.exit_code),
    ("nope 198.18.1.4:27015 198.19.3.1:5", "line 1500: 198.18.1.4:27015 already hosts another lobby",
     Conflict.exit_code),
])
def test_a_bad_line_refuses_the_whole_file(relay, tmp_path, bad, error, code):
    lines = mapping_lines(40, 50)
    lines.insert(1499, bad)  # line 1,500; the lines around it are good
    for j in range(40):
        relay.lobby_create(f"l{j}")
    relay.lobby_create("nope")
    relay.map_add("l39", Endpoint("198.18.1.40", 27015), [Endpoint("198.19.39.1", 40039)])  # in store and kernel
    path = tmp_path / "m.txt"
    path.write_text("\n".join(lines) + "\n")
    before = state(relay)
    out = cli(relay, "map", "add", "--from", str(path), code=code)
    assert f"natctl: error: {error}" in out.output, out.output
    assert len(out.output.strip().splitlines()) == 1
    assert state(relay) == before  # store and kernel as they were


def test_the_file_meets_the_lobby_as_it_is(relay, tmp_path):
    """Existing mappings count: a duplicate of one is refused, a full lobby refuses more, ports run out."""
    relay.lobby_create("a", max_clients=3)
    relay.map_add("a", Endpoint("198.18.1.1", 27015), [Endpoint("198.19.0.1", 5)])
    path = tmp_path / "m.txt"
    path.write_text("a 198.18.1.1:27015 198.19.0.1:5\n")
    assert "line 1: udp client 198.19.0.1:5 is already mapped in lobby 'a' (client port 29999)" not in \
        cli(relay, "map", "add", "--from", str(path), code=Conflict.exit_code).output  # not the host port
    path.write_text("a 198.18.1.1:27015 198.19.0.2:5\na 198.18.1.1:27015 198.19.0.3:5\n"
                    "a 198.18.1.1:27015 198.19.0.4:5 # the fourth\n")
    out = cli(relay, "map", "add", "--from", str(path), code=Conflict.exit_code)
    assert "line 3: lobby 'a' is full (3 clients)" in out.output
    assert len(relay.mappings()) == 1


def test_ports_run_out_with_the_line_that_needs_one(relay, tmp_path):
    relay.settings = relay.rec.settings = Settings(state=relay.settings.state, relay_ip=RELAY,
                                                   ports=PortRange(20000, 20002))
    path = tmp_path / "m.txt"
    path.write_text("a 198.18.1.1:27015 198.19.0.1:5\nb 198.18.1.2:27015 198.19.0.1:5\n"
                    "c 198.18.1.3:27015 198.19.0.1:5\n")
    from natctl.lobbies import Lobbies

    with pytest.raises(Exhausted, match="^line 3: no free host relay port"):
        list(Lobbies(relay.rec).map_file((parse_mapping_line(t, n) for n, t in
                                          enumerate(path.read_text().splitlines(), 1)), create_lobbies=True))
    assert relay.lobbies() == [] and relay.fake.scripts == []


def test_stdin_and_remove_from_the_same_file(relay):
    text = "\n".join(mapping_lines(5, 10)) + "\n"
    cli(relay, "map", "add", "--from", "-", "--create-lobbies", stdin=text)
    relay.lobby_create("other")
    relay.map_add("other", Endpoint("198.18.9.9", 1), [Endpoint("198.19.9.9", 1)])
    assert len(relay.mappings()) == 51
    before = len(relay.fake.scripts)
    out = cli(relay, "map", "remove", "--from", "-", stdin=text)
    assert "removed 50 mappings from standard input" in out.output
    assert len(relay.fake.scripts) == before + 1
    assert [m.lobby for m in relay.mappings()] == ["other"]
    # the lobbies stay open with their hosts, as after 'map remove'; only their mappings left the kernel
    assert relay.fake.installed.elements == planner.plan(relay.store.snapshot(RELAY), None, relay.fake.owns)
    assert {e.comment for e in relay.fake.installed.elements if e.set == planner.DNAT} == {"lobby other"}
    # a mapping that is not there (any more) refuses the file, with its line
    out = cli(relay, "map", "remove", "--from", "-", stdin="other 198.18.9.9:1 198.19.9.9:1\n"
              "other 198.18.9.9:1 198.19.9.9:1\n", code=NotFound.exit_code)
    assert "line 2: no udp client 198.19.9.9:1 in lobby 'other'" in out.output
    assert len(relay.mappings()) == 1


def test_options_exclude_each_other(relay):
    out = cli(relay, "map", "add", "--from", "-", "--lobby", "a", stdin="", code=UsageError.exit_code)
    assert "--lobby and --from exclude each other" in out.output
    out = cli(relay, "map", "add", "--lobby", "a", code=UsageError.exit_code)
    assert "missing option --host" in out.output
    out = cli(relay, "map", "add", "--from", "/nonexistent/m.txt", code=UsageError.exit_code)
    assert "cannot read /nonexistent/m.txt" in out.output


def test_the_line_parser_reads_what_the_single_parsers_read():
    assert parse_mapping_line("  # only a comment") is None and parse_mapping_line("") is None
    assert parse_mapping_line("a 1.2.3.4:5 6.7.8.9:10 tcp # x", 7) == (7, "a", 0x01020304, 5, 0x06070809, 10, "tcp")
    for ip in ("1.2.3.4", "255.255.255.255", "0.0.0.0", "01.2.3.4", "1.2.3", "1.2.3.4.5", "256.1.1.1", "١.2.3.4",
               "1.2.3.-4", "1..3.4", "+1.2.3.4"):
        try:
            want = int(__import__("ipaddress").IPv4Address(ip))
        except ValueError:
            with pytest.raises(UsageError, match="invalid IPv4 address"):
                ipv4_int(ip)
        else:
            assert ipv4_int(ip) == want
    with pytest.raises(UsageError, match="is not an address"):
        check_unicast("224.0.0.1", "client")


@pytest.mark.parametrize("line", ["a 198.18.1.4:5 198.18.6.9:10", "a-b.c_d\t198.18.0.1:00080  198.19.255.255:65535 tcp",
                                  "x 0.0.0.0:1 255.255.255.255:2 udp\n", "a 198.18.1.4:0 198.18.6.9:10",
                                  "a 198.18.1.4:5 198.18.6.9:65536", "a 198.18.1.4:5 198.18.6.09:1"])
def test_the_one_match_fast_path_reads_as_the_parsers_do(line):
    """A line the fast path reads gives what the word-by-word parsers give (forced by a trailing comment)."""
    def read(text):
        try:
            return parse_mapping_line(text, 1)
        except UsageError as err:
            return str(err)
    assert read(line) == read(line.rstrip("\n") + " # slow path")


def test_no_apply_changes_the_store_only(relay):
    text = "\n".join(mapping_lines(2, 3)) + "\n"
    out = cli(relay, "map", "add", "--from", "-", "--create-lobbies", "--no-apply", "--json", stdin=text)
    assert [json.loads(line)["installed"] for line in out.output.splitlines()] == [False] * 6
    assert relay.fake.scripts == [] and len(relay.mappings()) == 6
    assert relay.apply().added > 0 and len(relay.fake.scripts) == 1
