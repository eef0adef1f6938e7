"""The netlink writer (natctl.kernel.nlbatch) against a real kernel, in a throwaway namespace.

- 50,000 mappings through natctl's Service, every element read back with natctl's reader;
- a refusal in the middle of a 10,000-element batch leaves the kernel and the store as they were,
  also when the change was creating the table.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, cast

import pytest

from natctl.config import Settings
from natctl.errors import KernelError
from natctl.kernel.backend import Kernel
from natctl.kernel.nft import Nft
from natctl.lab.netns import delete, entered, run
from natctl.model import Client, Endpoint, Host, PortRange
from natctl.plan import DNAT, Changes
from natctl.service import Service

pytestmark = pytest.mark.kernel
RELAY = "198.18.0.1"
PORTS = PortRange(20000, 29999)
LOBBY = 1000


@pytest.fixture
def ns(monkeypatch) -> Iterator[str]:
    """A namespace of its own, with loopback only; deleted afterwards. natctl writes with netlink."""
    monkeypatch.setenv("NATCTL_WRITER", "netlink")
    name = f"natctl-nlb-{os.getpid()}"
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "link", "set", "lo", "up"], ns=name)
        yield name
    finally:
        delete(name)


class Recording:
    """The real kernel, remembering what was added; ``inject`` rewrites every change before it goes (natctl
    retries a refused scoped change in full: that one must be refused too)."""

    def __init__(self, inner: Kernel) -> None:
        self.inner = inner
        self.added: set = set()
        self.inject: Any = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def apply(self, changes: Changes) -> None:
        if self.inject:
            changes = self.inject(changes)
        self.inner.apply(changes)
        self.added = (self.added - set(changes.delete)) | set(changes.add)


def service(tmp_path) -> tuple[Service, Recording]:
    cfg = Settings(state=str(tmp_path / "natctl.db"), relay_ip=RELAY, ports=PORTS, accel="none", lock_timeout=30.0)
    rec = Recording(Service(cfg).kernel)
    return Service(cfg, kernel_factory=lambda: cast(Kernel, rec)), rec


def client(i: int) -> Endpoint:
    """The i-th made-up client, 198.19.0.1 upwards (198.18.0.0/15 only), the next port after 64,000."""
    return Endpoint(f"198.19.{i // 250 % 256}.{i % 250 + 1}", 40000 + i // 64_000)


def populate(svc: Service, mappings: int, first: int = 0) -> None:
    """Lobbies of LOBBY clients straight into the store (no kernel change yet), as the bench does."""
    now = time.time()
    for n, k in enumerate(range(first, first + mappings, LOBBY)):
        lobby, _ = svc.lobby_create(f"l{k}", open_=True, max_clients=LOBBY + 10, apply=False)
        with svc.store.write():
            svc.store.set_host(Host(lobby.id, Endpoint(f"198.18.250.{k // LOBBY + 1}", 27015), PORTS.high - n), now)
            for j in range(k, min(first + mappings, k + LOBBY)):
                svc.store.add_client(Client(0, lobby.id, "udp", client(j), PORTS.low + j - k, now, now))


def dump(path: str) -> list[str]:
    with sqlite3.connect(path) as db:
        return list(db.iterdump())


def conflict(changes: Changes) -> Changes:
    """The change with one more element in the middle of its adds: a key it already adds, with another
    value. Each is a fine element on its own; the kernel refuses the pair (and so the whole batch)."""
    adds = list(changes.add)
    dnat = [i for i, x in enumerate(adds) if x.set == DNAT]
    mid = dnat[len(dnat) // 2]  # messages of other sets and of dnat4 come before it and after it
    assert len(adds) >= 10_000 and 0 < mid < len(adds) - 1
    e = adds[mid]
    return replace(changes, add=(*adds[:mid + 1], replace(e, value=("198.18.0.9", 1)), *adds[mid + 1:]))


def test_50000_mappings_are_all_read_back(ns, tmp_path):
    with entered(ns):
        svc, rec = service(tmp_path)
        populate(svc, 50_000)
        t = time.perf_counter()
        result = svc.apply()
        took = time.perf_counter() - t
        installed = Nft().read()
        svc.close()
    assert installed.table_ok and result.added == len(rec.added)
    assert sum(1 for e in installed.elements if e.set == DNAT) == 2 * 50_000  # both directions of each
    assert installed.elements == rec.added
    assert {e: e.comment for e in installed.elements} == {e: e.comment for e in rec.added}
    print(f"50,000 mappings ({len(rec.added):,} elements) applied in {took:.2f} s")


def test_a_refusal_in_the_middle_of_a_batch_changes_nothing(ns, tmp_path):
    with entered(ns):
        svc, rec = service(tmp_path)
        populate(svc, 500)
        svc.apply()
        svc.lobby_create("big", open_=True, max_clients=3000)
        before, store_before, gen = Nft().read(), dump(svc.settings.state), Nft().generation()
        rec.inject = conflict
        clients = [client(10_000 + i) for i in range(2500)]
        with pytest.raises(KernelError) as err:
            svc.map_add("big", Endpoint("198.18.251.1", 27015), clients)
        after, store_after = Nft().read(), dump(svc.settings.state)
        assert Nft().generation() == gen
        svc.close()
    msg = err.value.message
    assert msg.startswith("nftables refused the change, nothing was applied (") and "\n" not in msg
    assert len(rec.added) > 0 and after.elements == before.elements and after.table_ok
    assert {e: e.comment for e in after.elements} == {e: e.comment for e in before.elements}
    assert store_after == store_before


def test_a_refused_batch_that_created_the_table_leaves_no_table(ns, tmp_path):
    with entered(ns):
        svc, rec = service(tmp_path)
        populate(svc, 2500)
        store_before = dump(svc.settings.state)
        rec.inject = conflict
        with pytest.raises(KernelError):
            svc.apply()
        present = Nft().table_present()
        svc.close()
    assert not present
    assert dump(str(tmp_path / "natctl.db")) == store_before
