"""The element changes of a sync as one nfnetlink batch, packed with ``struct`` (no libnftables, no pyroute2).

One sync's deletes and adds of elements in ``table inet natctl`` (and the
generation and owner sets it rewrites) go to the kernel as

    NFNL_MSG_BATCH_BEGIN, NFT_MSG_DELSETELEM..., NFT_MSG_NEWSETELEM..., NFNL_MSG_BATCH_END

with many elements per message and NLM_F_ACK on each, so the kernel answers
every message and takes all of the batch or none of it. The bytes of each
message are those ``nft`` sends for the same ``add/delete element`` text
(tests/unit/test_nlbatch.py holds them as golden files). The table, its sets
and chains stay with libnftables (natctl.kernel.nft.skeleton).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from itertools import repeat
from typing import cast

from natctl import packed
from natctl.errors import KernelError
from natctl.plan import Changes, Element

NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_ACK, NLM_F_CREATE = 0x1, 0x4, 0x400
NLMSG_ERROR = 2
NLA_F_NESTED = 0x8000
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM = 12, 14
NFPROTO_INET = 1
# NFTA_SET_ELEM_LIST_*
LIST_TABLE, LIST_SET, LIST_ELEMENTS = 1, 2, 3
# NFTA_SET_ELEM_*, NFTA_DATA_VALUE
ELEM, ELEM_KEY, ELEM_DATA, ELEM_USERDATA, ELEM_KEY_END, DATA_VALUE = 1, 1, 2, 6, 10, 1
UDATA_COMMENT = 0  # NFTNL_UDATA_SET_ELEM_COMMENT
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK = 270, 10, 11
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33
LIST_MAX = 60_000  # bytes of elements per message: a netlink attribute's length is 16 bits
PROTO = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


def attr(kind: int, data: bytes) -> bytes:
    """One netlink attribute (type, length, data), padded to 4 bytes."""
    body = struct.pack("=HH", 4 + len(data), kind) + data
    return body + b"\0" * (-len(body) % 4)


def nest(kind: int, *parts: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(parts))


def _field(kind: str, v: object) -> bytes:
    if kind == "ipv4_addr":
        return socket.inet_aton(str(v))
    if kind == "inet_proto":
        return bytes([PROTO[v] if isinstance(v, str) else int(v)])  # type: ignore[call-overload]
    if kind == "inet_service":
        return struct.pack("!H", int(v))  # type: ignore[call-overload]
    if kind == "mark":
        return struct.pack("=I", int(v))  # type: ignore[call-overload]
    raise ValueError(f"natctl cannot write {kind} elements through netlink")


def encode(typ: str, values: tuple) -> bytes:
    """A key or value: each field of a concatenation padded to 4 bytes, a lone field as it is."""
    kinds = typ.split(" . ")
    if len(kinds) == 1:
        return _field(kinds[0], values[0])
    out = b""
    for k, v in zip(kinds, values, strict=True):
        f = _field(k, v)
        out += f + b"\0" * (-len(f) % 4)
    return out


def _interval(typ: str, values: tuple) -> tuple[bytes, bytes]:
    """An interval set's key and key end: its ipv4_addr fields are networks (first and last address)."""
    low, high = [], []
    for k, v in zip(typ.split(" . "), values, strict=True):
        if k == "ipv4_addr":
            net = ipaddress.IPv4Network(str(v), strict=False)
            low.append(str(net.network_address))
            high.append(str(net.broadcast_address))
        else:
            low.append(v)
            high.append(v)
    return encode(typ, tuple(low)), encode(typ, tuple(high))


def comment_udata(comment: str) -> bytes:
    """NFTA_SET_ELEM_USERDATA of a comment: the nftnl udata TLV (type, length, NUL-terminated text)."""
    if len(comment) > 128:  # natctl.kernel.nft.COMMENT_MAX: nft refuses a longer one, so does this writer
        raise ValueError(f"comment of {len(comment)} characters, at most 128")
    text = comment.encode() + b"\0"
    return struct.pack("=BB", UDATA_COMMENT, len(text)) + text


_ADDR = packed._ADDR  # dotted address -> its 4 bytes, remembered (shared with the planner)


def _packer(typ: str) -> tuple[struct.Struct, list[str]] | None:
    """A key or value type as one big-endian struct (its padding included) and each field's conversion as
    Python text over ``x``; None for a type packed field by field (mark is host-endian)."""
    kinds = typ.split(" . ")
    lone = len(kinds) == 1
    fmt, conv = "!", []
    for k in kinds:
        if k == "ipv4_addr":
            fmt += "4s"
            conv.append("A[x]")
        elif k == "inet_proto":
            fmt += "B" if lone else "B3x"
            conv.append("P[x]")
        elif k == "inet_service":
            fmt += "H" if lone else "H2x"
            conv.append("x")
        else:
            return None
    return struct.Struct(fmt), conv


def _value_attr(kind: int, size: int) -> bytes:
    """The headers before a key's or value's bytes: its nest (``kind``) holding one NFTA_DATA_VALUE."""
    inner = 4 + size
    return struct.pack("=HHHH", 4 + ((inner + 3) & ~3), kind | NLA_F_NESTED, inner, DATA_VALUE)


class Layout:
    """How one map or set's elements are packed: its key and value types, interval or not."""

    def __init__(self, key: str, value: str | None = None, interval: bool = False) -> None:
        self.key, self.value, self.interval = key, value, interval
        self.kp, self.vp = _packer(key), _packer(value) if value else None
        self._udata: dict[str, bytes] = {}
        self._fast: Callable[[Element, bool], bytes] | None = None
        if self.kp:  # the bytes a lone field leaves unpadded (a 2-byte port, a 1-byte protocol)
            size = self.kp[0].size
            self.khead, self.kpad = _value_attr(ELEM_KEY, size), b"\0" * (-size % 4)
        if self.vp:
            size = self.vp[0].size
            self.vhead, self.vpad = _value_attr(ELEM_DATA, size), b"\0" * (-size % 4)
        self._compile()

    def comment(self, text: str) -> bytes:
        b = self._udata.get(text)
        if b is None:
            if len(self._udata) > 1 << 16:
                self._udata.clear()
            b = self._udata[text] = attr(ELEM_USERDATA, comment_udata(text))
        return b

    def element(self, e: Element, add: bool) -> bytes:
        """The attributes inside one element's nest (set_messages numbers the nests, as nft does)."""
        return self._fast(e, add) if self._fast else self._slow(e, add)

    def _compile(self) -> None:
        """One function per layout that packs an element with two struct calls: a quarter of the time of a
        general one, which matters at 400,000 elements."""
        self._fast = None
        if self.interval or not self.kp or (self.value and not self.vp):
            return
        key = ", ".join(c.replace("x", f"k[{i}]") for i, c in enumerate(self.kp[1]))
        lines = ["def pack(e, add):", "    k = e.key", f"    out = KH + KS({key}) + KPAD", "    if add:"]
        if self.vp:
            val = ", ".join(c.replace("x", f"v[{i}]") for i, c in enumerate(self.vp[1]))
            lines += ["        v = e.value", "        if v is not None:", f"            out += VH + VS({val}) + VPAD"]
        lines += ["        c = e.comment", "        if c:", "            out += U[c] if c in U else comment(c)",
                  "    return out"]
        scope = {"A": _ADDR, "P": PROTO, "KH": self.khead, "KS": self.kp[0].pack, "KPAD": self.kpad,
                 "U": self._udata, "comment": self.comment}
        if self.vp:
            scope.update(VH=self.vhead, VS=self.vp[0].pack, VPAD=self.vpad)
        exec("\n".join(lines), scope)  # noqa: S102 - text built above from fixed pieces only
        self._fast = cast(Callable[[Element, bool], bytes], scope["pack"])

    def packed(self, name: str, items: list[bytes], comments: Mapping[bytes, str] | None,
               add: bool) -> Iterator[bytes]:
        """The nests' insides for element bytes (natctl.packed): its key and value are already packed as
        this layout packs them, so each is framed as it is, without an Element (an interval's, unpacked)."""
        if self.interval or not self.kp or (self.value and not self.vp):
            yield from (self._slow(packed.unpack(name, d, (comments or {}).get(d, "")), add) for d in items)
            return
        kh, kpad, size, udata = self.khead, self.kpad, self.kp[0].size, self._udata
        if not add:
            yield from (kh + d[:size] + kpad for d in items)
            return
        vh, vpad = (self.vhead, self.vpad) if self.vp else (b"", b"")
        lookup: Mapping[bytes, str] = comments if comments is not None else {}
        for d in items:
            body = kh + d[:size] + kpad + vh + d[size:] + vpad if vh else kh + d + kpad
            c = lookup.get(d)
            yield body + (udata[c] if c in udata else self.comment(c)) if c else body

    def _slow(self, e: Element, add: bool) -> bytes:
        if self.interval:
            low, high = _interval(self.key, e.key)
            parts = [nest(ELEM_KEY, attr(DATA_VALUE, low)), nest(ELEM_KEY_END, attr(DATA_VALUE, high))]
        else:
            parts = [nest(ELEM_KEY, attr(DATA_VALUE, encode(self.key, e.key)))]
        if add and self.value is not None and e.value is not None:
            parts.append(nest(ELEM_DATA, attr(DATA_VALUE, encode(self.value, e.value))))
        if add and e.comment:
            parts.append(attr(ELEM_USERDATA, comment_udata(e.comment)))
        return b"".join(parts)


_LAYOUTS: dict[str, Layout] = {}


def layouts() -> dict[str, Layout]:
    """Every set natctl writes elements to, from natctl.kernel.nft's types (made once: each compiles)."""
    if not _LAYOUTS:
        from natctl.kernel.nft import INTERVAL, TYPES

        out = {name: Layout(k, v, name in INTERVAL) for name, (k, v) in TYPES.items()}
        out["generation"] = out["owner"] = Layout("mark")
        _LAYOUTS.update(out)
    return _LAYOUTS


def _header(table: str, name: str) -> bytes:
    return struct.pack("=BBH", NFPROTO_INET, 0, 0) + attr(LIST_TABLE, table.encode() + b"\0") \
        + attr(LIST_SET, name.encode() + b"\0")


def _flush(table: str, name: str) -> bytes:
    """DELSETELEM without elements: every element of the set goes (nft names the set first here)."""
    return struct.pack("=BBH", NFPROTO_INET, 0, 0) + attr(LIST_SET, name.encode() + b"\0") \
        + attr(LIST_TABLE, table.encode() + b"\0")


def set_messages(kind: int, table: str, name: str, elements: Iterable[bytes]) -> Iterator[tuple[int, bytes]]:
    """(type, payload) of the messages that carry these packed elements, at most LIST_MAX bytes of them each.
    Each element is a nest numbered from 1 in its message, as nft numbers them (the kernel reads no number)."""
    head = _header(table, name)
    hdr = struct.Struct("=HH").pack
    chunk: list[bytes] = []
    size = 0
    for body in elements:
        n = len(body) + 4
        if size + n > LIST_MAX and chunk:
            yield kind, head + nest(LIST_ELEMENTS, *chunk)
            chunk, size = [], 0
        chunk.append(hdr(n, (len(chunk) + 1) | NLA_F_NESTED) + body)
        size += n
    if chunk:
        yield kind, head + nest(LIST_ELEMENTS, *chunk)


def messages(changes: Changes, table: str) -> Iterator[tuple[int, bytes]]:
    """The batch's messages (type without the subsystem, payload) for a change, in the order nft's script
    sends them (see natctl.kernel.nft.render): deletes, adds, then the generation and owner sets. Made one
    at a time, as ``batch`` frames them: 400,000 elements are never held twice."""
    lay = layouts()
    for kind, items, add in ((NFT_MSG_DELSETELEM, changes.delete, False), (NFT_MSG_NEWSETELEM, changes.add, True)):
        if kind == NFT_MSG_DELSETELEM and changes.create_table:
            continue  # a fresh table holds nothing to delete
        if isinstance(items, packed.PackedElements):  # a full reconcile's: bytes framed as they are
            for name, (data, comments) in sorted(items.groups.items()):
                if name not in lay:
                    raise KernelError(f"natctl has no set {name!r} to write to", "this is a bug in natctl")
                yield from set_messages(kind, table, name, lay[name].packed(name, data, comments, add))
            continue
        by_set: dict[str, list[Element]] = {}
        for e in items:
            by_set.setdefault(e.set, []).append(e)
        for name in sorted(by_set):
            if name not in lay:
                raise KernelError(f"natctl has no set {name!r} to write to", "this is a bug in natctl")
            pack = lay[name]._fast or lay[name]._slow
            yield from set_messages(kind, table, name, map(pack, by_set[name], repeat(add)))
    from natctl.kernel.nft import comment_text

    if changes.generation is not None:
        yield NFT_MSG_DELSETELEM, _flush(table, "generation")
        yield from set_messages(NFT_MSG_NEWSETELEM, table, "generation",
                                [lay["generation"].element(Element("generation", (changes.generation,)), True)])
    if changes.owner is not None:
        yield NFT_MSG_DELSETELEM, _flush(table, "owner")
        owner = Element("owner", (changes.owner.id,), None, comment_text(changes.owner.path))
        yield from set_messages(NFT_MSG_NEWSETELEM, table, "owner", [lay["owner"].element(owner, True)])


def _nlmsg(kind: int, flags: int, seq: int, payload: bytes) -> bytes:
    return struct.pack("=IHHII", 16 + len(payload), kind, flags, seq, 0) + payload


_seq = 0


def batch(msgs: Iterable[tuple[int, bytes]], first_seq: int, kept: list[tuple[int, bytes]] | None = None,
          keep: int = 256) -> bytearray:
    """BATCH_BEGIN, the messages (each NLM_F_ACK, elements created as nft creates them), BATCH_END.
    ``kept`` receives each message's type and first ``keep`` bytes (its set's name, all an error message
    needs), so a large batch is held once: framed, not also as its messages."""
    res = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(NFNL_SUBSYS_NFTABLES))
    out = bytearray(_nlmsg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, first_seq, res))
    n = 0
    for n, (kind, payload) in enumerate(msgs, 1):
        flags = NLM_F_REQUEST | NLM_F_ACK | (NLM_F_CREATE if kind == NFT_MSG_NEWSETELEM else 0)
        out += struct.pack("=IHHII", 16 + len(payload), (NFNL_SUBSYS_NFTABLES << 8) | kind, flags,
                           first_seq + n, 0)
        out += payload
        if kept is not None:
            kept.append((kind, payload[:keep]))
    out += _nlmsg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, first_seq + 1 + n, res)
    return out


_local = threading.local()


def thread_socket() -> socket.socket:
    """This thread's nfnetlink socket, kept while the thread stays in its network namespace (closing one
    right after a commit waits for an RCU grace period, see natctl.kernel.conntrack)."""
    ns = os.stat("/proc/thread-self/ns/net").st_ino
    if getattr(_local, "ns", None) != ns:
        if getattr(_local, "sock", None) is not None:
            _local.sock.close()
        s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        s.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # errors without a copy of the (large) message
        s.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        s.bind((0, 0))
        _local.sock, _local.ns, _local.buf = s, ns, 0
    sock: socket.socket = _local.sock
    return sock


def _describe(code: int, kind: int, payload: bytes) -> str:
    what = "delete" if kind == NFT_MSG_DELSETELEM else "add"
    name = ""
    try:  # the set the refused message wrote to: the second attribute of its payload
        off = 4
        for _ in range(2):
            length, typ = struct.unpack_from("=HH", payload, off)
            if typ == LIST_SET:
                name = payload[off + 4: off + length].rstrip(b"\0").decode()
            off += (length + 3) & ~3
    except (struct.error, UnicodeDecodeError):
        pass
    where = f" element in {name}" if name else " element"
    return f"{what}{where}: {os.strerror(code)}"


def _unwritable(changes: Changes, err: Exception) -> str:
    """Which element could not be packed (looked for only when one could not)."""
    lay = layouts()
    for add, items in ((False, changes.delete), (True, changes.add)):
        for e in items:
            try:
                lay[e.set]._slow(e, add)
            except (struct.error, ValueError, KeyError, TypeError, OSError, IndexError) as e_err:
                value = f" : {' . '.join(map(str, e.value))}" if add and e.value else ""
                return f"{e.set} element {' . '.join(map(str, e.key))}{value}: {e_err}"
    return str(err)


def next_seq(count: int = 1) -> int:
    """The first of ``count`` new sequence numbers of this process's nfnetlink messages."""
    global _seq
    first = _seq + 1
    _seq += count
    return first


def send(changes: Changes, table: str) -> int:
    """Write a change's elements in one batch; how many messages it took. Raises KernelError if refused
    (then the kernel holds nothing of it)."""
    msgs: list[tuple[int, bytes]] = []  # each message's type and set, for the errors
    first = next_seq()  # BATCH_BEGIN's; the messages' follow (a thread's own socket: no other takes them)
    try:
        data = batch(messages(changes, table), first, msgs)
    except (struct.error, ValueError, KeyError, TypeError, OSError, IndexError) as err:
        raise KernelError(f"nftables refused the change, nothing was applied ({_unwritable(changes, err)})",
                          "this element does not fit its set's type") from None
    next_seq(len(msgs) + 1)
    if not msgs:
        return 0
    s = thread_socket()
    want = len(data) + 65536
    if want > _local.buf:  # the whole batch goes in one send, so one skb: the buffers must hold it
        s.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, want)
        # An answer is an skb of its own (about 1 KiB of buffer each): room for all, or acks would be lost.
        s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, max(1 << 20, 4096 * len(msgs)))
        _local.buf = want
    try:
        s.sendall(data)
    except OSError as err:
        raise KernelError(f"nftables refused the change, nothing was applied (netlink: {err.strerror})",
                          "check that the kernel has nf_tables with NAT support (modprobe nft_nat)") from None
    # nfnetlink handles a batch inside the send: every answer is queued by the time it returns.
    acked, errors = 0, []
    while True:  # drain them all, so no answer of this batch is left for the next
        try:
            reply = s.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        except OSError as err:  # ENOBUFS: answers were dropped, so whether it applied is unknown here
            raise KernelError(f"nftables' answer to a change was lost (netlink: {err.strerror})",
                              "run 'natctl apply' to reconcile the kernel with the store") from None
        off = 0
        while off + 16 <= len(reply):
            length, kind, _flags, seq = struct.unpack_from("=IHHI", reply, off)
            if kind == NLMSG_ERROR and first <= seq <= first + len(msgs) + 1:
                (code,) = struct.unpack_from("=i", reply, off + 16)
                if code == 0:
                    acked += 1
                elif seq == first or seq > first + len(msgs):  # the batch itself
                    errors.append(f"batch: {os.strerror(-code)}")
                else:
                    k, payload = msgs[seq - first - 1]
                    errors.append(_describe(-code, k, payload))
            off += (length + 3) & ~3 if length else len(reply)
    if errors:
        raise KernelError(f"nftables refused the change, nothing was applied ({errors[0]})",
                          "check that the kernel has nf_tables with NAT support (modprobe nft_nat)")
    if acked < len(msgs):
        raise KernelError(f"nftables answered {acked} of {len(msgs)} messages of a change (netlink: "
                          f"{os.strerror(errno.EIO)})", "run 'natctl apply' again to reconcile")
    return len(msgs)
