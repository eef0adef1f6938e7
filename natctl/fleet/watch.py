"""A relay daemon's part in the fleet: its heartbeat, its outbox, and the other relays' heartbeats.

- LISTEN/NOTIFY wakes it as soon as another relay (or an operator's command) leaves a change in
  its outbox; every ``heartbeat`` seconds it also looks by itself (a lost notification waits no
  longer than that). The daemon's own full reconcile (every 10 minutes) repairs any other drift.
  No full reconcile here: it would hold the fleet's one write lock for as long as it reads the kernel.
- A relay is declared dead when this daemon has itself watched its heartbeat stand still for
  ``dead_after`` seconds of its own monotonic clock while the database answered. So relays whose
  clocks disagree, and a database that was down for everyone (every heartbeat stale when it comes
  back), never make a live relay look dead.
- The database unreachable: forwarding goes on untouched (the kernel has what it has); this says
  so once, and picks up where it was when the database is back.
- The kernel's lease (natctl.fleet.fence) is renewed at every heartbeat, before and whatever the
  database says, and lapses ``heartbeat`` seconds before the others could declare this relay dead:
  a daemon that died leaves a kernel that stops forwarding before its lobbies move.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from natctl.daemon.log import log
from natctl.db import StoreUnreachable
from natctl.errors import KernelError, NatctlError
from natctl.fleet import fence
from natctl.fleet.fence import Fence, Keeper, lease_ttl
from natctl.fleet.model import DEAD
from natctl.fleet.rows import CHANNEL
from natctl.fleet.service import Fleet

if TYPE_CHECKING:
    from natctl.daemon.server import Daemon


class Watch:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.svc = daemon.svc
        self.fleet = Fleet(self.svc.rec)
        self.settings = self.svc.settings.fleet
        self.me = self.svc.store.relay or ""
        self.seen: dict[str, tuple[float, float]] = {}  # relay -> (its heartbeat, when we saw it change)
        self.wake = asyncio.Event()
        self.listener: Any = None
        self._fd = -1
        self.down_since: float | None = None
        self.failovers = 0
        self.ttl = lease_ttl(self.settings.heartbeat, self.settings.dead_after)
        self.fence: Fence | None = None
        if self.ttl is not None:
            self.fence = fence.of(self.svc)
        else:
            fence.clear_stale(self.svc)
            log("fence_off", heartbeat=self.settings.heartbeat, dead_after=self.settings.dead_after,
                note="dead_after must exceed twice the heartbeat for the kernel's lease")

    async def run(self, stop: asyncio.Event) -> None:
        keeper: Keeper | None = None
        try:
            next_beat = time.monotonic()
            while not stop.is_set():
                self._listen()
                try:
                    await asyncio.wait_for(self.wake.wait(), max(0.0, next_beat - time.monotonic()))
                except TimeoutError:
                    pass
                self.wake.clear()
                beat = time.monotonic() >= next_beat  # woken by a NOTIFY: apply it now, beat on schedule
                if beat:
                    next_beat = time.monotonic() + self.settings.heartbeat
                    if keeper is not None:
                        self._renew()  # before the heartbeat the others see: the lease ends before they act
                self.tick(beat)
                if keeper is None and self.fence is not None and self.ttl is not None:
                    # The first lease only after the first tick: a relay restarting after its death keeps its
                    # old flows fenced until its outbox has removed what moved away.
                    self._renew()
                    keeper = Keeper(self.fence, self.ttl, self.settings.heartbeat, self._fence_failed)
                    keeper.start()
        finally:
            if keeper is not None:
                keeper.stop()
            self._unlisten()
            if self.fence is not None:
                self._release(stop.is_set())

    def _renew(self) -> None:
        assert self.fence is not None and self.ttl is not None
        try:
            self.fence.refresh(self.ttl)
        except KernelError as err:
            self._fence_failed(err)

    def _fence_failed(self, err: Exception) -> None:
        log("fence_failed", error=str(err), note="the lease runs out unless a renewal passes in time")

    def _release(self, clean: bool) -> None:
        """A clean stop (SIGTERM) takes the fence away: the mappings stay in the kernel and keep forwarding, as
        on a single relay, so a planned restart or upgrade never cuts players (the restarted daemon renews the
        lease; a long stop is the operator's to drain first). Anything else (the Watch failed) leaves the
        lease to run out: this relay no longer beats, so the others will move its lobbies."""
        assert self.fence is not None
        if not clean:
            log("fence_left", note="the watch stopped without a signal: the kernel's lease runs out")
            return
        try:
            self.fence.remove()
        except KernelError as err:
            log("fence_failed", error=str(err), note="the lease runs out and the relay stops forwarding")

    def tick(self, beat: bool = True) -> None:
        svc = self.svc
        try:
            if beat:
                self.fleet.beat()
            result = svc.rec.drain()
            if result.added or result.deleted:
                log("fleet_applied", added=result.added, deleted=result.deleted)
            if beat:
                self._watch()
            self.daemon.refresh_host_ports()
        except StoreUnreachable as err:
            self.seen.clear()  # what we watched is void: we were not watching meanwhile
            if self.down_since is None:
                self.down_since = time.monotonic()
                log("store_unreachable", error=err.message, note="forwarding goes on; changes wait for the database")
            return
        except NatctlError as err:
            log("fleet_failed", error=str(err))
            return
        if self.down_since is not None:
            log("store_back", seconds=round(time.monotonic() - self.down_since, 1),
                admitted=self.daemon.admit_waiting())
            self.down_since = None
        elif self.daemon.waiting:
            self.daemon.admit_waiting()

    def _watch(self) -> None:
        """Declare dead the relays whose heartbeat stood still while we watched, and move their lobbies."""
        now = time.monotonic()
        silent = []
        for r in self.fleet.relays():
            if r.name == self.me:
                continue
            if r.state == DEAD:
                if r.lobbies:  # dead, lobbies still there (no relay could take them then): try again
                    silent.append(r.name)
                self.seen.pop(r.name, None)
                continue
            seen = self.seen.get(r.name)
            if seen is None or seen[0] != r.heartbeat:
                self.seen[r.name] = (r.heartbeat, now)
            elif now - seen[1] >= self.settings.dead_after:
                silent.append(r.name)
        if not silent:
            return
        start = time.monotonic()
        moved = self.fleet.failover(silent)
        self.failovers += 1
        for name in silent:
            self.seen.pop(name, None)
        log("relay_dead", relays=silent, moved=len(moved), ms=round((time.monotonic() - start) * 1000, 1),
            lobbies={m.lobby: m.target for m in moved})

    # --- LISTEN on a connection of its own, read by the event loop

    def _listen(self) -> None:
        if self.listener is not None:
            return
        try:
            import psycopg

            conn = psycopg.connect(self.svc.settings.store, autocommit=True, connect_timeout=2)
            conn.execute(f"LISTEN {CHANNEL}")
        except Exception:  # noqa: BLE001  the database is down: tick() says so; try again next time
            return
        self.listener, self._fd = conn, conn.fileno()
        asyncio.get_running_loop().add_reader(self._fd, self._readable)
        self.wake.set()  # changes may have waited while nobody listened

    def _readable(self) -> None:
        conn = self.listener
        try:
            conn.pgconn.consume_input()
            while (note := conn.pgconn.notifies()) is not None:
                if note.extra.decode() == self.me:
                    self.wake.set()
        except Exception:  # noqa: BLE001  the connection died with the server: listen again when it is back
            self._unlisten()

    def _unlisten(self) -> None:
        conn, self.listener = self.listener, None
        if conn is None:
            return
        try:
            asyncio.get_running_loop().remove_reader(self._fd)
        except (RuntimeError, ValueError, OSError):
            pass
        try:
            conn.close()
        except Exception:  # noqa: BLE001
            pass
