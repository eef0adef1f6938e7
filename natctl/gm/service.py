"""The GM API: add and remove GMs (store row and VPN peer together), open and close sessions.

A GM row and its VPN peer (or ccd file) change in one step through the
Reconciler: the row is written inside its store transaction, the VPN is made
to match the rows (an ``Effect``), and the transaction commits only if that
worked; on any failure the VPN is put back to the rows that remain. A session
is a forward (owner ``gm:NAME``) made through ``natctl.forwards``, so
``cleanup`` ends it on time.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from natctl.errors import Conflict, KernelError, NotFound
from natctl.forwards import Forwards
from natctl.gm.model import OWNER, Gm, GmSettings, Tunnel, check_ports, next_address, pick_port
from natctl.gm.openvpn import OpenVpn
from natctl.gm.store import GmStore
from natctl.gm.wireguard import WireGuard
from natctl.model import Endpoint, Forward
from natctl.store import Store
from natctl.sync import Reconciler

DEFAULT_SESSION = 4 * 3600


class TunnelDown(Conflict):
    """A session for a GM whose tunnel is not up would forward players into nothing."""


@dataclass(frozen=True)
class GmView:
    """One GM for listings; the field names are the ``gm list --json`` keys."""

    name: str
    vpn: str
    address: str
    port: int
    relay: str  # what players connect to: relay_ip:port
    public_key: str
    created: float
    session: bool
    game_port: int | None
    proto: str | None
    expires: float | None
    tunnel: str  # up, down or unknown
    last_handshake: float | None
    endpoint: str | None  # where the GM's tunnel comes from, as the relay sees it


class VpnPeers:
    """The VPN made to match the GM rows, as part of a Reconciler change (see natctl.sync.Effect)."""

    def __init__(self, vpn: WireGuard | OpenVpn, gms: GmStore, then: Callable[[], None] | None = None) -> None:
        self.vpn, self.gms, self.then = vpn, gms, then

    def apply(self, store: Store) -> None:
        self.vpn.sync(self.gms.all())
        if self.then is not None:
            self.then()

    def undo(self, store: Store) -> None:
        # The VPN may hold a peer the rolled-back rows do not: match them again.
        with contextlib.suppress(Exception):
            self.vpn.sync(self.gms.all())


class GmService:
    def __init__(self, rec: Reconciler, settings: GmSettings | None = None) -> None:
        """GMs over ``rec``'s store and kernel, with ``settings`` (default: the [gm] table of rec's settings)."""
        settings = settings or rec.settings.gm
        check_ports(settings, rec.settings.ports, rec.settings.registration_port)
        self.rec, self.forwards, self.settings = rec, Forwards(rec), settings
        self._gms: GmStore | None = None
        key_file = settings.key_file or os.path.join(os.path.dirname(os.path.abspath(rec.settings.state)),
                                                     f"{settings.interface}.key")
        self.vpn: WireGuard | OpenVpn = (WireGuard(settings, key_file) if settings.vpn == "wireguard"
                                         else OpenVpn(settings))

    @property
    def gms(self) -> GmStore:
        if self._gms is None:
            self.rec.own_store("game masters' VPN")
            self._gms = GmStore(self.rec.store)
        return self._gms

    @contextlib.contextmanager
    def _change(self, then: Callable[[], None] | None = None) -> Iterator[GmStore]:
        """Rows, then the VPN made to match them, then ``then``; commit only if all worked (no kernel part)."""
        gms = self.gms  # made before the transaction: creating its table would commit it
        with self.rec.change(apply=False, effect=VpnPeers(self.vpn, gms, then)):
            yield gms

    def _check_rows(self, rows: list[Gm]) -> None:
        """Stored GMs must fit the VPN settings this natctl runs with."""
        for g in rows:
            if g.vpn != self.settings.vpn or ipaddress.IPv4Address(g.address) not in self.settings.network:
                raise Conflict(f"GM {g.name} uses {g.vpn} address {g.address}, but natctl now runs "
                               f"{self.settings.vpn} on {self.settings.subnet}",
                               "use the VPN settings the GMs were added with (natctl gm --vpn/--subnet)")

    def _gm(self, name: str) -> Gm:
        gm = self.gms.get(name)
        if gm is None:
            raise NotFound(f"no GM named {name!r}", f"see 'natctl gm list', or add one: natctl gm add {name}")
        return gm

    def _sessions(self) -> dict[str, Forward]:
        return {f.owner[len(OWNER):]: f for f in self.rec.store.forwards() if f.owner.startswith(OWNER)}

    # --- GMs

    def add(self, name: str, port: int | None = None,
            deliver: Callable[[str], None] | None = None) -> tuple[GmView, str]:
        """Give a GM an address, a port and a VPN peer; returns it and its client configuration.

        ``deliver`` (print it, write it) runs before the commit: if it fails, the GM is not made.
        """
        config = ""

        def hand_over() -> None:
            if deliver is not None:
                deliver(config)

        with self._change(then=hand_over) as gms:
            rows = gms.all()
            self._check_rows(rows)
            if gms.get(name) is not None:
                raise Conflict(f"a GM named {name!r} already exists",
                               f"pick another name, or remove it first: natctl gm remove {name}")
            taken = {g.port for g in rows} | {f.port for f in self.rec.store.forwards()}
            chosen = pick_port(self.settings, taken, port)
            address = next_address(self.settings, (g.address for g in rows))
            identity = self.vpn.identity(name)
            gm = Gm(name, self.settings.vpn, address, chosen, identity.public_key, self.rec.clock())
            self.vpn.ensure_up()
            config = self.vpn.client_config(gm, identity, self.rec.relay_ip)
            gms.add(gm)
        return self._view(gm, None, Tunnel("down")), config

    def remove(self, name: str) -> Gm:
        """Close the GM's session, then drop its row and peer: its address and port are free again."""
        gm = self._gm(name)
        session = self._sessions().get(name)
        if session is not None:
            self.forwards.remove(session.port)
        with self._change() as gms:
            gms.remove(name)
        return gm

    def list(self) -> list[GmView]:
        rows = self.gms.all()
        sessions = self._sessions()
        try:
            tunnels = self.vpn.tunnels(rows, self.rec.clock())
        except KernelError:  # e.g. not root: the control socket is root's
            tunnels = {}
        return [self._view(g, sessions.get(g.name), tunnels.get(g.name, Tunnel("unknown"))) for g in rows]

    def _view(self, gm: Gm, session: Forward | None, tunnel: Tunnel) -> GmView:
        live = session is not None and not session.expired(self.rec.clock())
        return GmView(gm.name, gm.vpn, gm.address, gm.port, f"{self.rec.relay_ip}:{gm.port}", gm.public_key,
                      gm.created, live, session.target.port if live and session else None,
                      session.proto if live and session else None,
                      session.created + session.ttl if live and session and session.ttl else None,
                      tunnel.state, tunnel.last_handshake, tunnel.endpoint)

    # --- the VPN itself

    def up(self) -> int:
        """Start the VPN (if natctl runs it) and give it every GM's peer; safe to repeat."""
        with self._change() as gms:
            self._check_rows(gms.all())
            self.vpn.ensure_up()
        return len(self.gms.all())

    def down(self) -> bool:
        return self.vpn.down()

    # --- sessions

    def open(self, name: str, ttl: int = DEFAULT_SESSION, game_port: int = 1802, proto: str = "tcp") -> GmView:
        """Forward the GM's public port to its VPN address for ``ttl`` seconds."""
        gm = self._gm(name)
        now = self.rec.clock()
        session = self._sessions().get(name)
        if session is not None and not session.expired(now):
            raise Conflict(f"GM {name} already has a session on port {session.port}",
                           f"close it first: natctl gm close {name}")
        tunnel = self.vpn.tunnels([gm], now)[name]
        if tunnel.state != "up":
            raise TunnelDown(f"GM {name}'s tunnel is down", tunnel.problem)
        self.rec.check_forwarding()  # forwards into the tunnel are routed traffic (natctl.preflight)
        if session is not None:  # expired, not yet cleaned up: its port is this GM's to reuse
            self.forwards.remove(session.port)
        fwd = self.forwards.add(gm.port, Endpoint(gm.address, game_port), proto, ttl, owner=OWNER + name)
        return self._view(gm, fwd, tunnel)

    def close(self, name: str) -> Forward:
        self._gm(name)
        session = self._sessions().get(name)
        if session is None:
            raise NotFound(f"GM {name} has no open session", f"open one: natctl gm open {name}")
        return self.forwards.remove(session.port)

