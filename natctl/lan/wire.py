"""Joining a LAN through the registration port (pure; an extension of natctl.daemon.wire).

Same head as every natctl message, "NATC" | version (u8) | type (u8) | nonce (u32), big-endian;
types 1-5 are the lobbies'. The LAN messages are version 1 of their own types:

    LAN_JOIN    member -> relay:registration                                        160 bytes, always
                | token_len (u8) | token (64 bytes, ASCII, zero-padded; 16..64 used)
                | name_len (u8) | member name (32 bytes, zero-padded; 1..32 used)
                | public key (32 bytes, X25519) | zeros up to 160 bytes
    LAN_JOINED  relay -> member                                                      55 bytes
                | virtual IPv4 (4) | prefix length (u8) | relay's WireGuard port (u16)
                | tunnel MTU (u16) | relay's public key (32) | relay IPv4 (4)
    LAN_ERROR   relay -> member                                                      11 bytes
                | code (u8): 16 LAN full, 17 member name in use, 18 bad request, 3 server error

The request is padded to a fixed size larger than any reply, so the relay never amplifies. The
nonce is the member's, echoed. A wrong or expired token gets no answer at all, as for lobbies;
joining again with the same name and key gets the same answer (resend until answered).
"""

from __future__ import annotations

import base64
import ipaddress
import struct
from dataclasses import dataclass

from natctl.daemon.wire import _HEAD, MAGIC, TOKEN_MAX, TOKEN_MIN, WireError

VERSION = 1
LAN_JOIN, LAN_JOINED, LAN_ERROR = 6, 7, 8
TYPES = (LAN_JOIN, LAN_JOINED, LAN_ERROR)
NAME_MAX = 32
REQUEST_SIZE = 160
ERR_SERVER, ERR_FULL, ERR_NAME, ERR_BAD = 3, 16, 17, 18
ERRORS = {ERR_SERVER: "the relay failed to add you (see its log)",
          ERR_FULL: "the LAN is full", ERR_NAME: "that member name is in use in this LAN (pick another: --name)",
          ERR_BAD: "the relay refused the request (bad name or key)"}

_BODY = struct.Struct(f"!B{TOKEN_MAX}sB{NAME_MAX}s32s")
_JOINED = struct.Struct("!4sBHH32s4s")
JOINED_SIZE = _HEAD.size + _JOINED.size
ERROR_SIZE = _HEAD.size + 1


@dataclass(frozen=True)
class Join:
    nonce: int
    token: str
    name: str
    public_key: str  # base64, as wg prints it


@dataclass(frozen=True)
class JoinedReply:
    nonce: int
    address: str
    prefixlen: int
    port: int
    mtu: int
    server_key: str
    relay_ip: str


def is_lan(data: bytes) -> bool:
    """A LAN message (any of them, valid or not): the LAN handler's, not the lobbies'."""
    return len(data) >= _HEAD.size and data[:4] == MAGIC and data[5] in TYPES


def _text(raw: bytes, length: int, low: int, high: int, what: str) -> str:
    if not low <= length <= high or any(raw[length:]):
        raise WireError(f"bad {what} length")
    try:
        text = raw[:length].decode("ascii")
    except UnicodeDecodeError:
        raise WireError(f"{what} is not ASCII") from None
    if not text.isprintable() or " " in text:
        raise WireError(f"{what} is not printable")
    return text


def encode_join(token: str, name: str, public_key: str, nonce: int) -> bytes:
    t, n = token.encode("ascii"), name.encode("ascii")
    if not TOKEN_MIN <= len(t) <= TOKEN_MAX or not 1 <= len(n) <= NAME_MAX:
        raise ValueError("token or name of a bad length")
    key = base64.b64decode(public_key, validate=True)
    if len(key) != 32:
        raise ValueError("a public key is 32 bytes")
    msg = _HEAD.pack(MAGIC, VERSION, LAN_JOIN, nonce) + _BODY.pack(len(t), t, len(n), n, key)
    return msg + bytes(REQUEST_SIZE - len(msg))


def decode_join(data: bytes) -> Join:
    if len(data) != REQUEST_SIZE:
        raise WireError("bad size")
    magic, version, kind, nonce = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION or kind != LAN_JOIN:
        raise WireError("not a LAN join")
    tlen, token, nlen, name, key = _BODY.unpack_from(data, _HEAD.size)
    if any(data[_HEAD.size + _BODY.size:]):
        raise WireError("padding is not zero")
    return Join(nonce, _text(token, tlen, TOKEN_MIN, TOKEN_MAX, "token"), _text(name, nlen, 1, NAME_MAX, "name"),
                base64.b64encode(key).decode())


def encode_joined(nonce: int, address: str, prefixlen: int, port: int, mtu: int, server_key: str,
                  relay_ip: str) -> bytes:
    return _HEAD.pack(MAGIC, VERSION, LAN_JOINED, nonce) + _JOINED.pack(
        ipaddress.IPv4Address(address).packed, prefixlen, port, mtu, base64.b64decode(server_key),
        ipaddress.IPv4Address(relay_ip).packed)


def encode_error(nonce: int, code: int) -> bytes:
    return _HEAD.pack(MAGIC, VERSION, LAN_ERROR, nonce) + bytes([code])


def decode_reply(data: bytes) -> JoinedReply | tuple[int, int]:
    """A JoinedReply, or (nonce, error code); raises WireError."""
    if len(data) < _HEAD.size:
        raise WireError("short reply")
    magic, version, kind, nonce = _HEAD.unpack_from(data)
    if magic != MAGIC or version != VERSION:
        raise WireError("not a LAN reply")
    if kind == LAN_JOINED and len(data) == JOINED_SIZE:
        addr, prefix, port, mtu, key, relay = _JOINED.unpack_from(data, _HEAD.size)
        if not 1 <= prefix <= 30:
            raise WireError("bad prefix length")
        return JoinedReply(nonce, str(ipaddress.IPv4Address(addr)), prefix, port, mtu, base64.b64encode(key).decode(),
                           str(ipaddress.IPv4Address(relay)))
    if kind == LAN_ERROR and len(data) == ERROR_SIZE:
        return nonce, data[_HEAD.size]
    raise WireError("bad LAN reply")
