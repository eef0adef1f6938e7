"""Static forwards (public port -> address:port), for a session or forever.

Game masters' sessions are forwards too (owner "gm:NAME"), so this is the one
way forwards are made, listed and removed.
"""

from __future__ import annotations

from dataclasses import replace

from natctl import plan as planner
from natctl.errors import Conflict, NotFound
from natctl.lobbies import read_kernel
from natctl.model import Endpoint, Forward, Snapshot, check_unicast
from natctl.sync import Reconciler
from natctl.views import ForwardView, unknown


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
        """Every forward; with ``counters``, whether the kernel holds it and what it carried.

        The one listing ``forward list`` and ``status`` share: one read of the kernel for all
        rows. Without ``counters``, or when the kernel cannot be read, the kernel's fields are None.
        """
        rec = self.rec
        installed = read_kernel(rec) if counters else None
        out = []
        for f in rec.store.forwards():
            view = ForwardView(f.port, f.proto, str(f.target), f.ttl, f.created,
                               f.created + f.ttl if f.ttl else None, f.owner)
            if installed is None:
                out.append(unknown(view))
                continue
            packets = bytes_ = 0
            for proto in f.protos:
                p, b = installed.counters.get((planner.FWDACCT, (f.target.ip, proto, f.target.port)), (0, 0))
                packets, bytes_ = packets + p, bytes_ + b
            # Installed: natctl's table (with its chains) holds every element this forward plans.
            want = planner.plan(Snapshot(rec.relay_ip, forwards=(f,)), None, rec.kernel.owns)
            ok = installed.table_ok and want <= installed.elements
            out.append(replace(view, installed=ok, packets=packets, bytes=bytes_))
        return out
