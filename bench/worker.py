"""natctl's side of the bench, in its own process: install N mappings, time it, measure it.

    python -m bench.worker install --ns NS --state DB --relay-ip IP --mappings N
        --flow NAME=CLIENT_IP:PORT=HOST_IP:PORT [...] [--cgroup DIR] [--incremental] [--accel none|xdp]
    python -m bench.worker uninstall --ns NS --state DB --relay-ip IP [--accel ...]

A process of its own so that its resident memory is natctl's alone, and so that
it can sit in a memory cgroup of its own (the kernel charges the maps' memory
to the cgroup of the process that installs them). It enters the relay's
namespace with setns only, keeping the host's /sys for the cgroup files.

The store is filled directly (lobbies of up to 1,000 clients with their relay
ports precomputed, as the allocator would give them); what is timed is one
``Service.apply()`` of all of it, the path of ``natctl apply`` and of the
daemon's start, and then single changes on top of it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, cast

from bench.config import PORTS
from bench.cpu import status_kib
from bench.stats import percentile
from natctl.config import Settings
from natctl.kernel.backend import Kernel
from natctl.model import Client, Endpoint, Host
from natctl.plan import Changes
from natctl.service import Service

LOBBY_SIZE = 1000


def kmem_bytes(cgroup: str | None) -> int | None:
    """Kernel memory charged to a memory cgroup (v1: kmem usage; v2: memory.stat 'kernel')."""
    if not cgroup:
        return None
    v1 = Path(cgroup, "memory.kmem.usage_in_bytes")
    if v1.exists():
        return int(v1.read_text())
    for line in Path(cgroup, "memory.stat").read_text().splitlines():
        if line.startswith("kernel "):
            return int(line.split()[1])
    return None


class TimedKernel:
    """Delegates to the real backend and records what each call cost and sent."""

    def __init__(self, inner: Any, cgroup: str | None) -> None:
        self.inner, self.cgroup = inner, cgroup
        self.calls: list[dict[str, Any]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def read(self, sets: Any = None) -> Any:  # the Kernel protocol's: expiry reads only some sets
        t = time.perf_counter()
        out = self.inner.read(sets)
        self.calls.append({"op": "read", "s": time.perf_counter() - t})
        return out

    def apply(self, changes: Changes) -> None:
        k0, t = kmem_bytes(self.cgroup), time.perf_counter()
        self.inner.apply(changes)
        s, k1 = time.perf_counter() - t, kmem_bytes(self.cgroup)
        self.calls.append({"op": "apply", "s": s, "add": changes.add, "delete": changes.delete,
                           "kmem": (k1 - k0) if k0 is not None and k1 is not None else None})

    def take(self) -> list[dict[str, Any]]:
        calls, self.calls = self.calls, []
        return calls


def parse_flow(text: str) -> tuple[str, Endpoint, Endpoint]:
    name, client, host = text.split("=")
    cip, cport = client.rsplit(":", 1)
    hip, hport = host.rsplit(":", 1)
    return name, Endpoint(cip, int(cport)), Endpoint(hip, int(hport))


def filler(i: int) -> Endpoint:
    """The i-th made-up client (198.19.0.0/16 only): 50,000 addresses, then the next port."""
    return Endpoint(f"198.19.{(i // 250) % 200}.{i % 250 + 1}", 1024 + i // 50000)


def populate(svc: Service, flows: list[tuple[str, Endpoint, Endpoint]], total: int) -> dict[str, Any]:
    """Write lobbies, hosts and clients straight into the store (no kernel change yet)."""
    out: dict[str, Any] = {}
    now = time.time()
    fill = max(0, total - len(flows))
    lobbies = [(name, host, [client]) for name, client, host in flows]
    for k in range(0, fill, LOBBY_SIZE):
        lobbies.append((f"fill{k // LOBBY_SIZE}", Endpoint(f"198.19.250.{k // LOBBY_SIZE % 250 + 1}",
                                                            27000 + k // (LOBBY_SIZE * 250)),
                        [filler(i) for i in range(k, min(fill, k + LOBBY_SIZE))]))
    for n, (name, host, clients) in enumerate(lobbies):
        lobby, _ = svc.lobby_create(name, open_=True, max_clients=LOBBY_SIZE + 100, apply=False)
        with svc.store.write():
            svc.store.set_host(Host(lobby.id, host, PORTS.high - n), now)
            for j, c in enumerate(clients):
                svc.store.add_client(Client(0, lobby.id, "udp", c, PORTS.low + j, now, now))
        if n < len(flows):
            out[name] = {"host_port": PORTS.high - n, "client_port": PORTS.low}
    return out


def touches(element: Any, addr: Endpoint) -> bool:
    values = tuple(element.key) + tuple(element.value or ())
    return addr.ip in values and addr.port in values


def incremental(svc: Service, timed: TimedKernel, host_port: int, lobby: str, host: Endpoint) -> dict[str, Any]:
    """One new client on top of what is installed: the daemon's scoped path and the CLI's full one.

    Each is repeated (the median is kept): 5 times for the daemon's, twice for
    the CLI's, which re-reads the whole table each time.
    """
    out: dict[str, Any] = {}
    paths = {"daemon": (5, lambda a: svc.admit_client(host_port, a)),
             "cli": (2, lambda a: svc.map_add(lobby, host, [a]))}
    for k, (path, (repeats, add)) in enumerate(paths.items()):
        totals, kernel, reads, sent, only = [], [], [], [], True
        for r in range(repeats):
            addr = Endpoint("198.18.9.9", 41000 + 100 * k + r)
            timed.take()
            t = time.perf_counter()
            add(addr)
            totals.append(time.perf_counter() - t)
            calls = timed.take()
            applies = [c for c in calls if c["op"] == "apply"]
            kernel.append(sum(c["s"] for c in applies))
            reads.append(sum(c["s"] for c in calls if c["op"] == "read"))
            elements = [e for c in applies for e in [*c["add"], *c["delete"]]]
            sent.append(len(elements))
            only = only and all(touches(e, addr) or e.set.startswith("host") for e in elements)
        out[path] = {"total_ms": _median_ms(totals), "kernel_apply_ms": _median_ms(kernel),
                     "kernel_read_ms": _median_ms(reads), "elements_sent": max(sent),
                     "only_that_mapping": only, "repeats": repeats}
    return out


def _median_ms(seconds: list[float]) -> float:
    return (percentile(seconds, 50) or 0.0) * 1000


def settings(args: argparse.Namespace) -> Settings:
    return Settings(state=args.state, relay_ip=args.relay_ip, ports=PORTS, accel=args.accel,
                    interface=args.interface or "", lock_timeout=30.0,
                    writer=os.environ.get("NATCTL_WRITER", "netlink"))  # the writer the bench measures


def install(args: argparse.Namespace) -> dict[str, Any]:
    cfg = settings(args)
    timed = TimedKernel(Service(cfg).kernel, args.cgroup)
    svc = Service(cfg, kernel_factory=lambda: cast(Kernel, timed))  # delegates all the rest by __getattr__
    flows = [parse_flow(f) for f in args.flow]
    t = time.perf_counter()
    ports = populate(svc, flows, args.mappings)
    populate_s = time.perf_counter() - t
    timed.take()
    t = time.perf_counter()
    result = svc.apply()
    apply_s = time.perf_counter() - t
    calls = timed.take()
    applied = [c for c in calls if c["op"] == "apply"]
    out: dict[str, Any] = {
        "mappings": max(args.mappings, len(flows)), "backend": result.backend, "elements": result.added,
        "populate_s": populate_s, "apply_s": apply_s,
        "kernel_apply_s": sum(c["s"] for c in applied), "kernel_read_s": sum(c["s"] for c in calls if c["op"] == "read"),
        "kmem_bytes": sum(c["kmem"] for c in applied) if applied and applied[0]["kmem"] is not None else None,
        "rss_kib": status_kib("VmRSS"), "hwm_kib": status_kib("VmHWM"), "flows": ports,
    }
    if args.incremental and flows:
        name, _, host = flows[0]
        out["incremental"] = incremental(svc, timed, ports[name]["host_port"], name, host)
        out["noop"] = noop_applies(svc)
    svc.close()
    return out


def noop_applies(svc: Service) -> dict[str, Any]:
    """A full reconcile that finds nothing to do (`natctl apply`), twice: while nftables is as natctl's
    last write left it (its ruleset generation proves it: no map read), and after another program's
    transaction (here one that adds and deletes a table of its own), which has it read every map."""
    import subprocess

    out: dict[str, Any] = {}
    for case in ("sealed", "after_foreign_commit"):
        if case == "after_foreign_commit":
            for verb in ("add", "delete"):
                subprocess.run(["nft", verb, "table", "inet", "bench_someone_else"], check=True)
        t = time.perf_counter()
        result = svc.apply()
        out[case] = {"s": time.perf_counter() - t, "checked": result.checked, "changed": result.changed}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.worker")
    ap.add_argument("op", choices=("install", "uninstall"))
    ap.add_argument("--ns", required=True)
    ap.add_argument("--state", required=True)
    ap.add_argument("--relay-ip", required=True)
    ap.add_argument("--mappings", type=int, default=10)
    ap.add_argument("--flow", action="append", default=[])
    ap.add_argument("--cgroup")
    ap.add_argument("--incremental", action="store_true")
    ap.add_argument("--accel", default="none")
    ap.add_argument("--interface")
    args = ap.parse_args(argv)
    if args.cgroup:
        Path(args.cgroup, "cgroup.procs").write_text(str(os.getpid()))
    from natctl.lab.netns import entered

    with entered(args.ns):
        if args.op == "install":
            doc = install(args)
        else:
            doc = {"removed": Service(settings(args)).uninstall()}
    json.dump(doc, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
