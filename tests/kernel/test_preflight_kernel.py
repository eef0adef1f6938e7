"""A relay set up from scratch forwards: natctl turns IP forwarding on (or refuses), and doctor tells.

The lab's relay namespace starts each test as a fresh VPS does, with
net.ipv4.ip_forward=0; the fixture puts forwarding back on afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from natctl.lab import topology
from natctl.lab.netns import run
from natctl.lab.traffic import payload, send_and_receive, udp_socket
from support.cli import Cli

pytestmark = pytest.mark.kernel

FIX_OFF = {"NATCTL_FIX_FORWARDING": "false"}
# /proc/sys read-only for natctl alone (a private mount namespace), as in a container.
READ_ONLY_PROC_SYS = ["unshare", "--mount", "sh", "-c",
                      'mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && exec "$@"', "sh"]


def sysctl(ns: str, key: str, value: int | None = None) -> int:
    if value is not None:
        run(["sysctl", "-q", "-w", f"{key}={value}"], ns=ns)
    return int(run(["sysctl", "-n", key], ns=ns).stdout)


@pytest.fixture
def fresh(lab, relay: Cli) -> Iterator[Cli]:
    """The relay fixture's natctl on a relay that forwards nothing yet."""
    ns = lab.relay_ns
    rp = (sysctl(ns, "net.ipv4.conf.all.rp_filter"), sysctl(ns, "net.ipv4.conf.eth0.rp_filter"))
    sysctl(ns, "net.ipv4.ip_forward", 0)
    try:
        yield relay
    finally:
        sysctl(ns, "net.ipv4.ip_forward", 1)
        sysctl(ns, "net.ipv4.conf.all.rp_filter", rp[0])
        sysctl(ns, "net.ipv4.conf.eth0.rp_filter", rp[1])


def kernel_state(lab) -> str:
    return run(["nft", "list", "table", "inet", "natctl"], ns=lab.relay_ns, check=False).stdout


def store_state(cli: Cli) -> tuple:
    return (cli("lobby", "list", "--json").stdout, cli("map", "list", "--json").stdout,
            cli("forward", "list", "--json").stdout)


@pytest.mark.parametrize("first,port", [(["apply"], 7101), (["lobby", "create", "a"], 7102)])
def test_natctl_turns_forwarding_on_and_the_relay_forwards(lab, fresh, first, port):
    proc = fresh(*first)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "turned IP forwarding on" in lines[0] and "natctl install-units" in lines[0], proc.stderr
    assert sysctl(lab.relay_ns, "net.ipv4.ip_forward") == 1
    # A UDP forward to a port the host opened on its router: any kind of home NAT lets it through.
    topology.open_home_port(lab, "host", port, "udp")
    added = fresh("forward", "add", "--port", str(port), "--to", f"{lab.members['host'].public_ip}:{port}",
                  "--proto", "udp")
    assert added.stderr == ""  # said once: it is on now
    client, host = udp_socket(lab.ns("client1"), port=40100), udp_socket(lab.ns("host"), port=port)
    r = lab.relay_ip
    try:
        for _ in range(3):  # not only a first packet: the kernel forwards every one, both ways
            there = send_and_receive(client, host, (r, port), payload(200))
            assert there.intact and there.seen_from is not None, there
            back = send_and_receive(host, client, there.seen_from, payload(200))
            assert back.intact and back.seen_from == (r, port), back
        sysctl(lab.relay_ns, "net.ipv4.ip_forward", 0)  # what natctl prevents: the relay forwards nothing
        assert not send_and_receive(client, host, (r, port), payload(200), timeout=0.5).intact
    finally:
        client.close()
        host.close()


def refused(lab, cli: Cli, match: str, *args: str, env: dict | None = None) -> None:
    """natctl ``args`` exits 9 with one line, leaves store, kernel and ip_forward as they were."""
    before = (store_state(cli), kernel_state(lab))
    proc = cli(*args, check=False, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 9, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("natctl: error: IP forwarding is off") and match in lines[0], \
        proc.stderr
    assert (store_state(cli), kernel_state(lab)) == before
    assert sysctl(lab.relay_ns, "net.ipv4.ip_forward") == 0


def test_with_the_fix_off_natctl_refuses_and_changes_nothing(lab, fresh):
    sysctl(lab.relay_ns, "net.ipv4.ip_forward", 1)  # something installed first
    fresh("lobby", "create", "a")
    fresh("map", "add", "--lobby", "a", "--host", "198.18.1.2:27015", "--client", "198.18.2.2:40001")
    sysctl(lab.relay_ns, "net.ipv4.ip_forward", 0)
    hint = "run 'sysctl -w net.ipv4.ip_forward=1'"
    refused(lab, fresh, hint, "map", "add", "--lobby", "a", "--host", "198.18.1.2:27015",
            "--client", "198.18.2.2:40009", env=FIX_OFF)
    refused(lab, fresh, hint, "lobby", "create", "b", env=FIX_OFF)
    refused(lab, fresh, hint, "apply", env=FIX_OFF)
    assert "fix_forwarding" in fresh("apply", check=False, env=FIX_OFF).stderr


def test_when_proc_sys_is_read_only_natctl_refuses(lab, fresh):
    ro = Cli(fresh.ns, fresh.state, prefix=READ_ONLY_PROC_SYS)
    refused(lab, ro, "cannot turn it on", "lobby", "create", "a")


def doctor(cli: Cli, *args: str) -> tuple[int, list[str], dict]:
    human = cli("doctor", *args, check=False)
    machine = cli("doctor", "--json", *args, check=False)
    assert machine.returncode == human.returncode
    return human.returncode, human.stdout.splitlines(), {c["name"]: c for c in json.loads(machine.stdout)}


def test_doctor_on_a_broken_relay(lab, fresh):
    sysctl(lab.relay_ns, "net.ipv4.conf.all.rp_filter", 1)
    code, lines, checks = doctor(fresh)
    assert code == 1
    assert lines[0].startswith("fail  ip_forward") and "fix: sysctl -w net.ipv4.ip_forward=1" in lines[1]
    assert checks["ip_forward"]["status"] == "fail"
    assert checks["rp_filter"]["status"] == "warn" and "strict (1) on eth0" in checks["rp_filter"]["detail"]
    assert "net.ipv4.conf.all.rp_filter=2" in checks["rp_filter"]["fix"]
    assert any(line.startswith("warn  rp_filter") for line in lines)
    assert (checks["conntrack"]["status"], checks["nat"]["status"], checks["relay ip"]["status"]) == \
        ("pass", "pass", "pass")
    status = fresh("status")
    assert "failing checks: ip_forward (run 'natctl doctor')" in status.stdout
    assert fresh.json("status")["failing_checks"] == ["ip_forward"]
    assert sysctl(lab.relay_ns, "net.ipv4.ip_forward") == 0  # doctor and status only look
    assert kernel_state(lab) == ""


def test_doctor_on_a_healthy_relay(lab, fresh):
    sysctl(lab.relay_ns, "net.ipv4.conf.all.rp_filter", 2)
    fresh("lobby", "create", "a")  # turns forwarding on; natctl's nat chains are in the kernel now
    code, lines, checks = doctor(fresh)
    assert code == 0, lines
    assert [checks[n]["status"] for n in ("ip_forward", "rp_filter", "conntrack", "nat", "relay ip")] == ["pass"] * 5
    assert checks["nat"]["detail"] == "the kernel takes nftables NAT chains"
    assert checks["ip_forward at boot"]["status"] in ("pass", "warn")  # the machine's own sysctl files
    assert "failing checks" not in fresh("status").stdout and fresh.json("status")["failing_checks"] == []
    # A floating IP the provider forwards here is not an address of this machine: a warning, not a failure.
    code, _, checks = doctor(Cli(fresh.ns, fresh.state, relay_ip="198.18.0.99"))
    assert code == 0 and checks["relay ip"]["status"] == "warn" and "floating IP" in checks["relay ip"]["detail"]
