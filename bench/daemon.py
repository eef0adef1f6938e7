"""The registration daemon (``natctl serve``) in the bench: admission latency, a flood, and memory.

Admission: a host registers its lobby over UDP; then each new client sends a
numbered packet every 0.2 ms. The daemon delivers the first packets itself
(from the relay, TTL 64) and installs the mapping; from then on the kernel
forwards them (one hop, TTL 63). The latency of a client is the send time of
its first kernel-forwarded packet minus that of its first packet.

Flood (``python -m bench.admission --flood N``): a stranger outside the lobby's
network sends N packets to the host port with the load tool; the kernel drops
all but a rate-limited few (counted by natctl's table), so at most those reach
the daemon, whose CPU time is measured.

Memory: the daemon started on a store of N mappings that the kernel already
holds (a restart on a busy relay): how long its first reconcile took and its
resident memory afterwards.

Available when natctl.daemon is in the checkout; otherwise the suite says so.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench import cpu, forwarding
from bench.config import (
    CLIENT_IP,
    CLIENT_NET,
    DAEMON_HOST_PORT,
    HOST_IP,
    PORTS,
    REGISTRATION_PORT,
    RELAY_IP,
    STRANGER_IP,
    child_env,
)
from bench.lab import BenchLab, wait_bound
from bench.methods import Context
from bench.stats import percentile
from bench.tool import BenchError
from natctl.lab.netns import natctl_argv, run, spawn, stop
from natctl.lab.traffic import udp_socket

IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12)
KERNEL_TTL = 63  # forwarded once by the relay; the daemon's own deliveries leave with 64


def unavailable() -> str | None:
    for module in ("natctl.daemon.server", "natctl.daemon.client"):
        if importlib.util.find_spec(module) is None:
            return f"the registration daemon is not in this checkout ({module} is missing)"
    return None


def _natctl(lab: BenchLab, state: str, *args: str) -> list[str]:
    """natctl's CLI in the relay, on the relay CPU, with the bench's address and ports and no XDP."""
    return natctl_argv(state, "--ports", str(PORTS), "--accel", "none", *args, ns=lab.relay_ns, relay_ip=RELAY_IP,
                       python=lab.on_relay_cpu([sys.executable]))


@contextmanager
def serving(lab: BenchLab, ctx: Context, state: str, cleanup: str = "1h",
            timeout: float = 240) -> Iterator[dict[str, Any]]:
    """``natctl serve`` in the relay, up once it logged 'started'; stopped afterwards, whatever happens."""
    log_path = os.path.join(ctx.tmp, "serve.log")
    Path(log_path).unlink(missing_ok=True)
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = spawn(_natctl(lab, state, "serve", "--cleanup-interval", cleanup), stdout=subprocess.DEVNULL,
                     stderr=log, env=child_env())
    try:
        while '"started"' not in Path(log_path).read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() - t0 > timeout:
                tail = Path(log_path).read_text(errors="replace")[-300:]
                raise BenchError(f"natctl serve did not start: {tail.strip()}")
            time.sleep(0.05)
        yield {"pid": proc.pid, "start_s": time.monotonic() - t0}
    finally:
        stop(proc)


def _client_latency(host: socket.socket, client: socket.socket, target: tuple[str, int], budget: float) -> float | None:
    """Milliseconds from a client's first packet to its first kernel-forwarded one (None: not within budget)."""
    sent_at: list[float] = []
    t0 = time.perf_counter()
    host.setblocking(False)
    while time.perf_counter() - t0 < budget:  # bounded: budget / 0.2 ms packets at most
        sent_at.append(time.perf_counter())
        client.sendto(len(sent_at).to_bytes(4, "big") + b"natctl-bench", target)
        try:
            while True:
                data, anc, _, _ = host.recvmsg(64, socket.CMSG_SPACE(4))
                ttl = int.from_bytes(anc[0][2][:4], sys.byteorder) if anc else 0
                seq = int.from_bytes(data[:4], "big")
                if ttl == KERNEL_TTL and 0 < seq <= len(sent_at):
                    return (sent_at[seq - 1] - sent_at[0]) * 1000
        except (BlockingIOError, InterruptedError):
            pass
        time.sleep(0.0002)
    return None


def admission(lab: BenchLab, ctx: Context, clients: int = 50, budget: float = 0.5, flood: int = 0,
              cleanup: str = "1h") -> dict[str, Any]:
    """Registration, then ``clients`` new clients one after another; latency of each to kernel forwarding.

    With ``flood``, then that many packets from a stranger (see the module's doc).
    ``cleanup`` is the daemon's --cleanup-interval: its cleanups compete for the store.
    """
    state = os.path.join(ctx.tmp, "daemon.db")
    made = subprocess.run(_natctl(lab, state, "lobby", "create", "bench", "--allow", CLIENT_NET,
                                  "--max-clients", str(clients + 10), "--json"),
                          capture_output=True, text=True, timeout=60, env=child_env())
    if made.returncode != 0:
        raise BenchError(f"natctl lobby create failed: {made.stderr.strip()[-300:]}")
    token = json.loads(made.stdout)["token"]
    from natctl.daemon.client import register

    latencies: list[float] = []
    flooded = None
    try:
        with serving(lab, ctx, state, cleanup) as daemon:
            host = udp_socket(lab.world_ns, HOST_IP, DAEMON_HOST_PORT)
            try:
                host.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
                target = register(host, (RELAY_IP, REGISTRATION_PORT), token)
                wait_bound(lab.relay_ns, target[1])
                for i in range(clients):
                    client = udp_socket(lab.world_ns, CLIENT_IP, 43000 + i)
                    try:
                        ms = _client_latency(host, client, target, budget)
                    finally:
                        client.close()
                    if ms is not None:
                        latencies.append(ms)
                    time.sleep(0.01)
                    _drain(host)
                if flood:
                    flooded = _flood(lab, daemon["pid"], target, flood)
            finally:
                host.close()
    finally:
        # The daemon leaves its mappings in the kernel when it stops (by design): the bench does not.
        run(["nft", "delete", "table", "inet", "natctl"], ns=lab.relay_ns, check=False)
        run(["conntrack", "-F"], ns=lab.relay_ns, check=False)
    out = {"clients": clients, "admitted": len(latencies), "start_s": daemon["start_s"],
           "p50_ms": percentile(latencies, 50), "p99_ms": percentile(latencies, 99),
           "max_ms": max(latencies, default=None), "latencies_ms": sorted(latencies)}
    return {**out, "flood": flooded} if flood else out


def _flood(lab: BenchLab, pid: int, target: tuple[str, int], count: int) -> dict[str, Any]:
    """``count`` packets from a stranger to the host port, as fast as the load tool sends them."""
    before = cpu.task_runtime_ns(pid), _kernel_drops(lab), lab.relay_udp("InDatagrams")
    sent = forwarding.load(lab, "send", 60, src=f"{STRANGER_IP}:44000", dst=f"{target[0]}:{target[1]}", size=32,
                           count=count, seconds=30)
    time.sleep(1.0)  # what reached the daemon is handled by now
    after = cpu.task_runtime_ns(pid), _kernel_drops(lab), lab.relay_udp("InDatagrams")
    # Only the daemon has sockets in the relay, and nothing else talks to it meanwhile: what its sockets
    # received is what the flood cost it. The rest of the packets were dropped by natctl's rules or,
    # faster than the relay's receive ring, before them.
    return {"sent": sent["sent"], "send_seconds": round(sent["seconds"], 2), "dropped_in_kernel": after[1] - before[1],
            "reached_daemon": after[2] - before[2], "daemon_cpu_ms": round((after[0] - before[0]) / 1e6, 1)}


def _kernel_drops(lab: BenchLab) -> int:
    """Packets to host ports that the kernel dropped before the daemon (refused, blocked or rate-limited)."""
    doc = json.loads(run(["nft", "-j", "list", "counters", "table", "inet", "natctl"], ns=lab.relay_ns).stdout)
    named = {c["counter"]["name"]: c["counter"]["packets"] for c in doc["nftables"] if "counter" in c}
    return named.get("unknown_refused", 0) + named.get("unknown_blocked", 0) + named.get("unknown_limited", 0)


def _drain(sock: socket.socket) -> None:
    sock.setblocking(False)
    try:
        while True:
            sock.recv(2048)
    except (BlockingIOError, InterruptedError):
        pass


def footprint(lab: BenchLab, ctx: Context, state: str, mappings: int) -> dict[str, Any]:
    """The daemon on a store of ``mappings`` the kernel already holds: first reconcile, then memory."""
    with serving(lab, ctx, state) as daemon:
        time.sleep(1.0)  # its listeners open within a second of starting
        rss, hwm = cpu.status_kib("VmRSS", daemon["pid"]), cpu.status_kib("VmHWM", daemon["pid"])
    return {"mappings": mappings, "start_s": daemon["start_s"], "rss_kib": rss, "hwm_kib": hwm}

