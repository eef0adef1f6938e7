"""The throwaway PostgreSQL server (natctl/lab/postgres.py) and the tests' fresh databases.

Real servers from Debian's package: about 1.5 s each to start. As root the server runs as the
package's ``postgres`` user; as any other user, as that user.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

from natctl.errors import NatctlError
from natctl.lab import postgres
from natctl.lab.postgres import Postgres, throwaway
from support.postgres import TEMPLATE, fresh_database


@pytest.fixture(scope="module")
def server():
    with throwaway() as pg:
        pg.sql(f"CREATE DATABASE {TEMPLATE}")
        yield pg


def left_behind(root: Path) -> list[str]:
    """Live processes working in ``root`` (every postgres process works in its data directory)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or (proc / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if os.readlink(proc / "cwd").startswith(str(root)):
                found.append((proc / "cmdline").read_text().replace("\0", " "))
        except OSError:
            continue  # gone meanwhile, or not ours to read
    return found


def assert_removed(root: Path) -> None:
    assert not root.exists()
    assert left_behind(root) == []


def test_connects_through_dsn_and_url(server: Postgres):
    for target in (server.dsn, server.url):
        with psycopg.connect(target) as conn:
            row = conn.execute("SELECT current_database(), current_user, current_setting('fsync')").fetchone()
            assert row == ("natctl", "postgres", "off")
    assert server.url.startswith("postgresql:///natctl?host=/")
    assert (server.root / f".s.PGSQL.{server.port}").is_socket()
    assert left_behind(server.root)  # what the removal tests look for is there while it runs


def test_listen_notify_between_two_connections(server: Postgres):
    got: list[tuple[str, str]] = []
    with psycopg.connect(server.dsn, autocommit=True) as listener, psycopg.connect(server.dsn, autocommit=True) as talker:
        listener.add_notify_handler(lambda n: got.append((n.channel, n.payload)))
        listener.execute("LISTEN relay_changes")
        talker.execute("SELECT pg_notify('relay_changes', 'lobby 7')")
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:  # a notification arrives with the next round trip
            listener.execute("SELECT 1")
            time.sleep(0.02)
    assert got == [("relay_changes", "lobby 7")]


def test_stop_and_start_keep_the_data_on_loopback_too():
    with throwaway(tcp=True) as pg:
        assert pg.dsn.startswith("host=127.0.0.1 ")
        with psycopg.connect(pg.url) as conn:
            conn.execute("CREATE TABLE lobbies (name text)")
            conn.execute("INSERT INTO lobbies VALUES ('alpha')")
        before = pg.pid
        pg.stop()
        assert not pg.running and pg.pid is None
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(pg.dsn, connect_timeout=2)
        pg.start()
        assert pg.running and pg.pid != before
        with psycopg.connect(pg.dsn) as conn:
            assert conn.execute("SELECT name FROM lobbies").fetchall() == [("alpha",)]


def test_everything_is_removed_after_exit():
    with throwaway() as pg:
        root, pid = pg.root, pg.pid
        assert pid is not None and left_behind(root)
    assert_removed(root)


@pytest.mark.parametrize("stopped", [False, True], ids=["running", "stopped"])
def test_everything_is_removed_when_the_body_raises(stopped: bool):
    with pytest.raises(RuntimeError, match="boom"), throwaway() as pg:
        root = pg.root
        if stopped:
            pg.stop()
        raise RuntimeError("boom")
    assert_removed(root)


def test_fresh_databases_are_empty_and_dropped(server: Postgres):
    with fresh_database(server) as one, fresh_database(server) as two:
        assert one.name != two.name
        with psycopg.connect(one.url) as conn:
            conn.execute("CREATE TABLE t (x int)")
        with psycopg.connect(two.dsn) as conn:
            assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone() == (0,)
        left_open = psycopg.connect(one.dsn)  # a test that leaks a connection does not block the drop
    with psycopg.connect(server.dsn) as conn:
        names = {r[0] for r in conn.execute("SELECT datname FROM pg_database")}
    assert one.name not in names and two.name not in names
    left_open.close()


def test_missing_server_is_one_line_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(postgres, "PG_LIB", tmp_path)
    with pytest.raises(NatctlError, match="make setup") as err:
        throwaway().__enter__()
    assert "\n" not in str(err.value)


def test_a_server_that_does_not_start_says_why_and_leaves_nothing(monkeypatch):
    monkeypatch.setattr(postgres, "SETTINGS", {**postgres.SETTINGS, "shared_buffers": "plenty"})
    made: list[Path] = []
    real = postgres.tempfile.mkdtemp

    def mkdtemp(**kw) -> str:  # remembers the server's directory, which the failure removes
        made.append(Path(real(**kw)))
        return str(made[-1])

    monkeypatch.setattr(postgres.tempfile, "mkdtemp", mkdtemp)
    with pytest.raises(NatctlError, match="pg_ctl failed.*postgresql.conf.*contains errors") as err:
        throwaway().__enter__()
    assert "\n" not in str(err.value)
    assert_removed(made[0])


def test_foreground_command_prints_the_store_line_and_cleans_up_on_ctrl_c():
    proc = subprocess.Popen([sys.executable, "-m", "natctl.lab.postgres"], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).parents[2])
    try:
        lines = []
        assert proc.stdout is not None
        while not lines or not lines[-1].startswith("store = "):
            line = proc.stdout.readline()
            assert line, f"exited early: {lines}"
            lines.append(line)
        url = lines[-1].split('"')[1]
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == ("natctl",)
        root = Path(lines[0].split(" in ", 1)[1].split(",")[0])
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        assert_removed(root)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_server_whose_owner_was_killed_is_removed_by_the_next_one():
    code = ("import time; from natctl.lab.postgres import throwaway\n"
            "with throwaway() as pg: print(pg.root, flush=True); time.sleep(60)")
    owner = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    assert owner.stdout is not None
    root = Path(owner.stdout.readline().strip())
    owner.kill()  # no cleanup runs: the postmaster, in its own session, lives on
    owner.wait()
    assert left_behind(root)
    with throwaway():
        assert_removed(root)
