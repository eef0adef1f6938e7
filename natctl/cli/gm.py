"""natctl gm ..."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from natctl.cli.common import JsonOpt, deliver_config, say, service
from natctl.model import FORWARD_PROTOS, format_duration, parse_duration, parse_name, parse_port, parse_proto
from natctl.output import emit_json, table, when

if TYPE_CHECKING:
    from natctl.gm.service import GmService

app = typer.Typer(rich_markup_mode=None, help="Game masters behind one public IP: a VPN address and a public port each, "
                  "and sessions that forward that port to the GM.", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="The GM's name: letters, digits, '.', '_', '-'.")]


def Opt(help: str) -> Any:  # noqa: N802 - reads like typer.Option
    return typer.Option(help=help, show_default=False)


@app.callback()
def options(
    ctx: typer.Context,
    vpn: Annotated[Optional[str], Opt("wireguard (natctl runs it) or openvpn (ccd files). (default: wireguard)")] = None,
    interface: Annotated[Optional[str], Opt("WireGuard interface natctl owns. (default: natctl-wg)")] = None,
    subnet: Annotated[Optional[str], Opt("VPN subnet; the relay takes its first address. (default: 10.77.0.0/24)")] = None,
    listen_port: Annotated[Optional[str], Opt("The VPN's UDP port. (default: 51820, OpenVPN 1194)")] = None,
    ports: Annotated[Optional[str], Opt("Public ports for GMs, LOW-HIGH. (default: 1802-1901)")] = None,
    endpoint: Annotated[Optional[str], Opt("Host name GMs dial. (default: the relay IP)")] = None,
    openvpn_ccd: Annotated[Optional[str], Opt("OpenVPN client-config-dir.")] = None,
    openvpn_pki: Annotated[Optional[str], Opt("easy-rsa PKI with ca.crt, issued/NAME.crt, private/NAME.key.")] = None,
    openvpn_status: Annotated[Optional[str], Opt("OpenVPN status file (version 2 or 3).")] = None,
) -> None:
    """Settings: the [gm] table of /etc/natctl/natctl.toml, then NATCTL_GM_* variables, then these options."""
    ctx.obj = ctx.obj or {}
    ctx.obj.setdefault("tables", {})["gm"] = {k: v for k, v in dict(
        vpn=vpn, interface=interface, subnet=subnet, listen_port=listen_port, ports=ports, endpoint=endpoint,
        openvpn_ccd=openvpn_ccd, openvpn_pki=openvpn_pki, openvpn_status=openvpn_status).items() if v is not None}


def gms(ctx: typer.Context) -> GmService:
    """The GM service over the invocation's reconciler; its settings are the [gm] table (imported late: startup time)."""
    from natctl.gm.service import GmService

    return GmService(service(ctx).rec)


@app.command("add")
def add(
    ctx: typer.Context,
    name: NameArg,
    port: Annotated[Optional[str], typer.Option(help="Public port for this GM (inside the GM range).")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Write the client config here (mode 0600) "
                                               "instead of printing it.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a GM: a fixed VPN address, a public port and a VPN peer; prints the GM's client config."""
    view, config = gms(ctx).add(parse_name(name, "GM name"), parse_port(port) if port else None,
                                deliver=None if as_json and out is None else deliver_config(out))
    if as_json:  # the config (it holds the GM's private key) is in the JSON unless it went to --out
        from dataclasses import asdict

        emit_json({**asdict(view), **({"config_file": out} if out else {"config": config})})
    elif out:
        say(f"GM {view.name}: VPN address {view.address}, players use {view.relay}; config written to {out}")


@app.command("remove")
def remove(ctx: typer.Context, name: NameArg) -> None:
    """Remove a GM: its session ends, its peer goes, its address and port are free again."""
    gm = gms(ctx).remove(name)
    say(f"removed GM {gm.name} (address {gm.address}, port {gm.port} are free)")


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List GMs with their sessions and tunnels."""
    rows = gms(ctx).list()
    if as_json:
        emit_json(rows)
        return
    table("game masters", ["name", "vpn", "address", "players use", "tunnel", "session", "expires"],
          [(g.name, g.vpn, g.address, g.relay, g.tunnel, f"{g.proto} -> :{g.game_port}" if g.session else "-",
            when(g.expires)) for g in rows], empty="no GMs: add one with 'natctl gm add NAME'")


@app.command("open")
def open_(
    ctx: typer.Context,
    name: NameArg,
    for_: Annotated[str, typer.Option("--for", help="Session length, e.g. 4h or 90m.")] = "4h",
    game_port: Annotated[str, typer.Option(help="The port the game listens on at the GM's.")] = "1802",
    proto: Annotated[str, typer.Option(help="tcp (FG Classic), udp, or both (FG Unity LAN).")] = "tcp",
    as_json: JsonOpt = False,
) -> None:
    """Open a session: public port -> the GM's VPN address, until it expires or is closed."""
    view = gms(ctx).open(name, parse_duration(for_), parse_port(game_port, "game port"),
                         parse_proto(proto, FORWARD_PROTOS))
    if as_json:
        emit_json(view)
    else:
        say(f"session open for {format_duration(parse_duration(for_))}: players connect to {view.relay} "
            f"({view.proto}), which reaches {view.name} at {view.address}:{view.game_port}")


@app.command("close")
def close(ctx: typer.Context, name: NameArg) -> None:
    """Close a GM's session now; its connections stop."""
    fwd = gms(ctx).close(name)
    say(f"session of {name} closed (port {fwd.port})")


@app.command("up")
def up(ctx: typer.Context) -> None:
    """Start the VPN interface with every GM's peer (after a reboot, say); safe to repeat."""
    count = gms(ctx).up()
    say(f"VPN up with {count} GM(s)")


@app.command("down")
def down(ctx: typer.Context) -> None:
    """Stop natctl's WireGuard interface (GMs and sessions stay in the store; 'gm up' restores)."""
    say("VPN interface removed" if gms(ctx).down() else "VPN interface was not up")


def join(
    relay: Annotated[str, typer.Argument(help="The GM's public address, RELAY:PORT (host name or IP).")],
    local: Annotated[str, typer.Option(help="Where the game connects.")] = "127.0.0.1:1802",
    proto: Annotated[str, typer.Option(help="tcp, udp or both.")] = "both",
) -> None:
    """Player side: relay 127.0.0.1:1802 to a GM's public port until Ctrl-C (no admin rights, leaves nothing)."""
    from natctl import join as joiner

    raise typer.Exit(joiner.main([relay, "--local", local, "--proto", parse_proto(proto, FORWARD_PROTOS)]))
