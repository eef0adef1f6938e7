"""What the daemon does to the store and kernel: register hosts, admit clients, expire idle ones.

Part of the service API (mixed into ``Service``); each operation is one
scoped change: one lobby's elements, one kernel transaction.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING

from natctl import plan as planner
from natctl.alloc import Allocator
from natctl.errors import Conflict, NotFound
from natctl.model import Client, Endpoint, Host
from natctl.store import Store
from natctl.views import MappingView

if TYPE_CHECKING:
    from natctl.service import Service


class NotAllowed(Conflict):
    """A sender the lobby does not admit (its network is not allowed, or the lobby is full)."""


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class RelayOps:
    def register_host(self: "Service", token: str, addr: Endpoint) -> Host:
        """Record ``addr`` as the host of the token's lobby; idempotent; a new address moves the lobby."""
        digest = hash_token(token)
        # Constant-time comparison of the secret's hash; the token itself is never stored or logged.
        lobby = next((lb for lb in self.store.lobbies_by_token(digest)
                      if hmac.compare_digest(lb.token_hash, digest)), None)
        if lobby is None or lobby.expired(self.clock()):
            raise NotFound("unknown or expired lobby token", "create the lobby with 'natctl lobby create'")
        current = self.store.host(lobby.id)
        if current is not None and current.addr == addr:
            return current  # a repeat: nothing changes
        with self._change(scope=lambda st: self._plan_lobby(st, lobby.id)) as store:
            other = store.host_at(addr)
            if other is not None and other.lobby_id != lobby.id:
                raise Conflict(f"{addr} already hosts another lobby", "one game socket hosts one lobby")
            current = store.host(lobby.id)
            port = current.relay_port if current else self._allocator(store).host_port()
            host = Host(lobby.id, addr, port)
            store.set_host(host, self.clock())
        return host

    def admit_client(self: "Service", host_port: int, addr: Endpoint, proto: str = "udp") -> MappingView:
        """Give an unknown sender to a host port its client port and install both directions."""
        host = self.store.host_by_port(host_port)
        if host is None:
            raise NotFound(f"no lobby on relay port {host_port}")
        # Scope: this one client's elements, so admitting costs the same in a lobby of 2 or 2,000.
        with self._change(scope=lambda st: self._plan_lobby(st, host.lobby_id, client=(proto, addr))) as store:
            lobby = store.lobby_by_id(host.lobby_id)
            if lobby is None or lobby.closed is not None or lobby.expired(self.clock()):
                raise NotFound(f"no open lobby on relay port {host_port}")
            existing = store.client(lobby.id, proto, addr)
            if existing is None:
                if not lobby.allows(addr.ip):
                    raise NotAllowed(f"{addr.ip} is not allowed in lobby {lobby.name!r}")
                ports = store.client_ports(lobby.id)
                if len(ports) >= lobby.max_clients:
                    raise NotAllowed(f"lobby {lobby.name!r} is full ({lobby.max_clients} clients)")
                # Client ports only need to be unique among this host's clients (and never a host port).
                alloc = Allocator(self.settings.ports, (), ((host.addr, p) for p in ports),
                                  reserved=(self.settings.registration_port,), is_host_port=store.is_host_port)
                now = self.clock()
                existing = store.add_client(Client(0, lobby.id, proto, addr, alloc.client_port(host.addr), now, now))
        return MappingView(lobby.name, proto, str(host.addr), str(addr), self.relay_ip, host.relay_port,
                           existing.relay_port, True)

    def expire_idle(self: "Service", apply: bool = True) -> list[str]:
        """Remove mappings whose kernel packet counters have not moved for ``idle_timeout``.

        Activity is the sum of every counter the kernel keeps for a mapping's
        elements (nftables and XDP alike); the store remembers the last sum, so
        this works the same from the daemon and from a cron job.
        """
        if self.settings.idle_timeout <= 0:
            return []
        # Only the maps whose elements count packets: reading them is most of the cost at scale.
        installed = self.kernel.read(self.kernel.owns & {planner.SNAT, planner.XDP})
        now = self.clock()
        moved: dict[int, tuple[int, float]] = {}
        idle: list[planner.Mapping] = []
        seen = self.store.activity()
        snap = self.store.snapshot(self.relay_ip)
        lobby_of = {c.id: c.lobby_id for c in snap.clients}
        for m in planner.mappings(snap, now):
            count = sum(installed.counters.get((e.set, e.key), (0, 0))[0]
                        for e in planner.mapping_elements(m, self.relay_ip))
            last_count, last_seen = seen.get(m.client_id, (0, now))
            if count != last_count:
                moved[m.client_id] = (count, now)
            elif now - last_seen >= self.settings.idle_timeout:
                idle.append(m)

        def scope(store: Store) -> frozenset[planner.Element]:  # the idle clients' elements, nothing else
            return frozenset().union(*(self._plan_lobby(store, lobby_of[m.client_id], client=(m.proto, m.client))
                                       for m in idle))

        with self._change(apply, scope) as store:
            store.touch_clients(moved)
            for m in idle:
                store.remove_client(m.client_id)
        return [f"{m.lobby}/{m.proto}/{m.client}" for m in idle]
