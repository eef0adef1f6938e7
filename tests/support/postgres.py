"""PostgreSQL for the tests: one throwaway server per session, a fresh empty database per test.

A conftest imports the fixtures (``from support.postgres import pg_db, pg_server``). A test that
stops or restarts a server uses its own ``throwaway()``; the shared one is restarted if a test left
it stopped, so the next test does not fail for it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from natctl.lab.postgres import Postgres, throwaway

TEMPLATE = "natctl_template"  # what every test's database is copied from; empty unless a caller fills it
_names = itertools.count(1)


@dataclass(frozen=True)
class Database:
    """One database on a server: ``url`` for natctl's ``store`` setting, ``dsn`` for psycopg."""

    server: Postgres
    name: str

    @property
    def url(self) -> str:
        return self.server.url_for(self.name)

    @property
    def dsn(self) -> str:
        return self.server.dsn_for(self.name)


@contextmanager
def fresh_database(pg: Postgres, template: str = TEMPLATE) -> Iterator[Database]:
    """A new database copied from ``template`` (0.1-0.2 s), dropped afterwards with its connections."""
    if not pg.running:  # an earlier test stopped the shared server and did not start it again
        pg.start()
    db = Database(pg, f"test_{next(_names)}")
    pg.sql(f"CREATE DATABASE {db.name} TEMPLATE {template}")
    try:
        yield db
    finally:
        if not pg.running:
            pg.start()
        pg.sql(f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE)")  # FORCE: a leaked connection must not block it


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Postgres]:
    """The session's server (about 1.5 s to start), with an empty template database for ``pg_db``."""
    with throwaway() as pg:
        pg.sql(f"CREATE DATABASE {TEMPLATE}")
        yield pg


@pytest.fixture
def pg_db(pg_server: Postgres) -> Iterator[Database]:
    """A fresh, empty database for one test on the session's server."""
    with fresh_database(pg_server) as db:
        yield db
