"""Opening a host's NAT toward a new client's relay port (registration v2).

A home router that filters by address and port (stock Linux masquerade) lets
in only what comes from where the host sent to; a symmetric one also gives
each destination its own external port. So before a new client's packets go
to the host from relay:P_c, the relay asks the host (OPEN, from the
registration port the host already talks to) to send one packet (PUNCH) from
its game socket to relay:P_c. That opens the host's NAT, and shows the relay
the host's address as seen from P_c; the mapping goes into the kernel with it,
then the client's packets held meanwhile are delivered. A host that never
answers gets the mapping with its registered address after ``GIVE_UP``.

The kernel never tracks a PUNCH (the skeleton's rawpre chain), so it reaches
this module's socket on P_c and is never forwarded to a client, however late.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from dataclasses import dataclass, field
from typing import Protocol

from natctl.daemon import metrics, wire
from natctl.daemon.log import Repeats, log
from natctl.model import Endpoint, parse_endpoint
from natctl.registrar import Admission

OPEN_EVERY = 0.3  # seconds between OPENs while no punch came (a lost OPEN or PUNCH is sent again)
OPENS = 3
GIVE_UP = 1.2  # seconds: then install with the registered address (a NAT that lets traffic in)
HELD_PACKETS, HELD_BYTES = 32, 64 << 10  # per client, while its host opens: the rest is dropped


class Relay(Protocol):
    """What this module needs of the daemon."""

    loop: asyncio.AbstractEventLoop
    bind_ip: str
    repeats: Repeats

    def send_open(self, data: bytes, host: Endpoint) -> None: ...

    def settle(self, client_id: int, seen: Endpoint | None) -> Admission | None: ...

    def deliver(self, client_port: int, host: str, data: bytes) -> None: ...


@dataclass
class Ticket:
    number: int
    client_id: int
    host: Endpoint  # registered: where OPENs go; a punch must come from its IP
    port: int  # the client's relay port, where the punch must arrive
    relearn: bool  # an installed client whose host moved: nothing held, nothing to give up
    held: list[bytes] = field(default_factory=list)
    timers: list[asyncio.TimerHandle] = field(default_factory=list)


class Punches:
    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.tickets: dict[int, Ticket] = {}
        self.by_client: dict[int, Ticket] = {}
        self.sockets: dict[int, socket.socket] = {}  # relay port -> its listening socket, while tickets use it

    def hold(self, admitted: Admission, data: bytes) -> None:
        """Keep a pending client's packet until its host opened (the first one also sends the OPEN)."""
        t = self.by_client.get(admitted.client_id)
        if t is None:
            m = admitted.mapping
            t = self._open(admitted.client_id, parse_endpoint(m.host), m.client_port, relearn=False)
            if t is None:
                return
        if len(t.held) < HELD_PACKETS and sum(map(len, t.held)) + len(data) <= HELD_BYTES:
            t.held.append(data)

    def relearn(self, client_id: int, host: Endpoint, port: int) -> None:
        """Ask a moved host to open toward an installed client's port again (no packets held)."""
        if client_id not in self.by_client:
            self._open(client_id, host, port, relearn=True)

    def _open(self, client_id: int, host: Endpoint, port: int, relearn: bool) -> Ticket | None:
        if not self._listen(port):
            if not relearn:
                self._finish(Ticket(0, client_id, host, port, relearn), None)
            return None
        t = Ticket(secrets.randbits(32), client_id, host, port, relearn)
        while t.number in self.tickets:
            t.number = secrets.randbits(32)
        self.tickets[t.number] = self.by_client[client_id] = t
        message = wire.encode_open(t.number, port)
        loop = self.relay.loop
        t.timers = [loop.call_later(i * OPEN_EVERY, self.relay.send_open, message, host) for i in range(OPENS)]
        t.timers.append(loop.call_later(GIVE_UP, self._give_up, t))
        return t

    def _give_up(self, t: Ticket) -> None:
        if self._drop(t):
            metrics.PUNCHES.labels("unanswered").inc()
            if not t.relearn:
                self._finish(t, None)

    def received(self, port: int, data: bytes, addr: tuple[str, int]) -> None:
        """A datagram on a client port we listen on: a punch, or something to ignore and count."""
        try:
            number = wire.decode_punch(data)
        except wire.WireError:
            return self._reject("malformed", addr, port)
        t = self.tickets.get(number)
        if t is None or t.port != port:
            return self._reject("unknown_ticket", addr, port)
        if addr[0] != t.host.ip:  # a NAT changes ports, not addresses: anyone else is a stranger
            return self._reject("wrong_source", addr, port)
        if self._drop(t):
            metrics.PUNCHES.labels("answered").inc()
            self._finish(t, Endpoint(addr[0], addr[1]))

    def _finish(self, t: Ticket, seen: Endpoint | None) -> None:
        """Install the mapping, then hand the host what the client sent meanwhile."""
        settled = self.relay.settle(t.client_id, seen)
        if settled is None:
            return  # refused or gone: logged by the daemon; the held packets go nowhere
        if seen is not None or not t.relearn:
            log("punched" if seen else "unanswered", client=settled.mapping.client, client_port=t.port,
                host=settled.mapping.host, held=len(t.held), relearn=t.relearn or None)
        for data in t.held:
            self.relay.deliver(t.port, settled.mapping.host, data)

    def _drop(self, t: Ticket) -> bool:
        """Forget a ticket (False if it was already done); close its port when no ticket uses it."""
        if self.tickets.pop(t.number, None) is None:
            return False
        self.by_client.pop(t.client_id, None)
        for timer in t.timers:
            timer.cancel()
        if not any(o.port == t.port for o in self.tickets.values()):
            s = self.sockets.pop(t.port, None)
            if s is not None:
                self.relay.loop.remove_reader(s.fileno())
                s.close()
        return True

    def _listen(self, port: int) -> bool:
        if port in self.sockets:
            return True
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            # The daemon's delivery socket binds the same port to send a held packet.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setblocking(False)
            s.bind((self.relay.bind_ip, port))
        except OSError as err:
            s.close()
            log("listen_failed", port=port, error=str(err), note="the client's mapping uses the host's registered address")
            return False
        self.sockets[port] = s
        self.relay.loop.add_reader(s.fileno(), self._readable, port, s)
        return True

    def _readable(self, port: int, s: socket.socket) -> None:
        for _ in range(64):  # bounded: a flood on one port cannot starve the loop
            try:
                data, addr = s.recvfrom(2048)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            self.received(port, data, addr)
            if port not in self.sockets:
                return

    def _reject(self, reason: str, addr: tuple[str, int], port: int) -> None:
        metrics.PUNCH_REJECTS.labels(reason).inc()
        self.relay.repeats.note(self.relay.loop.time(), "punch_ignored", source=f"{addr[0]}:{addr[1]}",
                                client_port=port, reason=reason)

    def close(self) -> None:
        for t in list(self.tickets.values()):
            self._drop(t)

