"""The XDP program itself, through BPF_PROG_TEST_RUN: input frame -> verdict -> output frame.

The program asks the kernel's FIB for the next hop's MAC, so the test runs it
inside a namespace that looks like a relay: a0 (198.18.0.1, default route via
198.18.0.254) and b0 (198.18.5.1/24), with permanent neighbour entries for the
gateway and for 198.18.5.7, and none for 198.18.5.8. Then every verdict is the
real one: XDP_TX back out of a0, XDP_REDIRECT to b0, XDP_PASS for an unknown
neighbour. Expected frames are built from scratch, checksums included, and
compared byte for byte.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import socket
import struct
import time
from dataclasses import dataclass

import pytest

from natctl.kernel import bpf_layout as L
from natctl.kernel import libbpf
from natctl.kernel.xdp import OBJECT, Program
from natctl.lab.netns import delete, entered, run

pytestmark = pytest.mark.kernel
PASS, TX, REDIRECT = libbpf.XDP_PASS, libbpf.XDP_TX, libbpf.XDP_REDIRECT
RELAY, GW, NEAR, NO_NEIGH = "198.18.0.1", "198.18.0.254", "198.18.5.7", "198.18.5.8"
GW_MAC, NEAR_MAC = bytes.fromhex("0200000000fe"), bytes.fromhex("020000000507")
CLIENT, HOST = ("198.18.2.2", 40001), ("198.18.1.2", 27015)
P_H, P_C = 29999, 20000
MAPPINGS = [  # (saddr, sport, dport) -> (new saddr, new sport, new daddr, new dport), as plan.py makes them
    ((CLIENT[0], CLIENT[1], P_H), (RELAY, P_C, HOST[0], HOST[1])),  # forward: client -> host
    ((HOST[0], HOST[1], P_C), (RELAY, P_H, CLIENT[0], CLIENT[1])),  # reverse: host -> client
    ((CLIENT[0], 40002, P_H), (RELAY, 20001, NEAR, 27015)),  # a peer behind the other interface
    ((CLIENT[0], 40003, P_H), (RELAY, 20002, NO_NEIGH, 27015)),  # a peer whose MAC nobody knows yet
]


def csum(data: bytes) -> int:
    """RFC 1071 Internet checksum, from scratch."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def udp(src: str, sport: int, dst: str, dport: int, data: bytes, zero: bool = False) -> bytes:
    length = 8 + len(data)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, 17, length)
    check = 0 if zero else (csum(pseudo + struct.pack("!HHHH", sport, dport, length, 0) + data) or 0xFFFF)
    return struct.pack("!HHHH", sport, dport, length, check) + data


def ipv4(src: str, dst: str, payload: bytes, proto: int = 17, ttl: int = 64, frag: int = 0x4000,
         options: bytes = b"", bad_check: bool = False) -> bytes:
    ihl = 5 + len(options) // 4
    head = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(payload), 0x1234, frag, ttl, proto, 0,
                       socket.inet_aton(src), socket.inet_aton(dst)) + options
    check = csum(head) ^ (0x5555 if bad_check else 0)
    return head[:10] + struct.pack("!H", check) + head[12:] + payload


@dataclass
class Env:
    ns: str
    prog: Program
    a0: int
    a0_mac: bytes
    b0_mac: bytes

    def frame(self, src: tuple, dst_port: int, data: bytes = b"natctl payload", ethertype: int = 0x0800,
              zero: bool = False, **ip: object) -> bytes:
        """A frame arriving at the relay's a0 from the gateway."""
        body = ipv4(src[0], RELAY, udp(src[0], src[1], RELAY, dst_port, data, zero), **ip)
        return self.a0_mac + GW_MAC + struct.pack("!H", ethertype) + body

    def rewritten(self, key: tuple, data: bytes = b"natctl payload", zero: bool = False, ttl: int = 64,
                  dmac: bytes = GW_MAC, smac: bytes | None = None) -> bytes:
        """What must leave: the mapping's rewrite, TTL - 1, checksums computed from scratch."""
        new_src, new_sport, new_dst, new_dport = dict(MAPPINGS)[key]
        body = ipv4(new_src, new_dst, udp(new_src, new_sport, new_dst, new_dport, data, zero), ttl=ttl - 1)
        return dmac + (smac or self.a0_mac) + b"\x08\x00" + body

    def run(self, frame: bytes) -> tuple[int, bytes]:
        with entered(self.ns):
            return libbpf.test_run(self.prog.fds["prog"], frame, ingress_ifindex=self.a0)


def _mac(ns: str, ifname: str) -> bytes:
    doc = json.loads(run(["ip", "-j", "-n", ns, "link", "show", ifname]).stdout)
    return bytes.fromhex(doc[0]["address"].replace(":", ""))


@pytest.fixture(scope="module")
def env():
    if not os.path.exists(OBJECT):
        pytest.fail(f"{OBJECT} is missing: run 'make setup'")
    ns = "nlbpf" + secrets.token_hex(3)
    run(["ip", "netns", "add", ns])
    prog = None
    try:
        for cmd in (["link", "set", "lo", "up"],
                    ["link", "add", "a0", "type", "veth", "peer", "name", "a1"],
                    ["link", "add", "b0", "type", "veth", "peer", "name", "b1"],
                    *(["link", "set", dev, "up"] for dev in ("a0", "a1", "b0", "b1")),
                    ["addr", "add", f"{RELAY}/24", "dev", "a0"],
                    ["addr", "add", "198.18.5.1/24", "dev", "b0"],
                    ["route", "add", "default", "via", GW],
                    ["neigh", "add", GW, "lladdr", GW_MAC.hex(":"), "dev", "a0", "nud", "permanent"],
                    ["neigh", "add", NEAR, "lladdr", NEAR_MAC.hex(":"), "dev", "b0", "nud", "permanent"]):
            run(["ip", "-n", ns, *cmd])
        run(["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], ns=ns)
        with libbpf.BpfObject(OBJECT) as obj:
            fds = {"prog": os.dup(obj.program_fd(L.PROG_NAME))}
            fds.update({name: os.dup(obj.map_fd(name))
                        for name in (L.RELAY_MAP, L.FLOWS_MAP, L.COUNT_MAP, L.LEASE_MAP)})
        prog = Program("a0", 0, "native", None, fds)  # loaded, never attached
        assert prog.write([], MAPPINGS) == len(MAPPINGS)
        with entered(ns):
            a0 = socket.if_nametoindex("a0")
        yield Env(ns, prog, a0, _mac(ns, "a0"), _mac(ns, "b0"))
    finally:
        if prog is not None:
            prog.close()
        delete(ns)


FWD, REV = MAPPINGS[0][0], MAPPINGS[1][0]
SAME = None  # expected output: the input frame, untouched
# name -> (input frame, verdict, expected output, the counter that explains the verdict)
CASES = {
    "forward": lambda e: (e.frame(CLIENT, P_H), TX, e.rewritten(FWD), "tx"),
    "reverse": lambda e: (e.frame(HOST, P_C), TX, e.rewritten(REV), "tx"),
    "zero udp checksum stays zero": lambda e: (e.frame(CLIENT, P_H, zero=True), TX, e.rewritten(FWD, zero=True), "tx"),
    "largest payload": lambda e: (e.frame(CLIENT, P_H, os.urandom(1472)), TX, None, "tx"),
    "ethernet padding kept": lambda e: (e.frame(CLIENT, P_H, b"x") + bytes(17), TX,
                                        e.rewritten(FWD, b"x") + bytes(17), "tx"),
    "other interface: redirect": lambda e: (e.frame((CLIENT[0], 40002), P_H), REDIRECT,
                                            e.rewritten((CLIENT[0], 40002, P_H), dmac=NEAR_MAC, smac=e.b0_mac),
                                            "redirect"),
    "neighbour unknown": lambda e: (e.frame((CLIENT[0], 40003), P_H), PASS, SAME, "pass_no_neigh"),
    "unknown key": lambda e: (e.frame(CLIENT, P_C), PASS, SAME, "pass_no_key"),
    # A host's PUNCH on a mapped path is for the daemon, never forwarded to the player (natctl.daemon.punch).
    "host's punch": lambda e: (e.frame(HOST, P_C, b"NATC\x02\x05" + bytes(4)), PASS, SAME, "pass_punch"),
    "punch-shaped but longer": lambda e: (e.frame(HOST, P_C, b"NATC\x02\x05" + bytes(5)), TX,
                                          e.rewritten(REV, b"NATC\x02\x05" + bytes(5)), "tx"),
    "unknown sender": lambda e: (e.frame(("198.18.9.9", 40001), P_H), PASS, SAME, "pass_no_key"),
    "more fragments": lambda e: (e.frame(CLIENT, P_H, frag=0x2000), PASS, SAME, "pass_fragment"),
    "fragment offset": lambda e: (e.frame(CLIENT, P_H, frag=0x0001), PASS, SAME, "pass_fragment"),
    "ip options": lambda e: (e.frame(CLIENT, P_H, options=b"\x01\x01\x01\x00"), PASS, SAME, "pass_options"),
    "ttl 1": lambda e: (e.frame(CLIENT, P_H, ttl=1), PASS, SAME, "pass_ttl"),
    "ttl 0": lambda e: (e.frame(CLIENT, P_H, ttl=0), PASS, SAME, "pass_ttl"),
    "bad ip checksum": lambda e: (e.frame(CLIENT, P_H, bad_check=True), PASS, SAME, "pass_malformed"),
    "tcp": lambda e: (e.a0_mac + GW_MAC + b"\x08\x00" + ipv4(CLIENT[0], RELAY, struct.pack("!HHIIBBHHH", CLIENT[1],
                      P_H, 1, 0, 0x50, 0x02, 1024, 0, 0), proto=6), PASS, SAME, "pass_not_udp"),
    "icmp": lambda e: (e.a0_mac + GW_MAC + b"\x08\x00" + ipv4(CLIENT[0], RELAY, b"\x08\0\0\0\0\0\0\0", proto=1),
                       PASS, SAME, "pass_not_udp"),
    "arp": lambda e: (b"\xff" * 6 + GW_MAC + b"\x08\x06" + struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, GW_MAC,
                      socket.inet_aton(GW), bytes(6), socket.inet_aton(RELAY)), PASS, SAME, "pass_not_ipv4"),
    "ipv6": lambda e: (e.a0_mac + GW_MAC + b"\x86\xdd" + bytes(48), PASS, SAME, "pass_not_ipv4"),
    "vlan tag": lambda e: (e.a0_mac + GW_MAC + b"\x81\x00\x00\x05" + e.frame(CLIENT, P_H)[12:], PASS, SAME,
                           "pass_not_ipv4"),
}


def checksums_ok(frame: bytes) -> bool:
    """Verify from scratch: the IP header sums to zero, and UDP with its pseudo-header (or is zero)."""
    ip = frame[14:]
    ihl = (ip[0] & 0xF) * 4
    total = struct.unpack("!H", ip[2:4])[0]
    seg = ip[ihl:total]
    pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, len(seg))
    return csum(ip[:ihl]) == 0 and (seg[6:8] == b"\0\0" or csum(pseudo + seg) == 0)


@pytest.mark.parametrize("name", list(CASES))
def test_fixture_table(env, name):
    frame, verdict, expected, reason = CASES[name](env)
    before = env.prog.counters()
    got, out = env.run(frame)
    assert got == verdict, name
    if verdict == PASS:
        assert out == frame  # passed untouched: nftables sees exactly what arrived
    else:
        assert checksums_ok(out)
        if expected is not None:
            assert out.hex() == expected.hex()
    after = env.prog.counters()
    assert after["seen"] - before["seen"] == 1
    assert after[reason] - before[reason] == 1


def test_a_checksum_that_computes_to_zero_is_sent_as_ffff(env):
    # Pick two payload bytes so that the rewritten datagram's checksum comes out as zero.
    probe = env.rewritten(FWD, b"\0\0natctl")
    seg = probe[34:]
    pseudo = probe[26:34] + struct.pack("!BBH", 0, 17, len(seg))
    filler = csum(pseudo + seg[:6] + b"\0\0" + seg[8:]) ^ 0xFFFF  # the one's complement that cancels the rest
    data = struct.pack("!H", ~filler & 0xFFFF) + b"natctl"
    got, out = env.run(env.frame(CLIENT, P_H, data))
    assert got == TX
    assert out[40:42] == b"\xff\xff" and checksums_ok(out)
    assert out == env.rewritten(FWD, data)


def test_truncated_at_every_offset_passes_untouched(env):
    frame = env.frame(CLIENT, P_H, b"0123456789abcdef")
    for n in range(14, len(frame)):
        assert env.run(frame[:n]) == (PASS, frame[:n]), n
    for n in (0, 1, 13):  # shorter than an Ethernet header: the kernel itself refuses such a frame
        with pytest.raises(OSError):
            env.run(frame[:n])


def test_length_fields_that_lie_pass(env):
    frame = bytearray(env.frame(CLIENT, P_H, b"0123456789"))
    for udp_len in (0, 7, 9, 17, 19, 0xFFFF):  # UDP length must match the IP payload exactly
        bad = bytearray(frame)
        bad[38:40] = struct.pack("!H", udp_len)
        assert env.run(bytes(bad)) == (PASS, bytes(bad))
    for tot_len in (0, 19, 27, 0xFFFF):  # IP total length shorter than its headers, or beyond the frame
        bad = bytearray(frame)
        bad[16:18] = struct.pack("!H", tot_len)
        bad[24:26] = b"\0\0"
        bad[24:26] = struct.pack("!H", csum(bytes(bad[14:34])))
        assert env.run(bytes(bad)) == (PASS, bytes(bad))


def test_random_and_mutated_frames_never_crash(env):
    rng = random.Random(3)
    good = env.frame(CLIENT, P_H, b"payload!")
    for _ in range(300):  # bounded: each run is a few microseconds
        noise = bytes(rng.getrandbits(8) for _ in range(rng.randrange(14, 120)))
        assert env.run(noise)[0] == PASS or noise[12:14] == b"\x08\x00"
        mutated = bytearray(good)
        for _ in range(rng.randrange(1, 4)):
            mutated[rng.randrange(len(mutated))] = rng.getrandbits(8)
        verdict, out = env.run(bytes(mutated))
        assert verdict in (PASS, TX, REDIRECT)
        assert verdict != PASS or out == bytes(mutated)


def test_per_mapping_counts_are_what_xdp_forwarded(env):
    before = env.prog.flow_stats().get(REV, (0, 0, 0))
    frame = env.frame(HOST, P_C, b"z" * 100)
    for _ in range(5):
        assert env.run(frame)[0] == TX
    env.run(env.frame(HOST, P_C, ttl=1))  # passed: counted by nftables, not here
    packets, bytes_, last_seen = env.prog.flow_stats()[REV]
    assert (packets - before[0], bytes_ - before[1]) == (5, 5 * (20 + 8 + 100))
    assert 0 < time.monotonic_ns() - last_seen < 10e9


def test_map_writes_are_idempotent_and_read_back(env):
    assert env.prog.entries() == dict(MAPPINGS)
    extra = (("198.18.3.3", 1000, P_H), (RELAY, 20009, HOST[0], HOST[1]))
    assert env.prog.write([], [extra]) == 1
    assert env.prog.entries()[extra[0]] == extra[1]
    env.prog.write([extra[0], extra[0], ("198.18.3.4", 1, 2)], [])  # missing keys are skipped, not errors
    assert env.prog.entries() == dict(MAPPINGS)
    assert extra[0] not in env.prog.flow_stats()


def test_a_lapsed_lease_passes_mapped_packets_to_the_stack(env):
    """A fleet relay's lease (natctl.fleet.fence): 0 = none, a future deadline forwards, a past one passes
    mapped packets untouched (nftables' fence drops them there); unmapped ones pass as before."""
    frame = env.frame(CLIENT, P_H)
    try:
        for deadline, verdict, reason in ((0, TX, "tx"), (time.monotonic_ns() + 60 * 10**9, TX, "tx"),
                                          (time.monotonic_ns() - 1, PASS, "pass_fenced")):
            env.prog.set_lease(deadline)
            assert env.prog.lease() == deadline
            before = env.prog.counters()
            got, out = env.run(frame)
            assert got == verdict and env.prog.counters()[reason] - before[reason] == 1, deadline
            if verdict == PASS:
                assert out == frame
        assert env.run(env.frame(CLIENT, P_C))[0] == PASS  # unknown key: pass_no_key, as always
    finally:
        env.prog.set_lease(0)
