"""A throwaway PostgreSQL server from Debian's packages, for the tests, the bench and the README.

``throwaway()`` runs ``initdb`` and ``pg_ctl`` from /usr/lib/postgresql/<version>/bin on a data
directory in a fresh temp directory, listening on a Unix socket in that directory (and on
127.0.0.1 if asked), and removes everything on exit, also after a failure. A Unix socket, not
loopback, because it is a file: relays in other network namespaces reach it too.

``python -m natctl.lab.postgres`` runs one in the foreground until Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

from natctl.errors import NatctlError

PG_LIB = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"  # the role initdb creates; trust authentication, the server is private to its temp dir
DATABASE = "natctl"
WAIT = 20  # seconds pg_ctl waits for a start or a stop
PREFIX, OWNER = "natctl-pg-", "owner.pid"  # a temp dir's name, and the file naming the process that made it
# Speed over durability: the data is thrown away. TimeZone fixed so tests see one clock format.
SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "TimeZone": "'UTC'"}


def bindir() -> Path:
    """The newest installed server's bin directory (Debian 12 has 15)."""
    found = sorted((p for p in PG_LIB.glob("*/bin") if (p / "initdb").exists()),
                   key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    if not found:
        raise NatctlError(f"PostgreSQL server not found (no {PG_LIB}/<version>/bin/initdb)",
                          "run 'make setup' to install it")
    return found[-1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _postmaster(data: Path) -> int | None:
    """The pid of the server running on ``data``; a stale postmaster.pid may name a reused pid,
    so it counts only if that process works in ``data`` as every postgres process does."""
    try:
        pid = int((data / "postmaster.pid").read_text().split("\n", 1)[0])
        return pid if os.readlink(f"/proc/{pid}/cwd") == str(data) else None
    except (OSError, ValueError):
        return None


def sweep(base: str) -> None:
    """Remove the servers of owners that died without cleaning up (SIGKILL, a test timeout).

    The postmaster runs in its own session, so nothing else would ever stop them."""
    for root in Path(base).glob(f"{PREFIX}*"):
        try:
            if _alive(int((root / OWNER).read_text())):
                continue
        except (OSError, ValueError):
            continue  # not ours, or just being made
        pid = _postmaster(root / "data")
        if pid is not None:
            os.kill(pid, signal.SIGQUIT)  # immediate shutdown: the postmaster takes its children along
            deadline = time.monotonic() + WAIT
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        shutil.rmtree(root, ignore_errors=True)


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1].strip() if lines else ""


def _free_port() -> int:
    # Also names the socket file; only contended when the server listens on loopback as well.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Postgres:
    """One cluster in ``root`` (data/, the socket, server.log); ``start()``/``stop()`` may repeat."""

    def __init__(self, tcp: bool = False, base: str = "/tmp") -> None:
        # /tmp by default: a socket path must stay under 108 bytes, and the server's user must reach it.
        self.bin = bindir()
        self._user = self._server_user()
        sweep(base)
        self.root = Path(tempfile.mkdtemp(prefix=PREFIX, dir=base))
        (self.root / OWNER).write_text(f"{os.getpid()}\n")
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = _free_port()
        self.host = "127.0.0.1" if tcp else str(self.root)  # the address .dsn and .url use
        if self._user is not None:
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        os.chmod(self.root, 0o755)  # clients of any user may reach the socket

    @staticmethod
    def _server_user() -> pwd.struct_passwd | None:
        """Whom the server runs as: initdb refuses root, so root hands it to the package's user."""
        if os.geteuid() != 0:
            return None
        try:
            return pwd.getpwnam(SUPERUSER)
        except KeyError:
            raise NatctlError(f"no '{SUPERUSER}' system user to run PostgreSQL as", "run 'make setup'") from None

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "LC_", "LANG"))}
        env.update(LC_ALL="C", HOME=str(self.root))  # no user's PG* settings or missing locale
        who = {} if self._user is None else {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}
        # pg_ctl hands the postmaster the log file and /dev/null, so capturing here does not wait for it.
        proc = subprocess.run([str(self.bin / argv[0]), *argv[1:]], cwd=self.root, env=env, capture_output=True,
                              text=True, timeout=WAIT + 10, **who)  # type: ignore[call-overload]
        if check and proc.returncode != 0:
            # The server's own reason is in its log, which close() removes: quote its last line.
            said = [_last_line(proc.stderr or proc.stdout), _last_line(self.log.read_text() if self.log.exists() else "")]
            raise NatctlError(f"{argv[0]} failed ({proc.returncode})", ": ".join(x for x in said if x))
        return proc

    def init(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", SUPERUSER, "--auth=trust", "--no-locale", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        conf = {**SETTINGS, "port": str(self.port), "unix_socket_directories": f"'{self.root}'",
                "listen_addresses": "'127.0.0.1'" if self.host == "127.0.0.1" else "''"}
        with open(self.data / "postgresql.conf", "a") as f:  # the last setting wins; start() reuses them
            f.writelines(f"{k} = {v}\n" for k, v in conf.items())

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", str(WAIT), "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", str(WAIT), "stop")

    @property
    def running(self) -> bool:
        return self.data.exists() and self._run("pg_ctl", "-D", str(self.data), "status", check=False).returncode == 0

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while running (its children leave when it does)."""
        return _postmaster(self.data)

    def dsn_for(self, dbname: str) -> str:
        return f"host={self.host} port={self.port} user={SUPERUSER} dbname={dbname}"

    def url_for(self, dbname: str) -> str:
        return f"postgresql:///{dbname}?host={quote(self.host, safe='/')}&port={self.port}&user={SUPERUSER}"

    @property
    def dsn(self) -> str:
        """A libpq key/value string for the ``natctl`` database."""
        return self.dsn_for(DATABASE)

    @property
    def url(self) -> str:
        """The same as a URL: what ``store = "..."`` in natctl.toml takes."""
        return self.url_for(DATABASE)

    def sql(self, statement: str) -> None:
        """Run one statement outside a transaction (CREATE/DROP DATABASE) in the maintenance database."""
        import psycopg  # here: the module itself, and its error when the server is missing, need no driver

        with psycopg.connect(self.dsn_for("postgres"), autocommit=True) as conn:
            conn.execute(statement)

    def close(self) -> None:
        """Stop at once and remove every file; safe to call twice and after a failed start."""
        if self.running:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "-t", str(WAIT), "stop", check=False)
        pid = self.pid
        if pid is not None:  # pg_ctl gave up: leave no server on a deleted directory
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def throwaway(tcp: bool = False, base: str = "/tmp") -> Iterator[Postgres]:
    """A running server with an empty ``natctl`` database; stopped and removed on exit."""
    pg = launch(tcp, base)
    try:
        yield pg
    finally:
        pg.close()


def launch(tcp: bool = False, base: str = "/tmp") -> Postgres:
    """A running server with an empty ``natctl`` database; the caller closes it (``throwaway`` does)."""
    pg = Postgres(tcp=tcp, base=base)
    try:
        pg.init()
        pg.start()
        pg.sql(f"CREATE DATABASE {DATABASE}")
    except BaseException:
        pg.close()
        raise
    return pg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m natctl.lab.postgres",
                                     description="A throwaway PostgreSQL server for natctl, until Ctrl-C.")
    parser.add_argument("--tcp", action="store_true", help="listen on 127.0.0.1 too, and give that address")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # clean up on kill as on Ctrl-C
    try:
        t0 = time.monotonic()
        with throwaway(tcp=args.tcp) as pg:
            print(f"PostgreSQL {pg.bin.parent.name} in {pg.root}, up in {time.monotonic() - t0:.1f} s")
            print(f"url:   {pg.url}")
            print("for /etc/natctl/natctl.toml:")
            print(f'store = "{pg.url}"')
            print("Ctrl-C stops it and removes its files.", flush=True)
            while True:
                signal.pause()
    except KeyboardInterrupt:
        return 0
    except NatctlError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
