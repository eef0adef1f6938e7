"""What every command shares: the service built from global options, and the output switches."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from natctl.cli import direct

if TYPE_CHECKING:
    from natctl.config import Settings
    from natctl.service import Service

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts (stable keys, see README).")]
NoApplyOpt = Annotated[bool, typer.Option("--no-apply", help="Change the store only; 'natctl apply' installs later.")]


def settings(ctx: typer.Context, **extra: Any) -> Settings:
    """Settings from the config file, NATCTL_* variables, global options and ``extra`` (a command's own).

    Tables' options (``natctl gm --subnet ...``) are kept in ``obj["tables"]`` by their group's callback."""
    return direct.settings(shared(ctx), **extra)


def shared(ctx: typer.Context) -> dict[str, Any]:
    """What the commands of one invocation share (natctl.cli.direct): the root context's obj, the global
    options in it; a service built there is closed with the root context."""
    root = ctx.find_root()
    obj: dict[str, Any] = root.obj
    if "natctl.close" not in root.meta:  # once per invocation
        root.meta["natctl.close"] = True
        root.call_on_close(lambda: direct.close(obj))
    return obj


def service(ctx: typer.Context) -> Service:
    """One Service per invocation, built on first use from the global options."""
    return direct.service(shared(ctx))


def through_daemon(ctx: typer.Context, op: str, no_apply: bool = False, **fields: Any) -> tuple[bool, Any]:
    """Hand a change to the running daemon when one serves this store with these settings (see
    natctl.cli.direct.through_daemon): (True, its result), or (False, None) and the command makes it itself."""
    return direct.through_daemon(shared(ctx), op, no_apply, **fields)


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
