"""A game host as a real game runs one (the demo and the tests use it): its loop reads the game socket and hands each datagram to
the reference client (natctl.daemon.client.HostSession), which answers the relay's OPENs; the
rest is game traffic.

``GameHost`` looks like the socket to tests (sendto, recvfrom with timeouts, settimeout,
setblocking), so tests written against a plain socket run unchanged with a v2 host.
"""

from __future__ import annotations

import queue
import socket
import threading

from natctl.daemon.client import HostSession


class GameHost:
    def __init__(self, sock: socket.socket, relay: tuple[str, int], token: str, version: int = 2,
                 **session: float) -> None:
        """``session``: HostSession's timers (keepalive, retry), shorter in a fleet's failover tests."""
        self.sock = sock
        self.session = HostSession(sock, relay, token, version, **session)
        self.inbox: queue.Queue[tuple[bytes, tuple[str, int]]] = queue.Queue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._timeout: float | None = 2.0

    def start(self, tries: int = 10) -> tuple[str, int]:
        """Register (before the loop starts, as a game does), then run the loop in a thread."""
        got = self.session.register(tries)
        self.sock.settimeout(0.05)
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return got

    def _loop(self) -> None:
        while not self._stop.is_set():  # bounded by close(): each wait is 50 ms
            self.session.tick()
            try:
                data, src = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            if not self.session.handle(data, src):
                self.inbox.put((data, src))

    # --- the socket's face

    def sendto(self, data: bytes, addr: tuple[str, int]) -> int:
        return self.sock.sendto(data, addr)

    def getsockname(self) -> tuple[str, int]:
        return self.sock.getsockname()

    def settimeout(self, seconds: float | None) -> None:
        self._timeout = seconds

    def setblocking(self, flag: bool) -> None:
        self._timeout = None if flag else 0.0

    def recvfrom(self, _size: int = 65535) -> tuple[bytes, tuple[str, int]]:
        try:
            if self._timeout == 0.0:
                return self.inbox.get_nowait()
            return self.inbox.get(timeout=self._timeout)
        except queue.Empty:
            if self._timeout == 0.0:
                raise BlockingIOError from None
            raise TimeoutError from None

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        self.sock.close()
