"""The accelerated backend: nftables plus natctl's XDP program, fed by one plan.

nftables always holds every mapping and is correct on its own; the XDP map
holds the UDP ones again, so most packets skip the kernel stack. A sync
applies the nftables part in its one transaction and the XDP part with batch
map writes in the same step. Whatever XDP cannot do, nftables does.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Collection, Iterable, Sequence

from natctl import packed
from natctl.config import Settings
from natctl.errors import KernelError, NatctlError
from natctl.kernel.backend import Kernel, NftKernel
from natctl.kernel.nft import Installed
from natctl.kernel.xdp import PIN_ROOT, Program, XdpUnavailable, detach
from natctl.plan import NFT_SETS, XDP, Changes, Element, Flow, Owner


def warn(text: str) -> None:
    print(f"natctl: warning: {text}", file=sys.stderr)


class XdpKernel:
    """``Kernel`` over nftables and XDP on one interface (see natctl.kernel.backend)."""

    def __init__(self, interface: str, mode: str = "auto", nft: NftKernel | None = None,
                 pin_root: str | None = PIN_ROOT) -> None:
        self.nft = nft if nft is not None else NftKernel()
        self.prog = Program.find(interface, mode, pin_root)
        self.owns = NFT_SETS | {XDP}
        self.delivery_mark = self.nft.delivery_mark
        self.detached = False  # set by uninstall when it removed natctl's program

    @property
    def name(self) -> str:
        if XDP not in self.owns:
            return self.nft.name
        return f"{self.nft.name}+xdp({self.prog.mode if self.prog.attached else 'detached'})"

    def read(self, sets: Iterable[str] | None = None) -> Installed:
        installed = self.nft.read(None if sets is None else [s for s in sets if s != XDP])
        if XDP in self.owns and (sets is None or XDP in sets):
            stats = self.prog.flow_stats()
            for key, value in self.prog.entries().items():
                installed.elements.add(Element(XDP, key, value))
                installed.counters[(XDP, key)] = stats.get(key, (0, 0, 0))[:2]
        return installed

    def read_packed(self, skip: Collection[str] = ()) -> Installed:
        installed = self.nft.read_packed(skip)
        if XDP in self.owns and XDP not in skip and installed.packed is not None:
            installed.packed[XDP] = self.prog.packed_entries()
        return installed

    def generation(self) -> int | None:
        return self.nft.generation()

    def ruleset(self) -> int | None:
        return self.nft.ruleset()  # nftables' only: the XDP map has no generation, so a reconcile reads it

    @property
    def transactions(self) -> int:
        return self.nft.transactions

    def owner(self) -> Owner | None:
        return self.nft.owner()  # the owner lives in the nftables table; the XDP map follows whoever owns it

    def apply(self, changes: Changes) -> None:
        nft_add, xdp_add = _split(changes.add)
        nft_del, xdp_del = _split(changes.delete)
        self.nft.apply(Changes(nft_add, nft_del, changes.create_table, changes.generation, changes.owner))
        if XDP not in self.owns or not (xdp_del or xdp_add or changes.create_table or not self.prog.attached):
            return
        try:
            self.prog.load()
            if changes.create_table:  # nftables rebuilds its table from nothing: the XDP map keeps only the plan
                have, want = self.prog.packed_entries(), set(xdp_add)
                xdp_del = [h for h in have if h not in want]
                xdp_add = [a for a in xdp_add if a not in have]
            added = self.prog.write_packed(xdp_del, xdp_add)
            self.prog.attach()  # after the writes: a new program starts with its maps full
        except XdpUnavailable as err:
            self._give_up(str(err))
            return
        except OSError as err:
            raise KernelError(f"nftables took the change but XDP refused it ({err.strerror or err})",
                              "run 'natctl apply' again, or use --accel none") from None
        if added < len(xdp_add):
            warn(f"the XDP map is full: {len(xdp_add) - added} mapping directions are left to nftables")

    def _give_up(self, why: str) -> None:
        """XDP refused at attach time: say so once and carry on with nftables alone."""
        warn(f"XDP accelerator off ({why}); relaying with nftables alone")
        self.owns = NFT_SETS
        self.prog.close()

    def forget(self, flows: list[Flow]) -> int:
        return self.nft.forget(flows)

    def block(self, ip: str, port: int) -> None:
        self.nft.block(ip, port)  # refused senders are dropped by nftables; XDP passes unknown keys to it

    def block_all(self, senders: Iterable[tuple[str, int]]) -> None:
        self.nft.block_all(senders)

    def uninstall(self) -> bool:
        table = self.nft.uninstall()
        self.detached = detach(self.prog.ifname, self.prog.pin_root)
        self.prog.close()
        self.prog.attached = False
        return table or self.detached


def _split(items: Sequence[Element]) -> tuple[Sequence[Element], list[bytes]]:
    """nftables' part of a change's adds (deletes), and the XDP map's as element bytes (natctl.packed): a full
    reconcile's 200,000 as the plan packed them, a scoped change's few packed here."""
    if isinstance(items, packed.PackedElements):
        return items.without({XDP}), list(items.groups.get(XDP, ((), None))[0])
    # (every XDP element the plan makes has its value: plan.mapping_elements)
    return tuple(e for e in items if e.set != XDP), [packed.pack(e) for e in items if e.set == XDP and e.value]


def select(settings: Settings, mode: str | None = None) -> Kernel:
    """The backend ``settings.accel`` asks for: none, xdp (warn and fall back) or auto (quietly fall back).

    The XDP mode comes from NATCTL_XDP_MODE (auto, native, generic): labs on
    veth pairs whose peer runs XDP can ask for native.
    """
    from natctl.kernel.links import default_route

    nft = NftKernel(settings.writer)
    try:
        interface = settings.interface or default_route()[0]
    except NatctlError as err:
        if settings.accel == "xdp":
            warn(f"XDP accelerator off ({err.message}); relaying with nftables alone")
        return nft
    if settings.accel == "none":
        try:  # a program left by an earlier --accel would forward mappings nftables no longer has
            detach(interface)
        except OSError:
            pass
        return nft
    try:
        return XdpKernel(interface, mode or os.environ.get("NATCTL_XDP_MODE", "auto"), nft)
    except (XdpUnavailable, OSError) as err:
        if settings.accel == "xdp":
            warn(f"XDP accelerator off ({err}); relaying with nftables alone")
        return nft
