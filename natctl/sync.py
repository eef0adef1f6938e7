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
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Protocol

from natctl import plan as planner
from natctl import ruleset as proof
from natctl.alloc import Allocator
from natctl.config import Settings, local_port_overlap
from natctl.errors import Conflict, Exhausted, KernelError, NatctlError, OwnedElsewhere, UsageError
from natctl.kernel.backend import Kernel
from natctl.kernel.forwarding import ensure_forwarding
from natctl.model import Endpoint, Host, Snapshot
from natctl.store import Store, random_tag
from natctl.views import SyncResult

if TYPE_CHECKING:
    from natctl.fleet.rows import FleetRows
    from natctl.packed import Desired

# What a change can touch: the elements of its lobby, client or forward, planned from the store; a bulk
# change's (thousands of lobbies) as bytes per map (natctl.packed), without an object per element.
Scope = Callable[[Store], "frozenset[planner.Element] | Desired"]
ElementScope = Callable[[Store], frozenset[planner.Element]]  # one lobby's, client's or forward's
# A fleet store opened where no relay of the fleet has this relay IP: no rows are this process's own.
NOT_A_RELAY = ""
# Every map a relay may own: a change planned for another relay's kernel leaves out what that kernel lacks.
ALL_SETS = planner.NFT_SETS | {planner.XDP}


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


def check_capacity(dnat_elements: int) -> None:
    """Exhausted (exit 5) before the kernel refuses: its mapping maps have a fixed size (natctl.kernel.nft)."""
    from natctl.kernel.nft import MAX_ELEMENTS

    if dnat_elements > MAX_ELEMENTS:
        raise Exhausted(f"{dnat_elements // 2:,} mappings are more than one relay holds ({MAX_ELEMENTS // 2:,}); "
                        "nothing was changed", "close lobbies, or spread them over a fleet of relays "
                        "(README: When one VPS is not enough)")


class Reconciler:
    def __init__(self, settings: Settings, kernel_factory: Callable[[], Kernel] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self._kernel_factory = kernel_factory
        self._kernel: Kernel | None = None
        self._store: Store | None = None
        self._relay_ip = settings.relay_ip
        # While a fleet change plans its scope: the elements planned, by the relay whose kernel they are for.
        self._collect: dict[str, set[planner.Element]] | None = None
        self._relay_ips: dict[str, str] = {}  # a fleet's relays' IPs by name (relay_address)
        self._relay_ips_until = 0.0
        # Once, before the first kernel write: the machine's own kernel must forward. A kernel handed in
        # (tests, the bench) is the caller's business.
        self.preflight: Callable[[Settings], None] | None = ensure_forwarding if kernel_factory is None else None

    # --- adapters, opened on first use so that read-only commands need no root

    @property
    def store(self) -> Store:
        if self._store is None:
            store = Store(self.settings.store_location, self.settings.lock_timeout)
            if store.fleet:  # this machine is the fleet's relay at its relay IP (natctl relay join), or none
                store.relay = self._fleet_name(store)
            self._store = store
        return self._store

    def _fleet_name(self, store: Store) -> str:
        from natctl.fleet.rows import FleetRows

        try:
            me = FleetRows(store).relay_at(self.relay_ip)
        except NatctlError:  # no relay IP here (an operator's machine): it reads and places, it forwards nothing
            me = None
        return me.name if me is not None else NOT_A_RELAY

    @property
    def fleet(self) -> FleetRows | None:
        """The fleet's rows when the store is shared (PostgreSQL), else None."""
        if not self.store.fleet:
            return None
        from natctl.fleet.rows import FleetRows

        return FleetRows(self.store)

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
        from natctl.db import redact

        where = redact(self.settings.store) if self.settings.store else os.path.abspath(self.settings.state)
        return planner.Owner(store.store_id(), where)

    def check_forwarding(self) -> None:
        """Once per process: IP forwarding on, or refused here (natctl.kernel.forwarding). Every kernel write
        runs it; the daemon also at start, when a kernel still in sync needs no write."""
        if self.preflight is not None:
            self.preflight(self.settings)
            self.preflight = None

    # --- the one way to change state

    @contextmanager
    def change(self, scope: Scope | None = None, apply: bool = True, effect: Effect | None = None,
               unchanged: bool = False) -> Iterator[Txn]:
        """Store rows, outside ``effect`` and kernel change together, or none of them.

        ``scope`` plans just the elements a change can touch (one lobby's, one
        client's, one forward's). When the kernel is known to mirror the store
        (both hold the tag of the last change, see Changes.generation), only
        those are planned, before and after the change, and their difference
        applied: milliseconds however many mappings are installed. Otherwise,
        and without a scope, the whole desired state is diffed against what
        the kernel holds. ``unchanged``: the caller changes no row (apply), so a kernel proven as the
        store's last write left it (its ruleset generation, natctl.ruleset) needs none of its maps read.
        """
        # Not a relay of the fleet (an operator's machine): no kernel here, nothing to turn on; what this
        # change plans for the fleet's relays goes to their outboxes.
        fleet_only = bool(self.settings.store) and apply and self.store.fleet and self.store.relay == NOT_A_RELAY
        apply = apply and not fleet_only
        if apply:
            _ = self.kernel  # fail fast (not root, no binding) before touching the store
            self.check_ports()
            self.check_forwarding()
        store = self.store
        fleet = self.fleet
        txn = Txn(store)
        changes = planner.Changes()
        touched = False  # the effect ran (perhaps in part): undo it if the change fails after that
        try:
            with store.write():
                # The kernel carries this store's last tag: this store wrote its last change, so it owns it.
                tag_before = store.generation() if apply else None
                mirrored = tag_before is not None and self.kernel.generation() == tag_before
                if apply and not mirrored:
                    self.check_owner()  # before any row changes: a full reconcile would undo another store's
                if apply and mirrored and fleet is not None:
                    mirrored = self._drain(fleet, store)  # first what other relays' changes left for this kernel
                ruleset, sealed = proof.sealed(self.kernel, store, self.relay_ip) if apply else (None, False)
                sealed = sealed and mirrored
                if not apply:
                    store.clear_rulesets()  # rows may change here without the kernel: nothing stays proven
                before = before_by = None
                if scope is not None and fleet is None and mirrored:
                    before = scope(store)
                elif scope is not None and fleet is not None:  # other relays' parts are always planned
                    before_by = self._planned(scope, store)
                    before = frozenset(before_by.get(store.relay or "", ())) if mirrored else None
                yield txn
                if effect is not None:
                    touched = True
                    effect.apply(store)
                if fleet is not None and before_by is not None and scope is not None and (apply or fleet_only):
                    after_by = self._planned(scope, store)
                    local = frozenset(after_by.pop(store.relay or "", ()))
                    self._post(fleet, store, before_by, after_by)
                    scope = (lambda _st: local)  # noqa: E731  what this relay's kernel holds of the scope
                if apply:
                    start = time.perf_counter()
                    tag = random_tag()
                    scoped = self._apply_scoped(store, scope, before, tag) if before is not None else None
                    checked = "scoped"
                    if scoped is None:
                        changes, checked = self._apply_full(store, tag, sealed and unchanged)
                    else:
                        changes = scoped
                    if scoped is None and fleet is not None:
                        fleet.clear(store.relay or "")  # a full reconcile holds all that waited for this kernel
                    if changes.generation is not None:
                        store.set_generation(changes.generation)
                    proof.seal(self.kernel, store, self.relay_ip, ruleset, sealed, changes.generation is not None,
                               verified=scoped is None)
                    txn.result = SyncResult(self.kernel.name, len(changes.add), len(changes.delete),
                                            changes.create_table, 0, time.perf_counter() - start, checked)
        except BaseException:
            if effect is not None and touched:
                effect.undo(store)
            raise
        if changes.delete and txn.result is not None:
            txn.result = replace(txn.result, flows_forgotten=self.kernel.forget(changes.flows()))

    # --- a fleet's changes (natctl.fleet): each relay's kernel holds only its own lobbies

    def _planned(self, scope: Scope, store: Store) -> dict[str, set[planner.Element]]:
        """The scope's elements by the relay whose kernel they belong to (plan_lobby sorts them)."""
        self._collect = {}
        try:
            mine = scope(store)
            assert not isinstance(mine, dict), "a fleet plans lobby by lobby (plan_lobbies), never in bytes"
            out, self._collect = self._collect, None
        finally:
            self._collect = None
        planned = set().union(*out.values()) if out else set()
        if mine - planned:  # planned without plan_lobby (a forward): this relay's own
            out.setdefault(store.relay or "", set()).update(mine - planned)
        return out

    def _post(self, fleet: FleetRows, store: Store, before: dict[str, set[planner.Element]],
              after: dict[str, set[planner.Element]]) -> None:
        """Other relays' parts of a change wait in their outboxes for their daemons (in this transaction)."""
        for relay in sorted((set(before) | set(after)) - {store.relay or ""}):
            changes = planner.diff(after.get(relay, set()), before.get(relay, set()))
            if changes.add or changes.delete:
                fleet.post(relay, changes)

    def _drain(self, fleet: FleetRows, store: Store) -> bool:
        """Apply what waits in this relay's outbox, in one kernel transaction; False if the kernel refused
        it (then this change reconciles in full, which holds all of it)."""
        waiting = fleet.take(store.relay or "")
        if not waiting:
            return True
        from natctl.fleet.model import compose

        merged = planner.Changes()
        for changes in waiting:
            merged = compose(merged, changes)
        owns = self.kernel.owns
        tag = random_tag()
        merged = replace(merged, add=tuple(e for e in merged.add if e.set in owns),
                         delete=tuple(e for e in merged.delete if e.set in owns), generation=tag)
        try:
            self.kernel.apply(merged)
        except KernelError:
            return False
        store.set_generation(tag)
        if merged.delete:
            self.kernel.forget(merged.flows())
        return True

    def drain(self) -> SyncResult:
        """A change of nothing: applies what other relays left in this relay's outbox (the daemon, on NOTIFY)."""
        with self.change(lambda _st: frozenset()) as txn:
            pass
        assert txn.result is not None
        return txn.result

    def _apply_scoped(self, store: Store, scope: Scope | None, before: frozenset[planner.Element] | Desired,
                      tag: int) -> planner.Changes | None:
        """Apply a scoped difference; None if the kernel refused it (it drifted from the store)."""
        assert scope is not None
        after = scope(store)
        if isinstance(after, dict) and isinstance(before, dict):  # a bulk scope, planned in bytes (natctl.packed)
            from natctl import packed

            changes = packed.diff(after, before)
        else:
            assert not isinstance(after, dict) and not isinstance(before, dict)
            changes = planner.diff(after, before)
        if changes:
            changes = replace(changes, generation=tag)
            try:
                self.kernel.apply(changes)
            except KernelError:
                return None
        return changes

    def _apply_full(self, store: Store, tag: int, sealed: bool = False) -> tuple[planner.Changes, str]:
        """Plan everything, read the kernel (not nftables' maps while ``sealed``), apply the difference:
        (the changes, how the kernel was checked: see SyncResult.checked)."""
        from natctl import packed

        # Planned, read and compared as bytes (natctl.packed): no object per element at 400,000 of them.
        snap, now = store.snapshot(self.relay_ip, clients=False), self.clock()
        read_packed = getattr(self.kernel, "read_packed", None)  # a test's kernel may lack it
        # nftables untouched since the store's last write, which the kernel took (sealed), and nothing in the
        # store expired since (the plan depends on the time only through TTLs): its maps hold that write's
        # plan, so they are neither planned nor read (at 100,000 mappings the dump alone takes seconds).
        skip = planner.NFT_SETS if sealed and read_packed is not None and not proof.expiring(snap, now) else frozenset()
        sets = self.kernel.owns - skip
        desired = packed.plan(snap, now, sets, store.client_rows() if sets & packed.MAPPING_SETS else ())
        check_capacity(len(desired.get(planner.DNAT, ())))
        installed = read_packed(skip) if read_packed is not None else self.kernel.read()
        held = installed.packed if installed.packed is not None else packed.held(installed.elements)
        changes = packed.diff(desired, held, installed.table_ok)
        del desired, held, installed  # what the change needs it holds itself
        # Verified in full: tag the kernel (if it changes, or lacks the store's tag) so the next change may be scoped,
        # and name this store as its owner in the same transaction.
        if changes or store.generation() is None or store.generation() != self.kernel.generation():
            changes = replace(changes, generation=tag, owner=self.identity(store))
            self.kernel.apply(changes)
            if self.settings.adopt:  # taken over: from here on this store defends it like any other
                self.settings = replace(self.settings, adopt=False)
        return changes, "ruleset" if skip else "read"

    def apply(self) -> SyncResult:
        """Make the kernel hold exactly what the store says (a no-op when it already does)."""
        with self.change(unchanged=True) as txn:
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
        cleanup closes or removes it, exactly as it came in. In a fleet they are
        planned for the relay the lobby is placed on, and sorted by relay."""
        snap = store.snapshot_lobby(self.relay_ip, lobby_id, client)
        relay = snap.lobbies[0].relay if snap.lobbies else (store.relay or "")  # (a closed lobby plans nothing)
        if store.fleet:
            snap = replace(snap, relay_ip=self.relay_address(store, relay))
        local = not store.fleet or (relay == store.relay and relay != NOT_A_RELAY)
        sets = self.kernel.owns if local else ALL_SETS
        elements = planner.plan(snap, None, sets)
        if self._collect is not None:
            self._collect.setdefault(relay, set()).update(elements)
        return elements

    def relay_address(self, store: Store, relay: str) -> str:
        """A fleet relay's IP, from a cache refreshed every minute (a relay keeps its IP while it has a name)."""
        now = time.monotonic()
        if relay not in self._relay_ips or now >= self._relay_ips_until:
            from natctl.fleet.rows import FleetRows

            self._relay_ips = {r.name: r.ip for r in FleetRows(store).relays()}
            self._relay_ips_until = now + 60.0
        return self._relay_ips.get(relay) or self.relay_ip

    def placed(self, store: Store, lobby_id: int) -> tuple[str, str]:
        """(relay name, relay IP) of the relay that forwards a lobby ("" and this relay's IP on one relay)."""
        if store.fleet:
            from natctl.fleet.rows import FleetRows

            where = FleetRows(store).lobby_relay(lobby_id)
            if where is not None:
                return where
        return store.relay or "", self.relay_ip

    def plan_lobbies(self, store: Store, names: list[str]) -> frozenset[planner.Element] | Desired:
        """The elements of the open lobbies called ``names`` (a bulk change's scope): on one relay in one
        snapshot, as bytes per map (natctl.packed: 100,000 mappings without an object each); in a fleet
        lobby by lobby, each for its own relay."""
        if store.fleet:
            lobbies = store.snapshot_lobbies(self.relay_ip, names).lobbies
            return frozenset().union(*(self.plan_lobby(store, lb.id) for lb in lobbies))
        from natctl import packed

        snap = store.snapshot_lobbies(self.relay_ip, names, clients=False)
        return packed.plan(snap, None, self.kernel.owns, store.client_rows(lb.id for lb in snap.lobbies))

    def lobby_scope(self, name: str) -> ElementScope:
        """The elements of the open lobby called ``name`` (none if there is none)."""
        def scope(store: Store) -> frozenset[planner.Element]:
            lobby = store.lobby(name)
            return self.plan_lobby(store, lobby.id) if lobby else frozenset()
        return scope

    def forward_scope(self, port: int) -> ElementScope:
        def scope(store: Store) -> frozenset[planner.Element]:
            fwd = store.forward(port)
            return planner.plan(Snapshot(self.relay_ip, forwards=(fwd,) if fwd else ()), None, self.kernel.owns)
        return scope

    def own_store(self, feature: str) -> None:
        """Refuse a per-relay feature on a fleet's shared store (its rows do not say which relay they are for)."""
        if self.store.fleet:
            raise UsageError(f"{feature} run on one relay with its own store, not on a fleet's shared one",
                             "use them on a relay whose store is its SQLite file (leave store unset there)")

    def place(self, store: Store, region: str | None = None, relay: str | None = None) -> str:
        """The relay a new lobby goes to (natctl.fleet.model.place): "" on one relay, where --region and
        --relay mean nothing."""
        fleet = self.fleet
        if fleet is None:
            if region is not None or relay is not None:
                raise UsageError("--region and --relay place lobbies in a fleet; this relay's store is its own",
                                 "leave them out, or set store = \"postgresql://...\" to join a fleet")
            return ""
        from natctl.fleet.model import place

        relays, now, dead_after = fleet.relays(), fleet.now(), self.settings.fleet.dead_after
        if region is None and relay is None and store.relay:
            try:  # this relay's region first, any other if none there is live
                mine = next((r.region for r in relays if r.name == store.relay), None)
                return place(relays, now, dead_after, mine).name
            except Exhausted:
                pass
        return place(relays, now, dead_after, region, relay).name

    # --- relay ports

    def allocator(self, store: Store, host: Host | None = None, relay: str | None = None) -> Allocator:
        """The ports in use: all of them, or (``host`` given) only what a new client of that host must avoid.

        A client port only needs to be unique among its host's clients and
        never a host port, so admitting one client reads one lobby's rows.
        ``relay``: the fleet relay whose ports these are (default: this one's;
        a host's: its lobby's).
        """
        reserved = (self.settings.registration_port,)
        if host is not None:
            if relay is None and store.fleet:
                relay = self.placed(store, host.lobby_id)[0]
            return Allocator(self.settings.ports, (), ((host.addr, p) for p in store.client_ports(host.lobby_id)),
                             reserved=reserved, is_host_port=lambda port: store.is_host_port(port, relay))
        self.check_ports()
        # A new host: its host port avoids every host port and every client port number in use (two
        # integer queries, not a snapshot of every client); its own clients' ports start from nothing.
        return Allocator(self.settings.ports, store.host_ports(relay), reserved=reserved,
                         client_numbers=store.client_port_numbers(relay))
