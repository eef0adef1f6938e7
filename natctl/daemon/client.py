"""A reference host-side client of the registration protocol: send until acknowledged.

Game developers can port these few lines to any engine; tests use them with
real sockets.
"""

from __future__ import annotations

import secrets
import socket
import time

from natctl.daemon import wire
from natctl.errors import NatctlError


def register(sock: socket.socket, relay: tuple[str, int], token: str, tries: int = 10,
             interval: float = 0.3) -> tuple[str, int]:
    """Register the lobby from ``sock`` (the game's own socket). Returns (relay_ip, host_port)."""
    nonce = secrets.randbits(32)
    request = wire.encode_request(token, nonce)
    old = sock.gettimeout()
    try:
        for _ in range(tries):
            sock.sendto(request, relay)
            deadline = time.monotonic() + interval
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data, src = sock.recvfrom(2048)
                except TimeoutError:
                    break
                if src != relay:
                    continue  # game traffic may share the socket
                try:
                    kind, got_nonce, body = wire.decode_reply(data)
                except wire.WireError:
                    continue
                if got_nonce == nonce and kind == wire.REGISTERED:
                    return body  # type: ignore[return-value]
                if got_nonce == nonce and kind == wire.ERROR:
                    raise NatctlError(f"the relay refused the registration (code {body})", "check the token")
    finally:
        sock.settimeout(old)
    raise NatctlError(f"no answer from {relay[0]}:{relay[1]} after {tries} tries",
                      "check the relay address, the token, and that 'natctl serve' runs")
