"""``natctl join``: the player's side of a GM session.

Games that only join on port 1802 (Fantasy Grounds Classic) cannot be told to
use the GM's public port, so the player points the game at 127.0.0.1:1802 and
this relays TCP (and UDP) from there to RELAY:PORT. Pure Python and asyncio,
standard library only: it needs no admin rights, changes no system setting,
writes no file, and leaves nothing behind when it stops (Ctrl-C), on Linux,
macOS and Windows alike. It prints connections and byte counts as it runs.

It uses the standard library and natctl's own small modules only, so a player
can also run it from a copy of the source without installing anything:
``python -m natctl.join RELAY:PORT``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import TextIO

from natctl.errors import NatctlError, UsageError
from natctl.model import parse_port
from natctl.output import human_bytes

CHUNK = 65536
UDP_IDLE = 120.0  # seconds without a datagram before a UDP peer's socket is closed


def parse_hostport(text: str, what: str = "address") -> tuple[str, int]:
    """HOST:PORT where HOST is a name or an IPv4 address."""
    host, sep, port = text.strip().rpartition(":")
    if not sep or not host:
        raise UsageError(f"invalid {what} {text!r}", "write HOST:PORT, like relay.example.org:1803")
    return host, parse_port(port)


@dataclass
class Stats:
    open: int = 0
    total: int = 0
    udp_peers: int = 0
    sent: int = 0  # bytes from the game to the relay
    received: int = 0

    def line(self) -> str:
        return (f"{self.open} open, {self.total} total connections, {self.udp_peers} udp peers; "
                f"{human_bytes(self.sent)} sent, {human_bytes(self.received)} received")


@dataclass
class _UdpPeer:
    transport: asyncio.DatagramTransport | None = None
    queue: list[bytes] = field(default_factory=list)  # datagrams that came before the socket was ready
    last: float = 0.0


class Joiner:
    def __init__(self, relay: tuple[str, int], local: tuple[str, int] = ("127.0.0.1", 1802),
                 protos: tuple[str, ...] = ("tcp", "udp"), out: TextIO | None = None,
                 report_every: float = 5.0) -> None:
        self.relay, self.local, self.protos = relay, local, protos
        self.out = out or sys.stdout
        self.report_every = report_every
        self.stats = Stats()
        self._ids = itertools.count(1)
        self._conns: set[asyncio.StreamWriter] = set()
        self._udp: asyncio.DatagramTransport | None = None
        self._peers: dict[tuple, _UdpPeer] = {}
        self.ready = asyncio.Event()  # set once listening (self.local then holds the real port)

    def say(self, text: str) -> None:
        print(time.strftime("%H:%M:%S"), text, file=self.out, flush=True)

    async def main(self, stop: asyncio.Event | None = None) -> None:
        """Serve until ``stop`` is set or the task is cancelled (Ctrl-C); always closes everything."""
        stop = stop or asyncio.Event()
        with contextlib.suppress(NotImplementedError, RuntimeError):  # no signal handlers on Windows
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        server = None
        try:
            server = await self._listen()
            host, port = self.relay
            self.say(f"relaying {'+'.join(self.protos)} {self.local[0]}:{self.local[1]} -> {host}:{port}; "
                     f"point the game at {self.local[0]}:{self.local[1]}; Ctrl-C stops")
            self.ready.set()
            last = ""
            while not stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.report_every)
                self._sweep_udp()
                if self.stats.line() != last:
                    last = self.stats.line()
                    self.say(last)
        finally:
            await self._close(server)

    async def _listen(self) -> asyncio.Server | None:
        loop = asyncio.get_running_loop()
        server = None
        try:
            if "tcp" in self.protos:
                server = await asyncio.start_server(self._tcp, *self.local)
                self.local = server.sockets[0].getsockname()[:2]  # the real port when asked for port 0
            if "udp" in self.protos:
                self._udp, _ = await loop.create_datagram_endpoint(lambda: _Local(self), local_addr=self.local)
        except OSError as err:
            if server is not None:
                server.close()
            raise NatctlError(f"cannot listen on {self.local[0]}:{self.local[1]} ({err.strerror})",
                              "close what uses that port (a game hosting itself?) or pick another --local") from None
        return server

    async def _close(self, server: asyncio.Server | None) -> None:
        if server is not None:
            server.close()
        for w in list(self._conns):
            w.transport.abort()
        for peer in self._peers.values():
            if peer.transport is not None:
                peer.transport.close()
        if self._udp is not None:
            self._udp.close()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1)

    # --- TCP: one connection to the relay per connection from the game

    async def _tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        n, start = next(self._ids), time.monotonic()
        peer = writer.get_extra_info("peername")
        host, port = self.relay
        try:
            r_reader, r_writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        except (TimeoutError, OSError) as err:
            why = "refused" if isinstance(err, ConnectionRefusedError) else (str(err) or "timed out")
            self.say(f"tcp #{n} from {peer[0]}:{peer[1]}: cannot reach {host}:{port} ({why}); "
                     "is the GM's session open?")
            writer.transport.abort()
            return
        self.stats.open += 1
        self.stats.total += 1
        self._conns |= {writer, r_writer}
        self.say(f"tcp #{n} open: {peer[0]}:{peer[1]} -> {host}:{port}")
        counts = [0, 0]
        try:
            await asyncio.gather(self._pipe(reader, r_writer, counts, 0, writer),
                                 self._pipe(r_reader, writer, counts, 1, r_writer))
        finally:
            self.stats.open -= 1
            self._conns -= {writer, r_writer}
            writer.close()
            r_writer.close()
            self.say(f"tcp #{n} closed after {time.monotonic() - start:.1f}s: "
                     f"{human_bytes(counts[0])} sent, {human_bytes(counts[1])} received")

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, counts: list[int], i: int,
                    other: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(CHUNK):
                dst.write(data)
                counts[i] += len(data)
                if i == 0:
                    self.stats.sent += len(data)
                else:
                    self.stats.received += len(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()  # half-close: pass the EOF on, keep reading the other way
        except (ConnectionError, OSError):
            # A reset on one side (the session was closed, say) ends both.
            dst.transport.abort()
            other.transport.abort()

    # --- UDP: one socket to the relay per game socket, closed when idle

    def _udp_from_game(self, data: bytes, addr: tuple) -> None:
        self.stats.sent += len(data)
        peer = self._peers.get(addr)
        if peer is None:
            peer = self._peers[addr] = _UdpPeer()
            self.stats.udp_peers += 1
            asyncio.get_running_loop().create_task(self._udp_connect(addr, peer))
            self.say(f"udp peer {addr[0]}:{addr[1]} -> {self.relay[0]}:{self.relay[1]}")
        peer.last = time.monotonic()
        if peer.transport is None:
            peer.queue.append(data)
        else:
            peer.transport.sendto(data)

    async def _udp_connect(self, addr: tuple, peer: _UdpPeer) -> None:
        loop = asyncio.get_running_loop()
        try:
            transport, _ = await loop.create_datagram_endpoint(lambda: _Remote(self, addr), remote_addr=self.relay)
        except OSError as err:
            self.say(f"udp peer {addr[0]}:{addr[1]}: cannot reach {self.relay[0]}:{self.relay[1]} ({err})")
            self._drop_peer(addr)
            return
        if self._peers.get(addr) is not peer:  # dropped meanwhile
            transport.close()
            return
        peer.transport = transport
        for data in peer.queue:
            transport.sendto(data)
        peer.queue.clear()

    def _udp_from_relay(self, data: bytes, addr: tuple) -> None:
        self.stats.received += len(data)
        peer = self._peers.get(addr)
        if peer is not None and self._udp is not None:
            peer.last = time.monotonic()
            self._udp.sendto(data, addr)

    def _drop_peer(self, addr: tuple) -> None:
        peer = self._peers.pop(addr, None)
        if peer is not None:
            self.stats.udp_peers -= 1
            if peer.transport is not None:
                peer.transport.close()

    def _sweep_udp(self) -> None:
        now = time.monotonic()
        for addr, peer in list(self._peers.items()):
            if now - peer.last > UDP_IDLE:
                self._drop_peer(addr)


class _Local(asyncio.DatagramProtocol):
    def __init__(self, joiner: Joiner) -> None:
        self.joiner = joiner

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.joiner._udp_from_game(data, addr)


class _Remote(asyncio.DatagramProtocol):
    def __init__(self, joiner: Joiner, addr: tuple) -> None:
        self.joiner, self.addr = joiner, addr

    def datagram_received(self, data: bytes, _src: tuple) -> None:
        self.joiner._udp_from_relay(data, self.addr)

    def error_received(self, exc: Exception) -> None:  # ICMP unreachable: no session on that port
        self.joiner.say(f"udp to {self.joiner.relay[0]}:{self.joiner.relay[1]}: {exc}")


def run(relay: tuple[str, int], local: tuple[str, int], protos: tuple[str, ...], out: TextIO | None = None) -> None:
    """Run until Ctrl-C (or SIGTERM); then everything is closed and a summary printed."""
    joiner = Joiner(relay, local, protos, out)
    try:
        asyncio.run(joiner.main())
    except KeyboardInterrupt:
        pass  # asyncio.run has cancelled main(), whose finally closed every socket
    joiner.say(f"stopped: {joiner.stats.total} connections, {human_bytes(joiner.stats.sent)} sent, "
               f"{human_bytes(joiner.stats.received)} received")


def main(argv: list[str] | None = None) -> int:
    """``python -m natctl.join``: the same as ``natctl join``, without typer or any other dependency."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m natctl.join", description="Relay 127.0.0.1:1802 to a GM's "
                                 "public port until Ctrl-C.")
    ap.add_argument("relay", help="the GM's public address, RELAY:PORT")
    ap.add_argument("--local", default="127.0.0.1:1802", help="where the game connects (default: %(default)s)")
    ap.add_argument("--proto", choices=("tcp", "udp", "both"), default="both")
    args = ap.parse_args(argv)
    try:
        run(parse_hostport(args.relay, "relay address"), parse_hostport(args.local, "--local address"),
            ("tcp", "udp") if args.proto == "both" else (args.proto,))
    except NatctlError as err:
        print(f"natctl: error: {err}", file=sys.stderr)
        return err.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
