"""LAN rows in natctl's store (their own tables; writes inside ``Store.write()``)."""

from __future__ import annotations

from typing import Any

from natctl.lan.model import Lan, Member
from natctl.store import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS lans (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  name TEXT NOT NULL UNIQUE,
  subnet TEXT NOT NULL UNIQUE,
  token_hash TEXT NOT NULL,
  ttl INTEGER,
  max_members INTEGER NOT NULL,
  created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS lan_members (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  lan_id INTEGER NOT NULL REFERENCES lans(id),
  name TEXT NOT NULL,
  address TEXT NOT NULL UNIQUE,
  public_key TEXT NOT NULL UNIQUE,
  created REAL NOT NULL,
  UNIQUE (lan_id, name)
);
"""


def _lan(r: Any) -> Lan:
    return Lan(r["id"], r["name"], r["subnet"], r["token_hash"], r["ttl"], r["max_members"], r["created"])


def _member(r: Any) -> Member:
    return Member(r["id"], r["lan_id"], r["name"], r["address"], r["public_key"], r["created"])


class LanStore:
    """The ``lans`` and ``lan_members`` tables beside the relay's, in the same file and transactions."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.db
        store.add_tables(SCHEMA)

    def lans(self) -> list[Lan]:
        return [_lan(r) for r in self.db.execute("SELECT * FROM lans ORDER BY id")]

    def lan(self, name: str) -> Lan | None:
        r = self.db.execute("SELECT * FROM lans WHERE name=?", (name,)).fetchone()
        return _lan(r) if r else None

    def add_lan(self, name: str, subnet: str, token_hash: str, ttl: int | None, max_members: int,
                created: float) -> Lan:
        row = self.db.execute("INSERT INTO lans (name, subnet, token_hash, ttl, max_members, created) "
                              "VALUES (?,?,?,?,?,?) RETURNING id", (name, subnet, token_hash, ttl, max_members,
                                                                    created)).fetchone()
        return Lan(int(row[0]), name, subnet, token_hash, ttl, max_members, created)

    def remove_lan(self, lan_id: int) -> None:
        self.db.execute("DELETE FROM lan_members WHERE lan_id=?", (lan_id,))
        self.db.execute("DELETE FROM lans WHERE id=?", (lan_id,))

    def members(self, lan_id: int | None = None) -> list[Member]:
        if lan_id is None:
            rows = self.db.execute("SELECT * FROM lan_members ORDER BY lan_id, id")
        else:
            rows = self.db.execute("SELECT * FROM lan_members WHERE lan_id=? ORDER BY id", (lan_id,))
        return [_member(r) for r in rows]

    def add_member(self, lan_id: int, name: str, address: str, public_key: str, created: float) -> Member:
        row = self.db.execute("INSERT INTO lan_members (lan_id, name, address, public_key, created) "
                              "VALUES (?,?,?,?,?) RETURNING id", (lan_id, name, address, public_key, created)).fetchone()
        return Member(int(row[0]), lan_id, name, address, public_key, created)

    def remove_member(self, member_id: int) -> None:
        self.db.execute("DELETE FROM lan_members WHERE id=?", (member_id,))
