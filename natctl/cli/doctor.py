"""natctl doctor: can this machine relay? Every check of natctl.preflight, with its fix."""

from __future__ import annotations

import typer

from natctl import preflight
from natctl.cli.common import JsonOpt, say, settings
from natctl.config import Settings
from natctl.output import emit_json


def doctor(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """Check what relaying needs (IP forwarding, rp_filter, conntrack, NAT, the relay IP); exit 1 if one fails."""
    checks = preflight.evaluate(preflight.gather(settings(ctx)))
    if as_json:
        emit_json([{"name": c.name, "status": c.status, "ok": c.ok, "detail": c.detail, "fix": c.fix} for c in checks])
    else:
        width = max(len(c.name) for c in checks)
        for c in checks:
            say(f"{c.status:<4}  {c.name:<{width}}  {c.detail}")
            if not c.ok and c.fix:
                say(f"{'':<{width + 6}}  fix: {c.fix}")
    if any(c.status == "fail" for c in checks):
        raise typer.Exit(1)


def failing(cfg: Settings) -> list[str]:
    """The names of the checks that fail (warnings are for natctl doctor alone)."""
    return [c.name for c in preflight.evaluate(preflight.gather(cfg)) if c.status == "fail"]
