"""The virtual LANs without root: the address pool, the relay's rules, the join message (hypothesis),
the service on a fake relay kernel (rows and kernel together or not at all), configs, the daemon handler."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from natctl import config
from natctl.config import Settings
from natctl.daemon.wire import WireError
from natctl.daemon.wire import decode_request as decode_lobby_request
from natctl.errors import Conflict, Exhausted, KernelError, NotFound, UsageError
from natctl.kernel.fake import FakeKernel
from natctl.lan import member, model, plan, wire
from natctl.lan.handler import lan_handler
from natctl.lan.model import Lan, LanSettings, Member, next_address, pick_subnet
from natctl.lan.relay import Peer
from natctl.lan.service import LanService, NameTaken
from natctl.service import Service

POOL = LanSettings(pool="198.18.128.0/20", prefix=24)
KEY = base64.b64encode(bytes(range(32))).decode()



def lan_settings(options: dict, environ: dict, path: str) -> LanSettings:
    """The [lan] table through natctl.config's one loader: file, NATCTL_LAN_* variables, options."""
    return config.load(path=path, environ=environ, tables={"lan": options}).lan

def key(n: int) -> str:
    return base64.b64encode(bytes([n]) * 32).decode()


# --- settings and the pool


def test_settings_from_environment_and_options(tmp_path):
    path = tmp_path / "natctl.toml"
    path.write_text('[lan]\npool = "198.18.64.0/18"\ninterface = "fromfile"\n')
    s = lan_settings({"interface": "fromopt"}, {"NATCTL_LAN_LISTEN_PORT": "51999", "NATCTL_LAN_TTL": "2h"}, str(path))
    assert (s.pool, s.interface, s.listen_port, s.ttl) == ("198.18.64.0/18", "fromopt", 51999, 7200)
    # The default is the pool the README documents (a LAN's addresses; no test sends a packet there).
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    assert lan_settings({}, {}, "/nonexistent").pool == model.DEFAULT_POOL and f"`{model.DEFAULT_POOL}`" in readme
    with pytest.raises(UsageError, match="unknown LAN setting"):
        lan_settings({"colour": "blue"}, {}, "/nonexistent")
    with pytest.raises(UsageError, match="LAN MTU"):
        lan_settings({"mtu": "9000"}, {}, "/nonexistent")


def test_subnets_come_from_the_pool_and_never_overlap():
    assert pick_subnet(POOL, []) == "198.18.128.0/24"
    assert pick_subnet(POOL, ["198.18.128.0/24"], avoid=["198.18.129.7/24"]) == "198.18.130.0/24"
    assert pick_subnet(POOL, [], "198.18.200.0/25") == "198.18.200.0/25"
    with pytest.raises(Conflict, match="overlaps another LAN"):
        pick_subnet(POOL, ["198.18.128.0/24"], "198.18.128.128/25")
    with pytest.raises(Conflict, match="the relay's own network"):
        pick_subnet(POOL, [], "198.18.0.0/16", avoid=["198.18.0.1/24"])
    with pytest.raises(UsageError, match="too small"):
        pick_subnet(POOL, [], "198.18.200.0/30")
    full = [str(n) for n in ipaddress.IPv4Network(POOL.pool).subnets(new_prefix=24)]
    with pytest.raises(Exhausted, match="pool 198.18.128.0/20 is full"):
        pick_subnet(POOL, full)


@given(st.lists(st.integers(0, 15), max_size=20))
def test_picked_subnets_are_distinct_and_inside_the_pool(order):
    taken: list[str] = []
    for _ in order:
        try:
            net = pick_subnet(POOL, taken)
        except Exhausted:
            assert len(taken) == 16
            return
        assert ipaddress.IPv4Network(net).subnet_of(POOL.network)
        assert not any(ipaddress.IPv4Network(net).overlaps(ipaddress.IPv4Network(t)) for t in taken)
        taken.append(net)


def test_addresses_are_the_lowest_free_and_the_lan_fills_up():
    assert next_address("198.18.128.0/24", [], "a", 64) == "198.18.128.1"
    assert next_address("198.18.128.0/24", ["198.18.128.1", "198.18.128.3"], "a", 64) == "198.18.128.2"
    with pytest.raises(Exhausted, match="LAN 'a' is full \\(2 members\\)"):
        next_address("198.18.128.0/24", ["198.18.128.1", "198.18.128.2"], "a", 2)
    with pytest.raises(Exhausted, match="no free address"):
        next_address("198.18.128.0/30", ["198.18.128.1", "198.18.128.2"], "a", 64)


def test_public_keys_are_checked():
    assert model.check_public_key(KEY) == KEY
    for bad in ("short", KEY[:-2] + "!!", base64.b64encode(bytes(31)).decode()):
        with pytest.raises(UsageError, match="public key"):
            model.check_public_key(bad)


# --- the relay's rules


def lans_and_members(sizes: list[int]) -> tuple[list[Lan], list[Member]]:
    lans, members = [], []
    for i, size in enumerate(sizes, start=1):
        lans.append(Lan(i, f"lan{i}", f"198.18.{127 + i}.0/24", "h", None, 64, 0.0))
        for j in range(1, size + 1):
            members.append(Member(100 * i + j, i, f"m{j}", f"198.18.{127 + i}.{j}", key(j), 0.0))
    return lans, members


def test_ruleset_isolates_lans_and_fans_out_per_sender():
    lans, members = lans_and_members([3, 1])
    text = plan.relay_ruleset("natctl-lan", lans, members)
    assert text.startswith("table inet natctl_lan\ndelete table inet natctl_lan\n")  # one transaction replaces both
    assert "elements = { 198.18.128.0/24 . 198.18.128.0/24, 198.18.129.0/24 . 198.18.129.0/24 }" in text
    assert 'iifname "natctl-lan" oifname "natctl-lan" ip saddr . ip daddr @lans accept' in text
    assert 'ip daddr != { 198.18.128.255, 198.18.129.255, 224.0.0.0/4, 255.255.255.255 } accept' in text
    assert "198.18.128.1 : jump m_198_18_128_1" in text
    chain = text[text.index("chain m_198_18_128_2 {"):]
    chain = chain[:chain.index("}\n")]
    assert ('counter ip daddr set 198.18.128.1 dup to "natctl-lan" ip daddr set 198.18.128.3 fwd to "natctl-lan"'
            in chain)
    assert "198.18.129" not in chain  # never into another LAN
    alone = text[text.index("chain m_198_18_129_1 {"):]
    assert "counter drop" in alone[:alone.index("}\n")]
    assert plan.relay_ruleset("x", [], []).count("delete table") == 2  # no LANs: both tables go


def test_large_lans_split_the_copies_over_rules_and_end_with_fwd():
    lans, members = lans_and_members([64])
    text = plan.relay_ruleset("natctl-lan", lans, members)
    chain = text[text.index("chain m_198_18_128_1 {"):]
    chain = chain[:chain.index("\n  }")]
    rules = [ln for ln in chain.splitlines() if "daddr set" in ln]
    assert len(rules) == 3 and all(r.count(" to ") <= plan.PER_RULE for r in rules)
    assert sum(r.count("dup to") for r in rules) == 62 and rules[-1].endswith('fwd to "natctl-lan"')


def test_fanout_counters_are_read_back():
    listing = {"nftables": [
        {"rule": {"chain": "m_198_18_128_1", "expr": [{"counter": {"packets": 5, "bytes": 500}},
                                                      {"dup": {"dev": "x"}}, {"fwd": {"dev": "x"}}]}},
        {"rule": {"chain": "ingress", "expr": [{"counter": {"packets": 9, "bytes": 9}}]}},
    ]}
    assert plan.fanout_counters(json.dumps(listing)) == {"198.18.128.1": (5, 10)}
    assert plan.fanout_counters("not json") == {}


def test_member_rules_hand_the_tunnel_to_the_game_interface():
    text = plan.member_ruleset("i1", "nlw-i1", "nlv-i1", "198.18.128.2")
    assert 'hook ingress device "nlw-i1" priority filter; policy drop;' in text
    assert "ip daddr 198.18.128.2 ip ttl 1 ip ttl set 2" in text
    assert 'fwd ip to 198.18.128.2 device "nlv-i1"' in text
    assert plan.member_table("a-b") == "natctl_lan_a_b"


# --- the join message


tokens = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=16, max_size=64)
names = st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=32)


@given(tokens, names, st.binary(min_size=32, max_size=32), st.integers(0, 2**32 - 1))
def test_join_round_trip_and_no_reply_larger_than_the_request(token, name, raw, nonce):
    pub = base64.b64encode(raw).decode()
    req = wire.encode_join(token, name, pub, nonce)
    assert len(req) == wire.REQUEST_SIZE
    assert wire.decode_join(req) == wire.Join(nonce, token, name, pub)
    ok = wire.encode_joined(nonce, "198.18.128.7", 24, 51821, 1420, pub, "198.18.0.1")
    err = wire.encode_error(nonce, wire.ERR_FULL)
    assert len(ok) <= len(req) and len(err) <= len(req)
    assert wire.decode_reply(ok) == wire.JoinedReply(nonce, "198.18.128.7", 24, 51821, 1420, pub, "198.18.0.1")
    assert wire.decode_reply(err) == (nonce, wire.ERR_FULL)
    assert wire.is_lan(req) and wire.is_lan(ok)
    with pytest.raises(WireError):  # the lobbies' registrar never takes it for its own
        decode_lobby_request(req)


@given(st.binary(max_size=200))
def test_garbage_is_rejected_or_a_valid_join(data):
    try:
        req = wire.decode_join(data)
    except WireError:
        return
    assert wire.encode_join(req.token, req.name, req.public_key, req.nonce) == data


def test_lobby_messages_are_not_lan_messages():
    from natctl.daemon import wire as lobby_wire

    assert not wire.is_lan(lobby_wire.encode_request("t" * 20, 1))
    assert not wire.is_lan(b"NATC")


# --- the service on a fake relay kernel


class FakeRelay:
    """The relay's LAN kernel state in memory: peers, and the rows it was last synced to."""

    def __init__(self) -> None:
        self.peers_: dict[str, Peer] = {}
        self.lans: list[Lan] = []
        self.members_: list[Member] = []
        self.fail = False
        self.downs = 0

    def public_key(self) -> str:
        return KEY

    def sync(self, lans, members) -> None:
        self.lans, self.members_ = list(lans), list(members)
        old = self.peers_
        self.peers_ = {m.public_key: old.get(m.public_key, Peer(f"{m.address}/32", None, None, 0, 0)) for m in members}
        if self.fail:
            raise KernelError("refused")

    def down(self) -> bool:
        self.downs += 1
        return True

    def peers(self) -> dict[str, Peer]:
        return dict(self.peers_)

    def fanout_counters(self) -> dict[str, tuple[int, int]]:
        return {m.address: (2, 2 * (len(self.members_) - 1)) for m in self.members_}

    def local_networks(self) -> list[str]:
        return ["198.18.0.1/24"]

    def handshake(self, public_key: str, when: float) -> None:
        p = self.peers_[public_key]
        self.peers_[public_key] = Peer(p.allowed, when, "198.18.1.2:40000", 100, 200)


@pytest.fixture
def lans(tmp_path, monkeypatch):
    monkeypatch.setattr("natctl.sync.local_port_overlap", lambda ports: None)
    now = [1000.0]
    svc = Service(Settings(state=str(tmp_path / "s.db"), relay_ip="198.18.0.1"), kernel_factory=FakeKernel,
                  clock=lambda: now[0])
    relay = FakeRelay()
    service = LanService(svc.rec, LanSettings(pool="198.18.128.0/20", max_members=3, idle_timeout=600, ttl=3600),
                         relay)
    service.now, service.relay, service.path = now, relay, str(tmp_path / "s.db")
    yield service
    svc.close()


def rows(lans) -> tuple:
    with sqlite3.connect(lans.path) as db:
        return (db.execute("SELECT * FROM lans ORDER BY id").fetchall(),
                db.execute("SELECT * FROM lan_members ORDER BY id").fetchall())


def test_create_join_and_list(lans):
    view, token = lans.create("party")
    assert (view.subnet, view.broadcast, view.max_members, view.endpoint) == \
        ("198.18.128.0/24", "198.18.128.255", 3, "198.18.0.1:51821")
    assert view.expires == 1000.0 + 3600 and len(token) >= 16
    a = lans.join(token, "alice", key(1))
    assert (a.address, a.prefixlen, a.server_key, a.port, a.mtu) == ("198.18.128.1", 24, KEY, 51821, 1420)
    assert lans.join(token, "alice", key(1)) == a  # resent: the same answer, nothing new
    b = lans.join(token, "bob", key(2))
    assert b.address == "198.18.128.2"
    assert [m.public_key for m in lans.relay.members_] == [key(1), key(2)]  # the kernel follows the rows
    lans.relay.handshake(key(1), 990.0)
    got = {m.name: m for m in lans.members("party")}
    assert (got["alice"].tunnel, got["alice"].rx_bytes, got["alice"].broadcasts) == ("up", 100, 2)
    assert got["bob"].tunnel == "down"
    assert [x.members for x in lans.lans()] == [2]
    second, _ = lans.create("other")
    assert second.subnet == "198.18.129.0/24"


def test_bad_input_changes_nothing(lans):
    _, token = lans.create("party")
    lans.join(token, "alice", key(1))
    lans.relay.handshake(key(1), 1000.0)
    before = rows(lans)
    with pytest.raises(NotFound):
        lans.join("wrong-token-wrong-token", "bob", key(2))
    with pytest.raises(NameTaken, match="already has a member named 'alice'"):
        lans.join(token, "alice", key(2))
    with pytest.raises(Conflict, match="already a member"):
        lans.join(token, "carol", key(1))
    with pytest.raises(Conflict, match="already exists"):
        lans.create("party")
    with pytest.raises(Conflict, match="overlaps another LAN"):
        lans.create("clash", subnet="198.18.128.0/25")
    with pytest.raises(Conflict, match="relay's own network"):
        lans.create("clash", subnet="198.18.0.0/24")
    with pytest.raises(NotFound, match="no LAN named 'nope'"):
        lans.close("nope")
    with pytest.raises(NotFound, match="has no member 'zed'"):
        lans.remove("party", "zed")
    assert rows(lans) == before
    lans.join(token, "bob", key(2))
    lans.join(token, "carol", key(3))
    with pytest.raises(Exhausted, match="full"):
        lans.join(token, "dave", key(4))


def test_a_refused_kernel_change_leaves_rows_and_kernel_as_they_were(lans):
    _, token = lans.create("party")
    lans.join(token, "alice", key(1))
    before = rows(lans)
    lans.relay.fail = True
    with pytest.raises(KernelError):
        lans.join(token, "bob", key(2))
    lans.relay.fail = False
    assert rows(lans) == before
    assert [m.name for m in lans.relay.members_] == ["alice"]  # undone: the kernel matches the rows again


def test_a_quiet_name_can_be_taken_by_a_new_key(lans):
    _, token = lans.create("party")
    lans.join(token, "alice", key(1))
    lans.now[0] += 200  # never shook hands, and three minutes passed: alice's tunnel is gone
    again = lans.join(token, "alice", key(9))
    assert again.address == "198.18.128.1" and [m.public_key for m in lans.relay.members_] == [key(9)]


def test_add_by_hand_delivers_a_config_before_committing(lans, tmp_path):
    lans.create("party")
    got = []
    view, config = lans.add("party", "alice", deliver=got.append)
    assert got == [config] and view.address == "198.18.128.1"
    parsed = member.parse_config(config)
    assert (parsed.lan, parsed.member, parsed.address, parsed.prefixlen, parsed.server_key, parsed.endpoint) == \
        ("party", "alice", "198.18.128.1", 24, KEY, "198.18.0.1:51821")
    assert "AllowedIPs = 198.18.128.0/24, 224.0.0.0/4, 255.255.255.255/32" in config
    before = rows(lans)

    def broken(_config: str) -> None:
        raise UsageError("cannot write", "")

    with pytest.raises(UsageError):
        lans.add("party", "bob", deliver=broken)
    assert rows(lans) == before


def test_remove_close_and_cleanup(lans):
    _, token = lans.create("party")
    _, token2 = lans.create("short", ttl=60)
    lans.join(token, "alice", key(1))
    lans.join(token, "bob", key(2))
    lans.join(token2, "carol", key(3))
    lans.remove("party", "bob")
    assert {m.name for m in lans.relay.members_} == {"alice", "carol"}
    lans.relay.handshake(key(1), 1000.0)
    assert lans.cleanup() == {"lans": [], "members": []}
    lans.now[0] = 1000.0 + 120
    with pytest.raises(NotFound):  # expired: the token no longer works, even before cleanup
        lans.join(token2, "dave", key(4))
    lans.now[0] = 1000.0 + 700  # alice's last handshake is 700 s old: idle
    assert lans.cleanup() == {"lans": ["short"], "members": ["party/alice"]}
    assert rows(lans)[1] == [] and lans.relay.members_ == []
    lans.close("party")
    assert rows(lans) == ([], []) and lans.relay.lans == []


# --- the member's side, pure parts


def test_keypair_and_config_round_trip():
    private, public = member.keypair()
    assert len(base64.b64decode(private)) == 32 and model.check_public_key(public) == public
    cfg = member.Config("party", "alice", private, "198.18.128.5", 24, KEY, "relay.example.org:51821", 1420)
    assert member.parse_config(member.config_text(cfg)) == cfg
    with pytest.raises(UsageError, match="not a WireGuard config"):
        member.parse_config("[Interface]\n")


def test_relay_addresses_and_instance_names():
    assert member.split_relay("198.18.0.1") == ("198.18.0.1", 8809)
    assert member.split_relay("relay.example.org:9000") == ("relay.example.org", 9000)
    with pytest.raises(UsageError):
        member.split_relay("relay:99999")
    for bad in ("", "UPPER", "far-too-long-name", "a b"):
        with pytest.raises(UsageError):
            member.check_instance_name(bad)
    n = member.Names("i1", True)
    assert (n.ns, n.tunnel, n.port, n.game) == ("natctl-i1", "nlw-i1", "nlv-i1", "lan0")
    assert member.Names("i1", False).game == "nlg-i1"
    assert member.Machine("lab-m").argv(["ip", "link"]) == ["ip", "-n", "lab-m", "link"]
    assert member.Machine("lab-m").argv(["nft", "-f", "-"])[:4] == ["ip", "netns", "exec", "lab-m"]


def test_run_as_the_calling_user(monkeypatch, tmp_path):
    monkeypatch.setattr(member, "ns_exists", lambda ns: True)
    monkeypatch.setenv("SUDO_UID", "1234")
    monkeypatch.setenv("SUDO_GID", "1235")
    argv = member.run_argv("i1", ["game", "--lan"])
    assert argv == ["ip", "netns", "exec", "natctl-i1", "setpriv", "--reuid", "1234", "--regid", "1235",
                    "--clear-groups", "--", "game", "--lan"]
    monkeypatch.delenv("SUDO_UID")
    assert member.run_argv("i1", ["game"]) == ["ip", "netns", "exec", "natctl-i1", "game"]
    with pytest.raises(UsageError, match="no user"):
        member.run_argv("i1", ["game"], user="no-such-user-here")


# --- the daemon's handler and the member's request, over loopback


class FakeDaemon:
    def __init__(self, svc: Service) -> None:
        from natctl.daemon.log import Repeats

        self.svc = svc
        self.repeats = Repeats()
        self.loop = asyncio.new_event_loop()
        self.worker = None


class Transport:
    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((data, addr))


def test_handler_answers_joins_and_leaves_other_datagrams(lans):
    from natctl.daemon import wire as lobby_wire

    daemon = FakeDaemon(type("S", (), {"rec": lans.rec, "settings": lans.rec.settings})())
    handle = lan_handler(daemon, lambda: lans)
    daemon.loop.close()  # its periodic cleanup is the kernel tests' business
    _, token = lans.create("party")
    t = Transport()
    assert handle(lobby_wire.encode_request("t" * 20, 1), ("198.18.1.2", 4000), t) is False
    assert handle(wire.encode_join("wrong-token-wrong-token", "bob", key(2), 5), ("198.18.1.2", 4000), t) is True
    assert t.sent == []  # a wrong token: no answer
    req = wire.encode_join(token, "alice", key(1), 7)
    assert handle(req, ("198.18.1.2", 4000), t) is True
    reply = wire.decode_reply(t.sent[-1][0])
    assert isinstance(reply, wire.JoinedReply) and (reply.nonce, reply.address) == (7, "198.18.128.1")
    assert len(t.sent[-1][0]) <= len(req)
    handle(wire.encode_join(token, "bob", key(2), 8), ("198.18.1.2", 4001), t)
    handle(wire.encode_join(token, "carol", key(3), 9), ("198.18.1.2", 4002), t)
    handle(wire.encode_join(token, "dave", key(4), 10), ("198.18.1.2", 4003), t)
    assert wire.decode_reply(t.sent[-1][0]) == (10, wire.ERR_FULL)
    lans.relay.handshake(key(1), lans.now[0])
    handle(wire.encode_join(token, "alice", key(5), 11), ("198.18.1.2", 4004), t)
    assert wire.decode_reply(t.sent[-1][0]) == (11, wire.ERR_NAME)
    assert handle(b"NATC\x01\x06" + bytes(10), ("198.18.1.2", 4005), t) is True  # malformed: dropped


def test_request_gets_the_answer_and_says_what_to_do_without_one():
    import socket
    import threading

    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    port = srv.getsockname()[1]

    def answer() -> None:
        data, addr = srv.recvfrom(512)
        req = wire.decode_join(data)
        srv.sendto(wire.encode_joined(req.nonce ^ 1, "198.18.128.9", 24, 1, 1, KEY, "127.0.0.1"), addr)  # not ours
        srv.sendto(wire.encode_joined(req.nonce, "198.18.128.9", 24, 51821, 1400, KEY, "127.0.0.1"), addr)

    threading.Thread(target=answer, daemon=True).start()
    reply = member.request(f"127.0.0.1:{port}", "t" * 20, "alice", key(1), tries=2, wait=1.0)
    assert (reply.address, reply.port, reply.mtu) == ("198.18.128.9", 51821, 1400)
    with pytest.raises(NotFound, match="no answer from 127.0.0.1"):
        member.request(f"127.0.0.1:{port}", "t" * 20, "alice", key(1), tries=2, wait=0.1)
    srv.close()
