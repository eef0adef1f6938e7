"""The natctl command line: a thin layer over natctl.service."""

from __future__ import annotations

import sys

from natctl.cli.app import app
from natctl.errors import NatctlError


def main() -> None:
    """Entry point: one line on stderr and a non-zero exit for every known failure."""
    try:
        app()
    except NatctlError as err:
        print(f"natctl: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("natctl: interrupted", file=sys.stderr)
        sys.exit(130)
