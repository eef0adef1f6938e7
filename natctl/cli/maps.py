"""natctl map ..."""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from natctl.cli.common import JsonOpt, NoApplyOpt, say, service, through_daemon, warn
from natctl.model import parse_endpoint, parse_proto
from natctl.output import emit_json, table

if TYPE_CHECKING:
    from natctl.views import ForwardView, MappingView

app = typer.Typer(rich_markup_mode=None, help="Map clients to a lobby's host through relay ports.", no_args_is_help=True)

LobbyOpt = Annotated[str, typer.Option("--lobby", help="Lobby name.")]
ProtoOpt = Annotated[str, typer.Option("--proto", help="udp or tcp.")]


@app.command("add")
def add(
    ctx: typer.Context,
    lobby: LobbyOpt,
    host: Annotated[str, typer.Option("--host", help="Host's public IP:PORT.")],
    client: Annotated[list[str], typer.Option("--client", help="Client's public IP:PORT; repeatable.")],
    proto: ProtoOpt = "udp",
    as_json: JsonOpt = False,
    no_apply: NoApplyOpt = False,
) -> None:
    """Map clients to the lobby's host; prints the host and client relay ports."""
    done, made = through_daemon(ctx, "map.add", no_apply, lobby=lobby, host=host, client=client, proto=proto)
    rows: list[Any]
    if done:  # the same records, as JSON: one mapping, or a list of them
        rows = [SimpleNamespace(**m) for m in (made if isinstance(made, list) else [made])]
    else:
        rows = service(ctx).map_add(lobby, parse_endpoint(host), [parse_endpoint(c) for c in client],
                                    parse_proto(proto), apply=not no_apply)
    if as_json:
        emit_json(made if done else rows[0] if len(rows) == 1 else rows)
        return
    for m in rows:
        say(f"{m.proto} {m.client} -> {m.relay_ip}:{m.host_port} reaches host {m.host}; "
            f"the host sees it as {m.relay_ip}:{m.client_port}")
        say(f"host_port {m.host_port} client_port {m.client_port}")


@app.command("remove")
def remove(ctx: typer.Context, lobby: LobbyOpt,
           client: Annotated[str, typer.Option("--client", help="Client's public IP:PORT.")],
           proto: ProtoOpt = "udp", no_apply: NoApplyOpt = False) -> None:
    """Remove a client's mapping; its flows stop at once."""
    done, _ = through_daemon(ctx, "map.remove", no_apply, lobby=lobby, client=client, proto=proto)
    if not done:
        service(ctx).map_remove(lobby, parse_endpoint(client), parse_proto(proto), apply=not no_apply)
    say(f"removed {proto} client {client} from lobby {lobby}")


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
