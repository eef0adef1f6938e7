"""The kernel behind one small interface: read what is installed, apply changes, uninstall.

``NftKernel`` is the real one; ``FakeKernel`` applies transactions atomically in
memory for fast unit tests (never instead of the kernel tests).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from natctl.errors import KernelError
from natctl.kernel.nft import Installed, render
from natctl.plan import NFT_SETS, Changes


class Kernel(Protocol):
    name: str
    owns: frozenset[str]  # the plan's sets this backend installs (see natctl.plan)

    def read(self, sets: Iterable[str] | None = None) -> Installed: ...

    def generation(self) -> int | None: ...

    def apply(self, changes: Changes) -> None: ...

    def forget(self, changes: Changes) -> int: ...

    def uninstall(self) -> bool: ...


class NftKernel:
    name = "nftables"
    owns = NFT_SETS

    def __init__(self) -> None:
        from natctl.kernel.nft import Nft

        self.nft = Nft()

    def read(self, sets: Iterable[str] | None = None) -> Installed:
        return self.nft.read(sets)

    def generation(self) -> int | None:
        return self.nft.generation()

    def apply(self, changes: Changes) -> None:
        self.nft.apply(changes)

    def forget(self, changes: Changes) -> int:
        from natctl.kernel import conntrack

        return conntrack.forget(changes.flows())

    def uninstall(self) -> bool:
        return self.nft.uninstall()


class FakeKernel:
    """In-memory kernel: all of a transaction or nothing, and a log of scripts sent."""

    name = "fake"
    owns = NFT_SETS

    def __init__(self, fail: bool = False) -> None:
        self.installed = Installed()
        self.scripts: list[str] = []
        self.fail = fail
        self.gen: int | None = None
        self.reads = 0

    def read(self, sets: Iterable[str] | None = None) -> Installed:
        if sets is not None:
            keep = set(sets)
            return Installed(elements={e for e in self.installed.elements if e.set in keep},
                             counters={k: v for k, v in self.installed.counters.items() if k[0] in keep})
        self.reads += 1
        return Installed(self.installed.table_ok, self.installed.present, set(self.installed.elements),
                         dict(self.installed.counters))

    def apply(self, changes: Changes) -> None:
        if not changes:
            return
        if self.fail:
            raise KernelError("nftables refused the change, nothing was applied (fake)", "test")
        self.scripts.append(render(changes))
        elements = set() if changes.create_table else set(self.installed.elements)
        elements -= set(changes.delete)
        elements |= set(changes.add)
        self.installed = Installed(True, True, elements, {})
        self.gen = changes.generation

    def generation(self) -> int | None:
        return self.gen

    def forget(self, changes: Changes) -> int:
        return len(changes.flows())

    def uninstall(self) -> bool:
        existed = self.installed.present
        self.installed = Installed()
        self.gen = None
        return existed
