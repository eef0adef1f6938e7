"""What the daemon's listeners do to the store and kernel: register hosts, admit clients.

Each operation is one scoped change through the Reconciler: one lobby's
elements (or one client's), one kernel transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from natctl import admission
from natctl.errors import Conflict, NotFound
from natctl.model import Client, Endpoint, Host
from natctl.plan import Flow
from natctl.sync import Reconciler
from natctl.views import MappingView


@dataclass(frozen=True)
class Admission:
    """A sender's mapping, and whether this packet made it (else it was queued behind its admission).

    ``pending``: its host opens its NAT per client (registration v2) and has not yet: nothing is in
    the kernel, the daemon holds the sender's packets until the host's punch (or a timeout) settles it.
    """

    mapping: MappingView
    new: bool
    client_id: int = 0
    pending: bool = False


@dataclass(frozen=True)
class Registration:
    """A registered host, and whether this registration changed it (new, moved, or a new protocol version).

    ``relay_ip``: the relay its lobby is placed on (in a fleet, maybe not this one: the reply sends the
    host there); ``here``: that relay is this one."""

    host: Host
    changed: bool
    relay_ip: str = ""
    here: bool = True


class Registrar:
    def __init__(self, rec: Reconciler) -> None:
        self.rec = rec

    def register_host(self, token: str, addr: Endpoint, opens: bool = False) -> Registration:
        """Record ``addr`` as the host of the token's lobby; idempotent; a new address moves the lobby.

        ``opens``: the host speaks registration v2 and answers OPENs (see natctl.daemon.wire)."""
        rec = self.rec
        lobby = admission.lobby_for_token(token, rec.store.lobbies_by_token(admission.hash_token(token)))
        if lobby is None or lobby.expired(rec.clock()):
            raise NotFound("unknown or expired lobby token", "create the lobby with 'natctl lobby create'")
        relay, relay_ip = rec.placed(rec.store, lobby.id)
        here = not rec.store.fleet or relay == rec.store.relay
        current = rec.store.host(lobby.id)
        if current is not None and current.addr == addr and current.opens == opens:
            return Registration(current, False, relay_ip, here)  # a repeat (a keepalive): nothing changes
        with rec.change(lambda st: rec.plan_lobby(st, lobby.id)) as txn:
            other = txn.store.host_at(addr)
            if other is not None and other.lobby_id != lobby.id:
                raise Conflict(f"{addr} already hosts another lobby", "one game socket hosts one lobby")
            current = txn.store.host(lobby.id)
            port = current.relay_port if current else rec.allocator(txn.store, relay=relay or None).host_port()
            host = Host(lobby.id, addr, port, opens)
            txn.store.set_host(host, rec.clock())
        return Registration(host, True, relay_ip, here)

    def admit_client(self, host_port: int, addr: Endpoint, proto: str = "udp", expect: bool = False) -> Admission:
        """Give an unknown sender to a host port its client port and install both directions.

        ``expect``: the client is announced before it sends (noray's connect-relay): its port is
        allocated now, but its elements stay out of the kernel until its first packet arrives here.
        Until then the host's packets to that port reach no one, so they cannot arrive at the
        client's router unasked (a stock router would then give the client's own first packet
        another port).
        """
        rec = self.rec
        host = rec.store.host_by_port(host_port)
        if host is None:
            raise NotFound(f"no lobby on relay port {host_port}")
        new = arrived = False
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
                pending = (host.opens or expect) and proto == "udp"  # its elements wait (a punch, a first packet)
                client = store.add_client(Client(0, lobby.id, proto, addr, alloc.client_port(host.addr), now, now,
                                                 pending=pending))
                new = not expect
            elif client.pending and not host.opens and not expect:  # announced, and here now
                store.settle_client(client.id, None)
                client = replace(client, pending=False)
                new = arrived = True
        if arrived:  # the host's packets to this port, sent before, left conntrack entries that would not be NATed
            rec.kernel.forget([Flow(proto, host.addr.ip, host.addr.port, client.relay_port, rec.relay_ip)])
        return Admission(_view(lobby.name, host, client, rec.relay_ip), new, client.id, client.pending)

    def settle(self, client_id: int, seen: Endpoint | None) -> Admission:
        """Install a client's mapping with the host's address as its NAT showed it to the client's relay port.

        ``seen`` is where the host's punch came from (None: it never came; the mapping then uses the
        registered address, which works where the host's NAT lets traffic in). Also re-learns the
        address of a client already installed (after the host moved). The punch must come from the
        host's registered public IP (a NAT changes ports, not addresses).
        """
        rec = self.rec
        client = rec.store.client_by_id(client_id)
        host = rec.store.host(client.lobby_id) if client else None
        lobby = rec.store.lobby_by_id(client.lobby_id) if client else None
        if client is None or host is None or lobby is None:
            raise NotFound("the client or its lobby is gone")
        if seen is not None and seen.ip != host.addr.ip:
            raise Conflict(f"a punch from {seen.ip}, not from the host's address {host.addr.ip}",
                           "the host must punch from its registered game socket")
        learned = None if seen is None or seen == host.addr else seen
        if client.pending or client.host != learned:
            key = (client.proto, client.addr)
            with rec.change(lambda st: rec.plan_lobby(st, lobby.id, client=key)) as txn:
                if txn.store.client_by_id(client_id) is None:
                    raise NotFound("the client left while its host was opening its NAT")
                txn.store.settle_client(client_id, learned)
            client = rec.store.client_by_id(client_id) or client
        return Admission(_view(lobby.name, host, client, rec.relay_ip), False, client.id, client.pending)


def _view(lobby: str, host: Host, client: Client, relay_ip: str) -> MappingView:
    """The mapping as the daemon delivers on it: ``host`` is where a client's packets go."""
    return MappingView(lobby, client.proto, str(client.host or host.addr), str(client.addr), relay_ip,
                       host.relay_port, client.relay_port, not client.pending)
