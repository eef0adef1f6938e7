"""Fleet figures (issue 12): placement latency, changes per second across relays, failover time.

    sudo .venv/bin/python -m bench.fleet [--placements 30] [--changes 300] [--seconds 20] [--failovers 3]
                                         [--parts placement,changes,failover] [--json FILE]

On the fleet lab (natctl/lab/fleet.py): a throwaway PostgreSQL, three relay namespaces joined in regions eu, eu,
us, each running `natctl serve`, with the lab's fleet settings (heartbeat 0.5 s, dead_after 3 s).

- **Placement**: `natctl lobby create NAME --open --region eu` on relay1, a new process each (timed inside relay1's
  namespace; natctl hands the change to the running daemon), and ``Service(settings).lobby_create`` in one process
  in relay1's namespace (its first call, which connects, not counted): p50/p95 of each, and where lobbies went.
- **Changes per second**: from every relay at once through its daemon's control socket, map add and remove of
  clients in one lobby on each relay (a third local, the rest through other relays' outboxes), --changes per
  relay or --seconds, whichever comes first; then the time from the last answer until every relay's kernel
  holds exactly the clients the store left on it (the outbox drain lag). Baseline, same run: the same three
  streams into relay1's daemon, its three lobbies on relay1 (nothing remote).
- **Failover**: a host (reference client v3, keepalive 1 s) registered at relay3, its lobby on an eu relay, a
  player sending a numbered datagram every 20 ms that the host echoes; the lobby's relay is killed (daemon,
  kernel table, XDP program): time to "relay_dead" in a surviving relay's log, to the host's registration
  acknowledged by the new relay, to the first datagram echoed again through it; datagrams lost. --failovers
  times, relay1 and relay2 in turns (the killed one started again after each).

Prints a summary on stderr and the JSON on stdout (and in --json FILE, by default bench/results/fleet-*.json);
removes everything it made (namespaces, daemons, the database), also on failure and Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from functools import partial
from pathlib import Path
from typing import Any

from bench import lab as benchlab
from bench.config import ROOT
from bench.reliability import TIMER
from bench.stats import percentile
from bench.tool import BenchError
from natctl.daemon.control_client import SUFFIX, Control
from natctl.lab import fleet as fleetlab
from natctl.lab.fleet import Echo, FleetLab, Player, Relay
from natctl.lab.netns import natctl_argv
from natctl.lab.traffic import udp_socket

SITES = {"home-h": ["host"], "home-p": ["player"]}
REGIONS = ("eu", "eu", "us")
EVERY, KEEPALIVE, RETRY = 0.02, 1.0, 0.3  # the player's send interval; the host's reference-client timers
SERVICE = r"""
import json, sys, time
from natctl.config import load
from natctl.service import Service
state, store, ip, prefix, n = sys.argv[1:6]
svc, out = Service(load({"state": state, "store": store, "relay_ip": ip})), []
for i in range(int(n) + 1):  # the first connects to the database: not counted
    t = time.perf_counter()
    svc.lobby_create(f"{prefix}{i}", open_=True, region="eu")
    out.append(time.perf_counter() - t)
svc.close()
print(json.dumps(out[1:]))
"""


def _r(x: float | None, digits: int = 1) -> float | None:
    return None if x is None else round(x, digits)


def _ms(seconds: list[float]) -> dict[str, Any]:
    ms = [s * 1000 for s in seconds]
    return {"runs": len(ms), "p50_ms": _r(percentile(ms, 50)), "p95_ms": _r(percentile(ms, 95)),
            "max_ms": _r(max(ms, default=None))}


def _py(fleet: FleetLab, relay: Relay, *args: str) -> Any:
    """A Python program in a relay's namespace, with the fleet's settings; its JSON output."""
    proc = subprocess.run(["ip", "netns", "exec", relay.ns, sys.executable, *args], capture_output=True, text=True,
                          timeout=300, env={**os.environ, **fleet.env}, cwd=ROOT)
    if proc.returncode != 0:
        raise BenchError(f"in {relay.name}: {proc.stderr.strip()[-300:]}")
    return json.loads(proc.stdout)


def _close(relay: Relay, names: list[str]) -> None:
    with Control(relay.state + SUFFIX) as ctl:
        ctl.many([{"op": "lobby.close", "name": n} for n in names])


def placement(fleet: FleetLab, n: int) -> dict[str, Any]:
    r1, r3 = fleet.relays[0], fleet.relays[2]
    cli = natctl_argv(r1.state, "lobby", "create", "NAME", "--open", "--region", "eu", "--json")
    for name, runs in (("warm{i}", 2), ("cli{i}", n)):  # first Python's bytecode cache, as on an installed natctl
        timed = _py(fleet, r1, "-c", TIMER, json.dumps([[[a.replace("NAME", name) for a in cli], {}]]), str(runs))[0]
    service = _py(fleet, r1, "-c", SERVICE, r1.state, fleet.env["NATCTL_STORE"], r1.ip, "svc", str(n))
    made = [lb for lb in fleet.json(r3, "lobby", "list") if lb["name"].startswith(("cli", "svc", "warm"))]
    _close(r3, [lb["name"] for lb in made])
    return {"command": "natctl lobby create NAME --open --region eu --json (on relay1, daemons running)",
            "cli": _ms(timed), "service": _ms(service),
            "placed_on": dict(Counter(lb["relay"] for lb in made if not lb["name"].startswith("warm")))}


def churn(fleet: FleetLab, sources: list[Relay], homes: list[Relay], count: int, seconds: float,
          tag: int) -> dict[str, Any]:
    """``count`` changes from each source at once (or ``seconds``): clients added to one lobby on each of
    ``homes`` in turn and removed again, at most one per lobby and source at a time; then the drain lag."""
    lobbies = [(f"churn{tag}-{i}", r, f"198.19.{200 + tag}.{i + 1}:27015") for i, r in enumerate(homes)]
    with Control(fleet.relays[2].state + SUFFIX) as ctl:
        for name, r, _ in lobbies:
            ctl.call("lobby.create", name=name, open=True, relay=r.name)
    barrier, end = threading.Barrier(len(sources)), time.monotonic() + seconds
    lat: list[float] = []
    errors: list[str] = []
    left: list[tuple[str, Relay, tuple[str, int]]] = []  # (lobby, its relay, client) mapped at the end
    times = {"first": float("inf"), "last": 0.0, "remote": 0}
    lock = threading.Lock()

    def stream(i: int, src: Relay) -> None:
        present: deque[tuple[str, Relay, tuple[str, int]]] = deque()
        with Control(src.state + SUFFIX) as ctl:
            barrier.wait()
            times["first"] = min(times["first"], time.monotonic())
            for k in range(count):
                if time.monotonic() > end:
                    break
                add = len(present) < len(lobbies)  # add a client to the next lobby, else remove the oldest
                if add:
                    name, home, host = lobbies[k % len(lobbies)]
                    client = (f"198.19.{10 + tag * 4 + i}.{1 + k % 250}", 40000 + k // 250)
                else:
                    name, home, client = present.popleft()
                req = {"op": "map.add" if add else "map.remove", "lobby": name, "client": f"{client[0]}:{client[1]}",
                       **({"host": host} if add else {})}
                t = time.perf_counter()
                reply = ctl.many([req])[0]
                with lock:
                    lat.append(time.perf_counter() - t)
                    times["last"], times["remote"] = time.monotonic(), times["remote"] + (home is not src)
                    if not reply.get("ok"):
                        errors.append(f"{req['op']}: {reply.get('error')}")
                    elif add:
                        present.append((name, home, client))
        with lock:
            left.extend(present)

    def converge(r: Relay) -> None:
        """Read the relay's kernel until its clients of this run are exactly the ones the store left on it."""
        want, deadline = {c for _, home, c in left if home is r}, time.monotonic() + 30
        while time.monotonic() < deadline:
            t = time.monotonic()
            held = {(e.key[0], e.key[2]) for e in fleet.dnat(r) if e.key[0].startswith(prefixes)}
            if held == want:
                lag[r.name] = ((time.monotonic() - times["last"]) * 1000, (time.monotonic() - t) * 1000)
                return
            time.sleep(0.005)

    prefixes = tuple(f"198.19.{10 + tag * 4 + i}." for i in range(len(sources)))
    lag: dict[str, tuple[float, float]] = {}  # relay -> (lag, the duration of the read that saw it)
    for group, args in ((stream, list(enumerate(sources))), (converge, [(r,) for r in {r.name: r for r in homes}.values()])):
        threads = [threading.Thread(target=group, args=a, daemon=True) for a in args]
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 60)
    store = {lb["name"]: lb["clients"] for lb in fleet.json(fleet.relays[2], "lobby", "list")}
    agrees = all(store.get(name) == sum(x[0] == name for x in left) for name, _, _ in lobbies)
    _close(fleet.relays[2], [name for name, _, _ in lobbies])
    wall = times["last"] - times["first"]
    return {"sources": [s.name for s in sources], "lobbies": {name: r.name for name, r, _ in lobbies},
            "changes": len(lat), "remote": times["remote"], "seconds": _r(wall, 3),
            "per_second": _r(len(lat) / wall if wall > 0 else None), **_ms(lat), "errors": len(errors),
            "first_errors": errors[:3], "drain_lag_ms": {k: _r(v[0]) for k, v in sorted(lag.items())},
            "kernel_read_ms": {k: _r(v[1]) for k, v in sorted(lag.items())},
            "drain_lag_max_ms": _r(max(v[0] for v in lag.values())) if len(lag) == len({r.name for r in homes})
            else None, "store_agrees": agrees}


def failover_once(fleet: FleetLab, k: int, victim: Relay, heir: Relay) -> dict[str, Any]:
    r3 = fleet.relays[2]
    made = fleet.json(r3, "lobby", "create", f"fo{k}", "--open", "--relay", victim.name)
    echo = Echo(fleet.lab.ns("host"), r3.ip, made["token"], keepalive=KEEPALIVE, retry=RETRY)
    player = Player(udp_socket(fleet.lab.ns("player"), port=42000 + k), echo, EVERY, int(60 / EVERY))
    try:
        fleetlab.wait_for("the host on its lobby's relay", lambda: echo.address[0] == victim.ip, seconds=10)
        time.sleep(1.0)  # the daemon opens the new host port's listener within a second
        player.start()
        fleetlab.wait_for("the player's datagrams echoed", lambda: len(player.got) >= 25, seconds=10)
        wall, t0 = time.time(), time.monotonic()  # the logs' clock, and ours
        fleet.kill(victim)
        gone = time.monotonic()  # daemon, kernel table and XDP program gone: nothing forwards there any more
        fleetlab.wait_for("a datagram echoed through the new relay",
                          lambda: player.back_after(gone, heir.ip) is not None, seconds=40)
        time.sleep(1.0)
        player.sending.clear()
        time.sleep(0.5)  # what is in flight arrives
    finally:
        player.close()
        echo.close()
    dead = [e["ts"] - wall for r in fleet.relays if r is not victim for e in r.daemon.events("relay_dead")
            if victim.name in e.get("relays", []) and e["ts"] >= wall]
    back, registered = player.back_after(gone, heir.ip), echo.registered.get(heir.ip)
    return {"killed": victim.name, "moved_to": fleet.at(echo.address[0]).name, "kill_ms": _r((gone - t0) * 1000),
            "dead_s": _r(min(dead, default=None), 2), "registered_s": _r(registered and registered - t0, 2),
            "echoed_again_s": _r(back and back - t0, 2), "lost": player.lost(t0),
            "lost_before_kill": player.lost(0, t0 - 0.2), "sent": len(player.sent)}


def _live(fleet: FleetLab, seen_from: Relay, name: str) -> bool:
    return any(r["name"] == name and r["state"] == "live" for r in fleet.json(seen_from, "relay", "list"))


def failover(fleet: FleetLab, runs: int) -> dict[str, Any]:
    each = []
    for k in range(runs):  # relay1 and relay2 (eu) in turns; relay3 (us) is the hosts' well-known address
        victim, heir = fleet.relays[k % 2], fleet.relays[1 - k % 2]
        each.append(failover_once(fleet, k, victim, heir))
        _close(fleet.relays[2], [f"fo{k}"])
        victim.daemon.start()  # back for the next run: its heartbeat makes it live again, holding no lobby
        fleetlab.wait_for(f"{victim.name} live again", partial(_live, fleet, heir, victim.name), 15, 0.2)
    return {"settings": {"heartbeat_s": float(fleet.env["NATCTL_FLEET_HEARTBEAT"]),
                         "dead_after_s": float(fleet.env["NATCTL_FLEET_DEAD_AFTER"]), "host_keepalive_s": KEEPALIVE,
                         "host_retry_s": RETRY, "player_every_ms": EVERY * 1000},
            "runs": each, "median": {key: percentile([r[key] for r in each if r[key] is not None], 50)
                                     for key in ("dead_s", "registered_s", "echoed_again_s", "lost")}}


def measure(fleet: FleetLab, args: argparse.Namespace, parts: set[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"lab": "natctl/lab/fleet.py: PostgreSQL (Unix socket) + 3 relay namespaces, regions "
                                  + ", ".join(REGIONS) + ", each running natctl serve"}
    if "placement" in parts:
        out["placement"] = placement(fleet, args.placements)
    if "changes" in parts:
        r1 = fleet.relays[0]
        out["changes"] = {"one_relay": churn(fleet, [r1] * 3, [r1] * 3, args.changes, args.seconds, 0),
                          "fleet": churn(fleet, fleet.relays, fleet.relays, args.changes, args.seconds, 1)}
    if "failover" in parts:
        out["failover"] = failover(fleet, args.failovers)
    return out


def summary(r: dict[str, Any]) -> list[list[str]]:
    def v(x: Any, unit: str = "") -> str:
        return "-" if x is None else f"{x:g}{unit}"

    p, rows = r.get("placement"), []
    for key, label in (("cli", "natctl lobby create (new process)"), ("service", "Service.lobby_create")):
        if p:
            rows.append([f"placement: {label}", f"p50 {v(p[key]['p50_ms'], ' ms')}, p95 {v(p[key]['p95_ms'], ' ms')}",
                         f"{p[key]['runs']} runs; placed on {p['placed_on']}"])
    for key, label in (("one_relay", "one relay (baseline)"), ("fleet", "3 relays")):
        if c := r.get("changes", {}).get(key):
            rows.append([f"changes/s: {label}", v(c["per_second"]), f"{c['changes']} changes ({c['remote']} remote) in "
                         f"{c['seconds']} s, p50 {c['p50_ms']} ms; drain lag {v(c['drain_lag_max_ms'], ' ms')} (a "
                         f"kernel read: {max(c['kernel_read_ms'].values(), default=None)} ms); errors {c['errors']}"])
    if f := r.get("failover"):
        for name, x in [(f"failover {i}: {x['killed']} killed", x) for i, x in enumerate(f["runs"], 1)] + [
                (f"failover: median of {len(f['runs'])}", {**f["median"], "moved_to": "-"})]:
            rows.append([name, f"echoed again {v(x['echoed_again_s'], ' s')}", f"dead {v(x['dead_s'], ' s')}, host "
                         f"registered {v(x['registered_s'], ' s')}, {v(x['lost'])} lost, to {x['moved_to']} (heartbeat "
                         f"{f['settings']['heartbeat_s']:g} s, dead_after {f['settings']['dead_after_s']:g} s)"])
    return rows


def _term(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM takes Ctrl-C's way out: everything made is removed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--placements", type=int, default=30, help="lobbies created each way")
    ap.add_argument("--changes", type=int, default=300, help="changes per relay through the control API")
    ap.add_argument("--seconds", type=float, default=20.0, help="longest change run")
    ap.add_argument("--failovers", type=int, default=3, help="relays killed, one after another")
    ap.add_argument("--parts", default="placement,changes,failover", help="which figures to measure")
    ap.add_argument("--json", help="where the JSON goes (default: bench/results/fleet-DATE.json)")
    args = ap.parse_args(argv)
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= {"placement", "changes", "failover"} or min(args.placements, args.changes, args.failovers) < 1 \
            or not 0 < args.seconds <= 600:
        ap.error("--parts takes placement,changes,failover; counts at least 1, --seconds up to 600")
    benchlab.need_root()
    previous = signal.signal(signal.SIGTERM, _term)
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="natctl-fleet-bench-") as tmp:
            fleet = fleetlab.build(tmp, REGIONS, SITES)
            try:
                fleet.start()
                result = measure(fleet, args, parts)
            finally:
                fleet.close()
    finally:
        signal.signal(signal.SIGTERM, previous)
    result["seconds"] = round(time.monotonic() - started, 1)
    result["command"] = "sudo .venv/bin/python -m bench.fleet " + " ".join(argv if argv is not None else sys.argv[1:])
    with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON's
        from natctl.output import table

        table("fleet (bench.fleet)", ["figure", "value", "detail"], summary(result))
    path = args.json or str(ROOT / "bench" / "results" / time.strftime("fleet-%Y%m%d-%H%M%S.json"))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    print(f"written: {path}", file=sys.stderr)
    return benchlab.report(result, path)


if __name__ == "__main__":
    benchlab.standalone(main, "bench.fleet")
