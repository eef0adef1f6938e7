"""A spoofed flood at a host port: what it costs ``natctl serve``, and how soon an allowed player gets in meanwhile.

    sudo .venv/bin/python -m bench.flood [--packets 100000] [--sources 10000] [--rate 20000] [--clients 20] [--json FILE]

In the bench's lab (bench/lab.py) the daemon serves two lobbies, each with a host that registered
over UDP: ``bench`` admits the players' network only (--allow 198.18.1.0/24), ``crowd`` is open
(--open --max-clients 8). A raw socket in the world sends ``--packets`` UDP datagrams from
``--sources`` spoofed addresses (10,000 by default, in 198.18.64.0/18, each sending a few),
paced at ``--rate`` and bounded in packets and seconds, twice:

- ``refused``: at bench's host port. Every source is outside the lobby's networks, so the kernel
  drops it (table inet natctl, set allow4, counter unknown_refused) and the daemon hears nothing.
- ``at_limit``: at crowd's host port. An open lobby admits everyone, so only the kernel's rate
  limits (200/s per source, 2,000/s in all) stand between the flood and the daemon: the first
  8 sources join, the lobby is full, and the daemon refuses the rest, about 2,000 a second.

During each flood, ``--clients`` new players of bench (198.18.1.2) join one after another: the
latency of each is from its first packet to its first packet forwarded by the kernel (TTL 63),
as in bench/daemon.py. The daemon's CPU is read from /proc/PID/stat (user + system time, all
threads) and from schedstat (nanoseconds). Targets (issue 14): the daemon under a quarter of a
core at the kernel's limit, an allowed player forwarded within 50 ms. Prints JSON; removes
everything it made, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench import cpu, daemon
from bench import lab as benchlab
from bench.config import (
    CLIENT_IP,
    CLIENT_NET,
    DAEMON_HOST_PORT,
    HOST_IP,
    REGISTRATION_PORT,
    RELAY_IP,
    child_env,
)
from bench.forwarding import quiet
from bench.lab import BenchLab, wait_bound
from bench.methods import Context
from bench.stats import percentile
from bench.tool import BenchError
from natctl.lab.netns import run
from natctl.lab.traffic import udp_socket

SPOOF_NET = ipaddress.IPv4Network("198.18.64.0/18")  # 16,384 addresses, outside CLIENT_NET, on the relay's /16
CROWD_HOST_PORT = DAEMON_HOST_PORT + 1
TARGET_CORE_SHARE = 0.25
TARGET_LATENCY_MS = 50.0
TICK = os.sysconf("SC_CLK_TCK")


# --- the sender: a raw socket in the world, spoofed sources (run as a subprocess on the load CPU)

def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def datagram(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    """An IPv4 + UDP datagram from ``src``: the kernel fills in the IP checksum and id (IP_HDRINCL)."""
    length = 8 + len(payload)
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    udp = struct.pack("!HHHH", sport, dport, length, 0) + payload
    check = _checksum(s + d + struct.pack("!BBH", 0, socket.IPPROTO_UDP, length) + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", check) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0, 64, socket.IPPROTO_UDP, 0, s, d)
    return ip + udp


def spoofed_sources(count: int) -> list[str]:
    if not 1 <= count <= SPOOF_NET.num_addresses - 2:
        raise BenchError(f"invalid --sources {count}", f"use 1 to {SPOOF_NET.num_addresses - 2}")
    hosts = SPOOF_NET.hosts()
    return [str(next(hosts)) for _ in range(count)]


def send(dst: str, dport: int, sources: int, packets: int, rate: float, seconds: float) -> dict[str, Any]:
    """``packets`` datagrams round-robin over ``sources`` spoofed addresses, paced at ``rate``, within ``seconds``."""
    frames = [datagram(ip, 40000 + i % 20000, dst, dport, b"natctl-flood-%d" % i)
              for i, ip in enumerate(spoofed_sources(sources))]
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sent, t0 = 0, time.monotonic()
    burst = max(1, int(rate / 1000))  # a burst per millisecond
    try:
        while sent < packets and (now := time.monotonic()) - t0 < seconds:  # bounded both ways
            due = min(packets, int((now - t0) * rate) + burst)
            while sent < due:
                try:
                    sock.sendto(frames[sent % len(frames)], (dst, 0))
                except BlockingIOError:
                    break
                sent += 1
            time.sleep(0.0005)
    finally:
        sock.close()
    return {"sent": sent, "seconds": time.monotonic() - t0, "sources": sources}


# --- the measurement, from the bench's main process

def proc_cpu_s(pid: int) -> float:
    """User + system time of a process and all its threads, from /proc/PID/stat (clock ticks)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def named_counters(lab: BenchLab) -> dict[str, int]:
    out = run(["nft", "-j", "list", "counters", "table", "inet", "natctl"], ns=lab.relay_ns, check=False)
    if out.returncode != 0:
        return {}
    return {c["counter"]["name"]: c["counter"]["packets"] for c in json.loads(out.stdout)["nftables"] if "counter" in c}


def _natctl(lab: BenchLab, state: str, *args: str) -> dict[str, Any]:
    made = subprocess.run(daemon._natctl(lab, state, *args, "--json"), capture_output=True, text=True, timeout=60,
                          env=child_env())
    if made.returncode != 0:
        raise BenchError(f"natctl {' '.join(args)} failed: {made.stderr.strip()[-300:]}")
    return json.loads(made.stdout)


def phase(lab: BenchLab, pid: int, host: socket.socket, bench_port: int, target_port: int, args: argparse.Namespace,
          first_client: int) -> dict[str, Any]:
    """One flood at ``target_port`` while ``args.clients`` players of bench join; every figure of it."""
    waited = quiet(lab)
    counters0, stat0, sched0 = named_counters(lab), proc_cpu_s(pid), cpu.task_runtime_ns(pid)
    udp0 = {f: lab.relay_udp(f) for f in ("InDatagrams", "RcvbufErrors")}
    sender = subprocess.Popen(
        ["ip", "netns", "exec", lab.world_ns, *lab.on_load_cpu([sys.executable, "-m", "bench.flood", "--send",
                                                                f"{RELAY_IP}:{target_port}", "--sources", str(args.sources),
                                                                "--packets", str(args.packets), "--rate", str(args.rate),
                                                                "--seconds", str(args.seconds)])],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
    t0 = time.monotonic()
    latencies: list[float] = []
    missed = 0
    try:
        time.sleep(0.5)  # the flood is on
        for i in range(args.clients):
            if sender.poll() is not None:
                break
            client = udp_socket(lab.world_ns, CLIENT_IP, first_client + i)
            try:
                ms = daemon._client_latency(host, client, (RELAY_IP, bench_port), args.budget)
            finally:
                client.close()
            if ms is None:
                missed += 1
            else:
                latencies.append(ms)
            daemon._drain(host)
            time.sleep(0.05)
        out, err = sender.communicate(timeout=args.seconds + 30)
    finally:
        if sender.poll() is None:
            sender.kill()
            sender.wait()
    if sender.returncode != 0:
        raise BenchError(f"the flood's sender failed: {err.strip()[-300:]}")
    flood_s = time.monotonic() - t0
    time.sleep(1.0)  # what reached the daemon is handled by now
    stat1, sched1, counters1 = proc_cpu_s(pid), cpu.task_runtime_ns(pid), named_counters(lab)
    udp1 = {f: lab.relay_udp(f) for f in udp0}
    sent = json.loads(out)
    cpu_s = stat1 - stat0
    window = flood_s + 1.0
    return {
        "sent": sent["sent"], "sources": sent["sources"], "send_seconds": round(sent["seconds"], 2),
        "offered_pps": round(sent["sent"] / sent["seconds"]) if sent["seconds"] else None,
        "kernel": {name: counters1.get(name, 0) - counters0.get(name, 0)
                   for name in ("unknown_refused", "unknown_blocked", "unknown_limited")},
        "reached_daemon": udp1["InDatagrams"] - udp0["InDatagrams"],
        "daemon_queue_drops": udp1["RcvbufErrors"] - udp0["RcvbufErrors"],
        "daemon_cpu_s": round(cpu_s, 3), "daemon_cpu_schedstat_s": round((sched1 - sched0) / 1e9, 3),
        "window_s": round(window, 2), "daemon_core_share": round(cpu_s / window, 3),
        "clients": len(latencies) + missed, "clients_missed": missed,
        "p50_ms": percentile(latencies, 50), "max_ms": max(latencies, default=None),
        "latencies_ms": [round(x, 2) for x in sorted(latencies)], "waited_for_quiet_s": round(waited, 1),
    }


def measure(lab: BenchLab, ctx: Context, args: argparse.Namespace) -> dict[str, Any]:
    state = os.path.join(ctx.tmp, "flood.db")
    tokens = {"bench": _natctl(lab, state, "lobby", "create", "bench", "--allow", CLIENT_NET,
                               "--max-clients", str(3 * args.clients + 10))["token"],
              "crowd": _natctl(lab, state, "lobby", "create", "crowd", "--open", "--max-clients", "8")["token"]}
    from natctl.daemon.client import register

    try:
        with daemon.serving(lab, ctx, state) as served:
            host = udp_socket(lab.world_ns, HOST_IP, DAEMON_HOST_PORT)
            crowd = udp_socket(lab.world_ns, HOST_IP, CROWD_HOST_PORT)
            try:
                host.setsockopt(socket.IPPROTO_IP, daemon.IP_RECVTTL, 1)
                bench_port = register(host, (RELAY_IP, REGISTRATION_PORT), tokens["bench"])[1]
                crowd_port = register(crowd, (RELAY_IP, REGISTRATION_PORT), tokens["crowd"])[1]
                for port in (bench_port, crowd_port):
                    wait_bound(lab.relay_ns, port)
                quiet_ms = []
                for i in range(10):  # the same latency without a flood, for reference
                    client = udp_socket(lab.world_ns, CLIENT_IP, 43000 + i)
                    try:
                        ms = daemon._client_latency(host, client, (RELAY_IP, bench_port), args.budget)
                    finally:
                        client.close()
                    if ms is not None:
                        quiet_ms.append(ms)
                    daemon._drain(host)
                out = {"no_flood_p50_ms": percentile(quiet_ms, 50), "no_flood_ms": [round(x, 2) for x in quiet_ms],
                       "refused": phase(lab, served["pid"], host, bench_port, bench_port, args, 43100),
                       "at_limit": phase(lab, served["pid"], host, bench_port, crowd_port, args, 43100 + args.clients)}
            finally:
                host.close()
                crowd.close()
    finally:
        run(["nft", "delete", "table", "inet", "natctl"], ns=lab.relay_ns, check=False)
        run(["conntrack", "-F"], ns=lab.relay_ns, check=False)
    for name in ("refused", "at_limit"):
        p = out[name]
        p["target_core_share_met"] = p["daemon_core_share"] < TARGET_CORE_SHARE
        p["target_latency_met"] = p["clients_missed"] == 0 and p["max_ms"] is not None \
            and p["max_ms"] < TARGET_LATENCY_MS
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--packets", type=int, default=100_000, help="per flood (bounded with --seconds)")
    ap.add_argument("--sources", type=int, default=10_000, help="spoofed source addresses, in 198.18.64.0/18")
    ap.add_argument("--rate", type=float, default=20_000, help="packets/s the sender paces itself to")
    ap.add_argument("--seconds", type=float, default=15.0, help="at most this long per flood")
    ap.add_argument("--clients", type=int, default=20, help="players of the allowed network joining during each flood")
    ap.add_argument("--budget", type=float, default=1.0, help="seconds a player may wait before it counts as missed")
    ap.add_argument("--json", help="also write the results to this file")
    ap.add_argument("--send", metavar="IP:PORT", help=argparse.SUPPRESS)  # the sender's own mode (in the world)
    args = ap.parse_args(argv)
    if not (1 <= args.packets <= 10_000_000 and 100 <= args.rate <= 1_000_000 and 0.5 <= args.seconds <= 120
            and 0 <= args.clients <= 500):
        raise BenchError("a bound is out of range", "--packets 1-10000000, --rate 100-1000000, --seconds 0.5-120, "
                         "--clients 0-500")
    if args.send:
        ip, _, port = args.send.rpartition(":")
        print(json.dumps(send(ip, int(port), args.sources, args.packets, args.rate, args.seconds)))
        return 0
    reason = daemon.unavailable()
    if reason:
        raise BenchError(reason)
    with tempfile.TemporaryDirectory(prefix="natctl-flood-") as tmp, benchlab.session() as lab:
        result = {"layout": lab.layout, **measure(lab, Context(tmp), args),
                  "command": "sudo .venv/bin/python -m bench.flood " + " ".join(argv if argv is not None else sys.argv[1:])}
    return benchlab.report(result, args.json)


if __name__ == "__main__":
    benchlab.standalone(main, "bench.flood")
