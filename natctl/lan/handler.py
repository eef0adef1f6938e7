"""The daemon's side of joining a LAN: one handler on the registration port (natctl.daemon.server).

It takes the LAN messages (natctl.lan.wire) and leaves every other datagram to the lobbies'
registrar. The daemon's per-source rate limit applies before it. A wrong or expired token gets no
answer (nothing to learn from us); a full LAN or a name in use gets a LAN_ERROR.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from natctl.daemon import metrics
from natctl.daemon.log import log
from natctl.daemon.wire import WireError
from natctl.errors import Exhausted, NatctlError, NotFound, UsageError
from natctl.lan import wire

if TYPE_CHECKING:
    from natctl.daemon.server import Daemon
    from natctl.lan.service import LanService

Handler = Callable[[bytes, tuple[str, int], asyncio.DatagramTransport], bool]


def lan_handler(daemon: Daemon, make: Callable[[], LanService] | None = None) -> Handler:
    """The handler the daemon tries first on every registration datagram (``make``: the LAN service,
    by default over the daemon's own Reconciler)."""
    lans: list[LanService] = []  # made on the first LAN message: nothing to do for relays without LANs

    def service() -> LanService:
        if not lans:
            from natctl.lan.service import LanService

            lans.append(make() if make is not None else LanService(daemon.svc.rec))
        return lans[0]

    def handle(data: bytes, addr: tuple[str, int], transport: asyncio.DatagramTransport) -> bool:
        if not wire.is_lan(data):
            return False
        source = f"{addr[0]}:{addr[1]}"
        try:
            req = wire.decode_join(data)
        except WireError:
            metrics.REGISTRATION_REJECTS.labels("malformed").inc()
            return True
        try:
            joined = service().join(req.token, req.name, req.public_key)
        except NotFound:
            metrics.REGISTRATION_REJECTS.labels("token").inc()
            daemon.repeats.note(time.monotonic(), "lan_join_refused", source=source, reason="unknown token")
            return True
        except NatctlError as err:
            code = wire.ERR_FULL if isinstance(err, Exhausted) else wire.ERR_BAD if isinstance(err, UsageError) \
                else wire.ERR_NAME if type(err).__name__ == "NameTaken" else wire.ERR_SERVER
            metrics.REGISTRATION_REJECTS.labels("conflict").inc()
            daemon.repeats.note(time.monotonic(), "lan_join_refused", source=source, reason=err.message)
            transport.sendto(wire.encode_error(req.nonce, code), addr)
            return True
        except Exception as err:  # noqa: BLE001 - a tool that hung or vanished: logged, never raised into the loop
            metrics.SYNC_FAILURES.inc()
            log("lan_join_failed", source=source, error=repr(err))
            transport.sendto(wire.encode_error(req.nonce, wire.ERR_SERVER), addr)
            return True
        log("lan_joined", lan=joined.lan, member=joined.member, address=joined.address, source=source)
        transport.sendto(wire.encode_joined(req.nonce, joined.address, joined.prefixlen, joined.port, joined.mtu,
                                            joined.server_key, joined.relay_ip), addr)
        return True

    return handle

