"""Floods and round trips through a running relay, each bounded in packets and in seconds.

A flood sends ``packets`` datagrams (or for ``seconds``, whichever ends first)
from the load CPU to the relay's flood flow; the world's sink counts what
arrives. Delivered packets/s is what arrived over the time from the first send
to the last arrival (a userspace relay may still be draining its socket after
the sender stopped). CPU time per packet is the relay's CPU time (see cpu.py)
over packets delivered, so work spent on packets that were dropped later
counts against the relay, as it would on a real server.
"""

from __future__ import annotations

import math
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from bench import cpu, tool
from bench.config import ECHO_PORT, HOST_IP
from bench.lab import BenchLab, wait_bound
from bench.methods import FLOOD, PROBE, Running
from bench.stats import summarize
from bench.tool import BenchError
from natctl.lab.netns import spawn, stop

DISTURBED = 0.10  # others used more than this share of the relay's core: the run is suspect


@dataclass(frozen=True)
class Flood:
    size: int
    packets: int
    seconds: float
    rate: float = 0  # 0: as fast as the sender can


def load(lab: BenchLab, mode: str, timeout: float, **opts: object) -> dict[str, Any]:
    """One run of the load tool in the world, on the load CPU; its result."""
    argv = ["ip", "netns", "exec", lab.world_ns, *lab.on_load_cpu(tool.argv(mode, **opts))]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise BenchError(f"load tool {mode} failed: {proc.stderr.strip()[:300]}")
    return tool.parse_output(proc.stdout)


def _target(running: Running, flow: str) -> str:
    ip, port = running.targets[flow]
    return f"{ip}:{port}"


def warm(lab: BenchLab, running: Running) -> None:
    """A few packets per flow first: neighbours resolved, conntrack entries made, socat's peer set.

    The probe flow is warmed with round trips that wait for their replies: a
    reply reaching a client socket that is already closed draws an ICMP error,
    and socat quits on those.
    """
    load(lab, "send", 10, src=FLOOD.client, dst=_target(running, "flood"), size=64, count=20, seconds=1, rate=200)
    load(lab, "rtt", 10, src=PROBE.client, dst=_target(running, "probe"), size=64, count=20, seconds=1, rate=200)
    time.sleep(0.1)


def _settle(lab: BenchLab, limit: float = 3.0) -> tuple[int, float]:
    """Wait until the sink stops counting; returns (count, when it last moved)."""
    count, moved = lab.sink_packets(), time.monotonic()
    deadline = moved + limit
    while time.monotonic() < deadline:
        time.sleep(0.05)
        now_count = lab.sink_packets()
        if now_count == count:
            break
        count, moved = now_count, time.monotonic()
    return count, moved


def quiet(lab: BenchLab, threshold: float = 0.10, probe: float = 0.25) -> float:
    """Wait until both CPUs of the layout are nearly idle (other test suites share this machine).

    Bounded by the lab's remaining patience; returns how long it waited.
    """
    waited = 0.0
    while lab.patience > 0:
        before = [cpu.busy_ticks(c) for c in (lab.relay_cpu, lab.load_cpu)]
        time.sleep(probe)
        busy = [(cpu.busy_ticks(c) - b) / cpu.HZ / probe for c, b in zip((lab.relay_cpu, lab.load_cpu), before)]
        if max(busy) <= threshold:
            break
        waited += probe
        lab.patience -= probe
    return waited


def flood(lab: BenchLab, running: Running, spec: Flood) -> dict[str, Any]:
    """One flood, once the machine is quiet; every figure of it."""
    waited = quiet(lab)
    sink0, drops0 = lab.sink_packets(), lab.drops()
    pids = running.pids()
    c0 = cpu.sample(pids, lab.napi_pid, lab.relay_cpu)
    sent = load(lab, "send", spec.seconds + 15, src=FLOOD.client, dst=_target(running, "flood"), size=spec.size,
                count=spec.packets, seconds=spec.seconds, rate=spec.rate or None)
    exited = time.monotonic()
    sink1, moved = _settle(lab)
    c1 = cpu.sample(pids, lab.napi_pid, lab.relay_cpu)
    if len(running.pids()) < len(pids):
        raise BenchError("the relay's process exited during a flood")
    drops1 = lab.drops()
    delivered = sink1 - sink0
    window = sent["seconds"] + max(0.0, moved - exited - 0.05)
    used = cpu.spent(c0, c1)
    out = {
        "size": spec.size, "sent": sent["sent"], "delivered": delivered,
        "offered_pps": sent["sent"] / sent["seconds"] if sent["seconds"] else 0.0,
        "pps": delivered / window if window > 0 else 0.0,
        "loss": 1 - delivered / sent["sent"] if sent["sent"] else 0.0,
        "ns_per_packet": used["relay_cpu_s"] * 1e9 / delivered if delivered else None,
        "seconds": window, **used,
        "drops": {k: drops1[k] - drops0[k] for k in drops1},
    }
    out["disturbed"] = used["others_s"] > DISTURBED * max(used["wall_s"], 1e-9)
    out["waited_for_quiet_s"] = waited
    return out


def floods(lab: BenchLab, running: Running, spec: Flood, runs: int) -> dict[str, Any]:
    """``runs`` floods; a run disturbed by other work on the relay's core is redone (``runs`` redos at most)."""
    results: list[dict[str, Any]] = []
    redone = 0
    while len(results) < runs:
        r = flood(lab, running, spec)
        if r["disturbed"] and redone < runs:
            redone += 1
            continue
        results.append(r)
    return {
        "size": spec.size,
        "pps": summarize([r["pps"] for r in results]),
        "loss": summarize([r["loss"] for r in results]),
        "ns_per_packet": summarize([r["ns_per_packet"] for r in results if r["ns_per_packet"] is not None]),
        "offered_pps": summarize([r["offered_pps"] for r in results]),
        "disturbed_runs": sum(r["disturbed"] for r in results), "redone": redone, "runs": results,
    }


@contextmanager
def echo(lab: BenchLab, seconds: float) -> Iterator[None]:
    """The host's echo, up for a whole session: a relay that met an ICMP error (socat) would quit."""
    proc = spawn(lab.on_load_cpu(tool.argv("echo", bind=f"{HOST_IP}:{ECHO_PORT}", seconds=seconds, idle=0)),
                 ns=lab.world_ns, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_bound(lab.world_ns, ECHO_PORT)
        yield
    finally:
        stop(proc)


def latency(lab: BenchLab, running: Running, probes: int, rate: float, load_pps: float = 0.0,
            size: int = 64) -> dict[str, Any]:
    """Round trips client -> relay -> host echo -> relay -> client (inside ``echo``), with an optional
    paced flood beside them."""
    seconds = probes / rate + 1
    beside = None
    quiet(lab)
    try:
        if load_pps > 0:
            beside = spawn(lab.on_load_cpu(tool.argv(
                "send", src=FLOOD.client, dst=_target(running, "flood"), size=size,
                count=int(load_pps * (seconds + 1)), seconds=seconds + 1, rate=load_pps)),
                ns=lab.world_ns, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.3)  # the load is flowing before the first probe
        out = load(lab, "rtt", seconds + 15, src=PROBE.client, dst=_target(running, "probe"), size=max(size, 16),
                   count=probes, seconds=seconds, rate=rate)
    finally:
        if beside is not None:
            stop(beside)
    out["load_pps"] = load_pps
    out["lost"] = out["sent"] - out["received"]
    return out


def sustained(lab: BenchLab, running: Running, size: int, top: float, floor: float, seconds: float, steps: int,
              max_loss: float = 0.01) -> dict[str, Any]:
    """The highest paced rate the relay delivers with at most ``max_loss`` loss.

    An unbounded flood makes a userspace relay livelock (the kernel's receive
    work for packets its socket will drop takes the CPU from the relay), so
    its delivered rate under a flood is below what it can carry. This finds
    what it can carry: first at ``top`` (the sender's own limit), then by a
    geometric bisection between ``floor`` and top.
    """
    def attempt(rate: float) -> dict[str, Any]:
        spec = Flood(size, max(1, int(rate * seconds)), seconds + 0.5, rate)
        r = flood(lab, running, spec)
        for _ in range(2):  # noise from other work on the relay's core is not the relay's fault
            if not r["disturbed"]:
                break
            r = flood(lab, running, spec)
        return r

    tries = []
    best = None
    lo, hi = min(floor, top / 2), top
    rate = top
    for _ in range(max(1, steps)):
        r = attempt(rate)
        ok = r["loss"] <= max_loss
        tries.append({"rate": rate, "pps": r["pps"], "loss": r["loss"], "ns_per_packet": r["ns_per_packet"], "ok": ok})
        if ok:
            if best is None or r["pps"] > best["pps"]:
                best = r
            if rate == top:
                break  # the relay keeps up with all the sender can do
            lo = rate
        else:
            hi = rate
        rate = math.sqrt(lo * hi)
    return {
        "size": size, "max_loss": max_loss, "sender_limited": bool(tries and tries[0]["ok"]),
        "pps": best["pps"] if best else None, "loss": best["loss"] if best else None,
        "ns_per_packet": best["ns_per_packet"] if best else None, "tries": tries,
    }
