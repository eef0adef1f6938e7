"""natctl's daemon on the fake kernel, in a thread, over loopback: the unit tests' relay (no root)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Callable

from natctl.daemon.server import Daemon
from natctl.service import Service


def free_udp_ports(count: int) -> int:
    """The first of ``count`` consecutive UDP ports on loopback that are free now."""
    for start in range(21000, 32700, 97):  # below the kernel's ephemeral range, as relay ports must be
        socks = []
        try:
            for port in range(start, start + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return start
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free UDP port range on loopback")


class Running:
    """A Daemon on its own event loop in a thread, with the fake kernel and a recording sender.

    Each thread opens its own Service (SQLite connections stay in their thread), as the daemon does."""

    def __init__(self, make: Callable[[], Service]) -> None:
        self.make = make
        self.sent: list[tuple[int, str, bytes]] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.stop = asyncio.Event()
        self.daemon = Daemon(self.make(), worker=self.make, send=lambda *a: self.sent.append(a))
        self.loop.call_soon(self.ready.set)
        await self.daemon.run(self.stop)

    def __enter__(self) -> Running:
        self.thread.start()
        assert self.ready.wait(5)
        time.sleep(0.1)  # the registration socket opens right after the loop starts
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.stop.set)
        self.thread.join(10)
        assert not self.thread.is_alive()
