"""What every command shares: the service built from global options, and the output switches."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from natctl import config
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
        obj["service"] = Service(settings(ctx), kernel_factory=obj.get("kernel_factory"))
        ctx.find_root().call_on_close(obj["service"].close)
    return obj["service"]


def say(text: str) -> None:
    typer.echo(text)


def warn(text: str) -> None:
    typer.echo(f"natctl: warning: {text}", err=True)
