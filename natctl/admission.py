"""Who may join a lobby (pure): one rule for the CLI's explicit mappings and the daemon's first packets.

The same lobby gives the same answer on both paths, with the same message
and hint; only what each path does with a refusal differs (the CLI prints
it, the daemon blocks the sender in the kernel for a while).
"""

from __future__ import annotations

import functools
import ipaddress
import socket
from collections.abc import Collection, Iterable
from typing import Literal

from natctl.errors import Conflict
from natctl.model import Endpoint, Lobby

# Who asks: an operator naming a client (``natctl map add``), or an unknown sender's first packet.
By = Literal["admin", "sender"]


class NotAllowed(Conflict):
    """A client the lobby does not admit (its network is not allowed, the lobby is full, it is the host)."""


def check(lobby: Lobby, client: Endpoint, host: Endpoint | None, members: int, by: By) -> None:
    """Return if ``client`` may become member number ``members + 1`` of ``lobby``; else raise NotAllowed.

    An open lobby admits anyone. A lobby with allowed networks admits only
    senders from them, whoever asks. A lobby with neither admits no unknown
    sender, but an operator's explicit mapping needs no --allow.
    """
    if host is not None and client == host:
        raise NotAllowed(f"client {client} is the lobby's host", "a host cannot be its own client")
    restricted = lobby.open or bool(lobby.allow) or by == "sender"
    if restricted and not sender_allowed(lobby, client.ip):
        raise NotAllowed(f"client {client.ip} is not allowed in lobby {lobby.name!r}",
                         f"allowed networks: {', '.join(lobby.allow) or 'none'}; "
                         "recreate the lobby with --allow or --open")
    if members >= lobby.max_clients:
        raise NotAllowed(f"lobby {lobby.name!r} is full ({lobby.max_clients} clients)",
                         "remove a client or recreate the lobby with a larger --max-clients")


def check_sender(lobby: Lobby, sender: Endpoint, host: Endpoint | None, members: Collection[Endpoint],
                 count: int) -> None:
    """``check`` for an unknown sender's packet against what its host port admitted lately (the daemon's
    cache: the lobby's ``members`` and their ``count``).

    Returns if the store must decide (the sender is a member already, or may join); raises NotAllowed
    if the rule refuses it, so a flood of refused senders costs the daemon no store read.
    """
    if sender in members:
        return
    check(lobby, sender, host, count, "sender")


@functools.lru_cache(maxsize=4096)
def _networks(open_: bool, allow: tuple[str, ...]) -> tuple[ipaddress.IPv4Network, ...]:
    if open_:
        return (ipaddress.IPv4Network("0.0.0.0/0"),)
    return tuple(ipaddress.collapse_addresses(ipaddress.IPv4Network(n, strict=False) for n in allow))


@functools.lru_cache(maxsize=4096)
def _masks(open_: bool, allow: tuple[str, ...]) -> tuple[tuple[int, int], ...]:
    """(network, netmask) as integers: a sender's first packet is checked in about a microsecond."""
    return tuple((int(n.network_address), int(n.netmask)) for n in _networks(open_, allow))


def sender_networks(lobby: Lobby) -> tuple[str, ...]:
    """The source networks whose unknown senders ``lobby`` admits: everyone (0.0.0.0/0) when it is
    open, else its allowed networks (overlaps merged), else none.

    The kernel's allow4 set is planned from this (natctl.plan), so a sender outside them is dropped
    before it reaches the daemon; ``check`` refuses by the same networks.
    """
    return tuple(str(n) for n in _networks(lobby.open, lobby.allow))


def sender_allowed(lobby: Lobby, ip: str) -> bool:
    """Is ``ip`` (dotted quad) inside ``sender_networks(lobby)``?"""
    try:
        addr = int.from_bytes(socket.inet_pton(socket.AF_INET, ip), "big")
    except (OSError, TypeError):
        return False
    return any(addr & mask == net for net, mask in _masks(lobby.open, lobby.allow))


def hash_token(token: str) -> str:
    """What the store keeps of a lobby's registration token (never the token itself)."""
    import hashlib  # here: loading OpenSSL costs every other command ~9 ms

    return hashlib.sha256(token.encode()).hexdigest()


def lobby_for_token(token: str, candidates: Iterable[Lobby]) -> Lobby | None:
    """The lobby whose token hash matches, compared in constant time."""
    import hmac

    digest = hash_token(token)
    return next((lb for lb in candidates if hmac.compare_digest(lb.token_hash, digest)), None)
