"""natctl lobby ..."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from natctl.cli.common import JsonOpt, NoApplyOpt, say, service, through_daemon
from natctl.model import format_duration, parse_cidr, parse_duration, parse_int, parse_name
from natctl.output import emit_json, table, when

app = typer.Typer(rich_markup_mode=None, help="Create, close and list lobbies.", no_args_is_help=True)


@app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Lobby name: letters, digits, '.', '_', '-'.")],
    allow: Annotated[Optional[list[str]], typer.Option("--allow", help="Client network allowed in (CIDR); repeatable.")] = None,
    ttl: Annotated[Optional[str], typer.Option(help="Close the lobby after this long, e.g. 4h.")] = None,
    open_: Annotated[bool, typer.Option("--open", help="Admit clients from anywhere (up to --max-clients).")] = False,
    max_clients: Annotated[str, typer.Option(metavar="N", help="Most clients the lobby admits, 1 to 65535.")] = "64",
    region: Annotated[Optional[str], typer.Option(help="Fleet: place it on a relay of this region.")] = None,
    relay: Annotated[Optional[str], typer.Option(help="Fleet: place it on this relay.")] = None,
    as_json: JsonOpt = False,
    no_apply: NoApplyOpt = False,
) -> None:
    """Create a lobby and print its registration token (shown only once)."""
    done, made = through_daemon(ctx, "lobby.create", no_apply, name=name, allow=allow or None, ttl=ttl,
                                open=open_ or None, max_clients=max_clients, region=region, relay=relay)
    if not done:
        nets = tuple(parse_cidr(a) for a in allow or ())
        seconds = parse_duration(ttl) if ttl else None
        most = parse_int(max_clients, "--max-clients", 1, 65535)
        lobby, token = service(ctx).lobby_create(parse_name(name, "lobby name"), nets, seconds, open_, most,
                                                 apply=not no_apply, region=region, relay=relay)
        made = {"name": lobby.name, "id": lobby.id, "token": token, "allow": list(nets), "ttl": seconds,
                "open": open_, "relay": lobby.relay}
    if as_json:
        emit_json(made)
    else:
        where = f" on relay {made['relay']}" if made.get("relay") else ""
        say(f"lobby {made['name']} created (id {made['id']}){where}; token: {made['token']}")


@app.command("close")
def close(ctx: typer.Context, name: str, no_apply: NoApplyOpt = False) -> None:
    """Close a lobby: its mappings leave the kernel and its ports return to the pool."""
    done, _ = through_daemon(ctx, "lobby.close", no_apply, name=name)
    if not done:
        service(ctx).lobby_close(name, apply=not no_apply)
    say(f"lobby {name} closed")


@app.command("list")
def list_(
    ctx: typer.Context,
    all_: Annotated[bool, typer.Option("--all", help="Include closed lobbies.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List open lobbies."""
    rows = service(ctx).lobbies(include_closed=all_)
    if as_json:
        emit_json(rows)
        return
    table("lobbies", ["name", "host", "host port", "clients", "allow", "ttl", "created", "closed"],
          [(r.name, r.host, r.host_port, r.clients, "open" if r.open else ",".join(r.allow) or "-",
            format_duration(r.ttl), when(r.created), when(r.closed)) for r in rows],
          empty="no lobbies: create one with 'natctl lobby create NAME'")
