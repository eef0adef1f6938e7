"""Root command, global options, and the commands that act on the whole relay."""

from __future__ import annotations

import time
from typing import Annotated, Optional

import typer

from natctl import __version__
from natctl.cli.common import JsonOpt, say, service
from natctl.cli.lazy import LazyGroup
from natctl.output import emit_json, table

app = typer.Typer(rich_markup_mode=None, cls=LazyGroup,
    name="natctl",
    help="Relay game traffic through the kernel: many lobbies on one public IP.\n\n"
    "Start with 'natctl demo' to see it work in a throwaway network of namespaces.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
# The other commands (lobby, map, gm, serve...) are natctl.cli.lazy's: imported when they run.


def _version(value: bool) -> None:
    if value:
        say(f"natctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    state: Annotated[Optional[str], typer.Option(metavar="PATH", help="Store file (SQLite). (default: /var/lib/natctl/natctl.db)",
                                                 show_default=False)] = None,
    relay_ip: Annotated[Optional[str], typer.Option(metavar="IP", help="Public IPv4 of the relay. (default: address of the "
                                                    "default route's interface)", show_default=False)] = None,
    ports: Annotated[Optional[str], typer.Option(metavar="LOW-HIGH", help="Relay port range LOW-HIGH. (default: 20000-29999)",
                                                 show_default=False)] = None,
    store: Annotated[Optional[str], typer.Option(metavar="URL", help="A fleet's shared store, postgresql://... "
                                                 "(default: the SQLite file at --state)", show_default=False)] = None,
    config: Annotated[Optional[str], typer.Option(metavar="PATH", help="Config file. (default: /etc/natctl/natctl.toml)",
                                                  show_default=False)] = None,
    accel: Annotated[Optional[str], typer.Option(metavar="MODE", help="XDP accelerator: xdp, none or auto (XDP when the "
                                                 "interface takes it). (default: auto)", show_default=False)] = None,
    interface: Annotated[Optional[str], typer.Option(metavar="NAME", help="Interface for XDP. (default: the default route's "
                                                     "interface)", show_default=False)] = None,
    adopt: Annotated[bool, typer.Option("--adopt", help="Take over the kernel's table when another store owns "
                                        "it: this store's mappings replace the others' (NATCTL_ADOPT=1).")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Settings come from the config file, then NATCTL_* variables, then these options."""
    ctx.obj = ctx.obj or {}
    ctx.obj["overrides"] = {"state": state, "store": store, "relay_ip": relay_ip, "ports": ports, "accel": accel,
                            "interface": interface, "adopt": True if adopt else None}
    ctx.obj["config"] = config


AdoptOpt = Annotated[bool, typer.Option("--adopt", help="Take over the kernel's table when another store owns it "
                                         "(the same as 'natctl --adopt apply').")]


@app.command()
def apply(ctx: typer.Context, as_json: JsonOpt = False, adopt: AdoptOpt = False) -> None:
    """Make the kernel hold exactly what the store says (safe to repeat)."""
    if adopt:
        ctx.find_root().obj["overrides"]["adopt"] = True
    result = service(ctx).apply()
    if as_json:
        emit_json(result)
    elif result.changed:
        say(f"applied in one transaction ({result.backend}): +{result.added} -{result.deleted} elements"
            + (", table created" if result.created_table else "") + f" in {result.seconds * 1000:.1f} ms")
    else:
        say("nothing to do: the kernel already matches the store" + (
            " (nftables unchanged since natctl's last write: its ruleset generation says so)"
            if result.checked == "ruleset" else ""))


@app.command()
def status(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """What is installed, with packet and byte counters per mapping and forward."""
    svc = service(ctx)
    # The same listings as 'map list' and 'forward list'.
    maps_ = svc.mappings(counters=True)
    fwds = svc.forwards(counters=True)
    lobbies = svc.lobbies()
    from natctl.cli import doctor
    from natctl.model import format_duration
    from natctl.views import cell

    failing = doctor.failing(svc.settings)
    if as_json:
        emit_json({"relay_ip": svc.relay_ip, "backend": svc.kernel.name, "lobbies": lobbies,
                   "mappings": maps_, "forwards": fwds, "failing_checks": failing})
        return
    say(f"relay {svc.relay_ip}, backend {svc.kernel.name}, {len(lobbies)} lobbies, "
        f"{len(maps_)} mappings, {len(fwds)} forwards")
    if failing:
        say(f"failing checks: {', '.join(failing)} (run 'natctl doctor')")
    now = time.time()
    if lobbies:
        table("lobbies", ["name", "host", "host port", "clients", "expires in"],
              [(lb.name, lb.host, lb.host_port, lb.clients, format_duration(lb.expires - now) if lb.expires else "-")
               for lb in lobbies])
    # Idle time is measured from kernel counters by each cleanup run (daemon or cron).
    xdp = "xdp" in svc.kernel.name  # then the packet counts include XDP's share, shown apart
    table("mappings", ["lobby", "proto", "client", "host", "host port", "client port", "installed",
                       "to host packets", "to client packets", "idle"]
          + (["by xdp to host packets", "by xdp to client packets"] if xdp else []),
          [(m.lobby, m.proto, m.client, m.host, m.host_port, m.client_port, cell(m.installed),
            cell(m.to_host_packets), cell(m.to_client_packets),
            format_duration(now - m.last_seen) if m.last_seen else "-")
           + ((cell(m.xdp_to_host_packets), cell(m.xdp_to_client_packets)) if xdp else ())
           for m in maps_])
    if fwds:
        table("forwards", ["public port", "proto", "to", "ttl", "installed", "packets"],
              [(f.port, f.proto, f.to, format_duration(f.ttl), cell(f.installed), cell(f.packets))
               for f in fwds])


@app.command()
def cleanup(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Remove what has expired (lobby and forward TTLs), once; for cron and the systemd timer."""
    gone = service(ctx).cleanup()
    if as_json:
        emit_json(gone)
    else:
        say(f"closed {len(gone['lobbies'])} expired lobbies, removed {len(gone['forwards'])} expired forwards "
            f"and {len(gone['idle'])} idle mappings")


@app.command()
def uninstall(ctx: typer.Context) -> None:
    """Remove everything natctl installed in the kernel; the store stays ('natctl apply' restores)."""
    svc = service(ctx)
    if svc.uninstall():
        say("removed table inet natctl" + (" and the XDP program" if getattr(svc.kernel, "detached", False) else ""))
    else:
        say("nothing installed")


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="Leave the lab up after the demo (remove it with Ctrl-C).")] = False,
    fleet: Annotated[bool, typer.Option("--fleet", help="Three relays on one throwaway PostgreSQL instead: "
                                        "placement, one relay killed, the database stopped.")] = False,
) -> None:
    """Build a lab of network namespaces, relay real UDP and TCP through it, check every byte, clean up."""
    if fleet:
        from natctl.demo_fleet import main as fleet_demo

        raise typer.Exit(fleet_demo(keep=keep))
    from natctl.demo import main

    raise typer.Exit(main(keep=keep))
