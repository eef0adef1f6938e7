"""One admission rule for both paths: an operator's explicit mapping and an unknown sender's first packet."""

from __future__ import annotations

import re

import pytest

from natctl.admission import NotAllowed, check, hash_token, lobby_for_token
from natctl.errors import Conflict
from natctl.model import Endpoint, Lobby

HOST = Endpoint("198.18.1.2", 27015)
IN, OUT = Endpoint("198.18.2.2", 40001), Endpoint("198.18.7.7", 40001)
CLOSED = Lobby(1, "closed")  # no --allow, not --open
ALLOW = Lobby(2, "allow", allow=("198.18.2.0/24",))
OPEN = Lobby(3, "open", open=True, max_clients=2)


@pytest.mark.parametrize("lobby,client,members,by,refusal", [
    # A lobby with neither --allow nor --open: the operator may map anyone, no stranger gets in.
    (CLOSED, OUT, 0, "admin", None),
    (CLOSED, OUT, 0, "sender", "not allowed in lobby 'closed'"),
    # Allowed networks bind everyone, the operator too.
    (ALLOW, IN, 0, "admin", None),
    (ALLOW, IN, 0, "sender", None),
    (ALLOW, OUT, 0, "admin", "not allowed in lobby 'allow'"),
    (ALLOW, OUT, 0, "sender", "not allowed in lobby 'allow'"),
    # Open admits anyone, until it is full.
    (OPEN, OUT, 1, "sender", None),
    (OPEN, OUT, 2, "sender", "is full (2 clients)"),
    (OPEN, OUT, 2, "admin", "is full (2 clients)"),
    # The host is never its own client.
    (OPEN, HOST, 0, "admin", "is the lobby's host"),
    (OPEN, HOST, 0, "sender", "is the lobby's host"),
])
def test_one_rule_for_both_paths(lobby, client, members, by, refusal):
    if refusal is None:
        check(lobby, client, HOST, members, by)
        return
    with pytest.raises(NotAllowed, match=re.escape(refusal)) as err:
        check(lobby, client, HOST, members, by)
    assert isinstance(err.value, Conflict) and err.value.exit_code == 4  # the CLI's documented code
    assert err.value.hint  # every refusal says what to do


def test_tokens_are_compared_by_hash():
    lobby = Lobby(1, "a", token_hash=hash_token("s" * 32))
    assert lobby_for_token("s" * 32, [lobby]) == lobby
    assert lobby_for_token("t" * 32, [lobby]) is None
