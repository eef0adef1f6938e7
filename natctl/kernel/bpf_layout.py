"""Every C layout natctl shares with the kernel, mirrored once for Python.

bpf/natctl.h (map names, keys, rewrites, counters: the contract with the XDP
program), then the libbpf and uapi structs natctl.kernel.libbpf passes.
tests/test_bpf_layout.py compiles the headers and compares every size and
offset with these classes. Keys and rewrites are in network byte order in the
kernel (``BigEndianStructure``); counters are in host order.
"""

from __future__ import annotations

import ctypes as C
import ipaddress

PROG_NAME = "natctl_xdp"
RELAY_MAP = "natctl_relay"
FLOWS_MAP = "natctl_flows"
COUNT_MAP = "natctl_count"
LEASE_MAP = "natctl_lease"  # a fleet relay's lease: one u64 deadline, CLOCK_MONOTONIC ns (0: none)
MAX_ENTRIES = 262144

# enum natctl_counter, in order.
COUNTERS = ("seen", "tx", "redirect", "pass_not_ipv4", "pass_malformed", "pass_options", "pass_fragment",
            "pass_not_udp", "pass_no_key", "pass_ttl", "pass_no_neigh", "pass_fib", "pass_punch",
            "pass_fenced")


class Key(C.BigEndianStructure):
    """struct natctl_key: one direction of a mapping, as the packet arrives."""

    _fields_ = [("saddr", C.c_uint32), ("sport", C.c_uint16), ("dport", C.c_uint16)]


class Rewrite(C.BigEndianStructure):
    """struct natctl_rewrite: relay:new_sport -> new_daddr:new_dport."""

    _fields_ = [("new_saddr", C.c_uint32), ("new_daddr", C.c_uint32), ("new_sport", C.c_uint16),
                ("new_dport", C.c_uint16)]


class FlowStats(C.Structure):
    """struct natctl_flow_stats: one CPU's share of what XDP forwarded for one key."""

    _fields_ = [("packets", C.c_uint64), ("bytes", C.c_uint64), ("last_seen", C.c_uint64)]


def ip_int(addr: str) -> int:
    return int(ipaddress.IPv4Address(addr))


def ip_str(value: int) -> str:
    return str(ipaddress.IPv4Address(value))


def key_of(t: tuple) -> Key:
    """From the plan's XDP key (saddr, sport, dport)."""
    saddr, sport, dport = t
    return Key(ip_int(saddr), sport, dport)


def rewrite_of(t: tuple) -> Rewrite:
    """From the plan's XDP value (new saddr, new sport, new daddr, new dport)."""
    saddr, sport, daddr, dport = t
    return Rewrite(ip_int(saddr), ip_int(daddr), sport, dport)


def key_tuple(k: Key) -> tuple:
    return (ip_str(k.saddr), k.sport, k.dport)


def rewrite_tuple(r: Rewrite) -> tuple:
    return (ip_str(r.new_saddr), r.new_sport, ip_str(r.new_daddr), r.new_dport)


# --- libbpf (bpf/bpf.h, bpf/libbpf.h) and uapi (linux/bpf.h) structs


class TestRunOpts(C.Structure):
    _fields_ = [("sz", C.c_size_t), ("data_in", C.c_void_p), ("data_out", C.c_void_p),
                ("data_size_in", C.c_uint32), ("data_size_out", C.c_uint32), ("ctx_in", C.c_void_p),
                ("ctx_out", C.c_void_p), ("ctx_size_in", C.c_uint32), ("ctx_size_out", C.c_uint32),
                ("retval", C.c_uint32), ("repeat", C.c_int), ("duration", C.c_uint32), ("flags", C.c_uint32),
                ("cpu", C.c_uint32), ("batch_size", C.c_uint32)]


class XdpMd(C.Structure):
    _fields_ = [(n, C.c_uint32) for n in ("data", "data_end", "data_meta", "ingress_ifindex",
                                          "rx_queue_index", "egress_ifindex")]


class BatchOpts(C.Structure):
    _fields_ = [("sz", C.c_size_t), ("elem_flags", C.c_uint64), ("flags", C.c_uint64)]


class XdpQueryOpts(C.Structure):
    _fields_ = [("sz", C.c_size_t), ("prog_id", C.c_uint32), ("drv_prog_id", C.c_uint32),
                ("hw_prog_id", C.c_uint32), ("skb_prog_id", C.c_uint32), ("attach_mode", C.c_uint8)]


class ProgInfo(C.Structure):  # struct bpf_prog_info, up to the fields natctl reads
    _fields_ = [("type", C.c_uint32), ("id", C.c_uint32), ("tag", C.c_uint8 * 8), ("jited_prog_len", C.c_uint32),
                ("xlated_prog_len", C.c_uint32), ("jited_prog_insns", C.c_uint64),
                ("xlated_prog_insns", C.c_uint64), ("load_time", C.c_uint64), ("created_by_uid", C.c_uint32),
                ("nr_map_ids", C.c_uint32), ("map_ids", C.c_uint64), ("name", C.c_char * 16)]


class MapInfo(C.Structure):  # struct bpf_map_info, likewise
    _fields_ = [("type", C.c_uint32), ("id", C.c_uint32), ("key_size", C.c_uint32), ("value_size", C.c_uint32),
                ("max_entries", C.c_uint32), ("map_flags", C.c_uint32), ("name", C.c_char * 16)]
