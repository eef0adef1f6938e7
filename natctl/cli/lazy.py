"""The root command's subcommands, imported when they run: ``natctl map add`` builds and imports
the map commands, not the GMs', the daemon's or the bench's (help lists them all, so it loads them all)."""

from __future__ import annotations

import importlib
from typing import Any

import typer
import typer.core
import typer.main

# name -> (module, attribute): a typer.Typer (a group of commands) or a function (one command).
# In the order --help lists them; the root's own commands (apply, status...) come after the functions.
FUNCTIONS = {
    "join": ("natctl.cli.gm", "join"),
    "serve": ("natctl.cli.daemon", "serve"),
    "install-units": ("natctl.cli.daemon", "install_units"),
    "bench": ("natctl.cli.bench", "bench"),
    "doctor": ("natctl.cli.doctor", "doctor"),
}
GROUPS = {
    "lobby": ("natctl.cli.lobby", "app"),
    "map": ("natctl.cli.maps", "app"),
    "forward": ("natctl.cli.forward", "app"),
    "gm": ("natctl.cli.gm", "app"),
    "lan": ("natctl.cli.lan", "app"),
    "relay": ("natctl.cli.relay", "app"),
}


def metavars(command: object) -> None:
    """Name option values after the option (--lobby LOBBY), not after their Python type."""
    for param in getattr(command, "params", ()):
        kind = getattr(param, "param_type_name", "")
        if kind == "option" and not getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = param.name.upper()
    for sub in getattr(command, "commands", {}).values():
        metavars(sub)


def load(name: str) -> Any:
    """The click command of a lazy subcommand (importing its module), or None if ``name`` is none."""
    where = FUNCTIONS.get(name) or GROUPS.get(name)
    if where is None:
        return None
    obj = getattr(importlib.import_module(where[0]), where[1])
    # Built as the root would build it, under a parent without shell completion options.
    parent = typer.Typer(rich_markup_mode=None, add_completion=False)
    if isinstance(obj, typer.Typer):
        parent.add_typer(obj, name=name)
        cmd = typer.main.get_command(parent).commands[name]  # type: ignore[attr-defined]
    else:  # one function: a Typer of one command is that command
        parent.command(name)(obj)
        cmd = typer.main.get_command(parent)
    metavars(cmd)
    return cmd


class LazyGroup(typer.core.TyperGroup):
    """The root group: its own commands as typer builds them, the others loaded by name on first use."""

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        cmd = super().get_command(ctx, cmd_name)
        if cmd is None:
            cmd = load(cmd_name)
            if cmd is not None:
                self.commands[cmd_name] = cmd
        return cmd

    def list_commands(self, ctx: Any) -> list[str]:
        own = [n for n in super().list_commands(ctx) if n not in FUNCTIONS and n not in GROUPS]
        return [*FUNCTIONS, *own, *GROUPS]
