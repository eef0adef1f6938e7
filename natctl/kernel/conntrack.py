"""Forget conntrack entries of removed mappings, so their flows stop at once.

Stateful NAT looks a map up only for a flow's first packet; without this an
old flow would keep its translation after its mapping is gone.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from concurrent.futures import ThreadPoolExecutor

from natctl.plan import Flow

PROTO_NUM = {"udp": socket.IPPROTO_UDP, "tcp": socket.IPPROTO_TCP}


def forget(flows: list[Flow]) -> int:
    """Delete entries whose original tuple matches a flow. Returns how many went."""
    if not flows:
        return 0
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _forget(flows)
    # pyroute2 runs an event loop of its own, which cannot start inside the daemon's: use a thread.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="natctl-conntrack") as pool:
        return pool.submit(_forget, flows).result()


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
