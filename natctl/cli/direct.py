"""What scripts run most, without typer: ``natctl [OPTIONS] map add|remove`` of one mapping.

Importing typer (and the click it carries) and building its commands costs a process about 40 ms before
natctl does anything, a third of a `map add` (issue 14: under 150 ms with 10,000 mappings installed).
``main()`` (natctl.cli) first offers the command line to ``run``. It takes only the plain form: the root's
options, then ``map add`` or ``map remove`` with their own options, each spelled in full (``--opt VALUE`` or
``--opt=VALUE``, flags bare). Anything else (--help, --version, --from, a typo, an option without its value,
a value that starts with '-', another command) is left to typer, which prints its help and its errors as
always. The typer commands (natctl.cli.maps) run the same bodies below, so either way prints the same;
tests/unit/test_imports.py checks that the tables here match those commands' options.

Also here, free of typer: what every command shares, over the root's ``ctx.obj`` (natctl.cli.common wraps
these for typer's commands): the settings, the service, handing a change to a running daemon.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from natctl.errors import UsageError

if TYPE_CHECKING:
    from natctl.config import Settings
    from natctl.service import Service

# --- what every command shares (obj: the root context's obj, as natctl.cli.app.root fills it)


def settings(obj: dict[str, Any], **extra: Any) -> Settings:
    """Settings from the config file, NATCTL_* variables, global options and ``extra`` (a command's own).

    Tables' options (``natctl gm --subnet ...``) are kept in ``obj["tables"]`` by their group's callback."""
    from natctl import config

    return config.load({**obj["overrides"], **extra}, obj.get("config"), tables=obj.get("tables"))


def service(obj: dict[str, Any]) -> Service:
    """One Service per invocation, built on first use; whoever runs the command closes it."""
    if "service" not in obj:
        from natctl.service import Service

        obj["service"] = Service(settings(obj), kernel_factory=obj.get("kernel_factory"))
    svc: Service = obj["service"]
    return svc


def close(obj: dict[str, Any]) -> None:
    """Close the invocation's service, if it built one."""
    svc = obj.pop("service", None)
    if svc is not None:
        svc.close()


def through_daemon(obj: dict[str, Any], op: str, no_apply: bool = False, **fields: Any) -> tuple[bool, Any]:
    """Hand a change to the running daemon (its control socket, natctl.daemon.control) when one serves this
    store with these settings: (True, the result it made, as --json prints it). Else (False, None): nothing
    was changed, and the command makes the change itself, as without a daemon. Same errors either way."""
    if no_apply or obj.get("kernel_factory") is not None or obj["overrides"].get("adopt"):
        return False, None
    from natctl.daemon.control_client import through_daemon as call

    return call(settings(obj), op, {k: v for k, v in fields.items() if v is not None})


def say(text: str) -> None:
    """One line on stdout, flushed (as typer.echo writes it)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def required(**given: Any) -> Any:
    for name, value in given.items():
        if value is None:
            raise UsageError(f"missing option --{name}", f"pass --{name}, or a file of mappings with --from FILE")
    return given.values()


# --- the commands (natctl.cli.maps declares them for typer and --help)


def map_add(obj: dict[str, Any], lobby: str | None = None, host: str | None = None, client: list[str] | None = None,
            proto: str = "udp", as_json: bool = False, no_apply: bool = False) -> None:
    """``natctl map add`` of clients given as options: through the daemon when one serves, else here."""
    from natctl.output import emit_json

    lobby, host, client = required(lobby=lobby, host=host, client=client)
    done, made = through_daemon(obj, "map.add", no_apply, lobby=lobby, host=host, client=client, proto=proto)
    rows: list[Any]
    if done:  # the same records, as JSON: one mapping, or a list of them
        from types import SimpleNamespace

        rows = [SimpleNamespace(**m) for m in (made if isinstance(made, list) else [made])]
    else:
        from natctl.model import parse_endpoint, parse_proto

        rows = service(obj).map_add(lobby, parse_endpoint(host), [parse_endpoint(c) for c in client],
                                    parse_proto(proto), apply=not no_apply)
    if as_json:
        emit_json(made if done else rows[0] if len(rows) == 1 else rows)
        return
    for m in rows:
        say(f"{m.proto} {m.client} -> {m.relay_ip}:{m.host_port} reaches host {m.host}; "
            f"the host sees it as {m.relay_ip}:{m.client_port}")
        say(f"host_port {m.host_port} client_port {m.client_port}")


def map_remove(obj: dict[str, Any], lobby: str | None = None, client: str | None = None, proto: str = "udp",
               no_apply: bool = False) -> None:
    """``natctl map remove`` of one client given as options."""
    lobby, client = required(lobby=lobby, client=client)
    done, _ = through_daemon(obj, "map.remove", no_apply, lobby=lobby, client=client, proto=proto)
    if not done:
        from natctl.model import parse_endpoint, parse_proto

        service(obj).map_remove(lobby, parse_endpoint(client), parse_proto(proto), apply=not no_apply)
    say(f"removed {proto} client {client} from lobby {lobby}")


# --- the command lines taken here


class Options:
    """A command's options: option -> parameter name, by kind (click: the last of a repeated value wins)."""

    def __init__(self, values: dict[str, str], many: dict[str, str], flags: dict[str, str]) -> None:
        self.values = values
        self.many = many  # repeatable: a list in the order given
        self.flags = flags


# natctl.cli.app.root; "config" goes to obj["config"], the others to obj["overrides"]
ROOT = Options(values={"--state": "state", "--store": "store", "--relay-ip": "relay_ip", "--ports": "ports", "--config": "config",
                       "--accel": "accel", "--interface": "interface"},
               many={}, flags={"--adopt": "adopt"})
COMMANDS: dict[tuple[str, str], tuple[Options, Callable[..., None]]] = {
    ("map", "add"): (Options(values={"--lobby": "lobby", "--host": "host", "--proto": "proto"},
                             many={"--client": "client"}, flags={"--json": "as_json", "--no-apply": "no_apply"}),
                     map_add),
    ("map", "remove"): (Options(values={"--lobby": "lobby", "--client": "client", "--proto": "proto"},
                                many={}, flags={"--no-apply": "no_apply"}),
                        map_remove),
}


def _options(argv: list[str], i: int, spec: Options) -> tuple[dict[str, Any], int] | None:
    """The options from argv[i] up to the first word that is not one: (their values, where it stopped);
    None for anything click might read otherwise."""
    got: dict[str, Any] = {}
    while i < len(argv) and argv[i].startswith("-"):
        name, eq, value = argv[i].partition("=")
        if name in spec.flags and not eq:
            got[spec.flags[name]] = True
            i += 1
            continue
        key = spec.values.get(name) or spec.many.get(name)
        if key is None:
            return None
        if not eq:
            if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                return None
            value = argv[i + 1]
        i += 1 if eq else 2
        if name in spec.many:
            got.setdefault(key, []).append(value)
        else:
            got[key] = value
    return got, i


def parse(argv: list[str]) -> tuple[dict[str, Any], Callable[..., None], dict[str, Any]] | None:
    """(the root's obj, the command's body, its arguments) for a command line taken here, else None."""
    root = _options(argv, 0, ROOT)
    if root is None:
        return None
    top, i = root
    found = COMMANDS.get((argv[i], argv[i + 1])) if i + 1 < len(argv) else None
    if found is None:
        return None
    spec, body = found
    own = _options(argv, i + 2, spec)
    if own is None or own[1] != len(argv):
        return None
    adopt = top.pop("adopt", False)
    config = top.pop("config", None)
    overrides = {key: top.get(key) for key in ROOT.values.values() if key != "config"}
    obj = {"overrides": {**overrides, "adopt": True if adopt else None}, "config": config}
    return obj, body, own[0]


def run(argv: list[str]) -> bool:
    """Run the command line here if it is one of those above (True); else leave it to typer (False)."""
    parsed = parse(argv)
    if parsed is None:
        return False
    obj, body, kwargs = parsed
    try:
        body(obj, **kwargs)
    except BrokenPipeError:  # the reader went away (natctl map add ... | head -c0): exit 1 quietly, as click does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    finally:
        close(obj)
    return True
