"""What the daemon's listeners do to the store and kernel: register hosts, admit clients.

Each operation is one scoped change through the Reconciler: one lobby's
elements (or one client's), one kernel transaction.
"""

from __future__ import annotations

from dataclasses import dataclass

from natctl import admission
from natctl.errors import Conflict, NotFound
from natctl.model import Client, Endpoint, Host
from natctl.sync import Reconciler
from natctl.views import MappingView


@dataclass(frozen=True)
class Admission:
    """A sender's mapping, and whether this packet made it (else it was queued behind its admission)."""

    mapping: MappingView
    new: bool


class Registrar:
    def __init__(self, rec: Reconciler) -> None:
        self.rec = rec

    def register_host(self, token: str, addr: Endpoint) -> Host:
        """Record ``addr`` as the host of the token's lobby; idempotent; a new address moves the lobby."""
        rec = self.rec
        lobby = admission.lobby_for_token(token, rec.store.lobbies_by_token(admission.hash_token(token)))
        if lobby is None or lobby.expired(rec.clock()):
            raise NotFound("unknown or expired lobby token", "create the lobby with 'natctl lobby create'")
        current = rec.store.host(lobby.id)
        if current is not None and current.addr == addr:
            return current  # a repeat: nothing changes
        with rec.change(lambda st: rec.plan_lobby(st, lobby.id)) as txn:
            other = txn.store.host_at(addr)
            if other is not None and other.lobby_id != lobby.id:
                raise Conflict(f"{addr} already hosts another lobby", "one game socket hosts one lobby")
            current = txn.store.host(lobby.id)
            port = current.relay_port if current else rec.allocator(txn.store).host_port()
            host = Host(lobby.id, addr, port)
            txn.store.set_host(host, rec.clock())
        return host

    def admit_client(self, host_port: int, addr: Endpoint, proto: str = "udp") -> Admission:
        """Give an unknown sender to a host port its client port and install both directions."""
        rec = self.rec
        host = rec.store.host_by_port(host_port)
        if host is None:
            raise NotFound(f"no lobby on relay port {host_port}")
        new = False
        # Scope: this one client's elements, so admitting costs the same in a lobby of 2 or 2,000.
        with rec.change(lambda st: rec.plan_lobby(st, host.lobby_id, client=(proto, addr))) as txn:
            store = txn.store
            lobby = store.lobby_by_id(host.lobby_id)
            if lobby is None or lobby.closed is not None or lobby.expired(rec.clock()):
                raise NotFound(f"no open lobby on relay port {host_port}")
            client = store.client(lobby.id, proto, addr)
            if client is None:
                alloc = rec.allocator(store, host)
                admission.check(lobby, addr, host.addr, len(alloc.client_ports[host.addr]), "sender")
                now = rec.clock()
                client = store.add_client(Client(0, lobby.id, proto, addr, alloc.client_port(host.addr), now, now))
                new = True
        return Admission(MappingView(lobby.name, proto, str(host.addr), str(addr), rec.relay_ip, host.relay_port,
                                     client.relay_port, True), new)
