"""The command line's error cases: one line, a non-zero exit, nothing changed."""

from __future__ import annotations

import os
import sqlite3
import subprocess

import pytest

from natctl.lab.netns import natctl_argv, run
from support.cli import Cli
from support.unprivileged import NOBODY, python

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("engine")]  # each test on both store engines too


@pytest.fixture
def cli(lab, tmp_path):
    c = Cli(lab.relay_ns, str(tmp_path / "natctl.db"))
    c("lobby", "create", "a")
    c("map", "add", "--lobby", "a", "--host", "198.18.1.2:27015", "--client", "198.18.2.2:40001")
    yield c
    run(["nft", "delete", "table", "inet", "natctl"], ns=lab.relay_ns, check=False)


def kernel_state(lab) -> str:
    return run(["nft", "list", "table", "inet", "natctl"], ns=lab.relay_ns, check=False).stdout


def store_state(cli) -> tuple:
    return (cli("lobby", "list", "--json").stdout, cli("map", "list", "--json").stdout,
            cli("forward", "list", "--json").stdout)


def refused(cli, lab, code: int, match: str, *args: str, env: dict | None = None,
            prefix: list[str] | None = None) -> None:
    before = (store_state(cli), kernel_state(lab))
    if prefix:
        argv, extra = python()
        proc = subprocess.run(natctl_argv(cli.state, *args, ns=cli.ns, python=[*prefix, *argv]), capture_output=True,
                              text=True, timeout=30, env={**os.environ, **dict(extra)})
    else:
        proc = cli(*args, check=False, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("natctl: error: ") and match in lines[0], proc.stderr
    assert (store_state(cli), kernel_state(lab)) == before


@pytest.mark.parametrize("args,code,match", [
    (["map", "add", "--lobby", "a", "--host", "198.18.1.2:27015", "--client", "198.18.2.2"], 2, "IP:PORT"),
    (["map", "add", "--lobby", "a", "--host", "198.18.1.2:27015", "--client", "198.18.2.2:99999"], 2, "1 to 65535"),
    (["lobby", "create", "b", "--allow", "198.18.0.0/40"], 2, "CIDR"),
    (["lobby", "create", "b", "--ttl", "soon"], 2, "duration"),
    (["lobby", "create", "bad name"], 2, "lobby name"),
    (["forward", "add", "--port", "8080", "--to", "198.18.1.2:80", "--proto", "sctp"], 2, "protocol"),
    (["--ports", "100-200", "lobby", "list"], 2, "privileged"),
    (["map", "add", "--lobby", "nope", "--host", "198.18.1.2:27015", "--client", "198.18.2.2:1"], 3, "lobby list"),
    (["map", "remove", "--lobby", "a", "--client", "198.18.2.2:9"], 3, "no udp client"),
    (["lobby", "create", "a"], 4, "already open"),
    (["map", "add", "--lobby", "a", "--host", "198.18.1.2:27015", "--client", "198.18.2.2:40001"], 4, "already mapped"),
    (["map", "add", "--lobby", "a", "--host", "198.18.1.9:1", "--client", "198.18.2.2:2"], 4, "already has host"),
    (["forward", "add", "--port", "20005", "--to", "198.18.1.2:80"], 4, "reserved"),
])
def test_bad_input(cli, lab, args, code, match):
    refused(cli, lab, code, match, *args)


def test_exhausted_range(cli, lab):
    refused(cli, lab, 5, "no free client relay port in 29998-29999",
            "--ports", "29998-29999", "map", "add", "--lobby", "a", "--host", "198.18.1.2:27015",
            "--client", "198.18.2.2:2", "--client", "198.18.2.2:3")


def test_relay_range_inside_local_port_range(cli, lab):
    refused(cli, lab, 4, "ip_local_port_range", "--ports", "40000-40100", "map", "add", "--lobby", "a",
            "--host", "198.18.1.2:27015", "--client", "198.18.2.2:2")


@pytest.mark.parametrize("engine", ["sqlite"], indirect=True)  # a SQLite file held by another process
def test_store_locked_by_another_natctl(cli, lab):
    db = sqlite3.connect(cli.state, isolation_level=None)
    db.execute("BEGIN IMMEDIATE")
    try:
        proc = cli("lobby", "create", "b", check=False, env={"NATCTL_LOCK_TIMEOUT": "0.3"})
        assert proc.returncode == 7 and "locked by another natctl" in proc.stderr
    finally:
        db.execute("ROLLBACK")
        db.close()
    assert [lb["name"] for lb in cli.json("lobby", "list")] == ["a"]


def test_not_root(cli, lab):
    refused(cli, lab, 6, "must run as root", "map", "add", "--lobby", "a", "--host", "198.18.1.2:27015",
            "--client", "198.18.2.2:7", prefix=NOBODY)


def test_missing_nftables_binding(cli, lab, tmp_path):
    fake = tmp_path / "shadow" / "nftables"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('simulated: no binding')\n")
    refused(cli, lab, 6, "python3-nftables", "apply", env={"PYTHONPATH": str(tmp_path / "shadow")})
