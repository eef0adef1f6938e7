"""What a run shows: the issue's targets checked, a terminal table, JSON, a PNG chart, the README block.

Every target gets a verdict (met, MISSED, or not measured) and the figure it
was judged on; a miss is printed as plainly as a success.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.config import INCREMENTAL_AT
from bench.stats import percentile


def get(doc: Any, *path: str) -> Any:
    """doc[p0][p1]... or None if any step is missing."""
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _target(text: str, figure: str, met: bool | None, note: str = "") -> dict[str, Any]:
    return {"target": text, "figure": figure, "met": met, "note": note}


def _x(v: float | None) -> str:
    return "not measured" if v is None else f"{v:.1f}x"


def targets(r: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets against this run's figures."""
    def pps(m: str) -> float | None:
        return get(r, "methods", m, "flood", "64", "pps", "median")

    def sus(m: str) -> float | None:
        return get(r, "methods", m, "sustained", "pps")

    out = []
    for other, want in (("socat", 6), ("asyncio", 15)):
        f = ratio(pps("nftables"), pps(other))
        out.append(_target(f"nftables >= {want}x {other} in delivered packets/s (64 B flood)", _x(f),
                           None if f is None else f >= want,
                           f"at the highest rate each carries with <1% loss: {_x(ratio(sus('nftables'), sus(other)))}"))
    eq = ratio(get(r, "methods", "xdp", "equal_load", "ns_per_packet", "median"),
               get(r, "methods", "nftables", "equal_load", "ns_per_packet", "median"))
    fl = ratio(get(r, "methods", "xdp", "flood", "64", "ns_per_packet", "median"),
               get(r, "methods", "nftables", "flood", "64", "ns_per_packet", "median"))
    if eq is None and fl is None:
        note = get(r, "methods", "xdp", "reason") or get(r, "methods", "xdp", "error") or ""
    else:
        note = "both at the same paced load" + ("" if fl is None else f"; under a 64 B flood: {fl:.2f}x")
    out.append(_target("XDP CPU per packet <= 0.7x nftables'", "not measured" if eq is None else f"{eq:.2f}x",
                       None if eq is None else eq <= 0.7, note))
    few, many = get(r, "scale", "forwarding", "10", "pps", "median"), get(r, "scale", "forwarding", "100000", "pps",
                                                                           "median")
    f = ratio(many, few)
    out.append(_target("forwarding with 100,000 mappings within 10% of 10", "not measured" if f is None
                       else f"{f:.2f}x ({many:,.0f} vs {few:,.0f} packets/s)", None if f is None else f >= 0.9))
    for n, limit in (("10000", 0.5), ("100000", 5.0)):
        s = get(r, "scale", "install", n, "apply_s")
        out.append(_target(f"{int(n):,} mappings installed in one apply in < {limit:g} s",
                           "not measured" if s is None else f"{s:.2f} s", None if s is None else s < limit,
                           "" if s is None else f"of which the nftables transaction "
                           f"{get(r, 'scale', 'install', n, 'kernel_apply_s'):.2f} s"))
    inc = get(r, "scale", "incremental")
    ms = get(inc, "daemon", "total_ms")
    out.append(_target(f"one incremental change at {INCREMENTAL_AT:,} installed < 5 ms in the daemon",
                       "not measured" if ms is None else f"{ms:.2f} ms, {get(inc, 'daemon', 'elements_sent')} elements",
                       None if ms is None else ms < 5 and bool(get(inc, "daemon", "only_that_mapping")),
                       "" if inc is None else f"the CLI's path (natctl map add): "
                       f"{get(inc, 'cli', 'total_ms'):.0f} ms, of which reading the kernel's table "
                       f"{get(inc, 'cli', 'kernel_read_ms'):.0f} ms"))
    p99 = get(r, "daemon", "admission", "p99_ms")
    out.append(_target("a new client forwards in the kernel within 10 ms (p99) of its first packet",
                       "not measured" if p99 is None else f"p99 {p99:.2f} ms", None if p99 is None else p99 < 10,
                       get(r, "daemon", "reason") or get(r, "daemon", "error") or ""))
    return out


def verdict(met: bool | None) -> str:
    return "not measured" if met is None else ("met" if met else "MISSED")


def k(v: float | None) -> str:
    """Packets/s, short: 532k, 47.2k, 1.20M."""
    if v is None:
        return "-"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e5:
        return f"{v / 1e3:.0f}k"
    return f"{v / 1e3:.1f}k"


def span(s: dict[str, Any] | None, fmt: Any = k) -> str:
    """'median (min-max)' of a summary."""
    if not s or s.get("median") is None:
        return "-"
    if s["min"] == s["max"]:
        return fmt(s["median"])
    return f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})"


def ns(v: float | None) -> str:
    return "-" if v is None else f"{v:,.0f} ns"


def rtt(lat: dict[str, Any] | None) -> str:
    if not lat:
        return "-"
    return f"{lat['p50_us']:.0f} / {lat['p99_us']:.0f}" + (f" ({lat['lost']} lost)" if lat.get("lost") else "")


def busy(flood: dict[str, Any] | None) -> float | None:
    """How busy the relay's own threads kept its CPU during the floods (median); well under 1: the
    relay was not the limit, the sender was."""
    return percentile([x["relay_cpu_s"] / x["wall_s"] for x in (flood or {}).get("runs", []) if x.get("wall_s")], 50)


def method_rows(r: dict[str, Any]) -> list[list[str]]:
    rows = []
    for m in r.get("methods", {}).values():
        if not m.get("available"):
            rows.append([m["label"], f"not available: {m.get('reason')}"] + [""] * (len(METHOD_COLUMNS) - 2))
            continue
        if m.get("error"):
            rows.append([m["label"], f"failed: {m['error'][:80]}"] + [""] * (len(METHOD_COLUMNS) - 2))
            continue
        f64, f512 = get(m, "flood", "64"), get(m, "flood", "512")
        loss, use = get(f64, "loss", "median"), busy(f64)
        rows.append([m["label"], span(get(f64, "pps")), "-" if loss is None else f"{loss:.0%}",
                     "-" if use is None else f"{use:.0%}",
                     span(get(f64, "ns_per_packet"), ns), span(get(f512, "pps")), span(get(f512, "ns_per_packet"), ns),
                     k(get(m, "sustained", "pps")) + (" (sender's limit)" if get(m, "sustained", "sender_limited") else ""),
                     rtt(get(m, "latency", "low")), rtt(get(m, "latency", "half"))])
    return rows


METHOD_COLUMNS = ["method", "64 B delivered/s (min-max)", "64 B loss", "relay CPU busy", "64 B CPU/pkt",
                  "512 B delivered/s", "512 B CPU/pkt", "sustained 64 B/s (<1% loss)", "RTT p50/p99 us, low load",
                  "RTT p50/p99 us, half load"]


def scale_rows(r: dict[str, Any]) -> list[list[str]]:
    rows = []
    install, fwd = get(r, "scale", "install") or {}, get(r, "scale", "forwarding") or {}
    for n in sorted(set(install) | set(fwd), key=int):
        i, f = install.get(n, {}), fwd.get(n)
        kmem = i.get("kmem_bytes")
        rows.append([f"{int(n):,}", f"{i['apply_s']:.2f} s" if i.get("apply_s") is not None else "-",
                     f"{i['kernel_apply_s']:.2f} s" if i.get("kernel_apply_s") is not None else "-",
                     f"{i.get('elements', 0):,}", "-" if kmem is None else f"{kmem / 2**20:.1f} MiB",
                     "-" if not i.get("rss_kib") else f"{i['rss_kib'] / 1024:.0f} MiB",
                     span(get(f, "pps")) if f else "-", span(get(f, "ns_per_packet"), ns) if f else "-"])
    return rows


SCALE_COLUMNS = ["mappings", "one apply", "of it nft", "elements", "kernel memory", "natctl RSS",
                 "64 B delivered/s", "CPU/pkt"]


def print_tables(r: dict[str, Any]) -> None:
    from natctl.output import table

    table("forwarding (median of runs, min-max)", METHOD_COLUMNS, method_rows(r))
    if get(r, "scale", "available"):
        table("scale (natctl, nftables)", SCALE_COLUMNS, scale_rows(r))
    table("targets (issue 6)", ["target", "figure", "verdict", "note"],
          [[t["target"], t["figure"], verdict(t["met"]), t["note"]] for t in r.get("targets", [])])


def write(r: dict[str, Any], out_dir: str) -> dict[str, str]:
    """JSON (every figure) and PNG (throughput and CPU per packet by method); returns their paths."""
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    stem = Path(out_dir) / time.strftime("bench-%Y%m%d-%H%M%S")
    paths = {"json": f"{stem}.json"}
    with open(paths["json"], "w") as fh:
        json.dump(r, fh, indent=2, default=str)
    png = chart(r, f"{stem}.png")
    if png:
        paths["png"] = png
    return paths


def chart(r: dict[str, Any], path: str) -> str | None:
    """Two panels: delivered packets/s and relay CPU per packet, by method and size (min-max as error bars)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    except ImportError:
        return None
    names = [n for n, m in r.get("methods", {}).items() if get(m, "flood")]
    if not names:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    sizes = [str(s) for s in r["config"]["sizes"]]
    width = 0.8 / len(sizes)
    for ax, key, title in ((axes[0], "pps", "delivered packets/s (log)"),
                           (axes[1], "ns_per_packet", "relay CPU per delivered packet, ns (log)")):
        for j, size in enumerate(sizes):
            med, lo, hi = [], [], []
            for n in names:
                s = get(r, "methods", n, "flood", size, key) or {}
                m = s.get("median") or 0
                med.append(m)
                lo.append(m - (s.get("min") or m))
                hi.append((s.get("max") or m) - m)
            xs = [i + (j - (len(sizes) - 1) / 2) * width for i in range(len(names))]
            ax.bar(xs, med, width, yerr=[lo, hi], capsize=3, label=f"{size} B")
            for x, v in zip(xs, med):
                ax.annotate(k(v) if key == "pps" else f"{v:,.0f}", (x, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([r["methods"][n]["label"] for n in names], rotation=12, fontsize=8)
        ax.set_yscale("log")
        fmt = k if key == "pps" else (lambda v: f"{v:,.0f}")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos, fmt=fmt: fmt(v)))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    machine = r.get("machine", {})
    fig.suptitle(f"natctl bench {machine.get('date', '')}: kernel {machine.get('kernel', '')}, "
                 f"{machine.get('cpus')} CPUs, veth lab (relay on one CPU, sender on the other)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
