"""natctl serve, and installing it as a service (systemd units, cron)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from natctl.cli.common import say, settings
from natctl.kernel.forwarding import DROPIN_TEXT, SYSCTL_DROPIN

# The unit files live in the checkout's rules/ (natctl is installed from a checkout, editable).
RULES = Path(__file__).resolve().parents[2] / "rules"


def serve(
    ctx: typer.Context,
    registration_port: Annotated[Optional[str], typer.Option(help="UDP port hosts register on. (default: 8809)",
                                                             show_default=False)] = None,
    idle_timeout: Annotated[Optional[str], typer.Option(help="Remove mappings idle this long, e.g. 5m.")] = None,
    cleanup_interval: Annotated[Optional[str], typer.Option(help="How often to clean up, e.g. 30s.")] = None,
    metrics: Annotated[Optional[str], typer.Option(help="Serve Prometheus metrics on HOST:PORT, e.g. "
                                                   "127.0.0.1:9808.")] = None,
    noray: Annotated[Optional[bool], typer.Option("--noray", help="Also speak noray's protocol (games built on "
                                                  "netfox's Noray).", show_default=False)] = None,
    noray_port: Annotated[Optional[str], typer.Option(help="noray's TCP control port. (default: 8890)",
                                                      show_default=False)] = None,
) -> None:
    """Run the relay daemon: host registration, clients admitted on their first packet, cleanup."""
    from natctl.daemon.server import serve as run

    raise typer.Exit(run(settings(ctx, registration_port=registration_port, idle_timeout=idle_timeout,
                                  cleanup_interval=cleanup_interval, metrics=metrics, noray=noray,
                                  noray_port=noray_port)))


def install_units(
    systemd_dir: Annotated[str, typer.Option(help="Where systemd units go.")] = "/etc/systemd/system",
    cron_dir: Annotated[str, typer.Option(help="Where the cron file goes (empty: skip cron).")] = "",
    sysctl_dir: Annotated[Optional[str], typer.Option(help="Where the drop-in that keeps IP forwarding on goes "
                                                      "(empty: skip it). (default: the sysctl.d beside --systemd-dir: "
                                                      "/etc/sysctl.d)", show_default=False)] = None,
) -> None:
    """Install natctl.service, natctl-cleanup.service/.timer, 60-natctl.conf (ip_forward) and optionally cron."""
    exe = shutil.which("natctl") or os.path.join(os.path.dirname(sys.executable), "natctl")
    written = []
    for name in ("natctl.service", "natctl-cleanup.service", "natctl-cleanup.timer"):
        text = (RULES / name).read_text().replace("/usr/local/bin/natctl", exe)
        dest = Path(systemd_dir) / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(text)
        written.append(str(dest))
    if cron_dir:
        dest = Path(cron_dir) / "natctl"
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text((RULES / "natctl.cron").read_text().replace("/usr/local/bin/natctl", exe))
        written.append(str(dest))
    if sysctl_dir is None:  # under the same root as the units, so a test's --systemd-dir keeps it out of /etc
        units = Path(systemd_dir)
        sysctl_dir = str((units.parent.parent if units.parts[-2:] == ("systemd", "system") else units.parent) / "sysctl.d")
    if sysctl_dir:  # read at every boot: the relay forwards before natctl's first change
        dest = Path(sysctl_dir) / SYSCTL_DROPIN
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(DROPIN_TEXT)
        written.append(str(dest))
    say("installed " + ", ".join(written))
    say("now: systemctl daemon-reload && systemctl enable --now natctl.service natctl-cleanup.timer")
