"""A userspace UDP relay of the kind game projects ship, in plain asyncio: the baseline.

Same scheme as natctl (and noray): a lobby's host port P_h receives from
clients; each new client gets its own socket on a client port P_c, connected
to the host, so the host sees every client as relay:P_c and its replies there
go back to that client from relay:P_h. Every datagram crosses Python twice
(one receive, one send), which is what such relays do.

    python -m bench.relay_asyncio --relay-ip IP --lobby P_h=HOST_IP:PORT [...] [--seconds 600]

Prints ``ready`` once listening; stops on SIGTERM/SIGINT or after --seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import signal
import sys

Addr = tuple[str, int]


class ClientLeg(asyncio.DatagramProtocol):
    """relay:P_c, connected to the host: what the host sends here goes back to one client."""

    def __init__(self, lobby: Lobby, client: Addr) -> None:
        self.lobby, self.client = lobby, client
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        if self.lobby.transport is not None:
            self.lobby.transport.sendto(data, self.client)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP errors from the host side: a relay keeps going


class Lobby(asyncio.DatagramProtocol):
    """relay:P_h: clients send here; the first datagram of a new client opens its leg."""

    def __init__(self, relay_ip: str, host: Addr, ports: PortPool) -> None:
        self.relay_ip, self.host, self.ports = relay_ip, host, ports
        self.transport: asyncio.DatagramTransport | None = None
        self.legs: dict[Addr, ClientLeg] = {}
        self.pending: dict[Addr, list[bytes]] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        leg = self.legs.get(addr)
        if leg is not None and leg.transport is not None:
            leg.transport.sendto(data)
            return
        if addr in self.pending:  # its leg is being opened: keep the packet, in order
            if len(self.pending[addr]) < 1024:
                self.pending[addr].append(data)
            return
        self.pending[addr] = [data]
        asyncio.get_running_loop().create_task(self._open_leg(addr))

    async def _open_leg(self, client: Addr) -> None:
        loop = asyncio.get_running_loop()
        port = self.ports.take()
        _, leg = await loop.create_datagram_endpoint(lambda: ClientLeg(self, client),
                                                     local_addr=(self.relay_ip, port), remote_addr=self.host)
        self.legs[client] = leg
        for data in self.pending.pop(client, []):
            leg.transport.sendto(data)  # type: ignore[union-attr]

    def error_received(self, exc: Exception) -> None:
        pass


class PortPool:
    def __init__(self, low: int) -> None:
        self.next = low

    def take(self) -> int:
        self.next += 1
        return self.next - 1


def parse_lobby(text: str) -> tuple[int, Addr]:
    """``P_h=HOST_IP:PORT`` -> (P_h, (HOST_IP, PORT))."""
    try:
        port, host = text.split("=", 1)
        ip, hport = host.rsplit(":", 1)
        return int(port), (ip, int(hport))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected P_h=HOST_IP:PORT, got {text!r}") from None


async def main(relay_ip: str, lobbies: list[tuple[int, Addr]], seconds: float, client_ports: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    pool = PortPool(client_ports)
    for port, host in lobbies:
        await loop.create_datagram_endpoint(functools.partial(Lobby, relay_ip, host, pool), local_addr=(relay_ip, port))
    print("ready", flush=True)
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        pass


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="asyncio UDP relay (bench baseline)")
    ap.add_argument("--relay-ip", required=True)
    ap.add_argument("--lobby", type=parse_lobby, action="append", required=True)
    ap.add_argument("--client-ports", type=int, default=20000, help="first client port")
    ap.add_argument("--seconds", type=float, default=600, help="stop after this long, whatever happens")
    args = ap.parse_args()
    asyncio.run(main(args.relay_ip, args.lobby, args.seconds, args.client_ports))
    sys.exit(0)
