"""What forwarding needs: the pure checks, the facts read from a fake root, and enforcement before kernel writes."""

import json
from dataclasses import replace

import pytest
from typer.testing import CliRunner

from natctl import config, preflight
from natctl.cli.app import app
from natctl.config import Settings
from natctl.errors import ForwardingOff, UsageError
from natctl.kernel import forwarding
from natctl.kernel.fake import FakeKernel
from natctl.model import Endpoint
from natctl.preflight import Check, Facts, evaluate
from natctl.sync import Reconciler

HEALTHY = Facts(ip_forward=1, forward_at_boot=1, boot_source="/etc/sysctl.d/60-natctl.conf", interface="eth0",
                rp_filter_all=0, rp_filter_iface=2, conntrack=True, nat=True, nft_nat=True,
                relay_ip="198.18.0.1", relay_ip_local=True)


def by_name(facts: Facts) -> dict[str, Check]:
    return {c.name: c for c in evaluate(facts)}


def statuses(facts: Facts) -> dict[str, str]:
    return {name: c.status for name, c in by_name(facts).items()}


# --- the pure part


def test_a_healthy_relay_passes_every_check():
    assert set(statuses(HEALTHY).values()) == {"pass"}
    assert list(statuses(HEALTHY)) == ["ip_forward", "ip_forward at boot", "rp_filter", "conntrack", "nat", "relay ip"]


@pytest.mark.parametrize("value", [0, None])
def test_forwarding_off_or_unknown_fails_with_the_command_that_fixes_it(value):
    check = by_name(replace(HEALTHY, ip_forward=value))["ip_forward"]
    assert check.status == "fail"
    assert "sysctl -w net.ipv4.ip_forward=1" in check.fix and "natctl install-units" in check.fix


@pytest.mark.parametrize("at_boot,source,status,said", [
    (1, "/etc/sysctl.d/60-natctl.conf", "pass", "/etc/sysctl.d/60-natctl.conf turns it on"),
    (0, "/etc/sysctl.conf", "warn", "/etc/sysctl.conf turns it off"),
    (None, "", "warn", "no sysctl file turns it on"),
])
def test_forwarding_at_boot_is_a_warning(at_boot, source, status, said):
    check = by_name(replace(HEALTHY, forward_at_boot=at_boot, boot_source=source))["ip_forward at boot"]
    assert check.status == status and said in check.detail
    assert check.ok or "natctl install-units" in check.fix


@pytest.mark.parametrize("all_,iface,status", [
    (0, 0, "pass"), (2, 2, "pass"), (0, 2, "pass"),
    (1, 0, "warn"), (0, 1, "warn"), (1, 1, "warn"),  # strict on either side: the kernel takes the larger
    (2, 1, "pass"), (1, 2, "pass"),
    (1, None, "warn"), (None, None, "warn"),
])
def test_rp_filter_strict_is_a_warning_loose_or_off_pass(all_, iface, status):
    check = by_name(replace(HEALTHY, rp_filter_all=all_, rp_filter_iface=iface))["rp_filter"]
    assert check.status == status
    if status == "warn" and iface is not None:
        assert "strict (1) on eth0" in check.detail and "rp_filter=2" in check.fix


@pytest.mark.parametrize("conntrack,nat,nft_nat,expect", [
    (False, False, True, ("pass", "pass")),  # natctl's nat chains (or a check-only one) prove both
    (True, True, None, ("pass", "pass")),  # nft not asked: the modules are there
    (True, False, None, ("pass", "fail")),
    (False, False, None, ("fail", "fail")),
    (True, True, False, ("pass", "fail")),  # the kernel refused a nat chain, whatever the module files say
])
def test_conntrack_and_nat(conntrack, nat, nft_nat, expect):
    got = statuses(replace(HEALTHY, conntrack=conntrack, nat=nat, nft_nat=nft_nat))
    assert (got["conntrack"], got["nat"]) == expect


def test_a_relay_ip_that_is_not_local_is_only_a_warning():
    check = by_name(replace(HEALTHY, relay_ip_local=False))["relay ip"]
    assert check.status == "warn" and "floating IP" in check.detail
    assert by_name(replace(HEALTHY, relay_ip=""))["relay ip"].status == "fail"
    assert by_name(replace(HEALTHY, relay_ip_local=None))["relay ip"].status == "pass"


# --- the adapter, against a fake root


def write(root, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def fake_root(tmp_path):
    write(tmp_path, "proc/sys/net/ipv4/ip_forward", "0\n")
    write(tmp_path, "proc/sys/net/ipv4/conf/all/rp_filter", "0\n")
    write(tmp_path, "proc/sys/net/ipv4/conf/eth0/rp_filter", "1\n")
    return tmp_path


def test_facts_from_a_fake_root(fake_root):
    write(fake_root, "proc/sys/net/netfilter/nf_conntrack_max", "262144\n")
    write(fake_root, "lib/modules/6.1.0-test/modules.dep",
          "kernel/net/netfilter/nf_nat.ko.xz: kernel/net/netfilter/nf_conntrack.ko.xz\n")
    facts = preflight.read_facts(str(fake_root), interface="eth0", relay_ip="198.18.0.1", relay_ip_local=True,
                                 release="6.1.0-test")
    assert (facts.ip_forward, facts.rp_filter_all, facts.rp_filter_iface) == (0, 0, 1)
    assert facts.conntrack and facts.nat and facts.nft_nat is None
    assert facts.forward_at_boot is None
    got = {c.name: c.status for c in evaluate(facts)}
    assert got == {"ip_forward": "fail", "ip_forward at boot": "warn", "rp_filter": "warn", "conntrack": "pass",
                   "nat": "pass", "relay ip": "pass"}


def test_missing_files_are_unknown_not_errors(tmp_path):
    facts = preflight.read_facts(str(tmp_path), interface="eth0", release="none")
    assert (facts.ip_forward, facts.rp_filter_all, facts.rp_filter_iface, facts.conntrack, facts.nat) == \
        (None, None, None, False, False)
    write(tmp_path, "sys/module/nf_conntrack/parameters/hashsize", "1024\n")  # loaded
    write(tmp_path, "lib/modules/r/modules.builtin", "kernel/net/netfilter/nf_nat.ko\n")  # built in
    facts = preflight.read_facts(str(tmp_path), release="r")
    assert facts.conntrack and facts.nat


def test_forwarding_at_boot_follows_sysctl_d_order(tmp_path):
    write(tmp_path, "usr/lib/sysctl.d/50-default.conf", "net.ipv4.ip_forward = 0\n")
    write(tmp_path, "etc/sysctl.d/10-vps.conf", "# provider\nnet/ipv4/ip_forward=0\n")
    assert preflight.boot_forward(str(tmp_path)) == (0, "/usr/lib/sysctl.d/50-default.conf")
    write(tmp_path, "etc/sysctl.d/50-default.conf", "-net.ipv4.conf.all.forwarding = 1\n")  # hides /usr/lib's
    assert preflight.boot_forward(str(tmp_path)) == (1, "/etc/sysctl.d/50-default.conf")
    write(tmp_path, "etc/sysctl.conf", "net.ipv4.ip_forward=0\n")  # read last
    assert preflight.boot_forward(str(tmp_path)) == (0, "/etc/sysctl.conf")


def test_the_relay_ip_is_local_when_a_socket_binds_to_it():
    assert preflight.local_or_any("127.0.0.1") == "127.0.0.1"
    assert preflight.local_or_any("198.18.255.254") == "0.0.0.0"


# --- enforcement


def test_natctl_turns_forwarding_on_and_says_so_once(fake_root, capsys):
    forwarding.ensure_forwarding(Settings(), str(fake_root))
    assert (fake_root / "proc/sys/net/ipv4/ip_forward").read_text().strip() == "1"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "turned IP forwarding on" in err[0] and "natctl install-units" in err[0]
    forwarding.ensure_forwarding(Settings(), str(fake_root))  # already on: silent
    assert capsys.readouterr().err == ""


def test_with_the_fix_off_natctl_refuses_and_says_what_to_run(fake_root, capsys):
    with pytest.raises(ForwardingOff) as err:
        forwarding.ensure_forwarding(Settings(fix_forwarding=False), str(fake_root))
    assert err.value.exit_code == 9 and "sysctl -w net.ipv4.ip_forward=1" in str(err.value)
    assert (fake_root / "proc/sys/net/ipv4/ip_forward").read_text().strip() == "0"
    assert capsys.readouterr().err == ""


def test_when_proc_sys_cannot_be_written_natctl_refuses(tmp_path):
    with pytest.raises(ForwardingOff, match="cannot turn it on"):
        forwarding.ensure_forwarding(Settings(), str(tmp_path / "no-proc"))


@pytest.mark.parametrize("value,expect", [("false", False), ("0", False), ("off", False), ("true", True), ("1", True)])
def test_fix_forwarding_from_the_environment(value, expect):
    assert config.load(path="/nonexistent", environ={"NATCTL_FIX_FORWARDING": value}).fix_forwarding is expect


def test_fix_forwarding_from_the_config_file(tmp_path):
    path = tmp_path / "natctl.toml"
    path.write_text("fix_forwarding = false\n")
    assert config.load(path=str(path), environ={}).fix_forwarding is False
    assert config.load(path="/nonexistent", environ={}).fix_forwarding is True
    with pytest.raises(UsageError, match="fix_forwarding"):
        config.load(path="/nonexistent", environ={"NATCTL_FIX_FORWARDING": "maybe"})


def test_only_the_machines_own_kernel_is_checked():
    assert Reconciler(Settings()).preflight is forwarding.ensure_forwarding
    assert Reconciler(Settings(), kernel_factory=FakeKernel).preflight is None  # tests, the bench: the caller's


def test_the_check_runs_once_before_the_first_kernel_write(svc):
    calls = []
    svc.rec.preflight = lambda settings: calls.append(len(svc.fake.scripts))
    svc.lobby_create("a", apply=False)  # store only: no check
    assert calls == []
    svc.map_add("a", Endpoint("198.18.1.2", 27015), [Endpoint("198.18.2.2", 40001)])
    svc.map_add("a", Endpoint("198.18.1.2", 27015), [Endpoint("198.18.2.2", 40002)])
    assert calls == [0]  # once, before the kernel had any script


def test_a_refusal_leaves_store_and_kernel_untouched(svc):
    def refuse(settings):
        raise ForwardingOff("IP forwarding is off", "run 'sysctl -w net.ipv4.ip_forward=1'")

    svc.rec.preflight = refuse
    with pytest.raises(ForwardingOff):
        svc.lobby_create("a")
    with pytest.raises(ForwardingOff):
        svc.apply()
    assert svc.lobbies() == [] and svc.fake.scripts == []
    svc.rec.preflight = None  # fixed: the next change goes through
    svc.lobby_create("a")
    assert [lb.name for lb in svc.lobbies()] == ["a"]


# --- the commands


def test_install_units_writes_the_sysctl_drop_in_beside_the_units(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["install-units", "--systemd-dir", str(tmp_path / "etc/systemd/system")])
    assert result.exit_code == 0, result.output
    assert "net.ipv4.ip_forward = 1" in (tmp_path / "etc/sysctl.d/60-natctl.conf").read_text()
    assert str(tmp_path / "etc/sysctl.d/60-natctl.conf") in result.output
    result = runner.invoke(app, ["install-units", "--systemd-dir", str(tmp_path / "units"),
                                 "--sysctl-dir", str(tmp_path / "sysctl")])
    assert result.exit_code == 0 and (tmp_path / "sysctl/60-natctl.conf").exists()
    result = runner.invoke(app, ["install-units", "--systemd-dir", str(tmp_path / "only"), "--sysctl-dir", ""])
    assert result.exit_code == 0 and not (tmp_path / "sysctl.d").exists()
    assert preflight.boot_forward(str(tmp_path)) == (1, "/etc/sysctl.d/60-natctl.conf")


@pytest.fixture
def doctor(monkeypatch):
    """natctl doctor over chosen facts."""
    monkeypatch.setenv("NATCTL_CONFIG", "/nonexistent")

    def run(facts: Facts, *args: str):
        monkeypatch.setattr(preflight, "gather", lambda settings: facts)
        return CliRunner().invoke(app, ["doctor", *args])
    return run


def test_doctor_prints_every_check_and_fails_when_one_fails(doctor):
    healthy = doctor(HEALTHY)
    assert healthy.exit_code == 0, healthy.output
    assert [line.split()[0] for line in healthy.output.splitlines()] == ["pass"] * 6
    broken = doctor(replace(HEALTHY, ip_forward=0, rp_filter_all=1, rp_filter_iface=0, relay_ip_local=False))
    assert broken.exit_code == 1
    lines = broken.output.splitlines()
    assert lines[0].startswith("fail  ip_forward") and "fix: sysctl -w net.ipv4.ip_forward=1" in lines[1]
    assert any(line.startswith("warn  rp_filter") for line in lines)
    assert any(line.startswith("warn  relay ip") for line in lines)
    assert doctor(replace(HEALTHY, rp_filter_iface=1)).exit_code == 0  # warnings alone pass


def test_doctor_json(doctor):
    result = doctor(replace(HEALTHY, ip_forward=0), "--json")
    assert result.exit_code == 1
    checks = json.loads(result.stdout)
    assert [c["name"] for c in checks][:2] == ["ip_forward", "ip_forward at boot"]
    assert set(checks[0]) == {"name", "status", "ok", "detail", "fix"}
    assert (checks[0]["status"], checks[0]["ok"]) == ("fail", False)


def test_no_sysctl_file_is_written_outside_the_given_root(tmp_path):
    # The units' tests point --systemd-dir at a temporary directory: the drop-in must follow it there.
    CliRunner().invoke(app, ["install-units", "--systemd-dir", str(tmp_path / "systemd")])
    assert (tmp_path / "sysctl.d/60-natctl.conf").exists()
