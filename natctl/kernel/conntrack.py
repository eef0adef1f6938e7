"""Forget conntrack entries of removed mappings, so their flows stop at once.

Stateful NAT looks a map up only for a flow's first packet; without this an
old flow would keep its translation after its mapping is gone.
"""

from __future__ import annotations

import errno
import socket

from natctl.plan import Flow

PROTO_NUM = {"udp": socket.IPPROTO_UDP, "tcp": socket.IPPROTO_TCP}


def forget(flows: list[Flow]) -> int:
    """Delete entries whose original tuple matches a flow. Returns how many went."""
    if not flows:
        return 0
    from pyroute2 import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    wanted = {(PROTO_NUM[f.proto], f.dport) for f in flows}
    exact = {(PROTO_NUM[f.proto], f.saddr, f.sport, f.dport) for f in flows if f.saddr}
    any_source = {(PROTO_NUM[f.proto], f.dport) for f in flows if not f.saddr}
    removed = 0
    ct = Conntrack()
    try:
        # One dump, filtered here: cheaper than one netlink round trip per flow
        # when many mappings go at once, and exact for both kinds of flow.
        for entry in list(ct.dump_entries()):
            t = entry.tuple_orig
            if (t.proto, t.dport) not in wanted:
                continue
            if (t.proto, t.saddr, t.sport, t.dport) in exact or (t.proto, t.dport) in any_source:
                try:
                    ct.entry("del", tuple_orig=NFCTAttrTuple(
                        saddr=t.saddr, daddr=t.daddr, proto=t.proto, sport=t.sport, dport=t.dport))
                    removed += 1
                except OSError as err:  # already gone: a race with the kernel's own expiry
                    if err.errno != errno.ENOENT:
                        raise
    finally:
        ct.close()
    return removed
