"""One bench run: every method side by side in one lab, then scale and the daemon; always cleaned up.

Everything a run creates (namespaces, relays, load processes, a memory
cgroup, state files) is removed in ``finally`` blocks, also on failure and on
Ctrl-C (``lab.session`` turns SIGTERM into the same path). Results are a plain dict,
written as JSON by ``report``.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import cpu, forwarding, scale
from bench import lab as benchlab
from bench.config import Config
from bench.methods import METHODS, Context, Method


@contextmanager
def _cgroup(tag: str) -> Iterator[str | None]:
    """A memory cgroup for natctl's worker (the kernel charges the maps it installs to it); None if none."""
    path = _make_cgroup(f"natctl-bench-{tag}")
    try:
        yield path
    finally:
        for _ in range(20 if path else 0):  # its last process may still be exiting
            try:
                os.rmdir(str(path))
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.1)


def _make_cgroup(name: str) -> str | None:
    for root in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup"):
        if Path(root, "memory.kmem.usage_in_bytes").exists() or (
                root == "/sys/fs/cgroup" and "memory" in _read(Path(root, "cgroup.subtree_control"))):
            try:
                Path(root, name).mkdir()
            except OSError:
                return None
            return str(Path(root, name))
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def session(lab: benchlab.BenchLab, ctx: Context, method: Method, cfg: Config, say: Callable[[str], None],
            shared: dict[str, Any]) -> dict[str, Any]:
    """Every forwarding figure of one method, in one start of it.

    Kernel methods are also compared at one common load (``shared['equal_load_pps']``):
    half of what the first of them sustained, so that their CPU per packet is
    measured under the same conditions (under a flood one may be CPU-bound and
    another limited by the sender).
    """
    out: dict[str, Any] = {"label": method.label, "available": True, "in_kernel": method.in_kernel}
    with method.prepared(lab):
        running = method.start(lab, ctx)
        try:
            out["backend"] = running.info.get("backend")
            with forwarding.echo(lab, ctx.lifetime):
                forwarding.warm(lab, running)
                out["flood"] = {}
                for size in cfg.sizes:
                    say(f"  {method.name}: {size}-byte floods, {cfg.runs} x {cfg.seconds:g} s")
                    out["flood"][str(size)] = forwarding.floods(
                        lab, running, forwarding.Flood(size, cfg.packets, cfg.seconds), cfg.runs)
                first = out["flood"][str(cfg.sizes[0])]
                top = max(r["offered_pps"] for r in first["runs"])
                say(f"  {method.name}: highest rate with under 1% loss")
                # The search starts well below what the relay delivered under the flood.
                out["sustained"] = forwarding.sustained(lab, running, cfg.sizes[0], top, first["pps"]["min"] / 4,
                                                        max(0.5, cfg.seconds / 2), cfg.search_steps)
                half = (out["sustained"]["pps"] or out["flood"][str(cfg.sizes[0])]["pps"]["median"]) / 2
                say(f"  {method.name}: round trips at low load and at {half:,.0f} packets/s")
                out["latency"] = {"low": forwarding.latency(lab, running, cfg.probes, cfg.probe_rate),
                                  "half": forwarding.latency(lab, running, cfg.probes, cfg.probe_rate, load_pps=half)}
                if method.in_kernel and "equal_load_pps" not in shared:
                    shared["equal_load_pps"] = half
                equal_rate = shared.get("equal_load_pps") if method.in_kernel else None
                if equal_rate:
                    say(f"  {method.name}: CPU per packet at {equal_rate:,.0f} packets/s (same load for each)")
                    spec = forwarding.Flood(cfg.sizes[0], int(equal_rate * cfg.seconds), cfg.seconds + 0.5, equal_rate)
                    out["equal_load"] = forwarding.floods(lab, running, spec, cfg.runs)
        finally:
            running.stop()
    return out


def run(cfg: Config, say: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole bench. Returns every figure; removes everything it made."""
    benchlab.need_root()  # before anything is measured or said
    started = time.monotonic()
    tag = secrets.token_hex(2)
    results: dict[str, Any] = {"config": asdict(cfg), "machine": cpu.machine(), "methods": {}}
    say("building the lab")
    # Left in reverse order: the lab (and every process in it) first, then the cgroup, then the files.
    with tempfile.TemporaryDirectory(prefix="natctl-bench-") as tmp, _cgroup(tag) as cgroup, \
            benchlab.session(tag) as lab:
        ctx = Context(tmp, cgroup)
        results["lab"] = {"layout": lab.layout, "relay_cpu": lab.relay_cpu, "load_cpu": lab.load_cpu,
                          "topology": "relay (one interface) + world (client and host addresses); "
                                      "no home routers: their NAT would cost the sender's CPU, not the relay's",
                          "sink": "Flood packets are counted and dropped by an nftables netdev ingress rule in the "
                                  "world; round trips go to a real echo"}
        shared: dict[str, Any] = {}
        for name in cfg.methods:
            method = METHODS[name]
            reason = method.unavailable()
            if reason:
                say(f"{name}: not available ({reason})")
                results["methods"][name] = {"label": method.label, "available": False, "reason": reason}
                continue
            say(f"{name}: {method.label}")
            try:
                results["methods"][name] = session(lab, ctx, method, cfg, say, shared)
            except Exception as err:  # one broken method must not cost the others' figures
                say(f"{name}: failed: {err}")
                results["methods"][name] = {"label": method.label, "available": True, "error": str(err)}
        results["equal_load_pps"] = shared.get("equal_load_pps")
        if cfg.scale:
            results["scale"] = scale.run(lab, ctx, cfg, say)
        results["daemon"] = scale.daemon(lab, ctx, cfg, say)
        results["lab"]["waited_for_quiet_s"] = benchlab.BenchLab.patience - lab.patience
    results["seconds"] = time.monotonic() - started
    return results
