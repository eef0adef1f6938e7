#!/usr/bin/env python3
"""How fast does a new client's traffic flow in the kernel, and what does a flood cost the daemon?

    sudo .venv/bin/python bench/admission.py [--clients 200] [--flood 100000]

1. Admission latency: a host registers with `natctl serve` in the lab; each of N
   new clients sends its first packet, then a numbered packet every 0.2 ms. The
   host tells packets forwarded by the kernel from those the daemon delivered
   by their TTL (the kernel's path crosses one more router hop). Latency is the
   send time of the first kernel-forwarded packet minus that of the first packet.
2. Flood: a sender outside the lobby's networks sends N packets to the host
   port as fast as Python can; the kernel drops all but a rate-limited few; we
   report how many reached the daemon and the daemon's CPU time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import sys
import tempfile
import time

from natctl.daemon.client import register

IP_RECVTTL = 12  # Linux; the TTL arrives as an IP_TTL control message
from natctl.lab import topology
from natctl.lab.netns import run, spawn, stop
from natctl.lab.traffic import udp_socket


def natctl(lab, state, *args):
    out = run([sys.executable, "-m", "natctl", "--state", state, *args], ns=lab.relay_ns)
    return out.stdout


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its threads (clock ticks -> seconds)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_pid(lab) -> int:
    for pid in run(["ip", "netns", "pids", lab.relay_ns]).stdout.split():
        if b"serve" in open(f"/proc/{pid}/cmdline", "rb").read():
            return int(pid)
    raise RuntimeError("no daemon")


def admission(lab, relay_ip, host_port, host, clients: int) -> list[float]:
    host.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
    host.settimeout(0.05)
    latencies = []
    for i in range(clients):
        c = udp_socket(lab.ns("client1"), port=43000 + i)
        t0 = time.perf_counter()
        sent_at = {}
        kernel_seen = None
        seq = 0
        deadline = t0 + 0.5
        while kernel_seen is None and time.perf_counter() < deadline:  # bounded: 0.5 s, ~2500 packets
            sent_at[seq] = time.perf_counter()
            c.sendto(seq.to_bytes(4, "big"), (relay_ip, host_port))
            seq += 1
            try:
                while True:
                    host.setblocking(False)
                    data, anc, _, _ = host.recvmsg(64, socket.CMSG_SPACE(4))
                    ttl = int.from_bytes(anc[0][2][:4], sys.byteorder) if anc else 0
                    n = int.from_bytes(data[:4], "big")
                    if ttl < 62 and kernel_seen is None:  # kernel path: one hop more than the daemon's
                        kernel_seen = sent_at[n] - t0
            except (BlockingIOError, OSError):
                pass
            time.sleep(0.0002)
        c.close()
        if kernel_seen is not None:
            latencies.append(kernel_seen * 1000)
        time.sleep(0.01)
        host.setblocking(True)
        while True:  # drain
            host.settimeout(0.01)
            try:
                host.recvfrom(64)
            except OSError:
                break
    return latencies


def kernel_drops(lab) -> int:
    """Packets to host ports that the kernel dropped before the daemon (blocked or rate-limited)."""
    doc = json.loads(run(["nft", "-j", "list", "counters", "table", "inet", "natctl"], ns=lab.relay_ns).stdout)
    named = {c["counter"]["name"]: c["counter"]["packets"] for c in doc["nftables"] if "counter" in c}
    return named.get("unknown_blocked", 0) + named.get("unknown_limited", 0)


def flood(lab, relay_ip, host_port, count: int) -> dict:
    pid = daemon_pid(lab)
    s = udp_socket(lab.ns("stranger"), port=44000)
    before, drops_before = cpu_seconds(pid), kernel_drops(lab)
    t0 = time.perf_counter()
    payload = b"x" * 32
    for _ in range(count):
        try:
            s.sendto(payload, (relay_ip, host_port))
        except OSError:
            pass
    sent_s = time.perf_counter() - t0
    time.sleep(1.0)
    cpu = cpu_seconds(pid) - before
    s.close()
    dropped = kernel_drops(lab) - drops_before
    return {"sent": count, "send_seconds": round(sent_s, 2), "dropped_in_kernel": dropped,
            "reached_daemon_at_most": count - dropped, "daemon_cpu_ms": round(cpu * 1000, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--flood", type=int, default=100_000)
    ap.add_argument("--cleanup-interval", default="30s", help="the daemon's (its cleanup competes for the store)")
    ap.add_argument("--json", help="write results here")
    args = ap.parse_args()
    lab = topology.build({"home-host": ["host"], "home-clients": ["client1"], "elsewhere": ["stranger"]})
    tmp = tempfile.mkdtemp(prefix="natctl-bench-")
    state = os.path.join(tmp, "natctl.db")
    daemon = None
    try:
        token = json.loads(natctl(lab, state, "lobby", "create", "bench", "--allow", "198.18.2.0/24",
                                  "--max-clients", str(args.clients + 10), "--json"))["token"]
        daemon = spawn([sys.executable, "-m", "natctl", "--state", state, "serve", "--cleanup-interval", args.cleanup_interval],
                       ns=lab.relay_ns, stderr=open(os.path.join(tmp, "serve.log"), "wb"))
        time.sleep(1.5)
        host = udp_socket(lab.ns("host"), port=27015)
        relay_ip, host_port = register(host, (lab.relay_ip, 8809), token)
        time.sleep(1.2)
        lat = sorted(admission(lab, relay_ip, host_port, host, args.clients))
        result = {"clients": args.clients, "admitted": len(lat)}
        if lat:
            result.update(p50_ms=round(statistics.median(lat), 2),
                          p99_ms=round(lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2), max_ms=round(lat[-1], 2))
        result["flood"] = flood(lab, relay_ip, host_port, args.flood)
        result["target_p99_under_10ms"] = bool(lat) and result["p99_ms"] < 10
        print(json.dumps(result, indent=2))
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(result, fh, indent=2)
        return 0
    finally:
        if daemon is not None:
            stop(daemon)
        lab.teardown()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
