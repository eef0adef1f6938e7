"""Relay port allocation (pure).

A host relay port P_h identifies a lobby for unknown senders, so it is unique
on the relay IP. A client relay port P_c only has to be unique among the
clients of one host address (the reverse key is host_addr . P_c), so the same
client port numbers are reused in every lobby. Host ports are taken from the
top of the range and client ports from the bottom, and neither ever equals a
port of the other kind, so a packet to a host port is never mistaken for a
reply to a client.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable

from natctl.errors import Exhausted
from natctl.model import Endpoint, PortRange


class Allocator:
    """In-memory view of the ports in use, built from a store snapshot."""

    def __init__(
        self,
        ports: PortRange,
        host_ports: Iterable[int] = (),
        client_ports: Iterable[tuple[Endpoint, int]] = (),
        reserved: Iterable[int] = (),
        is_host_port: Callable[[int], bool] | None = None,
        client_numbers: Iterable[int] = (),
    ) -> None:
        """``is_host_port`` answers for host ports not loaded into ``host_ports`` (the daemon asks
        the store's index instead of loading every lobby to admit one client)."""
        self.ports = ports
        self.reserved = set(reserved)
        self.host_ports: set[int] = set()
        self.client_ports: dict[Endpoint, set[int]] = defaultdict(set)
        # How many hosts use each client port number: a new host port must avoid all.
        self._client_use: dict[int, int] = defaultdict(int)
        # Ports are only ever taken, never given back, during an allocator's life: the highest free host port
        # and each host's lowest free client port only move one way, so a search resumes where the last stopped
        # (a file of 2,000 lobbies of 50 costs what it allocates, not its square).
        self._next_host = ports.high
        self._next_client: dict[Endpoint, int] = {}
        self.host_ports.update(host_ports)
        self._is_host_port = is_host_port or self.host_ports.__contains__
        for host, port in client_ports:
            self.take_client(host, port)
        for port in client_numbers:  # in use by some host's clients: only host_port() needs to know
            self._client_use[port] += 1

    def host_port(self) -> int:
        """Take the highest free host port."""
        for port in range(self._next_host, self.ports.low - 1, -1):
            if port not in self.host_ports and port not in self.reserved and not self._client_use.get(port):
                self.host_ports.add(port)
                self._next_host = port - 1
                return port
        raise Exhausted(
            f"no free host relay port in {self.ports} ({len(self.host_ports)} lobbies hold one)",
            "close idle lobbies or widen the range with --ports",
        )

    def client_port(self, host: Endpoint) -> int:
        """Take the lowest port free among this host's clients."""
        used = self.client_ports[host]
        for port in range(self._next_client.get(host, self.ports.low), self.ports.high + 1):
            if port not in used and port not in self.reserved and not self._is_host_port(port):
                self.take_client(host, port)
                self._next_client[host] = port + 1
                return port
        raise Exhausted(
            f"no free client relay port in {self.ports} for host {host} ({len(used)} clients)",
            "remove clients from this lobby or widen the range with --ports",
        )

    def take_client(self, host: Endpoint, port: int) -> None:
        self.client_ports[host].add(port)
        self._client_use[port] += 1
