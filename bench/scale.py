"""Scale (mappings installed vs forwarding and install time), footprint, and the daemon's figures.

natctl with nftables is installed with 10 ... 100,000 mappings in one apply
each time (the worker times it and measures memory), forwarding is measured
at some of those sizes, one incremental change is timed at 10,000, and the
daemon's admission latency and memory are measured when the daemon exists.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from bench import daemon as serve
from bench import forwarding
from bench.config import INCREMENTAL_AT, Config
from bench.lab import BenchLab
from bench.methods import METHODS, Context

INSTALL_KEYS = ("mappings", "elements", "populate_s", "apply_s", "kernel_apply_s", "kernel_read_s", "kmem_bytes",
                "rss_kib", "hwm_kib", "backend")


def run(lab: BenchLab, ctx: Context, cfg: Config, say: Callable[[str], None]) -> dict[str, Any]:
    """Install 10 ... 100,000 mappings, one apply each; forwarding at some counts; memory at the most."""
    method = METHODS["nftables"]
    reason = method.unavailable()
    if reason:
        return {"available": False, "reason": reason}
    out: dict[str, Any] = {"available": True, "install": {}, "forwarding": {}, "incremental": None,
                           "footprint": None}
    counts = sorted(set(cfg.install_counts) | set(cfg.forwarding_counts))
    for n in counts:
        say(f"  scale: {n:,} mappings installed in one apply")
        running = method.start(lab, ctx, mappings=n, incremental=(n == INCREMENTAL_AT))
        try:
            info = running.info
            out["install"][str(n)] = {k: info.get(k) for k in INSTALL_KEYS}
            if "incremental" in info:
                out["incremental"] = {"installed": info["mappings"], **info["incremental"]}
            if n in cfg.forwarding_counts:
                say(f"  scale: forwarding with {n:,} mappings installed")
                forwarding.warm(lab, running)
                out["forwarding"][str(n)] = forwarding.floods(
                    lab, running, forwarding.Flood(cfg.sizes[0], cfg.packets, cfg.seconds), cfg.scale_runs)
            if n == counts[-1]:
                out["footprint"] = footprint(lab, ctx, info, say)
        finally:
            running.stop()
    return out


def footprint(lab: BenchLab, ctx: Context, info: dict[str, Any], say: Callable[[str], None]) -> dict[str, Any]:
    """Memory with the most mappings: natctl's process after its apply, the kernel's maps, the daemon."""
    out: dict[str, Any] = {"mappings": info["mappings"], "kernel_bytes": info.get("kmem_bytes"),
                           "natctl_apply_rss_kib": info.get("rss_kib"), "natctl_apply_hwm_kib": info.get("hwm_kib")}
    reason = serve.unavailable()
    if reason:
        out["daemon"] = {"available": False, "reason": reason}
        return out
    say(f"  footprint: natctl serve restarted on {info['mappings']:,} installed mappings")
    try:
        out["daemon"] = {"available": True, **serve.footprint(lab, ctx, os.path.join(ctx.tmp, "natctl.db"),
                                                              info["mappings"])}
    except Exception as err:  # the daemon's figures must not cost the rest
        out["daemon"] = {"available": True, "error": str(err)}
    return out


def daemon(lab: BenchLab, ctx: Context, cfg: Config, say: Callable[[str], None]) -> dict[str, Any]:
    """Registration to kernel forwarding for new clients, through ``natctl serve``."""
    reason = serve.unavailable()
    if reason:
        say(f"daemon: not available ({reason})")
        return {"available": False, "reason": reason}
    say(f"daemon: a host registers, then {cfg.daemon_clients} new clients; time to kernel forwarding")
    try:
        return {"available": True, "admission": serve.admission(lab, ctx, cfg.daemon_clients)}
    except Exception as err:  # the daemon's figures must not cost the rest
        say(f"daemon: failed: {err}")
        return {"available": True, "error": str(err)}
