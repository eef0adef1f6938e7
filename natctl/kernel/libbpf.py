"""libbpf (libbpf.so.1, Debian's libbpf1) through ctypes: just what natctl needs.

Open and load an object, find its program and maps, talk to maps (batch
operations, with a per-key fallback), run a program on a test packet, attach
XDP, and find a loaded program's maps again by id. Failures raise ``OSError``
with the kernel's errno; the XDP backend turns them into one-line messages.

The libbpf and uapi structs it passes are mirrored in natctl.kernel.bpf_layout.
"""

from __future__ import annotations

import collections
import ctypes as C
import os
import time
from dataclasses import dataclass
from typing import TypeVar

from natctl.kernel.bpf_layout import (
    BatchOpts,
    MapInfo,
    ProgInfo,
    TestRunOpts,
    XdpMd,
    XdpQueryOpts,
)

BPF_PROG_TYPE_XDP = 6
BPF_ANY = 0
XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE = 1 << 1, 1 << 2
XDP_ATTACHED_NONE, XDP_ATTACHED_DRV, XDP_ATTACHED_SKB = 0, 1, 2
XDP_PASS, XDP_TX, XDP_REDIRECT = 2, 3, 4


_PRINT_FN = C.CFUNCTYPE(C.c_int, C.c_int, C.c_char_p, C.c_void_p)
_log: collections.deque[str] = collections.deque(maxlen=40)  # libbpf's last messages, for errors
_lib: C.CDLL | None = None
_keep: list = []  # the print callback must outlive every libbpf call


def _on_print(level: int, fmt: bytes, args: int) -> int:
    buf = C.create_string_buffer(1024)
    _libc.vsnprintf(buf, len(buf), fmt, C.c_void_p(args))  # x86-64: va_list is passed as a pointer
    _log.append(buf.value.decode(errors="replace").rstrip())
    return 0


_libc = C.CDLL(None, use_errno=True)
_libc.vsnprintf.argtypes = [C.c_char_p, C.c_size_t, C.c_char_p, C.c_void_p]

_SIGNATURES: dict[str, tuple[object, list]] = {
    "bpf_object__open_file": (C.c_void_p, [C.c_char_p, C.c_void_p]),
    "bpf_object__load": (C.c_int, [C.c_void_p]),
    "bpf_object__close": (None, [C.c_void_p]),
    "bpf_object__find_program_by_name": (C.c_void_p, [C.c_void_p, C.c_char_p]),
    "bpf_object__find_map_by_name": (C.c_void_p, [C.c_void_p, C.c_char_p]),
    "bpf_program__fd": (C.c_int, [C.c_void_p]),
    "bpf_map__fd": (C.c_int, [C.c_void_p]),
    "bpf_prog_test_run_opts": (C.c_int, [C.c_int, C.POINTER(TestRunOpts)]),
    "bpf_map_update_batch": (C.c_int, [C.c_int, C.c_void_p, C.c_void_p, C.POINTER(C.c_uint32), C.POINTER(BatchOpts)]),
    "bpf_map_delete_batch": (C.c_int, [C.c_int, C.c_void_p, C.POINTER(C.c_uint32), C.POINTER(BatchOpts)]),
    "bpf_map_lookup_batch": (C.c_int, [C.c_int, C.c_void_p, C.c_void_p, C.c_void_p, C.c_void_p,
                                       C.POINTER(C.c_uint32), C.POINTER(BatchOpts)]),
    "bpf_map_update_elem": (C.c_int, [C.c_int, C.c_void_p, C.c_void_p, C.c_uint64]),
    "bpf_map_lookup_elem": (C.c_int, [C.c_int, C.c_void_p, C.c_void_p]),
    "bpf_map_delete_elem": (C.c_int, [C.c_int, C.c_void_p]),
    "bpf_map_get_next_key": (C.c_int, [C.c_int, C.c_void_p, C.c_void_p]),
    "bpf_prog_get_fd_by_id": (C.c_int, [C.c_uint32]),
    "bpf_map_get_fd_by_id": (C.c_int, [C.c_uint32]),
    "bpf_obj_get_info_by_fd": (C.c_int, [C.c_int, C.c_void_p, C.POINTER(C.c_uint32)]),
    "bpf_obj_pin": (C.c_int, [C.c_int, C.c_char_p]),
    "bpf_obj_get": (C.c_int, [C.c_char_p]),
    "bpf_xdp_attach": (C.c_int, [C.c_int, C.c_int, C.c_uint32, C.c_void_p]),
    "bpf_xdp_detach": (C.c_int, [C.c_int, C.c_uint32, C.c_void_p]),
    "bpf_xdp_query": (C.c_int, [C.c_int, C.c_int, C.POINTER(XdpQueryOpts)]),
    "bpf_prog_load": (C.c_int, [C.c_int, C.c_char_p, C.c_char_p, C.c_char_p, C.c_size_t, C.c_void_p]),
    "libbpf_num_possible_cpus": (C.c_int, []),
    "libbpf_set_print": (C.c_void_p, [_PRINT_FN]),
}


def lib() -> C.CDLL:
    """libbpf.so.1, loaded once; OSError if it is not installed."""
    global _lib
    if _lib is None:
        handle = C.CDLL("libbpf.so.1", use_errno=True)
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(handle, name)
            fn.restype, fn.argtypes = restype, argtypes
        callback = _PRINT_FN(_on_print)
        _keep.append(callback)
        handle.libbpf_set_print(callback)
        _lib = handle
    return _lib


def last_messages(n: int = 3) -> str:
    """libbpf's last warnings (e.g. the verifier's verdict), for an error message."""
    lines = [ln for ln in _log if ln.strip()][-n:]
    return " | ".join(lines)


def check(rc: int, what: str) -> int:
    """libbpf returns -errno (and sets errno); turn that into OSError."""
    if rc < 0:
        err = -rc
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return rc


S = TypeVar("S", bound=C.Structure)


def _opts(cls: type[S], **kw: object) -> S:
    return cls(sz=C.sizeof(cls), **kw)


class BpfObject:
    """A loaded object file. Its fds close with it: callers ``os.dup`` what they keep."""

    def __init__(self, path: str) -> None:
        C.set_errno(0)
        self._obj = lib().bpf_object__open_file(path.encode(), None)
        if not self._obj:
            err = C.get_errno() or 2
            raise OSError(err, f"cannot open BPF object {path}: {os.strerror(err)}")
        try:
            check(lib().bpf_object__load(self._obj), f"the kernel refused to load {path}")
        except OSError:
            self.close()
            raise

    def program_fd(self, name: str) -> int:
        prog = lib().bpf_object__find_program_by_name(self._obj, name.encode())
        if not prog:
            raise OSError(2, f"no program {name} in the object")
        return check(lib().bpf_program__fd(prog), name)

    def map_fd(self, name: str) -> int:
        m = lib().bpf_object__find_map_by_name(self._obj, name.encode())
        if not m:
            raise OSError(2, f"no map {name} in the object")
        return check(lib().bpf_map__fd(m), name)

    def close(self) -> None:
        if self._obj:
            lib().bpf_object__close(self._obj)
            self._obj = None

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Info:
    """What the kernel says of a loaded BPF program (id, name, maps) or map (id, name, sizes, type)."""

    id: int
    name: str
    map_ids: tuple[int, ...] = ()
    key_size: int = 0
    value_size: int = 0
    max_entries: int = 0
    type: int = 0


def prog_info(fd: int) -> Info:
    """A program's id, name and the ids of the maps it uses."""
    for size in (16, 256):
        ids = (C.c_uint32 * size)()
        info = ProgInfo(nr_map_ids=size, map_ids=C.addressof(ids))
        length = C.c_uint32(C.sizeof(info))
        check(lib().bpf_obj_get_info_by_fd(fd, C.byref(info), C.byref(length)), "bpf_obj_get_info_by_fd")
        if info.nr_map_ids <= size:
            return Info(info.id, info.name.decode(), tuple(ids[: info.nr_map_ids]), type=info.type)
    raise OSError(7, "the program uses too many maps")


def map_info(fd: int) -> Info:
    info = MapInfo()
    length = C.c_uint32(C.sizeof(info))
    check(lib().bpf_obj_get_info_by_fd(fd, C.byref(info), C.byref(length)), "bpf_obj_get_info_by_fd")
    return Info(info.id, info.name.decode(), (), info.key_size, info.value_size, info.max_entries, info.type)


def prog_fd_by_id(prog_id: int) -> int:
    return check(lib().bpf_prog_get_fd_by_id(prog_id), f"program id {prog_id}")


def map_fd_by_id(map_id: int) -> int:
    return check(lib().bpf_map_get_fd_by_id(map_id), f"map id {map_id}")


def test_run(prog_fd: int, frame: bytes, ingress_ifindex: int = 0) -> tuple[int, bytes]:
    """Run an XDP program once on ``frame``: (verdict, the frame as it left)."""
    data_in = C.create_string_buffer(frame, len(frame))
    data_out = C.create_string_buffer(len(frame) + 256)
    ctx = XdpMd(data=0, data_end=len(frame), ingress_ifindex=ingress_ifindex)
    opts = _opts(TestRunOpts, data_in=C.addressof(data_in), data_size_in=len(frame),
                 data_out=C.addressof(data_out), data_size_out=len(data_out), repeat=1,
                 ctx_in=C.addressof(ctx) if ingress_ifindex else None,
                 ctx_size_in=C.sizeof(ctx) if ingress_ifindex else 0)
    check(lib().bpf_prog_test_run_opts(prog_fd, C.byref(opts)), "BPF_PROG_TEST_RUN")
    return opts.retval, data_out.raw[: opts.data_size_out]


ENOMEM_RETRIES = 50  # pauses of 10 ms without progress before an ENOMEM is the answer


def update_batch(fd: int, keys: C.Array, values: C.Array, flags: int = BPF_ANY) -> int:
    """Write ``len(keys)`` entries; returns how many went in (fewer only when the map is full)."""
    n, done, stalls = len(keys), 0, 0
    ksz, vsz = C.sizeof(keys._type_), C.sizeof(values) // max(n, 1)
    while done < n:
        count = C.c_uint32(n - done)
        rc = lib().bpf_map_update_batch(fd, C.addressof(keys) + done * ksz, C.addressof(values) + done * vsz,
                                        C.byref(count), C.byref(_opts(BatchOpts, elem_flags=flags)))
        if rc in (-22, -95, -524):  # EINVAL, EOPNOTSUPP, ENOTSUPP: a kernel without batch ops
            for i in range(done, n):
                rc = lib().bpf_map_update_elem(fd, C.addressof(keys) + i * ksz, C.addressof(values) + i * vsz, flags)
                if rc == -7:
                    return i
                check(rc, "bpf_map_update_elem")
            return n
        done += count.value
        if rc == -7:  # E2BIG: full
            return done
        if rc == -12 and stalls < ENOMEM_RETRIES:
            # ENOMEM: a map that is not preallocated takes its elements from per-CPU caches the kernel refills
            # in the background; a batch of thousands can drain them. What went in stays; the rest, a moment later.
            stalls = 0 if count.value else stalls + 1
            time.sleep(0.01)
            continue
        check(rc, "bpf_map_update_batch")
    return done


def delete_batch(fd: int, keys: C.Array) -> int:
    """Delete these keys; keys already gone are skipped. Returns how many were deleted."""
    n, i, deleted = len(keys), 0, 0
    ksz = C.sizeof(keys._type_)
    while i < n:
        count = C.c_uint32(n - i)
        rc = lib().bpf_map_delete_batch(fd, C.addressof(keys) + i * ksz, C.byref(count),
                                        C.byref(_opts(BatchOpts)))
        if rc in (-22, -95, -524):
            for j in range(i, n):
                deleted += lib().bpf_map_delete_elem(fd, C.addressof(keys) + j * ksz) == 0
            return deleted
        i, deleted = i + count.value, deleted + count.value
        if rc == -2:  # ENOENT stops a batch at the missing key: skip it and go on
            i += 1
        else:
            check(rc, "bpf_map_delete_batch")
    return deleted


def lookup_all(fd: int, key_type: type[C.Structure], value_size: int) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of a hash map, as raw bytes (value_size: per-CPU values included)."""
    ksz, out, chunk = C.sizeof(key_type), [], 4096
    token_in, token_out = C.create_string_buffer(max(ksz, 8)), C.create_string_buffer(max(ksz, 8))
    first = True
    while True:
        keys, values = C.create_string_buffer(ksz * chunk), C.create_string_buffer(value_size * chunk)
        count = C.c_uint32(chunk)
        rc = lib().bpf_map_lookup_batch(fd, None if first else token_in, token_out, keys, values,
                                        C.byref(count), C.byref(_opts(BatchOpts)))
        if rc == -28:  # ENOSPC: one hash bucket holds more than a chunk
            chunk *= 4
            continue
        if rc < 0 and rc != -2:
            check(rc, "bpf_map_lookup_batch")
        kraw, vraw = keys.raw, values.raw  # each .raw is a copy of the whole buffer: once per batch
        out += [(kraw[i * ksz:(i + 1) * ksz], vraw[i * value_size:(i + 1) * value_size]) for i in range(count.value)]
        if rc == -2:  # ENOENT: that was the last batch
            return out
        C.memmove(token_in, token_out, len(token_out))
        first = False


def update(fd: int, key: C.Structure | C.c_uint32, value: C.Structure | C.c_uint64, flags: int = BPF_ANY) -> None:
    """Write one entry (an array's slot, a hash's key)."""
    check(lib().bpf_map_update_elem(fd, C.byref(key), C.byref(value), flags), "bpf_map_update_elem")


def lookup(fd: int, key: C.Structure | C.c_uint32, value: C.Array | C.Structure | C.c_uint64) -> bool:
    rc = lib().bpf_map_lookup_elem(fd, C.byref(key), C.byref(value))
    if rc == -2:
        return False
    check(rc, "bpf_map_lookup_elem")
    return True


def xdp_query(ifindex: int) -> XdpQueryOpts:
    """Which XDP programs are attached to an interface, and in which mode."""
    opts = _opts(XdpQueryOpts)
    check(lib().bpf_xdp_query(ifindex, 0, C.byref(opts)), f"query XDP on interface {ifindex}")
    return opts


def xdp_attach(ifindex: int, prog_fd: int, flags: int) -> None:
    """Attach (or atomically replace) the XDP program of an interface."""
    check(lib().bpf_xdp_attach(ifindex, prog_fd, flags, None), "attach XDP")


def xdp_detach(ifindex: int, flags: int) -> None:
    check(lib().bpf_xdp_detach(ifindex, flags, None), "detach XDP")


def pin(fd: int, path: str) -> None:
    check(lib().bpf_obj_pin(fd, path.encode()), f"pin {path}")


def get_pinned(path: str) -> int:
    return check(lib().bpf_obj_get(path.encode()), f"open pinned {path}")


def num_possible_cpus() -> int:
    return check(lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def load_insns(prog_type: int, name: str, insns: bytes) -> int:
    """Load a program given as raw instructions (8 bytes each); returns its fd."""
    return check(lib().bpf_prog_load(prog_type, name.encode(), b"GPL", insns, len(insns) // 8, None),
                 f"load program {name}")
