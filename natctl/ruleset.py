"""Proof that nftables still holds what natctl's last write left there, so a full reconcile can skip its maps.

nftables counts every committed transaction in a network namespace: its ruleset generation
(natctl.kernel.nldump.ruleset_generation, through ``Kernel.ruleset``). Packets filling a dynamic set and
elements timing out do not count; anything else that changes nftables does, whoever makes it. Each natctl
write records in the store the count it left (``seal``), but only when its own transactions were the only
ones since a state it knew: a full read, or an earlier proof. Finding that same count later (``sealed``),
with the kernel carrying the store's tag, proves nftables as that write left it. A full reconcile (natctl.sync)
then plans and reads none of nftables' maps, unless a lobby or forward ran out of time since (``expiring``).
A record names the relay IP it was planned for and the boot and namespace where the count holds; another
program's transaction, or rows changed without the kernel (the store clears the records), void it.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from natctl.kernel.backend import Kernel
    from natctl.model import Snapshot
    from natctl.store import Store


def sealed(kernel: Kernel, store: Store, relay_ip: str) -> tuple[int | None, bool]:
    """nftables' ruleset generation now, and whether it is the one the store's last write to this kernel
    left (then no program changed nftables since)."""
    now = kernel.ruleset()
    return now, now is not None and store.ruleset() == _record(now, relay_ip)


def seal(kernel: Kernel, store: Store, relay_ip: str, before: int | None, proven: bool, wrote: bool,
         verified: bool) -> None:
    """Record the generation that proves the kernel as a change left it. ``before``: the generation at the
    change's start (``proven``: sealed then); ``verified``: the kernel was read in full after that (or proven);
    ``wrote``: the change committed. A write seals only if its own were the only commits since ``before``
    and what it changed was known."""
    if before is None:
        return
    if not wrote:
        if verified:
            store.set_ruleset(_record(before, relay_ip))
        return
    expected = before
    for _ in range(kernel.transactions):
        expected = (expected + 1) & 0xFFFFFFFF or 1  # the kernel's count skips 0
    after = kernel.ruleset()
    if (verified or proven) and after == expected:
        store.set_ruleset(_record(after, relay_ip))


def expiring(snap: Snapshot, now: float) -> bool:
    """Has a lobby or forward of the snapshot passed its TTL (so the plan at ``now`` may differ from the
    plan of an earlier write, with no row changed)?"""
    return any(lb.closed is None and lb.expired(now) for lb in snap.lobbies) or \
        any(f.expired(now) for f in snap.forwards)


def _record(generation: int, relay_ip: str) -> str:
    """A generation as the store keeps it, with what else the plan and the count depend on: the relay IP
    (in every snat element), and this boot and network namespace (each counts on its own)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as fh:
            boot = fh.read().strip()
        instance = f"{boot} {os.stat('/proc/self/ns/net').st_ino}"
    except OSError:
        instance = "unknown"
    return f"{generation} {relay_ip} {instance}"
