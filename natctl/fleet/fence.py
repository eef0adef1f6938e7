"""A fleet relay's kernel-side lease: its kernel forwards only while its daemon lives.

When a relay's daemon dies but its kernel lives (table ``inet natctl`` and the XDP program stay), the
other relays move its lobbies after ``dead_after`` seconds of a still heartbeat, yet that kernel would go
on forwarding the flows it had: two relays forwarding one lobby. The daemon therefore holds a lease that
runs out unless renewed, shorter than ``dead_after`` so it lapses before the others can move anything:

- nftables: ``table inet natctl_fence`` (a table of its own: natctl's skeleton stays as it is), a set
  ``lease`` holding the relay IP with a timeout, and a prerouting rule before conntrack (priority raw)
  that drops TCP/UDP to the relay IP on a relay port (``settings.ports``) while the IP is not in it.
  Both directions of every mapping are addressed to relay IP:relay port, so established flows stop too;
  the registration port and every other port (SSH) never match.
- XDP forwards mapped packets before nftables sees them: its ``natctl_lease`` map holds the deadline
  (CLOCK_MONOTONIC ns, Python's ``time.monotonic_ns``); past it the program passes them to the stack,
  where the fence drops them.

Only a crash lets the lease run out: a clean stop removes it (mappings stay and keep forwarding, as on a
single relay), and a relay that is not in a fleet never installs one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from natctl.errors import KernelError
from natctl.model import PortRange

TABLE = "natctl_fence"
SET = "lease"


def lease_ttl(heartbeat: float, dead_after: float) -> float | None:
    """How long one renewal holds: ``dead_after - heartbeat``, so the lease is over before the others,
    who wait ``dead_after`` after the last heartbeat they saw, move anything. None (no fence) when it
    would not outlast the time between two renewals: the fence would cut a live relay."""
    ttl = dead_after - heartbeat
    return ttl if ttl > heartbeat else None


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def install_script(relay_ip: str, ports: PortRange, ttl: float) -> str:
    """The whole table, replaced in one transaction (``add`` + ``delete`` first: also when it is absent)."""
    return (f"add table inet {TABLE}\ndelete table inet {TABLE}\n"
            f"table inet {TABLE} {{\n"
            f"  set {SET} {{ type ipv4_addr; flags timeout; elements = {{ {relay_ip} timeout {_ms(ttl)}ms }}; }}\n"
            f"  chain prerouting {{\n"
            f"    type filter hook prerouting priority raw; policy accept;\n"
            f"    ip daddr {relay_ip} meta l4proto {{ tcp, udp }} th dport {ports.low}-{ports.high} "
            f"ip daddr != @{SET} counter drop\n"
            f"  }}\n}}\n")


def refresh_script(relay_ip: str, ttl: float) -> str:
    """Renew: flush and add in one transaction (an element's timeout cannot be changed in place)."""
    return f"flush set inet {TABLE} {SET}\nadd element inet {TABLE} {SET} {{ {relay_ip} timeout {_ms(ttl)}ms }}\n"


def remove_script() -> str:
    return f"add table inet {TABLE}\ndelete table inet {TABLE}\n"


class Fence:
    """The lease of one relay: ``refresh(ttl)`` renews it (nftables set element and XDP deadline),
    ``remove()`` takes the fence away. ``xdp_interface``: where natctl's XDP program may be attached."""

    def __init__(self, relay_ip: str, ports: PortRange, xdp_interface: str | None = None,
                 run: Callable[[str], None] | None = None, set_deadline: Callable[[str, int], bool] | None = None,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.relay_ip, self.ports, self.xdp_interface = relay_ip, ports, xdp_interface
        self._run = run or _libnftables()
        self._set_deadline = set_deadline or _xdp_set_lease
        self._clock = clock
        self._lock = threading.Lock()  # the daemon's loop and the Keeper thread both renew
        self._installed = False
        self.renewed = 0  # clock() of the last renewal

    def refresh(self, ttl: float) -> None:
        with self._lock:
            now = self._clock()
            if self._installed:
                try:
                    self._run(refresh_script(self.relay_ip, ttl))
                except KernelError:  # the table went (natctl uninstall, an operator): put it back whole
                    self._installed = False
            if not self._installed:
                self._run(install_script(self.relay_ip, self.ports, ttl))
                self._installed = True
            if self.xdp_interface:
                self._xdp(now + int(ttl * 1e9))
            self.renewed = now

    def age(self) -> float:
        """Seconds since the last renewal (forever if none)."""
        return (self._clock() - self.renewed) / 1e9 if self.renewed else float("inf")

    def remove(self) -> None:
        with self._lock:  # nftables first: should the XDP write fail, its lapsed lease only sends packets the slow way
            self._run(remove_script())
            self._installed = False
            if self.xdp_interface:
                self._xdp(0)

    def _xdp(self, deadline_ns: int) -> None:
        assert self.xdp_interface
        try:
            self._set_deadline(self.xdp_interface, deadline_ns)
        except OSError as err:  # e.g. the program was replaced meanwhile: the next renewal finds the new one
            raise KernelError(f"the XDP lease could not be written ({err.strerror or err})",
                              "natctl serve renews it at its next heartbeat") from None


class Keeper(threading.Thread):
    """Renews the lease when the daemon's loop has not for ``1.5 × every`` seconds: the loop waits on the
    database (a query to a server that vanished can block far longer than the lease), and a database
    outage must not stop forwarding while the daemon lives. It dies with the process, so a crash still
    lets the lease run out; ``stop()`` before anything else ends the Watch."""

    def __init__(self, fence: Fence, ttl: float, every: float, on_error: Callable[[Exception], Any]) -> None:
        super().__init__(name="natctl-fence", daemon=True)
        self.fence, self.ttl, self.every, self.on_error = fence, ttl, every, on_error
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(self.every / 2):
            if self.fence.age() > 1.5 * self.every:
                try:
                    self.fence.refresh(self.ttl)
                except KernelError as err:
                    self.on_error(err)

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join(5)


def of(svc: Any) -> Fence:
    """The fence of a natctl.service.Service's relay: its relay IP and ports, and the interface of its XDP
    program when its kernel has one (natctl.kernel.accel.XdpKernel.prog; duck-typed: accel is not ours)."""
    prog = getattr(svc.kernel, "prog", None)
    return Fence(svc.relay_ip, svc.settings.ports, getattr(prog, "ifname", None))


def clear_stale(svc: Any) -> None:
    """For a daemon that is not in a fleet: remove a lease a fleet member's crash left on this machine, which
    would drop every relay port. Errors are ignored: no fence (nor nftables binding) is the usual case."""
    try:
        of(svc).remove()
    except Exception:  # noqa: BLE001
        pass


def _xdp_set_lease(ifname: str, deadline_ns: int) -> bool:
    from natctl.kernel.xdp import set_lease

    return set_lease(ifname, deadline_ns)


def _libnftables() -> Callable[[str], None]:
    """One libnftables context; each call is one script, applied in one transaction."""
    import nftables

    nft = nftables.Nftables()

    def run(script: str) -> None:
        rc, _, err = nft.cmd(script)
        if rc != 0:
            first = ((err or "").strip().splitlines() or ["no reason given"])[0]
            raise KernelError(f"nftables refused the fence ({first})", f"see 'nft list table inet {TABLE}'")
    return run
