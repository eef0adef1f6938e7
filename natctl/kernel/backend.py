"""The kernel behind one small interface: read what is installed, apply changes, block, uninstall.

Nothing else in natctl talks to the kernel's NAT state: the service, the
daemon and cleanup all go through a ``Kernel``. ``NftKernel`` is the real one
(``XdpKernel`` in natctl.kernel.accel adds the accelerator); ``FakeKernel`` in
natctl.kernel.fake applies transactions atomically in memory for unit tests
(never instead of the kernel tests).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from typing import Protocol

from natctl.kernel.nft import DELIVERY_MARK, Installed
from natctl.plan import NFT_SETS, Changes, Flow, Owner


class Kernel(Protocol):
    @property
    def name(self) -> str: ...  # for messages and status: "nftables", "nftables+xdp(native)"

    owns: frozenset[str]  # the plan's sets this backend installs (see natctl.plan)
    # Packets the daemon sends itself (a client's first packets) carry this mark:
    # the kernel lets them skip conntrack, so they never take the client flow's tuple.
    delivery_mark: int

    def read(self, sets: Iterable[str] | None = None) -> Installed: ...

    def read_packed(self, skip: Collection[str] = ()) -> Installed:
        """table_ok, present and the elements as bytes per map (Installed.packed, natctl.packed): what a
        full reconcile compares its plan with, without an Element (nor counters) per element. The maps in
        ``skip`` are not read (the ruleset generation proved them as natctl's last write left them)."""
        ...

    def ruleset(self) -> int | None:
        """nftables' ruleset generation (natctl.kernel.nldump.ruleset_generation): one more for every
        committed transaction, whoever made it. None where it cannot be known."""
        ...

    @property
    def transactions(self) -> int:
        """How many nftables transactions the last ``apply`` committed."""
        ...

    def generation(self) -> int | None: ...

    def owner(self) -> Owner | None:
        """The store the installed table belongs to (written with Changes.owner); None: nobody's."""
        ...

    def apply(self, changes: Changes) -> None: ...

    def forget(self, flows: list[Flow]) -> int:
        """Delete the conntrack entries of these flows, so their next packet is NATed anew."""
        ...

    def block(self, ip: str, port: int) -> None:
        """Drop ``ip``'s packets to host port ``port`` in the kernel for a while (a refused sender)."""
        ...

    def block_all(self, senders: Iterable[tuple[str, int]]) -> None:
        """``block`` for many (ip, host port) pairs in one kernel command."""
        ...

    def uninstall(self) -> bool: ...


class NftKernel:
    name = "nftables"
    owns = NFT_SETS
    delivery_mark = DELIVERY_MARK

    def __init__(self, writer: str | None = None) -> None:
        """``writer``: how element changes go to the kernel, "netlink" or "nft" (default: NATCTL_WRITER, else
        netlink; see natctl.kernel.nft.WRITERS)."""
        from natctl.kernel.nft import Nft

        self.nft = Nft(writer)

    def read(self, sets: Iterable[str] | None = None) -> Installed:
        return self.nft.read(sets)

    def read_packed(self, skip: Collection[str] = ()) -> Installed:
        return self.nft.read_packed(skip)

    def ruleset(self) -> int | None:
        return self.nft.ruleset()

    @property
    def transactions(self) -> int:
        return self.nft.transactions

    def generation(self) -> int | None:
        return self.nft.generation()

    def owner(self) -> Owner | None:
        return self.nft.owner()

    def apply(self, changes: Changes) -> None:
        self.nft.apply(changes)

    def forget(self, flows: list[Flow]) -> int:
        from natctl.kernel import conntrack

        return conntrack.forget(flows)

    def block(self, ip: str, port: int) -> None:
        self.nft.block(ip, port)

    def block_all(self, senders: Iterable[tuple[str, int]]) -> None:
        self.nft.block_all(senders)

    def uninstall(self) -> bool:
        from natctl.fleet.fence import remove_script

        gone = self.nft.uninstall()
        self.nft.run(remove_script())  # a fleet relay's lease (natctl.fleet.fence) goes with the rest
        return gone
