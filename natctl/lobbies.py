"""Lobbies and the mappings an operator makes by hand (``natctl lobby``, ``natctl map``).

Each operation is one change through the Reconciler, scoped to its lobby.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator
from dataclasses import replace

from natctl import admission
from natctl import plan as planner
from natctl.alloc import Allocator
from natctl.errors import Conflict, KernelError, NatctlError, NotFound, UsageError
from natctl.kernel.nft import Installed
from natctl.model import (
    Client,
    Endpoint,
    Host,
    Lobby,
    MappingLine,
    check_allowed_network,
    check_unicast,
    check_unicast_int,
    int_ipv4,
    ipv4_int,
)
from natctl.packed import Desired
from natctl.store import Store
from natctl.sync import Reconciler, Scope
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
               max_clients: int = 64, apply: bool = True, region: str | None = None,
               relay: str | None = None) -> tuple[Lobby, str]:
        """Create a lobby; returns it and its registration token (shown once, stored hashed).

        In a fleet it is placed on one relay: ``relay`` if named, else the least loaded live relay of
        ``region`` (default: this relay's region)."""
        if max_clients < 1:
            raise UsageError(f"invalid --max-clients {max_clients}", "use 1 or more")
        for net in allow:
            check_allowed_network(net)
        token = new_token()
        with self.rec.change(self.rec.lobby_scope(name), apply) as txn:
            if txn.store.lobby(name) is not None:
                raise Conflict(f"a lobby named {name!r} is already open", "pick another name or close it first")
            lobby = replace(self._new_lobby(name, token, allow, ttl, open_, max_clients),
                            relay=self.rec.place(txn.store, region, relay))
            lobby = txn.store.add_lobby(lobby)
        return lobby, token

    def _new_lobby(self, name: str, token: str, allow: tuple[str, ...] = (), ttl: int | None = None,
                   open_: bool = False, max_clients: int = 64) -> Lobby:
        """A lobby to add (id 0 until the store gives it one); defaults are those of 'natctl lobby create'."""
        return Lobby(0, name, allow, ttl, self.rec.clock(), None, admission.hash_token(token), open_, max_clients)

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
                                 len(store.clients(lb.id)), lb.relay))
        return out

    # --- mappings

    def _ensure_host(self, store: Store, lobby: Lobby, addr: Endpoint, alloc: Allocator) -> Host:
        host = store.host(lobby.id)
        check_host(lobby.name, host.addr if host else None, addr, host is None and store.host_at(addr) is not None)
        if host is not None:
            return host
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
            alloc = self.rec.allocator(store, known if known is not None and known.addr == host_addr else None,
                                       self.rec.placed(store, lobby.id)[0] if store.fleet else None)
            host = self._ensure_host(store, lobby, host_addr, alloc)
            members = len(store.clients(lobby.id))
            for addr in clients:
                existing = store.client(lobby.id, proto, addr)
                check_mapping(lobby, host.addr, addr, proto, members, existing.relay_port if existing else None)
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
            check_mapped(lobby.name, client, proto, c is not None)
            assert c is not None
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


    # --- many mappings at once (natctl map add/remove --from FILE)

    def map_file(self, lines: Iterable[MappingLine | None], remove: bool = False, create_lobbies: bool = False,
                 apply: bool = True) -> Made:
        """Add (or remove) every mapping of a file in one store transaction and one kernel change.

        ``lines`` streams parsed lines (natctl.model.parse_mapping_line; None for a blank line). Each mapping
        passes the same checks as ``map_add`` (``map_remove``), against the store and the lines before it; the
        first line refused refuses the file (its number leads the error) and nothing changes. Per line only a
        few integers are kept; what it returns counts the mappings (``len``) and makes the records of what
        was added (removed), as ``map add --json`` prints them, one by one as it is iterated.
        """
        batch = _Batch.read(lines)
        relay_ip = self.rec.relay_ip
        with self.rec.change(self._names_scope(batch.names), apply) as txn:
            if remove:
                batch.check_remove(txn.store)
                txn.store.remove_clients(batch.ids)
            else:
                batch.check_add(self, txn.store, create_lobbies)
                batch.write(self, txn.store)
        return Made(batch, relay_ip, apply and not remove)

    def _names_scope(self, names: list[str]) -> Scope:
        """The elements of the open lobbies called ``names`` (a bulk change's scope), planned in one snapshot."""
        def scope(store: Store) -> frozenset[planner.Element] | Desired:
            return self.rec.plan_lobbies(store, names)
        return scope


class Made:
    """What a file changed: ``len()`` mappings, iterated as MappingViews made one at a time."""

    def __init__(self, batch: _Batch, relay_ip: str, applied: bool) -> None:
        self._batch, self._relay_ip, self._applied = batch, relay_ip, applied

    def __len__(self) -> int:
        return len(self._batch.rows) // _STRIDE

    def __iter__(self) -> Iterator[MappingView]:
        return self._batch.views(self._relay_ip, self._applied)


def new_token() -> str:
    """A lobby's registration token: 192 random bits (secrets imported here, for the commands that make one)."""
    import secrets

    return secrets.token_urlsafe(24)


def check_host(lobby: str, known: Endpoint | None, addr: Endpoint, elsewhere: bool) -> None:
    """``addr`` may host ``lobby``: it is the host it has (``known``), or it has none and ``addr`` hosts no
    other lobby (``elsewhere``). One rule for 'map add' and a file."""
    if known is not None and known != addr:
        raise Conflict(f"lobby {lobby!r} already has host {known}",
                       f"use --host {known}, or close the lobby to start over")
    if known is None and elsewhere:
        raise Conflict(f"{addr} already hosts another lobby", "one game socket hosts one lobby")


def check_mapping(lobby: Lobby, host: Endpoint, client: Endpoint, proto: str, members: int,
                  mapped: int | None) -> None:
    """May ``client`` become member number ``members + 1`` of ``lobby``? ``mapped``: the client port it
    already holds there (a mapping made before, or earlier in the same file), or None."""
    admission.check(lobby, client, host, members, "admin")
    if mapped is not None:
        raise Conflict(f"{proto} client {client} is already mapped in lobby {lobby.name!r} "
                       f"(client port {mapped})", "remove it first to remap it")


def check_mapped(lobby: str, client: Endpoint, proto: str, mapped: bool) -> None:
    """A mapping to remove must be there."""
    if not mapped:
        raise NotFound(f"no {proto} client {client} in lobby {lobby!r}", "see 'natctl map list'")


def at_line(number: int, err: NatctlError) -> NatctlError:
    """The same error (and exit code), led by the number of the line of a file it refuses."""
    return type(err)(f"line {number}: {err.message}", err.hint)


_PROTO = ("udp", "tcp")
_STRIDE = 6  # per line in _Batch.rows: number, lobby index, client ip, client port, proto (0 udp, 1 tcp), port/id


def _key(ip: int, port: int, tcp: int) -> int:
    """A client of a lobby as one integer: ip . port . proto."""
    return ip << 17 | port << 1 | tcp


class _Batch:
    """A file of mappings, as integers: one flat array of six per line, and per lobby its name and host.

    100,000 lines take about 5 MB here (a list of 100,000 MappingViews, 60)."""

    def __init__(self) -> None:
        self.rows = array("q")
        self.names: list[str] = []
        self.index: dict[str, int] = {}
        self.hosts: list[tuple[int, int]] = []  # the host each lobby's lines name
        self.first: list[int] = []  # the line that names each lobby first
        self.lobbies: list[Lobby] = []  # after the checks: each lobby (id 0: to create)
        self.host_ports: list[int] = []
        self.new_host: list[bool] = []
        self.ids: list[int] = []  # remove: the client ids to delete

    @classmethod
    def read(cls, lines: Iterable[MappingLine | None]) -> _Batch:
        """Pass one, before the store: syntax, and one host per lobby."""
        b = cls()
        rows, index = b.rows, b.index
        for line in lines:
            if line is None:
                continue
            number, name, host_ip, host_port, client_ip, client_port, proto = line
            i = index.get(name)
            if i is None:
                i = index[name] = len(b.names)
                b.names.append(name)
                b.hosts.append((host_ip, host_port))
                b.first.append(number)
            elif b.hosts[i] != (host_ip, host_port):
                known = Endpoint(int_ipv4(b.hosts[i][0]), b.hosts[i][1])
                err = Conflict(f"lobby {name!r} already has host {known} (line {b.first[i]})",
                               "one lobby has one host: give its lines the same host")
                raise at_line(number, err)
            rows.extend((number, i, client_ip, client_port, proto == "tcp", 0))
        return b

    def check_add(self, lobbies: Lobbies, store: Store, create: bool) -> None:
        """Pass two, in the transaction and before any write: every rule of 'map add', and the ports."""
        rec, rows = lobbies.rec, self.rows
        relay_ip = rec.relay_ip
        alloc = rec.allocator(store)  # once for the whole file: every port in use
        hosts_at: dict[tuple[int, int], int] = {}  # new hosts of this file: address -> lobby index
        taken: list[dict[int, int]] = []  # per lobby: client key -> its client port
        host_eps: list[Endpoint] = []
        for r in range(0, len(rows), _STRIDE):
            number, i, ip, port, tcp = rows[r:r + 5]
            try:
                if i == len(taken):  # the lobby's first line: the lobby, its host, its clients
                    taken.append(self._open(lobbies, store, alloc, i, create, hosts_at, host_eps, relay_ip))
                lobby, host, mine = self.lobbies[i], host_eps[i], taken[i]
                client = Endpoint(int_ipv4(ip), port)
                check_unicast_int(ip, client.ip, "client", relay_ip)
                key = _key(ip, port, tcp)
                check_mapping(lobby, host, client, _PROTO[tcp], len(mine), mine.get(key))
                rows[r + 5] = mine[key] = alloc.client_port(host)
            except NatctlError as err:
                raise at_line(number, err) from None

    def _open(self, lobbies: Lobbies, store: Store, alloc: Allocator, i: int, create: bool,
              hosts_at: dict[tuple[int, int], int], host_eps: list[Endpoint], relay_ip: str) -> dict[int, int]:
        name, (host_ip, host_port) = self.names[i], self.hosts[i]
        lobby = store.lobby(name)
        if lobby is None:
            if not create:
                lobbies.get(name, store)  # raises its NotFound
                raise AssertionError
            lobby = lobbies._new_lobby(name, new_token())
        elif store.fleet and lobby.relay != store.relay:  # its ports are another relay's to allocate
            raise Conflict(f"lobby {name!r} is placed on relay {lobby.relay!r}, not on this one",
                           "run a fleet's file of mappings on the relay of its lobbies (split it by relay)")
        addr = Endpoint(int_ipv4(host_ip), host_port)
        check_unicast_int(host_ip, addr.ip, "host", relay_ip)
        known = store.host(lobby.id) if lobby.id else None
        elsewhere = (host_ip, host_port) in hosts_at or store.host_at(addr) is not None
        check_host(name, known.addr if known else None, addr, known is None and elsewhere)
        mine: dict[int, int] = {}
        if known is not None:
            for _id, _lobby, proto, ip, port, relay_port in store.client_keys((lobby.id,)):
                mine[_key(ipv4_int(ip), port, proto == "tcp")] = relay_port
                alloc.take_client(known.addr, relay_port)
            self.host_ports.append(known.relay_port)
        else:
            hosts_at[(host_ip, host_port)] = i
            self.host_ports.append(alloc.host_port())
        self.new_host.append(known is None)
        self.lobbies.append(lobby)
        host_eps.append(addr)
        return mine

    def write(self, lobbies: Lobbies, store: Store) -> None:
        """Pass three: the rows, lobbies and hosts first, then every client in one statement."""
        now = lobbies.rec.clock()
        for i, lobby in enumerate(self.lobbies):
            if not lobby.id:
                self.lobbies[i] = lobby = store.add_lobby(lobby)
            if self.new_host[i]:
                ip, port = self.hosts[i]
                store.set_host(Host(lobby.id, Endpoint(int_ipv4(ip), port), self.host_ports[i]), now)
        rows, lobby_ids = self.rows, [lb.id for lb in self.lobbies]
        store.add_clients((lobby_ids[rows[r + 1]], _PROTO[rows[r + 4]], int_ipv4(rows[r + 2]), rows[r + 3],
                           rows[r + 5], now) for r in range(0, len(rows), _STRIDE))

    def check_remove(self, store: Store) -> None:
        """Every mapping of the file must be there (once), in a lobby that is open with the file's host."""
        rows, ids = self.rows, self.ids
        mapped: list[dict[int, tuple[int, int]]] = []  # per lobby: client key -> its id and port (popped once removed)
        for r in range(0, len(rows), _STRIDE):
            number, i, ip, port, tcp = rows[r:r + 5]
            try:
                if i == len(mapped):
                    mapped.append(self._mapped(store, i))
                key = _key(ip, port, tcp)
                found = mapped[i].pop(key, None)
                check_mapped(self.names[i], Endpoint(int_ipv4(ip), port), _PROTO[tcp], found is not None)
                assert found is not None
                ids.append(found[0])
                rows[r + 5] = found[1]
            except NatctlError as err:
                raise at_line(number, err) from None

    def _mapped(self, store: Store, i: int) -> dict[int, tuple[int, int]]:
        name, (host_ip, host_port) = self.names[i], self.hosts[i]
        lobby = store.lobby(name)
        if lobby is None:
            raise NotFound(f"no open lobby named {name!r}", "see 'natctl lobby list'")
        known = store.host(lobby.id)
        if known is not None:
            check_host(name, known.addr, Endpoint(int_ipv4(host_ip), host_port), False)
        self.lobbies.append(lobby)
        self.host_ports.append(known.relay_port if known else 0)
        return {_key(ipv4_int(ip), port, proto == "tcp"): (cid, relay_port)
                for cid, _lobby, proto, ip, port, relay_port in store.client_keys((lobby.id,))}

    def views(self, relay_ip: str, applied: bool) -> Iterator[MappingView]:
        """What 'map add --json' prints, one mapping at a time, in the file's order."""
        rows = self.rows
        hosts = [str(Endpoint(int_ipv4(ip), port)) for ip, port in self.hosts]
        for r in range(0, len(rows), _STRIDE):
            i = rows[r + 1]
            yield MappingView(self.names[i], _PROTO[rows[r + 4]], hosts[i], f"{int_ipv4(rows[r + 2])}:{rows[r + 3]}",
                              relay_ip, self.host_ports[i], rows[r + 5], applied)


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
