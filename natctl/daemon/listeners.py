"""The daemon's listening sockets: the registration port and one socket per host relay port.

``Registrar`` takes registrations (and hands other protocols' datagrams to the daemon's handlers);
``HostPort`` takes unknown senders' first packets to one host port, in batches, refusing cheaply
what the lobby refuses. Both hand the work to natctl.daemon.server's ``Daemon``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import TYPE_CHECKING

from natctl import admission
from natctl.admission import NotAllowed
from natctl.daemon import metrics, wire
from natctl.daemon.log import log
from natctl.daemon.ratelimit import RateLimiter
from natctl.db import StoreUnreachable
from natctl.errors import Conflict, NatctlError, NotFound
from natctl.model import Endpoint, Host, Lobby

if TYPE_CHECKING:
    from natctl.daemon.server import Daemon


class Registrar(asyncio.DatagramProtocol):
    """The registration port: a host sends its lobby token from its game socket."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.limiter = RateLimiter(rate=2.0, burst=10)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        source = f"{addr[0]}:{addr[1]}"
        if not self.limiter.allow(addr[0], time.monotonic()):
            metrics.REGISTRATION_REJECTS.labels("rate").inc()
            return
        for handler in self.daemon.handlers:  # other protocols on this port (LAN join, noray's pid)
            if handler(data, addr, self.transport):
                return
        try:
            req = wire.decode_request(data)
        except wire.WireError:
            metrics.REGISTRATION_REJECTS.labels("malformed").inc()
            return
        svc = self.daemon.svc
        try:
            reg = svc.register_host(req.token, Endpoint(addr[0], addr[1]), opens=req.opens)
        except NotFound:  # a wrong token gets no answer: nothing to learn from us
            metrics.REGISTRATION_REJECTS.labels("token").inc()
            self.daemon.repeats.note(time.monotonic(), "registration_refused", source=source, reason="unknown token")
            return
        except Conflict as err:
            metrics.REGISTRATION_REJECTS.labels("conflict").inc()
            self.daemon.repeats.note(time.monotonic(), "registration_refused", source=source, reason=err.message)
            self.transport.sendto(wire.encode_error(req.nonce, wire.ERR_SERVER, req.version), addr)
            return
        except StoreUnreachable:  # a fleet's database is down: a known host's keepalive gets its last answer
            reply = self.daemon.replies.get((req.token, addr))
            if reply is not None:
                self.transport.sendto(reply, addr)
            return
        except NatctlError as err:
            metrics.SYNC_FAILURES.inc()
            log("registration_failed", source=source, error=str(err))
            return
        host = reg.host
        metrics.REGISTRATIONS.inc()
        if reg.changed:  # keepalives repeat a registration every few seconds: log only what changed
            log("registered", lobby_id=host.lobby_id, host=str(host.addr), host_port=host.relay_port,
                version=req.version)
        # In a fleet the lobby may live on another relay: the reply names it, and the host goes there.
        reply = wire.encode_registered(req.nonce, reg.relay_ip, host.relay_port, req.version)
        self.transport.sendto(reply, addr)
        if len(self.daemon.replies) < 65536:
            self.daemon.replies[(req.token, addr)] = reply
        if not reg.here:
            return
        if reg.changed and host.opens:  # a moved host's NAT is new: ask it to open toward its clients again
            for c in svc.clients(host.lobby_id):
                if c.proto == "udp" and not c.pending:
                    self.daemon.punches.relearn(c.id, host.addr, c.relay_port)
        self.daemon.refresh_host_ports()


class HostPort(asyncio.DatagramProtocol):
    """Unknown senders to one host relay port.

    The kernel maps everyone it knows, drops senders outside the lobby's allowed networks (allow4)
    and rate-limits the rest, so what arrives here is at most a few thousand packets a second. Each
    wakeup reads a bounded batch of them. A refusal is decided first, from what the port admits
    (its lobby, host and members, read from the store at most every GATE_SECONDS and again after
    each admission) by natctl.admission's rule, without a store transaction; only a sender the
    lobby may take reaches the store. Refused senders are blocked in the kernel together, one
    command for all refused within BLOCK_SECONDS (or BLOCK_BATCH of them), never one per packet.
    """

    BATCH = 64  # datagrams per wakeup: then the loop serves registrations and timers again
    GATE_SECONDS = 1.0  # how stale a refusal may be (a lobby that filled up, or got room again)
    BLOCK_SECONDS = 0.05
    BLOCK_BATCH = 256
    REFUSED = metrics.REJECTIONS.labels("not_allowed")

    def __init__(self, daemon: Daemon, port: int) -> None:
        self.daemon, self.port = daemon, port
        self.sock: socket.socket | None = None
        self._gate: tuple[Lobby, Host, frozenset[Endpoint], int] | None = None
        self._gate_until = 0.0
        self.blocks: list[tuple[str, int]] = []  # refused senders not yet blocked in the kernel
        self._flush_at: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A second handle on the transport's socket (the same queue, non-blocking): reads the rest of a batch.
        fd = transport.get_extra_info("socket").fileno()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, fileno=os.dup(fd))
        self.sock.setblocking(False)

    def connection_lost(self, exc: Exception | None) -> None:
        self.flush()
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.daemon.admit(self.port, data, addr, self)
        for _ in range(self.BATCH - 1):
            if self.sock is None:
                break
            try:
                data, addr = self.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            self.daemon.admit(self.port, data, addr, self)
        if len(self.blocks) >= self.BLOCK_BATCH:
            self.flush()
        elif self.blocks and self._flush_at is None:
            self._flush_at = self.daemon.loop.call_later(self.BLOCK_SECONDS, self.flush)

    def refusal(self, sender: Endpoint, now: float) -> NatctlError | None:
        """What the lobby says to ``sender`` by what the port admitted lately: NotFound (no open lobby),
        NotAllowed, or None (the store decides: it is a member already, or may join)."""
        if now >= self._gate_until:
            self._gate = self._read_gate()
            self._gate_until = now + self.GATE_SECONDS
        if self._gate is None:
            return NotFound(f"no open lobby on relay port {self.port}")
        lobby, host, members, count = self._gate
        if lobby.expired(self.daemon.svc.clock()):
            return NotFound(f"no open lobby on relay port {self.port}")
        try:
            admission.check_sender(lobby, sender, host.addr, members, count)
        except NotAllowed as err:
            return err
        return None

    def _read_gate(self) -> tuple[Lobby, Host, frozenset[Endpoint], int] | None:
        store = self.daemon.svc.store
        host = store.host_by_port(self.port)
        lobby = store.lobby_by_id(host.lobby_id) if host else None
        if host is None or lobby is None or lobby.closed is not None:
            return None
        clients = store.clients(lobby.id)
        # Counted as the allocator counts a host's clients (by relay port), so a refusal here is one the store makes.
        return lobby, host, frozenset(c.addr for c in clients if c.proto == "udp"), len({c.relay_port for c in clients})

    def admitted(self) -> None:
        """A sender joined: read the port's members again before the next refusal."""
        self._gate_until = 0.0

    def flush(self) -> None:
        """Block the refused senders in the kernel, in one command."""
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        if self.blocks:
            senders, self.blocks = self.blocks, []
            try:
                self.daemon.svc.kernel.block_all(senders)
            except NatctlError as err:
                self.daemon.repeats.note(time.monotonic(), "block_failed", host_port=self.port, error=str(err))





RCVBUF = 4 << 20  # bytes: a burst of registrations or first packets waits here instead of being dropped


def _deep_queue(transport: asyncio.BaseTransport) -> None:
    """A receive queue far above the default 208 KiB (beyond net.core.rmem_max when root may)."""
    sock = transport.get_extra_info("socket")
    for option in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, RCVBUF)
            return
        except OSError:  # FORCE needs CAP_NET_ADMIN; the plain option is capped by rmem_max
            continue


