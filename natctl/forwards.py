"""Static forwards (public port -> address:port), for a session or forever.

Game masters' sessions are forwards too (owner "gm:NAME"), so this is the one
way forwards are made, listed and removed.
"""

from __future__ import annotations

from natctl import plan as planner
from natctl.errors import Conflict, NotFound
from natctl.model import Endpoint, Forward, check_unicast
from natctl.sync import Reconciler
from natctl.views import ForwardView


class Forwards:
    def __init__(self, rec: Reconciler) -> None:
        self.rec = rec

    def add(self, port: int, target: Endpoint, proto: str = "tcp", ttl: int | None = None,
            owner: str = "", apply: bool = True) -> Forward:
        settings = self.rec.settings
        if port in settings.ports or port == settings.registration_port:
            raise Conflict(f"port {port} is reserved for natctl's relay ports ({settings.ports}) "
                           f"or registration ({settings.registration_port})", "pick a port outside them")
        # A forward to the relay itself would loop back into natctl's own table.
        check_unicast(target.ip, "forward target", self.rec.relay_ip)
        fwd = Forward(port, target, proto, ttl, self.rec.clock(), True, owner)
        with self.rec.change(self.rec.forward_scope(port), apply) as txn:
            if txn.store.forward(port) is not None:
                raise Conflict(f"public port {port} is already forwarded",
                               f"remove it first: natctl forward remove {port}")
            txn.store.add_forward(fwd)
        return fwd

    def remove(self, port: int, apply: bool = True) -> Forward:
        with self.rec.change(self.rec.forward_scope(port), apply) as txn:
            fwd = txn.store.forward(port)
            if fwd is None:
                raise NotFound(f"no forward on port {port}", "see 'natctl forward list'")
            txn.store.remove_forward(port)
        return fwd

    def listing(self, counters: bool = False) -> list[ForwardView]:
        installed = self.rec.kernel.read() if counters else None
        out = []
        for f in self.rec.store.forwards():
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
