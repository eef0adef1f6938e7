"""IP forwarding, the one kernel switch a relay needs on: turned on before natctl first writes mappings.

A fresh VPS has ``net.ipv4.ip_forward=0``: the daemon then delivers a client's first packet itself and
the kernel forwards nothing after it, without a word. ``ensure_forwarding`` runs once per process before
its first kernel write (natctl.sync); natctl.preflight checks the same switch, with the rest, for
``natctl doctor``. Apart from preflight so that a command pays for this check, not for doctor's.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

from natctl.errors import ForwardingOff

if TYPE_CHECKING:
    from natctl.config import Settings

SYSCTL_DROPIN = "60-natctl.conf"  # in /etc/sysctl.d: read at boot by systemd-sysctl
DROPIN_TEXT = "# written by 'natctl install-units': the relay forwards packets\nnet.ipv4.ip_forward = 1\n"
TURN_ON = "sysctl -w net.ipv4.ip_forward=1"


def read_int(path: str) -> int | None:
    """A /proc/sys (or sysfs) file's integer; None when it cannot be read or holds something else."""
    try:
        with open(path) as fh:
            text = fh.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def ensure_forwarding(settings: Settings, root: str = "/") -> None:
    """Before natctl's first kernel write: turn IP forwarding on (saying so once), or refuse."""
    path = os.path.join(root, "proc/sys/net/ipv4/ip_forward")
    if read_int(path) == 1:
        return
    off = "IP forwarding is off (net.ipv4.ip_forward=0), so the relay would forward nothing"
    if not settings.fix_forwarding:
        raise ForwardingOff(off, f"run '{TURN_ON}' (and 'natctl install-units' to keep it on), "
                            "or set fix_forwarding = true")
    try:
        with open(path, "w") as fh:
            fh.write("1\n")
    except OSError as err:
        raise ForwardingOff(f"{off}, and natctl cannot turn it on ({err.strerror or err})",
                            f"run '{TURN_ON}' as root") from None
    print(f"natctl: turned IP forwarding on (net.ipv4.ip_forward=1) until the next reboot; "
          f"'natctl install-units' keeps it on (/etc/sysctl.d/{SYSCTL_DROPIN})", file=sys.stderr)
