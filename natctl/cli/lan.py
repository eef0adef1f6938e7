"""natctl lan ..."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer

from natctl.cli.common import JsonOpt, deliver_config, say, service
from natctl.model import format_duration, parse_duration, parse_name
from natctl.output import emit_json, human_bytes, table, when

if TYPE_CHECKING:
    from natctl.lan.member import Machine
    from natctl.lan.service import LanService

app = typer.Typer(rich_markup_mode=None, help="A virtual LAN per lobby: LAN-only games find each other through the "
                  "relay (every member a virtual IP; broadcasts and multicast fanned out by the relay's kernel).",
                  no_args_is_help=True)
instance_app = typer.Typer(rich_markup_mode=None, help="Several instances of a game on one Linux machine, each in "
                           "its own network namespace with its own tunnel and virtual IP.", no_args_is_help=True)
app.add_typer(instance_app, name="instance")

LanArg = Annotated[str, typer.Argument(help="The LAN's name.")]
MemberArg = Annotated[str, typer.Argument(help="The member's name: letters, digits, '.', '_', '-'.")]
MachineOpt = Annotated[Optional[str], typer.Option("--machine-ns", hidden=True,
                                                   help="Labs: the network namespace that plays the machine.")]
Command = Annotated[list[str], typer.Argument(help="The program and its arguments, after --.")]


def Opt(help: str) -> Any:  # noqa: N802 - reads like typer.Option
    return typer.Option(help=help, show_default=False)


@app.callback()
def options(
    ctx: typer.Context,
    interface: Annotated[Optional[str], Opt("The relay's WireGuard interface for LANs. (default: natctl-lan)")] = None,
    listen_port: Annotated[Optional[str], Opt("Its UDP port. (default: 51821)")] = None,
    pool: Annotated[Optional[str], Opt("Where LAN subnets come from. (default: 10.198.0.0/16)")] = None,
    endpoint: Annotated[Optional[str], Opt("Host name members dial. (default: the relay IP)")] = None,
) -> None:
    """Settings: NATCTL_LAN_* variables (and the [lan] table of the config file), then these options."""
    ctx.obj = ctx.obj or {}
    ctx.obj.setdefault("tables", {})["lan"] = {k: v for k, v in dict(
        interface=interface, listen_port=listen_port, pool=pool, endpoint=endpoint).items() if v is not None}


def lans(ctx: typer.Context) -> LanService:
    """The LANs over this command's Reconciler; its settings hold the [lan] table and this group's options."""
    from natctl.lan.service import LanService

    return LanService(service(ctx).rec)


def _machine(netns: str | None) -> Machine:
    from natctl.lan.member import Machine

    return Machine(netns)


# --- the relay's side


@app.command("create")
def create(
    ctx: typer.Context,
    name: LanArg,
    subnet: Annotated[Optional[str], Opt("The LAN's subnet (CIDR). (default: the next free /24 of the pool)")] = None,
    ttl: Annotated[str, typer.Option(help="The LAN closes after this long.")] = "6h",
    max_members: Annotated[Optional[int], Opt("Members at most. (default: 64)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a LAN; prints its join token (shown once: members join with it)."""
    view, token = lans(ctx).create(parse_name(name, "LAN name"), subnet, parse_duration(ttl), max_members)
    if as_json:
        from dataclasses import asdict

        emit_json({**asdict(view), "token": token})
        return
    say(f"LAN {view.name}: subnet {view.subnet}, up to {view.max_members} members, closes in "
        f"{format_duration(parse_duration(ttl))}")
    say(f"members join with: natctl lan join {service(ctx).relay_ip} {token}")
    say(f"token: {token}")


@app.command("close")
def close(ctx: typer.Context, name: LanArg) -> None:
    """Close a LAN: its members' tunnels stop, its subnet is free again."""
    lan = lans(ctx).close(name)
    say(f"closed LAN {lan.name} ({lan.subnet})")


@app.command("list")
def list_(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List LANs."""
    rows = lans(ctx).lans()
    if as_json:
        emit_json(rows)
        return
    table("LANs", ["name", "subnet", "members", "max", "expires", "endpoint"],
          [(x.name, x.subnet, x.members, x.max_members, when(x.expires), x.endpoint) for x in rows],
          empty="no LANs: create one with 'natctl lan create NAME'")


@app.command("members")
def members(ctx: typer.Context, name: LanArg, as_json: JsonOpt = False) -> None:
    """A LAN's members: virtual IP, tunnel, handshake age, bytes each way, broadcasts fanned out."""
    import time

    rows = lans(ctx).members(name)
    if as_json:
        emit_json(rows)
        return
    now = time.time()
    table(f"members of {name}", ["name", "address", "tunnel", "handshake", "from", "rx bytes", "tx bytes",
                                 "broadcasts"],
          [(m.name, m.address, m.tunnel, format_duration(now - m.last_handshake) + " ago" if m.last_handshake else "-",
            m.endpoint, human_bytes(m.rx_bytes) if m.rx_bytes is not None else None,
            human_bytes(m.tx_bytes) if m.tx_bytes is not None else None, m.broadcasts) for m in rows],
          empty=f"no members yet: they join with 'natctl lan join RELAY TOKEN' (or: natctl lan add {name} NAME)")


@app.command("add")
def add(
    ctx: typer.Context,
    name: LanArg,
    member: MemberArg,
    out: Annotated[Optional[str], typer.Option("--out", help="Write the member's WireGuard config here (mode 0600) "
                                               "instead of printing it.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a member by hand; prints (or writes) its WireGuard config, private key included."""
    from natctl.lan.service import parse_member_name

    deliver = None if as_json and out is None else deliver_config(out)
    view, config = lans(ctx).add(name, parse_member_name(member), deliver=deliver)
    if as_json:
        from dataclasses import asdict

        emit_json({**asdict(view), **({"config_file": out} if out else {"config": config})})
    elif out:
        say(f"member {view.name} of LAN {view.lan}: virtual IP {view.address}; config written to {out}")


@app.command("remove")
def remove(ctx: typer.Context, name: LanArg, member: MemberArg) -> None:
    """Remove a member: its peer goes, its address is free again."""
    m = lans(ctx).remove(name, member)
    say(f"removed {m.name} ({m.address}) from LAN {name}")


@app.command("up")
def up(ctx: typer.Context) -> None:
    """Rebuild the relay's LAN interface, routes and rules from the store (after a reboot); safe to repeat."""
    say(f"LAN interface up with {lans(ctx).up()} member(s)")


@app.command("down")
def down(ctx: typer.Context) -> None:
    """Remove the relay's LAN interface and rules (LANs stay in the store; 'lan up' restores)."""
    say("LAN interface removed" if lans(ctx).down() else "LAN interface was not up")


# --- a member's side


@app.command("join")
def join(
    relay: Annotated[str, typer.Argument(help="The relay, HOST or HOST:PORT (its registration port, default 8809).")],
    token: Annotated[str, typer.Argument(help="The LAN's token.")],
    name: Annotated[Optional[str], Opt("Your name in the LAN. (default: this machine's name)")] = None,
    out: Annotated[Optional[str], typer.Option("--out", help="Write a WireGuard config here (mode 0600) instead of "
                                               "bringing the tunnel up (Windows, macOS, Android: import it).")] = None,
    tunnel: Annotated[str, typer.Option(help="Linux: the tunnel's name ('natctl lan instance down' it).")] = "lan",
    machine_ns: MachineOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Join a LAN with its token: a key pair made here, a virtual IP from the relay; tunnel up (Linux) or a config."""
    from natctl.lan import member as mb
    from natctl.lan.service import parse_member_name

    who = parse_member_name(name) if name else mb.default_name()
    if out is None and not sys.platform.startswith("linux"):
        out = f"natctl-lan-{who}.conf"
    if out is None:
        mb.check_instance_name(tunnel)
    cfg = mb.join(relay, token, who, machine_ns)
    if out is not None:
        deliver_config(out)(mb.config_text(cfg))
        if as_json:
            emit_json({"member": who, "address": cfg.address, "subnet": cfg.subnet, "mtu": cfg.mtu,
                       "config_file": out})
        else:
            say(f"joined as {who}: virtual IP {cfg.address}/{cfg.prefixlen}; WireGuard config written to {out}")
        return
    names = mb.up(cfg, tunnel, instance=False, machine=_machine(machine_ns))
    if as_json:
        emit_json({"member": who, "address": cfg.address, "subnet": cfg.subnet, "mtu": cfg.mtu,
                   "interface": names.game, "tunnel": names.tunnel})
    else:
        say(f"joined as {who}: virtual IP {cfg.address}/{cfg.prefixlen} on {names.game} (MTU {cfg.mtu}); "
            f"remove with: natctl lan instance down {tunnel}")


@instance_app.command("up")
def instance_up(
    token_or_config: Annotated[str, typer.Argument(help="The LAN's token (with --relay), or a config file.")],
    name: Annotated[str, typer.Option("--name", help="The instance's name (1-11 of a-z 0-9 - _).")],
    relay: Annotated[Optional[str], Opt("The relay, HOST[:PORT], when joining by token.")] = None,
    member: Annotated[Optional[str], Opt("Your name in the LAN. (default: MACHINE-INSTANCE)")] = None,
    machine_ns: MachineOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Give one instance its own namespace, whose only way out is its own tunnel with its own virtual IP."""
    from natctl.errors import UsageError
    from natctl.lan import member as mb

    mb.check_instance_name(name)
    if os.path.isfile(token_or_config):
        with open(token_or_config) as fh:
            cfg = mb.parse_config(fh.read())
    elif relay is None:
        raise UsageError(f"{token_or_config!r} is not a config file", "to join by token, say where: --relay HOST")
    else:
        from natctl.lan.service import parse_member_name

        cfg = mb.join(relay, token_or_config, parse_member_name(member) if member else mb.default_name(name),
                      machine_ns)
    names = mb.up(cfg, name, instance=True, machine=_machine(machine_ns))
    if as_json:
        emit_json({"name": name, "namespace": names.ns, "address": cfg.address, "subnet": cfg.subnet,
                   "mtu": cfg.mtu, "interface": names.game, "tunnel": names.tunnel})
    else:
        say(f"instance {name}: namespace {names.ns}, {cfg.address}/{cfg.prefixlen} on {names.game} (MTU {cfg.mtu}); "
            f"run a program in it: natctl lan instance run {name} -- COMMAND")


@instance_app.command("run")
def instance_run(
    name: Annotated[str, typer.Argument(help="The instance.")],
    command: Command,
    user: Annotated[Optional[str], Opt("Run as this user. (default: the user who ran sudo; else root)")] = None,
) -> None:
    """Run a program in an instance as the calling user (not root) until it exits."""
    from natctl.lan import member as mb

    raise typer.Exit(mb.run_in(name, command, user))


@instance_app.command("down")
def instance_down(name: Annotated[str, typer.Argument(help="The instance (or 'lan join' tunnel).")],
                  machine_ns: MachineOpt = None) -> None:
    """Remove an instance (or a 'lan join' tunnel) and everything it made."""
    from natctl.errors import NotFound
    from natctl.lan import member as mb

    gone = mb.down(mb.check_instance_name(name), _machine(machine_ns))
    if not gone:
        raise NotFound(f"no instance {name!r} is up", "see 'natctl lan instance list'")
    say(f"removed {', '.join(gone)}")


@instance_app.command("list")
def instance_list(as_json: JsonOpt = False) -> None:
    """Instances up on this machine (their namespaces)."""
    names = sorted(n[len("natctl-"):] for n in (os.listdir("/run/netns") if os.path.isdir("/run/netns") else [])
                   if n.startswith("natctl-"))
    if as_json:
        emit_json(names)
    else:
        say("\n".join(names) if names else "no instances")


@app.command("play")
def play(
    relay: Annotated[str, typer.Argument(help="The relay, HOST or HOST:PORT.")],
    token: Annotated[str, typer.Argument(help="The LAN's token.")],
    command: Command,
    name: Annotated[Optional[str], Opt("The instance's name. (default: a random one)")] = None,
    member: Annotated[Optional[str], Opt("Your name in the LAN. (default: MACHINE-INSTANCE)")] = None,
    user: Annotated[Optional[str], Opt("Run as this user. (default: the user who ran sudo; else root)")] = None,
    machine_ns: MachineOpt = None,
) -> None:
    """Join, run the game in its own instance, and remove the instance when it exits (or on Ctrl-C)."""
    from natctl.lan import member as mb
    from natctl.lan.service import parse_member_name

    raise typer.Exit(mb.play(relay, token, command, name, parse_member_name(member) if member else None, user,
                             _machine(machine_ns)))
