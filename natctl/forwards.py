"""Static forwards (public port -> address:port): part of the service API, mixed into ``Service``.

Game masters' sessions are forwards too (owner "gm:NAME"), so this is the one
way forwards are made, listed and removed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from natctl import plan as planner
from natctl.errors import Conflict, NotFound
from natctl.model import Endpoint, Forward, Snapshot
from natctl.store import Store
from natctl.views import ForwardView

if TYPE_CHECKING:
    from natctl.service import Service


class ForwardOps:
    def _forward_scope(self: "Service", port: int) -> Callable[[Store], frozenset[planner.Element]]:
        def scope(store: Store) -> frozenset[planner.Element]:
            fwd = store.forward(port)
            snap = Snapshot(self.relay_ip, forwards=(fwd,) if fwd else ())
            return planner.plan(snap, None, self.kernel.owns)
        return scope

    def forward_add(self: "Service", port: int, target: Endpoint, proto: str = "tcp", ttl: int | None = None,
                    owner: str = "", apply: bool = True) -> Forward:
        if port in self.settings.ports or port == self.settings.registration_port:
            raise Conflict(f"port {port} is reserved for natctl's relay ports ({self.settings.ports}) "
                           f"or registration ({self.settings.registration_port})", "pick a port outside them")
        fwd = Forward(port, target, proto, ttl, self.clock(), True, owner)
        with self._change(apply, self._forward_scope(port)) as store:
            if store.forward(port) is not None:
                raise Conflict(f"public port {port} is already forwarded", f"remove it first: natctl forward remove {port}")
            store.add_forward(fwd)
        return fwd

    def forward_remove(self: "Service", port: int, apply: bool = True) -> Forward:
        with self._change(apply, self._forward_scope(port)) as store:
            fwd = store.forward(port)
            if fwd is None:
                raise NotFound(f"no forward on port {port}", "see 'natctl forward list'")
            store.remove_forward(port)
        return fwd

    def forwards(self: "Service", counters: bool = False) -> list[ForwardView]:
        installed = self.kernel.read() if counters else None
        out = []
        for f in self.store.forwards():
            packets = bytes_ = 0
            ok = False
            if installed is not None:
                for proto in f.protos:
                    p, b = installed.counters.get((planner.FWDACCT, (f.target.ip, proto, f.target.port)), (0, 0))
                    packets, bytes_ = packets + p, bytes_ + b
                ok = any(e.set == planner.FWD and e.key[1] == f.port for e in installed.elements)
            out.append(ForwardView(f.port, f.proto, str(f.target), f.ttl, f.created,
                                   f.created + f.ttl if f.ttl else None, f.owner, ok, packets, bytes_))
        return out
