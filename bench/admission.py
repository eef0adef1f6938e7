"""How fast does a new client's traffic flow in the kernel, and what does a flood cost the daemon?

    sudo .venv/bin/python -m bench.admission [--clients 200] [--flood 100000] [--cleanup-interval 30s] [--json FILE]

The daemon's figures of ``natctl bench`` (``daemon.admission``) on their own,
with more clients and a flood: in the bench's lab, a host registers with
``natctl serve``; each new client's latency is from its first packet to its
first packet forwarded by the kernel; then a stranger outside the lobby's
network floods the host port. Prints JSON; removes everything it made, also
on Ctrl-C.
"""

from __future__ import annotations

import argparse
import tempfile

from bench import daemon
from bench import lab as benchlab
from bench.methods import Context
from bench.tool import BenchError


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.admission", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--flood", type=int, default=100_000, help="packets from the stranger (0: no flood)")
    ap.add_argument("--cleanup-interval", default="30s", help="the daemon's (its cleanup competes for the store)")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    reason = daemon.unavailable()
    if reason:
        raise BenchError(reason)
    with tempfile.TemporaryDirectory(prefix="natctl-admission-") as tmp, benchlab.session() as lab:
        result = daemon.admission(lab, Context(tmp), args.clients, flood=args.flood, cleanup=args.cleanup_interval)
    result["target_p99_under_10ms"] = result["p99_ms"] is not None and result["p99_ms"] < 10
    return benchlab.report(result, args.json)


if __name__ == "__main__":
    benchlab.standalone(main, "bench.admission")
