"""The LAN API: LANs and members change through one function, rows and kernel together or not at all.

``_change`` opens a store transaction through the Reconciler (natctl.sync) with an ``Effect`` that
makes the relay's LAN interface, routes and nftables tables match the rows inside it; the rows
commit only if that worked, and if anything failed the kernel is put back to the rows that remain.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from natctl import admission
from natctl.errors import Conflict, KernelError, NotFound, UsageError
from natctl.lan import model
from natctl.lan.model import Lan, LanSettings, Member
from natctl.lan.relay import Peer, Relay
from natctl.lan.store import LanStore
from natctl.store import Store
from natctl.sync import Reconciler

TAKEOVER_SECONDS = 180  # a member name whose tunnel has been quiet this long may be taken by a new key


class Kernel(Protocol):
    """What the service needs of the relay's kernel (natctl.lan.relay.Relay; a fake in the unit tests)."""

    def public_key(self) -> str: ...

    def sync(self, lans: list[Lan], members: list[Member]) -> None: ...

    def down(self) -> bool: ...

    def peers(self) -> dict[str, Peer]: ...

    def fanout_counters(self) -> dict[str, tuple[int, int]]: ...

    def local_networks(self) -> list[str]: ...


@dataclass(frozen=True)
class LanView:
    """One LAN for listings; the field names are the ``lan list --json`` keys."""

    name: str
    subnet: str
    broadcast: str
    members: int
    max_members: int
    created: float
    expires: float | None
    endpoint: str  # what members' tunnels dial: host:port


@dataclass(frozen=True)
class MemberView:
    """One member for listings; the field names are the ``lan members --json`` keys."""

    lan: str
    name: str
    address: str
    public_key: str
    created: float
    tunnel: str  # up, down or unknown
    endpoint: str | None  # where its tunnel comes from, as the relay sees it
    last_handshake: float | None
    rx_bytes: int | None  # from the member, through WireGuard
    tx_bytes: int | None  # to the member
    broadcasts: int | None  # broadcasts and multicast it sent, fanned out (since the LAN last changed)
    copies: int | None  # copies the relay's kernel made of them


@dataclass(frozen=True)
class Joined:
    """What a member needs to bring its tunnel up (the daemon's answer, or ``lan add``'s config)."""

    lan: str
    member: str
    address: str
    prefixlen: int
    server_key: str
    port: int
    mtu: int
    relay_ip: str


class Sync:
    """The relay's LAN kernel state made to match the rows, as part of a Reconciler change."""

    def __init__(self, kernel: Kernel, lans: LanStore, then: Callable[[], None] | None = None) -> None:
        self.kernel, self.lans, self.then = kernel, lans, then

    def apply(self, store: Store) -> None:
        self.kernel.sync(self.lans.lans(), self.lans.members())
        if self.then is not None:
            self.then()

    def undo(self, store: Store) -> None:
        with contextlib.suppress(Exception):  # the rolled-back rows: match them again
            self.kernel.sync(self.lans.lans(), self.lans.members())


class LanService:
    def __init__(self, rec: Reconciler, settings: LanSettings | None = None, kernel: Kernel | None = None) -> None:
        self.rec = rec
        self.settings = settings or rec.settings.lan
        key_file = self.settings.key_file or os.path.join(os.path.dirname(os.path.abspath(rec.settings.state)),
                                                          f"{self.settings.interface}.key")
        self.kernel: Kernel = kernel or Relay(self.settings, key_file)
        self._rows: LanStore | None = None

    @property
    def rows(self) -> LanStore:
        if self._rows is None:
            self.rec.own_store("virtual LANs")
            self._rows = LanStore(self.rec.store)
        return self._rows

    @contextlib.contextmanager
    def _change(self, then: Callable[[], None] | None = None) -> Iterator[LanStore]:
        """Rows, then the relay's kernel made to match them, then ``then``; commit only if all worked."""
        rows = self.rows  # made before the transaction: creating its tables would commit it
        self.rec.check_forwarding()  # members' packets are routed (natctl.preflight)
        with self.rec.change(apply=False, effect=Sync(self.kernel, rows, then)):
            yield rows

    def _lan(self, name: str) -> Lan:
        lan = self.rows.lan(name)
        if lan is None:
            raise NotFound(f"no LAN named {name!r}", f"see 'natctl lan list', or create one: natctl lan create {name}")
        return lan

    def _member(self, lan: Lan, name: str) -> Member:
        member = next((m for m in self.rows.members(lan.id) if m.name == name), None)
        if member is None:
            raise NotFound(f"LAN {lan.name!r} has no member {name!r}", f"see 'natctl lan members {lan.name}'")
        return member

    @property
    def endpoint_host(self) -> str:
        return self.settings.endpoint or self.rec.relay_ip

    # --- LANs

    def create(self, name: str, subnet: str | None = None, ttl: int | None = None,
               max_members: int | None = None) -> tuple[LanView, str]:
        """A LAN with its own subnet; returns it and its join token (shown once, stored hashed)."""
        token = secrets.token_urlsafe(24)
        avoid = [*self.kernel.local_networks(), self.rec.settings.gm.subnet]
        with self._change() as rows:
            if rows.lan(name) is not None:
                raise Conflict(f"a LAN named {name!r} already exists", f"pick another name, or close it: natctl lan close {name}")
            chosen = model.pick_subnet(self.settings, (lan.subnet for lan in rows.lans()), subnet, avoid)
            lan = rows.add_lan(name, chosen, admission.hash_token(token), ttl if ttl is not None else self.settings.ttl,
                               max_members or self.settings.max_members, self.rec.clock())
        return self._view(lan, 0), token

    def close(self, name: str) -> Lan:
        """The LAN, its members' peers and its rules go; its subnet is free again."""
        lan = self._lan(name)
        with self._change() as rows:
            rows.remove_lan(lan.id)
        return lan

    def lans(self) -> list[LanView]:
        counts: dict[int, int] = {}
        for m in self.rows.members():
            counts[m.lan_id] = counts.get(m.lan_id, 0) + 1
        return [self._view(lan, counts.get(lan.id, 0)) for lan in self.rows.lans()]

    def _view(self, lan: Lan, members: int) -> LanView:
        return LanView(lan.name, lan.subnet, lan.broadcast, members, lan.max_members, lan.created,
                       lan.created + lan.ttl if lan.ttl else None, f"{self.endpoint_host}:{self.settings.listen_port}")

    # --- members

    def members(self, name: str) -> list[MemberView]:
        lan = self._lan(name)
        try:
            peers, fans = self.kernel.peers(), self.kernel.fanout_counters()
        except KernelError:  # not root: the control socket and the tables are root's
            peers, fans = {}, {}
        now = self.rec.clock()
        out = []
        for m in self.rows.members(lan.id):
            peer = peers.get(m.public_key)
            shake = peer.last_handshake if peer else None
            state = "unknown" if not peers else ("up" if shake and now - shake < TAKEOVER_SECONDS else "down")
            bc = fans.get(m.address)
            out.append(MemberView(lan.name, m.name, m.address, m.public_key, m.created, state,
                                  peer.endpoint if peer else None, shake, peer.rx_bytes if peer else None,
                                  peer.tx_bytes if peer else None, bc[0] if bc else None, bc[1] if bc else None))
        return out

    def _joined(self, lan: Lan, member: Member) -> Joined:
        return Joined(lan.name, member.name, member.address, lan.network.prefixlen, self.kernel.public_key(),
                      self.settings.listen_port, self.settings.mtu, self.rec.relay_ip)

    def _admit(self, rows: LanStore, lan: Lan, name: str, public_key: str) -> Member:
        """Add a member (or find it again: same name, same key); raises if the LAN cannot take it."""
        members = rows.members(lan.id)
        same = next((m for m in members if m.name == name), None)
        if same is not None and same.public_key == public_key:
            return same
        if same is not None:
            peer = self.kernel.peers().get(same.public_key)
            quiet = peer is None or peer.last_handshake is None or \
                self.rec.clock() - peer.last_handshake >= TAKEOVER_SECONDS
            if not quiet or self.rec.clock() - same.created < TAKEOVER_SECONDS:
                raise NameTaken(f"LAN {lan.name!r} already has a member named {name!r}",
                                f"pick another name (--name), or remove it: natctl lan remove {lan.name} {name}")
            rows.remove_member(same.id)  # its tunnel went quiet: the name is free for the new key
            members = [m for m in members if m.id != same.id]
        if any(m.public_key == public_key for m in rows.members()):
            raise Conflict("that public key is already a member of a LAN", "make a new key pair for each member")
        address = model.next_address(lan.subnet, (m.address for m in members), lan.name, lan.max_members)
        return rows.add_member(lan.id, name, address, public_key, self.rec.clock())

    def add(self, name: str, member: str, deliver: Callable[[str], None] | None = None) -> tuple[MemberView, str]:
        """The admin adds a member by hand: the relay makes its key pair and returns its WireGuard config.

        ``deliver`` (print it, write it) runs before the commit: if it fails, the member is not made."""
        from natctl.lan.member import keypair, render_config

        lan = self._lan(name)
        private, public = keypair()
        config = ""

        def hand_over() -> None:
            if deliver is not None:
                deliver(config)

        with self._change(then=hand_over) as rows:
            if any(m.name == member for m in rows.members(lan.id)):
                raise NameTaken(f"LAN {lan.name!r} already has a member named {member!r}",
                                f"pick another name, or remove it first: natctl lan remove {lan.name} {member}")
            m = self._admit(rows, lan, member, public)
            config = render_config(self._joined(lan, m), private, self.endpoint_host)
        return self._member_view(lan, m), config

    def _member_view(self, lan: Lan, m: Member) -> MemberView:
        return MemberView(lan.name, m.name, m.address, m.public_key, m.created, "down", None, None, None, None, None, None)

    def remove(self, name: str, member: str) -> Member:
        lan = self._lan(name)
        m = self._member(lan, member)
        with self._change() as rows:
            rows.remove_member(m.id)
        return m

    def join(self, token: str, member: str, public_key: str) -> Joined:
        """A member joins by token (the daemon's path). An unknown or expired token is NotFound."""
        digest = admission.hash_token(token)
        now = self.rec.clock()
        lan = next((x for x in self.rows.lans() if hmac.compare_digest(x.token_hash, digest)), None)
        if lan is None or lan.expired(now):
            raise NotFound("unknown or expired LAN token", "ask the relay's admin for the LAN's current token")
        with self._change() as rows:
            m = self._admit(rows, lan, member, model.check_public_key(public_key))
        return self._joined(lan, m)

    # --- the interface itself, and cleanup

    def up(self) -> int:
        """(Re)build the interface, routes and rules from the store (after a reboot, say); safe to repeat."""
        with self._change() as rows:
            if not rows.lans():
                raise NotFound("no LAN to bring up", "create one: natctl lan create NAME")
        return len(self.rows.members())

    def down(self) -> bool:
        return self.kernel.down()

    def cleanup(self) -> dict[str, list[str]]:
        """Close LANs past their TTL; remove members whose tunnel has been quiet for ``idle_timeout``."""
        now = self.rec.clock()
        expired = [lan for lan in self.rows.lans() if lan.expired(now)]
        idle: list[tuple[Lan, Member]] = []
        lans = {lan.id: lan for lan in self.rows.lans() if lan not in expired}
        members = [m for m in self.rows.members() if m.lan_id in lans]
        if self.settings.idle_timeout > 0 and members:
            try:
                peers = self.kernel.peers()
            except KernelError:
                peers = {}
            for m in members:
                peer = peers.get(m.public_key)
                last = max(m.created, peer.last_handshake or 0) if peer else m.created
                if now - last >= self.settings.idle_timeout:
                    idle.append((lans[m.lan_id], m))
        if expired or idle:
            with self._change() as rows:
                for lan in expired:
                    rows.remove_lan(lan.id)
                for _, m in idle:
                    rows.remove_member(m.id)
        return {"lans": [lan.name for lan in expired], "members": [f"{lan.name}/{m.name}" for lan, m in idle]}


class NameTaken(Conflict):
    """A member name in use in its LAN (by another key whose tunnel is alive)."""


def parse_member_name(text: str) -> str:
    from natctl.model import parse_name

    name = parse_name(text, "member name")
    if len(name) > 32:
        raise UsageError(f"member name {name!r} is too long", "use at most 32 characters")
    return name
