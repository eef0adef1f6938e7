"""The kernel tests' lab: which home routers it has, and why."""

from __future__ import annotations

from collections.abc import Iterator

from natctl.lab import topology

SITES = {"home-host": ["host"], "home-clients": ["client1", "client2"], "home-host2": ["host2"],
         "elsewhere": ["stranger"]}


def built(nat: str) -> Iterator[topology.Lab]:
    lab = topology.build(SITES, nat=nat)
    try:
        yield lab
    finally:
        lab.teardown()


def cone_lab() -> Iterator[topology.Lab]:
    """The same lab behind address-restricted cones, for hand-made mappings (`natctl map add`).

    A hand-made mapping has no punch protocol: the relay reaches a host from a client port the host
    never sent to, which only a cone (or a port forward on the home router) lets in. The README says
    so; the daemon's path (tests/kernel/test_nat_kinds.py) works behind every kind."""
    yield from built(topology.ADDRESS_RESTRICTED)
