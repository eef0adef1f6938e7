"""The natctl command line: a thin layer over natctl.service.

A command costs what it needs: each module imports what only some commands
use (rich, pyroute2, the daemon, the GMs' VPN, the nftables binding) inside
the functions that use it, and typer's pydantic coercion is skipped for the
plain text and flag options natctl declares (tests/unit/test_imports.py pins both).
What scripts run most (``map add``, ``map remove``) is run without typer at all
when its command line is plain (natctl.cli.direct); typer has the rest.
"""

from __future__ import annotations

import sys
from typing import Any, Optional

from natctl.cli import direct
from natctl.errors import NatctlError

# Annotations whose values click already hands over as they are: typer would build a pydantic
# TypeAdapter for each (importing pydantic costs a command ~100 ms) only to check that a str is a str.
PLAIN = (str, Optional[str], list[str], Optional[list[str]], bool, Optional[bool])


def _plain_values() -> None:
    """Have typer pass click's value through for text and flag parameters (see PLAIN).

    typer builds each parameter's coercion lazily with ``typer.core.build_runtime_param``
    (also for the --help option it makes while parsing); this wraps it once per process. If a
    typer release drops that function, nothing changes here and typer coerces as it always
    did, only slower: tests/unit/test_imports.py says so."""
    try:
        import typer.core
        from typer._coercion import RuntimeParam
    except ImportError:
        return
    build = getattr(typer.core, "build_runtime_param", None)
    if build is None or getattr(build, "natctl_plain", False):
        return

    class Plain(RuntimeParam):
        def _coerce_value(self, value: Any, param: Any, ctx: Any) -> Any:
            return list(value) if isinstance(value, tuple) else value

    def plain_or_typer(desc: Any) -> Any:
        if desc.annotation in PLAIN and desc.file_annotation is None and not desc.is_choice:
            return Plain(parameter_info=desc.parameter_info, annotation=desc.annotation)
        return build(desc)

    plain_or_typer.natctl_plain = True  # type: ignore[attr-defined]
    typer.core.build_runtime_param = plain_or_typer  # type: ignore[assignment]


def command() -> Any:
    """natctl's click command, ready to run."""
    import typer.main

    from natctl.cli.app import app
    from natctl.cli.lazy import metavars

    cmd = typer.main.get_command(app)
    metavars(cmd)
    _plain_values()
    return cmd


def main() -> None:
    """Entry point: one line on stderr and a non-zero exit for every known failure."""
    try:
        if direct.run(sys.argv[1:]):
            return
        command()(prog_name="natctl")
    except NatctlError as err:
        print(f"natctl: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("natctl: interrupted", file=sys.stderr)
        sys.exit(130)
