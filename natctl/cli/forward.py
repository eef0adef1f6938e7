"""natctl forward ..."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from natctl.cli.common import JsonOpt, NoApplyOpt, say, service, through_daemon
from natctl.model import FORWARD_PROTOS, format_duration, parse_duration, parse_endpoint, parse_port, parse_proto
from natctl.output import emit_json, table, when

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
    done, made = through_daemon(ctx, "forward.add", no_apply, port=port, to=to, proto=proto, ttl=ttl)
    if not done:
        fwd = service(ctx).forward_add(parse_port(port), parse_endpoint(to), parse_proto(proto, FORWARD_PROTOS),
                                       parse_duration(ttl) if ttl else None, apply=not no_apply)
        made = {"port": fwd.port, "proto": fwd.proto, "to": str(fwd.target), "ttl": fwd.ttl}
    if as_json:
        emit_json(made)
    else:
        say(f"forwarding {made['proto']} port {made['port']} to {made['to']}"
            + (f" for {format_duration(made['ttl'])}" if made["ttl"] else ""))


@app.command("remove")
def remove(ctx: typer.Context, port: str, no_apply: NoApplyOpt = False) -> None:
    """Remove a forward; its connections stop at once."""
    done, made = through_daemon(ctx, "forward.remove", no_apply, port=port)
    gone = made["port"] if done else service(ctx).forward_remove(parse_port(port), apply=not no_apply).port
    say(f"removed forward of port {gone}")


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List forwards, whether the kernel holds each and what it carried (as 'natctl status')."""
    from natctl.cli.maps import unread
    from natctl.views import cell

    rows = service(ctx).forwards(counters=True)
    unread(rows)
    if as_json:
        emit_json(rows)
        return
    table("forwards", ["public port", "proto", "to", "ttl", "expires", "owner", "installed", "packets"],
          [(f.port, f.proto, f.to, format_duration(f.ttl), when(f.expires), f.owner or "-", cell(f.installed),
            cell(f.packets)) for f in rows],
          empty="no forwards: add one with 'natctl forward add'")
