"""Who may join a lobby (pure): one rule for the CLI's explicit mappings and the daemon's first packets.

The same lobby gives the same answer on both paths, with the same message
and hint; only what each path does with a refusal differs (the CLI prints
it, the daemon blocks the sender in the kernel for a while).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
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
    restricted = not lobby.open and (bool(lobby.allow) or by == "sender")
    if restricted and not lobby.allows(client.ip):
        raise NotAllowed(f"client {client.ip} is not allowed in lobby {lobby.name!r}",
                         f"allowed networks: {', '.join(lobby.allow) or 'none'}; "
                         "recreate the lobby with --allow or --open")
    if members >= lobby.max_clients:
        raise NotAllowed(f"lobby {lobby.name!r} is full ({lobby.max_clients} clients)",
                         "remove a client or recreate the lobby with a larger --max-clients")


def hash_token(token: str) -> str:
    """What the store keeps of a lobby's registration token (never the token itself)."""
    return hashlib.sha256(token.encode()).hexdigest()


def lobby_for_token(token: str, candidates: Iterable[Lobby]) -> Lobby | None:
    """The lobby whose token hash matches, compared in constant time."""
    digest = hash_token(token)
    return next((lb for lb in candidates if hmac.compare_digest(lb.token_hash, digest)), None)
