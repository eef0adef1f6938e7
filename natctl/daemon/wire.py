"""The registration wire format, versions 1 to 3 (pure; documented in the README).

All integers are big-endian. A request is at least as large as any reply, so
the relay never amplifies. Every message starts with the same 10 bytes:
"NATC" | version (u8) | type (u8) | nonce (u32).

    REGISTER    host -> relay:registration   | token_len (u8) | token (16..64 bytes ASCII)   27..75 bytes
    REGISTERED  relay -> host                | relay IPv4 (4 bytes) | host relay port (u16) 16 bytes
    ERROR       relay -> host                | code (u8)                                     11 bytes

Version 2 adds two messages, and a host that registers with version 2
promises to answer them (the relay answers in the version it was asked in):

    OPEN        relay:registration -> host   | client relay port (u16)                       12 bytes
                nonce = a ticket: a new client is coming from that relay port
    PUNCH       host's game socket -> relay:client relay port                                10 bytes
                nonce = the ticket; it opens the host's NAT toward that port, and shows
                the relay the host's address as seen from there

The nonce of REGISTER is the client's own, echoed so that it can match replies
to requests; an OPEN's ticket is the relay's, random, good for one client.

Version 3 changes no message; a host that registers with version 3 promises
to follow the relay IP in REGISTERED. In a fleet (natctl.fleet) a host may
register at any relay: the reply names the relay that holds its lobby, and
a version 3 host sends its next REGISTERs (keepalives) there, from the same
socket, so that OPENs from that relay reach it. When its keepalives go
unanswered (that relay died), it registers at the address it started from
again, which names the relay its lobby moved to. Versions 1 and 2 get the
same reply; a host that ignores its relay IP is reached where its NAT lets
that relay in (a cone), as with version 1.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

MAGIC = b"NATC"
VERSION = 3  # what this relay and the reference client speak
VERSIONS = (1, 2, 3)
REGISTER, REGISTERED, ERROR, OPEN, PUNCH = 1, 2, 3, 4, 5
TOKEN_MIN, TOKEN_MAX = 16, 64
ERR_RATE_LIMITED, ERR_SERVER = 2, 3  # a bad token gets no answer at all

_HEAD = struct.Struct("!4sBBI")  # magic, version, type, nonce
MIN_REQUEST = _HEAD.size + 1 + TOKEN_MIN
MAX_REQUEST = _HEAD.size + 1 + TOKEN_MAX
OPEN_SIZE, PUNCH_SIZE = _HEAD.size + 2, _HEAD.size


class WireError(ValueError):
    """A datagram that is not a valid message (it gets no answer)."""


@dataclass(frozen=True)
class Register:
    nonce: int
    token: str
    version: int = 1

    @property
    def opens(self) -> bool:
        """The host answers OPEN with PUNCH (version 2 and later)."""
        return self.version >= 2


def decode_request(data: bytes) -> Register:
    if not MIN_REQUEST <= len(data) <= MAX_REQUEST:
        raise WireError("bad size")
    magic, version, kind, nonce = _HEAD.unpack_from(data)
    if magic != MAGIC or version not in VERSIONS or kind != REGISTER:
        raise WireError("not a register request")
    length = data[_HEAD.size]
    token = data[_HEAD.size + 1:]
    if length != len(token) or not TOKEN_MIN <= length <= TOKEN_MAX:
        raise WireError("bad token length")
    try:
        text = token.decode("ascii")
    except UnicodeDecodeError:
        raise WireError("token is not ASCII") from None
    if not text.isprintable():
        raise WireError("token is not printable")
    return Register(nonce, text, version)


def encode_request(token: str, nonce: int, version: int = VERSION) -> bytes:
    raw = token.encode("ascii")
    return _HEAD.pack(MAGIC, version, REGISTER, nonce) + bytes([len(raw)]) + raw


def encode_registered(nonce: int, relay_ip: str, host_port: int, version: int = 1) -> bytes:
    return _HEAD.pack(MAGIC, version, REGISTERED, nonce) + ipaddress.IPv4Address(relay_ip).packed + struct.pack(
        "!H", host_port)


def encode_error(nonce: int, code: int, version: int = 1) -> bytes:
    return _HEAD.pack(MAGIC, version, ERROR, nonce) + bytes([code])


def decode_reply(data: bytes) -> tuple[int, int, tuple[str, int] | int]:
    """(type, nonce, (relay_ip, host_port) or error code); raises WireError."""
    if len(data) < _HEAD.size + 1:
        raise WireError("short reply")
    magic, version, kind, nonce = _HEAD.unpack_from(data)
    if magic != MAGIC or version not in VERSIONS:
        raise WireError("not a reply")
    if kind == REGISTERED and len(data) == _HEAD.size + 6:
        ip = str(ipaddress.IPv4Address(data[_HEAD.size:_HEAD.size + 4]))
        return kind, nonce, (ip, struct.unpack_from("!H", data, _HEAD.size + 4)[0])
    if kind == ERROR and len(data) == _HEAD.size + 1:
        return kind, nonce, data[_HEAD.size]
    raise WireError("bad reply")


def encode_open(ticket: int, client_port: int) -> bytes:
    return _HEAD.pack(MAGIC, 2, OPEN, ticket) + struct.pack("!H", client_port)


def decode_open(data: bytes) -> tuple[int, int]:
    """(ticket, client relay port) of an OPEN; raises WireError."""
    if len(data) != OPEN_SIZE:
        raise WireError("not an open")
    magic, version, kind, ticket = _HEAD.unpack_from(data)
    if magic != MAGIC or version < 2 or kind != OPEN:
        raise WireError("not an open")
    return ticket, struct.unpack_from("!H", data, _HEAD.size)[0]


def encode_punch(ticket: int) -> bytes:
    return _HEAD.pack(MAGIC, 2, PUNCH, ticket)


def decode_punch(data: bytes) -> int:
    """The ticket of a PUNCH; raises WireError."""
    if len(data) != PUNCH_SIZE:
        raise WireError("not a punch")
    magic, version, kind, ticket = _HEAD.unpack_from(data)
    if magic != MAGIC or version < 2 or kind != PUNCH:
        raise WireError("not a punch")
    return int(ticket)
