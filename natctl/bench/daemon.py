"""The registration daemon (``natctl serve``) in the bench: admission latency and memory.

Admission: a host registers its lobby over UDP; then each new client sends a
numbered packet every 0.2 ms. The daemon delivers the first packets itself
(from the relay, TTL 64) and installs the mapping; from then on the kernel
forwards them (one hop, TTL 63). The latency of a client is the send time of
its first kernel-forwarded packet minus that of its first packet.

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
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from natctl.bench.lab import CLIENT_IP, HOST_IP, RELAY_IP, BenchLab, wait_bound
from natctl.bench.methods import Context
from natctl.bench.tool import BenchError
from natctl.bench.worker import PORTS, status_kib
from natctl.lab.netns import spawn, stop
from natctl.lab.traffic import udp_socket

REGISTRATION_PORT = 8809
HOST_PORT = 27017  # the registering host's game socket
IP_RECVTTL = getattr(socket, "IP_RECVTTL", 12)
KERNEL_TTL = 63  # forwarded once by the relay; the daemon's own deliveries leave with 64


def unavailable() -> str | None:
    for module in ("natctl.daemon.server", "natctl.daemon.client"):
        if importlib.util.find_spec(module) is None:
            return f"the registration daemon is not in this checkout ({module} is missing)"
    return None


def _natctl(state: str) -> list[str]:
    return [sys.executable, "-m", "natctl", "--state", state, "--relay-ip", RELAY_IP, "--ports", str(PORTS),
            "--accel", "none"]


@contextmanager
def serving(lab: BenchLab, ctx: Context, state: str, timeout: float = 240) -> Iterator[dict[str, Any]]:
    """``natctl serve`` in the relay, up once it logged 'started'; stopped afterwards, whatever happens."""
    log_path = os.path.join(ctx.tmp, "serve.log")
    Path(log_path).unlink(missing_ok=True)
    env = {**os.environ, "NATCTL_CONFIG": "/nonexistent"}
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        proc = spawn(lab.on_relay_cpu(_natctl(state) + ["serve", "--cleanup-interval", "1h"]), ns=lab.relay_ns,
                     stdout=subprocess.DEVNULL, stderr=log, env=env)
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


def admission(lab: BenchLab, ctx: Context, clients: int = 50, budget: float = 0.5) -> dict[str, Any]:
    """Registration, then ``clients`` new clients one after another; latency of each to kernel forwarding."""
    state = os.path.join(ctx.tmp, "daemon.db")
    made = subprocess.run(["ip", "netns", "exec", lab.relay_ns, *_natctl(state), "lobby", "create", "bench", "--open",
                           "--max-clients", str(clients + 10), "--json"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "NATCTL_CONFIG": "/nonexistent"})
    if made.returncode != 0:
        raise BenchError(f"natctl lobby create failed: {made.stderr.strip()[-300:]}")
    token = json.loads(made.stdout)["token"]
    from natctl.daemon.client import register

    latencies: list[float] = []
    with serving(lab, ctx, state) as daemon:
        host = udp_socket(lab.world_ns, HOST_IP, HOST_PORT)
        try:
            host.setsockopt(socket.IPPROTO_IP, IP_RECVTTL, 1)
            relay_ip, host_port = register(host, (RELAY_IP, REGISTRATION_PORT), token)
            wait_bound(lab.relay_ns, host_port)
            for i in range(clients):
                client = udp_socket(lab.world_ns, CLIENT_IP, 43000 + i)
                try:
                    ms = _client_latency(host, client, (relay_ip, host_port), budget)
                finally:
                    client.close()
                if ms is not None:
                    latencies.append(ms)
                time.sleep(0.01)
                _drain(host)
        finally:
            host.close()
    lat = sorted(latencies)
    return {"clients": clients, "admitted": len(lat), "start_s": daemon["start_s"],
            "p50_ms": statistics.median(lat) if lat else None,
            "p99_ms": lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))] if lat else None,
            "max_ms": lat[-1] if lat else None, "latencies_ms": lat}


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
        rss, hwm = status_kib("VmRSS", daemon["pid"]), status_kib("VmHWM", daemon["pid"])
    return {"mappings": mappings, "start_s": daemon["start_s"], "rss_kib": rss, "hwm_kib": hwm}

