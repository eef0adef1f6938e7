"""What a lab of veth pairs needs before the relay rewrites packets in XDP (a real NIC needs none of it).

- Frames the relay sends back with XDP_TX in native mode reach the veth peer
  only when the peer runs an XDP program itself: the "internet" side of the
  relay's link gets a trivial XDP_PASS program.
- Local sockets on veth leave UDP checksums partial (tx offload); a rewrite
  in XDP turns them into wrong ones. The endpoints compute them in full.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

from natctl.kernel import libbpf
from natctl.lab.netns import entered, run
from natctl.lab.topology import Lab

RELAY_PEER = "p0"  # the relay's eth0 is paired with p0 in the inet namespace
# r0 = XDP_PASS; exit
PASS_INSNS = bytes([0xB7, 0, 0, 0, libbpf.XDP_PASS, 0, 0, 0]) + bytes([0x95, 0, 0, 0, 0, 0, 0, 0])


def attach_pass(ns: str, ifname: str) -> None:
    """Give ``ifname`` in ``ns`` an XDP program that passes everything (native mode)."""
    fd = libbpf.load_insns(libbpf.BPF_PROG_TYPE_XDP, "lab_pass", PASS_INSNS)
    try:
        with entered(ns):
            libbpf.xdp_attach(socket.if_nametoindex(ifname), fd, libbpf.XDP_FLAGS_DRV_MODE)
    finally:
        os.close(fd)  # the attachment holds the program


def detach_all(ns: str, ifname: str) -> None:
    """Remove any XDP program from an interface, in either mode (no error if there is none)."""
    for mode in ("xdpdrv", "xdpgeneric"):
        run(["ip", "-n", ns, "link", "set", "dev", ifname, mode, "off"], check=False)


def tx_checksums(lab: Lab, on: bool, check: bool = True) -> None:
    """Checksum offload of every member's interface (off: sockets compute full UDP checksums)."""
    for member in lab.members.values():
        run(["ethtool", "-K", "eth0", "tx", "on" if on else "off"], ns=member.ns, check=check)


@contextmanager
def prepared(lab: Lab) -> Iterator[Lab]:
    """The lab, ready for the relay's XDP program; everything is undone afterwards, also on failure."""
    try:
        attach_pass(lab.inet_ns, RELAY_PEER)
        tx_checksums(lab, on=False)
        yield lab
    finally:
        detach_all(lab.inet_ns, RELAY_PEER)
        detach_all(lab.relay_ns, "eth0")
        tx_checksums(lab, on=True, check=False)


def resolve_gateway(lab: Lab, timeout: float = 2.0) -> str:
    """Make the relay learn its gateway's MAC (XDP passes packets until it is known); returns the state."""
    from natctl.lab.topology import INET_RELAY_SIDE

    with entered(lab.relay_ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.sendto(b"arp, please", (INET_RELAY_SIDE, 9))
    deadline = time.monotonic() + timeout
    while True:  # bounded: a veth answers ARP in microseconds
        out = run(["ip", "-n", lab.relay_ns, "neigh", "show", INET_RELAY_SIDE, "dev", "eth0"]).stdout.split()
        state = out[-1] if out else "NONE"
        if state in ("REACHABLE", "STALE", "DELAY", "PROBE", "PERMANENT") or time.monotonic() > deadline:
            return state
        time.sleep(0.01)
