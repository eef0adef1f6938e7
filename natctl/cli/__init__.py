"""The natctl command line: a thin layer over natctl.service."""

from __future__ import annotations

import sys

from natctl.cli.app import app
from natctl.errors import NatctlError


def _metavars(command: object) -> None:
    """Name option values after the option (--lobby LOBBY), not after their Python type."""
    for param in getattr(command, "params", ()):
        kind = getattr(param, "param_type_name", "")
        if kind == "option" and not getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = param.name.upper()
    for sub in getattr(command, "commands", {}).values():
        _metavars(sub)


def main() -> None:
    """Entry point: one line on stderr and a non-zero exit for every known failure."""
    import typer.main

    command = typer.main.get_command(app)
    _metavars(command)
    try:
        command(prog_name="natctl")
    except NatctlError as err:
        print(f"natctl: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("natctl: interrupted", file=sys.stderr)
        sys.exit(130)
