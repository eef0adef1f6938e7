"""Golden bytes of the netlink writer (natctl.kernel.nlbatch): for every kind of set natctl writes, the
messages it packs are byte for byte the ones ``nft`` sends for the same ``add/delete element`` text.

``golden/nlbatch-<case>.json`` holds what nft 1.0.6 sent (``nft --debug=mnl``), one [type, payload hex]
per NEWSETELEM/DELSETELEM message, the netlink header left out (natctl's sequence numbers and flags are
its own: it asks for an ack of every message). nft also names the set by its transaction id
(NFTA_SET_ELEM_LIST_SET_ID), for sets created in the same batch; natctl's sets always exist already,
so the recording drops that attribute. Re-record as root, in a throwaway network namespace (unshare -n)::

    .venv/bin/python tests/unit/test_nlbatch.py --record
"""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from natctl.kernel import nlbatch
from natctl.kernel.nft import TABLE, TYPES, render
from natctl.model import Client, Endpoint, Forward, Host, Lobby, Snapshot
from natctl.plan import NFT_SETS, Changes, Owner, plan

GOLDEN = Path(__file__).parent / "golden"
RELAY = "198.18.0.1"
HA, HB = Endpoint("198.18.1.2", 27015), Endpoint("198.18.1.3", 27015)
SNAP = Snapshot(
    relay_ip=RELAY,
    lobbies=(Lobby(1, "a", allow=("198.18.2.0/24", "198.18.7.7/32")), Lobby(2, "b", open=True)),
    hosts=(Host(1, HA, 29999), Host(2, HB, 29998)),
    clients=(Client(1, 1, "udp", Endpoint("198.18.2.2", 40001), 20000),
             Client(2, 1, "tcp", Endpoint("198.18.2.3", 40002), 20001),
             Client(3, 2, "udp", Endpoint("198.18.2.4", 40001), 20000)),
    forwards=(Forward(8080, Endpoint("198.18.9.9", 80), "both"),
              Forward(7000, Endpoint("198.18.9.8", 7000), "udp", masquerade=False, owner="gm:alice")),
)
ELEMENTS = plan(SNAP, None, NFT_SETS)
OWNER = Owner(0x1234ABCD, "/var/lib/natctl/natctl.db")


def cases() -> dict[str, Changes]:
    """One add and one delete per set (every element of SNAP in it), and the generation and owner sets."""
    out = {}
    for name in sorted(TYPES):
        mine = tuple(sorted(e for e in ELEMENTS if e.set == name))
        assert mine, name
        out[f"add-{name}"] = Changes(add=mine)
        out[f"delete-{name}"] = Changes(delete=mine)
    out["generation"] = Changes(generation=0x12345678)
    out["owner"] = Changes(owner=OWNER)
    return out


def ours(changes: Changes) -> list[list]:
    return [[kind, payload.hex()] for kind, payload in nlbatch.messages(changes, TABLE)]


@pytest.mark.parametrize("case", sorted(cases()))
def test_bytes_are_what_nft_sends(case):
    want = json.loads((GOLDEN / f"nlbatch-{case}.json").read_text())
    assert ours(cases()[case]) == want


def test_a_large_change_is_split_into_messages_under_64k():
    many = tuple(replace(e, key=(e.key[0], e.key[1], 1000 + i, e.key[3]))
                 for i, e in enumerate([next(e for e in ELEMENTS if e.set == "dnat4")] * 5000))
    msgs = list(nlbatch.messages(Changes(add=many), TABLE))
    assert len(msgs) > 1 and all(len(p) < 65535 for _, p in msgs)
    assert sum(count_elements(p) for _, p in msgs) == 5000  # every element in exactly one message


def count_elements(payload: bytes) -> int:
    off = 4
    while off < len(payload):
        length, typ = struct.unpack_from("=HH", payload, off)
        if typ & 0x7FFF == nlbatch.LIST_ELEMENTS:
            n, inner, end = 0, off + 4, off + length
            while inner < end:
                n += 1
                inner += (struct.unpack_from("=H", payload, inner)[0] + 3) & ~3
            return n
        off += (length + 3) & ~3
    return 0


def test_batch_frames_the_messages():
    msgs = nlbatch.messages(cases()["add-dnat4"], TABLE)
    data = nlbatch.batch(msgs, 100)
    kinds, seqs, off = [], [], 0
    while off < len(data):
        length, kind, flags, seq, _ = struct.unpack_from("=IHHII", data, off)
        kinds.append(kind)
        seqs.append(seq)
        off += length
    assert kinds == [16, (10 << 8) | 12, 17] and seqs == [100, 101, 102]


# --- recording --------------------------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def parse_mnl(text: str) -> list[tuple[int, bytes]]:
    """``nft --debug=mnl`` output -> (message type, payload bytes after the netlink header)."""
    msgs: list[tuple[int, bytearray]] = []
    for line in ANSI.sub("", text).splitlines():
        if "message length" in line:
            msgs.append((0, bytearray()))
        elif m := re.match(r"\|\s+(\d{5})\s+\|\s+[RMAE-]{4}\s+\|", line):
            msgs[-1] = (int(m[1]), msgs[-1][1])
        elif m := re.match(r"\|(\d{5})\|([NB-]{2})\|(\d{5})\|", line):
            flags = (0x8000 if "N" in m[2] else 0) | (0x4000 if "B" in m[2] else 0)
            msgs[-1][1].extend(struct.pack("=HH", int(m[1]), int(m[3]) | flags))
        elif m := re.match(r"\|\s*((?:[0-9a-f]{2} ){3}[0-9a-f]{2})\s*\|\s+\|\s+(extra header|data)", line):
            msgs[-1][1].extend(bytes.fromhex(m[1]))
    return [(kind, bytes(p)) for kind, p in msgs]


def drop_set_id(payload: bytes) -> bytes:
    out, off = bytearray(payload[:4]), 4
    while off < len(payload):
        length, typ = struct.unpack_from("=HH", payload, off)
        step = (length + 3) & ~3
        if typ != 4:  # NFTA_SET_ELEM_LIST_SET_ID
            out += payload[off: off + step]
        off += step
    return bytes(out)


def record() -> None:
    """Runs inside a network namespace of its own (``unshare -n``), gone when it exits."""
    sh = ["nft"]
    subprocess.run([*sh, "-f", "-"], input=render(Changes(create_table=True)), text=True, check=True)
    for case, changes in cases().items():
        if case.startswith("delete-"):  # the elements to delete: the add case's, installed first
            subprocess.run([*sh, "-f", "-"], input=render(Changes(add=changes.delete)), text=True, check=True)
        out = subprocess.run([*sh, "--debug=mnl", "-f", "-"], input=render(changes), text=True,
                             check=True, capture_output=True)
        got = [[kind & 0xFF, drop_set_id(p).hex()] for kind, p in parse_mnl(out.stdout + out.stderr)
               if kind >> 8 == nlbatch.NFNL_SUBSYS_NFTABLES
               and kind & 0xFF in (nlbatch.NFT_MSG_NEWSETELEM, nlbatch.NFT_MSG_DELSETELEM)]
        (GOLDEN / f"nlbatch-{case}.json").write_text(json.dumps(got, indent=1) + "\n")


if __name__ == "__main__":
    if sys.argv[1:] == ["--record"]:
        os.execvp("unshare", ["unshare", "-n", sys.executable, __file__, "--record-here"])
    if sys.argv[1:] != ["--record-here"]:
        sys.exit(__doc__)
    record()
