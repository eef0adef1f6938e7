"""The XDP accelerator in the lab: the relay's single interface, real UDP, the CLI as users run it.

The lab gives the relay's link peer an XDP_PASS program and turns tx checksum
offload off on the endpoints (natctl.lab.xdp says why), then natctl runs
with --accel xdp in native mode. Counters prove who forwarded what: XDP's
per-mapping counts, and nftables' snat4 counters that stay at zero.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile

import pytest

from natctl.kernel.nft import parse_listing
from natctl.lab import xdp as labxdp
from natctl.lab.netns import entered, run
from natctl.lab.traffic import payload, send_and_receive
from support import labs
from support.cli import Cli
from support.scenarios import add, lobbies_isolated, pub, udp_both_ways

pytestmark = pytest.mark.kernel
# Hand-made mappings: the lab's home routers are cones here (see support.labs.cone_lab for why).
lab = pytest.fixture(scope="module", name="lab")(labs.cone_lab)


class XdpCli(Cli):
    """natctl with --accel xdp in native mode (the lab's peer runs XDP, so native XDP_TX is delivered)."""

    def __call__(self, *args: str, check: bool = True, env: dict | None = None,
                 accel: str = "xdp") -> subprocess.CompletedProcess:
        return super().__call__("--accel", accel, *args, check=check, env={"NATCTL_XDP_MODE": "native", **(env or {})})


@pytest.fixture(scope="module")
def xlab(lab):
    with labxdp.prepared(lab):
        yield lab


@pytest.fixture
def xrelay(xlab, relay):
    cli = XdpCli(relay.ns, relay.state)
    try:
        yield cli
    finally:  # before the relay fixture deletes the table: no program may outlive a test
        labxdp.detach_all(xlab.relay_ns, "eth0")


def xdp_on_eth0(lab) -> str:
    """The relay's eth0 as `ip` shows it: mode and program id, or "" when nothing is attached."""
    out = run(["ip", "-n", lab.relay_ns, "link", "show", "eth0"]).stdout
    words = out.split()
    mode = next((w for w in words if w.startswith("xdp")), "")
    return f"{mode} {words[words.index('id') + 1]}" if mode else ""


def nft_acct(lab) -> dict:
    """nftables' own per-mapping counters (snat4's elements), straight from the kernel."""
    doc = json.loads(run(["nft", "-j", "list", "table", "inet", "natctl"], ns=lab.relay_ns).stdout)
    return {k[1]: v for k, v in parse_listing(doc).counters.items() if k[0] == "snat4"}


def counts(relay, lab, socks, client):
    m = next(m for m in relay.json("status")["mappings"] if m["client"] == pub(lab, socks, client))
    return m["to_host_packets"], m["to_client_packets"], m["xdp_to_host_packets"], m["xdp_to_client_packets"]


def test_udp_both_ways_forwarded_by_xdp(xlab, xrelay, socks):
    lab, relay = xlab, xrelay
    assert labxdp.resolve_gateway(lab) != "NONE"
    udp_both_ways(lab, relay, socks)  # the nftables test, unchanged: payloads, addresses, packet counts
    assert relay.json("status")["backend"] == "nftables+xdp(native)"
    assert xdp_on_eth0(lab).startswith("xdp ")  # native ("xdpgeneric" would be generic)
    assert counts(relay, lab, socks, "client1") == (4, 4, 4, 4)
    assert counts(relay, lab, socks, "client2") == (1, 1, 1, 1)
    assert nft_acct(lab) and all(v == (0, 0) for v in nft_acct(lab).values())  # nftables never saw them


def test_until_the_neighbour_is_known_nftables_forwards(xlab, xrelay, socks):
    lab, relay = xlab, xrelay
    relay("lobby", "create", "a")
    m = add(relay, lab, socks, "a", "host", "client1")
    run(["ip", "-n", lab.relay_ns, "neigh", "flush", "dev", "eth0"])
    r = lab.relay_ip
    for _ in range(4):  # the first one waits in the kernel for ARP; then XDP has the MAC
        d = send_and_receive(socks["client1"], socks["host"], (r, m["host_port"]), payload(100))
        assert d.intact and d.seen_from == (r, m["client_port"]), d
    assert counts(relay, lab, socks, "client1")[::2] == (4, 3)
    assert sum(p for p, _ in nft_acct(lab).values()) == 1


def test_lobbies_stay_isolated(xlab, xrelay, socks):
    labxdp.resolve_gateway(xlab)
    lobbies_isolated(xlab, xrelay, socks)  # the nftables test, unchanged
    assert counts(xrelay, xlab, socks, "client2")[2] == 1  # lobby b's datagram went through XDP


def test_detach_leaves_nftables_and_apply_reattaches_idempotently(xlab, xrelay, socks):
    lab, relay = xlab, xrelay
    relay("lobby", "create", "a")
    m = add(relay, lab, socks, "a", "host", "client1")
    labxdp.resolve_gateway(lab)
    r, to_host = lab.relay_ip, (lab.relay_ip, m["host_port"])
    attached = xdp_on_eth0(lab)
    assert send_and_receive(socks["client1"], socks["host"], to_host, b"by xdp").intact
    # A second natctl process (a restart) finds the same program and maps: nothing changes.
    assert relay.json("apply")["added"] == 0
    assert xdp_on_eth0(lab) == attached
    assert counts(relay, lab, socks, "client1")[::2] == (1, 1)
    labxdp.detach_all(lab.relay_ns, "eth0")  # someone detaches it: nftables carries on alone
    assert send_and_receive(socks["client1"], socks["host"], to_host, b"by nftables").seen_from == (r, m["client_port"])
    assert sum(p for p, _ in nft_acct(lab).values()) == 1
    result = relay.json("apply")  # reattached, with its maps filled before it sees a packet
    assert (result["backend"], result["added"]) == ("nftables+xdp(native)", 2)
    assert send_and_receive(socks["client1"], socks["host"], to_host, b"by xdp again").intact
    assert counts(relay, lab, socks, "client1")[::2] == (2, 1)  # the new program's count starts over


def test_apply_reads_the_xdp_map_though_nftables_is_proven(xlab, xrelay, socks):
    """The XDP map has no ruleset generation: an apply that proves nftables unchanged still reads it (as
    bytes, Program.packed_entries, the same as the plan's) and puts back an entry removed behind its back."""
    from natctl import packed
    from natctl.kernel.xdp import Program
    from natctl.plan import XDP, Element

    lab, relay = xlab, xrelay
    relay("lobby", "create", "a")
    add(relay, lab, socks, "a", "host", "client1")
    with entered(lab.relay_ns):
        prog = Program.find("eth0")
        entries = prog.entries()
        assert prog.packed_entries() == {packed.pack(Element(XDP, k, v)) for k, v in entries.items()}
        assert len(entries) == 2
        prog.write([next(iter(entries))], [])  # gone from the map, not from nftables
        assert len(prog.entries()) == 1
        prog.close()
    result = relay.json("apply")
    assert (result["checked"], result["added"], result["deleted"]) == ("ruleset", 1, 0)
    with entered(lab.relay_ns):
        prog = Program.find("eth0")
        assert prog.entries() == entries
        prog.close()


def test_removing_a_mapping_stops_xdp_at_once(xlab, xrelay, socks):
    lab, relay = xlab, xrelay
    relay("lobby", "create", "a")
    m = add(relay, lab, socks, "a", "host", "client1")
    labxdp.resolve_gateway(lab)
    to_host = (lab.relay_ip, m["host_port"])
    assert send_and_receive(socks["client1"], socks["host"], to_host, b"before").intact
    relay("map", "remove", "--lobby", "a", "--client", pub(lab, socks, "client1"))
    assert send_and_receive(socks["client1"], socks["host"], to_host, b"after", timeout=0.5).seen_from is None


def test_uninstall_detaches_and_none_never_leaves_a_program(xlab, xrelay, socks):
    lab, relay = xlab, xrelay
    relay("lobby", "create", "a")
    add(relay, lab, socks, "a", "host", "client1")
    assert xdp_on_eth0(lab)
    assert "XDP program" in relay("uninstall").stdout
    assert xdp_on_eth0(lab) == ""
    assert run(["nft", "list", "table", "inet", "natctl"], ns=lab.relay_ns, check=False).returncode != 0
    assert relay.json("apply")["created_table"] and xdp_on_eth0(lab)
    # Switching to --accel none removes the program: its map would forward mappings nftables dropped.
    assert json.loads(relay("apply", "--json", accel="none").stdout)["backend"] == "nftables"
    assert xdp_on_eth0(lab) == ""


def test_auto_uses_generic_mode_on_veth(xlab, xrelay, socks):
    lab, relay = xlab, xrelay
    auto = {"NATCTL_XDP_MODE": "auto"}
    relay("lobby", "create", "a", accel="auto", env=auto)
    m = add(relay, lab, socks, "a", "host", "client1")  # attached in native mode, as this test's CLI asks
    assert json.loads(relay("status", "--json", accel="auto", env=auto).stdout)["backend"] == "nftables+xdp(native)"
    labxdp.detach_all(lab.relay_ns, "eth0")  # auto keeps what natctl attached; from scratch it decides
    labxdp.resolve_gateway(lab)
    result = json.loads(relay("apply", "--json", accel="auto", env=auto).stdout)
    assert result["backend"] == "nftables+xdp(generic)"
    assert xdp_on_eth0(lab).startswith("xdpgeneric")
    d = send_and_receive(socks["client1"], socks["host"], (lab.relay_ip, m["host_port"]), payload(200))
    assert d.intact and d.seen_from == (lab.relay_ip, m["client_port"])
    assert counts(relay, lab, socks, "client1")[::2] == (1, 1)


def test_xdp_that_cannot_attach_warns_once_and_nftables_carries_on(xlab, xrelay, socks):
    lab, relay = xlab, xrelay
    proc = relay("--interface", "nosuch0", "lobby", "create", "a")
    assert proc.stderr.count("\n") == 1 and "XDP accelerator off" in proc.stderr
    proc = relay("--interface", "eth0", "map", "add", "--lobby", "a", "--host", pub(lab, socks, "host"),
                 "--client", pub(lab, socks, "client1"), "--json", env={"NATCTL_BPF_OBJECT": "/nonexistent.o"})
    assert "is missing" in proc.stderr and xdp_on_eth0(lab) == ""
    m = json.loads(proc.stdout)
    d = send_and_receive(socks["client1"], socks["host"], (lab.relay_ip, m["host_port"]), payload(64))
    assert d.intact and d.seen_from == (lab.relay_ip, m["client_port"])


def test_pins_on_a_mounted_bpffs_are_made_reused_and_removed(xlab, relay):
    from natctl.kernel.accel import XdpKernel
    from natctl.plan import XDP, Changes, Element

    mnt = tempfile.mkdtemp(prefix="natctl-bpffs-")
    run(["mount", "-t", "bpf", "bpf", mnt])
    try:
        root = os.path.join(mnt, "natctl")
        element = Element(XDP, ("198.18.2.2", 40000, 29999), ("198.18.0.1", 20000, "198.18.1.2", 27015))
        with entered(xlab.relay_ns):
            k = XdpKernel("eth0", "native", pin_root=root)
            k.apply(Changes(add=(element,), create_table=True))
            (pins,) = os.listdir(root)
            assert sorted(os.listdir(os.path.join(root, pins))) == ["natctl_count", "natctl_flows",
                                                                     "natctl_lease", "natctl_relay", "prog"]
            labxdp.detach_all(xlab.relay_ns, "eth0")
            again = XdpKernel("eth0", "native", pin_root=root)  # not attached: found through its pins
            assert element in again.read().elements
            again.apply(Changes())
            assert xdp_on_eth0(xlab).startswith("xdp ")
            assert again.uninstall() and not os.path.exists(root)
            assert xdp_on_eth0(xlab) == ""
    finally:
        labxdp.detach_all(xlab.relay_ns, "eth0")
        run(["umount", mnt], check=False)
        os.rmdir(mnt)
