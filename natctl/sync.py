"""The one way natctl changes state: store rows and kernel together, or neither.

A ``Reconciler`` owns the store, the kernel and the planner. Every change
(``change()``) opens a store write transaction, lets the caller change rows,
plans, applies the difference to the kernel in one transaction, and commits
the store only if the kernel took it. A refused change leaves both exactly as
they were. Lobbies, admission, forwards, cleanup and the game masters' VPN all
receive a Reconciler; none of them knows who calls it.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Protocol

from natctl import plan as planner
from natctl.alloc import Allocator
from natctl.config import Settings, local_port_overlap
from natctl.errors import Conflict, KernelError, OwnedElsewhere
from natctl.kernel.backend import Kernel
from natctl.model import Endpoint, Host, Snapshot
from natctl.preflight import ensure_forwarding
from natctl.store import Store
from natctl.views import SyncResult

# What a change can touch: the elements of its lobby, client or forward, planned from the store.
Scope = Callable[[Store], frozenset[planner.Element]]


class Effect(Protocol):
    """State outside the kernel's NAT maps that must match the rows (a VPN's peers).

    ``apply`` runs inside the store transaction, before the kernel's part;
    if the change fails after it ran, ``undo`` runs after the rollback, so
    the outside state matches the rows that remain.
    """

    def apply(self, store: Store) -> None: ...

    def undo(self, store: Store) -> None: ...


@dataclass
class Txn:
    """One change in progress: the store to write, and the kernel's result once applied."""

    store: Store
    result: SyncResult | None = None


class Reconciler:
    def __init__(self, settings: Settings, kernel_factory: Callable[[], Kernel] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self._kernel_factory = kernel_factory
        self._kernel: Kernel | None = None
        self._store: Store | None = None
        self._relay_ip = settings.relay_ip
        # Once, before the first kernel write: the machine's own kernel must forward. A kernel handed in
        # (tests, the bench) is the caller's business.
        self.preflight: Callable[[Settings], None] | None = ensure_forwarding if kernel_factory is None else None

    # --- adapters, opened on first use so that read-only commands need no root

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.settings.state, self.settings.lock_timeout)
        return self._store

    @property
    def kernel(self) -> Kernel:
        if self._kernel is None:
            if self._kernel_factory is None:
                from natctl.kernel.accel import select

                self._kernel_factory = lambda: select(self.settings)  # accel: none, xdp or auto
            self._kernel = self._kernel_factory()
        return self._kernel

    @property
    def relay_ip(self) -> str:
        if not self._relay_ip:
            from natctl.kernel.links import default_route

            self._relay_ip = default_route()[1]
        return self._relay_ip

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    def check_ports(self) -> None:
        """The relay range must lie outside the kernel's ip_local_port_range (or the kernel may hand a
        relay port to some socket); refused before anything changes, store or kernel."""
        overlap = local_port_overlap(self.settings.ports)
        if overlap:
            raise Conflict(overlap.split(":")[0], overlap.split(": ", 1)[1])

    def check_owner(self) -> None:
        """Refuse (OwnedElsewhere, exit 7) if the kernel's table belongs to another store, unless adopting.

        A table that names no store (first install, after 'natctl uninstall', after a reboot) is
        taken silently; so is one that names this store."""
        owner = self.kernel.owner()
        if owner is None or self.settings.adopt or owner.id == self.store.store_id():
            return
        mine = os.path.abspath(self.settings.state)
        adopt = "or rerun with --adopt (natctl --adopt COMMAND) to hand the kernel to this store, whose mappings " \
                "then replace the others'"
        if owner.path == mine:  # the file was replaced: the table belongs to the store that was there before
            raise OwnedElsewhere(f"another natctl holds the kernel: table inet natctl belongs to an earlier store "
                                 f"at {mine} (this one was made since); nothing was changed",
                                 f"restore that file, {adopt}")
        theirs = owner.path or "another store"
        known = owner.path.startswith("/")  # else unnamed, or cut to the end of a long path
        raise OwnedElsewhere(f"another natctl holds the kernel: table inet natctl belongs to {theirs}, not to {mine}; "
                             "nothing was changed",
                             (f"pass --state {owner.path}, " if known else "pass that store with --state, ") + adopt)

    def identity(self, store: Store) -> planner.Owner:
        """This store as the kernel's table names it (Changes.owner)."""
        return planner.Owner(store.store_id(), os.path.abspath(self.settings.state))

    def check_forwarding(self) -> None:
        """Once per process: IP forwarding on, or refused here (natctl.preflight). Every kernel write
        runs it; the daemon also at start, when a kernel still in sync needs no write."""
        if self.preflight is not None:
            self.preflight(self.settings)
            self.preflight = None

    # --- the one way to change state

    @contextmanager
    def change(self, scope: Scope | None = None, apply: bool = True, effect: Effect | None = None) -> Iterator[Txn]:
        """Store rows, outside ``effect`` and kernel change together, or none of them.

        ``scope`` plans just the elements a change can touch (one lobby's, one
        client's, one forward's). When the kernel is known to mirror the store
        (both hold the tag of the last change, see Changes.generation), only
        those are planned, before and after the change, and their difference
        applied: milliseconds however many mappings are installed. Otherwise,
        and without a scope, the whole desired state is diffed against what
        the kernel holds.
        """
        if apply:
            _ = self.kernel  # fail fast (not root, no binding) before touching the store
            self.check_ports()
            self.check_forwarding()
        store = self.store
        txn = Txn(store)
        changes = planner.Changes()
        touched = False  # the effect ran (perhaps in part): undo it if the change fails after that
        try:
            with store.write():
                # The kernel carries this store's last tag: this store wrote its last change, so it owns it.
                mirrored = apply and store.generation() is not None and self.kernel.generation() == store.generation()
                if apply and not mirrored:
                    self.check_owner()  # before any row changes: a full reconcile would undo another store's
                trusted = mirrored and scope is not None
                before = scope(store) if trusted and scope is not None else None
                yield txn
                if effect is not None:
                    touched = True
                    effect.apply(store)
                if apply:
                    start = time.perf_counter()
                    tag = secrets.randbits(31)
                    scoped = self._apply_scoped(store, scope, before, tag) if before is not None else None
                    changes = scoped if scoped is not None else self._apply_full(store, tag)
                    if changes.generation is not None:
                        store.set_generation(changes.generation)
                    txn.result = SyncResult(self.kernel.name, len(changes.add), len(changes.delete),
                                            changes.create_table, 0, time.perf_counter() - start)
        except BaseException:
            if effect is not None and touched:
                effect.undo(store)
            raise
        if changes.delete and txn.result is not None:
            txn.result = replace(txn.result, flows_forgotten=self.kernel.forget(changes.flows()))

    def _apply_scoped(self, store: Store, scope: Scope | None, before: frozenset, tag: int) -> planner.Changes | None:
        """Apply a scoped difference; None if the kernel refused it (it drifted from the store)."""
        assert scope is not None
        changes = planner.diff(scope(store), before)
        if changes:
            changes = replace(changes, generation=tag)
            try:
                self.kernel.apply(changes)
            except KernelError:
                return None
        return changes

    def _apply_full(self, store: Store, tag: int) -> planner.Changes:
        desired = planner.plan(store.snapshot(self.relay_ip), self.clock(), self.kernel.owns)
        installed = self.kernel.read()
        changes = planner.diff(desired, installed.elements, installed.table_ok)
        # Verified in full: tag the kernel (if it changes, or lacks the store's tag) so the next change may be scoped,
        # and name this store as its owner in the same transaction.
        if changes or store.generation() is None or store.generation() != self.kernel.generation():
            changes = replace(changes, generation=tag, owner=self.identity(store))
            self.kernel.apply(changes)
            if self.settings.adopt:  # taken over: from here on this store defends it like any other
                self.settings = replace(self.settings, adopt=False)
        return changes

    def apply(self) -> SyncResult:
        """Make the kernel hold exactly what the store says (a no-op when it already does)."""
        with self.change() as txn:
            pass
        assert txn.result is not None
        return txn.result

    def in_sync(self) -> bool:
        """Does the kernel carry the tag of the store's last change (so it holds what the store says),
        in a table that names this store as its owner?"""
        tag = self.store.generation()
        if tag is None or self.kernel.generation() != tag:
            return False
        owner = self.kernel.owner()
        return owner is not None and owner.id == self.store.store_id()

    # --- scopes: what one change can touch

    def plan_lobby(self, store: Store, lobby_id: int,
                   client: tuple[str, Endpoint] | None = None) -> frozenset[planner.Element]:
        """One lobby's elements (or only those of one of its clients and its host port).

        TTLs are not looked at: what a scope holds goes from the kernel when
        cleanup closes or removes it, exactly as it came in."""
        return planner.plan(store.snapshot_lobby(self.relay_ip, lobby_id, client), None, self.kernel.owns)

    def lobby_scope(self, name: str) -> Scope:
        """The elements of the open lobby called ``name`` (none if there is none)."""
        def scope(store: Store) -> frozenset[planner.Element]:
            lobby = store.lobby(name)
            return self.plan_lobby(store, lobby.id) if lobby else frozenset()
        return scope

    def forward_scope(self, port: int) -> Scope:
        def scope(store: Store) -> frozenset[planner.Element]:
            fwd = store.forward(port)
            return planner.plan(Snapshot(self.relay_ip, forwards=(fwd,) if fwd else ()), None, self.kernel.owns)
        return scope

    # --- relay ports

    def allocator(self, store: Store, host: Host | None = None) -> Allocator:
        """The ports in use: all of them, or (``host`` given) only what a new client of that host must avoid.

        A client port only needs to be unique among its host's clients and
        never a host port, so admitting one client reads one lobby's rows.
        """
        reserved = (self.settings.registration_port,)
        if host is not None:
            return Allocator(self.settings.ports, (), ((host.addr, p) for p in store.client_ports(host.lobby_id)),
                             reserved=reserved, is_host_port=store.is_host_port)
        self.check_ports()
        # A new host: its host port avoids every host port and every client port number in use (two
        # integer queries, not a snapshot of every client); its own clients' ports start from nothing.
        return Allocator(self.settings.ports, store.host_ports(), reserved=reserved,
                         client_numbers=store.client_port_numbers())
