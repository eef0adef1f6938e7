"""A store natctl cannot use is one line and exit 8, and the file is left exactly as it was."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest

from natctl.errors import StoreError
from natctl.store import Store


def test_a_file_that_is_not_a_database_is_refused_and_untouched(tmp_path):
    path = tmp_path / "natctl.db"
    path.write_bytes(b"not sqlite at all\n" * 100)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(StoreError, match="is not a natctl database") as err:
        Store(str(path))
    assert err.value.exit_code == 8
    assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert sorted(os.listdir(tmp_path)) == ["natctl.db"]  # no journal or WAL file left beside it


def test_a_store_that_cannot_be_written_is_refused(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the store's directory should be")
    with pytest.raises(StoreError, match="cannot open the store"):
        Store(str(blocker / "natctl.db"))


def test_the_cli_says_it_in_one_line_with_exit_8(tmp_path):
    path = tmp_path / "natctl.db"
    path.write_bytes(b"\x00garbage" * 64)
    proc = subprocess.run([sys.executable, "-m", "natctl", "--state", str(path), "--relay-ip", "198.18.0.1",
                           "lobby", "list"], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "NATCTL_CONFIG": "/nonexistent"})
    assert proc.returncode == 8, proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("natctl: error: the store ")
