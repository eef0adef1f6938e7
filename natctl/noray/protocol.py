"""noray's protocol, as its clients (netfox's Noray for Godot) speak it (pure; read from noray's
public docs and source, no code taken).

TCP, one command a line: ``cmd data\\n`` or ``cmd\\n`` (UTF-8, no ``\\r``):

    register-host            -> set-oid <21 chars>, set-pid <128 chars>
    connect <oid>            -> both sides: connect <ip:port>   (the other's address on the UDP registrar)
    connect-relay <oid>      -> client: connect-relay <host's relay port>, host: connect-relay <client's relay port>
    echo <data>              -> echo <data>

UDP: the game sends its pid as a datagram from its game socket to the registrar port (8809) and
gets exactly ``OK`` each time. Unknown oids, peers without a UDP registration and unknown commands
get no line at all; the connection stays open.
"""

from __future__ import annotations

import secrets
import string

OID_LENGTH, PID_LENGTH = 21, 128
ALPHABET = string.ascii_letters + string.digits + "_-"  # nanoid's url alphabet, as noray uses
MAX_LINE = 1024  # bytes: noray's own commands are under 200; longer lines close the connection
OK = b"OK"
UNKNOWN_PID = b"ERR"  # anything but OK fails netfox's registration; never longer than the datagram


def new_id(length: int) -> str:
    """A random id of noray's alphabet; never starts with natctl's magic, so the registrar port
    tells a pid from natctl's own messages by their first bytes."""
    while True:
        value = "".join(secrets.choice(ALPHABET) for _ in range(length))
        if not value.startswith("NATC"):
            return value


def parse_line(raw: bytes) -> tuple[str, str] | None:
    """(command, data) of one line without its newline; None if it is not text."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not line.isprintable():
        return None
    command, _, data = line.partition(" ")
    return command, data


def line(command: str, data: object | None = None) -> bytes:
    return (f"{command} {data}\n" if data is not None else f"{command}\n").encode()


def is_pid(data: bytes) -> bool:
    """Could this datagram be a pid (so the registrar answers it, and never natctl's decoder)?"""
    return 0 < len(data) <= 256 and not data.startswith(b"NATC")


def pid_reply(known: bool, size: int) -> bytes | None:
    """What a pid datagram of ``size`` bytes gets: OK, or a short refusal that is never larger
    than what was sent (noray answers 17 bytes to anything, even an empty datagram)."""
    if known:
        return OK
    return UNKNOWN_PID if size >= len(UNKNOWN_PID) else None
