"""`natctl demo`, as a new user runs it: it passes, and it leaves nothing behind, also on Ctrl-C."""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.kernel


def namespaces(prefix: str) -> list[str]:
    return [n for n in os.listdir("/run/netns") if n.startswith(prefix)] if os.path.isdir("/run/netns") else []


def test_demo_passes_and_cleans_up():
    before = set(namespaces(""))
    proc = subprocess.run([sys.executable, "-m", "natctl", "demo"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every packet arrived intact" in proc.stdout and "WRONG" not in proc.stdout
    assert proc.stdout.count("identical") >= 6  # five UDP datagrams and the TCP download
    assert "Lab removed." in proc.stdout
    assert set(namespaces("")) <= before


def test_the_fleet_demo_passes_and_cleans_up():
    before, databases = set(namespaces("")), set(glob.glob("/tmp/natctl-pg-*"))
    proc = subprocess.run([sys.executable, "-m", "natctl", "demo", "--fleet"], capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every echo arrived intact" in proc.stdout and "LOST" not in proc.stdout
    assert "20 of 20 datagrams echoed with the database down" in proc.stdout
    assert re.search(r"lobby a forwards again through relay2, [0-9.]+ s after the kill", proc.stdout)
    assert "Fleet lab removed." in proc.stdout and set(namespaces("")) <= before
    assert set(glob.glob("/tmp/natctl-pg-*")) <= databases  # its PostgreSQL went with it


def test_ctrl_c_removes_the_lab():
    proc = subprocess.Popen([sys.executable, "-m", "natctl", "demo", "--keep"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        prefix, deadline = None, time.monotonic() + 60
        while prefix is None and time.monotonic() < deadline:  # bounded: until the lab is up
            line = proc.stdout.readline()
            assert line, "the demo ended before keeping its lab"
            if m := re.search(r"namespaces (nl[0-9a-f]+)-\*", line):
                prefix = m.group(1)
        assert prefix and namespaces(prefix)
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[0]
        assert "Lab removed." in rest
        assert namespaces(prefix) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
