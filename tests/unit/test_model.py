import pytest

from natctl.errors import UsageError
from natctl.model import (
    Endpoint,
    Lobby,
    format_duration,
    parse_cidr,
    parse_duration,
    parse_endpoint,
    parse_int,
    parse_name,
    parse_port,
    parse_port_range,
)


@pytest.mark.parametrize("text,seconds", [("90s", 90), ("15m", 900), ("4h", 14400), ("1h30m", 5400),
                                          ("1d", 86400), ("120", 120)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds
    assert parse_duration(format_duration(seconds)) == seconds


@pytest.mark.parametrize("bad", ["", "0", "4x", "h", "-5m", "1h 30m", "1.5h"])
def test_bad_durations(bad):
    with pytest.raises(UsageError, match="duration"):
        parse_duration(bad)


def test_endpoints():
    assert parse_endpoint("198.18.0.7:27015") == Endpoint("198.18.0.7", 27015)
    for bad in ["198.18.0.7", "198.18.0.7:0", "198.18.0.7:70000", "1.2.3:80", "host:80", ":80", "198.18.0.1:x"]:
        with pytest.raises(UsageError):
            parse_endpoint(bad)


def test_ports_cidrs_names():
    assert parse_port("8809") == 8809
    assert parse_cidr("198.18.5.7/16") == "198.18.0.0/16"
    with pytest.raises(UsageError):
        parse_cidr("198.18.0.0/33")
    with pytest.raises(UsageError):
        parse_name("bad name")
    with pytest.raises(UsageError):
        parse_name("-x")
    assert parse_port_range("20000-29999").low == 20000
    for bad in ["29999-20000", "80-2000", "20000", "a-b"]:
        with pytest.raises(UsageError):
            parse_port_range(bad)


def test_lobby_allow():
    lb = Lobby(1, "x", allow=("198.18.2.0/24",))
    assert lb.allows("198.18.2.9") and not lb.allows("198.18.3.1")
    assert Lobby(1, "y", open=True).allows("198.19.0.1")
    assert Lobby(1, "z", ttl=10, created=100).expired(110) and not Lobby(1, "z", ttl=10, created=100).expired(109)


@pytest.mark.parametrize("text", ["99999999999999999999d", "١٢", "1_000", "3651d", "0", "-5", "１２"])
def test_durations_are_ascii_and_in_range(text):
    with pytest.raises(UsageError, match="duration"):
        parse_duration(text)


@pytest.mark.parametrize("text", ["99999999999999999999", "١٢", "0", "65536", "+5", "5.0", "1e3", ""])
def test_numbers_are_ascii_and_in_range(text):
    with pytest.raises(UsageError, match="use a number from 1 to 65535"):
        parse_int(text, "--max-clients", 1, 65535)


def test_numbers_in_range_pass():
    assert parse_int("64", "n", 1, 65535) == 64 and parse_duration("3650d") == 3650 * 86400
    assert parse_port(8809) == 8809
