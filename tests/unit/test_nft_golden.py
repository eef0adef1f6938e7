"""Golden files for the nftables text natctl writes and the listings it reads (no root needed).

- ``golden/skeleton.nft``, ``golden/change.nft``, ``golden/fake-install.txt``: what natctl
  sends to nft, and the fake kernel's sorted dump after an install. After an intended
  change, rewrite them and review the diff::

      NATCTL_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/unit/test_nft_golden.py

- ``golden/listing-*.json``: ``nft -j list table inet natctl`` as a real kernel printed
  it, holding ``plan(SNAP)`` after a few packets: ``names`` as nft prints it by default,
  ``numbers`` with /etc/protocols and /etc/services hidden (a minimal Debian without
  netbase), ``services`` with ``nft -S`` (ports as names). Re-record them as root, in a
  throwaway network namespace that is deleted afterwards::

      .venv/bin/python tests/unit/test_nft_golden.py --record
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from natctl.kernel.fake import FakeKernel
from natctl.kernel.nft import parse_listing, render, skeleton
from natctl.model import Client, Endpoint, Forward, Host, Lobby, Snapshot
from natctl.plan import ALLOW, FWDACCT, NFT_SETS, SNAT, Owner, diff, plan

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("NATCTL_UPDATE_GOLDEN") == "1"

RELAY = "198.18.0.1"
HA, HB = Endpoint("198.18.1.2", 27015), Endpoint("198.18.1.3", 27015)
C1, C2, C3 = Endpoint("198.18.2.2", 40001), Endpoint("198.18.2.3", 40002), Endpoint("198.18.2.4", 40001)
# Two lobbies; lobby b reuses client port 20000; ports 8080 and 80 have service names.
# Lobby a admits two networks (a /25 inside the /24 merges into it; a /32 lists as a bare address), b is open.
SNAP = Snapshot(
    relay_ip=RELAY,
    lobbies=(Lobby(1, "a", allow=("198.18.2.0/24", "198.18.7.7/32", "198.18.2.128/25")), Lobby(2, "b", open=True)),
    hosts=(Host(1, HA, 29999), Host(2, HB, 29998)),
    clients=(Client(1, 1, "udp", C1, 20000), Client(2, 1, "tcp", C2, 20001), Client(3, 2, "udp", C3, 20000)),
    forwards=(Forward(8080, Endpoint("198.18.9.9", 80), "both"),
              Forward(7000, Endpoint("198.18.9.8", 7000), "udp", masquerade=False, owner="gm:alice")),
)
# Lobby a loses its TCP client, lobby b gains one, the GM's forward ends.
C4 = Client(4, 2, "udp", Endpoint("198.18.2.5", 40003), 20001)
AFTER = replace(SNAP, clients=(SNAP.clients[0], SNAP.clients[2], C4), forwards=SNAP.forwards[:1])
# The packets --record sends, and the counters they leave on snat4.
PACKETS = [(C1, HA, 100), (HB, C3, 50)]
COUNTED = {(SNAT, (C1.ip, "udp", C1.port, HA.ip, HA.port)): (1, 128),
           (SNAT, (HB.ip, "udp", HB.port, C3.ip, C3.port)): (1, 78)}
# The store the recorded table belongs to.
OWNER = Owner(0x1234ABCD, "/var/lib/natctl/natctl.db")
# How each recording prints fwd4's key tcp . 8080.
LISTINGS = {"names": ["tcp", 8080], "numbers": [6, 8080], "services": ["tcp", "http-alt"]}


def golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.write_text(text)
    assert text == path.read_text(), f"{name} changed; if on purpose, rerun with NATCTL_UPDATE_GOLDEN=1"


def raw_keys(doc: dict, name: str) -> list:
    """The keys of one map as the listing printed them."""
    (m,) = [item["map"] for item in doc["nftables"] if item.get("map", {}).get("name") == name]
    keys = [k["elem"]["val"] if isinstance(k, dict) and "elem" in k else k for k, _ in m["elem"]]
    return [k["concat"] for k in keys]


def test_skeleton():
    golden("skeleton.nft", skeleton() + "\n")


def test_a_change_touching_two_lobbies():
    changes = replace(diff(plan(AFTER, None, NFT_SETS), plan(SNAP, None, NFT_SETS)), generation=0x1234)
    assert {e.comment for e in changes.add + changes.delete} == {"lobby a", "lobby b", "forward 7000 gm:alice"}
    golden("change.nft", render(changes))


def test_fake_dump_after_an_install():
    fake = FakeKernel()
    fake.apply(replace(diff(plan(SNAP, None, NFT_SETS), set(), table_ok=False), owner=OWNER))
    golden("fake-install.txt", fake.dump())


@pytest.mark.parametrize("variant", sorted(LISTINGS))
def test_recorded_listing_parses_to_the_plan(variant):
    doc = json.loads((GOLDEN / f"listing-{variant}.json").read_text())
    assert LISTINGS[variant] in raw_keys(doc, "fwd4")  # the recording is the variant it claims to be
    if variant == "services":
        try:
            socket.getservbyname("http-alt")
        except OSError:
            pytest.skip("no /etc/services here to read port names back")
    got = parse_listing(doc)
    want = plan(SNAP, None, NFT_SETS)
    assert got.table_ok and got.elements == want
    assert {e: e.comment for e in got.elements} == {e: e.comment for e in want}
    assert set(got.counters) == {(e.set, e.key) for e in want if e.set in (SNAT, FWDACCT)}
    assert {k: v for k, v in got.counters.items() if v != (0, 0)} == COUNTED
    assert got.named == {"unknown_blocked": (0, 0), "unknown_refused": (0, 0), "unknown_limited": (0, 0)}
    # Interval elements come back as the CIDR text plan.py writes, whichever way nft printed them.
    assert {e.key for e in got.elements if e.set == ALLOW} == {
        (29999, "198.18.2.0/24"), (29999, "198.18.7.7/32"), (29998, "0.0.0.0/0")}
    assert got.owner == OWNER
    # What conntrack cleanup is handed when all of it goes: protocol names, whatever nft printed.
    assert {f.proto for f in diff(set(), got.elements).flows()} == {"udp", "tcp"}


def record() -> None:
    """Install SNAP in a throwaway namespace, send PACKETS, save the three listings."""
    from natctl.kernel.nft import Nft
    from natctl.lab.netns import entered

    ns = f"natctl-golden-{os.getpid()}"
    sh = ["ip", "netns", "exec", ns]
    hide = ("for f in /etc/protocols /etc/services; do [ -e $f ] && mount --bind /dev/null $f; done; "
            + " ".join(sh) + " nft -j list table inet natctl")
    subprocess.run(["ip", "netns", "add", ns], check=True)
    try:
        subprocess.run([*sh, "ip", "link", "set", "lo", "up"], check=True)
        for ep in {a for a, _, _ in PACKETS} | {b for _, b, _ in PACKETS}:
            subprocess.run([*sh, "ip", "addr", "add", f"{ep.ip}/32", "dev", "lo"], check=True)
        with entered(ns):
            Nft().apply(replace(diff(plan(SNAP, None, NFT_SETS), set(), table_ok=False), owner=OWNER))
            # Local packets still pass postrouting, where the snat4 lookup counts a flow's first packet.
            for src, dst, size in PACKETS:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                    s.bind((src.ip, src.port))
                    s.sendto(b"x" * size, (dst.ip, dst.port))
        commands = {"names": [*sh, "nft", "-j", "list", "table", "inet", "natctl"],
                    "numbers": ["unshare", "--mount", "sh", "-c", hide],
                    "services": [*sh, "nft", "-j", "-S", "list", "table", "inet", "natctl"]}
        for variant, argv in commands.items():
            doc = json.loads(subprocess.run(argv, check=True, capture_output=True, text=True).stdout)
            (GOLDEN / f"listing-{variant}.json").write_text(json.dumps(doc, indent=1) + "\n")
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit(__doc__)
    record()
