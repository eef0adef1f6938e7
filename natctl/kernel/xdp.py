"""natctl's XDP program on the relay's interface: find it, load it, attach it, read and write its maps.

The kernel is the source of truth: natctl finds its program through the
interface (attached program id -> program info -> map ids -> fds), so neither
``ip netns exec`` (which remounts /sys) nor a restart of natctl matters, and
traffic never stops while natctl is not running. Pins under a bpffs are
optional extras (for bpftool, and to re-attach the same maps if someone
detached the program).

The backend built on this (``XdpKernel``) lives in natctl.kernel.accel.
"""

from __future__ import annotations

import ctypes as C
import os
import socket
import struct
from dataclasses import dataclass, field

from natctl import packed
from natctl.errors import KernelError
from natctl.kernel import bpf_layout as L
from natctl.kernel import libbpf
from natctl.plan import XDP

# The object built by bpf/Makefile (scripts/setup.sh); NATCTL_BPF_OBJECT overrides it.
# the checkout's bpf/ (natctl is installed editable); os.path, not pathlib: its import costs every command ~3 ms
OBJECT = os.environ.get("NATCTL_BPF_OBJECT") or os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))), "bpf", "xdp_relay.o")
PIN_ROOT = "/sys/fs/bpf/natctl"
# One relay map entry as the kernel keeps it: struct natctl_key, then struct natctl_rewrite (bpf_layout).
_RAW = struct.Struct("!4sHH4s4sHH")
_KEY, _REWRITE = struct.Struct("!4sHH"), struct.Struct("!4s4sHH")
MODES = ("auto", "native", "generic")
FLAGS = {"native": libbpf.XDP_FLAGS_DRV_MODE, "generic": libbpf.XDP_FLAGS_SKB_MODE}
# name -> (key size, value size, max entries); a program whose maps differ is an older natctl's.
MAPS = {L.RELAY_MAP: (C.sizeof(L.Key), C.sizeof(L.Rewrite), L.MAX_ENTRIES),
        L.FLOWS_MAP: (C.sizeof(L.Key), C.sizeof(L.FlowStats), L.MAX_ENTRIES),
        L.COUNT_MAP: (4, 8, len(L.COUNTERS)),
        L.LEASE_MAP: (4, 8, 1)}


class XdpUnavailable(KernelError):
    """This interface or kernel cannot take natctl's XDP program (nftables carries on alone)."""


def attached(ifindex: int) -> tuple[str, int] | None:
    """(mode, program id) of the XDP program on an interface, if any."""
    q = libbpf.xdp_query(ifindex)
    for mode, prog_id in (("native", q.drv_prog_id), ("generic", q.skb_prog_id), ("offload", q.hw_prog_id)):
        if prog_id:
            return mode, prog_id
    return None


def _handles(prog_fd: int) -> dict[str, int] | None:
    """fds of natctl's maps used by this program; None if it is not natctl's current layout.

    Takes ownership of ``prog_fd`` (closed when None is returned).
    """
    info = libbpf.prog_info(prog_fd)
    fds = {"prog": prog_fd}
    if info.name == L.PROG_NAME:
        for map_id in info.map_ids:
            fd = libbpf.map_fd_by_id(map_id)
            m = libbpf.map_info(fd)
            if MAPS.get(m.name) == (m.key_size, m.value_size, m.max_entries):
                fds[m.name] = fd
            else:
                os.close(fd)
    if fds.keys() >= set(MAPS):
        return fds
    for fd in fds.values():
        os.close(fd)
    return None


def _is_natctl(prog_id: int) -> bool:
    fd = libbpf.prog_fd_by_id(prog_id)
    try:
        return libbpf.prog_info(fd).name == L.PROG_NAME
    finally:
        os.close(fd)


def _netns_id() -> int:
    return os.stat("/proc/thread-self/ns/net").st_ino


def pin_dir(pin_root: str | None, ifname: str) -> str | None:
    """Where this interface's pins go, when ``pin_root`` lies on a mounted bpffs (else None).

    The network namespace is part of the name: eth0 in two namespaces are two interfaces.
    """
    if not pin_root:
        return None
    parent = os.path.dirname(os.path.abspath(pin_root))
    try:
        with open("/proc/self/mounts") as fh:
            bpffs = any(ln.split()[1] == parent and ln.split()[2] == "bpf" for ln in fh)
    except OSError:
        return None
    return os.path.join(pin_root, f"{ifname}-{_netns_id()}") if bpffs else None


def unpin(pin_root: str | None, ifname: str) -> bool:
    """Remove this interface's pins (and nothing else). True if there were any."""
    where = pin_dir(pin_root, ifname)
    if not where or not os.path.isdir(where):
        return False
    for name in os.listdir(where):
        os.unlink(os.path.join(where, name))
    os.rmdir(where)
    if not os.listdir(pin_root or where):
        os.rmdir(pin_root or where)
    return True


def detach(ifname: str, pin_root: str | None = PIN_ROOT) -> bool:
    """Detach natctl's program (with the flag of the mode it was attached in) and unpin. True if anything went."""
    ifindex = socket.if_nametoindex(ifname)
    cur = attached(ifindex)
    gone = False
    if cur and cur[0] in FLAGS and _is_natctl(cur[1]):
        libbpf.xdp_detach(ifindex, FLAGS[cur[0]])
        gone = True
    return unpin(pin_root, ifname) or gone


def set_lease(ifname: str, deadline_ns: int) -> bool:
    """Write the lease deadline (CLOCK_MONOTONIC ns, 0: no lease; natctl.fleet.fence) of natctl's program
    attached to ``ifname``. Found anew each time, by name as the other maps: whichever natctl object attached
    it (the daemon's, its cleanup thread's), the one on the interface is the one that forwards. False when
    natctl's program (of this layout) is not attached there."""
    try:
        ifindex = socket.if_nametoindex(ifname)
    except OSError:
        return False
    cur = attached(ifindex)
    if not cur or cur[0] not in FLAGS:
        return False
    fds = _handles(libbpf.prog_fd_by_id(cur[1]))
    if fds is None:
        return False
    try:
        libbpf.update(fds[L.LEASE_MAP], C.c_uint32(0), C.c_uint64(deadline_ns))
    finally:
        for fd in fds.values():
            os.close(fd)
    return True


def link_kind(ifindex: int) -> str:
    """The link type ("veth", "" for a plain NIC), from rtnetlink."""
    from pyroute2 import IPRoute

    try:
        with IPRoute() as ipr:
            info = ipr.get_links(ifindex)[0].get_attr("IFLA_LINKINFO")
    except Exception:  # pyroute2's errors are not all OSError; an unknown kind is a plain NIC
        return ""
    return (info.get_attr("IFLA_INFO_KIND") or "") if info else ""


@dataclass
class Program:
    """natctl's XDP program for one interface: fds of the program and its maps."""

    ifname: str
    ifindex: int
    mode: str  # requested ("auto", "native", "generic") until attached, then the mode in use
    pin_root: str | None = PIN_ROOT
    fds: dict[str, int] = field(default_factory=dict)
    attached: bool = False

    @classmethod
    def find(cls, ifname: str, mode: str = "auto", pin_root: str | None = PIN_ROOT) -> Program:
        """The program on ``ifname`` if natctl attached one; else its pins; else nothing loaded yet."""
        if mode not in MODES:
            raise XdpUnavailable(f"unknown XDP mode {mode!r}", "use auto, native or generic")
        try:
            ifindex = socket.if_nametoindex(ifname)
        except OSError:
            raise XdpUnavailable(f"no interface {ifname!r} for XDP", "pass --interface") from None
        prog = cls(ifname, ifindex, mode, pin_root)
        cur = attached(ifindex)
        if cur and not _is_natctl(cur[1]):
            raise XdpUnavailable(f"{ifname} already runs another XDP program (id {cur[1]})",
                                 "natctl leaves it alone; detach it to use the accelerator")
        if cur and cur[0] in FLAGS:
            # Reuse it, maps and counters included: a restart of natctl changes
            # nothing on the packet path (attach() only switches a mode if asked).
            prog.fds = _handles(libbpf.prog_fd_by_id(cur[1])) or {}
            if prog.fds and mode in ("auto", cur[0]):
                prog.mode, prog.attached = cur[0], True
                return prog
        where = pin_dir(pin_root, ifname)
        if not prog.fds and where and os.path.exists(os.path.join(where, "prog")):
            prog.fds = _handles(libbpf.get_pinned(os.path.join(where, "prog"))) or {}
        if not prog.fds and not os.path.exists(OBJECT):
            raise XdpUnavailable(f"the BPF object {OBJECT} is missing", "run 'make setup' (it builds bpf/)")
        return prog

    def load(self) -> None:
        """Load the object (not attached yet), unless a program is already at hand."""
        if self.fds:
            return
        try:
            with libbpf.BpfObject(OBJECT) as obj:
                self.fds = {"prog": os.dup(obj.program_fd(L.PROG_NAME))}
                self.fds.update({name: os.dup(obj.map_fd(name)) for name in MAPS})
        except OSError as err:
            raise XdpUnavailable(f"the kernel refused natctl's XDP program ({err.strerror})",
                                 libbpf.last_messages() or "see 'dmesg'") from None

    def attach(self) -> None:
        """Attach (idempotent). auto: native, then generic if refused; generic on veth, where native
        XDP_TX frames are only delivered when the peer runs XDP too (a lab's business, not natctl's)."""
        cur = attached(self.ifindex)
        if cur and cur[0] in FLAGS and _is_natctl(cur[1]):
            in_use = libbpf.prog_info(self.fds["prog"]).id
            if cur[1] == in_use and self.mode in ("auto", cur[0]):
                self.mode, self.attached = cur[0], True
                return
        if self.mode != "auto":
            modes = [self.mode]
        else:
            modes = ["generic"] if link_kind(self.ifindex) == "veth" else ["native", "generic"]
        for i, mode in enumerate(modes):
            if cur and cur[0] != mode and cur[0] in FLAGS:
                libbpf.xdp_detach(self.ifindex, FLAGS[cur[0]])  # the kernel keeps one mode at a time
                cur = None
            try:
                libbpf.xdp_attach(self.ifindex, self.fds["prog"], FLAGS[mode])  # replaces atomically
            except OSError as err:
                if i == len(modes) - 1:
                    raise XdpUnavailable(f"{self.ifname} refused XDP in {mode} mode ({err.strerror})",
                                         "natctl carries on with nftables alone") from None
                continue
            self.mode, self.attached = mode, True
            self._pin()
            return

    def _pin(self) -> None:
        where = pin_dir(self.pin_root, self.ifname)
        if not where:
            return
        os.makedirs(where, exist_ok=True)
        for name, fd in self.fds.items():
            path = os.path.join(where, name)
            if os.path.exists(path):
                os.unlink(path)
            libbpf.pin(fd, path)

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    # --- maps

    def entries(self) -> dict[tuple, tuple]:
        """The relay map as plan tuples: (saddr, sport, dport) -> (new saddr, new sport, new daddr, new dport)."""
        if not self.fds:
            return {}
        raw = libbpf.lookup_all(self.fds[L.RELAY_MAP], L.Key, C.sizeof(L.Rewrite))
        return {L.key_tuple(L.Key.from_buffer_copy(k)): L.rewrite_tuple(L.Rewrite.from_buffer_copy(v))
                for k, v in raw}

    def packed_entries(self) -> set[bytes]:
        """The relay map as a full reconcile compares it: each entry as natctl.packed's XDP element bytes,
        converted from the map's own in one struct call each (no tuple, no Element per entry)."""
        if not self.fds:
            return set()
        raw = libbpf.lookup_all(self.fds[L.RELAY_MAP], L.Key, C.sizeof(L.Rewrite))
        # struct natctl_key then natctl_rewrite, big-endian: saddr sport dport, new_saddr new_daddr new_sport
        # new_dport; the plan's order is new_saddr new_sport new_daddr new_dport, each port padded to 4
        unpack, pack = _RAW.unpack, packed.LAYOUTS[XDP].struct.pack
        out = set()
        for k, v in raw:
            sa, sp, dp, nsa, nda, nsp, ndp = unpack(k + v)
            out.add(pack(sa, sp, dp, nsa, nsp, nda, ndp))
        return out

    def flow_stats(self) -> dict[tuple, tuple[int, int, int]]:
        """Per key: (packets, bytes, last seen in CLOCK_MONOTONIC ns), summed over CPUs."""
        if not self.fds:
            return {}
        ncpu, size = libbpf.num_possible_cpus(), C.sizeof(L.FlowStats)
        out = {}
        for k, v in libbpf.lookup_all(self.fds[L.FLOWS_MAP], L.Key, size * ncpu):
            per_cpu = [L.FlowStats.from_buffer_copy(v, i * size) for i in range(ncpu)]
            out[L.key_tuple(L.Key.from_buffer_copy(k))] = (sum(s.packets for s in per_cpu),
                                                          sum(s.bytes for s in per_cpu),
                                                          max(s.last_seen for s in per_cpu))
        return out

    def counters(self) -> dict[str, int]:
        """The program's per-CPU counters (why packets were forwarded or passed), summed."""
        if not self.fds:
            return {}
        ncpu, out = libbpf.num_possible_cpus(), {}
        for i, name in enumerate(L.COUNTERS):
            values = (C.c_uint64 * ncpu)()
            libbpf.lookup(self.fds[L.COUNT_MAP], C.c_uint32(i), values)
            out[name] = sum(values)
        return out

    def lease(self) -> int:
        """The lease deadline in the program's map (CLOCK_MONOTONIC ns; 0: none)."""
        value = C.c_uint64(0)
        if self.fds:
            libbpf.lookup(self.fds[L.LEASE_MAP], C.c_uint32(0), value)
        return value.value

    def set_lease(self, deadline_ns: int) -> None:
        libbpf.update(self.fds[L.LEASE_MAP], C.c_uint32(0), C.c_uint64(deadline_ns))

    def write(self, delete: list[tuple], add: list[tuple[tuple, tuple]]) -> int:
        """Delete keys, then add (key, rewrite) pairs (the plan's tuples); returns how many adds fit in the map."""
        return self.write_arrays((L.Key * len(delete))(*(L.key_of(k) for k in delete)),
                                 (L.Key * len(add))(*(L.key_of(k) for k, _ in add)),
                                 (L.Rewrite * len(add))(*(L.rewrite_of(v) for _, v in add)))

    def write_packed(self, delete: list[bytes], add: list[bytes]) -> int:
        """``write`` for element bytes (natctl.packed, a full reconcile's): deletes by their keys."""
        unpack = packed.LAYOUTS[XDP].struct.unpack
        dels = [unpack(d)[:3] for d in delete]
        adds = [unpack(a) for a in add]
        return self.write_arrays(
            (L.Key * len(dels)).from_buffer_copy(b"".join(_KEY.pack(*k) for k in dels)),
            (L.Key * len(adds)).from_buffer_copy(b"".join(_KEY.pack(sa, sp, dp) for sa, sp, dp, *_ in adds)),
            (L.Rewrite * len(adds)).from_buffer_copy(b"".join(_REWRITE.pack(nsa, nda, nsp, ndp)
                                                             for _, _, _, nsa, nsp, nda, ndp in adds)))

    def write_arrays(self, delete: C.Array, keys: C.Array, rewrites: C.Array) -> int:
        """Delete keys, then add keys with their rewrites, as the map's own structs; how many adds fit.

        Stats entries are created before their mapping and deleted after it,
        so the program only ever updates them in place.
        """
        relay, flows = self.fds[L.RELAY_MAP], self.fds[L.FLOWS_MAP]
        if len(delete):
            libbpf.delete_batch(relay, delete)
            libbpf.delete_batch(flows, delete)
        if not len(keys):
            return 0
        zeros = (C.c_char * (len(keys) * C.sizeof(L.FlowStats) * libbpf.num_possible_cpus()))()
        libbpf.update_batch(flows, keys, zeros)
        done = libbpf.update_batch(relay, keys, rewrites)
        if done < len(keys):  # full: those directions stay with nftables
            rest = (L.Key * (len(keys) - done))(*keys[done:])
            libbpf.delete_batch(flows, rest)
        return done
