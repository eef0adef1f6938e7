"""The service API: every command of the CLI and the daemon goes through here.

Each change follows one pattern (see ``_change``): open a store write
transaction, change rows, plan, apply the difference to the kernel in one
transaction, and commit the store only if the kernel took it. A refused
change leaves both exactly as they were.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

from natctl import plan as planner
from natctl.alloc import Allocator
from natctl.config import Settings, local_port_overlap
from natctl.errors import Conflict, KernelError, NotFound, UsageError
from natctl.kernel.backend import Kernel
from natctl.forwards import ForwardOps
from natctl.model import Client, Endpoint, Host, Lobby
from natctl.relayops import RelayOps, hash_token
from natctl.store import Store
from natctl.views import LobbyView, MappingView, SyncResult


class Service(RelayOps, ForwardOps):
    def __init__(self, settings: Settings, kernel_factory: Callable[[], Kernel] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.clock = clock
        self._kernel_factory = kernel_factory
        self._kernel: Kernel | None = None
        self._store: Store | None = None
        self._relay_ip = settings.relay_ip

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

    # --- the one way to change state

    @contextmanager
    def _change(self, apply: bool = True,
                scope: Callable[[Store], frozenset[planner.Element]] | None = None) -> Iterator[Store]:
        """Store rows and kernel change together, or neither.

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
        store = self.store
        changes = planner.Changes()
        with store.write():
            trusted = apply and scope is not None and store.generation() is not None \
                and self.kernel.generation() == store.generation()
            before = scope(store) if trusted and scope is not None else None
            yield store
            if apply:
                start = time.perf_counter()
                tag = secrets.randbits(31)
                scoped = self._apply_scoped(store, scope, before, tag) if before is not None else None
                changes = scoped if scoped is not None else self._apply_full(store, tag)
                if changes.generation is not None:
                    store.set_generation(changes.generation)
                self.last_sync = SyncResult(self.kernel.name, len(changes.add), len(changes.delete),
                                            changes.create_table, 0, time.perf_counter() - start)
        if changes.delete:
            self.last_sync = replace(self.last_sync, flows_forgotten=self._forget(changes))

    def _apply_scoped(self, store: Store, scope: Callable[[Store], frozenset[planner.Element]] | None,
                      before: frozenset, tag: int) -> planner.Changes | None:
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
        # Verified in full: tag the kernel (if it changes, or lacks the store's tag) so the next change may be scoped.
        if changes or store.generation() is None or store.generation() != self.kernel.generation():
            changes = replace(changes, generation=tag)
            self.kernel.apply(changes)
        return changes

    def _lobby_scope(self, name: str) -> Callable[[Store], frozenset[planner.Element]]:
        """The elements of the open lobby called ``name`` (none if there is none)."""
        def scope(store: Store) -> frozenset[planner.Element]:
            lobby = store.lobby(name)
            return self._plan_lobby(store, lobby.id) if lobby else frozenset()
        return scope

    def _plan_lobby(self, store: Store, lobby_id: int,
                    client: tuple[str, Endpoint] | None = None) -> frozenset[planner.Element]:
        """One lobby's elements (or only those of one of its clients and its host port).

        TTLs are not looked at: what a scope holds goes from the kernel when
        cleanup closes or removes it, exactly as it came in."""
        return planner.plan(store.snapshot_lobby(self.relay_ip, lobby_id, client), None, self.kernel.owns)

    def _forget(self, changes: planner.Changes) -> int:
        return self.kernel.forget(changes)

    def in_sync(self) -> bool:
        """Does the kernel carry the tag of the store's last change (so it holds what the store says)?"""
        tag = self.store.generation()
        return tag is not None and self.kernel.generation() == tag

    def apply(self) -> SyncResult:
        """Make the kernel hold exactly what the store says (a no-op when it already does)."""
        with self._change(apply=True):
            pass
        return self.last_sync

    def cleanup(self, apply: bool = True) -> dict[str, list]:
        """Close lobbies past their TTL, remove forwards past theirs, then mappings that went idle."""
        now = self.clock()
        lobbies, forwards = self.store.expired(now)
        scopes = [self._lobby_scope(lb.name) for lb in lobbies] + [self._forward_scope(f.port) for f in forwards]
        with self._change(apply, lambda st: frozenset().union(*(scope(st) for scope in scopes))) as store:
            for lb in lobbies:
                store.close_lobby(lb.id, now)
            for f in forwards:
                store.remove_forward(f.port)
        idle = self.expire_idle(apply) if apply else []
        return {"lobbies": [lb.name for lb in lobbies], "forwards": [f.port for f in forwards], "idle": idle}

    def uninstall(self) -> bool:
        return self.kernel.uninstall()

    # --- lobbies

    def _lobby(self, name: str) -> Lobby:
        lobby = self.store.lobby(name)
        if lobby is None:
            raise NotFound(f"no open lobby named {name!r}", "see 'natctl lobby list'")
        return lobby

    def lobby_create(self, name: str, allow: tuple[str, ...] = (), ttl: int | None = None,
                     open_: bool = False, max_clients: int = 64, apply: bool = True) -> tuple[Lobby, str]:
        """Create a lobby; returns it and its registration token (shown once, stored hashed)."""
        if max_clients < 1:
            raise UsageError(f"invalid --max-clients {max_clients}", "use 1 or more")
        token = secrets.token_urlsafe(24)  # 192 bits
        with self._change(apply, self._lobby_scope(name)) as store:
            if store.lobby(name) is not None:
                raise Conflict(f"a lobby named {name!r} is already open", "pick another name or close it first")
            lobby = store.add_lobby(Lobby(0, name, allow, ttl, self.clock(), None, hash_token(token),
                                          open_, max_clients))
        return lobby, token

    def lobby_close(self, name: str, apply: bool = True) -> Lobby:
        with self._change(apply, self._lobby_scope(name)) as store:
            lobby = self._lobby(name)
            store.close_lobby(lobby.id, self.clock())
        return lobby

    def lobbies(self, include_closed: bool = False) -> list[LobbyView]:
        out = []
        for lb in self.store.lobbies(include_closed):
            host = self.store.host(lb.id)
            out.append(LobbyView(lb.name, lb.id, list(lb.allow), lb.open, lb.ttl, lb.created,
                                 lb.created + lb.ttl if lb.ttl else None, lb.closed,
                                 str(host.addr) if host else None, host.relay_port if host else None,
                                 len(self.store.clients(lb.id))))
        return out

    # --- mappings

    def _allocator(self, store: Store) -> Allocator:
        overlap = local_port_overlap(self.settings.ports)
        if overlap:
            raise Conflict(overlap.split(":")[0], overlap.split(": ", 1)[1])
        snap = store.snapshot("")
        hosts = {h.lobby_id: h.addr for h in snap.hosts}
        return Allocator(self.settings.ports, (h.relay_port for h in snap.hosts),
                         ((hosts[c.lobby_id], c.relay_port) for c in snap.clients if c.lobby_id in hosts),
                         reserved=(self.settings.registration_port,))

    def _ensure_host(self, store: Store, lobby: Lobby, addr: Endpoint, alloc: Allocator) -> Host:
        host = store.host(lobby.id)
        if host is not None:
            if host.addr != addr:
                raise Conflict(f"lobby {lobby.name!r} already has host {host.addr}",
                               f"use --host {host.addr}, or close the lobby to start over")
            return host
        other = store.host_at(addr)
        if other is not None:
            raise Conflict(f"{addr} already hosts another lobby", "one game socket hosts one lobby")
        host = Host(lobby.id, addr, alloc.host_port())
        store.set_host(host, self.clock())
        return host

    def map_add(self, lobby_name: str, host_addr: Endpoint, clients: list[Endpoint], proto: str = "udp",
                apply: bool = True) -> list[MappingView]:
        """Map clients to a lobby's host, allocating relay ports; all in one kernel transaction."""
        out = []
        with self._change(apply, self._lobby_scope(lobby_name)) as store:
            lobby = self._lobby(lobby_name)
            alloc = self._allocator(store)
            host = self._ensure_host(store, lobby, host_addr, alloc)
            count = len(store.clients(lobby.id))
            for addr in clients:
                if addr == host_addr:
                    raise Conflict(f"client {addr} is the lobby's host", "a host cannot be its own client")
                # An admin's explicit mapping needs no --allow; a lobby that has one holds to it.
                if lobby.allow and not lobby.allows(addr.ip):
                    raise Conflict(f"client {addr.ip} is not allowed in lobby {lobby.name!r}",
                                   f"allowed networks: {', '.join(lobby.allow) or 'none'}; "
                                   "recreate the lobby with --allow or --open")
                existing = store.client(lobby.id, proto, addr)
                if existing is not None:
                    raise Conflict(f"{proto} client {addr} is already mapped in lobby {lobby.name!r} "
                                   f"(client port {existing.relay_port})", "remove it first to remap it")
                count += 1
                if count > lobby.max_clients:
                    raise Conflict(f"lobby {lobby.name!r} is full ({lobby.max_clients} clients)",
                                   "remove a client or recreate the lobby with a larger --max-clients")
                now = self.clock()
                c = store.add_client(Client(0, lobby.id, proto, addr, alloc.client_port(host.addr), now, now))
                out.append(MappingView(lobby.name, proto, str(host.addr), str(addr), self.relay_ip,
                                       host.relay_port, c.relay_port, apply))
        return out

    def map_remove(self, lobby_name: str, client: Endpoint, proto: str = "udp", apply: bool = True) -> None:
        with self._change(apply, self._lobby_scope(lobby_name)) as store:
            lobby = self._lobby(lobby_name)
            c = store.client(lobby.id, proto, client)
            if c is None:
                raise NotFound(f"no {proto} client {client} in lobby {lobby_name!r}", "see 'natctl map list'")
            store.remove_client(c.id)

    def mappings(self, counters: bool = False) -> list[MappingView]:
        snap = self.store.snapshot(self.relay_ip)
        installed = self.kernel.read() if counters else None
        out = []
        seen = {c.relay_port: c.last_seen for c in snap.clients}
        for m in planner.mappings(snap, self.clock()):
            to_host = to_client = xdp_up = xdp_down = (0, 0)
            ok = False
            if installed is not None:
                up = (m.client.ip, m.proto, m.client.port, m.host.ip, m.host.port)
                down = (m.host.ip, m.proto, m.host.port, m.client.ip, m.client.port)
                # Packets XDP forwarded never reach nftables' counters: count them in, and apart.
                xdp_up = installed.counters.get((planner.XDP, (m.client.ip, m.client.port, m.host_port)), (0, 0))
                xdp_down = installed.counters.get((planner.XDP, (m.host.ip, m.host.port, m.client_port)), (0, 0))
                to_host = tuple(map(sum, zip(installed.counters.get((planner.SNAT, up), (0, 0)), xdp_up)))
                to_client = tuple(map(sum, zip(installed.counters.get((planner.SNAT, down), (0, 0)), xdp_down)))
                ok = all(e in installed.elements for e in planner.mapping_elements(m, self.relay_ip)
                         if e.set in self.kernel.owns)
            out.append(MappingView(m.lobby, m.proto, str(m.host), str(m.client), snap.relay_ip, m.host_port,
                                   m.client_port, ok, *to_host, *to_client, seen.get(m.client_port, 0.0),
                                   *xdp_up, *xdp_down))
        return out
