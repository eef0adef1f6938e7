"""noray's protocol in natctl's daemon: a TCP control port, pid datagrams on the registration port,
and relays that are natctl lobbies in the kernel (one per host), never a userspace loop.

A noray host that asks nothing of the relay costs nothing. ``connect-relay`` makes (once) a lobby
for the host, with the host's address from its pid datagram, and maps the asking peer to it
through the same allocator and kernel transaction as ``natctl map add``; the lobby is open, so
senders the host's game meets later are admitted on their first packet, as noray's dynamic relays
are. When the host's control connection closes its lobby is closed: its mappings leave the kernel
at once (noray keeps relaying until its idle timeout).

Safer than noray without breaking its clients: per-source and global caps on control connections,
an optional allow-list, a line-length limit, no peer ids in logs, and replies to pid datagrams
that are never larger than the datagram.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

from natctl.daemon import metrics
from natctl.daemon.log import Repeats, log
from natctl.errors import NatctlError
from natctl.model import Endpoint
from natctl.noray import protocol
from natctl.service import Service

MAX_CONNECTIONS = 4096  # control connections in all
MAX_PER_SOURCE = 32  # control connections from one IP (a LAN party behind one router)
RELAYS_PER_PEER = 64  # connect-relay targets one connection may ask for
MAX_CLIENTS = 256  # peers relayed to one host
UNREGISTERED_SECONDS = 30.0  # a connection that never registers is closed after this long


class Daemon(Protocol):
    svc: Service
    repeats: Repeats

    def refresh_host_ports(self) -> None: ...


@dataclass(eq=False)
class Peer:
    """One control connection, once it sent register-host."""

    oid: str
    pid: str
    writer: asyncio.StreamWriter
    udp: Endpoint | None = None  # from its pid datagram: its game socket as the relay sees it
    lobby: str = ""  # natctl's lobby for it, once a peer asked to relay to it
    port: int = 0  # that lobby's host relay port
    targets: set[str] = field(default_factory=set)


class NorayServer:
    def __init__(self, daemon: Daemon, allow: tuple[str, ...] = ()) -> None:
        self.daemon = daemon
        self.allow = [ipaddress.IPv4Network(n) for n in allow]
        self.by_oid: dict[str, Peer] = {}
        self.by_pid: dict[str, Peer] = {}
        self.per_source: Counter[str] = Counter()
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port, limit=protocol.MAX_LINE,
                                                 reuse_address=True)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    # --- UDP: pid datagrams on the registration port (Daemon.handlers)

    def datagram(self, data: bytes, addr: tuple[str, int], transport: asyncio.DatagramTransport) -> bool:
        if not protocol.is_pid(data):
            return False  # natctl's own (NATC...), or nothing a pid can be
        peer = self.by_pid.get(data.decode("ascii", errors="replace"))
        if peer is not None and peer.udp is None:  # the first registration counts, as noray does
            peer.udp = Endpoint(addr[0], addr[1])
            metrics.NORAY.labels("udp_registered").inc()
        elif peer is None:
            metrics.NORAY.labels("unknown_pid").inc()
        reply = protocol.pid_reply(peer is not None, len(data))
        if reply is not None:
            transport.sendto(reply, addr)
        return True

    # --- TCP: the control connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        source = (writer.get_extra_info("peername") or ("?", 0))[0]
        if not self._admit(source):
            writer.close()
            return
        _keepalive(writer)
        self.connections += 1
        self.per_source[source] += 1
        peer: Peer | None = None
        try:
            while True:
                try:
                    timeout = None if peer is not None else UNREGISTERED_SECONDS
                    raw = await asyncio.wait_for(reader.readline(), timeout)
                except (asyncio.LimitOverrunError, ValueError):
                    self._note("noray_refused", source, "line too long")
                    return
                except (TimeoutError, ConnectionError):
                    return
                if not raw.endswith(b"\n"):
                    return  # closed (a half-open connection ends here too, at its FIN or RST)
                parsed = protocol.parse_line(raw[:-1])
                if parsed is None:
                    metrics.NORAY.labels("junk").inc()
                    continue
                peer = self._command(parsed[0], parsed[1], peer, writer, source) or peer
                await writer.drain()
        finally:
            self.connections -= 1
            self.per_source[source] -= 1
            if self.per_source[source] <= 0:
                del self.per_source[source]
            if peer is not None:
                self._forget(peer)
            writer.close()

    def _admit(self, source: str) -> bool:
        if self.allow and not any(ipaddress.IPv4Address(source) in n for n in self.allow):
            self._note("noray_refused", source, "not in noray_allow")
            return False
        if self.connections >= MAX_CONNECTIONS or self.per_source[source] >= MAX_PER_SOURCE:
            self._note("noray_refused", source, "too many control connections")
            return False
        return True

    def _command(self, command: str, data: str, peer: Peer | None, writer: asyncio.StreamWriter,
                 source: str) -> Peer | None:
        """Run one command; returns the connection's peer after it (a new one for register-host)."""
        if command == "register-host":
            if peer is None:  # one peer per connection: a repeat gets the same ids again
                peer = Peer(protocol.new_id(protocol.OID_LENGTH), protocol.new_id(protocol.PID_LENGTH), writer)
                self.by_oid[peer.oid], self.by_pid[peer.pid] = peer, peer
                metrics.NORAY.labels("hosts").inc()
            writer.write(protocol.line("set-oid", peer.oid) + protocol.line("set-pid", peer.pid))
        elif command == "echo":
            writer.write(protocol.line("echo", data))
        elif command in ("connect", "connect-relay"):
            host = self.by_oid.get(data)
            if peer is None or host is None or peer.udp is None or host.udp is None or host is peer:
                metrics.NORAY.labels("unknown_oid").inc()
                return peer  # noray answers nothing here; the connection stays open
            if command == "connect":
                writer.write(protocol.line("connect", host.udp))
                host.writer.write(protocol.line("connect", peer.udp))
            else:
                self._relay(peer, host, writer)
        else:
            metrics.NORAY.labels("unknown_command").inc()  # one label for all junk, never the command itself
        return peer

    def _relay(self, client: Peer, host: Peer, writer: asyncio.StreamWriter) -> None:
        """Install client <-> host in the kernel and tell each side the port to send to."""
        if host.oid not in client.targets and len(client.targets) >= RELAYS_PER_PEER:
            self._note("noray_refused", client.udp.ip if client.udp else "?", "too many relays for one peer")
            return
        assert client.udp is not None and host.udp is not None
        start = time.perf_counter()
        try:
            host_port, client_port = self._map(host, client.udp)
        except NatctlError as err:
            metrics.SYNC_FAILURES.inc()
            self._note("noray_relay_failed", client.udp.ip, err.message)
            return
        client.targets.add(host.oid)
        metrics.NORAY.labels("relays").inc()
        writer.write(protocol.line("connect-relay", host_port))
        host.writer.write(protocol.line("connect-relay", client_port))
        log("noray_relay", lobby=host.lobby, client=str(client.udp), host_port=host_port, client_port=client_port,
            ms=round((time.perf_counter() - start) * 1000, 2))

    def _map(self, host: Peer, client: Endpoint) -> tuple[int, int]:
        """(host relay port, client relay port): the host's lobby made and registered once (natctl's
        registration path), the client announced (idempotent) and admitted at its first packet."""
        svc = self.daemon.svc
        assert host.udp is not None
        if not host.lobby:
            # Named by a hash: a noray oid is a secret-ish handle and stays out of names and logs.
            name = "noray-" + hashlib.sha256(host.oid.encode()).hexdigest()[:12]
            _, token = svc.lobby_create(name, open_=True, max_clients=MAX_CLIENTS)
            host.lobby = name
            host.port = svc.register_host(token, host.udp).host.relay_port
            self.daemon.refresh_host_ports()  # listen for the players' first packets now, not at the next tick
        # The client is expected, not installed: its first packet to the host port puts it in the kernel.
        return host.port, svc.admit_client(host.port, client, expect=True).mapping.client_port

    def _forget(self, peer: Peer) -> None:
        """The control connection closed: the peer is gone, and its lobby leaves the kernel now."""
        self.by_oid.pop(peer.oid, None)
        self.by_pid.pop(peer.pid, None)
        if peer.lobby:
            try:
                self.daemon.svc.lobby_close(peer.lobby)
            except NatctlError as err:
                log("noray_close_failed", lobby=peer.lobby, error=str(err))
            else:
                log("noray_host_left", lobby=peer.lobby)

    def _note(self, event: str, source: str, reason: str) -> None:
        metrics.NORAY.labels("refused").inc()
        self.daemon.repeats.note(time.monotonic(), event, source=source, reason=reason)


def _keepalive(writer: asyncio.StreamWriter) -> None:
    """A host whose machine vanished (no FIN, no RST) is noticed in about 90 s and its lobby closed."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
