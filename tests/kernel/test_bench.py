"""The bench's own tests: its arguments, its parsing and judging, and a short run of each method.

The full bench is not part of CI; the smoke runs below relay a few thousand
packets through each available method in the bench's lab and check they arrived.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import cpu, daemon, fleet, forwarding, main, report, stats, tool
from bench import lab as benchlab
from bench.config import METHOD_NAMES, make_config
from bench.methods import METHODS, Context
from natctl.errors import UsageError
from natctl.lab.netns import exists, run

ROOT_ONLY = pytest.mark.kernel


# --- arguments


def test_config_defaults_and_quick():
    full, quick = make_config(), make_config(quick=True)
    assert full.methods == ("asyncio", "socat", "nftables", "xdp") == METHOD_NAMES == tuple(METHODS)
    assert full.runs == 5 and 100_000 in full.install_counts and 100_000 in full.forwarding_counts
    assert quick.runs == 1 and max(quick.install_counts) == 10_000 and quick.seconds < full.seconds
    assert make_config(methods=" nftables,socat ", runs=2, seconds=0.5).methods == ("nftables", "socat")


@pytest.mark.parametrize("kw", [{"methods": "nftables,noray"}, {"methods": ","}, {"runs": 0}, {"runs": 51},
                                {"seconds": 0.1}, {"seconds": 31}, {"packets": 10}])
def test_config_refuses_bad_input(kw):
    with pytest.raises(UsageError):
        make_config(**kw)


def test_cli_bad_method_is_one_line_exit_2():
    proc = subprocess.run([sys.executable, "-m", "natctl", "bench", "--methods", "bogus"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("natctl: error: unknown method bogus")
    assert len(proc.stderr.strip().splitlines()) == 1


# --- parsing


def test_tool_output_is_the_last_json_line():
    text = 'warming up\n{"mode": "send", "sent": 5}\nnoise\n{"mode": "recv", "received": 4}\n'
    assert tool.parse_output(text) == {"mode": "recv", "received": 4}
    with pytest.raises(tool.BenchError):
        tool.parse_output("udpblast: bind: Address in use\n{broken")
    with pytest.raises(tool.BenchError):
        tool.argv("flood")


def test_sink_counter_snmp_and_proc_stat():
    doc = {"nftables": [{"metainfo": {}}, {"chain": {"name": "sink"}},
                        {"rule": {"expr": [{"match": {}}, {"counter": {"packets": 1234, "bytes": 9}}, {"drop": None}]}}]}
    assert benchlab.parse_sink(doc) == 1234
    with pytest.raises(tool.BenchError):
        benchlab.parse_sink({"nftables": []})
    snmp = "Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors\nUdp: 10 0 0 5 77\n"
    assert benchlab.udp_stat(snmp, "RcvbufErrors") == 77 and benchlab.udp_stat(snmp, "InDatagrams") == 10
    stat = "cpu  1 2 3 4 5 6 7 8 0 0\ncpu0 1 0 1 50 0 0 0 0 0 0\ncpu1 10 1 20 100 3 4 5 9 0 0\n"
    assert cpu.parse_proc_stat(stat, 1) == (40, 143)  # steal (9) is neither busy nor ours


def test_summarize_and_percentile():
    assert stats.summarize([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": [3.0, 1.0, 2.0]}
    assert stats.summarize([])["median"] is None
    fifty = [float(v) for v in range(1, 51)]
    assert stats.percentile(fifty, 99) == 50.0  # udpblast.c's rule: with 50 samples, the slowest
    assert stats.percentile(fifty, 50) == 26.0 and stats.percentile([4.0, 1.0], 50) == 4.0
    assert stats.percentile([], 99) is None


def test_cli_without_the_checkout_says_how_to_get_the_bench(tmp_path):
    """natctl installed from a wheel has no bench/ beside it: one line, how to get it."""
    import shutil

    from natctl.cli.bench import checkout_root

    shutil.copytree(checkout_root() / "natctl", tmp_path / "natctl", ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['natctl', 'bench', '--quick']; "
                           "from natctl.cli import main; main()"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path,
                          env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(tmp_path)})
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().startswith("natctl: error: the benchmark suite is not installed") and \
        "make bench" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def _summary(v):
    return {"median": v, "min": v * 0.9, "max": v * 1.1, "runs": [v]}


def results(**over):
    """A made-up run, enough for every target."""
    def method(pps, ns_, eq=None):
        m = {"label": "m", "available": True, "flood": {"64": {"pps": _summary(pps), "ns_per_packet": _summary(ns_),
                                                                "loss": _summary(0.1)}},
             "sustained": {"pps": pps * 0.8}, "latency": {"low": {"p50_us": 90, "p99_us": 150, "lost": 0}}}
        if eq:
            m["equal_load"] = {"ns_per_packet": _summary(eq)}
        return m
    r = {"config": {"sizes": [64, 512]}, "machine": {"date": "2026-01-01T00:00:00Z", "kernel": "6.18", "cpus": 2},
         "methods": {"asyncio": method(40e3, 20e3), "socat": method(100e3, 10e3), "nftables": method(800e3, 1200, 1000),
                     "xdp": {"label": "x", "available": False, "reason": "not built"}},
         "scale": {"available": True, "install": {"10000": {"apply_s": 0.7, "kernel_apply_s": 0.5, "elements": 60000},
                                                  "100000": {"apply_s": 4.0, "kernel_apply_s": 3.0, "elements": 6e5}},
                   "forwarding": {"10": {"pps": _summary(800e3)}, "100000": {"pps": _summary(700e3)}},
                   "incremental": {"installed": 10000, "daemon": {"total_ms": 0.5, "elements_sent": 6,
                                                                  "only_that_mapping": True},
                                   "cli": {"total_ms": 3000, "kernel_read_ms": 2500, "elements_sent": 6}}},
         "daemon": {"available": True, "admission": {"p99_ms": 2.0, "p50_ms": 1.0, "max_ms": 2.0, "admitted": 5,
                                                     "clients": 5}}}
    r.update(over)
    return r


def test_targets_say_met_missed_and_not_measured():
    got = {t["target"].split(" in ")[0].split(" (")[0]: t["met"] for t in report.targets(results())}
    assert got["nftables >= 6x socat"] is True  # 8x
    assert got["nftables >= 15x asyncio"] is True  # 20x
    assert got["XDP CPU per packet <= 0.7x nftables'"] is None  # not available: not made up
    assert got["forwarding with 100,000 mappings within 10% of 10"] is False  # 0.875x
    assert got["10,000 mappings installed"] is False and got["100,000 mappings installed"] is True
    assert got["one incremental change at 10,000 installed < 5 ms"] is True
    xdp = next(t for t in report.targets(results()) if t["target"].startswith("XDP"))
    assert xdp["figure"] == "not measured" and "not built" in xdp["note"]
    assert report.verdict(False) == "MISSED"


def test_formatting():
    assert (report.k(532_400), report.k(47_230), report.k(1_200_000), report.k(None)) == ("532k", "47.2k", "1.20M", "-")
    assert report.span({"median": 2e5, "min": 1e5, "max": 3e5}) == "200k (100k-300k)"
    rows = report.method_rows(results())
    assert rows[-1][1].startswith("not available: not built")


def test_readme_block_replaces_only_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\nbefore\n{main.START}\nold figures\n{main.END}\nafter\n")
    block = main.readme_block(results(targets=report.targets(results())), "natctl bench")
    main.update_readme(str(readme), block)
    text = readme.read_text()
    assert text.startswith("# x\nbefore\n") and text.endswith(f"{main.END}\nafter\n")
    assert "old figures" not in text and "| natctl bench" not in text and "`natctl bench`" in text
    assert "**MISSED**" in text  # the 10,000 install target, plainly
    readme.write_text("no markers\n")
    with pytest.raises(Exception, match="no <!-- bench:start -->"):
        main.update_readme(str(readme), block)


# --- smoke runs in the bench's own lab (root)


@pytest.fixture(scope="module")
def blab():
    lab = benchlab.build(*benchlab.cpus())
    lab.patience = 0  # never wait for the machine to be quiet: a smoke run, not a measurement
    try:
        yield lab
    finally:
        lab.teardown()
    assert not exists(lab.relay_ns) and not exists(lab.world_ns)


@ROOT_ONLY
@pytest.mark.parametrize("name", list(METHODS))
def test_smoke_each_method(blab, tmp_path, name):
    method = METHODS[name]
    reason = method.unavailable()
    if reason:
        pytest.skip(f"{name}: {reason}")
    with method.prepared(blab):
        running = method.start(blab, Context(str(tmp_path), lifetime=60))
        try:
            with forwarding.echo(blab, 30):
                forwarding.warm(blab, running)
                r = forwarding.flood(blab, running, forwarding.Flood(64, 2500, 1.0, rate=5000))
                assert r["sent"] == 2500 and r["delivered"] >= 0.9 * r["sent"], r
                assert r["relay_cpu_s"] > 0 and r["ns_per_packet"] > 0
                rtt = forwarding.latency(blab, running, probes=50, rate=500)
                assert rtt["received"] >= 45 and 0 < rtt["p50_us"] < 100_000, rtt
        finally:
            running.stop()


@ROOT_ONLY
def test_smoke_daemon_admission_and_flood(blab, tmp_path):
    reason = daemon.unavailable()
    if reason:
        pytest.skip(reason)
    r = daemon.admission(blab, Context(str(tmp_path), lifetime=60), clients=3, flood=2000)
    assert r["admitted"] == 3 and r["p99_ms"] < 500
    flood = r["flood"]
    assert flood["sent"] == 2000 and flood["reached_daemon"] <= 400, flood  # a rate-limited few reach it
    assert run(["nft", "list", "table", "inet", "natctl"], ns=blab.relay_ns, check=False).returncode != 0


@ROOT_ONLY
def test_smoke_fleet(tmp_path, capsys):
    """bench.fleet at its smallest: the report's shape, and figures that hang together."""
    out = tmp_path / "fleet.json"
    assert fleet.main(["--placements", "2", "--changes", "4", "--seconds", "10", "--failovers", "1",
                       "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == r  # the JSON on stdout too, the table on stderr
    p = r["placement"]
    for way in ("cli", "service"):
        assert p[way]["runs"] == 2 and 0 < p[way]["p50_ms"] <= p[way]["p95_ms"] <= p[way]["max_ms"] < 30_000
    assert set(p["placed_on"]) <= {"relay1", "relay2"} and sum(p["placed_on"].values()) == 2 * 2 + 1  # region eu
    one, many = r["changes"]["one_relay"], r["changes"]["fleet"]
    for c in (one, many):
        assert c["changes"] == 3 * 4 and c["errors"] == 0 and c["store_agrees"], c
        assert c["per_second"] > 0 and 0 <= c["drain_lag_max_ms"] < 30_000
    assert one["remote"] == 0 and set(one["lobbies"].values()) == {"relay1"}
    assert 0 < many["remote"] < many["changes"] and sorted(many["drain_lag_ms"]) == ["relay1", "relay2", "relay3"]
    f = r["failover"]
    (run,) = f["runs"]
    s = f["settings"]
    assert run["killed"] == "relay1" and run["moved_to"] == "relay2" and run["lost_before_kill"] == 0
    # Nobody is declared dead before its heartbeat could have stood still for dead_after (seen up to two beats late).
    assert s["dead_after_s"] - 2 * s["heartbeat_s"] <= run["dead_s"] <= run["registered_s"] < 40
    assert run["dead_s"] <= run["echoed_again_s"] < 40
    # The datagrams of the gap are lost, and only about those: one every player_every_ms until echoed again.
    assert 0 < run["lost"] <= run["echoed_again_s"] * 1000 / s["player_every_ms"] + 5 and run["lost"] < run["sent"]
    assert f["median"]["echoed_again_s"] == run["echoed_again_s"]
