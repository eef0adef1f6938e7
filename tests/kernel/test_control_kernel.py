"""The daemon's control API for real: 500 changes to other lobbies while a numbered flow runs through one
mapping; not one of its packets may be lost (issue 14's churn test).

The changes are bench.reliability's churn (lobby create, map add, map remove, lobby close, over and over),
the flow its SeqFlow: 1,000 datagrams a second each way, counted by sequence number.
"""

from __future__ import annotations

import os
import stat
import time

import pytest

from bench.reliability import SeqFlow, churn
from natctl.daemon.control_client import Control
from natctl.errors import NatctlError
from support import labs
from support.scenarios import add
from support.serve import Daemon

pytestmark = [pytest.mark.kernel, pytest.mark.usefixtures("engine")]  # each test on both store engines too
# The flow's mapping is hand-made (`natctl map add`): the relay reaches the host from a client port the
# host never sent to, which only a cone lets in (see support.labs.cone_lab); the daemon's own path is
# tested behind stock masquerade in test_daemon.py and test_nat_kinds.py.
lab = pytest.fixture(scope="module", name="lab")(labs.cone_lab)


def connect(path: str, seconds: float = 10.0) -> Control:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return Control(path)
        except NatctlError:
            assert time.monotonic() < deadline, f"the daemon's control socket {path} does not answer"
            time.sleep(0.05)


def test_500_changes_through_the_control_api_lose_no_packet_of_a_running_flow(lab, relay, socks, tmp_path):
    relay("lobby", "create", "flow", "--open")
    m = add(relay, lab, socks, "flow", "host", "client1")
    daemon = Daemon(lab, relay.state, str(tmp_path / "serve.log"), "--cleanup-interval", "1h").start()
    ctl = connect(relay.state + ".sock")
    try:
        assert stat.S_IMODE(os.stat(relay.state + ".sock").st_mode) == 0o600
        flow = SeqFlow(socks["client1"], socks["host"], (lab.relay_ip, m["host_port"]),
                       (lab.relay_ip, m["client_port"]), rate=1000, max_seconds=25).start()
        changed = churn(ctl, 500)
        time.sleep(0.3)  # the flow goes on a moment after the last change
        counted = flow.stop()
        assert changed["changes"] == 500 and changed["errors"] == 0, changed
        assert counted["sent"] >= 500 and counted["lost"] == 0 and counted["duplicates"] == 0, counted
        # The flow's mapping is as it was; every lobby the churn opened is closed again, its ports free.
        lobbies = ctl.call("lobby.list")
        assert [lb["name"] for lb in lobbies] == ["flow"]
        (mapping,) = ctl.call("map.list")
        assert mapping["installed"] is True and mapping["client_port"] == m["client_port"]
        assert mapping["to_host_packets"] >= counted["sent"] // 2
        print(f"control API: {changed['per_second']} changes/s (p50 {changed['p50_ms']} ms, "
              f"p99 {changed['p99_ms']} ms); flow: {counted['sent']} sent, {counted['lost']} lost")
    finally:
        ctl.close()
        daemon.kill()
