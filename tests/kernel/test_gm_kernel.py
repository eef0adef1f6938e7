"""Several GMs on one public IP, for real: wireguard-go tunnels from GMs behind home NATs, forwards
through nftables, players on both tables at once, natctl join, session close and expiry.

The story itself lives in natctl.lab.gm_scenario, shared with the Vagrant lab.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess

import pytest

from natctl.gm.wireguard import socket_path, stale_socket
from natctl.lab.netns import run
from support import gm_lab, gm_scenario
from support.cli import Cli

pytestmark = pytest.mark.kernel


@pytest.fixture(scope="module")
def machines():
    m = gm_lab.build()
    try:
        yield m
    finally:
        gm_lab.teardown(m)


def test_two_gms_behind_nat_on_one_public_ip(machines):
    lines: list[str] = []
    gm_scenario.run(machines, lines.append)
    assert len(lines) == 8, lines


class GmCli(Cli):
    """natctl in the lab's relay with its own store and its own WireGuard interface."""

    def __init__(self, ns: str, state: str, env: dict[str, str]) -> None:
        super().__init__(ns, state)
        self.env = env

    def __call__(self, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        return super().__call__(*args, check=check, env={**self.env, **(env or {})})


@pytest.fixture
def relay(machines, tmp_path):
    iface = f"{machines.lab.prefix}x"
    cli = GmCli(machines.lab.relay_ns, str(tmp_path / "natctl.db"), {
        "NATCTL_GM_INTERFACE": iface, "NATCTL_GM_LISTEN_PORT": "51821",
        "NATCTL_GM_SUBNET": "198.18.251.0/29", "NATCTL_GM_PORTS": "1900-1909"})
    cli.iface = iface
    try:
        yield cli
    finally:
        cli("gm", "down", check=False)
        run(["ip", "link", "delete", "dev", iface], ns=machines.lab.relay_ns, check=False)
        if stale_socket(socket_path(iface)):
            os.unlink(socket_path(iface))


def peers(cli) -> set[str]:
    out = run(["wg", "show", cli.iface, "peers"], ns=cli.ns, check=False)
    return set(out.stdout.split()) if out.returncode == 0 else set()


def state(cli) -> tuple:
    """Rows and peers, read directly: the store file and the interface."""
    with sqlite3.connect(cli.state) as db:
        return (db.execute("SELECT * FROM gms ORDER BY name").fetchall(),
                db.execute("SELECT * FROM forwards ORDER BY port").fetchall(), peers(cli))


def refused(cli, code: int, match: str, *args: str) -> None:
    before = state(cli)
    proc = cli(*args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("natctl: error: ") and match in lines[0], proc.stderr
    assert state(cli) == before


def test_bad_input_says_what_to_do_and_makes_nothing_half(relay, tmp_path):
    relay("gm", "add", "alice", "--out", str(tmp_path / "alice.conf"))
    assert oct(os.stat(tmp_path / "alice.conf").st_mode & 0o777) == "0o600"  # it holds a private key
    relay("gm", "add", "bob", "--port", "1905")
    gms = {g["name"]: g for g in relay.json("gm", "list")}
    assert peers(relay) == {g["public_key"] for g in gms.values()}
    assert (gms["alice"]["address"], gms["alice"]["port"]) == ("198.18.251.2", 1900)
    refused(relay, 4, "a GM named 'alice' already exists", "gm", "add", "alice")
    refused(relay, 4, "public port 1905 is already taken", "gm", "add", "carol", "--port", "1905")
    refused(relay, 2, "outside the GM port range 1900-1909", "gm", "add", "carol", "--port", "1802")
    refused(relay, 3, "no GM named 'zed'", "gm", "open", "zed")
    refused(relay, 3, "no GM named 'zed'", "gm", "remove", "zed")
    refused(relay, 3, "alice has no open session", "gm", "close", "alice")
    refused(relay, 4, "alice's tunnel is down: it has never connected", "gm", "open", "alice")
    refused(relay, 2, "cannot write /nonexistent/carol.conf", "gm", "add", "carol", "--out", "/nonexistent/carol.conf")
    refused(relay, 4, "use the VPN settings", "gm", "--subnet", "198.18.252.0/24", "add", "carol")
    for name in ("carol", "dave", "erin"):  # a /29: the relay and five GMs
        relay("gm", "add", name)
    refused(relay, 5, "the VPN address pool 198.18.251.0/29 is full", "gm", "add", "frank")
    relay("gm", "down")
    refused(relay, 4, "the VPN interface", "gm", "open", "alice")


def test_remove_gives_back_peer_address_and_port_and_up_restores(relay):
    for name in ("alice", "bob"):
        relay("gm", "add", name)
    relay("gm", "remove", "alice")
    carol = relay.json("gm", "add", "carol")
    assert (carol["address"], carol["port"]) == ("198.18.251.2", 1900)
    rows = {g["public_key"] for g in relay.json("gm", "list")}
    assert peers(relay) == rows and len(rows) == 2
    relay("gm", "down")
    assert peers(relay) == set()
    assert "2 GM" in relay("gm", "up").stdout
    assert peers(relay) == rows
