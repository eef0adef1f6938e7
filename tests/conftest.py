"""Tests by what they need: tests/unit (no root, seconds) and tests/kernel (root, namespaces).

Both run by default (CI is root); without root the kernel tests are skipped
with a reason. Test-only lab code lives in tests/support.
"""

from __future__ import annotations

import os

import pytest

from support.postgres import pg_db, pg_server  # noqa: F401  fixtures: one PostgreSQL per session, a database per test

ROOT = os.geteuid() == 0


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ROOT:
        return
    skip = pytest.mark.skip(reason="kernel test: needs root (CI runs as root)")
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)
