"""Install cost (issue 2): 10,000 mappings in one apply, then one more mapping on top of them.

    sudo .venv/bin/python -m bench.install_cost [--mappings 10000] [--writers netlink,nft] [--json]

Each element writer (NATCTL_WRITER: ``netlink``, one nfnetlink batch from
natctl.kernel.nlbatch; ``nft``, one libnftables script) is measured in turn,
side by side in the same run.

Builds the bench's lab (bench/lab.py), has natctl's bench worker fill a store
with N mappings and apply them in one transaction, then adds one client twice
over: through the daemon's scoped path and through `natctl map add`'s path
(scoped too, while the kernel carries the store's tag). Prints how long each
took, how many nftables elements each sent, and whether they were all that new
mapping's own. Everything it creates is removed afterwards, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import tempfile

from bench import lab as benchlab
from bench.methods import Context, NatctlNft

# Issue 11's targets, by mappings installed: one apply into an empty table (seconds, peak MB); every size:
# one more mapping in the daemon and inside the CLI's change (ms), a reconcile with nothing to do (s).
APPLY_TARGETS = {10_000: (0.25, None), 100_000: (2.0, 150.0)}
DAEMON_MS, CLI_MS, NOOP_S = 2.0, 50.0, 1.0


def targets(info: dict) -> list[tuple[str, bool]]:
    """Each of issue 11's targets that this run measured, and whether it was met."""
    out = []
    secs, mb = APPLY_TARGETS.get(info["mappings"], (None, None))
    if secs is not None:
        out.append((f"one apply under {secs} s", info["apply_s"] < secs))
    if mb is not None:
        out.append((f"peak resident under {mb:.0f} MB", info["hwm_kib"] / 1024 < mb))
    inc = info["incremental"]
    out.append((f"one more mapping under {DAEMON_MS:.0f} ms in the daemon", inc["daemon"]["total_ms"] < DAEMON_MS))
    out.append((f"one more mapping under {CLI_MS:.0f} ms in the CLI's change", inc["cli"]["total_ms"] < CLI_MS))
    out.append((f"a reconcile with nothing to do under {NOOP_S:.0f} s", info["noop"]["sealed"]["s"] < NOOP_S))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.install_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mappings", type=int, default=10_000)
    ap.add_argument("--writers", default="netlink,nft", help="element writers to measure, in this order")
    ap.add_argument("--json", action="store_true", help="print every figure as JSON")
    args = ap.parse_args(argv)
    infos = {}
    with tempfile.TemporaryDirectory(prefix="natctl-install-cost-") as tmp, benchlab.session() as lab:
        for writer in args.writers.split(","):
            method = NatctlNft()
            method.env = {**method.env, "NATCTL_WRITER": writer}
            running = method.start(lab, Context(tmp), mappings=args.mappings, incremental=True)
            infos[writer] = running.info
            running.stop()
    for info in infos.values():
        info["targets"] = dict(targets(info))
    if args.json:
        print(json.dumps(infos if len(infos) > 1 else next(iter(infos.values())), indent=2))
        return 0
    for writer, info in infos.items():
        inc = info["incremental"]
        print(f"[writer {writer}] {info['mappings']:,} mappings ({info['elements']:,} nftables elements) in one "
              f"apply: {info['apply_s']:.2f} s, of which the kernel transaction {info['kernel_apply_s']:.2f} s; "
              f"peak resident {info['hwm_kib'] / 1024:.0f} MB")
        for path, what in (("daemon", "daemon (scoped admit_client)"), ("cli", "natctl map add (the CLI's path)")):
            d = inc[path]
            print(f"  one more mapping via {what}: {d['total_ms']:.2f} ms (kernel transaction "
                  f"{d['kernel_apply_ms']:.2f} ms, reading the kernel {d['kernel_read_ms']:.0f} ms), "
                  f"{d['elements_sent']} elements sent, only that mapping's: {'yes' if d['only_that_mapping'] else 'NO'}")
        for case, what in (("sealed", "nftables as natctl left it"), ("after_foreign_commit", "after another "
                                                                      "program's nftables transaction")):
            n = info["noop"][case]
            print(f"  natctl apply with nothing to do, {what}: {n['s']:.2f} s (maps checked by: {n['checked']}"
                  f"{', CHANGED' if n['changed'] else ''})")
        for what, met in targets(info):
            print(f"  target {what}: {'met' if met else 'MISSED'}")
    return 0


if __name__ == "__main__":
    benchlab.standalone(main, "bench.install_cost")
