"""Fixtures of the unit tests (no root, no kernel)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from natctl.config import Settings
from natctl.kernel.fake import FakeKernel
from natctl.model import PortRange
from natctl.service import Service


@pytest.fixture(params=["sqlite", "postgresql"])
def svc(request, tmp_path, monkeypatch):
    """A Service on the fake kernel and a fresh store, of each engine: a SQLite file, and a PostgreSQL
    database where this relay is a fleet of one; ``svc.fake`` is the kernel."""
    monkeypatch.setattr("natctl.sync.local_port_overlap", lambda ports: None)
    kernel = FakeKernel()
    settings = Settings(state=str(tmp_path / "s.db"), relay_ip="198.18.0.1", ports=PortRange(20000, 20009))
    if request.param == "postgresql":
        settings = replace(settings, store=request.getfixturevalue("pg_db").url)
    s = Service(settings, kernel_factory=lambda: kernel)
    if request.param == "postgresql":
        from natctl.fleet.service import Fleet

        Fleet(s.rec).join("relay-1", "test")
    s.fake = kernel
    yield s
    s.close()
