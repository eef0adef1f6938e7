"""What every command shares: the service built from global options, and the output switches."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from natctl import config

if TYPE_CHECKING:
    from natctl.service import Service

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts (stable keys, see README).")]
NoApplyOpt = Annotated[bool, typer.Option("--no-apply", help="Change the store only; 'natctl apply' installs later.")]


def settings(ctx: typer.Context, **extra: Any) -> config.Settings:
    """Settings from the config file, NATCTL_* variables, global options and ``extra`` (a command's own).

    Tables' options (``natctl gm --subnet ...``) are kept in ``obj["tables"]`` by their group's callback."""
    obj: dict[str, Any] = ctx.find_root().obj
    return config.load({**obj["overrides"], **extra}, obj.get("config"), tables=obj.get("tables"))


def service(ctx: typer.Context) -> Service:
    """One Service per invocation, built on first use from the global options."""
    obj: dict[str, Any] = ctx.find_root().obj
    if "service" not in obj:
        from natctl.service import Service

        obj["service"] = Service(settings(ctx), kernel_factory=obj.get("kernel_factory"))
        ctx.find_root().call_on_close(obj["service"].close)
    return obj["service"]


def through_daemon(ctx: typer.Context, op: str, no_apply: bool = False, **fields: Any) -> tuple[bool, Any]:
    """Hand a change to the running daemon (its control socket, natctl.daemon.control) when one serves this
    store with these settings: (True, the result it made, as --json prints it). Else (False, None): nothing
    was changed, and the command makes the change itself, as without a daemon. Same errors either way."""
    obj: dict[str, Any] = ctx.find_root().obj
    if no_apply or obj.get("kernel_factory") is not None or obj["overrides"].get("adopt"):
        return False, None
    from natctl.daemon.control_client import through_daemon as call

    return call(settings(ctx), op, {k: v for k, v in fields.items() if v is not None})


def say(text: str) -> None:
    typer.echo(text)


def warn(text: str) -> None:
    typer.echo(f"natctl: warning: {text}", err=True)


def deliver_config(out: str | None) -> Callable[[str], None]:
    """Hand a VPN config (GM or LAN member) over: stdout, or a 0600 file written atomically (it holds a
    private key)."""
    def deliver(config: str) -> None:
        if out is None:
            sys.stdout.write(config)
            sys.stdout.flush()
            return
        from natctl.errors import UsageError
        from natctl.gm.render import write_atomic

        try:
            write_atomic(out, config, 0o600)
        except OSError as err:
            raise UsageError(f"cannot write {out}: {err.strerror}", "pass a writable --out path") from None

    return deliver
