"""What table inet natctl's maps hold, read through netlink (NFT_MSG_GETSETELEM dumps) as element bytes.

libnftables' JSON listing of 400,000 elements takes half a minute and gigabytes (an object per field of
each); a full reconcile needs only which elements are there. The kernel dumps each element as its key
(and key end, value) in NFTA_DATA_VALUE attributes holding the bytes natctl.packed plans, so one regular
expression per map lifts them out of each answer, at C speed, with nothing parsed per element but them.
Comments are skipped (listings still read them through libnftables); ``counters`` reads an element's
counter (NFTA_SET_ELEM_EXPR "counter": bytes, then packets, big-endian) with its bytes, for cleanup's idle
check at 100,000 mappings without libnftables' JSON.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import struct
import threading
from typing import Any

from natctl import packed
from natctl.errors import KernelError
from natctl.kernel.nlbatch import (
    DATA_VALUE,
    ELEM_DATA,
    ELEM_KEY,
    ELEM_KEY_END,
    LIST_SET,
    LIST_TABLE,
    NETLINK_CAP_ACK,
    NETLINK_NETFILTER,
    NFNL_SUBSYS_NFTABLES,
    NFPROTO_INET,
    NFT_MSG_NEWSETELEM,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    SOL_NETLINK,
    attr,
)
from natctl.plan import DNAT, SNAT

NFT_MSG_GETSETELEM = 13
_U64 = struct.Struct("!Q")
NLM_F_DUMP = 0x300
NLM_F_DUMP_INTR = 0x10
NLMSG_DONE = 3
RETRIES = 5  # a dump the kernel marks interrupted (the table changed under it) is read again


def _header(kind: int, size: int) -> bytes:
    """A key's (key end's, value's) nest as the kernel dumps it (no NLA_F_NESTED) around one NFTA_DATA_VALUE."""
    return struct.pack("=HHHH", 4 + 4 + ((size + 3) & ~3), kind, 4 + size, DATA_VALUE)


def pattern(name: str) -> re.Pattern[bytes]:
    """One element's key (key end, value) in a dump of map ``name``, each field's bytes a group."""
    lay = packed.LAYOUTS[name]
    key = lay.ksize // 2 if lay.interval else lay.ksize
    pad = b"\0" * (-key % 4)  # a lone port's 2 bytes are padded to 4
    text = re.escape(_header(ELEM_KEY, key)) + b"(.{%d})" % key + re.escape(pad)
    if lay.interval:
        text += re.escape(_header(ELEM_KEY_END, key)) + b"(.{%d})" % key + re.escape(pad)
    vsize = lay.size - lay.ksize
    if vsize:
        text += re.escape(_header(ELEM_DATA, vsize)) + b"(.{%d})" % vsize
    return re.compile(text, re.DOTALL)


_PATTERNS: dict[str, re.Pattern[bytes]] = {}


def _request(table: str, name: str, seq: int) -> bytes:
    payload = struct.pack("=BBH", NFPROTO_INET, 0, 0) + attr(LIST_TABLE, table.encode() + b"\0") \
        + attr(LIST_SET, name.encode() + b"\0")
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM
    return struct.pack("=IHHII", 16 + len(payload), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + payload


def _counted(name: str) -> re.Pattern[bytes]:
    key = name + "+counter"
    if key not in _PATTERNS:
        _PATTERNS[key] = re.compile(pattern(name).pattern + _counter_text(), re.DOTALL)
    return _PATTERNS[key]


def _counter_text() -> bytes:
    """What follows a counted element's value in a dump: NFTA_SET_ELEM_EXPR, a "counter" expression whose
    data holds NFTA_COUNTER_BYTES then NFTA_COUNTER_PACKETS (u64 each)."""
    head = struct.pack("=HHHH", 44, 7, 12, 1) + b"counter\0" + struct.pack("=HHHH", 28, 2, 12, 1)
    return re.escape(head) + b"(.{8})" + re.escape(struct.pack("=HH", 12, 2)) + b"(.{8})"


def _dump(sock: socket.socket, table: str, name: str, seq: int,
          counted: bool = False) -> set[bytes] | dict[bytes, tuple[int, int]] | None:
    """One map's elements (``counted``: element bytes -> (packets, bytes)); None if the dump was interrupted
    (read it again)."""
    pat = _counted(name) if counted else (_PATTERNS.get(name) or _PATTERNS.setdefault(name, pattern(name)))
    groups = pat.groups - (2 if counted else 0)
    sock.send(_request(table, name, seq))
    out: Any = {} if counted else set()
    intr = False
    while True:
        buf = sock.recv(1 << 20)
        off = 0
        while off + 16 <= len(buf):  # a few messages a buffer: check each for the end, errors, interruption
            length, kind, flags, mseq = struct.unpack_from("=IHHI", buf, off)
            if mseq == seq:
                if kind == NLMSG_DONE:
                    return None if intr else out
                if kind == NLMSG_ERROR:
                    (code,) = struct.unpack_from("=i", buf, off + 16)
                    if code:
                        raise OSError(-code, os.strerror(-code))
                elif kind == (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWSETELEM:
                    intr = intr or bool(flags & NLM_F_DUMP_INTR)
                    found = pat.findall(buf, off + 20, off + length)
                    if counted:
                        out.update((b"".join(f[:groups]), (_U64.unpack(f[-1])[0], _U64.unpack(f[-2])[0]))
                                   for f in found)
                    else:
                        out.update(found if groups == 1 else map(b"".join, found))
            off += (length + 3) & ~3 if length else len(buf)


NFT_MSG_GETCHAIN, NFT_MSG_GETSET = 4, 10
OBJ_TABLE = 1  # NFTA_CHAIN_TABLE, NFTA_SET_TABLE
NAME_ATTR = {NFT_MSG_GETCHAIN: 3, NFT_MSG_GETSET: 2}


def names(table: str, what: int) -> set[str]:
    """The names of the chains (``what`` NFT_MSG_GETCHAIN) or sets (NFT_MSG_GETSET) of table inet ``table``:
    a dump of the family's, a few dozen, without a set's elements (libnftables would read them all)."""
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        s.bind((0, 0))
        payload = struct.pack("=BBH", NFPROTO_INET, 0, 0)
        kind = (NFNL_SUBSYS_NFTABLES << 8) | what
        s.send(struct.pack("=IHHII", 16 + len(payload), kind, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + payload)
        out: set[str] = set()
        while True:
            buf = s.recv(1 << 16)
            off = 0
            while off + 16 <= len(buf):
                length, kind, _flags, _seq = struct.unpack_from("=IHHI", buf, off)
                if kind in (NLMSG_DONE, NLMSG_ERROR):
                    return out
                attrs = _attrs(buf, off + 20, off + length)  # a chain's: its table's name and its own
                name = attrs.get(NAME_ATTR[what])
                if attrs.get(OBJ_TABLE, b"").rstrip(b"\0") == table.encode() and name is not None:
                    out.add(name.rstrip(b"\0").decode())
                off += (length + 3) & ~3 if length else len(buf)
    finally:
        s.close()


def _attrs(buf: bytes, pos: int, end: int) -> dict[int, bytes]:
    """A message's top-level attributes (after its nfgenmsg), by type."""
    attrs = {}
    while pos + 4 <= min(end, len(buf)):
        alen, atype = struct.unpack_from("=HH", buf, pos)
        if alen < 4:
            break
        attrs[atype & 0x3FFF] = buf[pos + 4: pos + alen]
        pos += (alen + 3) & ~3
    return attrs


def counters(table: str, names: list[str]) -> dict[str, dict[bytes, tuple[int, int]]]:
    """Each counted map's element bytes -> (packets, bytes), as ``read`` reads elements."""
    return read(table, names, counted=True)  # type: ignore[return-value]


def read(table: str, names: list[str], counted: bool = False) -> dict[str, set[bytes]]:
    """The element bytes of each map in ``names`` (an absent one reads empty). OSError if refused.

    The maps of every mapping (two elements each in dnat4 and snat4) are read at once, each on a socket and
    a thread of its own: the kernel's walks, once per message, are most of a full read at 100,000 mappings
    and run in recv, so on two CPUs they take the time of the longer one."""
    big = [n for n in names if n in (DNAT, SNAT)]
    if len(big) < 2:
        return _read(table, names, counted)
    out: dict[str, Any] = {}
    failed: list[BaseException] = []

    def work(part: list[str]) -> None:  # a new thread starts in this thread's network namespace
        try:
            out.update(_read(table, part, counted))
        except BaseException as err:  # noqa: BLE001  re-raised in the caller's thread
            failed.append(err)

    helper = threading.Thread(target=work, args=(big[:1],), name="natctl-dump", daemon=True)
    helper.start()
    work([n for n in names if n != big[0]])
    helper.join()
    if failed:
        raise failed[0]
    return out


def _read(table: str, names: list[str], counted: bool = False) -> dict[str, Any]:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        s.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        s.bind((0, 0))
        out: dict[str, Any] = {}
        seq = 1
        for name in names:
            for _ in range(RETRIES):
                seq += 1
                got: Any
                try:
                    got = _dump(s, table, name, seq, counted)
                except FileNotFoundError:
                    got = {} if counted else set()
                if got is not None:
                    out[name] = got
                    break
            else:
                raise KernelError(f"cannot read set {name} of table inet {table}: it kept changing "
                                  f"({os.strerror(errno.EINTR)})", "run 'natctl apply' again")
        return out
    finally:
        s.close()


NFT_MSG_GETGEN, NFTA_GEN_ID = 16, 1


def ruleset_generation() -> int:
    """nftables' ruleset generation in this network namespace (NFT_MSG_GETGEN): every committed
    transaction adds one, of any table, by any program; packets updating a dynamic set and elements
    timing out do not. The number natctl's own last commit left, read again later, proves that nothing
    changed nftables since (natctl.sync: a full reconcile then need not dump its maps). OSError if refused.
    Asked on the thread's nfnetlink socket (nlbatch.thread_socket): a socket closed right after a commit
    waits for an RCU grace period, 6 ms of every change."""
    from natctl.kernel.nlbatch import next_seq, thread_socket

    s, seq = thread_socket(), next_seq()
    payload = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
    s.send(struct.pack("=IHHII", 16 + len(payload), (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN, NLM_F_REQUEST,
                       seq, 0) + payload)
    while True:  # the answer is queued within the send; anything older on the socket is passed over
        buf = s.recv(1 << 16)
        length, kind, _flags, mseq = struct.unpack_from("=IHHI", buf, 0)
        if mseq == seq:
            break
    if kind == NLMSG_ERROR:
        (code,) = struct.unpack_from("=i", buf, 16)
        raise OSError(-code, os.strerror(-code))
    gen = _attrs(buf, 20, length).get(NFTA_GEN_ID, b"")
    if len(gen) < 4:
        raise OSError(errno.EPROTO, "no NFTA_GEN_ID in the kernel's answer")
    return int(struct.unpack_from("!I", gen)[0])
