"""natctl relay ... (a fleet of relays on one PostgreSQL store; natctl.fleet)"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Optional

import typer

from natctl.cli.common import JsonOpt, say, service
from natctl.model import parse_int
from natctl.output import emit_json, table
from natctl.views import RelayView

if TYPE_CHECKING:
    from natctl.fleet.service import Fleet

app = typer.Typer(rich_markup_mode=None, no_args_is_help=True,
                  help="A fleet of relays sharing one PostgreSQL store: join, list, drain.")


def _fleet(ctx: typer.Context) -> Fleet:
    from natctl.fleet.service import Fleet

    return Fleet(service(ctx).rec)


@app.command("join")
def join(
    ctx: typer.Context,
    region: Annotated[str, typer.Option(help="The region this relay serves, e.g. eu-west.")],
    name: Annotated[Optional[str], typer.Option(help="This relay's name in the fleet (default: the host name).")] = None,
    capacity: Annotated[str, typer.Option(metavar="N", help="Mappings it should carry at most (0: no limit).")] = "0",
    as_json: JsonOpt = False,
) -> None:
    """Make this machine (its relay IP) a relay of the fleet; again to change its region or capacity."""
    relay = _fleet(ctx).join(name, region, parse_int(capacity, "--capacity", 0, 10_000_000))
    if as_json:
        emit_json({"name": relay.name, "ip": relay.ip, "region": relay.region, "capacity": relay.capacity})
    else:
        say(f"relay {relay.name} ({relay.ip}) joined the fleet in region {relay.region}; start it: natctl serve")


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Relays, their health and load (mappings; packets/s from kernel counters)."""
    fleet = _fleet(ctx)
    now, dead_after = fleet.now(), fleet.rec.settings.fleet.dead_after
    rows = [RelayView(r.name, r.ip, r.region,
                      r.state if r.state != "live" or r.alive(now, dead_after) else "silent",
                      round(max(0.0, now - r.heartbeat), 1), r.capacity, r.lobbies, r.mappings, round(r.pps, 1),
                      r.registration_port) for r in fleet.relays()]
    if as_json:
        emit_json(rows)
        return
    table("relays", ["name", "ip", "region", "state", "heartbeat", "lobbies", "mappings", "capacity", "pkt/s"],
          [(r.name, r.ip, r.region, r.state, f"{r.heartbeat_age:g}s ago", r.lobbies, r.mappings,
            r.capacity or "-", r.pps) for r in rows],
          empty="no relays: run 'natctl relay join --region NAME' on each relay")


@app.command("drain")
def drain(ctx: typer.Context, name: str, as_json: JsonOpt = False) -> None:
    """Take no new lobbies on relay NAME and move its open lobbies to other live relays (any region).
    Their hosts follow at their next keepalive; 'natctl relay join' on it takes lobbies again."""
    moved = _fleet(ctx).drain(name)
    if as_json:
        emit_json([{"lobby": m.lobby, "from": m.source, "to": m.target} for m in moved])
        return
    say(f"relay {name} drained: {len(moved)} lobbies moved" +
        "".join(f"\n  {m.lobby} -> {m.target}" for m in moved))


@app.command("remove")
def remove(ctx: typer.Context, name: str) -> None:
    """Forget relay NAME for good (drain it first)."""
    _fleet(ctx).remove(name)
    say(f"relay {name} removed from the fleet")
