"""The daemon: registration port, one socket per host relay port, periodic cleanup.

Packets from senders the kernel already maps never reach it; only a host's
registration and a client's first packets do. SIGTERM stops it without
touching the kernel: traffic keeps flowing, and the next start reconciles.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from natctl.admission import NotAllowed
from natctl.config import Settings
from natctl.daemon import metrics
from natctl.daemon.listeners import HostPort, Registrar, _deep_queue
from natctl.daemon.log import Repeats, log
from natctl.daemon.punch import Punches
from natctl.db import StoreUnreachable
from natctl.errors import Busy, NatctlError, NotFound
from natctl.model import Endpoint
from natctl.preflight import local_or_any as _local_or_any
from natctl.registrar import Admission
from natctl.service import Service

SO_MARK = getattr(socket, "SO_MARK", 36)
REFRESH_SECONDS = 1.0  # how soon a lobby made with the CLI gets its listener
VERIFY_SECONDS = 600.0  # how often the whole kernel state is read back and compared with the store
WAITING_MAX = 1024  # first packets kept while a fleet's store is unreachable


def lock(state: str) -> int:
    """Hold an exclusive lock beside the store for as long as the daemon runs."""
    path = state + ".serve.lock"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise Busy(f"another natctl serve is running on this store (pid {pid})",
                   "stop it first (systemctl stop natctl), or pass another --state") from None
    os.ftruncate(fd, 0)
    os.write(fd, str(os.getpid()).encode())
    return fd


# Sends a client's packet to the host (client port, host "ip:port", payload); see Daemon.deliver.
Sender = Callable[[int, str, bytes], None]


class Daemon:
    def __init__(self, svc: Service, worker: Callable[[], Service] | None = None,
                 send: Sender | None = None) -> None:
        """``worker`` makes the cleanup thread's own Service (its own store connection);
        ``send`` replaces the kernel-marked delivery socket (unit tests run without root)."""
        self.svc = svc
        self._make_worker = worker or (lambda: Service(svc.settings))
        self._send = send or self._send_marked
        self.loop = asyncio.get_running_loop()
        self.bind_ip = "0.0.0.0"  # set by run(): the relay IP when it is local
        self.repeats = Repeats()  # what strangers can cause at will is logged once per interval, then counted
        self.host_ports: dict[int, asyncio.BaseTransport] = {}
        # Cleanup runs in its own thread with its own store connection, so a
        # long sync never stalls admissions; SQLite serializes the writers.
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="natctl-cleanup")
        self._worker_svc: Service | None = None
        self._opening: set[int] = set()
        self._next_verify = time.monotonic() + VERIFY_SECONDS
        self.registration: asyncio.DatagramTransport | None = None
        # Datagrams on the registration port that other protocols take first: each returns True
        # if the datagram was its own (answered or dropped), False to pass it on.
        self.handlers: list[Callable[[bytes, tuple[str, int], asyncio.DatagramTransport], bool]] = []
        from natctl.lan.handler import lan_handler

        self.handlers.append(lan_handler(self))  # LAN joins (natctl.lan); their cleanup is natctl.expiry's
        self.punches = Punches(self)
        self.watch: object | None = None  # natctl.fleet.watch.Watch, on a fleet's relay
        # While a fleet's store is unreachable: first packets of new senders, and the last registration
        # reply of each known host (its keepalives are still answered, so it does not leave a live relay).
        self.waiting: dict[tuple[int, tuple[str, int]], bytes] = {}
        self.replies: dict[tuple[str, tuple[str, int]], bytes] = {}

    def refresh_host_ports(self) -> None:
        """Listen on exactly the host relay ports of open lobbies."""
        wanted = set(self.svc.host_ports())
        for port in set(self.host_ports) - wanted:
            self.host_ports.pop(port).close()
        for port in wanted - set(self.host_ports) - self._opening:
            self._opening.add(port)
            self.loop.create_task(self._open(port))

    async def _open(self, port: int) -> None:
        try:
            transport, _ = await self.loop.create_datagram_endpoint(lambda: HostPort(self, port),
                                                                    local_addr=(self.bind_ip, port))
            _deep_queue(transport)
            self.host_ports[port] = transport
        except OSError as err:
            log("listen_failed", port=port, error=str(err))
        finally:
            self._opening.discard(port)

    def admit(self, host_port: int, data: bytes, addr: tuple[str, int], port: HostPort | None = None) -> None:
        """Admit a sender on its first packet and deliver that packet (and any queued after it).

        ``port`` (its listener) refuses first from what the port admits, at no store cost, and
        collects the refused senders to block them with its batch; without it each is blocked now."""
        start = time.perf_counter()
        sender = Endpoint(addr[0], addr[1])
        try:
            refusal = port.refusal(sender, time.monotonic()) if port is not None else None
            if refusal is not None:
                raise refusal
            admitted = self.svc.admit_client(host_port, sender)
        except NotAllowed as err:
            (port.REFUSED if port is not None else metrics.REJECTIONS.labels("not_allowed")).inc()
            self.repeats.note(time.monotonic(), "rejected", source=f"{addr[0]}:{addr[1]}", host_port=host_port,
                              reason=err.message)
            if port is not None:
                port.blocks.append((addr[0], host_port))
            else:
                self._block(addr[0], host_port)
            return
        except NotFound:
            metrics.REJECTIONS.labels("no_lobby").inc()
            return
        except StoreUnreachable:  # a fleet's database is down: admitted when it is back (Watch.tick)
            self.wait(host_port, data, addr)
            return
        except NatctlError as err:  # e.g. the kernel refused, or another store owns it: once per interval, counted
            metrics.SYNC_FAILURES.inc()
            self.repeats.note(time.monotonic(), "admission_failed", source=f"{addr[0]}:{addr[1]}", error=str(err))
            return
        if port is not None:
            port.admitted()
        took = time.perf_counter() - start
        metrics.SYNC_SECONDS.observe(took)
        m = admitted.mapping
        if admitted.pending:  # its host opens its NAT first (registration v2): hold the packet until then
            self.punches.hold(admitted, data)
        else:
            self.deliver(m.client_port, m.host, data)
        if admitted.new:  # a new client, not a packet queued behind its admission
            metrics.ADMISSIONS.inc()
            log("admitted", lobby=m.lobby, client=m.client, client_port=m.client_port, host_port=host_port,
                ms=round(took * 1000, 2), waits_for_host=admitted.pending or None)

    def wait(self, host_port: int, data: bytes, addr: tuple[str, int]) -> None:
        """Keep a first packet (one per sender, a bounded number) until the store can admit its sender."""
        key = (host_port, addr)
        if key not in self.waiting and len(self.waiting) < WAITING_MAX:
            self.waiting[key] = data
            self.repeats.note(time.monotonic(), "admission_waits", source=f"{addr[0]}:{addr[1]}",
                              note="the store is unreachable; admitted when it is back")

    def admit_waiting(self) -> int:
        """Admit the senders that came while the store was unreachable (their first packets delivered)."""
        waiting, self.waiting = self.waiting, {}
        for (host_port, addr), data in waiting.items():
            self.admit(host_port, data, addr)
        return len(waiting) - len(self.waiting)

    def settle(self, client_id: int, seen: Endpoint | None) -> Admission | None:
        """Install a held client (see natctl.daemon.punch); errors are logged, never raised into the loop."""
        try:
            return self.svc.settle_client(client_id, seen)
        except NotFound:
            return None  # it left, or its lobby closed, while its host was opening
        except NatctlError as err:
            metrics.SYNC_FAILURES.inc()
            log("settle_failed", error=str(err))
            return None

    def send_open(self, data: bytes, host: Endpoint) -> None:
        """An OPEN leaves from the registration port, the one the host's NAT already lets answers in from."""
        if self.registration is not None:
            self.registration.sendto(data, (host.ip, host.port))

    def deliver(self, client_port: int, host: str, data: bytes) -> None:
        """Hand a client's first packet to the host, as the kernel will hand the next ones."""
        self._send(client_port, host, data)
        metrics.DELIVERED.inc()

    def _send_marked(self, client_port: int, host: str, data: bytes) -> None:
        """From relay:client_port, outside conntrack (the kernel's delivery mark), so the
        client's own flow still finds its tuple free."""
        ip, _, port = host.rpartition(":")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, self.svc.kernel.delivery_mark)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((self.svc.relay_ip, client_port))
            s.sendto(data, (ip, int(port)))

    def _block(self, ip: str, host_port: int) -> None:
        try:
            self.svc.block(ip, host_port)
        except NatctlError as err:
            log("block_failed", source=ip, error=str(err))

    def _cleanup(self) -> dict:
        """Scoped cleanup every interval; now and then a full reconcile, which repairs any drift."""
        if self._worker_svc is None:
            self._worker_svc = self._make_worker()
        gone = self._worker_svc.cleanup()
        if time.monotonic() >= self._next_verify:
            self._next_verify = time.monotonic() + VERIFY_SECONDS
            result = self._worker_svc.apply()
            if result.changed:
                log("reconciled", added=result.added, deleted=result.deleted, note="the kernel had drifted")
        return gone

    async def run(self, stop: asyncio.Event) -> None:
        settings = self.svc.settings
        self.bind_ip = _local_or_any(self.svc.relay_ip)
        if self.bind_ip != self.svc.relay_ip:
            log("listening_on_any", relay_ip=self.svc.relay_ip,
                note="the relay IP is not an address of this machine: replies leave from the route's address")
        reg, _ = await self.loop.create_datagram_endpoint(lambda: Registrar(self),
                                                          local_addr=(self.bind_ip, settings.registration_port))
        _deep_queue(reg)
        self.registration = reg
        noray = None
        if settings.noray:  # noray's protocol too (natctl.noray): its pids share the registration port
            from natctl.noray.server import NorayServer

            noray = NorayServer(self, settings.noray_allow)
            await noray.start(self.bind_ip, settings.noray_port)
            self.handlers.append(noray.datagram)
        self.refresh_host_ports()
        from natctl.daemon import control  # the local control API: a Unix socket beside the store

        ctl = await control.start(self)
        fleet = None
        if self.svc.store.fleet:  # a relay of a fleet: heartbeat, outbox, the others' heartbeats (natctl.fleet)
            from natctl.fleet.watch import Watch

            self.watch = Watch(self)
            fleet = self.loop.create_task(self.watch.run(stop))
        else:  # natctl.fleet.fence: a lease a fleet member's crash left here would drop every relay port
            from natctl.fleet.fence import clear_stale

            clear_stale(self.svc)
        next_cleanup = time.monotonic() + settings.cleanup_interval
        try:
            while not stop.is_set():
                try:
                    await asyncio.wait_for(stop.wait(), REFRESH_SECONDS)
                except TimeoutError:
                    pass
                try:
                    self.refresh_host_ports()
                    metrics.MAPPINGS.set(self.svc.store.count_clients())
                except NatctlError:  # the database is unreachable (a fleet's): the watch says so
                    pass
                self.repeats.flush(time.monotonic())
                if time.monotonic() >= next_cleanup:
                    next_cleanup = time.monotonic() + settings.cleanup_interval
                    try:
                        gone = await self.loop.run_in_executor(self.worker, self._cleanup)
                    except NatctlError as err:
                        metrics.SYNC_FAILURES.inc()
                        log("cleanup_failed", error=str(err))
                        continue
                    for kind, items in gone.items():
                        metrics.EXPIRED.labels(kind).inc(len(items))
                    if any(gone.values()):
                        log("cleanup", **gone)
        finally:
            self.repeats.flush(time.monotonic(), force=True)
            if fleet is not None:
                await fleet
            self.punches.close()
            if noray is not None:
                noray.close()
            reg.close()
            for t in self.host_ports.values():
                t.close()
            ctl.close()
            self.worker.shutdown(wait=True)


def _check_free(ip: str, port: int) -> None:
    """Busy (exit 7) if another socket holds UDP ``ip:port`` (another natctl serve, on another store)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((ip, port))
        except OSError as err:
            raise Busy(f"UDP port {port} on {ip} is taken ({err.strerror}): another natctl serve may be running, "
                       "on another store; nothing was changed",
                       "stop it (systemctl stop natctl), pass its --state, or choose --registration-port") from None


def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT. The kernel keeps every mapping when it stops."""
    fd = lock(settings.state)
    try:
        svc = Service(settings)
        if svc.store.fleet and not svc.store.relay:
            raise NatctlError(f"this machine (relay IP {svc.relay_ip}) has not joined the fleet",
                              "run 'natctl relay join --region NAME' on it first")
        # Refused before anything is changed or bound: a relay range the kernel may hand out, a kernel
        # table that another store owns (unless --adopt), a registration port another process holds.
        svc.rec.check_ports()
        svc.rec.check_owner()
        _check_free(_local_or_any(svc.relay_ip), settings.registration_port)
        svc.rec.check_forwarding()  # a reboot may have turned it off while the kernel's maps came back in sync
        # After a reboot (no table, no tag) rebuild the kernel from the store; after a restart
        # the kernel still carries the store's tag and is trusted (cleanup verifies in full later).
        in_sync = svc.in_sync()
        result = None if in_sync else svc.apply()
        # --adopt took the kernel over (or had nothing to take): the daemon's later changes, its cleanup
        # thread's too, refuse a table another store claims meanwhile instead of taking it back.
        svc.settings = svc.rec.settings = replace(svc.settings, adopt=False)
        log("started", pid=os.getpid(), relay_ip=svc.relay_ip, backend=svc.kernel.name,
            registration_port=settings.registration_port, kernel="in sync" if in_sync else "reconciled",
            added=result.added if result else 0, deleted=result.deleted if result else 0)
        if settings.metrics:
            metrics.serve_metrics(settings.metrics)

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await Daemon(svc).run(stop)

        asyncio.run(main())
        log("stopped", reason="signal", note="mappings stay in the kernel")
        return 0
    finally:
        os.close(fd)
