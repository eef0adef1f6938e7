"""The service API: every command of the CLI and the daemon goes through here.

``Service`` only composes: a ``Reconciler`` (natctl.sync) that owns the
store, the kernel and the one way to change them, and the rooms that receive
it: lobbies and hand-made mappings (natctl.lobbies), host registration and
client admission (natctl.registrar), forwards (natctl.forwards) and cleanup
(natctl.expiry). None of them imports this module.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from natctl import expiry
from natctl.config import Settings
from natctl.forwards import Forwards
from natctl.kernel.backend import Kernel
from natctl.lobbies import Lobbies, Made
from natctl.model import Client, Endpoint, Forward, Lobby, MappingLine
from natctl.store import Store
from natctl.sync import Reconciler
from natctl.views import ForwardView, LobbyView, MappingView, SyncResult

if TYPE_CHECKING:
    from natctl.registrar import Admission, Registrar, Registration


class Service:
    def __init__(self, settings: Settings, kernel_factory: Callable[[], Kernel] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.rec = Reconciler(settings, kernel_factory, clock)
        self._lobbies = Lobbies(self.rec)
        self._registrar_: Registrar | None = None
        self._forwards = Forwards(self.rec)

    # --- what the rooms share

    @property
    def _registrar(self) -> Registrar:
        """Built on first use: only the daemon's path registers hosts and admits clients, so a CLI command
        skips importing it (and OpenSSL's hashing)."""
        if self._registrar_ is None:
            from natctl.registrar import Registrar

            self._registrar_ = Registrar(self.rec)
        return self._registrar_

    @property
    def store(self) -> Store:
        return self.rec.store

    @property
    def kernel(self) -> Kernel:
        return self.rec.kernel

    @property
    def relay_ip(self) -> str:
        return self.rec.relay_ip

    def clock(self) -> float:
        return self.rec.clock()

    def close(self) -> None:
        self.rec.close()

    # --- the whole relay

    def apply(self) -> SyncResult:
        """Make the kernel hold exactly what the store says (a no-op when it already does)."""
        return self.rec.apply()

    def in_sync(self) -> bool:
        return self.rec.in_sync()

    def cleanup(self, apply: bool = True) -> dict[str, list]:
        return expiry.cleanup(self.rec, apply)

    def expire_idle(self, apply: bool = True) -> list[str]:
        return expiry.expire_idle(self.rec, apply)

    def uninstall(self) -> bool:
        self.rec.check_owner()  # another store's relay is not this store's to remove
        return self.rec.kernel.uninstall()

    # --- lobbies and mappings

    def lobby_create(self, name: str, allow: tuple[str, ...] = (), ttl: int | None = None,
                     open_: bool = False, max_clients: int = 64, apply: bool = True, region: str | None = None,
                     relay: str | None = None) -> tuple[Lobby, str]:
        return self._lobbies.create(name, allow, ttl, open_, max_clients, apply, region, relay)

    def lobby_close(self, name: str, apply: bool = True) -> Lobby:
        return self._lobbies.close(name, apply)

    def lobbies(self, include_closed: bool = False) -> list[LobbyView]:
        return self._lobbies.listing(include_closed)

    def map_add(self, lobby: str, host: Endpoint, clients: list[Endpoint], proto: str = "udp",
                apply: bool = True) -> list[MappingView]:
        return self._lobbies.map_add(lobby, host, clients, proto, apply)

    def map_remove(self, lobby: str, client: Endpoint, proto: str = "udp", apply: bool = True) -> None:
        self._lobbies.map_remove(lobby, client, proto, apply)

    def map_file(self, lines: Iterable[MappingLine | None], remove: bool = False, create_lobbies: bool = False,
                 apply: bool = True) -> Made:
        """A file of mappings (natctl map add/remove --from) in one store transaction and one kernel change."""
        return self._lobbies.map_file(lines, remove, create_lobbies, apply)

    def mappings(self, counters: bool = False) -> list[MappingView]:
        return self._lobbies.mappings(counters)

    # --- the daemon's path

    def host_ports(self) -> list[int]:
        """Host relay ports of open lobbies: where the daemon listens for unknown senders."""
        return self.rec.store.host_ports()

    def register_host(self, token: str, addr: Endpoint, opens: bool = False) -> Registration:
        return self._registrar.register_host(token, addr, opens)

    def admit_client(self, host_port: int, addr: Endpoint, proto: str = "udp", expect: bool = False) -> Admission:
        return self._registrar.admit_client(host_port, addr, proto, expect)

    def settle_client(self, client_id: int, seen: Endpoint | None) -> Admission:
        """Install a held client with the host's address its punch showed (None: the registered one)."""
        return self._registrar.settle(client_id, seen)

    def clients(self, lobby_id: int) -> list[Client]:
        return self.rec.store.clients(lobby_id)

    def block(self, ip: str, host_port: int) -> None:
        """Drop a refused sender's packets to a host port in the kernel for a while."""
        self.rec.kernel.block(ip, host_port)

    # --- forwards

    def forward_add(self, port: int, target: Endpoint, proto: str = "tcp", ttl: int | None = None,
                    owner: str = "", apply: bool = True) -> Forward:
        return self._forwards.add(port, target, proto, ttl, owner, apply)

    def forward_remove(self, port: int, apply: bool = True) -> Forward:
        return self._forwards.remove(port, apply)

    def forwards(self, counters: bool = False) -> list[ForwardView]:
        return self._forwards.listing(counters)
