"""A client of the daemon's control socket (natctl.daemon.control): plain sockets and JSON, nothing else.

    with Control("/var/lib/natctl/natctl.db.sock") as ctl:
        token = ctl.call("lobby.create", name="match-17", open=True)["token"]
        ctl.call("lobby.close", name="match-17")

A refused request raises ``ControlError``, a NatctlError with the CLI's exit
code and message. ``many`` sends a batch at once and reads the answers after
(the rate the bench measures).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from natctl.errors import NatctlError

if TYPE_CHECKING:
    from natctl.config import Settings

SUFFIX = ".sock"  # beside the store: STATE.sock
OFF = ("off", "none", "no", "false")


def socket_path(settings: Settings) -> str | None:
    """Where the daemon's control socket is (the ``control_socket`` setting); None when it is off."""
    if settings.control_socket.strip().lower() in OFF:
        return None
    return settings.control_socket or settings.state + SUFFIX


def expectations(settings: Settings) -> dict[str, Any]:
    """What a change depends on besides its own fields: the CLI hands its change to the daemon only if the
    daemon runs with the same (same store, relay address and ports, backend), else makes it itself."""
    return {"state": os.path.realpath(settings.state), "relay_ip": settings.relay_ip, "ports": str(settings.ports),
            "registration_port": settings.registration_port, "accel": settings.accel,
            "interface": settings.interface, "fix_forwarding": settings.fix_forwarding}


class ControlError(NatctlError):
    """The daemon refused a request: ``exit_code`` and the message are the CLI's for the same failure."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = code


class Control:
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError as err:
            self.sock.close()
            raise NatctlError(f"cannot reach the daemon's control socket {path} ({err.strerror or err})",
                              "is 'natctl serve' running on this store, as root?") from None
        self.reader = self.sock.makefile("rb")

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def send(self, requests: Iterable[dict[str, Any]]) -> None:
        self.sock.sendall(b"".join(json.dumps(r).encode() + b"\n" for r in requests))

    def receive(self) -> dict[str, Any]:
        line = self.reader.readline()
        if not line:
            raise NatctlError(f"the daemon closed the control socket {self.path}", "see its log")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def many(self, requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send all, then read one response per request (in order): raw responses, errors included."""
        self.send(requests)
        return [self.receive() for _ in requests]

    def call(self, op: str, **fields: Any) -> Any:
        """One request; its result, or ControlError."""
        self.send([{"op": op, **fields}])
        reply = self.receive()
        if not reply.get("ok"):
            raise ControlError(int(reply.get("code", 1)), str(reply.get("error", "")))
        return reply.get("result")


def through_daemon(settings: Settings, op: str, fields: dict[str, Any], timeout: float = 120.0) -> tuple[bool, Any]:
    """Have the running daemon make a change, as the CLI would make it: (True, its result), or (False, None)
    when no daemon of these settings answers on the socket (none runs, not root, other settings):
    nothing was changed then, and the caller makes the change itself. Its refusal raises ControlError."""
    path = socket_path(settings)
    if path is None or not os.path.exists(path):
        return False, None
    try:
        ctl = Control(path, timeout=2.0)
    except NatctlError:  # not listening (a stale socket), or not ours to use (not root)
        return False, None
    try:
        ctl.sock.settimeout(timeout)
        ctl.send([{"op": op, **fields, "expect": expectations(settings)}])
        reply = ctl.receive()
    finally:
        ctl.close()
    if reply.get("mismatch"):
        return False, None
    if not reply.get("ok"):
        raise ControlError(int(reply.get("code", 1)), str(reply.get("error", "")))
    return True, reply.get("result")
