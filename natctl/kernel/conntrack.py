"""Forget conntrack entries of removed mappings, so their flows stop at once.

Stateful NAT looks a map up only for a flow's first packet; without this an
old flow would keep its translation after its mapping is gone.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import threading
from concurrent.futures import ThreadPoolExecutor

from natctl.kernel.nlbatch import attr as _attr  # netlink attributes, packed once for both nfnetlink users
from natctl.plan import Flow

PROTO_NUM = {"udp": socket.IPPROTO_UDP, "tcp": socket.IPPROTO_TCP}

# ctnetlink, for exact-tuple deletes without pyroute2 (whose import alone costs a command ~100 ms).
NETLINK_NETFILTER = 12
CT_DELETE = (1 << 8) | 2  # NFNL_SUBSYS_CTNETLINK, IPCTNL_MSG_CT_DELETE
NLM_F_REQUEST, NLM_F_ACK, NLMSG_ERROR, NLA_F_NESTED = 1, 4, 2, 0x8000


def _delete_message(seq: int, saddr: str, daddr: str, proto: int, sport: int, dport: int) -> bytes:
    """IPCTNL_MSG_CT_DELETE of the entry whose original tuple this is (CTA_TUPLE_ORIG: ip, then proto)."""
    ip = _attr(1 | NLA_F_NESTED, _attr(1, socket.inet_aton(saddr)) + _attr(2, socket.inet_aton(daddr)))
    l4 = _attr(2 | NLA_F_NESTED, _attr(1, bytes([proto])) + _attr(2, struct.pack("!H", sport))
               + _attr(3, struct.pack("!H", dport)))
    payload = struct.pack("=BBH", socket.AF_INET, 0, 0) + _attr(1 | NLA_F_NESTED, ip + l4)
    return struct.pack("=IHHII", 16 + len(payload), CT_DELETE, NLM_F_REQUEST | NLM_F_ACK, seq, 0) + payload


_local = threading.local()  # each thread's ctnetlink socket, and the network namespace it was made in
_seq = 0


def _socket() -> socket.socket:
    """This thread's ctnetlink socket, kept open while the thread stays in its network namespace: closing a
    netfilter netlink socket right after an nftables commit waits for the kernel's RCU grace period (3-13 ms
    measured), which would double the cost of every removal."""
    ns = os.stat("/proc/thread-self/ns/net").st_ino
    if getattr(_local, "ns", None) != ns:
        if getattr(_local, "sock", None) is not None:
            _local.sock.close()  # it would keep that namespace alive
        _local.sock, _local.ns = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER), ns
    sock: socket.socket = _local.sock
    return sock


CHUNK = 256  # requests per send: a netlink send must fit the socket's buffer, and so must its acks


def delete_exact(tuples: list[tuple[str, str, int, int, int]]) -> int:
    """Delete the entries with these original tuples (saddr, daddr, proto, sport, dport); how many
    existed. One netlink request each, however large the table, sent CHUNK at a time."""
    return sum(_delete_chunk(tuples[i:i + CHUNK]) for i in range(0, len(tuples), CHUNK))


def _delete_chunk(tuples: list[tuple[str, str, int, int, int]]) -> int:
    global _seq
    if not tuples:
        return 0
    s = _socket()
    first = _seq + 1
    _seq += len(tuples)
    s.sendall(b"".join(_delete_message(first + i, *t) for i, t in enumerate(tuples)))
    removed, left = 0, len(tuples)
    while left:
        data = s.recv(65536)
        off = 0
        while off + 16 <= len(data):
            length, kind, _flags, seq = struct.unpack_from("=IHHI", data, off)
            if kind == NLMSG_ERROR and first <= seq < first + len(tuples):  # an answer of an earlier call: not ours
                (code,) = struct.unpack_from("=i", data, off + 16)
                if code == 0:
                    removed += 1
                elif -code != errno.ENOENT:  # ENOENT: no flow, or the kernel's own expiry won the race
                    raise OSError(-code, f"conntrack delete: {os.strerror(-code)}")
                left -= 1
            off += (length + 3) & ~3
    return removed


def forget(flows: list[Flow]) -> int:
    """Delete entries whose original tuple matches a flow. Returns how many went."""
    if not flows:
        return 0
    exact: list[tuple[str, str, int, int, int]] = []
    rest: list[Flow] = []
    for f in flows:
        if f.saddr and f.daddr and f.sport:
            exact.append((f.saddr, f.daddr, PROTO_NUM[f.proto], f.sport, f.dport))
        else:
            rest.append(f)
    removed = delete_exact(exact)
    flows = rest
    if not flows:  # mappings only: no pyroute2 at all
        return removed
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return removed + _forget(flows)
    # pyroute2 runs an event loop of its own, which cannot start inside the daemon's: use a thread.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="natctl-conntrack") as pool:
        return removed + pool.submit(_forget, flows).result()


def _forget(flows: list[Flow]) -> int:
    from pyroute2 import Conntrack
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    ct = Conntrack()
    removed = 0

    def delete(saddr: str, daddr: str, proto: int, sport: int, dport: int) -> int:
        try:
            ct.entry("del", tuple_orig=NFCTAttrTuple(saddr=saddr, daddr=daddr, proto=proto, sport=sport,
                                                     dport=dport))
            return 1
        except NetlinkError as err:  # already gone: no flow, or the kernel's own expiry won the race
            if err.code != errno.ENOENT:
                raise
            return 0

    try:
        # Exact tuples: one netlink request each, however large the table.
        for f in flows:
            if f.saddr and f.daddr and f.sport:
                removed += delete(f.saddr, f.daddr, PROTO_NUM[f.proto], f.sport, f.dport)
        # Flows from any source (static forwards) or to an unknown address: one dump, filtered here.
        rest = [f for f in flows if not (f.saddr and f.daddr and f.sport)]
        if rest:
            exact = {(PROTO_NUM[f.proto], f.saddr, f.sport, f.dport) for f in rest if f.saddr}
            any_source = {(PROTO_NUM[f.proto], f.dport) for f in rest if not f.saddr}
            for entry in list(ct.dump_entries()):
                t = entry.tuple_orig
                if (t.proto, t.saddr, t.sport, t.dport) in exact or (t.proto, t.dport) in any_source:
                    removed += delete(t.saddr, t.daddr, t.proto, t.sport, t.dport)
    finally:
        ct.close()
    return removed
