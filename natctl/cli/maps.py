"""natctl map ..."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, Optional, TextIO

import typer

from natctl.cli import direct
from natctl.cli.common import JsonOpt, NoApplyOpt, say, service, shared, warn
from natctl.errors import UsageError
from natctl.model import MappingLine, parse_mapping_line
from natctl.output import emit_json, table

if TYPE_CHECKING:
    from natctl.lobbies import Made
    from natctl.views import ForwardView, MappingView

app = typer.Typer(rich_markup_mode=None, help="Map clients to a lobby's host through relay ports.", no_args_is_help=True)

ProtoOpt = Annotated[str, typer.Option("--proto", help="udp or tcp.")]


FromOpt = Annotated[Optional[str], typer.Option(
    "--from", metavar="FILE", help="Mappings from FILE ('-': standard input), one a line: "
    "LOBBY HOST_IP:PORT CLIENT_IP:PORT [udp|tcp]; all or none, in one change.")]


@app.command("add")
def add(
    ctx: typer.Context,
    lobby: Annotated[Optional[str], typer.Option("--lobby", help="Lobby name.")] = None,
    host: Annotated[Optional[str], typer.Option("--host", help="Host's public IP:PORT.")] = None,
    client: Annotated[Optional[list[str]], typer.Option("--client", help="Client's public IP:PORT; repeatable.")] = None,
    proto: ProtoOpt = "udp",
    from_: FromOpt = None,
    create_lobbies: Annotated[bool, typer.Option(
        "--create-lobbies", help="With --from: create a lobby the file names that is not open (default settings).")
    ] = False,
    as_json: JsonOpt = False,
    no_apply: NoApplyOpt = False,
) -> None:
    """Map clients to the lobby's host; prints the host and client relay ports."""
    if from_ is not None:
        _only_from(lobby=lobby, host=host, client=client)
        views = _bulk(ctx, from_, remove=False, create_lobbies=create_lobbies, no_apply=no_apply)
        if as_json:  # JSON lines: one object a mapping, the keys of 'map add --json'
            emit_json_lines(views)
            return
        count = len(views)
        say(f"added {count} mapping{'s' if count != 1 else ''} from {_source(from_)}")
        return
    if create_lobbies:
        raise UsageError("--create-lobbies goes with --from", "name a file of mappings with --from FILE")
    direct.map_add(shared(ctx), lobby, host, client, proto, as_json, no_apply)  # as scripts run it, no typer


@app.command("remove")
def remove(ctx: typer.Context,
           lobby: Annotated[Optional[str], typer.Option("--lobby", help="Lobby name.")] = None,
           client: Annotated[Optional[str], typer.Option("--client", help="Client's public IP:PORT.")] = None,
           proto: ProtoOpt = "udp", from_: FromOpt = None, no_apply: NoApplyOpt = False) -> None:
    """Remove a client's mapping; its flows stop at once."""
    if from_ is not None:
        _only_from(lobby=lobby, client=client)
        count = len(_bulk(ctx, from_, remove=True, create_lobbies=False, no_apply=no_apply))
        say(f"removed {count} mapping{'s' if count != 1 else ''} from {_source(from_)}")
        return
    direct.map_remove(shared(ctx), lobby, client, proto, no_apply)


def _bulk(ctx: typer.Context, path: str, remove: bool, create_lobbies: bool, no_apply: bool) -> Made:
    """A file of mappings in one change, made here (not handed to a daemon: the daemon's periodic look at
    the host ports finds the lobbies it adds); what was added (removed): its length, and its records."""
    svc = service(ctx)
    with _open(path) as f:
        lines = (parse_line(text, number) for number, text in enumerate(f, 1))
        made = svc.map_file(lines, remove=remove, create_lobbies=create_lobbies, apply=not no_apply)
    return made


def parse_line(text: str, number: int) -> MappingLine | None:
    try:
        return parse_mapping_line(text, number)
    except UsageError as err:
        raise UsageError(f"line {number}: {err.message}", err.hint) from None


def _open(path: str) -> contextlib.AbstractContextManager[TextIO]:
    if path == "-":
        return contextlib.nullcontext(sys.stdin)
    try:  # a byte that is not UTF-8 becomes U+FFFD, which its line's parser refuses with the line's number
        return open(path, encoding="utf-8", errors="replace")
    except OSError as err:
        raise UsageError(f"cannot read {path}: {err.strerror}", "pass a readable file, or - for standard input") \
            from None


def emit_json_lines(rows: Iterable[Any]) -> None:
    """One compact JSON object a line, written as they come."""
    import json

    from natctl.views import as_json

    write = sys.stdout.write
    for row in rows:
        write(json.dumps(as_json(row), sort_keys=True, separators=(", ", ": ")) + "\n")


def _source(path: str) -> str:
    return "standard input" if path == "-" else path


def _only_from(**given: Any) -> None:
    for name, value in given.items():
        if value is not None:
            raise UsageError(f"--{name} and --from exclude each other", "give the mappings in the file, or without it")


@app.command("list")
def list_(ctx: typer.Context, lobby: Annotated[Optional[str], typer.Option(help="Only this lobby.")] = None,
          as_json: JsonOpt = False) -> None:
    """List mappings, whether the kernel holds each and what it carried (as 'natctl status')."""
    from natctl.views import cell

    rows = [m for m in service(ctx).mappings(counters=True) if lobby is None or m.lobby == lobby]
    unread(rows)
    if as_json:
        emit_json(rows)
        return
    table("mappings", ["lobby", "proto", "client", "host", "relay", "host port", "client port", "installed",
                       "to host packets", "to client packets"],
          [(m.lobby, m.proto, m.client, m.host, m.relay_ip or "-", m.host_port, m.client_port, cell(m.installed),
            cell(m.to_host_packets), cell(m.to_client_packets)) for m in rows],
          empty="no mappings: add one with 'natctl map add'")


def unread(rows: Sequence[MappingView | ForwardView]) -> None:
    """Say once why a listing's kernel fields are missing (JSON) or '?' (tables)."""
    if any(r.installed is None for r in rows):
        warn("could not read table inet natctl (natctl needs root and the nftables binding for it): "
             "installed and counters are left out")
