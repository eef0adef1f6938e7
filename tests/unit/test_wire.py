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
    assert wire.decode_request(req) == wire.Register(nonce, token, wire.VERSION)
    assert wire.decode_request(wire.encode_request(token, nonce, 1)) == wire.Register(nonce, token, 1)
    assert wire.decode_request(wire.encode_request(token, nonce, 2)).opens
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
    assert wire.encode_request(req.token, req.nonce, req.version) == data


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


@given(st.integers(0, 2**32 - 1), st.integers(1, 65535))
def test_open_and_punch_round_trip(ticket, port):
    assert wire.decode_open(wire.encode_open(ticket, port)) == (ticket, port)
    assert wire.decode_punch(wire.encode_punch(ticket)) == ticket
    assert len(wire.encode_punch(ticket)) == wire.PUNCH_SIZE


@given(st.binary(max_size=40))
def test_garbage_is_no_open_and_no_punch(data):
    for decode, encode in ((wire.decode_punch, wire.encode_punch), (wire.decode_open, None)):
        try:
            got = decode(data)
        except wire.WireError:
            continue
        assert data[:4] == wire.MAGIC and (encode is None or encode(got) == data)


def test_the_kernel_recognises_the_punch_it_must_not_forward():
    """nft's rawpre rule and the XDP program match the first 6 bytes and the size of a PUNCH."""
    import re
    from pathlib import Path

    from natctl.kernel import nft

    punch = wire.encode_punch(7)
    assert nft.PUNCH_HEAD.to_bytes(6, "big") == punch[:6] and nft.PUNCH_SIZE == len(punch)
    header = (Path(__file__).parents[2] / "bpf" / "natctl.h").read_text()
    assert int(re.search(r"#define NATCTL_PUNCH_SIZE (\d+)", header).group(1)) == len(punch)
