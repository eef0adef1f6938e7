"""`natctl map add/remove --from FILE` on the real kernel: 10,000 mappings in one command, read back.

Every address is in 198.18.0.0/15 (the lab's benchmarking range), away from the lab's own hosts.
"""

from __future__ import annotations

import json

import pytest

from natctl.kernel.nft import TYPES, parse_listing
from natctl.lab.netns import run

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("engine")]  # each test on both store engines too

LOBBIES, PER = 200, 50  # 10,000 mappings


def mapping_file(path) -> set[tuple[str, str, str]]:
    """A file of LOBBIES lobbies of PER clients each; returns its (lobby, host, client) triples."""
    out, lines = set(), ["# lobby host client [proto]"]
    for j in range(LOBBIES):
        host = f"198.18.{100 + j // 250}.{1 + j % 250}:27015"
        for k in range(PER):
            client = f"198.19.{100 + k}.{1 + j % 250}:{40000 + j}"
            lines.append(f"l{j} {host} {client}" + (" udp" if k % 2 else ""))
            out.add((f"l{j}", host, client))
    path.write_text("\n".join(lines) + "\n")
    return out


def kernel_maps(lab) -> dict[str, list[tuple]]:
    """The keys of each map and set of table inet natctl, read back with natctl's own parser (which reads
    protocols whether nft prints them by name or, on a machine without /etc/protocols, by number)."""
    listing = json.loads(run(["nft", "-j", "list", "table", "inet", "natctl"], ns=lab.relay_ns).stdout)
    out: dict[str, list[tuple]] = {name: [] for name in TYPES}
    for e in parse_listing(listing).elements:
        out.setdefault(e.set, []).append(e.key)
    return out


def test_ten_thousand_mappings_from_a_file_in_one_command(lab, relay, tmp_path):
    path = tmp_path / "mappings.txt"
    want = mapping_file(path)
    relay("map", "add", "--from", str(path), "--create-lobbies")
    rows = relay.json("map", "list")
    assert isinstance(rows, list) and len(rows) == len(want) == LOBBIES * PER
    assert {(m["lobby"], m["host"], m["client"]) for m in rows} == want
    assert all(m["installed"] for m in rows)
    assert len({m["host_port"] for m in rows}) == LOBBIES
    maps = kernel_maps(lab)
    assert len(maps["dnat4"]) == len(maps["snat4"]) == 2 * len(want)  # both directions of each mapping
    assert len(maps["hostports4"]) == LOBBIES
    # the kernel holds exactly the ports the store gave: each client's own reply path
    # each client's reply path: host . proto . host port . client relay port, as the store gave it
    replies = {(m["host"].split(":")[0], "udp", int(m["host"].split(":")[1]), m["client_port"]) for m in rows}
    assert replies <= set(maps["dnat4"])

    out = relay("map", "remove", "--from", str(path))
    assert f"removed {len(want)} mappings" in out.stdout
    assert relay.json("map", "list") == []
    maps = kernel_maps(lab)
    assert maps["dnat4"] == [] and maps["snat4"] == []
    assert len(maps["hostports4"]) == LOBBIES  # the lobbies stay open, as after 'map remove'
