"""natctl serve in the lab: hosts register from behind NAT, clients are admitted on their first packet."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time

import pytest

from natctl.daemon import wire
from natctl.daemon.client import register
from natctl.errors import NatctlError
from natctl.lab.gamehost import GameHost
from natctl.lab.netns import natctl_argv, run
from natctl.lab.traffic import collect, drain
from support.serve import REG, Daemon, host_lobby

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("engine")]  # each test on both store engines too


@pytest.fixture
def daemon(lab, relay, tmp_path):
    d = Daemon(lab, relay.state, str(tmp_path / "serve.log"), "--idle-timeout", "3s", "--cleanup-interval", "1s")
    try:
        yield d
    finally:
        d.kill()


def lobby(relay, name: str, *args: str) -> str:
    return relay.json("lobby", "create", name, *args)["token"]


def test_register_then_clients_admitted_on_their_first_packet(lab, relay, daemon, game):
    relay_ip, host_port, token = host_lobby(lab, relay, daemon, game, "--allow", "198.18.2.0/24")
    assert relay_ip == lab.relay_ip
    # Registration is idempotent: a keepalive changes nothing (and is not logged again).
    game["host"].session._next_keepalive = 0
    time.sleep(0.3)
    assert len(daemon.events("registered")) == 1 and relay.json("lobby", "list")[0]["host_port"] == host_port
    sent = {}
    for name in ("client1", "client2"):
        sent[name] = [f"{name}-{i}-".encode() + os.urandom(40) for i in range(5)]
        for data in sent[name]:
            game[name].sendto(data, (relay_ip, host_port))
    got = collect(game["host"], 10)
    by_source: dict[tuple, list[bytes]] = {}
    for data, src in got:
        by_source.setdefault(src, []).append(data)
    # Every packet arrived (the first ones too), from two distinct relay addresses.
    assert len(by_source) == 2, by_source.keys()
    assert all(src[0] == relay_ip for src in by_source)
    seen_as = {}
    for src, datas in by_source.items():
        name = datas[0].split(b"-")[0].decode()
        assert sorted(datas) == sorted(sent[name])
        seen_as[name] = src
    # The host answers each client; replies come from the host's relay port.
    for name, src in seen_as.items():
        payload = os.urandom(200)
        game["host"].sendto(payload, src)
        (data, reply_src), = collect(game[name], 1)
        assert data == payload and reply_src == (relay_ip, host_port)
    # Addresses are stable: a second round comes from the same relay ports, now forwarded by the kernel.
    for name in seen_as:
        game[name].sendto(b"again " + name.encode(), (relay_ip, host_port))
    again = {data.split()[1].decode(): src for data, src in collect(game["host"], 2)}
    assert again == seen_as
    admitted = daemon.events("admitted")
    assert len(admitted) == 2 and all(rec["ms"] < 1000 for rec in admitted)
    assert token not in open(daemon.log).read()  # tokens are never logged


def test_strangers_wrong_tokens_and_garbage_change_nothing(lab, relay, daemon, game):
    relay_ip, host_port, token = host_lobby(lab, relay, daemon, game, "--allow", "198.18.2.0/24")
    # A sender from a network the lobby does not allow is never forwarded and never reaches the
    # daemon: the kernel knows the lobby's networks (allow4) and drops it, counted.
    for i in range(2000):  # bounded: 2000 datagrams
        game["stranger"].sendto(b"let me in %d" % i, (relay_ip, host_port))
    time.sleep(0.5)
    assert drain(game["host"]) == []
    assert daemon.events("rejected") == []
    counters = run(["nft", "list", "counter", "inet", "natctl", "unknown_refused"], ns=lab.relay_ns).stdout
    assert int(counters.split("packets ")[1].split()[0]) >= 1900
    # A wrong token never registers and gets no answer.
    with pytest.raises(NatctlError, match="no answer"):
        register(game["host2"], (lab.relay_ip, REG), "x" * 32, tries=3, interval=0.2)
    before = (relay("lobby", "list", "--json").stdout, relay("map", "list", "--json").stdout)
    # Malformed datagrams (random, truncated, oversized, wrong version): bounded, and nothing changes.
    rng = random.Random(7)
    good = wire.encode_request(token, 1)
    sock = game["host2"]
    for i in range(300):
        kind = i % 4
        if kind == 0:
            data = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 120)))
        elif kind == 1:
            data = good[: rng.randint(0, len(good) - 1)]
        elif kind == 2:
            data = good + os.urandom(rng.randint(1, 2000))
        else:
            data = bytearray(good)  # one bit flipped anywhere but the nonce (any nonce is valid)
            data[rng.choice([i for i in range(len(good)) if not 6 <= i < 10])] ^= 1 << rng.randint(0, 7)
            data = bytes(data)
        sock.sendto(data, (lab.relay_ip, REG))
    time.sleep(0.5)
    assert drain(sock) == []  # not a single answer to garbage
    assert (relay("lobby", "list", "--json").stdout, relay("map", "list", "--json").stdout) == before
    assert daemon.proc.poll() is None
    # The daemon still serves: a real registration from host2 for a new lobby works.
    token2 = lobby(relay, "h")
    assert register(game["host2"], (lab.relay_ip, REG), token2)[0] == lab.relay_ip


def test_idle_mappings_expire_and_busy_ones_stay(lab, relay, daemon, game):
    relay_ip, host_port, token = host_lobby(lab, relay, daemon, game, "--open")
    for name in ("client1", "client2"):
        game[name].sendto(b"hello", (relay_ip, host_port))
    assert len(collect(game["host"], 2)) == 2
    # client1 keeps talking for 7 s; client2 falls silent (idle timeout 3 s, cleanup every 1 s).
    deadline = time.monotonic() + 7
    while time.monotonic() < deadline:
        game["client1"].sendto(b"tick", (relay_ip, host_port))
        time.sleep(0.2)
    maps = {m["client"] for m in relay.json("map", "list")}
    c1 = f"{lab.members['client1'].public_ip}:{game['client1'].getsockname()[1]}"
    c2 = f"{lab.members['client2'].public_ip}:{game['client2'].getsockname()[1]}"
    assert maps == {c1}
    table = run(["nft", "list", "map", "inet", "natctl", "dnat4"], ns=lab.relay_ns).stdout
    port2 = game["client2"].getsockname()[1]
    assert f". {port2} ." not in table and f"{port2} . {host_port}" not in table
    assert any(c2.split(":")[0] in " ".join(rec.get("idle", [])) for rec in daemon.events("cleanup"))


def test_cleanup_from_the_command_line_expires_idle_mappings(lab, relay, game):
    relay("lobby", "create", "g")
    relay("map", "add", "--lobby", "g", "--host", "198.18.1.2:27015", "--client", "198.18.2.2:41001")
    env = {"NATCTL_IDLE_TIMEOUT": "1"}
    relay("cleanup", env=env)  # records the counters
    time.sleep(1.2)
    out = json.loads(relay("cleanup", "--json", env=env).stdout)
    assert out["idle"] == ["g/udp/198.18.2.2:41001"]
    assert relay.json("map", "list") == []


def test_kill_9_keeps_traffic_flowing_and_restart_loses_nothing(lab, relay, daemon, game):
    relay_ip, host_port, token = host_lobby(lab, relay, daemon, game, "--open")
    game["client1"].sendto(b"first", (relay_ip, host_port))
    assert len(collect(game["host"], 1)) == 1

    def state():
        return ([(lb["name"], lb["host"], lb["host_port"]) for lb in relay.json("lobby", "list")],
                [(m["client"], m["host_port"], m["client_port"]) for m in relay.json("map", "list")])

    before = state()
    sent = 0
    for i in range(100):  # 2 s of traffic at 50 packets/s; the daemon dies a third of the way in
        if i == 33:
            daemon.kill()
        game["client1"].sendto(b"p%d" % i, (relay_ip, host_port))
        sent += 1
        time.sleep(0.02)
    assert len(collect(game["host"], sent, 2.0)) == sent
    daemon.start()
    assert state() == before  # nothing duplicated, nothing lost
    game["client2"].sendto(b"after restart", (relay_ip, host_port))
    (data, _), = collect(game["host"], 1)
    assert data == b"after restart"
    assert len(relay.json("map", "list")) == 2


def test_a_second_daemon_refuses_to_start_and_sigterm_keeps_mappings(lab, relay, daemon, game):
    relay_ip, host_port, token = host_lobby(lab, relay, daemon, game, "--open")
    game["client1"].sendto(b"in", (relay_ip, host_port))
    assert len(collect(game["host"], 1)) == 1
    second = subprocess.run(natctl_argv(relay.state, "serve", ns=lab.relay_ns), capture_output=True, text=True, timeout=20,
                            env={**os.environ, "NATCTL_CONFIG": "/nonexistent"})
    assert second.returncode == 7 and "another natctl serve is running" in second.stderr
    assert daemon.stop() == 0  # SIGTERM: a clean stop, mappings stay
    assert daemon.events("stopped")
    game["client1"].sendto(b"still here", (relay_ip, host_port))
    (data, _), = collect(game["host"], 1)
    assert data == b"still here" and len(relay.json("map", "list")) == 1


def test_metrics_endpoint_and_status(lab, relay, tmp_path, game):
    token = lobby(relay, "g", "--open")
    d = Daemon(lab, relay.state, str(tmp_path / "m.log"), "--metrics", "127.0.0.1:9808")
    try:
        d.start()
        game["host"] = GameHost(game["host"], (lab.relay_ip, REG), token)
        relay_ip, host_port = game["host"].start()
        time.sleep(0.3)
        game["client1"].sendto(b"hi", (relay_ip, host_port))
        assert len(collect(game["host"], 1)) == 1
        text = run(["curl", "-sS", "--max-time", "3", "http://127.0.0.1:9808/metrics"], ns=lab.relay_ns).stdout
        values = {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines() if ln and not ln.startswith("#")}
        assert values["natctl_registrations_total"] == 1
        assert values["natctl_admissions_total"] == 1
        assert "natctl_sync_duration_seconds_count" in values and "natctl_active_mappings" in values
        human = relay("status").stdout
        assert "lobbies" in human and "idle" in human and str(host_port) in human
    finally:
        d.kill()


def test_install_units(tmp_path, relay):
    out = relay("install-units", "--systemd-dir", str(tmp_path / "systemd"), "--cron-dir", str(tmp_path / "cron"))
    assert "systemctl daemon-reload" in out.stdout
    unit = (tmp_path / "systemd" / "natctl.service").read_text()
    exe = unit.split("ExecStart=")[1].split()[0]
    assert exe.endswith("natctl") and os.access(exe, os.X_OK) and "serve" in unit
    assert "OnUnitActiveSec" in (tmp_path / "systemd" / "natctl-cleanup.timer").read_text()
    assert f"ExecStart={exe} cleanup" in (tmp_path / "systemd" / "natctl-cleanup.service").read_text()
    assert "cleanup" in (tmp_path / "cron" / "natctl").read_text()


FLOATING = "198.18.0.9"  # a routed (floating) public IP on the relay's lo, beside eth0's own address


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)  # its relay IP changes: a fleet member re-joins
def test_a_relay_ip_on_lo_answers_from_itself_through_masquerading_routers(lab, relay, daemon, game, monkeypatch):
    """The host's router is stock masquerade: it lets in only what comes from the exact address and port the
    host sent to. Registration answers, OPENs and the held packets must leave from FLOATING, not eth0's."""
    run(["ip", "addr", "add", f"{FLOATING}/32", "dev", "lo"], ns=lab.relay_ns)
    run(["ip", "route", "add", f"{FLOATING}/32", "via", lab.relay_ip], ns=lab.ns("inet"))
    monkeypatch.setenv("NATCTL_RELAY_IP", FLOATING)  # for the CLI and the daemon alike
    try:
        token = lobby(relay, "g", "--open")
        daemon.start()
        game["host"] = GameHost(game["host"], (FLOATING, REG), token)
        assert game["host"].start(tries=4)[0] == FLOATING
        host_port = relay.json("lobby", "list")[0]["host_port"]
        time.sleep(0.3)  # the daemon opens its listener on the new host port
        game["client1"].sendto(b"first", (FLOATING, host_port))
        game["client1"].sendto(b"second", (FLOATING, host_port))
        got = collect(game["host"], 2)
        assert [d for d, _ in got] == [b"first", b"second"] and {s[0] for _, s in got} == {FLOATING}
        game["host"].sendto(b"reply", got[0][1])
        assert collect(game["client1"], 1) == [(b"reply", (FLOATING, host_port))]
    finally:
        daemon.kill()
        run(["ip", "route", "del", f"{FLOATING}/32"], ns=lab.ns("inet"), check=False)
        run(["ip", "addr", "del", f"{FLOATING}/32", "dev", "lo"], ns=lab.relay_ns, check=False)
