"""`map list`, `forward list` and `status` tell the kernel's truth, or leave it out.

Over the fake kernel: one read per listing, installed and counters as the
kernel holds them, false once the elements are gone, and no false or 0 when
the kernel cannot be read at all (not root).
"""

import json

import pytest
from typer.testing import CliRunner

from natctl import plan as planner
from natctl.cli.app import app
from natctl.config import Settings
from natctl.errors import KernelError
from natctl.kernel.fake import FakeKernel
from natctl.model import Endpoint, PortRange
from natctl.service import Service
from natctl.views import MappingView, as_json

RELAY = "198.18.0.1"
H, C1, C2 = Endpoint("198.18.1.2", 27015), Endpoint("198.18.2.2", 40001), Endpoint("198.18.2.2", 40002)
TARGET = Endpoint("198.18.1.2", 8080)
KERNEL_KEYS = {"installed", "to_host_packets", "to_host_bytes", "to_client_packets", "to_client_bytes",
               "xdp_to_host_packets", "xdp_to_host_bytes", "xdp_to_client_packets", "xdp_to_client_bytes"}


def not_root():
    raise KernelError("natctl must run as root to change the kernel", "run it with sudo")


@pytest.fixture
def relay(tmp_path, monkeypatch):
    """A store with two mappings and a forward, installed in a fake kernel that counted some traffic."""
    monkeypatch.setattr("natctl.sync.local_port_overlap", lambda ports: None)
    monkeypatch.setenv("NATCTL_CONFIG", "/nonexistent")
    kernel = FakeKernel()
    settings = Settings(state=str(tmp_path / "s.db"), relay_ip=RELAY, ports=PortRange(20000, 20009))
    svc = Service(settings, kernel_factory=lambda: kernel)
    svc.lobby_create("a")
    svc.map_add("a", H, [C1, C2])
    svc.forward_add(8080, TARGET, "tcp")
    c = kernel.installed.counters
    c[(planner.SNAT, (C1.ip, "udp", C1.port, H.ip, H.port))] = (7, 700)  # client1 -> host
    c[(planner.SNAT, (H.ip, "udp", H.port, C1.ip, C1.port))] = (5, 500)  # host -> client1
    c[(planner.FWDACCT, (TARGET.ip, "tcp", TARGET.port))] = (12, 9000)
    svc.close()
    yield settings, kernel


def service(settings, kernel=None, factory=None):
    return Service(settings, kernel_factory=factory or (lambda: kernel))


def cli(settings, kernel, *args, factory=None):
    result = CliRunner().invoke(app, ["--state", settings.state, "--relay-ip", RELAY, "--ports", "20000-20009", *args],
                                obj={"kernel_factory": factory or (lambda: kernel)})
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def by_client(rows):
    return {m.client if isinstance(m, MappingView) else m["client"]: m for m in rows}


def test_mappings_read_the_kernel_once_and_tell_its_counters(relay):
    settings, kernel = relay
    svc = service(settings, kernel)
    reads = kernel.reads
    rows = by_client(svc.mappings(counters=True))
    assert kernel.reads == reads + 1  # one read for the whole listing, not one per row
    m1, m2 = rows[str(C1)], rows[str(C2)]
    assert m1.installed is True and (m1.to_host_packets, m1.to_host_bytes) == (7, 700)
    assert (m1.to_client_packets, m1.to_client_bytes) == (5, 500)
    assert m2.installed is True and (m2.to_host_packets, m2.to_client_packets) == (0, 0)
    reads = kernel.reads
    (f,) = svc.forwards(counters=True)
    assert kernel.reads == reads + 1
    assert f.installed is True and (f.packets, f.bytes) == (12, 9000)
    svc.close()


def test_missing_elements_read_as_not_installed(relay):
    settings, kernel = relay
    svc = service(settings, kernel)
    # One element of client2's mapping vanishes behind natctl's back: only that mapping is not installed.
    gone = next(e for e in kernel.installed.elements if e.set == planner.DNAT and e.key[0] == C2.ip
                and e.key[2] == C2.port)
    kernel.installed.elements.discard(gone)
    rows = by_client(svc.mappings(counters=True))
    assert rows[str(C1)].installed is True and rows[str(C2)].installed is False
    # The forward's target changed behind natctl's back: its element is not natctl's forward.
    fwd = next(e for e in kernel.installed.elements if e.set == planner.FWD)
    kernel.installed.elements.discard(fwd)
    kernel.installed.elements.add(planner.Element(planner.FWD, fwd.key, ("198.18.1.9", 8080)))
    assert svc.forwards(counters=True)[0].installed is False
    # The whole table deleted (nft delete table inet natctl): nothing is installed, nothing counted.
    kernel.uninstall()
    assert [(m.installed, m.to_host_packets, m.to_client_packets) for m in svc.mappings(counters=True)] == \
        [(False, 0, 0)] * 2
    assert [(f.installed, f.packets) for f in svc.forwards(counters=True)] == [(False, 0)]
    svc.close()


def test_an_unreadable_kernel_leaves_the_fields_out(relay):
    settings, _ = relay
    svc = service(settings, factory=not_root)
    rows = svc.mappings(counters=True)
    assert len(rows) == 2 and all(m.installed is None and m.to_host_packets is None for m in rows)
    for doc in as_json(rows):
        assert not KERNEL_KEYS & doc.keys()
        assert doc["client_port"] and "last_seen" in doc  # what the store knows stays
    (f,) = as_json(svc.forwards(counters=True))
    assert f["port"] == 8080 and not {"installed", "packets", "bytes"} & f.keys()
    svc.close()


def test_without_counters_nothing_is_claimed(relay):
    settings, kernel = relay
    svc = service(settings, kernel)
    reads = kernel.reads
    assert all(m.installed is None for m in svc.mappings()) and svc.forwards()[0].packets is None
    assert kernel.reads == reads
    svc.close()


def test_the_listings_print_what_status_prints(relay):
    settings, kernel = relay
    maps = json.loads(cli(settings, kernel, "map", "list", "--json").stdout)
    fwds = json.loads(cli(settings, kernel, "forward", "list", "--json").stdout)
    status = json.loads(cli(settings, kernel, "status", "--json").stdout)
    assert maps == status["mappings"] and fwds == status["forwards"]
    m1 = by_client(maps)[str(C1)]
    assert m1["installed"] is True and (m1["to_host_packets"], m1["to_client_packets"]) == (7, 5)
    assert fwds[0]["installed"] is True and fwds[0]["packets"] == 12
    table = cli(settings, kernel, "map", "list").stdout
    assert "installed" in table and " yes " in table and " 7 " in table
    assert " 12 " in cli(settings, kernel, "forward", "list").stdout
    kernel.uninstall()
    maps = json.loads(cli(settings, kernel, "map", "list", "--json").stdout)
    assert [m["installed"] for m in maps] == [False, False]
    assert "NO" in cli(settings, kernel, "map", "list").stdout


def test_the_listings_without_root_say_so_and_claim_nothing(relay):
    settings, kernel = relay
    got = cli(settings, kernel, "map", "list", "--json", factory=not_root)
    maps = json.loads(got.stdout)
    assert len(maps) == 2 and all(not KERNEL_KEYS & m.keys() for m in maps)
    assert "could not read table inet natctl" in got.stderr
    fwds = json.loads(cli(settings, kernel, "forward", "list", "--json", factory=not_root).stdout)
    assert fwds[0]["port"] == 8080 and "installed" not in fwds[0] and "packets" not in fwds[0]
    table = cli(settings, kernel, "map", "list", factory=not_root).stdout
    assert "?" in table and "NO" not in table and "yes" not in table
    table = cli(settings, kernel, "forward", "list", factory=not_root).stdout
    assert "?" in table and "NO" not in table
