"""Fixtures of the unit tests (no root, no kernel)."""

from __future__ import annotations

import pytest

from natctl.config import Settings
from natctl.kernel.fake import FakeKernel
from natctl.model import PortRange
from natctl.service import Service


@pytest.fixture
def svc(tmp_path, monkeypatch):
    """A Service on the fake kernel and a fresh store; ``svc.fake`` is the kernel."""
    monkeypatch.setattr("natctl.sync.local_port_overlap", lambda ports: None)
    kernel = FakeKernel()
    s = Service(Settings(state=str(tmp_path / "s.db"), relay_ip="198.18.0.1", ports=PortRange(20000, 20009)),
                kernel_factory=lambda: kernel)
    s.fake = kernel
    yield s
    s.close()
