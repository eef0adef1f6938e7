"""One exception type for every failure a user can act on.

The CLI prints ``str(err)`` as a single line and exits with ``err.exit_code``;
everything else (tracebacks) is a bug in natctl.
"""

from __future__ import annotations


class NatctlError(Exception):
    """A failure with a one-line message that tells the user what to do."""

    exit_code = 1

    def __init__(self, message: str, hint: str = "") -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message}: {hint}" if hint else message)


class UsageError(NatctlError):
    """Malformed input (address, port, CIDR, duration, name)."""

    exit_code = 2


class NotFound(NatctlError):
    exit_code = 3


class Conflict(NatctlError):
    """Duplicate names, colliding mappings, taken ports."""

    exit_code = 4


class Exhausted(NatctlError):
    exit_code = 5


class KernelError(NatctlError):
    """The kernel refused a change or lacks a feature; nothing was changed."""

    exit_code = 6


class Busy(NatctlError):
    """Another natctl holds the store or the daemon lock."""

    exit_code = 7


class OwnedElsewhere(Busy):
    """The kernel's table belongs to another store: changing it from this one would undo the other's
    mappings. Nothing was changed; --adopt takes the table over."""


class StoreError(NatctlError):
    """The store cannot be used: not a natctl database, or not writable. The file is left as it is."""

    exit_code = 8


class ForwardingOff(NatctlError):
    """IP forwarding is off and natctl may not (fix_forwarding = false) or cannot turn it on; nothing was changed."""

    exit_code = 9
