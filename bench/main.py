"""The front door's work: run, judge, print, write files, and (on request) the README's block."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from bench import report
from bench.config import Config
from bench.runner import run
from natctl.errors import NatctlError

START, END = "<!-- bench:start -->", "<!-- bench:end -->"

CAVEATS = [
    "**veth, not a NIC.** Every packet is an skb handed between namespaces: no interrupts, no DMA, no driver. "
    "XDP on veth runs on packets a local socket built (veth converts them, sometimes copying), and its XDP_TX "
    "needs the peer to run XDP too; on a real NIC XDP saves more than it can here.",
    "**2 CPUs.** The relay gets one; the sender, the sink and the echo share the other. The sender's own rate "
    "is the ceiling for every method: a relay whose CPU was well under 100% busy during the floods kept up "
    "with all the sender could do, and its delivered rate is the sender's, not its own.",
    "**One flow per test.** Established flows go through conntrack, so the map size only touches a flow's "
    "first packet (and the per-packet counter set lookup); the scale rows measure established flows, not "
    "how fast new flows can be set up.",
    "**Floods livelock userspace relays**: the kernel's receive work for packets their socket then drops takes "
    "the CPU from them, so under a flood they deliver less than they can carry, and their CPU per delivered "
    "packet includes that wasted work. The *sustained* column is the highest paced rate each carried with "
    "under 1% loss (the JSON has the CPU per packet of every step of that search).",
    "**CPU counted** is the relay's own threads only (the relay interface's NAPI kernel thread, plus the relay's "
    "processes), from schedstat. Other work shares this machine: each measurement waits for both CPUs to be "
    "nearly idle first, a flood during which others took over 10% of the relay's CPU is redone, and the JSON "
    "keeps the noise of every run.",
    "**Round trips** include scheduling on the load CPU (sender, echo and prober share it).",
    "Absolute figures swing by about 25% between runs and sessions on this VM; compare methods within one run.",
]


def summary(r: dict[str, Any]) -> str:
    """The run in a few sentences, from its figures."""
    g = report.get
    nft = g(r, "methods", "nftables", "flood", "64")
    if not nft:
        return ""
    out = [f"With one CPU for the relay, natctl with nftables delivered {report.k(g(nft, 'pps', 'median'))} "
           f"64-byte packets/s at {report.ns(g(nft, 'ns_per_packet', 'median'))} of CPU each"]
    for other in ("socat", "asyncio"):
        o = g(r, "methods", other, "flood", "64", "pps", "median")
        if o:
            carried = report.ratio(g(r, "methods", "nftables", "sustained", "pps"),
                                   g(r, "methods", other, "sustained", "pps"))
            out.append(f"{report.ratio(g(nft, 'pps', 'median'), o):.1f}x {other} "
                       f"({carried or 0:.1f}x at the highest rate each carries with under 1% loss)")
    text = out[0] + (": " + " and ".join(out[1:]) if out[1:] else "") + "."
    xdp = g(r, "methods", "xdp", "flood", "64")
    if xdp:
        eq = report.ratio(g(r, "methods", "xdp", "equal_load", "ns_per_packet", "median"),
                          g(r, "methods", "nftables", "equal_load", "ns_per_packet", "median"))
        use = report.busy(xdp)
        text += (f" XDP spent {eq:.2f}x nftables' CPU per packet at the same load" if eq else " XDP ran")
        if use is not None and use < 0.8:
            text += (f"; under a flood its relay CPU was only {use:.0%} busy, so its delivered rate here is the "
                     "sender's limit, lower than for nftables because the lab's XDP_PASS program on the world side "
                     "(which veth needs for XDP_TX) runs on the sender's CPU")
        text += "."
    again = g(r, "scale", "forwarding", "10", "pps", "median")
    if again and g(nft, "pps", "median"):
        gap = abs(again / g(nft, "pps", "median") - 1)
        text += (f" The same nftables setup measured again later in the run (the scale rows, 10 mappings) delivered "
                 f"{report.k(again)}, {gap:.0%} apart: that is this VM's noise between moments of one run.")
    return text


def readme_block(r: dict[str, Any], command: str) -> str:
    """The README's benchmark section: command, date, machine, tables, verdicts, caveats."""
    m = r.get("machine", {})
    lines = [
        f"Measured with `{command}` (as root) on {m.get('date', '?')[:10]} at commit {m.get('commit', '?')} "
        f"({r.get('seconds', 0) / 60:.1f} minutes): "
        f"kernel {m.get('kernel')}, {m.get('cpus')} CPUs ({m.get('cpu_model')}), {m.get('memory_gib')} GiB, "
        f"{m.get('nft')}, {m.get('socat')}. Every figure is in the JSON under `bench/results/` (not committed).",
        "",
        f"Lab: {report.get(r, 'lab', 'topology')}. CPU layout: {report.get(r, 'lab', 'layout')}. "
        f"{report.get(r, 'lab', 'sink')}.",
        "",
        summary(r),
        "",
        _md(report.METHOD_COLUMNS, report.method_rows(r)),
    ]
    if report.get(r, "scale", "available"):
        install = report.get(r, "scale", "install") or {}
        most = max(install, key=int, default=None)
        per = f"{install[most]['elements'] / int(most):.0f}" if most and install[most].get("elements") else "?"
        lines += ["", "natctl with nftables, by mappings installed, each number installed in one apply into an empty "
                  f"table ({per} nftables elements a mapping; \"of it nft\" is the nftables transaction alone, "
                  "the rest is planning and rendering in Python):", "",
                  _md(report.SCALE_COLUMNS, report.scale_rows(r))]
        inc, fp = report.get(r, "scale", "incremental"), report.get(r, "scale", "footprint")
        if inc:
            lines += ["", f"One new client with {inc['installed']:,} installed: the daemon's path "
                      f"(`admit_client`, scoped) {inc['daemon']['total_ms']:.2f} ms, sending "
                      f"{inc['daemon']['elements_sent']} elements, only that mapping's: "
                      f"{'yes' if inc['daemon']['only_that_mapping'] else 'NO'}; the CLI's path (`natctl map add`, "
                      f"scoped while the kernel carries the store's tag) {inc['cli']['total_ms']:.0f} ms, of which "
                      f"{inc['cli']['kernel_read_ms']:.0f} ms reading the kernel's table, sending "
                      f"{inc['cli']['elements_sent']} elements."]
        if fp:
            d = fp.get("daemon") or {}
            daemon = (f"`natctl serve` restarted on them: first reconcile {d['start_s']:.1f} s, resident "
                      f"{d['rss_kib'] / 1024:.0f} MiB" if d.get("rss_kib") else
                      f"daemon: {d.get('reason') or d.get('error') or 'not measured'}")
            kernel = "-" if fp.get("kernel_bytes") is None else f"{fp['kernel_bytes'] / 2**20:.0f} MiB"
            lines += ["", f"Memory with {fp['mappings']:,} mappings: kernel (nftables maps, charged to a memory "
                      f"cgroup) {kernel}; natctl's process after its apply {fp['natctl_apply_rss_kib'] / 1024:.0f} "
                      f"MiB resident (peak {fp['natctl_apply_hwm_kib'] / 1024:.0f} MiB); {daemon}."]
    adm = report.get(r, "daemon", "admission")
    if adm:
        lines += ["", f"Registration to kernel forwarding (`natctl serve`, {adm['admitted']} of {adm['clients']} "
                  f"new clients): p50 {adm['p50_ms']:.2f} ms, p99 {adm['p99_ms']:.2f} ms, max {adm['max_ms']:.2f} ms."]
    lines += ["", "Targets of issue 6:", "",
              _md(["target", "figure", "verdict", "note"],
                  [[t["target"], t["figure"], f"**{report.verdict(t['met'])}**" if t["met"] is False
                    else report.verdict(t["met"]), t["note"]] for t in r.get("targets", [])]),
              "", "What this lab can and cannot show:", ""] + [f"- {c}" for c in CAVEATS]
    return "\n".join(lines)


def _md(columns: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(out)


def update_readme(path: str, block: str) -> None:
    """Replace what lies between the bench markers, and nothing else."""
    text = open(path).read()
    if START not in text or END not in text or text.index(START) > text.index(END):
        raise NatctlError(f"{path} has no {START} ... {END} block", "add the two markers where the figures go")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w") as fh:
        fh.write(f"{head}{START}\n{block}\n{END}{tail}")


def execute(cfg: Config, command: str, readme: str | None = None, as_json: bool = False,
            say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run the bench (as root: see ``lab.session``), judge it against the targets, print and write everything."""
    say = say or (lambda text: print(text, file=sys.stderr, flush=True))
    results = run(cfg, say)
    results["command"] = command
    results["targets"] = report.targets(results)
    results["files"] = report.write(results, cfg.out)
    if as_json:
        json.dump(results, sys.stdout, indent=2, default=str)
        sys.stdout.write("\n")
    else:
        report.print_tables(results)
        say("written: " + ", ".join(results["files"].values()))
    if readme:
        update_readme(readme, readme_block(results, command))
        say(f"updated the figures in {readme}")
    return results
