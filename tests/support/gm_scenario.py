"""The game-master scenario, described once and run on two kinds of machines.

The kernel tests run it on network namespaces (tests/support/gm_lab.py), and
vagrant/scenario.py runs it on the Vagrant VMs, through the same ``Machines``
interface: run a command on a named machine, start one in the background.

The story: two GMs behind home routers add themselves on the relay and dial
its VPN; each hosts a table on TCP 1802 that greets with its name. Two players
reach them at the same time through one public IP, one through ``natctl join``.
Closing GM1's session cuts GM1 only, and a short session is gone after the
next cleanup. ``probe_main`` is the players' client on every machine: its
source is handed to ``python -c``, so a player needs no copy of this file.
"""

from __future__ import annotations

import hashlib
import inspect
import ipaddress
import json
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Protocol

GAME_PORT = 1802
GMS = ("gm1", "gm2")
PLAYERS = {"player1": "gm1", "player2": "gm2"}  # who plays at whose table
JOIN_PLAYER = "player1"  # the one who points the game at 127.0.0.1:1802 and runs natctl join


def banner(gm: str) -> str:
    return f"welcome to the table of {gm}"


class ScenarioFailed(AssertionError):
    pass


class Proc(Protocol):
    def log(self) -> str: ...

    def interrupt(self) -> int | None: ...  # Ctrl-C, wait, exit status (None: would not stop)


class Machines(Protocol):
    relay_ip: str
    vpn_subnet: str

    def run(self, machine: str, argv: Sequence[str], input: str | None = None, check: bool = True,
            user: bool = False) -> str: ...

    def start(self, machine: str, argv: Sequence[str], user: bool = False) -> Proc: ...

    def natctl(self) -> list[str]: ...  # argv of natctl (on any machine)

    def python(self) -> list[str]: ...  # a Python that imports natctl

    def workdir(self, machine: str) -> str: ...  # an empty directory anyone may use

    def interface(self, gm: str) -> str: ...  # the GM's tunnel name (unique on the host of the lab)


def check(ok: bool, what: str) -> None:
    if not ok:
        raise ScenarioFailed(what)


def wait_for(what: str, probe: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not probe():
        if time.monotonic() > deadline:
            raise ScenarioFailed(f"timed out after {seconds:.0f}s waiting for {what}")
        time.sleep(0.1)


# --- steps


def gm_list(m: Machines) -> dict[str, dict]:
    return {g["name"]: g for g in json.loads(m.run("relay", [*m.natctl(), "gm", "list", "--json"]))}


def add_and_dial(m: Machines) -> dict[str, int]:
    """Each GM is added on the relay, takes its client config home and brings the tunnel up."""
    for gm in GMS:
        config = m.run("relay", [*m.natctl(), "gm", "add", gm])
        path = f"{m.workdir(gm)}/{m.interface(gm)}.conf"
        m.run(gm, ["sh", "-c", f"umask 077 && cat > {path}"], input=config)
        m.run(gm, ["wg-quick", "up", path])
    wait_for("both tunnels up", lambda: all(g["tunnel"] == "up" for g in gm_list(m).values()))
    return {name: g["port"] for name, g in gm_list(m).items()}


def serve(m: Machines) -> dict[str, Proc]:
    """Each GM's table: a real TCP server on 1802 that greets with the GM's name, then echoes."""
    servers = {gm: m.start(gm, ["socat", "-d", "-d", f"TCP-LISTEN:{GAME_PORT},reuseaddr,fork",
                                f"SYSTEM:echo '{banner(gm)}'; cat"]) for gm in GMS}
    for gm in GMS:
        wait_for(f"{gm}'s server", lambda gm=gm: "listening on" in servers[gm].log())
    return servers


def probe(m: Machines, player: str, host: str, port: int, hold: float = 0.0) -> Proc:
    return m.start(player, [*m.python(), "-c", PROBE, host, str(port), str(hold)], user=True)


def result(p: Proc, seconds: float = 10) -> dict:
    wait_for("a player's client to finish", lambda: '"done"' in p.log(), seconds)
    return json.loads(p.log().strip().splitlines()[-1])


def players_at_once(m: Machines, ports: dict[str, int], say: Callable[[str], None]) -> None:
    """Both players connect through the one public IP and are connected at the same moment."""
    probes = {p: probe(m, p, m.relay_ip, ports[gm], hold=2.0) for p, gm in PLAYERS.items()}
    wait_for("both players seated", lambda: all('"banner"' in pr.log() for pr in probes.values()))
    check(not any('"done"' in pr.log() for pr in probes.values()), "a player left before the other sat down")
    for player, gm in PLAYERS.items():
        r = result(probes[player])
        check(r["banner"] == banner(gm) and r["echo"], f"{player} at {m.relay_ip}:{ports[gm]} got {r}")
        say(f"ok  {player} -> {m.relay_ip}:{ports[gm]} reached {gm} ('{r['banner']}'), 100 KiB echoed intact")


def gms_saw_players(m: Machines, servers: dict[str, Proc], say: Callable[[str], None]) -> None:
    relay_vpn = str(next(ipaddress.IPv4Network(m.vpn_subnet).hosts()))
    for gm in GMS:
        seen = servers[gm].log().count(f"accepting connection from AF=2 {relay_vpn}:")
        check(seen >= 1, f"{gm}'s server saw no connection from the relay ({relay_vpn})")
        say(f"ok  {gm} saw {seen} player connection(s) arrive through the tunnel from {relay_vpn}")


def join_through_localhost(m: Machines, ports: dict[str, int], say: Callable[[str], None]) -> None:
    """natctl join: the game connects to 127.0.0.1:1802; nothing is left after Ctrl-C."""
    player, gm = JOIN_PLAYER, PLAYERS[JOIN_PLAYER]
    rules = m.run(player, ["nft", "list", "ruleset"])
    joiner = m.start(player, [*m.natctl(), "join", f"{m.relay_ip}:{ports[gm]}", "--local",
                              f"127.0.0.1:{GAME_PORT}"], user=True)
    wait_for("natctl join to listen", lambda: "relaying" in joiner.log())
    r = result(probe(m, player, "127.0.0.1", GAME_PORT))
    check(r["banner"] == banner(gm) and r["echo"], f"{player} via natctl join got {r}")
    check(joiner.interrupt() == 0, f"natctl join did not stop cleanly on Ctrl-C: {joiner.log()}")
    log = joiner.log()
    check("tcp #1 open" in log and "stopped: 1 connections" in log, f"natctl join did not report: {log}")
    listening = m.run(player, ["ss", "-Hlntu", f"sport = :{GAME_PORT}"])
    check(listening.strip() == "", f"port {GAME_PORT} still open after natctl join: {listening}")
    check(m.run(player, ["nft", "list", "ruleset"]) == rules, "natctl join changed the firewall")
    left = m.run(player, ["ls", "-A", m.workdir(player)])
    check(left.strip() == "", f"natctl join left files behind: {left}")
    say(f"ok  {player}: game -> 127.0.0.1:{GAME_PORT} -> natctl join -> {gm}; after Ctrl-C no port, "
        "rule or file is left")


def close_cuts_one(m: Machines, ports: dict[str, int], say: Callable[[str], None]) -> None:
    probes = {p: probe(m, p, m.relay_ip, ports[gm], hold=3.0) for p, gm in PLAYERS.items()}
    wait_for("both players seated", lambda: all('"banner"' in pr.log() for pr in probes.values()))
    m.run("relay", [*m.natctl(), "gm", "close", "gm1"])
    cut, kept = (result(probes[p]) for p in PLAYERS)
    check(not cut["echo"] and kept["echo"], f"after closing gm1: player1 {cut}, player2 {kept}")
    again = result(probe(m, "player1", m.relay_ip, ports["gm1"]))
    check(again["banner"] is None, f"gm1 still reachable after its session closed: {again}")
    say("ok  closing gm1's session cut player1 at once; player2 at gm2 played on")


def expires_at_cleanup(m: Machines, ports: dict[str, int], say: Callable[[str], None]) -> None:
    m.run("relay", [*m.natctl(), "gm", "open", "gm1", "--for", "1s"])
    time.sleep(1.2)
    gone = json.loads(m.run("relay", [*m.natctl(), "cleanup", "--json"]))
    check(ports["gm1"] in gone["forwards"], f"cleanup did not remove gm1's expired session: {gone}")
    check(not gm_list(m)["gm1"]["session"], "gm1 still lists a session after cleanup")
    r = result(probe(m, "player1", m.relay_ip, ports["gm1"]))
    check(r["banner"] is None, f"gm1 reachable after its session expired: {r}")
    say("ok  a 1s session of gm1 was gone after the next 'natctl cleanup'")


def run(m: Machines, say: Callable[[str], None] = print) -> None:
    """The whole story; raises ScenarioFailed at the first check that fails."""
    ports = add_and_dial(m)
    say(f"ok  GMs added and dialled in: public ports {ports}")
    servers = serve(m)
    for gm in GMS:
        m.run("relay", [*m.natctl(), "gm", "open", gm, "--for", "4h"])
    players_at_once(m, ports, say)
    gms_saw_players(m, servers, say)
    join_through_localhost(m, ports, say)
    close_cuts_one(m, ports, say)
    m.run("relay", [*m.natctl(), "gm", "close", "gm2"])
    expires_at_cleanup(m, ports, say)
    for gm in GMS:
        servers[gm].interrupt()


# --- the players' client, run on their machines


def probe_main(host: str, port: int, hold: float) -> dict:
    """Connect, read the banner, stay ``hold`` seconds, then check that 100 KiB come back intact."""
    out: dict = {"banner": None, "echo": False, "error": None}
    try:
        with socket.create_connection((host, port), timeout=5) as s:
            line = s.makefile("rb").readline().decode().strip()
            out["banner"] = line or None
            print(json.dumps({"banner": out["banner"]}), flush=True)
            time.sleep(hold)
            blob = os.urandom(100 * 1024)
            s.sendall(blob)
            s.shutdown(socket.SHUT_WR)
            got = b""
            while chunk := s.recv(65536):
                got += chunk
            out["echo"] = hashlib.sha256(got).digest() == hashlib.sha256(blob).digest()
    except OSError as err:
        out["error"] = f"{type(err).__name__}: {err}"
    print(json.dumps({**out, "done": True}), flush=True)
    return out


# The player's client as a self-contained program (standard library only).
PROBE = "\n".join(["import hashlib, json, os, socket, sys, time", inspect.getsource(probe_main),
                   "probe_main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]))"])
