"""A command imports what it uses, no more: the budget that keeps `natctl map add` fast for scripts.

Each check runs a fresh interpreter with ``-X importtime`` and reads the modules it imported.
pydantic stands for typer's coercion (natctl.cli passes text and flags through instead); rich
for tables; pyroute2 for rtnetlink and conntrack; prometheus_client and asyncio for the daemon.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

# Never for a changing command: each costs tens of milliseconds to import.
HEAVY = ("pydantic", "rich", "pyroute2", "prometheus_client", "asyncio", "natctl.daemon", "natctl.gm",
         "natctl.noray", "natctl.lan", "natctl.join", "natctl.lab", "natctl.demo", "bench")
# Not even the service, the store or the kernel for merely loading the command line (--help, --version).
# Nor for what scripts run most (natctl.cli.direct): OpenSSL's hashing and the registrar are the daemon's,
# secrets is wanted only for a new token, doctor's checks (preflight) only by doctor, pathlib by nothing.
DIRECT_ONLY = ("typer", "click", "hashlib", "hmac", "secrets", "pathlib", "natctl.registrar", "natctl.preflight")
ROOT_ONLY = (*HEAVY, "natctl.service", "natctl.store", "natctl.sync", "natctl.kernel", "nftables", "tomllib")


def imported(code: str, *argv: str) -> set[str]:
    """The modules a fresh interpreter imports to run ``code`` (with ``argv`` as sys.argv[1:])."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code, *argv], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "NATCTL_CONFIG": "/nonexistent"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return {line.rsplit("|", 1)[1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")
            and "|" in line and not line.endswith("package")}


def offenders(modules: set[str], banned: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == b or m.startswith(b + ".") for b in banned))


def test_loading_the_command_line_imports_no_service_kernel_or_daemon():
    assert offenders(imported("import natctl.cli.app; import natctl.cli; natctl.cli.command()"), ROOT_ONLY) == []


RUN = """
import sys
from natctl.cli import command
from natctl.kernel.fake import FakeKernel
kernel = FakeKernel()
try:
    command().main(sys.argv[1:], prog_name="natctl", obj={"kernel_factory": lambda: kernel})
except SystemExit as done:
    assert not done.code, done.code
"""


@pytest.mark.parametrize("argv", [
    ["lobby", "create", "a", "--allow", "198.18.2.0/24", "--ttl", "1h"],
    ["map", "add", "--lobby", "a", "--host", "198.18.1.2:27015", "--client", "198.18.2.2:40001", "--json"],
    ["map", "remove", "--lobby", "a", "--client", "198.18.2.2:40001"],
    ["forward", "add", "--port", "8080", "--to", "198.18.1.2:80"],
    ["lobby", "close", "a"],
], ids=lambda a: " ".join(a[:2]))
def test_a_changing_command_imports_no_heavy_module(tmp_path, argv):
    """Through the whole command, the change applied (to the fake kernel), its answer printed."""
    state = str(tmp_path / "s.db")
    base = ["--state", state, "--relay-ip", "198.18.0.1", "--ports", "20000-20009", "--accel", "none"]
    if argv[:2] != ["lobby", "create"]:
        imported(RUN, *base, "lobby", "create", "a", "--allow", "198.18.2.0/24")
        if argv[:2] == ["map", "remove"]:
            imported(RUN, *base, "map", "add", "--lobby", "a", "--host", "198.18.1.2:27015", "--client", "198.18.2.2:40001")
    assert offenders(imported(RUN, *base, *argv), HEAVY) == []


def test_help_still_lists_every_command():
    proc = subprocess.run([sys.executable, "-m", "natctl", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for name in ("join", "serve", "install-units", "bench", "doctor", "apply", "status", "cleanup", "uninstall",
                 "demo", "lobby", "map", "forward", "gm"):
        assert f"\n  {name} " in proc.stdout, name


def test_the_default_route_is_read_without_rtnetlink():
    """natctl.kernel.links reads /proc/net/route (pyroute2 alone costs a command more than its budget)."""
    from natctl.kernel.links import default_routes

    listing = (
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"
        "eth1\t00000000\t010012C6\t0003\t0\t0\t200\t00000000\t0\t0\t0\n"
        "eth0\t000112C6\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"  # 198.18.1.0/24: not a default
        "*\t00000000\t00000000\t0201\t0\t0\t0\t00000000\t0\t0\t0\n"  # unreachable default: no interface
        "eth0\t00000000\t010112C6\t0003\t0\t0\t100\t00000000\t0\t0\t0\n"
        "eth2\t00000000\t010112C6\t0002\t0\t0\t50\t00000000\t0\t0\t0\n"  # not up
    )
    assert default_routes(listing) == ["eth0", "eth1"]  # lowest metric first, as the kernel picks
    assert default_routes(listing.splitlines()[0]) == []


# --- map add and map remove without typer (natctl.cli.direct)

DIRECT = [
    ["map", "add", "--lobby", "a", "--host", "198.18.1.2:27015", "--client", "198.18.2.2:40001"],
    ["map", "add", "--lobby=a", "--host", "198.18.1.2:27015", "--client", "198.18.2.3:40001", "--client=198.18.2.4:40001",
     "--proto", "udp", "--json"],
    ["map", "remove", "--lobby", "a", "--client", "198.18.2.2:40001", "--no-apply"],
]


def test_scripts_commands_run_without_typer(tmp_path):
    """What a script runs most imports neither typer nor its click (natctl.cli.maps runs the same bodies)."""
    state = str(tmp_path / "s.db")
    base = ["--state", state, "--relay-ip", "198.18.0.1", "--ports", "20000-20009", "--accel", "none"]
    imported(RUN, *base, "lobby", "create", "a", "--open")
    main = RUN.replace(
        "command().main(sys.argv[1:], prog_name=\"natctl\", obj={\"kernel_factory\": lambda: kernel})",
        "from natctl.cli import direct\n"
        "    obj, body, kwargs = direct.parse(sys.argv[1:])\n"
        "    body({**obj, 'kernel_factory': lambda: kernel}, **kwargs)")  # on the fake kernel
    assert main != RUN
    for argv in DIRECT:
        modules = imported(main, *base, *argv)
        assert offenders(modules, (*HEAVY, *DIRECT_ONLY)) == [], argv


def test_the_entry_point_takes_the_direct_path_with_the_same_errors(tmp_path):
    argv = ["--state", str(tmp_path / "s.db"), "--relay-ip", "198.18.0.1", "map", "remove", "--lobby", "a", "--client",
            "198.18.2.2:40001", "--no-apply"]
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "natctl", *argv], capture_output=True, text=True,
                          timeout=60, env={"PATH": "/usr/bin:/bin", "NATCTL_CONFIG": "/nonexistent"})
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("import time:")]
    assert proc.returncode == 3 and len(errors) == 1 and errors[0].startswith("natctl: error: no ") and "'a'" in errors[0]
    assert " typer" not in proc.stderr


def test_the_direct_path_takes_only_plain_command_lines():
    from natctl.cli.direct import parse

    top = ["--state", "/tmp/s.db", "--relay-ip=198.18.0.1", "--adopt"]
    obj, body, kwargs = parse([*top, "map", "add", "--lobby", "a", "--client", "c1", "--client", "c2", "--lobby", "b",
                               "--json"])
    assert body.__name__ == "map_add" and kwargs == {"lobby": "b", "client": ["c1", "c2"], "as_json": True}
    assert obj == {"overrides": {"state": "/tmp/s.db", "store": None, "relay_ip": "198.18.0.1", "ports": None, "accel": None,
                                 "interface": None, "adopt": True}, "config": None}
    for argv in (["--help"], ["--version"], ["map", "add", "--help"], ["map", "add", "-h"], ["map", "list"],
                 ["map", "add", "--from", "f"], ["map", "add", "--lobby"], ["map", "add", "--lobby", "--json"],
                 ["map", "add", "--json=1"], ["map", "add", "x"], ["map", "remove", "--client", "c", "--json"],
                 ["--state", "s", "--adopt=yes", "map", "add"], ["map", "add", "--", "--lobby", "a"],
                 ["map", "add", "--state", "s"], ["lobby", "create", "a"], ["map"], []):
        assert parse(argv) is None, argv  # typer's: its help, its errors


def _typer_options(command) -> dict[str, tuple[str, str]]:
    """option -> (parameter name, kind) of a click command, as natctl.cli.direct.Options keeps them."""
    out = {}
    for p in command.params:
        for opt in getattr(p, "opts", ()):
            if opt.startswith("--"):
                out[opt] = (p.name, "flags" if p.is_flag else "many" if p.multiple else "values")
    return out


def _direct_options(spec) -> dict[str, tuple[str, str]]:
    return {o: (name, kind) for kind in ("values", "many", "flags") for o, name in getattr(spec, kind).items()}


def test_the_direct_path_knows_the_typer_commands_options():
    """Each option the direct path takes is the typer command's, with the same parameter and kind (what it does
    not know, typer gets); and its root obj is the one natctl.cli.app.root makes."""
    import typer.main

    from natctl.cli import direct
    from natctl.cli.app import app
    from natctl.cli.lazy import load

    root = typer.main.get_command(app)
    assert _direct_options(direct.ROOT).items() <= _typer_options(root).items()
    for (group, name), (spec, _) in direct.COMMANDS.items():
        assert _direct_options(spec).items() <= _typer_options(load(group).commands[name]).items(), name

    argv = ["--state", "/tmp/s.db", "--ports", "20000-20009", "--config", "/nonexistent", "--accel", "none",
            "--interface", "eth9", "--relay-ip", "198.18.0.1", "--adopt"]
    ctx = root.make_context("natctl", [*argv, "map", "list"])
    with ctx:
        ctx.invoke(root.callback, **ctx.params)
        assert direct.parse([*argv, "map", "remove", "--lobby", "a", "--client", "c"])[0] == ctx.obj
