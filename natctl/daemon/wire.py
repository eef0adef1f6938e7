"""The registration wire format, version 1 (pure; documented in the README).

All integers are big-endian. A request is at least as large as any reply, so
the relay never amplifies.

    request   "NATC" | version=1 (u8) | type=1 REGISTER (u8) | nonce (u32) | token_len (u8) | token (16..64 bytes ASCII)
    reply     "NATC" | version=1 | type=2 REGISTERED | nonce | relay IPv4 (4 bytes) | host relay port (u16)   16 bytes
    error     "NATC" | version=1 | type=3 ERROR      | nonce | code (u8)                                   11 bytes

The nonce is the client's own, echoed so that it can match replies to requests.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

MAGIC = b"NATC"
VERSION = 1
REGISTER, REGISTERED, ERROR = 1, 2, 3
TOKEN_MIN, TOKEN_MAX = 16, 64
ERR_RATE_LIMITED, ERR_SERVER = 2, 3  # a bad token gets no answer at all

_HEAD = struct.Struct("!4sBBI")  # magic, version, type, nonce
MIN_REQUEST = _HEAD.size + 1 + TOKEN_MIN
MAX_REQUEST = _HEAD.size + 1 + TOKEN_MAX


class WireError(ValueError):
    """A datagram that is not a valid v1 request (it gets no answer)."""


@dataclass(frozen=True)
class Register:
    nonce: int
    token: str


def decode_request(data: bytes) -> Register:
    if not MIN_REQUEST <= len(data) <= MAX_REQUEST:
        raise WireError("bad size")
    magic, version, kind, nonce = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION or kind != REGISTER:
        raise WireError("not a v1 register request")
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
    return Register(nonce, text)


def encode_request(token: str, nonce: int) -> bytes:
    raw = token.encode("ascii")
    return _HEAD.pack(MAGIC, VERSION, REGISTER, nonce) + bytes([len(raw)]) + raw


def encode_registered(nonce: int, relay_ip: str, host_port: int) -> bytes:
    return _HEAD.pack(MAGIC, VERSION, REGISTERED, nonce) + ipaddress.IPv4Address(relay_ip).packed + struct.pack(
        "!H", host_port)


def encode_error(nonce: int, code: int) -> bytes:
    return _HEAD.pack(MAGIC, VERSION, ERROR, nonce) + bytes([code])


def decode_reply(data: bytes) -> tuple[int, int, tuple[str, int] | int]:
    """(type, nonce, (relay_ip, host_port) or error code); raises WireError."""
    if len(data) < _HEAD.size + 1:
        raise WireError("short reply")
    magic, version, kind, nonce = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise WireError("not a v1 reply")
    if kind == REGISTERED and len(data) == _HEAD.size + 6:
        ip = str(ipaddress.IPv4Address(data[_HEAD.size:_HEAD.size + 4]))
        return kind, nonce, (ip, struct.unpack_from("!H", data, _HEAD.size + 4)[0])
    if kind == ERROR and len(data) == _HEAD.size + 1:
        return kind, nonce, data[_HEAD.size]
    raise WireError("bad reply")
