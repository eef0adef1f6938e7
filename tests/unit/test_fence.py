"""The fleet's kernel lease (natctl.fleet.fence) without a kernel: how long it holds, what it writes."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from natctl.errors import KernelError
from natctl.fleet.fence import TABLE, Fence, Keeper, install_script, lease_ttl, of, refresh_script, remove_script
from natctl.model import PortRange

PORTS = PortRange(20000, 29999)


def test_the_lease_ends_a_heartbeat_before_the_others_may_declare_the_relay_dead():
    assert lease_ttl(2.0, 10.0) == 8.0  # the defaults
    assert lease_ttl(0.5, 3.0) == 2.5  # the kernel tests'
    # It must outlast the time between two renewals, or a live relay would be cut: then no fence at all.
    assert lease_ttl(2.0, 4.0) is None
    assert lease_ttl(2.0, 2.0) is None


def test_the_table_drops_only_relay_ports_on_the_relay_ip_while_the_lease_is_absent():
    script = install_script("198.18.0.1", PORTS, 2.5)
    # Replaced whole in one transaction, also when it is not there yet.
    assert script.startswith(f"add table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{")
    assert "flags timeout" in script and "198.18.0.1 timeout 2500ms" in script
    assert "hook prerouting priority raw;" in script  # before conntrack: established flows stop too
    rule = next(line.strip() for line in script.splitlines() if line.strip().endswith("drop"))
    assert rule == ("ip daddr 198.18.0.1 meta l4proto { tcp, udp } th dport 20000-29999 "
                    "ip daddr != @lease counter drop")


def test_a_renewal_is_one_flush_and_one_add():
    assert refresh_script("198.18.0.1", 8.0) == ("flush set inet natctl_fence lease\n"
                                                "add element inet natctl_fence lease { 198.18.0.1 timeout 8000ms }\n")
    assert remove_script() == "add table inet natctl_fence\ndelete table inet natctl_fence\n"


class Kernel:
    """Records scripts and XDP deadlines; ``missing`` makes the next renewal fail as if the table went."""

    def __init__(self) -> None:
        self.scripts: list[str] = []
        self.deadlines: list[tuple[str, int]] = []
        self.missing = False

    def run(self, script: str) -> None:
        if self.missing and script.startswith("flush"):
            self.missing = False
            raise KernelError("nftables refused the fence (No such file or directory)")
        self.scripts.append(script.split("\n", 1)[0])

    def set_deadline(self, ifname: str, deadline: int) -> bool:
        self.deadlines.append((ifname, deadline))
        return True


def fence(kernel: Kernel, ifname: str | None = "eth0", now: int = 10**12) -> Fence:
    return Fence("198.18.0.1", PORTS, ifname, run=kernel.run, set_deadline=kernel.set_deadline, clock=lambda: now)


def test_refresh_installs_once_then_renews_and_sets_the_xdp_deadline_on_the_same_clock():
    k = Kernel()
    f = fence(k)
    f.refresh(2.5)
    f.refresh(2.5)
    assert k.scripts == ["add table inet natctl_fence", "flush set inet natctl_fence lease"]
    assert k.deadlines == [("eth0", 10**12 + 2_500_000_000)] * 2
    k.missing = True  # someone deleted the table: the next renewal puts it back whole
    f.refresh(2.5)
    assert k.scripts[-1] == "add table inet natctl_fence"


def test_remove_zeroes_the_xdp_deadline_and_deletes_the_table():
    k = Kernel()
    f = fence(k)
    f.refresh(2.5)
    f.remove()
    assert k.deadlines[-1] == ("eth0", 0)
    assert k.scripts[-1] == "add table inet natctl_fence"  # add + delete: no error when it is gone already


def test_without_xdp_only_nftables_is_written():
    k = Kernel()
    fence(k, ifname=None).refresh(2.5)
    assert k.deadlines == [] and len(k.scripts) == 1


def test_an_xdp_error_is_a_kernel_error():
    def broken(ifname: str, deadline: int) -> bool:
        raise OSError(2, "No such file or directory")
    f = Fence("198.18.0.1", PORTS, "eth0", run=lambda s: None, set_deadline=broken)
    with pytest.raises(KernelError, match="XDP lease"):
        f.refresh(2.5)


def test_the_keeper_renews_only_when_the_loop_has_not():
    k = Kernel()
    f = Fence("198.18.0.1", PORTS, None, run=k.run, set_deadline=k.set_deadline)
    errors: list[Exception] = []
    keeper = Keeper(f, ttl=0.5, every=0.05, on_error=errors.append)
    keeper.start()
    try:
        for _ in range(20):  # the loop renews every 0.03 s: the keeper has nothing to do
            f.refresh(0.5)
            time.sleep(0.03)
        renewed_by_loop = len(k.scripts)
        assert renewed_by_loop == 20
        time.sleep(0.5)  # the loop waits on the database: the keeper renews (every ~0.075-0.1 s)
        assert 3 <= len(k.scripts) - renewed_by_loop <= 10
    finally:
        keeper.stop()
    assert not keeper.is_alive() and errors == []


def test_the_xdp_interface_comes_from_the_kernel_when_it_has_a_program():
    settings = SimpleNamespace(ports=PORTS)
    xdp_kernel = SimpleNamespace(prog=SimpleNamespace(ifname="ens3"))
    assert of(SimpleNamespace(kernel=xdp_kernel, relay_ip="198.18.0.1", settings=settings)).xdp_interface == "ens3"
    nft_only = of(SimpleNamespace(kernel=object(), relay_ip="198.18.0.1", settings=settings))
    assert nft_only.xdp_interface is None and nft_only.relay_ip == "198.18.0.1" and nft_only.ports == PORTS
