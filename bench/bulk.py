"""Bulk changes from a file (issue 11): `natctl map add --from` of 10,000 and 100,000 mappings.

    sudo .venv/bin/python -m bench.bulk [--mappings 10000 100000] [--per 50] [--profile] [--json]

For each size: a throwaway network namespace (only its loopback, relay IP 198.18.0.1), a fresh store that
one `natctl apply` put in sync with the kernel, and a file of lobbies of ``--per`` clients each (only
198.18.0.0/15 addresses). Then, each a new natctl process as an operator runs it: `natctl map add --from
FILE --create-lobbies` and `natctl map remove --from FILE`, with their wall time and the peak resident
memory of the natctl process (wait4's rusage of that one child). Targets (issue 11): 100,000 in under 2 s
and 150 MB; 10,000 in under 0.25 s. ``--profile`` also runs the add in this process over a kernel that
takes every change and does nothing (natctl's own part: parsing, checks, ports, store, planning), under
cProfile and tracemalloc. The namespace and files are removed afterwards, also on failure or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

TARGETS = {10_000: (0.25, 150.0), 100_000: (2.0, 150.0)}  # mappings: (seconds, MB)


def mapping_file(path: str, mappings: int, per: int) -> None:
    """``mappings`` lines, ``per`` clients a lobby (2,000 lobbies of 50 for 100,000)."""
    with open(path, "w") as f:
        for n in range(mappings):
            j, k = divmod(n, per)
            f.write(f"l{j} 198.18.{100 + j // 250}.{1 + j % 250}:27015 "
                    f"198.19.{k % 256}.{1 + j % 250}:{1024 + j % 60000}\n")


def timed(argv: list[str]) -> dict:
    """Run ``argv``; its wall time and the peak resident memory of that process alone."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {proc.returncode}: {err.strip()}")
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def natctl(ns: str, state: str, *args: str) -> list[str]:
    from natctl.lab.netns import natctl_argv

    return natctl_argv(state, "--accel", "none", *args, ns=ns, relay_ip="198.18.0.1")


def measure(mappings: int, per: int) -> dict:
    ns = f"natctl-bulk-{os.getpid()}"
    with tempfile.TemporaryDirectory(prefix="natctl-bulk-") as tmp:
        path, state = os.path.join(tmp, "mappings.txt"), os.path.join(tmp, "natctl.db")
        mapping_file(path, mappings, per)
        subprocess.run(["ip", "netns", "add", ns], check=True)
        try:
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
            subprocess.run(natctl(ns, state, "apply"), check=True, capture_output=True)
            add = timed(natctl(ns, state, "map", "add", "--from", path, "--create-lobbies"))
            remove = timed(natctl(ns, state, "map", "remove", "--from", path))
        finally:
            subprocess.run(["ip", "netns", "del", ns], check=False)
    return {"mappings": mappings, "lobbies": -(-mappings // per), "add": add, "remove": remove}


def profile(mappings: int, per: int, top: int = 25) -> None:
    """natctl's own part of an add, in this process, over a kernel that does nothing: cProfile, tracemalloc."""
    import cProfile
    import pstats
    import tracemalloc

    from natctl import sync
    from natctl.config import Settings
    from natctl.kernel.fake import FakeKernel
    from natctl.lobbies import Lobbies
    from natctl.model import PortRange, parse_mapping_line
    from natctl.plan import Changes
    from natctl.service import Service

    class Null(FakeKernel):
        def apply(self, changes: Changes) -> None:
            self.gen = changes.generation

    sync.local_port_overlap = lambda ports: None  # type: ignore[assignment]
    with tempfile.TemporaryDirectory(prefix="natctl-bulk-") as tmp:
        path = os.path.join(tmp, "mappings.txt")
        mapping_file(path, mappings, per)
        for how in ("time", "cprofile", "tracemalloc"):
            kernel = Null()
            svc = Service(Settings(state=os.path.join(tmp, f"{how}.db"), relay_ip="198.18.0.1",
                                   ports=PortRange(20000, 29999)), kernel_factory=lambda k=kernel: k)
            svc.apply()  # in sync: the file's change is scoped to its lobbies

            def run(svc: Service = svc) -> int:
                with open(path) as f:
                    lines = (parse_mapping_line(t, n) for n, t in enumerate(f, 1))
                    return sum(1 for _ in Lobbies(svc.rec).map_file(lines, create_lobbies=True))

            if how == "time":
                start = time.perf_counter()
                run()
                print(f"in-process add of {mappings:,} over a null kernel: {time.perf_counter() - start:.2f} s")
            elif how == "cprofile":
                prof = cProfile.Profile()
                prof.runcall(run)
                pstats.Stats(prof, stream=sys.stdout).sort_stats("tottime").print_stats(top)
            else:
                tracemalloc.start(10)
                run()
                peak = tracemalloc.get_traced_memory()[1]
                tracemalloc.stop()
                print(f"tracemalloc peak during the add: {peak / 1e6:.0f} MB")
            svc.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bulk", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mappings", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--per", type=int, default=50, help="clients a lobby (default 50)")
    ap.add_argument("--profile", action="store_true", help="also profile natctl's own part of the largest add")
    ap.add_argument("--json", action="store_true", help="print every figure as JSON")
    args = ap.parse_args(argv)
    from bench.lab import need_root

    need_root()
    results = [measure(n, args.per) for n in args.mappings]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            secs, mb = TARGETS.get(r["mappings"], (None, None))
            for what in ("add", "remove"):
                d = r[what]
                verdict = "" if secs is None or what == "remove" else \
                    (" (target met)" if d["wall_s"] < secs and d["peak_rss_mb"] < (mb or 0) else
                     f" (target MISSED: under {secs} s and {mb:.0f} MB)")
                print(f"natctl map {what} --from: {r['mappings']:,} mappings in {r['lobbies']:,} lobbies: "
                      f"{d['wall_s']:.2f} s, peak RSS {d['peak_rss_mb']:.0f} MB{verdict}")
    if args.profile:
        profile(max(args.mappings), args.per)
    return 0


if __name__ == "__main__":
    from bench import lab as benchlab

    benchlab.standalone(main, "bench.bulk")
