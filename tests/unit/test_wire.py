"""The registration wire format: round trips, no amplification, garbage rejected (hypothesis)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natctl.daemon import wire
from natctl.daemon.ratelimit import RateLimiter

tokens = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=16, max_size=64)


@given(tokens, st.integers(0, 2**32 - 1))
def test_round_trip_and_replies_never_larger_than_requests(token, nonce):
    req = wire.encode_request(token, nonce)
    assert wire.decode_request(req) == wire.Register(nonce, token)
    ok = wire.encode_registered(nonce, "198.18.0.1", 29999)
    err = wire.encode_error(nonce, wire.ERR_RATE_LIMITED)
    assert len(ok) <= len(req) and len(err) <= len(req)
    assert wire.decode_reply(ok) == (wire.REGISTERED, nonce, ("198.18.0.1", 29999))
    assert wire.decode_reply(err) == (wire.ERROR, nonce, wire.ERR_RATE_LIMITED)


@given(st.binary(max_size=200))
def test_garbage_is_rejected_or_a_valid_request(data):
    try:
        req = wire.decode_request(data)
    except wire.WireError:
        return
    assert wire.encode_request(req.token, req.nonce) == data


@pytest.mark.parametrize("token", ["short", "x" * 65, "tab\tinside-a-token-x"])
def test_bad_tokens(token):
    raw = token.encode()
    data = b"NATC\x01\x01\x00\x00\x00\x01" + bytes([len(raw)]) + raw
    with pytest.raises(wire.WireError):
        wire.decode_request(data)


def test_rate_limiter_per_source():
    rl = RateLimiter(rate=1.0, burst=3)
    assert [rl.allow("a", 0.0) for _ in range(4)] == [True, True, True, False]
    assert rl.allow("b", 0.0)  # another source has its own bucket
    assert not rl.allow("a", 0.5) and rl.allow("a", 1.6)
