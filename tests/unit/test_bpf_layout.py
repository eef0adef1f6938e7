"""The Python mirrors match the C headers: sizes, offsets, constants, byte order.

A tiny C program, compiled with the same clang that builds the XDP program,
prints what the compiler thinks; the ctypes classes must agree field by field.
"""

from __future__ import annotations

import ctypes as C
import re
import shutil
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from natctl.kernel import bpf_layout as L

BPF_DIR = Path(__file__).resolve().parents[2] / "bpf"

# C struct name -> its ctypes mirror.
STRUCTS = {
    "struct natctl_key": L.Key,
    "struct natctl_rewrite": L.Rewrite,
    "struct natctl_flow_stats": L.FlowStats,
    "struct bpf_test_run_opts": L.TestRunOpts,
    "struct xdp_md": L.XdpMd,
    "struct bpf_map_batch_opts": L.BatchOpts,
    "struct bpf_xdp_query_opts": L.XdpQueryOpts,
}
# Mirrors of a struct's first fields only: the kernel takes a shorter info struct.
PREFIXES = {"struct bpf_prog_info": L.ProgInfo, "struct bpf_map_info": L.MapInfo}
STRINGS = {"NATCTL_PROG_NAME": L.PROG_NAME, "NATCTL_RELAY_MAP": L.RELAY_MAP, "NATCTL_FLOWS_MAP": L.FLOWS_MAP,
           "NATCTL_COUNT_MAP": L.COUNT_MAP, "NATCTL_LEASE_MAP": L.LEASE_MAP}


def _program() -> str:
    lines = ["#include <stdio.h>", "#include <stddef.h>", "#include <linux/bpf.h>", "#include <bpf/bpf.h>",
             "#include <bpf/libbpf.h>", '#include "natctl.h"', "int main(void) {"]
    for cname, cls in {**STRUCTS, **PREFIXES}.items():
        lines.append(f'printf("%s\\t%zu\\n", "{cname}", sizeof({cname}));')
        for fname, *_ in cls._fields_:
            lines.append(f'printf("%s.%s\\t%zu %zu\\n", "{cname}", "{fname}", offsetof({cname}, {fname}), '
                         f"sizeof((({cname} *)0)->{fname}));")
    for name in STRINGS:
        lines.append(f'printf("%s\\t%s\\n", "{name}", {name});')
    lines.append('printf("NATCTL_MAX_ENTRIES\\t%d\\n", NATCTL_MAX_ENTRIES);')
    lines.append('printf("NATCTL_C_MAX\\t%d\\n", NATCTL_C_MAX);')
    for name in L.COUNTERS:
        lines.append(f'printf("NATCTL_C_{name.upper()}\\t%d\\n", NATCTL_C_{name.upper()});')
    return "\n".join(lines + ["return 0;", "}"]) + "\n"


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, str]:
    if shutil.which("clang") is None:
        pytest.skip("clang is not installed (make setup installs it)")
    out = tmp_path_factory.mktemp("layout")
    (out / "layout.c").write_text(_program())
    subprocess.run(["clang", "-Wall", "-Werror", f"-I{BPF_DIR}", "-o", str(out / "layout"), str(out / "layout.c")],
                   check=True, capture_output=True, text=True)
    text = subprocess.run([str(out / "layout")], check=True, capture_output=True, text=True).stdout
    return dict(line.split("\t", 1) for line in text.splitlines())


@pytest.mark.parametrize("cname", sorted({**STRUCTS, **PREFIXES}))
def test_struct_sizes_and_offsets_match_the_headers(compiled, cname):
    cls = {**STRUCTS, **PREFIXES}[cname]
    if cname in STRUCTS:
        assert C.sizeof(cls) == int(compiled[cname]), cname
    else:
        assert C.sizeof(cls) <= int(compiled[cname]), cname
    for fname, *_ in cls._fields_:
        offset, size = (int(v) for v in compiled[f"{cname}.{fname}"].split())
        assert (getattr(cls, fname).offset, getattr(cls, fname).size) == (offset, size), f"{cname}.{fname}"


def test_names_limits_and_counters_match_the_header(compiled):
    for name, value in STRINGS.items():
        assert compiled[name] == value
        assert len(value) < 16  # the kernel keeps 15 characters of a name
    assert int(compiled["NATCTL_MAX_ENTRIES"]) == L.MAX_ENTRIES
    assert int(compiled["NATCTL_C_MAX"]) == len(L.COUNTERS)
    for i, name in enumerate(L.COUNTERS):
        assert int(compiled[f"NATCTL_C_{name.upper()}"]) == i


def test_keys_and_rewrites_are_in_network_byte_order():
    key = L.key_of(("198.18.2.2", 40001, 29999))
    assert bytes(key) == socket.inet_aton("198.18.2.2") + struct.pack("!HH", 40001, 29999)
    rw = L.rewrite_of(("198.18.0.1", 20000, "198.18.1.2", 27015))
    assert bytes(rw) == (socket.inet_aton("198.18.0.1") + socket.inet_aton("198.18.1.2")
                         + struct.pack("!HH", 20000, 27015))
    assert L.key_tuple(key) == ("198.18.2.2", 40001, 29999)
    assert L.rewrite_tuple(rw) == ("198.18.0.1", 20000, "198.18.1.2", 27015)
    assert bytes(L.FlowStats(1, 2, 3)) == struct.pack("=QQQ", 1, 2, 3)  # counters: host order


def _btf_structs(dump: str) -> dict[str, dict]:
    """STRUCT entries of a raw BTF dump: name -> {"size": n, member: byte offset}."""
    out: dict[str, dict] = {}
    current = None
    for line in dump.splitlines():
        m = re.match(r"\[\d+\] STRUCT '(\w+)' size=(\d+)", line)
        if m:
            current = out.setdefault(m[1], {"size": int(m[2])})
        elif line.startswith("\t") and current is not None:
            m = re.match(r"\t'(\w+)' type_id=\d+ bits_offset=(\d+)", line)
            if m:
                current[m[1]] = int(m[2]) // 8
        else:
            current = None
    return out


def test_the_built_object_has_the_same_maps_and_layouts():
    """Independently of the header: the BTF inside bpf/xdp_relay.o (what the kernel gets)."""
    obj = BPF_DIR / "xdp_relay.o"
    if not obj.exists() or shutil.which("bpftool") is None:
        pytest.skip("bpf/xdp_relay.o or bpftool missing (make setup builds it)")
    dump = subprocess.run(["bpftool", "btf", "dump", "file", str(obj), "format", "raw"], check=True,
                          capture_output=True, text=True).stdout
    for name in (L.RELAY_MAP, L.FLOWS_MAP, L.COUNT_MAP, L.LEASE_MAP):
        assert f"VAR '{name}'" in dump
    assert f"FUNC '{L.PROG_NAME}'" in dump
    structs = _btf_structs(dump)
    for cname, cls in (("natctl_key", L.Key), ("natctl_rewrite", L.Rewrite), ("natctl_flow_stats", L.FlowStats)):
        assert structs[cname] == {"size": C.sizeof(cls), **{f: getattr(cls, f).offset for f, *_ in cls._fields_}}
