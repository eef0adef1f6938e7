"""One bench run: every method side by side in one lab, then scale and the daemon; always cleaned up.

Everything a run creates (namespaces, relays, load processes, a memory
cgroup, state files) is removed in ``finally`` blocks, also on failure and on
Ctrl-C (the CLI turns SIGTERM into the same path). Results are a plain dict,
written as JSON by ``report``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from natctl.bench import cpu, forwarding, lab as benchlab, scale
from natctl.bench.methods import METHODS, Context, Method
from natctl.errors import UsageError

SIZES = (64, 512)


@dataclass(frozen=True)
class Config:
    quick: bool = False
    methods: tuple[str, ...] = tuple(METHODS)
    sizes: tuple[int, ...] = SIZES
    runs: int = 5
    seconds: float = 2.0  # per flood
    packets: int = 3_000_000  # per flood, whichever bound comes first
    search_steps: int = 7
    probes: int = 2000
    probe_rate: float = 1000.0
    scale: bool = True
    install_counts: tuple[int, ...] = (1000, 10_000, 100_000)
    forwarding_counts: tuple[int, ...] = (10, 10_000, 100_000)
    scale_runs: int = 3
    daemon_clients: int = 50
    out: str = "bench/results"


def make_config(quick: bool = False, methods: str | None = None, runs: int | None = None,
                seconds: float | None = None, packets: int | None = None, scale: bool = True,
                out: str = "bench/results") -> Config:
    """Validated settings for a run; --quick is a short run of everything (about a minute)."""
    base = Config(quick=True, runs=1, seconds=1.0, packets=1_000_000, search_steps=4, probes=300,
                  install_counts=(1000, 10_000), forwarding_counts=(10, 10_000), scale_runs=1,
                  daemon_clients=10) if quick else Config()
    chosen = base.methods
    if methods:
        chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
        unknown = [m for m in chosen if m not in METHODS]
        if unknown or not chosen:
            raise UsageError(f"unknown method {', '.join(unknown) or repr(methods)}",
                             f"choose from {', '.join(METHODS)} (comma-separated)")
    if runs is not None and not 1 <= runs <= 50:
        raise UsageError(f"invalid --runs {runs}", "use 1 to 50")
    if seconds is not None and not 0.2 <= seconds <= 30:
        raise UsageError(f"invalid --seconds {seconds}", "use 0.2 to 30 seconds per flood")
    if packets is not None and not 1000 <= packets <= 100_000_000:
        raise UsageError(f"invalid --packets {packets}", "use 1000 to 100000000 packets per flood")
    return Config(**{**asdict(base), "methods": chosen, "runs": runs or base.runs,
                     "seconds": seconds or base.seconds, "packets": packets or base.packets,
                     "scale": scale, "out": out})


def _cgroup(tag: str) -> str | None:
    """A memory cgroup for natctl's worker: the kernel charges the maps it installs to it."""
    for root in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup"):
        if Path(root, "memory.kmem.usage_in_bytes").exists() or (
                root == "/sys/fs/cgroup" and "memory" in _read(Path(root, "cgroup.subtree_control"))):
            path = Path(root, f"natctl-bench-{tag}")
            try:
                path.mkdir()
            except OSError:
                return None
            return str(path)
    return None


def _read(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""


def _remove_cgroup(path: str | None) -> None:
    if path:
        for _ in range(20):  # its last process may still be exiting
            try:
                os.rmdir(path)
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


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
    started = time.monotonic()
    relay_cpu, load_cpu = benchlab.cpus()
    tag = secrets.token_hex(2)
    tmp = tempfile.mkdtemp(prefix="natctl-bench-")
    cgroup = _cgroup(tag)
    ctx = Context(tmp, cgroup)
    results: dict[str, Any] = {"config": asdict(cfg), "machine": cpu.machine(), "methods": {}}
    lab = None
    try:
        say("building the lab")
        lab = benchlab.build(relay_cpu, load_cpu, tag)
        results["lab"] = {"layout": lab.layout, "relay_cpu": relay_cpu, "load_cpu": load_cpu,
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
    finally:
        if lab is not None:
            lab.teardown()
        _remove_cgroup(cgroup)
        shutil.rmtree(tmp, ignore_errors=True)
    results["seconds"] = time.monotonic() - started
    return results
