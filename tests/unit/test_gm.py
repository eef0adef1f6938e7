"""GMs without root: settings, the address and port pool, rendered configs, and the service with
OpenVPN ccd files over a fake kernel (rows and ccd files change together or not at all)."""

from __future__ import annotations

import configparser
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from natctl.config import Settings, load
from natctl.errors import Conflict, Exhausted, NatctlError, NotFound, UsageError
from natctl.gm.model import Gm, GmSettings, check_ports, next_address, pick_port
from natctl.gm.openvpn import parse_status
from natctl.gm.render import CCD_MARK, Identity, ccd_file, openvpn_config, wireguard_config
from natctl.gm.service import GmService, TunnelDown
from natctl.kernel.fake import FakeKernel
from natctl.model import Endpoint, PortRange
from natctl.service import Service

NO_FILE = "/nonexistent/natctl.toml"
NAMES = ("alice", "bob", "carol", "erin", "frank", "grace")  # dave has no certificate


# --- settings


def load_settings(gm: dict, environ: dict, path: str) -> GmSettings:
    """The [gm] table as natctl's one loader reads it (options for the table, environment, file)."""
    return load(path=path, environ=environ, tables={"gm": gm}).gm


def test_settings_sources_in_order(tmp_path):
    path = tmp_path / "natctl.toml"  # one config file: natctl's settings, and the GMs' in [gm]
    path.write_text('ports = "20000-29999"\n[gm]\nsubnet = "198.18.250.0/24"\nports = "1802-1810"\n'
                    'interface = "fromfile"\n')
    s = load_settings({"interface": "fromopt"}, {"NATCTL_GM_PORTS": "1900-1909"}, str(path))
    assert (s.subnet, s.ports, s.interface) == ("198.18.250.0/24", PortRange(1900, 1909), "fromopt")
    assert (s.port, s.relay_address) == (51820, "198.18.250.1")
    assert load_settings({"vpn": "openvpn"}, {}, NO_FILE).port == 1194


@pytest.mark.parametrize("override,match", [
    ({"interface": "a-name-far-too-long"}, "interface"),
    ({"subnet": "198.18.250.0/31"}, "too small"),
    ({"subnet": "nonsense"}, "CIDR"),
    ({"vpn": "ipsec"}, "wireguard or openvpn"),
    ({"ports": "1802"}, "LOW-HIGH"),
    ({"colour": "blue"}, "unknown GM setting"),
])
def test_bad_settings_say_what_to_do(override, match):
    with pytest.raises(UsageError, match=match):
        load_settings(override, {}, NO_FILE)


def test_gm_ports_stay_clear_of_the_relays_ports():
    with pytest.raises(UsageError, match="overlaps"):
        check_ports(GmSettings(ports=PortRange(19990, 20010)), PortRange(20000, 29999), 8809)
    with pytest.raises(UsageError, match="VPN port"):
        check_ports(GmSettings(ports=PortRange(51800, 51900)), PortRange(20000, 29999), 8809)
    check_ports(GmSettings(), PortRange(20000, 29999), 8809)


# --- the pool


def test_addresses_start_after_the_relay_and_come_back():
    s = GmSettings(subnet="198.18.250.0/29")  # hosts .1-.6; .1 is the relay
    assert next_address(s, []) == "198.18.250.2"
    assert next_address(s, ["198.18.250.2", "198.18.250.4"]) == "198.18.250.3"
    with pytest.raises(Exhausted, match="pool 198.18.250.0/29 is full"):
        next_address(s, [f"198.18.250.{i}" for i in range(2, 7)])


def test_ports_wanted_taken_outside_and_full():
    s = GmSettings(ports=PortRange(1802, 1804))
    assert pick_port(s, []) == 1802
    assert pick_port(s, [1802]) == 1803
    assert pick_port(s, [], 1804) == 1804
    with pytest.raises(UsageError, match="outside the GM port range 1802-1804"):
        pick_port(s, [], 1805)
    with pytest.raises(Conflict, match="already taken"):
        pick_port(s, [1803], 1803)
    with pytest.raises(Exhausted):
        pick_port(s, [1802, 1803, 1804])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 50)), max_size=60))
def test_pool_never_hands_out_one_address_or_port_twice(ops):
    s = GmSettings(subnet="198.18.250.0/28", ports=PortRange(1802, 1815))
    held: list[tuple[str, int]] = []
    for add, pick in ops:
        if add:
            try:
                addr = next_address(s, [a for a, _ in held])
                port = pick_port(s, [p for _, p in held])
            except Exhausted:
                assert len(held) == 13  # 14 hosts in a /28, one is the relay's
                continue
            assert addr != s.relay_address and port in s.ports
            held.append((addr, port))
        elif held:
            held.pop(pick % len(held))
        assert len({a for a, _ in held}) == len({p for _, p in held}) == len(held)


# --- rendering

GM = Gm("alice", "wireguard", "198.18.250.2", 1802, "PUB", 0.0)


def test_wireguard_config_is_what_wg_quick_reads():
    s = GmSettings(subnet="198.18.250.0/24")
    text = wireguard_config(GM, Identity("PUB", "PRIV"), s, "SERVERPUB", "198.18.0.1")
    ini = configparser.ConfigParser()
    ini.read_string(text)
    assert dict(ini["Interface"]) == {"privatekey": "PRIV", "address": "198.18.250.2/32"}
    # Only the relay's VPN address goes into the tunnel; the keepalive holds the GM's NAT open.
    assert dict(ini["Peer"]) == {"publickey": "SERVERPUB", "endpoint": "198.18.0.1:51820",
                                 "allowedips": "198.18.250.1/32", "persistentkeepalive": "25"}
    assert "198.18.0.1:1802" in text.splitlines()[1]
    named = wireguard_config(GM, Identity("PUB", "PRIV"), GmSettings(endpoint="relay.example.org"), "K", "198.18.0.1")
    assert "Endpoint = relay.example.org:51820" in named


def test_openvpn_ccd_and_profile():
    s = GmSettings(vpn="openvpn", subnet="198.18.250.0/24", endpoint="relay.example.org")
    assert ccd_file(GM, s) == f"{CCD_MARK}: game master alice\nifconfig-push 198.18.250.2 255.255.255.0\n"
    text = openvpn_config(GM, Identity(pem=(("ca", "CA PEM\n"), ("cert", "CERT"), ("key", "KEY"))), s, "198.18.0.1")
    assert "remote relay.example.org 1194" in text and "<ca>\nCA PEM\n</ca>" in text and "<key>\nKEY\n</key>" in text


def test_openvpn_status_versions_2_and_3():
    v2 = ("TITLE,OpenVPN 2.6\nHEADER,CLIENT_LIST,Common Name,Real Address,Virtual Address\n"
          "CLIENT_LIST,alice,198.18.1.2:51000,198.18.250.2,,100,200\n")
    v3 = "CLIENT_LIST\tbob\t198.18.2.2:40000\t198.18.250.3\t\t1\t2\n"
    assert parse_status(v2) == {"alice": ("198.18.1.2:51000", "198.18.250.2")}
    assert parse_status(v3) == {"bob": ("198.18.2.2:40000", "198.18.250.3")}


# --- the service, with OpenVPN ccd files (no root, no VPN process needed)


@pytest.fixture
def ovpn(tmp_path, monkeypatch):
    monkeypatch.setattr("natctl.sync.local_port_overlap", lambda ports: None)
    ccd, pki = tmp_path / "ccd", tmp_path / "pki"
    ccd.mkdir()
    for d in ("issued", "private"):
        (pki / d).mkdir(parents=True)
    (pki / "ca.crt").write_text("CA\n")
    for name in NAMES:
        (pki / "issued" / f"{name}.crt").write_text(f"CERT {name}\n")
        (pki / "private" / f"{name}.key").write_text(f"KEY {name}\n")
    (ccd / "someone-else").write_text("ifconfig-push 198.18.250.99 255.255.255.0\n")  # not natctl's
    now = [1000.0]
    svc = Service(Settings(state=str(tmp_path / "s.db"), relay_ip="198.18.0.1"), kernel_factory=FakeKernel,
                  clock=lambda: now[0])
    gm_settings = GmSettings(vpn="openvpn", subnet="198.18.250.0/29", openvpn_ccd=str(ccd), openvpn_pki=str(pki),
                             openvpn_status=str(tmp_path / "status.log"))
    gms = GmService(svc.rec, gm_settings)
    gms.svc = svc
    gms.ccd, gms.now, gms.status = ccd, now, tmp_path / "status.log"
    yield gms
    svc.close()


def ccd_names(gms) -> list[str]:
    return sorted(os.listdir(gms.ccd))


def test_add_writes_the_ccd_file_and_prints_an_inline_profile(ovpn):
    got = []
    view, config = ovpn.add("alice", deliver=got.append)
    assert (view.address, view.port, view.relay) == ("198.18.250.2", 1802, "198.18.0.1:1802")
    assert got == [config] and "<cert>\nCERT alice\n</cert>" in config
    assert (ovpn.ccd / "alice").read_text().endswith("ifconfig-push 198.18.250.2 255.255.255.248\n")
    with pytest.raises(Conflict, match="already exists"):
        ovpn.add("alice")


def test_nothing_half_made(ovpn):
    ovpn.add("alice")

    def fail(config: str) -> None:
        raise NatctlError("cannot write the config")

    with pytest.raises(NatctlError):
        ovpn.add("bob", deliver=fail)  # the ccd file was written, then taken back with the row
    with pytest.raises(NotFound, match="easyrsa build-client-full dave"):
        ovpn.add("dave")  # no certificate
    assert [g.name for g in ovpn.list()] == ["alice"]
    assert ccd_names(ovpn) == ["alice", "someone-else"]


def test_remove_gives_back_address_and_port_and_leaves_foreign_files(ovpn):
    ovpn.add("alice")
    ovpn.add("bob")
    ovpn.remove("alice")
    assert ccd_names(ovpn) == ["bob", "someone-else"]
    view, _ = ovpn.add("carol")
    assert (view.address, view.port) == ("198.18.250.2", 1802)
    with pytest.raises(NotFound, match="no GM named 'alice'"):
        ovpn.remove("alice")


def test_pool_full(ovpn):
    for name in NAMES[:5]:  # a /29 holds the relay and five GMs
        ovpn.add(name)
    with pytest.raises(Exhausted, match="pool 198.18.250.0/29 is full"):
        ovpn.add("grace")
    assert len(ovpn.list()) == 5


def test_sessions_need_the_tunnel_then_forward_and_expire(ovpn):
    ovpn.add("alice")
    with pytest.raises(TunnelDown, match="no OpenVPN status"):
        ovpn.open("alice")
    ovpn.status.write_text("CLIENT_LIST,bob,198.18.1.2:5,198.18.250.3,,1,1\n")
    with pytest.raises(TunnelDown, match="not connected"):
        ovpn.open("alice")
    with pytest.raises(NotFound, match="no GM named 'zed'"):
        ovpn.open("zed")
    ovpn.status.write_text("CLIENT_LIST,alice,198.18.1.2:5,198.18.250.2,,1,1\n")
    view = ovpn.open("alice", ttl=60, proto="both")
    assert view.session and view.expires == 1060 and view.tunnel == "up"
    (fwd,) = ovpn.svc.forwards()
    assert (fwd.port, fwd.to, fwd.proto, fwd.owner) == (1802, "198.18.250.2:1802", "both", "gm:alice")
    with pytest.raises(Conflict, match="already has a session"):
        ovpn.open("alice")
    ovpn.now[0] += 61
    assert not ovpn.list()[0].session
    assert ovpn.svc.cleanup()["forwards"] == [1802]
    ovpn.open("alice")
    ovpn.close("alice")
    with pytest.raises(NotFound, match="no open session"):
        ovpn.close("alice")
    assert ovpn.svc.forwards() == []


def test_a_forward_on_a_gm_port_is_not_handed_out(ovpn):
    ovpn.svc.forward_add(1802, Endpoint("198.18.1.2", 80))
    view, _ = ovpn.add("alice")
    assert view.port == 1803
    with pytest.raises(Conflict, match="already taken"):
        ovpn.add("bob", port=1802)


def test_settings_that_do_not_fit_the_stored_gms_are_refused(ovpn):
    ovpn.add("alice")
    other = GmService(ovpn.svc.rec, GmSettings(vpn="openvpn", subnet="198.18.251.0/24", openvpn_ccd=str(ovpn.ccd)))
    with pytest.raises(Conflict, match="use the VPN settings the GMs were added with"):
        other.add("bob")


def test_main_settings_ignore_the_gm_table(tmp_path):
    path = tmp_path / "natctl.toml"
    path.write_text('relay_ip = "198.18.0.1"\n[gm]\nsubnet = "198.18.250.0/24"\n')
    assert load(path=str(path), environ={}).relay_ip == "198.18.0.1"
    assert load_settings({}, {}, str(path)).subnet == "198.18.250.0/24"
