"""The reference host-side client of the registration protocol (v3; see natctl.daemon.wire).

A game host does three things on its own game socket, and nothing else:

1. register: send REGISTER until REGISTERED comes back (``register``);
2. keep it alive: send REGISTER again every ``KEEPALIVE`` seconds, so its home
   router keeps the path from the relay's registration port open (``tick``);
3. answer OPEN: when the relay's registration port says a new client comes
   from relay port P, send one PUNCH to relay:P (``handle``). That opens the
   host's NAT toward P, even a symmetric one, before the client's packets come.

Game developers port these few lines to their engine (the README has notes
for C, C# and GDScript); the tests use them with real sockets.
"""

from __future__ import annotations

import secrets
import socket
import time

from natctl.daemon import wire
from natctl.errors import NatctlError

KEEPALIVE = 15.0  # seconds: well inside the 30 s a Linux router keeps an unanswered UDP path
# Keepalives unanswered before the host registers at its first address again (its relay died; version 3).
MISSED = 2


class HostSession:
    """One lobby's registration from one game socket."""

    def __init__(self, sock: socket.socket, relay: tuple[str, int], token: str, version: int = wire.VERSION,
                 keepalive: float = KEEPALIVE, retry: float = 2.0) -> None:
        self.sock, self.relay, self.token, self.version = sock, relay, token, version
        self.keepalive, self.retry = keepalive, retry  # retry: after an unanswered keepalive
        self.home = relay  # where it registers first (a fleet's well-known address) and when its relay dies
        self.nonce = secrets.randbits(32)
        self.relay_ip: str | None = None  # from REGISTERED: where clients (and punches) go
        self.host_port: int | None = None
        self.punched = 0
        self.unanswered = 0  # keepalives sent since the last REGISTERED
        self.moves = 0  # times a reply sent it to another relay (version 3)
        self._next_keepalive = 0.0

    def register(self, tries: int = 10, interval: float = 0.3) -> tuple[str, int]:
        """Send REGISTER until acknowledged. Returns (relay_ip, host_port); game traffic that
        arrives meanwhile is dropped here, so register before the game starts."""
        request = wire.encode_request(self.token, self.nonce, self.version)
        old = self.sock.gettimeout()
        try:
            for _ in range(tries):
                target = self.relay
                self.sock.sendto(request, target)
                deadline = time.monotonic() + interval
                while (left := deadline - time.monotonic()) > 0:
                    self.sock.settimeout(left)
                    try:
                        data, src = self.sock.recvfrom(2048)
                    except TimeoutError:
                        break
                    self.handle(data, src)
                    if self.host_port is not None and self.relay == target:  # (not sent on to another relay)
                        self._next_keepalive = time.monotonic() + self.keepalive
                        self.unanswered = 0
                        return self.relay_ip, self.host_port  # type: ignore[return-value]
                    if self.relay != target:
                        break  # version 3: register where the lobby lives, now
        finally:
            self.sock.settimeout(old)
        raise NatctlError(f"no answer from {self.relay[0]}:{self.relay[1]} after {tries} tries",
                          "check the relay address, the token, and that 'natctl serve' runs")

    def handle(self, data: bytes, src: tuple[str, int]) -> bool:
        """Call with every datagram the game socket receives; True if it was the relay's (then
        the game ignores it). Answers OPEN with PUNCH; takes REGISTERED and ERROR replies."""
        if src not in (self.relay, self.home) or not data.startswith(wire.MAGIC):
            return False  # game traffic: clients arrive from relay ports, never the registration port
        try:
            ticket, port = wire.decode_open(data)
        except wire.WireError:
            pass
        else:
            if self.relay_ip is not None:
                self.sock.sendto(wire.encode_punch(ticket), (self.relay_ip, port))
                self.punched += 1
            return True
        try:
            kind, nonce, body = wire.decode_reply(data)
        except wire.WireError:
            return True  # from the relay's registration port, but nothing we know: drop it
        if nonce == self.nonce and kind == wire.REGISTERED:
            self.relay_ip, self.host_port = body  # type: ignore[misc]
            self.unanswered = 0
            if self.version >= 3 and self.relay_ip != self.relay[0]:  # the lobby lives on another relay: go there
                self.relay = (self.relay_ip, self.relay[1])
                self.moves += 1
                self._next_keepalive = 0.0  # register there now: its OPENs need the path open
        elif nonce == self.nonce and kind == wire.ERROR:
            raise NatctlError(f"the relay refused the registration (code {body})", "check the token")
        return True

    def tick(self, now: float | None = None) -> None:
        """Call now and then (every frame is fine): re-sends REGISTER every KEEPALIVE seconds."""
        now = time.monotonic() if now is None else now
        if self.host_port is not None and now >= self._next_keepalive:
            if self.version >= 3 and self.unanswered >= MISSED and self.relay != self.home:
                self.relay, self.unanswered = self.home, 0  # its relay is gone: ask where the lobby went
            self._next_keepalive = now + (self.keepalive if self.unanswered == 0 else self.retry)
            self.unanswered += 1
            self.sock.sendto(wire.encode_request(self.token, self.nonce, self.version), self.relay)


def register(sock: socket.socket, relay: tuple[str, int], token: str, tries: int = 10,
             interval: float = 0.3, version: int = 1) -> tuple[str, int]:
    """Register the lobby from ``sock`` (the game's own socket) once. Returns (relay_ip, host_port).

    Version 1: the relay sends nothing unasked, and reaches the host only where its NAT lets
    traffic in (a cone, a port forward). Behind stock or symmetric NAT use a ``HostSession``."""
    return HostSession(sock, relay, token, version).register(tries, interval)


def main(argv: list[str] | None = None) -> int:
    """A toy game host for trying a relay: register, answer OPENs, echo every game datagram back.

    python -m natctl.daemon.client RELAY_IP[:8809] --token TOKEN [--port 27015] [--seconds N]
    (standard library only: runs from a copy of the source on the host's machine).
    """
    import argparse
    import sys

    ap = argparse.ArgumentParser(prog="python -m natctl.daemon.client", description=main.__doc__)
    ap.add_argument("relay", help="the relay's registration address, IP[:PORT] (port 8809 by default)")
    ap.add_argument("--token", required=True, help="the lobby's token ('natctl lobby create' printed it)")
    ap.add_argument("--port", type=int, default=27015, help="the game socket's local port")
    ap.add_argument("--seconds", type=float, default=0, help="stop after this long (0: until Ctrl-C)")
    ap.add_argument("--version", type=int, choices=wire.VERSIONS, default=wire.VERSION, dest="wire_version",
                    help="registration version (1: never answers OPEN)")
    args = ap.parse_args(argv)
    ip, _, port = args.relay.partition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("0.0.0.0", args.port))
    session = HostSession(sock, (ip, int(port or 8809)), args.token, args.wire_version)
    try:
        relay_ip, host_port = session.register()
    except NatctlError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"registered: players send to {relay_ip}:{host_port}; echoing what they send", flush=True)
    end = time.monotonic() + args.seconds if args.seconds else None
    sock.settimeout(0.2)
    try:
        while end is None or time.monotonic() < end:
            session.tick()
            try:
                data, src = sock.recvfrom(65535)
            except TimeoutError:
                continue
            if session.handle(data, src):
                continue
            print(f"{src[0]}:{src[1]} sent {len(data)} bytes", flush=True)
            sock.sendto(data, src)
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
