"""natctl forward ..."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from natctl.cli.common import JsonOpt, NoApplyOpt, say, service
from natctl.cli.maps import unread
from natctl.model import FORWARD_PROTOS, format_duration, parse_duration, parse_endpoint, parse_port, parse_proto
from natctl.output import emit_json, table, when
from natctl.views import cell

app = typer.Typer(rich_markup_mode=None, help="Static port forwards: public port -> address:port.", no_args_is_help=True)


@app.command("add")
def add(
    ctx: typer.Context,
    port: Annotated[str, typer.Option("--port", help="Public port on the relay.")],
    to: Annotated[str, typer.Option("--to", help="Target IP:PORT.")],
    proto: Annotated[str, typer.Option(help="tcp, udp or both.")] = "tcp",
    ttl: Annotated[Optional[str], typer.Option(help="Remove it after this long, e.g. 4h.")] = None,
    as_json: JsonOpt = False,
    no_apply: NoApplyOpt = False,
) -> None:
    """Forward a public port to an address (replies return through the relay)."""
    fwd = service(ctx).forward_add(parse_port(port), parse_endpoint(to), parse_proto(proto, FORWARD_PROTOS),
                                   parse_duration(ttl) if ttl else None, apply=not no_apply)
    if as_json:
        emit_json({"port": fwd.port, "proto": fwd.proto, "to": str(fwd.target), "ttl": fwd.ttl})
    else:
        say(f"forwarding {fwd.proto} port {fwd.port} to {fwd.target}"
            + (f" for {format_duration(fwd.ttl)}" if fwd.ttl else ""))


@app.command("remove")
def remove(ctx: typer.Context, port: str, no_apply: NoApplyOpt = False) -> None:
    """Remove a forward; its connections stop at once."""
    fwd = service(ctx).forward_remove(parse_port(port), apply=not no_apply)
    say(f"removed forward of port {fwd.port}")


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List forwards, whether the kernel holds each and what it carried (as 'natctl status')."""
    rows = service(ctx).forwards(counters=True)
    unread(rows)
    if as_json:
        emit_json(rows)
        return
    table("forwards", ["public port", "proto", "to", "ttl", "expires", "owner", "installed", "packets"],
          [(f.port, f.proto, f.to, format_duration(f.ttl), when(f.expires), f.owner or "-", cell(f.installed),
            cell(f.packets)) for f in rows],
          empty="no forwards: add one with 'natctl forward add'")
