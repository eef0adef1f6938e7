"""Lobbies and the mappings an operator makes by hand (``natctl lobby``, ``natctl map``).

Each operation is one change through the Reconciler, scoped to its lobby.
"""

from __future__ import annotations

import secrets
from dataclasses import replace

from natctl import admission
from natctl import plan as planner
from natctl.alloc import Allocator
from natctl.errors import Conflict, KernelError, NotFound, UsageError
from natctl.kernel.nft import Installed
from natctl.model import Client, Endpoint, Host, Lobby, check_allowed_network, check_unicast
from natctl.store import Store
from natctl.sync import Reconciler
from natctl.views import LobbyView, MappingView, unknown


class Lobbies:
    def __init__(self, rec: Reconciler) -> None:
        self.rec = rec

    def get(self, name: str, store: Store | None = None) -> Lobby:
        lobby = (store or self.rec.store).lobby(name)
        if lobby is None:
            raise NotFound(f"no open lobby named {name!r}", "see 'natctl lobby list'")
        return lobby

    def create(self, name: str, allow: tuple[str, ...] = (), ttl: int | None = None, open_: bool = False,
               max_clients: int = 64, apply: bool = True) -> tuple[Lobby, str]:
        """Create a lobby; returns it and its registration token (shown once, stored hashed)."""
        if max_clients < 1:
            raise UsageError(f"invalid --max-clients {max_clients}", "use 1 or more")
        for net in allow:
            check_allowed_network(net)
        token = secrets.token_urlsafe(24)  # 192 bits
        with self.rec.change(self.rec.lobby_scope(name), apply) as txn:
            if txn.store.lobby(name) is not None:
                raise Conflict(f"a lobby named {name!r} is already open", "pick another name or close it first")
            lobby = txn.store.add_lobby(Lobby(0, name, allow, ttl, self.rec.clock(), None,
                                              admission.hash_token(token), open_, max_clients))
        return lobby, token

    def close(self, name: str, apply: bool = True) -> Lobby:
        with self.rec.change(self.rec.lobby_scope(name), apply) as txn:
            lobby = self.get(name, txn.store)
            txn.store.close_lobby(lobby.id, self.rec.clock())
        return lobby

    def listing(self, include_closed: bool = False) -> list[LobbyView]:
        store = self.rec.store
        out = []
        for lb in store.lobbies(include_closed):
            host = store.host(lb.id)
            out.append(LobbyView(lb.name, lb.id, list(lb.allow), lb.open, lb.ttl, lb.created,
                                 lb.created + lb.ttl if lb.ttl else None, lb.closed,
                                 str(host.addr) if host else None, host.relay_port if host else None,
                                 len(store.clients(lb.id))))
        return out

    # --- mappings

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
        store.set_host(host, self.rec.clock())
        return host

    def map_add(self, lobby_name: str, host_addr: Endpoint, clients: list[Endpoint], proto: str = "udp",
                apply: bool = True) -> list[MappingView]:
        """Map clients to a lobby's host, allocating relay ports; all in one kernel transaction."""
        relay_ip = self.rec.relay_ip
        check_unicast(host_addr.ip, "host", relay_ip)
        for addr in clients:
            check_unicast(addr.ip, "client", relay_ip)
        out = []
        with self.rec.change(self.rec.lobby_scope(lobby_name), apply) as txn:
            store = txn.store
            lobby = self.get(lobby_name, store)
            known = store.host(lobby.id)
            # A host already in place needs client ports among its own clients only: one lobby's rows, as the
            # daemon admits a client; only a new host needs every port in use (for its host port).
            alloc = self.rec.allocator(store, known if known is not None and known.addr == host_addr else None)
            host = self._ensure_host(store, lobby, host_addr, alloc)
            members = len(store.clients(lobby.id))
            for addr in clients:
                admission.check(lobby, addr, host.addr, members, "admin")
                existing = store.client(lobby.id, proto, addr)
                if existing is not None:
                    raise Conflict(f"{proto} client {addr} is already mapped in lobby {lobby.name!r} "
                                   f"(client port {existing.relay_port})", "remove it first to remap it")
                members += 1
                now = self.rec.clock()
                c = store.add_client(Client(0, lobby.id, proto, addr, alloc.client_port(host.addr), now, now))
                out.append(MappingView(lobby.name, proto, str(host.addr), str(addr), self.rec.relay_ip,
                                       host.relay_port, c.relay_port, apply))
        return out

    def map_remove(self, lobby_name: str, client: Endpoint, proto: str = "udp", apply: bool = True) -> None:
        with self.rec.change(self.rec.lobby_scope(lobby_name), apply) as txn:
            lobby = self.get(lobby_name, txn.store)
            c = txn.store.client(lobby.id, proto, client)
            if c is None:
                raise NotFound(f"no {proto} client {client} in lobby {lobby_name!r}", "see 'natctl map list'")
            txn.store.remove_client(c.id)

    def mappings(self, counters: bool = False) -> list[MappingView]:
        """Every live mapping; with ``counters``, whether the kernel holds it and what it carried.

        The one listing ``map list`` and ``status`` share: one read of the kernel for all rows.
        Without ``counters``, or when the kernel cannot be read (not root, no nftables
        binding), the kernel's fields are None ("unknown"), never false or 0.
        """
        rec = self.rec
        snap = rec.store.snapshot(rec.relay_ip)
        installed = read_kernel(rec) if counters else None
        seen = {c.relay_port: c.last_seen for c in snap.clients}
        out = []
        for m in planner.mappings(snap, rec.clock()):
            view = MappingView(m.lobby, m.proto, str(m.host), str(m.client), snap.relay_ip, m.host_port,
                               m.client_port, last_seen=seen.get(m.client_port, 0.0))
            out.append(unknown(view) if installed is None else _counted(view, m, installed, rec))
        return out


def read_kernel(rec: Reconciler) -> Installed | None:
    """What the kernel holds, in one full read for a whole listing; None when it cannot be read.

    A missing table reads fine (nothing is installed); not being root, a missing
    nftables binding or a refused read are "unknown", for the listing to leave out.
    """
    try:
        return rec.kernel.read()
    except (KernelError, OSError):
        return None


def _counted(view: MappingView, m: planner.Mapping, installed: Installed, rec: Reconciler) -> MappingView:
    """``view`` with what the kernel says of mapping ``m``: installed, and its counters."""
    up = (m.client.ip, m.proto, m.client.port, m.host.ip, m.host.port)
    down = (m.host.ip, m.proto, m.host.port, m.client.ip, m.client.port)
    # Packets XDP forwarded never reach nftables' counters: count them in, and apart.
    xdp_up = installed.counters.get((planner.XDP, (m.client.ip, m.client.port, m.host_port)), (0, 0))
    xdp_down = installed.counters.get((planner.XDP, (m.host.ip, m.host.port, m.client_port)), (0, 0))
    to_host = _plus(installed.counters.get((planner.SNAT, up), (0, 0)), xdp_up)
    to_client = _plus(installed.counters.get((planner.SNAT, down), (0, 0)), xdp_down)
    # Installed: natctl's table (with its chains) holds every element of the mapping this backend owns.
    ok = installed.table_ok and all(e in installed.elements for e in planner.mapping_elements(m, rec.relay_ip)
                                    if e.set in rec.kernel.owns)
    return replace(view, installed=ok, to_host_packets=to_host[0], to_host_bytes=to_host[1],
                   to_client_packets=to_client[0], to_client_bytes=to_client[1],
                   xdp_to_host_packets=xdp_up[0], xdp_to_host_bytes=xdp_up[1],
                   xdp_to_client_packets=xdp_down[0], xdp_to_client_bytes=xdp_down[1])


def _plus(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    """(packets, bytes) + (packets, bytes)."""
    return a[0] + b[0], a[1] + b[1]
