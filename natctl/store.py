"""The store: SQLite (WAL) holding the desired state. It is the truth.

Writers open a transaction with ``BEGIN IMMEDIATE`` (one writer at a time,
across processes), change rows, let the service apply the result to the
kernel, and commit only if the kernel accepted it.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from natctl.errors import Busy, NatctlError, StoreError
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
  max_clients INTEGER NOT NULL DEFAULT 64
);
CREATE UNIQUE INDEX IF NOT EXISTS lobbies_open_name ON lobbies(name) WHERE closed IS NULL;
CREATE TABLE IF NOT EXISTS hosts (
  lobby_id INTEGER PRIMARY KEY REFERENCES lobbies(id),
  ip TEXT NOT NULL,
  port INTEGER NOT NULL,
  relay_port INTEGER NOT NULL UNIQUE,
  created REAL NOT NULL,
  opens INTEGER NOT NULL DEFAULT 0,
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
  port INTEGER PRIMARY KEY,
  proto TEXT NOT NULL,
  ip TEXT NOT NULL,
  target_port INTEGER NOT NULL,
  ttl INTEGER,
  created REAL NOT NULL,
  masquerade INTEGER NOT NULL DEFAULT 1,
  owner TEXT NOT NULL DEFAULT ''
);
"""


def _lobby(r: sqlite3.Row) -> Lobby:
    return Lobby(r["id"], r["name"], tuple(json.loads(r["allow"])), r["ttl"], r["created"], r["closed"],
                 r["token_hash"], bool(r["open"]), r["max_clients"])


# Columns added after a release: a store made by an older natctl gets them on open.
MIGRATIONS = {
    "hosts": {"opens": "INTEGER NOT NULL DEFAULT 0"},
    "clients": {"host_ip": "TEXT", "host_port": "INTEGER", "pending": "INTEGER NOT NULL DEFAULT 0"},
}


def _host(r: sqlite3.Row) -> Host:
    return Host(r["lobby_id"], Endpoint(r["ip"], r["port"]), r["relay_port"], bool(r["opens"]))


def _client(r: sqlite3.Row) -> Client:
    host = Endpoint(r["host_ip"], r["host_port"]) if r["host_ip"] is not None else None
    return Client(r["id"], r["lobby_id"], r["proto"], Endpoint(r["ip"], r["port"]), r["relay_port"],
                  r["created"], r["last_seen"], host, bool(r["pending"]))


# A snapshot's clients, read as plain tuples (no sqlite3.Row, no lookup by name): 100,000 rows in half the time.
_CLIENT_COLUMNS = "id, lobby_id, proto, ip, port, relay_port, created, last_seen, host_ip, host_port, pending"


def _clients(db: sqlite3.Connection, where: str, args: tuple | list) -> tuple[Client, ...]:
    cur = db.cursor()
    cur.row_factory = None
    cur.execute(f"SELECT {_CLIENT_COLUMNS} FROM clients {where} ORDER BY id", args)
    return tuple(Client(cid, lobby, proto, Endpoint(ip, port), relay, created, seen,
                        Endpoint(host_ip, host_port) if host_ip is not None else None, bool(pending))
                 for cid, lobby, proto, ip, port, relay, created, seen, host_ip, host_port, pending in cur)


def _forward(r: sqlite3.Row) -> Forward:
    return Forward(r["port"], Endpoint(r["ip"], r["target_port"]), r["proto"], r["ttl"], r["created"],
                   bool(r["masquerade"]), r["owner"])


class Store:
    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        parent = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(parent, exist_ok=True)
            self.db = sqlite3.connect(path, timeout=timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as err:
            raise StoreError(f"cannot open the store {path}: {err}",
                             "pass a writable path with --state or run as root") from None
        self.db.row_factory = sqlite3.Row
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            self._migrate()
        except sqlite3.DatabaseError as err:  # also "file is not a database": nothing was written to it
            self.db.close()
            raise self._busy(err) from None

    def _migrate(self) -> None:
        for table, columns in MIGRATIONS.items():
            have = {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}
            for name, decl in columns.items():
                if name not in have:
                    self.db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")

    def add_tables(self, schema: str) -> None:
        """A feature's own tables beside the relay's, in the same file and transactions (GMs, LANs)."""
        try:
            self.db.executescript(schema)
        except sqlite3.OperationalError as err:
            raise self._busy(err) from None

    def _busy(self, err: sqlite3.Error) -> NatctlError:
        text = str(err)
        if "locked" in text or "busy" in text:
            return Busy(f"the store {self.path} is locked by another natctl",
                        "wait for it to finish, or stop the other natctl")
        if "not a database" in text or "malformed" in text:
            return StoreError(f"the store {self.path} is not a natctl database ({text})",
                              "pass the right file with --state; natctl left this one untouched")
        if "readonly" in text or "unable to open" in text:
            return StoreError(f"the store {self.path} cannot be written ({text})",
                              "make its directory writable, pass another --state, or run as root")
        return StoreError(f"store {self.path}: {text}", "check the file and its permissions")

    def close(self) -> None:
        self.db.close()

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: committed if the block returns, rolled back if it raises."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as err:
            raise self._busy(err) from None
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        else:
            self.db.execute("COMMIT")

    # --- reads (work inside or outside a write transaction)

    def snapshot(self, relay_ip: str) -> Snapshot:
        q = self.db.execute
        return Snapshot(
            relay_ip=relay_ip,
            lobbies=tuple(_lobby(r) for r in q("SELECT * FROM lobbies WHERE closed IS NULL ORDER BY id")),
            hosts=tuple(_host(r) for r in q("SELECT * FROM hosts ORDER BY lobby_id")),
            clients=_clients(self.db, "", ()),
            forwards=tuple(_forward(r) for r in q("SELECT * FROM forwards ORDER BY port")),
        )

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

    def generation(self) -> int | None:
        """The tag of the last change this store saw the kernel take (see plan.Changes.generation)."""
        r = self.db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()
        return int(r[0]) if r else None

    def set_generation(self, generation: int) -> None:
        self.db.execute("INSERT INTO meta (key, value) VALUES ('generation', ?) "
                        "ON CONFLICT(key) DO UPDATE SET value=excluded.value", (str(generation),))

    def store_id(self) -> int:
        """This store's identity, made once at random: the kernel's table names the store it belongs to
        (plan.Owner), so that a natctl on another store cannot reconcile it away."""
        q = "SELECT value FROM meta WHERE key='store_id'"
        r = self.db.execute(q).fetchone()
        if r is None:
            try:
                self.db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('store_id', ?)",
                                (str(secrets.randbits(31) + 1),))
            except sqlite3.Error as err:  # locked by another writer, or read-only
                raise self._busy(err) from None
            r = self.db.execute(q).fetchone()
        return int(r[0])

    def lobby(self, name: str) -> Lobby | None:
        r = self.db.execute("SELECT * FROM lobbies WHERE name=? AND closed IS NULL", (name,)).fetchone()
        return _lobby(r) if r else None

    def lobbies(self, include_closed: bool = False) -> list[Lobby]:
        where = "" if include_closed else "WHERE closed IS NULL"
        return [_lobby(r) for r in self.db.execute(f"SELECT * FROM lobbies {where} ORDER BY id")]

    def host(self, lobby_id: int) -> Host | None:
        r = self.db.execute("SELECT * FROM hosts WHERE lobby_id=?", (lobby_id,)).fetchone()
        return _host(r) if r else None

    def host_by_port(self, relay_port: int) -> Host | None:
        r = self.db.execute("SELECT * FROM hosts WHERE relay_port=?", (relay_port,)).fetchone()
        return _host(r) if r else None

    def client_ports(self, lobby_id: int) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT relay_port FROM clients WHERE lobby_id=?", (lobby_id,))]

    def count_clients(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM clients").fetchone()[0]

    def host_ports(self) -> list[int]:
        return [r[0] for r in self.db.execute("SELECT relay_port FROM hosts")]

    def client_port_numbers(self) -> list[int]:
        """Every client relay port number in use behind some host (a new host port must avoid them all)."""
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT c.relay_port FROM clients c JOIN hosts h ON h.lobby_id = c.lobby_id")]

    def is_host_port(self, port: int) -> bool:
        return self.db.execute("SELECT 1 FROM hosts WHERE relay_port=?", (port,)).fetchone() is not None

    def snapshot_lobbies(self, relay_ip: str, names: Iterable[str]) -> Snapshot:
        """``snapshot_lobby`` of many open lobbies at once, by name (a bulk change's scope): three queries."""
        q, arg = self.db.execute, (json.dumps(list(names)),)
        lobbies = tuple(_lobby(r) for r in q(
            "SELECT * FROM lobbies WHERE closed IS NULL AND name IN (SELECT value FROM json_each(?)) ORDER BY id", arg))
        ids = (json.dumps([lb.id for lb in lobbies]),)
        return Snapshot(
            relay_ip=relay_ip,
            lobbies=lobbies,
            hosts=tuple(_host(r) for r in q(
                "SELECT * FROM hosts WHERE lobby_id IN (SELECT value FROM json_each(?)) ORDER BY lobby_id", ids)),
            clients=_clients(self.db, "WHERE lobby_id IN (SELECT value FROM json_each(?))", ids),
        )

    def client_keys(self, lobby_ids: Iterable[int]) -> Iterator[tuple[int, int, str, str, int, int]]:
        """(id, lobby id, proto, ip, port, relay port) of every client of these lobbies, as a bulk change checks them."""
        return self.db.execute("SELECT id, lobby_id, proto, ip, port, relay_port FROM clients "
                               "WHERE lobby_id IN (SELECT value FROM json_each(?))", (json.dumps(list(lobby_ids)),))

    def lobby_by_id(self, lobby_id: int) -> Lobby | None:
        r = self.db.execute("SELECT * FROM lobbies WHERE id=?", (lobby_id,)).fetchone()
        return _lobby(r) if r else None

    def lobbies_by_token(self, token_hash: str) -> list[Lobby]:
        return [_lobby(r) for r in self.db.execute(
            "SELECT * FROM lobbies WHERE token_hash=? AND closed IS NULL", (token_hash,))]

    def activity(self) -> dict[int, tuple[int, float]]:
        """client id -> (packet count last seen, when)."""
        return {r[0]: (r[1], r[2]) for r in self.db.execute("SELECT id, activity, last_seen FROM clients")}

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
        return [_forward(r) for r in self.db.execute("SELECT * FROM forwards ORDER BY port")]

    def forward(self, port: int) -> Forward | None:
        r = self.db.execute("SELECT * FROM forwards WHERE port=?", (port,)).fetchone()
        return _forward(r) if r else None

    # --- writes (call inside ``write()``)

    def add_lobby(self, lobby: Lobby) -> Lobby:
        cur = self.db.execute(
            "INSERT INTO lobbies (name, allow, ttl, created, token_hash, open, max_clients) VALUES (?,?,?,?,?,?,?)",
            (lobby.name, json.dumps(list(lobby.allow)), lobby.ttl, lobby.created or time.time(),
             lobby.token_hash, int(lobby.open), lobby.max_clients))
        added = self.lobby_by_id(cur.lastrowid or 0)
        assert added is not None
        return added

    def close_lobby(self, lobby_id: int, when: float) -> None:
        self.db.execute("DELETE FROM clients WHERE lobby_id=?", (lobby_id,))
        self.db.execute("DELETE FROM hosts WHERE lobby_id=?", (lobby_id,))
        self.db.execute("UPDATE lobbies SET closed=? WHERE id=?", (when, lobby_id))

    def set_host(self, host: Host, when: float) -> None:
        """Insert or move a lobby's host; a move forgets what its clients' punches taught (the NAT is new)."""
        self.db.execute("UPDATE clients SET host_ip=NULL, host_port=NULL WHERE lobby_id=? AND host_ip IS NOT NULL "
                        "AND EXISTS (SELECT 1 FROM hosts WHERE lobby_id=? AND (ip!=? OR port!=?))",
                        (host.lobby_id, host.lobby_id, host.addr.ip, host.addr.port))
        self.db.execute("INSERT INTO hosts (lobby_id, ip, port, relay_port, created, opens) VALUES (?,?,?,?,?,?) "
                        "ON CONFLICT(lobby_id) DO UPDATE SET ip=excluded.ip, port=excluded.port, opens=excluded.opens",
                        (host.lobby_id, host.addr.ip, host.addr.port, host.relay_port, when, int(host.opens)))

    def add_client(self, c: Client) -> Client:
        cur = self.db.execute(
            "INSERT INTO clients (lobby_id, proto, ip, port, relay_port, created, last_seen, host_ip, host_port, pending) "
            "VALUES (?,?,?,?,?,?,?,?,?,?)",
            (c.lobby_id, c.proto, c.addr.ip, c.addr.port, c.relay_port, c.created, c.last_seen,
             c.host.ip if c.host else None, c.host.port if c.host else None, int(c.pending)))
        return self.client_by_id(cur.lastrowid or 0)  # type: ignore[return-value]

    def add_clients(self, rows: Iterable[tuple[int, str, str, int, int, float]]) -> None:
        """Insert settled clients in bulk: (lobby id, proto, ip, port, relay port, created) each, streamed."""
        self.db.executemany("INSERT INTO clients (lobby_id, proto, ip, port, relay_port, created, last_seen) "
                            "VALUES (?1,?2,?3,?4,?5,?6,?6)", rows)

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
            "INSERT INTO forwards (port, proto, ip, target_port, ttl, created, masquerade, owner) VALUES (?,?,?,?,?,?,?,?)",
            (f.port, f.proto, f.target.ip, f.target.port, f.ttl, f.created, int(f.masquerade), f.owner))

    def expired(self, now: float) -> tuple[list[Lobby], list[Forward]]:
        """Open lobbies past their TTL and forwards past theirs."""
        return ([lb for lb in self.lobbies() if lb.expired(now)], [f for f in self.forwards() if f.expired(now)])

    def remove_forward(self, port: int) -> None:
        self.db.execute("DELETE FROM forwards WHERE port=?", (port,))
