"""A virtual LAN per lobby, for real: a relay running `natctl serve`, a "machine" behind one masquerading
home router running two instances, members behind another; wireguard-go everywhere; a discovery
program that finds its interfaces the way LAN games do.

LAN "party": instances a and b on the machine, member3 (`natctl lan join`, its game interface beside
its own). LAN "other": instance d on the machine and member4, at the same time.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from natctl.lab.netns import natctl_argv, run
from natctl.lan import member as mb
from support import lan_lab
from support.serve import Daemon

pytestmark = pytest.mark.kernel

DISCOVERY_PORT = 23456
MDNS_PORT = 5353  # the listeners join 224.0.0.251, mDNS's group


@pytest.fixture(scope="module")
def ll():
    ll = lan_lab.build()
    saved = {k: os.environ.get(k) for k in ll.env}
    os.environ.update(ll.env)  # the daemon reads its LAN settings from NATCTL_LAN_*
    daemon = None
    try:
        party = ll.relay.json("lan", "create", "party")
        other = ll.relay.json("lan", "create", "other", "--subnet", "198.18.140.0/24")
        daemon = Daemon(ll.lab, ll.state, os.path.join(ll.tmp, "serve.log")).start()
        ll.daemon = daemon
        ll.tokens = {"party": party["token"], "other": other["token"]}
        ll.a = ll.instance_up("machine", "a", party["token"], "alpha")
        ll.b = ll.instance_up("machine", "b", party["token"], "bravo")
        ll.c = ll.join("member3", "c", party["token"], "charlie")
        ll.d = ll.instance_up("machine", "d", other["token"], "delta")
        ll.e = ll.join("member4", "e", other["token"], "echo")
        ll.party = {ll.a: "198.18.128.1", ll.b: "198.18.128.2", "member3": "198.18.128.3"}
        ll.other = {ll.d: "198.18.140.1", "member4": "198.18.140.2"}
        yield ll
    finally:
        if daemon is not None:
            daemon.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        ll.teardown()


def members(ll, lan: str) -> dict[str, dict]:
    return {m["name"]: m for m in ll.relay.json("lan", "members", lan)}


def test_members_join_by_token_through_the_daemon_and_their_tunnels_come_up(ll):
    assert [e["member"] for e in ll.daemon.events("lan_joined")] == ["alpha", "bravo", "charlie", "delta", "echo"]
    party = members(ll, "party")
    assert {n: m["address"] for n, m in party.items()} == {"alpha": "198.18.128.1", "bravo": "198.18.128.2",
                                                           "charlie": "198.18.128.3"}
    deadline = time.monotonic() + 10
    while {m["tunnel"] for m in party.values()} != {"up"} and time.monotonic() < deadline:
        time.sleep(0.2)
        party = members(ll, "party")
    assert {m["tunnel"] for m in party.values()} == {"up"}
    # the two instances share the machine's public address, each with its own tunnel
    assert party["alpha"]["endpoint"].split(":")[0] == party["bravo"]["endpoint"].split(":")[0] == "198.18.1.2"
    lans = {x["name"]: x for x in ll.relay.json("lan", "list")}
    assert (lans["party"]["members"], lans["other"]["subnet"]) == (3, "198.18.140.0/24")


def test_an_instance_sees_a_broadcast_lan_and_runs_programs_as_the_user(ll):
    out = json.loads(ll.call(ll.a, "search", str(DISCOVERY_PORT), "0.1"))
    assert out["interfaces"] == [["lan0", "198.18.128.1", "198.18.128.255"]]  # its only interface (lo aside)
    uid = subprocess.run(natctl_argv("/nonexistent/m.db", "lan", "instance", "run", ll.a, "--user", "nobody", "--",
                                     "sh", "-c", "id -u; cat /sys/class/net/lan0/mtu"),
                         capture_output=True, text=True, timeout=20)
    assert uid.stdout.split() == ["65534", "1420"], uid.stderr


@pytest.mark.parametrize("host", ["a", "b", "member3"])
def test_broadcast_discovery_finds_the_host_whichever_member_hosts(ll, host):
    host = getattr(ll, host) if host != "member3" else host
    server = ll.start(host, "host", str(DISCOVERY_PORT), "8", "the-host")
    lan_lab.wait_ready(server)
    for seeker in ll.party:
        if seeker == host:
            continue
        out = json.loads(ll.call(seeker, "search", str(DISCOVERY_PORT), "4"))
        assert out["found"] == {"HERE the-host": ll.party[host]}, (seeker, out)
    for seeker in ll.other:  # the other LAN finds nothing through the relay (member4 shares member3's real LAN)
        found = json.loads(ll.call(seeker, "search", str(DISCOVERY_PORT), "1.5"))["found"]
        assert not any(addr.startswith("198.18.128.") for addr in found.values()), (seeker, found)
    server.kill()


def counters(ll) -> dict[str, tuple[int, int]]:
    return {m["address"]: (m.get("broadcasts") or 0, m.get("copies") or 0)
            for lan in ("party", "other") for m in ll.relay.json("lan", "members", lan)}


def test_broadcast_and_multicast_reach_every_other_member_once_fanned_out_by_the_kernel(ll):
    everyone = {**ll.party, **ll.other}
    listeners = {who: ll.start(who, "listen", str(MDNS_PORT), "4", "224.0.0.251") for who in everyone}
    for p in listeners.values():
        lan_lab.wait_ready(p)
    before = counters(ll)
    # multicast with the default TTL of 1, the limited broadcast, the subnet broadcast: 5 of each
    for target, tag in (("224.0.0.251", "mcast"), ("255.255.255.255", "bcast"), ("198.18.128.255", "subnet")):
        ll.call(ll.a, "send", str(MDNS_PORT), "10", target, "5", tag)
    got = {}
    for who, p in listeners.items():
        out, _ = p.communicate(timeout=10)
        got[who] = json.loads(out.splitlines()[-1])
    sender = ll.party[ll.a]
    for who in ll.party:  # the sender too, once: its own kernel loops them back, as on any LAN; the relay does not
        tags = sorted(d[0] for d in got[who])
        assert tags == sorted(f"{t} {i}" for t in ("mcast", "bcast", "subnet") for i in range(5)), who
        assert {(d[1], d[2]) for d in got[who]} == {(sender, 47000)}  # the sender's virtual address and port
    for who in ll.other:
        assert got[who] == [], who  # nothing crosses into another LAN
    after = counters(ll)
    assert after[sender][0] - before[sender][0] == 15  # the relay's netdev chain counted each once...
    assert after[sender][1] - before[sender][1] == 30  # ...and made a copy for each of the two others
    fan = run(["nft", "list", "table", "netdev", "natctl_lan_fanout"], ns=ll.lab.relay_ns).stdout
    assert f'ip daddr set 198.18.128.2 dup to "{ll.iface}"' in fan


def test_unicast_udp_and_tcp_between_members_intact_and_the_mtu_enforced(ll):
    echo = ll.start(ll.b, "echo", "7777", "20")
    lan_lab.wait_ready(echo)
    for who in ("member3", ll.a):
        out = json.loads(ll.call(who, "check", "7777", "20", ll.party[ll.b], "1420"))
        assert out["tcp"] and out["tcp_bytes"] == 1 << 20, (who, out)
        assert out["udp_intact"] == out["udp_sizes"] == 4, (who, out)
        assert out["too_big"] == "Message too long", (who, out)  # refused by the interface, not mangled
    echo.kill()
    server = subprocess.Popen([*ll.where(ll.b), "iperf3", "-s", "-1", "-p", "5201"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    ll.procs.append(server)
    time.sleep(0.5)
    res = subprocess.run([*ll.where("member3"), "iperf3", "-c", ll.party[ll.b], "-p", "5201", "-n", "4M", "-J"],
                         capture_output=True, text=True, timeout=40)
    report = json.loads(res.stdout)
    assert report["end"]["sum_sent"]["bytes"] >= 4 << 20, res.stdout[-500:]  # TCP through two tunnels and the relay
    assert report["end"]["sum_received"]["bytes"] > 0, res.stdout[-500:]


def has_zeroconf() -> bool:
    return subprocess.run([lan_lab.PYTHON, "-c", "import zeroconf"], capture_output=True).returncode == 0


@pytest.mark.skipif(not has_zeroconf(), reason="python-zeroconf is not installed (Debian: python3-zeroconf)")
def test_a_real_mdns_service_is_discovered_by_the_other_members(ll):
    pub = subprocess.Popen([*ll.where(ll.b), lan_lab.PYTHON, ll.zeroconf, "publish", "15", "game-b", ll.party[ll.b]],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    ll.procs.append(pub)
    lan_lab.wait_ready(pub)
    for who in (ll.a, "member3"):
        res = subprocess.run([*ll.where(who), lan_lab.PYTHON, ll.zeroconf, "browse", "8"], capture_output=True,
                             text=True, timeout=30)
        assert "'game-b._natctltest._udp.local.': ['198.18.128.2']" in res.stdout, (who, res.stdout, res.stderr)
    res = subprocess.run([*ll.where(ll.d), lan_lab.PYTHON, ll.zeroconf, "browse", "3"], capture_output=True,
                         text=True, timeout=30)
    assert res.stdout.strip() == "{}", res.stdout  # the other LAN sees nothing
    pub.kill()


def refused(ll) -> int:
    out = run(["nft", "-j", "list", "counter", "inet", "natctl_lan", "refused"], ns=ll.lab.relay_ns).stdout
    return int(json.loads(out)["nftables"][1]["counter"]["packets"])


def test_a_member_reaches_no_other_lan_and_no_one_can_spoof_an_address(ll):
    listeners = {who: ll.start(who, "listen", "6000", "3", "224.0.0.251") for who in (ll.a, ll.b)}
    for p in listeners.values():
        lan_lab.wait_ready(p)
    start = refused(ll)
    ll.call(ll.d, "send", "6000", "10", ll.party[ll.a], "10", "cross")  # from LAN other into party: unicast
    # member3 sends as alpha (its tunnel does not carry alpha's address): the relay's WireGuard drops it
    ns3 = ll.lab.ns("member3")
    run(["ip", "addr", "add", "198.18.128.1/32", "dev", f"nlg-{ll.c}"], ns=ns3)
    try:
        run(["/usr/bin/python3", "-c",
             "import socket,time\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
             "s.setsockopt(socket.SOL_SOCKET,socket.SO_BROADCAST,1)\ns.bind(('198.18.128.1',47001))\n"
             "for i in range(10):\n s.sendto(b'spoof',('198.18.128.2',6000)); s.sendto(b'spoof',('198.18.128.255',6000))"
             "; time.sleep(0.01)"], ns=ns3)
    finally:
        run(["ip", "addr", "del", "198.18.128.1/32", "dev", f"nlg-{ll.c}"], ns=ns3)
    got = {who: json.loads(p.communicate(timeout=10)[0].splitlines()[-1]) for who, p in listeners.items()}
    assert got == {ll.a: [], ll.b: []}
    assert refused(ll) - start == 10  # the isolation rule counted every cross-LAN packet


def test_wrong_token_full_lan_and_name_in_use_are_refused_and_make_nothing(ll, tmp_path):
    tiny = ll.relay.json("lan", "create", "tiny", "--max-members", "1")
    conf = os.path.join(ll.tmp, "foxtrot.conf")
    ll.member("member4", "lan", "join", ll.lab.relay_ip, tiny["token"], "--name", "foxtrot", "--out", conf)
    assert oct(os.stat(conf).st_mode & 0o777) == "0o600"
    assert mb.parse_config(open(conf).read()).address == "198.18.129.1"
    full = ll.member("member4", "lan", "join", ll.lab.relay_ip, tiny["token"], "--name", "golf", "--out", conf + "2",
                     check=False)
    assert full.returncode != 0 and "the LAN is full" in full.stderr and len(full.stderr.splitlines()) == 1
    taken = ll.member("member4", "lan", "join", ll.lab.relay_ip, ll.tokens["party"], "--name", "alpha",
                      "--out", conf + "3", check=False)
    assert taken.returncode != 0 and "name is in use" in taken.stderr
    wrong = ll.member("member4", "lan", "join", ll.lab.relay_ip, "x" * 32, "--name", "golf", "--out", conf + "4",
                      check=False)
    assert wrong.returncode != 0 and "no answer from 198.18.0.1:8809" in wrong.stderr
    assert [m["name"] for m in ll.relay.json("lan", "members", "tiny")] == ["foxtrot"]
    assert not any(os.path.exists(conf + s) for s in "234")
    dup = ll.relay("lan", "create", "clash", "--subnet", "198.18.128.0/25", check=False)
    assert dup.returncode == 4 and "overlaps another LAN" in dup.stderr
    ll.relay("lan", "close", "tiny")


def leftovers(ll, name: str) -> list[str]:
    ns = ll.lab.ns("machine")
    found = []
    if mb.ns_exists(f"natctl-{name}"):
        found.append("namespace")
    for link in (f"nlw-{name}", f"nlv-{name}"):
        if run(["ip", "link", "show", link], ns=ns, check=False).returncode == 0:
            found.append(link)
    if run(["nft", "list", "table", "netdev", f"natctl_lan_{name}"], ns=ns, check=False).returncode == 0:
        found.append("table")
    if os.path.exists(f"/var/run/wireguard/nlw-{name}.sock"):
        found.append("socket")
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            except OSError:
                continue
            if f"nlw-{name}".encode() in cmd or b"natctl-lan-play-" + name.encode() in cmd:
                found.append(f"process {pid}")
    return found


def test_lan_play_leaves_nothing_behind_after_ctrl_c(ll):
    name = ll.name("p")
    ll.instances.append((name, ll.lab.ns("machine")))  # teardown removes it should the test fail
    proc = subprocess.Popen(natctl_argv("/nonexistent/m.db", "lan", "play", ll.lab.relay_ip, ll.tokens["party"],
                                        "--name", name, "--member", "papa", "--user", "nobody",
                                        "--machine-ns", ll.lab.ns("machine"), "--",
                                        "/usr/bin/python3", "-c", "import time; time.sleep(60)",
                                        f"natctl-lan-play-{name}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **ll.env})
    deadline = time.monotonic() + 20
    while not mb.ns_exists(f"natctl-{name}") or not run(["ip", "netns", "pids", f"natctl-{name}"],
                                                        check=False).stdout.strip():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    assert "papa" in members(ll, "party")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=20)
    assert leftovers(ll, name) == []


def test_cleanup_closes_a_lan_past_its_ttl_and_its_peers_go(ll):
    brief = ll.relay.json("lan", "create", "brief", "--ttl", "1s")
    conf = os.path.join(ll.tmp, "hotel.conf")
    ll.member("member4", "lan", "join", ll.lab.relay_ip, brief["token"], "--name", "hotel", "--out", conf)
    key = [m["public_key"] for m in ll.relay.json("lan", "members", "brief")]
    peers = run(["wg", "show", ll.iface, "peers"], ns=ll.lab.relay_ns).stdout.split()
    assert set(key) <= set(peers)
    time.sleep(1.2)
    gone = ll.relay.json("cleanup")  # the one cleanup: lobbies, forwards and LANs
    assert (gone["lans"], gone["members"]) == (["brief"], [])
    peers = run(["wg", "show", ll.iface, "peers"], ns=ll.lab.relay_ns).stdout.split()
    assert not set(key) & set(peers)
    routes = run(["ip", "route", "show", "dev", ll.iface], ns=ll.lab.relay_ns).stdout
    assert brief["subnet"] not in routes and "198.18.128.0/24" in routes
    assert "brief" not in {x["name"] for x in ll.relay.json("lan", "list")}
