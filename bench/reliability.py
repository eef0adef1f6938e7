"""Reliability figures (issue 14): what the relay sustains, and what a flood costs it.

    sudo .venv/bin/python -m bench.reliability [--changes 2000] [--installed 10000] [--cli-runs 30]
                                               [--junk 100000] [--rates 2000,5000,10000,20000,40000]
                                               [--parts cli,control,registration,log] [--json FILE]

In the bench's lab (bench/lab.py: a relay with one interface, a world holding every player):

- **CLI wall time per change**: `natctl map add` of one client, each a new
  process as a script runs it, with ``--installed`` mappings in the kernel
  (``--accel none``), timed inside the relay's namespace: with no daemon (the
  CLI makes the change), and while `natctl serve` runs (the CLI hands the
  change to it over the control socket). Python's bytecode cache is on (as on
  an installed natctl); without it is reported apart (``PYTHONDONTWRITEBYTECODE``
  checkouts compile every module each time), and `natctl --version` gives the
  machine's floor (interpreter, typer, the command line; no work). ``--baseline DIR``
  times another natctl package (e.g. ``git archive HEAD natctl | tar -x -C DIR``)
  in turns with this checkout's, so that both meet the same load.
- **Control API changes/s** (natctl.daemon.control): ``--changes`` changes
  through the daemon's socket, each sent when the previous one was answered,
  in cycles of lobby create, map add, map remove, lobby close; with the CLI's
  mappings still installed.
- **Packets lost during churn**: meanwhile a numbered flow of 1,000 datagrams a
  second each way runs through one mapping; every number must arrive.
- **Registration datagrams/s sustained**: REGISTER datagrams with wrong tokens
  from spoofed sources at increasing rates, while 20 hosts register with good
  tokens (each below the per-source limit); a rate is sustained when every good
  registration was answered and the registration socket dropped nothing.
- **Log lines per 100,000 junk datagrams**: ``--junk`` datagrams (wrong tokens
  and garbage, spoofed sources) to the registration port; the daemon's log
  lines from then until its aggregation interval has closed.

Prints JSON; removes everything it made, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench import cpu
from bench import lab as benchlab
from bench.config import CLIENT_IP, HOST_IP, PORTS, REGISTRATION_PORT, RELAY_IP, child_env
from bench.daemon import serving
from bench.lab import BenchLab, wait_bound
from bench.methods import Context
from bench.stats import percentile
from bench.tool import BenchError
from natctl.daemon import wire
from natctl.daemon.control_client import Control
from natctl.lab.netns import entered, natctl_argv, run
from natctl.lab.traffic import udp_socket

MAGIC = b"natctl-seq"
FLOW_CLIENT_PORT, FLOW_HOST_PORT = 43000, 27050  # 27015-27017: the bench lab's sink, echo, daemon host
SPOOF_NET = (198, 18, 128)  # spoofed sources: 198.18.128.0/17, inside the lab's 198.18.0.0/15 and on its link
GOOD_HOSTS = 20
GOOD_EVERY = 0.6  # seconds between a good host's registrations: below the daemon's 2 a second per source


# --- a numbered flow through one mapping, both ways


class SeqFlow:
    """Numbered datagrams both ways through one mapping at a steady rate, counted by number on arrival.

    ``client`` sends to ``to_host`` (the relay's host port), ``host`` to ``to_client`` (the client
    port). Bounded: at most ``rate * max_seconds`` datagrams each way."""

    def __init__(self, client: socket.socket, host: socket.socket, to_host: tuple[str, int],
                 to_client: tuple[str, int], rate: float = 1000.0, max_seconds: float = 120.0) -> None:
        self.client, self.host, self.to_host, self.to_client = client, host, to_host, to_client
        self.rate, self.most = rate, int(rate * max_seconds)
        self.sent = {"up": 0, "down": 0}
        self.got: dict[str, set[int]] = {"up": set(), "down": set()}
        self.dups = 0
        self._stop_send, self._stop_recv = threading.Event(), threading.Event()
        for s in (client, host):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.setblocking(False)
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._receive, daemon=True)]

    def start(self) -> SeqFlow:
        for t in self._threads:
            t.start()
        time.sleep(0.2)  # a steady flow before anything changes
        return self

    def _send(self) -> None:
        t0, n = time.monotonic(), 0
        while not self._stop_send.is_set() and n < self.most:
            due = t0 + n / self.rate
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            tag = n.to_bytes(8, "big") + MAGIC
            self.client.sendto(b"U" + tag, self.to_host)
            self.host.sendto(b"D" + tag, self.to_client)
            n += 1
            self.sent["up"] = self.sent["down"] = n

    def _receive(self) -> None:
        socks = [self.client, self.host]
        while not self._stop_recv.is_set():
            ready, _, _ = select.select(socks, [], [], 0.05)
            for s in ready:
                while True:
                    try:
                        data = s.recv(64)
                    except (BlockingIOError, InterruptedError):
                        break
                    if len(data) == 19 and data[9:] == MAGIC and data[:1] in (b"U", b"D"):
                        seen = self.got["up" if data[:1] == b"U" else "down"]
                        seq = int.from_bytes(data[1:9], "big")
                        self.dups += seq in seen
                        seen.add(seq)

    def stop(self) -> dict[str, Any]:
        self._stop_send.set()
        self._threads[0].join(5)
        time.sleep(0.5)  # what is in flight arrives
        self._stop_recv.set()
        self._threads[1].join(5)
        lost = {way: self.sent[way] - len(self.got[way]) for way in ("up", "down")}
        first = {way: sorted(set(range(self.sent[way])) - self.got[way])[:10] for way in ("up", "down")}
        return {"rate_each_way": self.rate, "sent": self.sent["up"] + self.sent["down"],
                "received": len(self.got["up"]) + len(self.got["down"]), "lost": lost["up"] + lost["down"],
                "lost_to_host": lost["up"], "lost_to_client": lost["down"], "first_lost": first,
                "duplicates": self.dups}


def churn(ctl: Control, changes: int, tag: str = "churn", pipelined: bool = False) -> dict[str, Any]:
    """``changes`` changes through the control API, each sent once the previous one was answered (or,
    ``pipelined``, each cycle's four at once): cycles of lobby create, map add, map remove, lobby close
    (other lobbies than any flow's)."""
    lat: list[float] = []
    by_op: dict[str, list[float]] = {}
    errors: list[str] = []
    t0 = time.perf_counter()
    i = 0
    while len(lat) < changes:
        name = f"{tag}{i}"
        host = f"198.19.{(i // 250) % 250}.{1 + i % 250}:27015"
        client = f"198.19.{250 + (i // 250) % 5}.{1 + i % 250}:40000"
        cycle = [{"op": "lobby.create", "name": name, "open": True}, {"op": "map.add", "lobby": name, "host": host,
                 "client": client}, {"op": "map.remove", "lobby": name, "client": client},
                 {"op": "lobby.close", "name": name}]
        batches = [cycle[:changes - len(lat)]] if pipelined else [[req] for req in cycle[:changes - len(lat)]]
        for batch in batches:
            t = time.perf_counter()
            replies = ctl.many(batch)
            took = (time.perf_counter() - t) * 1000 / len(batch)
            for req, reply in zip(batch, replies):
                lat.append(took)
                by_op.setdefault(req["op"], []).append(took)
                if not reply.get("ok"):
                    errors.append(f"{req['op']}: {reply.get('error')}")
        i += 1
    seconds = time.perf_counter() - t0
    return {"changes": len(lat), "seconds": round(seconds, 3), "per_second": round(len(lat) / seconds, 1),
            "p50_ms": _r(percentile(lat, 50)), "p99_ms": _r(percentile(lat, 99)), "max_ms": _r(max(lat)),
            "errors": len(errors), "first_errors": errors[:3],
            "p50_ms_by_op": {op: _r(percentile(ms, 50)) for op, ms in by_op.items()}}


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


# --- the CLI, one process per change

TIMER = r"""
import json, os, subprocess, sys, time
variants, n = json.loads(sys.argv[1]), int(sys.argv[2])
out = [[] for _ in variants]
for i in range(n):
    for k, (argv, env) in enumerate(variants):  # in turns: a baseline meets the same load as this checkout
        a = [x.replace("{i}", str(i)) for x in argv]
        t = time.perf_counter()
        p = subprocess.run(a, capture_output=True, text=True, env={**os.environ, **env})
        out[k].append(time.perf_counter() - t)
        if p.returncode:
            sys.exit("natctl failed: " + p.stderr[-300:])
print(json.dumps(out))
"""


def _cli(state: str, *args: str) -> list[str]:
    return natctl_argv(state, "--ports", str(PORTS), "--accel", "none", *args, relay_ip=RELAY_IP)


def install(lab: BenchLab, state: str, mappings: int, env: dict[str, str]) -> float:
    """``mappings`` clients in lobbies of 1,000 (one `natctl map add` each); seconds it took."""
    t0 = time.monotonic()
    for lobby in range((mappings + 999) // 1000):
        count = min(1000, mappings - lobby * 1000)
        _ok(run_env(lab, _cli(state, "lobby", "create", f"fill{lobby}", "--open", "--max-clients", "65535"), env))
        clients = [a for c in range(count) for a in ("--client", f"198.19.{lobby}.{1 + c // 200}:{10000 + c % 200}")]
        _ok(run_env(lab, _cli(state, "map", "add", "--lobby", f"fill{lobby}", "--host",
                              f"198.19.200.{1 + lobby}:27015", *clients), env, timeout=300))
    return time.monotonic() - t0


def run_env(lab: BenchLab, argv: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", "netns", "exec", lab.relay_ns, *argv], capture_output=True, text=True,
                          timeout=timeout, env=env)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    if proc.returncode != 0:
        raise BenchError(f"{' '.join(proc.args[4:8])}... failed: {proc.stderr.strip()[-300:]}")
    return proc


def cli_wall(lab: BenchLab, state: str, runs: int, env: dict[str, str], lobby: str,
             argv: list[str] | None = None, baseline: str | None = None) -> Any:
    """Wall time of `natctl map add` (one new client each), ``runs`` processes one after another. With
    ``baseline`` (a directory holding another natctl package), that natctl's too, in turns with this one's:
    (this one's, the baseline's)."""
    def command() -> list[str]:
        return argv or _cli(state, "map", "add", "--lobby", lobby, "--host", "198.19.201.1:27015", "--client",
                            f"198.19.{random.randrange(202, 250)}.{{i}}:{20000 + random.randrange(10000)}")

    variants: list[tuple[list[str], dict[str, str]]] = [(command(), {})]
    if baseline:
        # PYTHONSAFEPATH: python -m puts the working directory (this checkout) first on the path otherwise
        variants.append((command(), {"PYTHONPATH": os.pathsep.join([baseline, env.get("PYTHONPATH", "")]),
                                     "PYTHONSAFEPATH": "1"}))
    proc = _ok(run_env(lab, [sys.executable, "-c", TIMER, json.dumps(variants), str(runs)], env, timeout=600))
    figures = [_figures(times) for times in json.loads(proc.stdout)]
    return (figures[0], figures[1]) if baseline else figures[0]


def _figures(seconds: list[float]) -> dict[str, Any]:
    ms = sorted(t * 1000 for t in seconds)
    return {"runs": len(ms), "p50_ms": _r(percentile(ms, 50)), "min_ms": _r(ms[0]), "p90_ms": _r(percentile(ms, 90)),
            "max_ms": _r(ms[-1])}


# --- spoofed junk and good registrations


def _udp_packet(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> bytes:
    """An IPv4+UDP datagram (UDP checksum 0: none, which IPv4 allows; the kernel fills in the IP checksum)."""
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + 8 + len(payload), 0, 0, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    return ip + struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload


def junk_packets(count: int, garbage_share: float = 0.5, seed: int = 14) -> list[bytes]:
    """Registrations with wrong tokens and plain garbage, each from a spoofed source."""
    rnd = random.Random(seed)
    out = []
    for _ in range(count):
        src = (f"{SPOOF_NET[0]}.{SPOOF_NET[1]}.{rnd.randrange(SPOOF_NET[2], 256)}.{rnd.randrange(1, 255)}",
               rnd.randrange(1024, 65535))
        if rnd.random() < garbage_share:
            payload = rnd.randbytes(rnd.randrange(1, 64))
        else:
            payload = wire.encode_request(rnd.randbytes(24).hex(), rnd.randrange(1 << 32), rnd.choice((1, 2)))
        out.append(_udp_packet(src, (RELAY_IP, REGISTRATION_PORT), payload))
    return out


class Spoofer:
    """A raw socket in the world namespace that sends prebuilt datagrams at a paced rate."""

    def __init__(self, lab: BenchLab) -> None:
        with entered(lab.world_ns):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)

    def send(self, packets: list[bytes], count: int, rate: float, stop: threading.Event | None = None) -> dict[str, float]:
        t0, n = time.monotonic(), 0
        while n < count and not (stop and stop.is_set()):
            ahead = t0 + n / rate - time.monotonic()
            if ahead > 0:
                time.sleep(min(ahead, 0.01))
                continue
            for _ in range(min(64, count - n)):  # a burst of what is due, then look at the clock again
                try:
                    self.sock.sendto(packets[n % len(packets)], (RELAY_IP, 0))
                except BlockingIOError:
                    break
                n += 1
                if t0 + n / rate > time.monotonic():
                    break
        return {"sent": n, "seconds": round(time.monotonic() - t0, 3)}

    def close(self) -> None:
        self.sock.close()


class GoodHosts:
    """Hosts with real lobby tokens registering from their own addresses, each every GOOD_EVERY seconds."""

    def __init__(self, lab: BenchLab, tokens: list[str]) -> None:
        self.tokens = tokens
        self.socks = []
        for i in range(len(tokens)):
            ip = f"198.18.2.{100 + i}"
            run(["ip", "addr", "add", f"{ip}/16", "dev", lab.world_if], ns=lab.world_ns, check=False)
            s = udp_socket(lab.world_ns, ip, 27100)
            s.setblocking(False)
            self.socks.append(s)
        self.sent = self.answered = 0

    def run(self, seconds: float) -> dict[str, int]:
        """Register for ``seconds``; answers that come within GOOD_EVERY count."""
        sent = answered = 0
        nonce = random.randrange(1 << 30)
        pending: dict[tuple[int, int], float] = {}
        t_end = time.monotonic() + seconds
        next_round = time.monotonic()
        while time.monotonic() < t_end + GOOD_EVERY:
            now = time.monotonic()
            if now >= next_round and now < t_end:
                for i, (s, token) in enumerate(zip(self.socks, self.tokens)):
                    nonce += 1
                    s.sendto(wire.encode_request(token, nonce, 1), (RELAY_IP, REGISTRATION_PORT))
                    pending[(i, nonce)] = now
                    sent += 1
                next_round += GOOD_EVERY
            ready, _, _ = select.select(self.socks, [], [], 0.02)
            for s in ready:
                i = self.socks.index(s)
                while True:
                    try:
                        data = s.recv(128)
                    except (BlockingIOError, InterruptedError):
                        break
                    try:
                        kind, got, _ = wire.decode_reply(data)
                    except wire.WireError:
                        continue
                    if kind == wire.REGISTERED and pending.pop((i, got), None) is not None:
                        answered += 1
        return {"good_sent": sent, "good_answered": answered}

    def close(self) -> None:
        for s in self.socks:
            s.close()


def _flood(spoofer: Spoofer, packets: list[bytes], count: int, rate: float, stop: threading.Event,
           result: dict[str, Any]) -> None:
    result.update(spoofer.send(packets, count, rate, stop))


def registration_ramp(lab: BenchLab, pid: int, tokens: list[str], rates: list[int], seconds: float) -> dict[str, Any]:
    steps = []
    spoofer, good = Spoofer(lab), GoodHosts(lab, tokens)
    packets = junk_packets(20_000)
    try:
        good.run(1.0)  # the hosts' first registrations (and their log lines) before the floods
        for rate in rates:
            drops0, cpu0 = lab.relay_udp("RcvbufErrors"), cpu.task_runtime_ns(pid)
            stop = threading.Event()
            result: dict[str, Any] = {}
            flood = threading.Thread(target=_flood, args=(spoofer, packets, int(rate * seconds), rate, stop, result),
                                     daemon=True)
            flood.start()
            counts = good.run(seconds)
            stop.set()
            flood.join(10)
            time.sleep(0.5)
            drops = lab.relay_udp("RcvbufErrors") - drops0
            cpu_s = (cpu.task_runtime_ns(pid) - cpu0) / 1e9
            sent = result.get("sent", 0)
            achieved = sent / result["seconds"] if result.get("seconds") else 0
            steps.append({"rate": rate, "junk_sent": sent, "junk_per_second": round(achieved), **counts,
                          "socket_drops": drops, "daemon_cpu_share": round(cpu_s / (seconds + 0.5), 3),
                          "no_loss": counts["good_answered"] == counts["good_sent"] and drops == 0})
    finally:
        spoofer.close()
        good.close()
    held = [s["junk_per_second"] for s in steps if s["no_loss"]]
    return {"sustained_per_second": max(held) if held else 0, "steps": steps}


def log_lines(lab: BenchLab, log_path: str, junk: int, rate: int = 20_000) -> dict[str, Any]:
    """Log lines the daemon writes for ``junk`` junk datagrams (until its aggregation interval closed)."""
    before = _lines(log_path)
    spoofer = Spoofer(lab)
    try:
        sent = spoofer.send(junk_packets(min(junk, 50_000), seed=41), junk, rate)
    finally:
        spoofer.close()
    time.sleep(12)  # natctl.daemon.log.Repeats: one interval (10 s) for the summary lines
    lines = _lines(log_path)[len(before):]
    per_100k = len(lines) * 100_000 / max(sent["sent"], 1)
    return {"junk": sent["sent"], "lines": len(lines), "per_100000": round(per_100k, 1),
            "bytes": sum(len(x) + 1 for x in lines), "events": sorted({_event(x) for x in lines})}


def _lines(path: str) -> list[str]:
    return [x for x in Path(path).read_text(errors="replace").splitlines() if x.strip()]


def _event(line: str) -> str:
    try:
        return str(json.loads(line).get("event"))
    except ValueError:
        return line[:40]


# --- the run


def measure(lab: BenchLab, ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    state = os.path.join(ctx.tmp, "natctl.db")
    cache = os.path.join(ctx.tmp, "pycache")
    warm = {**child_env(PYTHONPYCACHEPREFIX=cache)}
    warm.pop("PYTHONDONTWRITEBYTECODE", None)
    cold = {**child_env(PYTHONDONTWRITEBYTECODE="1")}
    out: dict[str, Any] = {"lab": "bench lab (bench/lab.py): relay with one veth, --accel none", "layout": lab.layout}
    parts = set(args.parts.split(","))
    out["installed"] = args.installed
    out["install_seconds"] = round(install(lab, state, args.installed, warm), 1)
    if "cli" in parts:
        _ok(run_env(lab, _cli(state, "lobby", "create", "cli", "--open", "--max-clients", "65535"), warm))
        cli_wall(lab, state, 2, warm, "cli", baseline=args.baseline)  # fills the bytecode cache
        version = _cli(state, "--version")
        if args.baseline:  # this checkout against another, in turns (so both under the same load)
            out["cli_map_add"], out["baseline_cli_map_add"] = cli_wall(lab, state, args.cli_runs, warm, "cli",
                                                                       baseline=args.baseline)
        else:
            out["cli_map_add"] = cli_wall(lab, state, args.cli_runs, warm, "cli")
        out["cli_map_add_no_bytecode_cache"] = cli_wall(lab, state, max(5, args.cli_runs // 3), cold, "cli")
        # The floor on this machine: the interpreter, typer and natctl's command line, no work at all.
        if args.baseline:
            out["cli_version"], out["baseline_cli_version"] = cli_wall(lab, state, args.cli_runs, warm, "cli", version,
                                                                       args.baseline)
            out["baseline"] = args.baseline
        else:
            out["cli_version"] = cli_wall(lab, state, args.cli_runs, warm, "cli", version)
    if parts & {"control", "registration", "log"}:
        _daemon_parts(lab, ctx, state, args, parts, out)
    run(["nft", "delete", "table", "inet", "natctl"], ns=lab.relay_ns, check=False)
    out["targets"] = {}
    if "cli" in parts:
        out["targets"]["cli_map_add_under_150ms"] = bool(out["cli_map_add"]["p50_ms"] < 150)
        if "cli_map_add_through_daemon" in out:
            out["targets"]["cli_map_add_through_daemon_under_150ms"] = bool(
                out["cli_map_add_through_daemon"]["p50_ms"] < 150)
    if "control" in parts:
        out["targets"]["control_api_at_least_500_per_s"] = bool(out["control_api"]["per_second"] >= 500)
        out["targets"]["no_packet_lost_during_churn"] = out["churn_flow"]["lost"] == 0
    return out


def _daemon_parts(lab: BenchLab, ctx: Context, state: str, args: argparse.Namespace, parts: set[str],
                  out: dict[str, Any]) -> None:
    with serving(lab, ctx, state, cleanup="1h") as daemon:
        ctl = _connect(state + ".sock")
        try:
            if "cli" in parts:  # the same command while the daemon runs: the CLI hands it the change
                warm = {**child_env(PYTHONPYCACHEPREFIX=os.path.join(ctx.tmp, "pycache"))}
                warm.pop("PYTHONDONTWRITEBYTECODE", None)
                out["cli_map_add_through_daemon"] = cli_wall(lab, state, args.cli_runs, warm, "cli")
            if "control" in parts:
                ctl.call("lobby.create", name="flow", open=True)
                m = ctl.call("map.add", lobby="flow", host=f"{HOST_IP}:{FLOW_HOST_PORT}",
                             client=f"{CLIENT_IP}:{FLOW_CLIENT_PORT}")
                client = udp_socket(lab.world_ns, CLIENT_IP, FLOW_CLIENT_PORT)
                host = udp_socket(lab.world_ns, HOST_IP, FLOW_HOST_PORT)
                try:
                    flow = SeqFlow(client, host, (RELAY_IP, m["host_port"]), (RELAY_IP, m["client_port"])).start()
                    out["control_api"] = churn(ctl, args.changes)
                    out["control_api_pipelined"] = churn(ctl, args.changes, tag="piped", pipelined=True)
                    out["churn_flow"] = flow.stop()
                finally:
                    client.close()
                    host.close()
                out["control_api"]["installed"] = args.installed
            if "registration" in parts:
                tokens = [ctl.call("lobby.create", name=f"good{i}", open=True)["token"] for i in range(GOOD_HOSTS)]
                wait_bound(lab.relay_ns, REGISTRATION_PORT)
                rates = [int(r) for r in args.rates.split(",") if r.strip()]
                out["registration"] = registration_ramp(lab, daemon["pid"], tokens, rates, args.step_seconds)
            if "log" in parts:
                out["log"] = log_lines(lab, os.path.join(ctx.tmp, "serve.log"), args.junk)
        finally:
            ctl.close()


def _connect(path: str, seconds: float = 10.0) -> Control:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return Control(path)
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.reliability", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=2000, help="changes through the control API")
    ap.add_argument("--installed", type=int, default=10_000, help="mappings installed (with the CLI) first")
    ap.add_argument("--cli-runs", type=int, default=30, help="`natctl map add` processes timed")
    ap.add_argument("--junk", type=int, default=100_000, help="junk datagrams for the log figure")
    ap.add_argument("--rates", default="2000,5000,10000,20000,40000", help="junk registrations/s, one step each")
    ap.add_argument("--step-seconds", type=float, default=3.0)
    ap.add_argument("--parts", default="cli,control,registration,log", help="which figures to measure")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--baseline", metavar="DIR", help="also time the CLI of the natctl package in DIR (e.g. "
                    "'git archive HEAD natctl | tar -x -C DIR'), in turns with this checkout's: baseline_cli_*")
    args = ap.parse_args(argv)
    if args.baseline:
        args.baseline = os.path.abspath(args.baseline)
        if not os.path.isfile(os.path.join(args.baseline, "natctl", "__init__.py")):
            ap.error(f"--baseline {args.baseline}: no natctl package there")
    with tempfile.TemporaryDirectory(prefix="natctl-reliability-") as tmp, benchlab.session() as lab:
        result = measure(lab, Context(tmp), args)
    result["command"] = "sudo .venv/bin/python -m bench.reliability " + " ".join(argv if argv is not None else sys.argv[1:])
    return benchlab.report(result, args.json)


if __name__ == "__main__":
    benchlab.standalone(main, "bench.reliability")
