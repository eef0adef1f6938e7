"""Issue 14, items 2 and 8, for real: a second store cannot wipe a live relay, and a sender outside a
lobby's allowed networks is dropped by the kernel before it reaches the daemon."""

from __future__ import annotations

import json
import time

import pytest

from natctl.lab.netns import run
from natctl.lab.traffic import collect, drain
from support.cli import Cli
from support.serve import REG, Daemon, host_lobby

pytestmark = pytest.mark.kernel
CLIENTS_NET = "198.18.2.0/24"  # the home router of client1 and client2; the stranger is elsewhere


@pytest.fixture
def daemon(lab, relay, tmp_path):
    d = Daemon(lab, relay.state, str(tmp_path / "serve.log"), "--cleanup-interval", "1s")
    try:
        yield d
    finally:
        d.kill()


def hosted(lab, relay, daemon, game) -> int:
    """Lobby g (allowing the clients' network) with its host registered through the daemon; its host port."""
    return host_lobby(lab, relay, daemon, game, "--allow", CLIENTS_NET)[1]


def flows(lab, game, host_port: int, tag: bytes, count: int = 5) -> bool:
    for i in range(count):
        game["client1"].sendto(tag + b"%d" % i, (lab.relay_ip, host_port))
    got = [data for data, _ in collect(game["host"], count)]
    return sorted(got) == sorted(tag + b"%d" % i for i in range(count))


def mappings(lab) -> list:
    doc = json.loads(run(["nft", "-j", "list", "map", "inet", "natctl", "dnat4"], ns=lab.relay_ns).stdout)
    return sorted(json.dumps(e, sort_keys=True) for item in doc["nftables"] for e in item.get("map", {}).get("elem", []))


def counter(lab, name: str) -> int:
    doc = json.loads(run(["nft", "-j", "list", "counter", "inet", "natctl", name], ns=lab.relay_ns).stdout)
    return next(item["counter"]["packets"] for item in doc["nftables"] if "counter" in item)


def refused_in_one_line(proc, mine: str, theirs: str) -> None:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 7, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("natctl: error: another natctl holds the kernel"), lines
    assert f"belongs to {theirs}, not to {mine}" in lines[0] and f"--state {theirs}" in lines[0]
    assert "--adopt" in lines[0]


def test_second_store_refused_adopt_takes_over(lab, relay, daemon, game, tmp_path):
    host_port = hosted(lab, relay, daemon, game)
    assert flows(lab, game, host_port, b"before ")  # client1 admitted, then forwarded by the kernel
    before = mappings(lab)
    assert before
    other = Cli(lab.relay_ns, str(tmp_path / "other.db"))
    # The tired operator's commands on the wrong store: refused, one line each, nothing changed.
    for args in (["apply"], ["cleanup"], ["lobby", "create", "x", "--open"], ["serve"], ["uninstall"]):
        refused_in_one_line(other(*args, check=False), other.state, relay.state)
    assert mappings(lab) == before and flows(lab, game, host_port, b"during ")
    assert other.json("lobby", "list") == [] and daemon.proc.poll() is None
    # --adopt: this store's state (empty) replaces the kernel's; the first store is now the stranger.
    taken = json.loads(other("--adopt", "apply", "--json").stdout)
    assert taken["deleted"] > 0 and mappings(lab) == []
    refused_in_one_line(relay("apply", check=False), relay.state, other.state)
    # Handing it back is as explicit: 'apply --adopt' from the first store restores its mappings.
    assert json.loads(relay("apply", "--adopt", "--json").stdout)["added"] > 0
    assert mappings(lab) == before


def test_serve_refuses_a_taken_port(lab, relay, daemon, game, tmp_path):
    host_port = hosted(lab, relay, daemon, game)
    assert flows(lab, game, host_port, b"x")
    before = mappings(lab)
    run(["nft", "flush", "set", "inet", "natctl", "owner"], ns=lab.relay_ns)  # a table that names no store
    other = Cli(lab.relay_ns, str(tmp_path / "other.db"))
    proc = other("serve", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 7 and len(lines) == 1 and f"UDP port {REG}" in lines[0], proc.stderr
    assert mappings(lab) == before  # refused before its reconcile could remove anything


def test_outsider_never_reaches_daemon(lab, relay, daemon, game):
    host_port = hosted(lab, relay, daemon, game)
    refused = counter(lab, "unknown_refused")
    for i in range(500):  # bounded: 500 datagrams from the stranger's router, outside 198.18.2.0/24
        game["stranger"].sendto(b"let me in %d" % i, (lab.relay_ip, host_port))
    time.sleep(0.5)
    assert counter(lab, "unknown_refused") - refused >= 500  # every one dropped by the kernel, counted
    assert drain(game["stranger"]) == [] and game["host"].inbox.empty()
    stranger_ip = lab.members["stranger"].public_ip
    log = open(daemon.log).read()
    assert stranger_ip not in log  # the daemon never heard of it: no rejection, no block
    assert daemon.events("rejected") == [] and daemon.events("admission_failed") == []
    # An allowed sender is admitted on its first packet and then forwarded by the kernel.
    assert flows(lab, game, host_port, b"allowed ")
    admitted = daemon.events("admitted")
    assert [rec["client"].split(":")[0] for rec in admitted] == [lab.members["client1"].public_ip]
