"""GM rows in natctl's store (their own table; writes inside ``Store.write()``)."""

from __future__ import annotations

from typing import Any

from natctl.gm.model import Gm
from natctl.store import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS gms (
  name TEXT PRIMARY KEY,
  vpn TEXT NOT NULL,
  address TEXT NOT NULL UNIQUE,
  port INTEGER NOT NULL UNIQUE,
  public_key TEXT NOT NULL DEFAULT '',
  created REAL NOT NULL
);
"""


def _gm(r: Any) -> Gm:
    return Gm(r["name"], r["vpn"], r["address"], r["port"], r["public_key"], r["created"])


class GmStore:
    """The ``gms`` table beside the relay's tables, in the same file and transactions."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.db
        store.add_tables(SCHEMA)

    def all(self) -> list[Gm]:
        return [_gm(r) for r in self.db.execute("SELECT * FROM gms ORDER BY port")]

    def get(self, name: str) -> Gm | None:
        r = self.db.execute("SELECT * FROM gms WHERE name=?", (name,)).fetchone()
        return _gm(r) if r else None

    def add(self, gm: Gm) -> None:
        self.db.execute("INSERT INTO gms (name, vpn, address, port, public_key, created) VALUES (?,?,?,?,?,?)",
                        (gm.name, gm.vpn, gm.address, gm.port, gm.public_key, gm.created))

    def remove(self, name: str) -> None:
        self.db.execute("DELETE FROM gms WHERE name=?", (name,))
