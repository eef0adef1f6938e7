"""The store: the desired state, the truth. SQLite (WAL) on one relay, PostgreSQL for a fleet (natctl.db).

Writers open a transaction (one writer at a time, across processes and, on
PostgreSQL, across the fleet), change rows, let the service apply the result
to the kernel, and commit only if the kernel accepted it.

In a fleet every relay's rows carry its name (``relay``): a Store opened for
one relay (``Store.relay``) reads and plans only its own lobbies, forwards and
ports; a lobby's token, name and host address are unique across the fleet.
On one relay ``relay`` is None and every row says "".
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from natctl.db import Db, SqliteDb, connect, is_url
from natctl.errors import NatctlError, StoreError
from natctl.model import Client, Endpoint, Forward, Host, Lobby, Snapshot

SCHEMA = """
CREATE TABLE IF NOT EXISTS lobbies (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL,
  allow TEXT NOT NULL DEFAULT '[]',
  ttl INTEGER,
  created REAL NOT NULL,
  closed REAL,
  token_hash TEXT NOT NULL DEFAULT '',
  open INTEGER NOT NULL DEFAULT 0,
  max_clients INTEGER NOT NULL DEFAULT 64,
  relay TEXT NOT NULL DEFAULT ''
);
CREATE UNIQUE INDEX IF NOT EXISTS lobbies_open_name ON lobbies(name) WHERE closed IS NULL;
CREATE TABLE IF NOT EXISTS hosts (
  lobby_id INTEGER PRIMARY KEY REFERENCES lobbies(id),
  ip TEXT NOT NULL,
  port INTEGER NOT NULL,
  relay_port INTEGER NOT NULL,
  created REAL NOT NULL,
  opens INTEGER NOT NULL DEFAULT 0,
  relay TEXT NOT NULL DEFAULT '',
  UNIQUE (relay, relay_port),
  UNIQUE (ip, port)
);
CREATE TABLE IF NOT EXISTS clients (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  lobby_id INTEGER NOT NULL REFERENCES lobbies(id),
  proto TEXT NOT NULL,
  ip TEXT NOT NULL,
  port INTEGER NOT NULL,
  relay_port INTEGER NOT NULL,
  created REAL NOT NULL,
  last_seen REAL NOT NULL,
  activity INTEGER NOT NULL DEFAULT 0,  -- kernel packet count when last_seen was set
  host_ip TEXT,  -- the host as seen from this client's relay port (NULL: its registered address)
  host_port INTEGER,
  pending INTEGER NOT NULL DEFAULT 0,  -- waiting for the host to open its NAT; not in the kernel
  UNIQUE (lobby_id, proto, ip, port)
);
CREATE TABLE IF NOT EXISTS meta (
  key TEXT PRIMARY KEY,
  value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS forwards (
  port INTEGER NOT NULL,
  proto TEXT NOT NULL,
  ip TEXT NOT NULL,
  target_port INTEGER NOT NULL,
  ttl INTEGER,
  created REAL NOT NULL,
  masquerade INTEGER NOT NULL DEFAULT 1,
  owner TEXT NOT NULL DEFAULT '',
  relay TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (relay, port)
);
"""

# A fleet's own rows (PostgreSQL only, natctl.fleet): its relays, and the kernel changes waiting for each
# relay's daemon (a change made elsewhere to a relay's lobby is planned there and applied by that relay).
FLEET_SCHEMA = """
CREATE TABLE IF NOT EXISTS relays (
  name TEXT PRIMARY KEY,
  ip TEXT NOT NULL UNIQUE,
  region TEXT NOT NULL,
  capacity INTEGER NOT NULL DEFAULT 0,
  registration_port INTEGER NOT NULL,
  state TEXT NOT NULL DEFAULT 'live',
  joined REAL NOT NULL,
  heartbeat REAL NOT NULL,
  mappings INTEGER NOT NULL DEFAULT 0,
  packets INTEGER NOT NULL DEFAULT 0,  -- its kernel's packet count, as cleanup last read it
  packets_at REAL NOT NULL DEFAULT 0,  -- when that count last moved
  pps REAL NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS outbox (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  relay TEXT NOT NULL,
  changes TEXT NOT NULL,
  created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS outbox_relay ON outbox(relay, id);
CREATE INDEX IF NOT EXISTS lobbies_relay ON lobbies(relay) WHERE closed IS NULL;
"""


def _lobby(r: Any) -> Lobby:
    return Lobby(r["id"], r["name"], tuple(json.loads(r["allow"])), r["ttl"], r["created"], r["closed"],
                 r["token_hash"], bool(r["open"]), r["max_clients"], r["relay"])


# Columns added after a release: a SQLite store made by an older natctl gets them on open. (Its older
# unique constraints, one relay's, stay: on one relay they say the same.)
MIGRATIONS = {
    "lobbies": {"relay": "TEXT NOT NULL DEFAULT ''"},
    "hosts": {"opens": "INTEGER NOT NULL DEFAULT 0", "relay": "TEXT NOT NULL DEFAULT ''"},
    "clients": {"host_ip": "TEXT", "host_port": "INTEGER", "pending": "INTEGER NOT NULL DEFAULT 0"},
    "forwards": {"relay": "TEXT NOT NULL DEFAULT ''"},
}


def _host(r: Any) -> Host:
    return Host(r["lobby_id"], Endpoint(r["ip"], r["port"]), r["relay_port"], bool(r["opens"]))


def _client(r: Any) -> Client:
    host = Endpoint(r["host_ip"], r["host_port"]) if r["host_ip"] is not None else None
    return Client(r["id"], r["lobby_id"], r["proto"], Endpoint(r["ip"], r["port"]), r["relay_port"],
                  r["created"], r["last_seen"], host, bool(r["pending"]))


# A snapshot's clients, read as plain tuples (no sqlite3.Row, no lookup by name): 100,000 rows in half the time.
_CLIENT_COLUMNS = "id, lobby_id, proto, ip, port, relay_port, created, last_seen, host_ip, host_port, pending"


def _clients(db: Db, where: str, args: tuple | list) -> tuple[Client, ...]:
    sql = f"SELECT {_CLIENT_COLUMNS} FROM clients {where} ORDER BY id"
    if isinstance(db, SqliteDb):
        cur = db.conn.cursor()  # plain tuples, not Rows
        cur.row_factory = None
        cur.execute(sql, args)
    else:
        cur = db.execute(sql, args)
    return tuple(Client(cid, lobby, proto, Endpoint(ip, port), relay, created, seen,
                        Endpoint(host_ip, host_port) if host_ip is not None else None, bool(pending))
                 for cid, lobby, proto, ip, port, relay, created, seen, host_ip, host_port, pending in cur)


def _forward(r: Any) -> Forward:
    return Forward(r["port"], Endpoint(r["ip"], r["target_port"]), r["proto"], r["ttl"], r["created"],
                   bool(r["masquerade"]), r["owner"])


def random_tag() -> int:
    """31 random bits (a store's identity, a generation tag): os.urandom, as secrets does, without the
    ~3 ms its import costs every command."""
    return int.from_bytes(os.urandom(4), "big") >> 1


class Store:
    def __init__(self, path: str, timeout: float = 5.0, relay: str | None = None) -> None:
        """``path``: a SQLite file, or a PostgreSQL URL (a fleet's shared store); ``relay``: the fleet relay
        whose rows this store reads and writes (None: one relay, every row)."""
        self.path = path
        self.relay = relay
        if not is_url(path):
            try:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            except OSError as err:
                raise StoreError(f"cannot open the store {path}: {err}",
                                 "pass a writable path with --state or run as root") from None
        self.db = connect(path, timeout)
        self.engine = self.db.engine
        try:
            if self.engine == "sqlite":
                self.db.execute("PRAGMA journal_mode=WAL")
                self.db.execute("PRAGMA synchronous=NORMAL")
                self.db.script(SCHEMA)
                self._migrate()
            elif self.db.execute("SELECT to_regclass('relays')").fetchone()[0] is None:
                with self.db.transaction():  # two relays starting at once: the lock makes one create it
                    self.db.script(SCHEMA + FLEET_SCHEMA)
        except sqlite3.DatabaseError as err:  # also "file is not a database": nothing was written to it
            self.db.close()
            raise self.db.error(err) from None
        except NatctlError:
            self.db.close()
            raise

    @property
    def fleet(self) -> bool:
        """A shared PostgreSQL store: relays as rows, lobbies placed on them (natctl.fleet)."""
        return self.engine == "postgresql"

    def _migrate(self) -> None:
        for table, columns in MIGRATIONS.items():
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            for name, decl in columns.items():
                if name not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")

    def add_tables(self, schema: str) -> None:
        """A feature's own tables beside the relay's, in the same file and transactions (GMs, LANs)."""
        try:
            self.db.script(schema)
        except sqlite3.OperationalError as err:
            raise self.db.error(err) from None

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def write(self) -> Iterator[Db]:
        """A write transaction: committed if the block returns, rolled back if it raises (natctl.db: each
        engine's lock, and its errors as one-line NatctlErrors)."""
        with self.db.transaction():
            yield self.db

    # --- which rows are this relay's

    def _mine(self, column: str = "relay", relay: str | None = None) -> tuple[str, tuple]:
        """A filter on this relay's rows (or ``relay``'s; nothing on one relay), and its argument."""
        relay = self.relay if relay is None else relay
        return ("", ()) if relay is None else (f" AND {column}=?", (relay,))

    @property
    def _relay(self) -> str:
        return self.relay or ""

    # --- reads (work inside or outside a write transaction)

    def snapshot(self, relay_ip: str, clients: bool = True) -> Snapshot:
        """This relay's whole desired state (``clients`` False: without its clients, see client_rows)."""
        q = self.db.execute
        mine, arg = self._mine()
        return Snapshot(
            relay_ip=relay_ip,
            lobbies=tuple(_lobby(r) for r in q(f"SELECT * FROM lobbies WHERE closed IS NULL{mine} ORDER BY id", arg)),
            hosts=tuple(_host(r) for r in q(f"SELECT * FROM hosts WHERE 1=1{mine} ORDER BY lobby_id", arg)),
            clients=_clients(self.db, self._clients_mine, arg) if clients else (),
            forwards=tuple(_forward(r) for r in q(f"SELECT * FROM forwards WHERE 1=1{mine} ORDER BY port", arg)),
        )

    @property
    def _clients_mine(self) -> str:
        return "" if self.relay is None else "WHERE lobby_id IN (SELECT lobby_id FROM hosts WHERE relay=?)"

    def client_rows(self, lobby_ids: Iterable[int] | None = None) -> list[tuple]:
        """This relay's clients (or these lobbies') as plain tuples, as natctl.packed.plan reads them (a full
        reconcile or a bulk change of 100,000 without a Client and two Endpoints each)."""
        if lobby_ids is None:
            where, args = self._clients_mine, self._mine()[1]
        else:
            sub, ids = self.db.in_list(lobby_ids)
            where, args = f"WHERE lobby_id IN {sub}", (ids,)
        sql = f"SELECT lobby_id, proto, ip, port, relay_port, host_ip, host_port, pending FROM clients {where} ORDER BY id"
        cur = self.db.conn.cursor() if isinstance(self.db, SqliteDb) else None
        if cur is not None:
            cur.row_factory = None
            return cur.execute(sql, args).fetchall()
        return list(self.db.execute(sql, args))

    def snapshot_lobby(self, relay_ip: str, lobby_id: int, client: tuple[str, Endpoint] | None = None) -> Snapshot:
        """The part of the snapshot that one lobby's elements depend on (or one client's of it)."""
        q = self.db.execute
        where = "lobby_id=?"
        args: list[object] = [lobby_id]
        if client is not None:
            where += " AND proto=? AND ip=? AND port=?"
            args += [client[0], client[1].ip, client[1].port]
        return Snapshot(
            relay_ip=relay_ip,
            lobbies=tuple(_lobby(r) for r in q("SELECT * FROM lobbies WHERE id=? AND closed IS NULL", (lobby_id,))),
            hosts=tuple(_host(r) for r in q("SELECT * FROM hosts WHERE lobby_id=?", (lobby_id,))),
            clients=_clients(self.db, f"WHERE {where}", args),
        )

    def _meta(self, key: str) -> str | None:
        r = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return r[0] if r else None

    def _set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta (key, value) VALUES (?, ?) "
                        "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (key, value))

    def _relay_key(self, name: str, relay: str | None = None) -> str:
        """A per-relay meta key: ``name`` on one relay, ``name@RELAY`` in a fleet."""
        relay = self.relay if relay is None else relay
        return f"{name}@{relay}" if relay else name

    def generation(self) -> int | None:
        """The tag of the last change this store saw the kernel take (see plan.Changes.generation)."""
        value = self._meta(self._relay_key("generation"))
        return int(value) if value is not None else None

    def set_generation(self, generation: int) -> None:
        self._set_meta(self._relay_key("generation"), str(generation))

    def forget_generation(self, relay: str) -> None:
        """That relay's kernel is no longer known to mirror its rows: its next change reconciles in full."""
        self.db.execute("DELETE FROM meta WHERE key IN (?, ?)",
                        (self._relay_key("generation", relay), self._relay_key("ruleset", relay)))

    def ruleset(self) -> str | None:
        """What proves this relay's nftables untouched since this store last wrote to it (natctl.sync): the
        ruleset generation that write left and the relay IP it was planned for; None: nothing proves it."""
        return self._meta(self._relay_key("ruleset"))

    def clear_rulesets(self) -> None:
        """Rows changed without the kernel (``--no-apply``, another machine of a fleet): no relay's kernel is
        proven to hold their plan any more."""
        self.db.execute("DELETE FROM meta WHERE key='ruleset' OR key LIKE 'ruleset@%'")

    def set_ruleset(self, value: str | None) -> None:
        key = self._relay_key("ruleset")
        if value is None:
            self.db.execute("DELETE FROM meta WHERE key=?", (key,))
        else:
            self._set_meta(key, value)

    def store_id(self) -> int:
        """This store's identity, made once at random: the kernel's table names the store it belongs to
        (plan.Owner), so that a natctl on another store cannot reconcile it away."""
        value = self._meta("store_id")
        if value is None:
            try:
                self.db.execute("INSERT INTO meta (key, value) VALUES ('store_id', ?) ON CONFLICT DO NOTHING",
                                (str(random_tag() + 1),))
            except sqlite3.Error as err:  # locked by another writer, or read-only
                raise self.db.error(err) from None
            value = self._meta("store_id")
        assert value is not None
        return int(value)

    def lobby(self, name: str) -> Lobby | None:
        r = self.db.execute("SELECT * FROM lobbies WHERE name=? AND closed IS NULL", (name,)).fetchone()
        return _lobby(r) if r else None

    def lobbies(self, include_closed: bool = False, everywhere: bool = True) -> list[Lobby]:
        """Lobbies of the whole fleet (``everywhere``, for listings) or only of this relay."""
        mine, arg = ("", ()) if everywhere else self._mine()
        where = "1=1" if include_closed else "closed IS NULL"
        return [_lobby(r) for r in self.db.execute(f"SELECT * FROM lobbies WHERE {where}{mine} ORDER BY id", arg)]

    def host(self, lobby_id: int) -> Host | None:
        r = self.db.execute("SELECT * FROM hosts WHERE lobby_id=?", (lobby_id,)).fetchone()
        return _host(r) if r else None

    def host_by_port(self, relay_port: int, relay: str | None = None) -> Host | None:
        mine, arg = self._mine(relay=relay)
        r = self.db.execute(f"SELECT * FROM hosts WHERE relay_port=?{mine}", (relay_port, *arg)).fetchone()
        return _host(r) if r else None

    def client_ports(self, lobby_id: int) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT relay_port FROM clients WHERE lobby_id=?", (lobby_id,))]

    def count_clients(self) -> int:
        if self.relay is None:
            return self.db.execute("SELECT COUNT(*) FROM clients").fetchone()[0]
        return self.db.execute("SELECT COUNT(*) FROM clients c JOIN hosts h ON h.lobby_id = c.lobby_id "
                               "WHERE h.relay=?", (self.relay,)).fetchone()[0]

    def host_ports(self, relay: str | None = None) -> list[int]:
        mine, arg = self._mine(relay=relay)
        return [r[0] for r in self.db.execute(f"SELECT relay_port FROM hosts WHERE 1=1{mine}", arg)]

    def client_port_numbers(self, relay: str | None = None) -> list[int]:
        """Every client relay port number in use behind some host (a new host port must avoid them all)."""
        mine, arg = self._mine("h.relay", relay)
        return [r[0] for r in self.db.execute(
            f"SELECT DISTINCT c.relay_port FROM clients c JOIN hosts h ON h.lobby_id = c.lobby_id WHERE 1=1{mine}",
            arg)]

    def is_host_port(self, port: int, relay: str | None = None) -> bool:
        return self.host_by_port(port, relay) is not None

    def snapshot_lobbies(self, relay_ip: str, names: Iterable[str], clients: bool = True) -> Snapshot:
        """``snapshot_lobby`` of many open lobbies at once, by name (a bulk change's scope): three queries
        (``clients`` False: two, see client_rows)."""
        q = self.db.execute
        sub, arg = self.db.in_list(names)
        lobbies = tuple(_lobby(r) for r in q(
            f"SELECT * FROM lobbies WHERE closed IS NULL AND name IN {sub} ORDER BY id", (arg,)))
        sub, ids = self.db.in_list(lb.id for lb in lobbies)
        return Snapshot(
            relay_ip=relay_ip,
            lobbies=lobbies,
            hosts=tuple(_host(r) for r in q(f"SELECT * FROM hosts WHERE lobby_id IN {sub} ORDER BY lobby_id", (ids,))),
            clients=_clients(self.db, f"WHERE lobby_id IN {sub}", (ids,)) if clients else (),
        )

    def client_keys(self, lobby_ids: Iterable[int]) -> Iterator[tuple[int, int, str, str, int, int]]:
        """(id, lobby id, proto, ip, port, relay port) of every client of these lobbies, as a bulk change checks them."""
        sub, ids = self.db.in_list(lobby_ids)
        return self.db.execute("SELECT id, lobby_id, proto, ip, port, relay_port FROM clients "
                               f"WHERE lobby_id IN {sub}", (ids,))

    def lobby_by_id(self, lobby_id: int) -> Lobby | None:
        r = self.db.execute("SELECT * FROM lobbies WHERE id=?", (lobby_id,)).fetchone()
        return _lobby(r) if r else None

    def lobbies_by_token(self, token_hash: str) -> list[Lobby]:
        """Across the fleet: a host may register at any relay (natctl.fleet)."""
        return [_lobby(r) for r in self.db.execute(
            "SELECT * FROM lobbies WHERE token_hash=? AND closed IS NULL", (token_hash,))]

    def activity(self) -> dict[int, tuple[int, float]]:
        """client id -> (packet count last seen, when), of this relay's clients."""
        if self.relay is None:
            rows = self.db.execute("SELECT id, activity, last_seen FROM clients")
        else:
            rows = self.db.execute("SELECT c.id, c.activity, c.last_seen FROM clients c "
                                   "JOIN hosts h ON h.lobby_id = c.lobby_id WHERE h.relay=?", (self.relay,))
        return {r[0]: (r[1], r[2]) for r in rows}

    def host_at(self, addr: Endpoint) -> Host | None:
        r = self.db.execute("SELECT * FROM hosts WHERE ip=? AND port=?", (addr.ip, addr.port)).fetchone()
        return _host(r) if r else None

    def clients(self, lobby_id: int | None = None) -> list[Client]:
        if lobby_id is None:
            rows = self.db.execute("SELECT * FROM clients ORDER BY id")
        else:
            rows = self.db.execute("SELECT * FROM clients WHERE lobby_id=? ORDER BY id", (lobby_id,))
        return [_client(r) for r in rows]

    def client(self, lobby_id: int, proto: str, addr: Endpoint) -> Client | None:
        r = self.db.execute("SELECT * FROM clients WHERE lobby_id=? AND proto=? AND ip=? AND port=?",
                            (lobby_id, proto, addr.ip, addr.port)).fetchone()
        return _client(r) if r else None

    def forwards(self) -> list[Forward]:
        mine, arg = self._mine()
        return [_forward(r) for r in self.db.execute(f"SELECT * FROM forwards WHERE 1=1{mine} ORDER BY port", arg)]

    def forward(self, port: int) -> Forward | None:
        mine, arg = self._mine()
        r = self.db.execute(f"SELECT * FROM forwards WHERE port=?{mine}", (port, *arg)).fetchone()
        return _forward(r) if r else None

    # --- writes (call inside ``write()``)

    def add_lobby(self, lobby: Lobby) -> Lobby:
        r = self.db.execute(
            "INSERT INTO lobbies (name, allow, ttl, created, token_hash, open, max_clients, relay) "
            "VALUES (?,?,?,?,?,?,?,?) RETURNING *",
            (lobby.name, json.dumps(list(lobby.allow)), lobby.ttl, lobby.created or time.time(),
             lobby.token_hash, int(lobby.open), lobby.max_clients, lobby.relay or self._relay)).fetchone()
        return _lobby(r)

    def close_lobby(self, lobby_id: int, when: float) -> None:
        self.db.execute("DELETE FROM clients WHERE lobby_id=?", (lobby_id,))
        self.db.execute("DELETE FROM hosts WHERE lobby_id=?", (lobby_id,))
        self.db.execute("UPDATE lobbies SET closed=? WHERE id=?", (when, lobby_id))

    def set_host(self, host: Host, when: float) -> None:
        """Insert or move a lobby's host; a move forgets what its clients' punches taught (the NAT is new)."""
        self.db.execute("UPDATE clients SET host_ip=NULL, host_port=NULL WHERE lobby_id=? AND host_ip IS NOT NULL "
                        "AND EXISTS (SELECT 1 FROM hosts WHERE lobby_id=? AND (ip!=? OR port!=?))",
                        (host.lobby_id, host.lobby_id, host.addr.ip, host.addr.port))
        # The host row names its lobby's relay: host ports are unique per relay (UNIQUE (relay, relay_port)).
        self.db.execute("INSERT INTO hosts (lobby_id, ip, port, relay_port, created, opens, relay) "
                        "SELECT ?,?,?,?,?,?, relay FROM lobbies WHERE id=? "
                        "ON CONFLICT(lobby_id) DO UPDATE SET ip=excluded.ip, port=excluded.port, opens=excluded.opens",
                        (host.lobby_id, host.addr.ip, host.addr.port, host.relay_port, when, int(host.opens),
                         host.lobby_id))

    def add_client(self, c: Client) -> Client:
        r = self.db.execute(
            "INSERT INTO clients (lobby_id, proto, ip, port, relay_port, created, last_seen, host_ip, host_port, pending) "
            "VALUES (?,?,?,?,?,?,?,?,?,?) RETURNING *",
            (c.lobby_id, c.proto, c.addr.ip, c.addr.port, c.relay_port, c.created, c.last_seen,
             c.host.ip if c.host else None, c.host.port if c.host else None, int(c.pending))).fetchone()
        return _client(r)

    def add_clients(self, rows: Iterable[tuple[int, str, str, int, int, float]]) -> None:
        """Insert settled clients in bulk: (lobby id, proto, ip, port, relay port, created) each, streamed."""
        self.db.executemany("INSERT INTO clients (lobby_id, proto, ip, port, relay_port, created, last_seen) "
                            "VALUES (?,?,?,?,?,?,?)", (row + (row[5],) for row in rows))

    def remove_clients(self, ids: Iterable[int]) -> None:
        self.db.executemany("DELETE FROM clients WHERE id=?", ((i,) for i in ids))

    def client_by_id(self, client_id: int) -> Client | None:
        r = self.db.execute("SELECT * FROM clients WHERE id=?", (client_id,)).fetchone()
        return _client(r) if r else None

    def settle_client(self, client_id: int, host: Endpoint | None) -> None:
        """The host opened its NAT (``host``: where from) or did not (None): install the mapping."""
        self.db.execute("UPDATE clients SET pending=0, host_ip=?, host_port=? WHERE id=?",
                        (host.ip if host else None, host.port if host else None, client_id))

    def remove_client(self, client_id: int) -> None:
        self.db.execute("DELETE FROM clients WHERE id=?", (client_id,))

    def touch_clients(self, seen: dict[int, tuple[int, float]]) -> None:
        """Record new packet counts (client id -> (count, when))."""
        self.db.executemany("UPDATE clients SET activity=?, last_seen=? WHERE id=?",
                            [(count, when, cid) for cid, (count, when) in seen.items()])

    def add_forward(self, f: Forward) -> None:
        self.db.execute(
            "INSERT INTO forwards (port, proto, ip, target_port, ttl, created, masquerade, owner, relay) "
            "VALUES (?,?,?,?,?,?,?,?,?)",
            (f.port, f.proto, f.target.ip, f.target.port, f.ttl, f.created, int(f.masquerade), f.owner, self._relay))

    def expired(self, now: float) -> tuple[list[Lobby], list[Forward]]:
        """This relay's open lobbies past their TTL and forwards past theirs."""
        return ([lb for lb in self.lobbies(everywhere=False) if lb.expired(now)],
                [f for f in self.forwards() if f.expired(now)])

    def remove_forward(self, port: int) -> None:
        mine, arg = self._mine()
        self.db.execute(f"DELETE FROM forwards WHERE port=?{mine}", (port, *arg))
