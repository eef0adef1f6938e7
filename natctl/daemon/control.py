"""The daemon's local control API: a root-only Unix socket, one JSON request per line.

For software that changes lobbies at a high rate (a matchmaker, a game's
backend): the same operations and errors as the CLI, without a process per
change. The socket is ``STATE.sock`` beside the store unless ``control_socket``
says otherwise (``off``: none); mode 0600, and a peer must be root or the
daemon's own user.

A request is a JSON object on one line: ``op``, the fields of that operation
(the CLI's option names, ``-`` written ``_``; values as the CLI takes them,
numbers may be JSON numbers, repeatable options a list), and optionally an
``id`` that the response repeats. Each request gets one line back, in order:

    {"op": "map.add", "lobby": "a", "host": "198.51.100.7:27015", "client": "203.0.113.9:40000", "id": 1}
    {"id": 1, "ok": true, "result": {"client_port": 20001, "host_port": 20000, ...}}
    {"op": "lobby.close", "name": "nope"}
    {"code": 3, "error": "no open lobby named 'nope': see 'natctl lobby list'", "ok": false}

``result`` is what the CLI prints with ``--json``; ``code`` and ``error`` are
its exit code and its one-line message. Operations run one at a time in a
thread of their own with its own Service (SQLite connections belong to their
thread), each a change through the Reconciler as a CLI command would make it,
so the event loop keeps answering registrations and first packets meanwhile.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import stat
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from natctl.daemon.control_client import expectations, socket_path
from natctl.daemon.log import log
from natctl.errors import NatctlError, UsageError
from natctl.model import (
    FORWARD_PROTOS,
    parse_cidr,
    parse_duration,
    parse_endpoint,
    parse_int,
    parse_name,
    parse_port,
    parse_proto,
)
from natctl.views import as_json

if TYPE_CHECKING:
    from natctl.daemon.server import Daemon
    from natctl.service import Service

MAX_LINE = 1 << 20  # bytes in one request
OUTBOX_MAX = 16 << 20  # answers a client has not read yet: beyond this, read no more of its requests for now
REFRESH_AFTER = 0.05  # seconds: a change's new host port gets its listener this soon (batched under load)
ENVELOPE = ("op", "id", "expect")  # fields of every request
__all__ = ["socket_path", "handle", "start", "OPS"]


# --- requests: the same parsing and service calls as the CLI's commands (natctl.cli)


class Args:
    """One request's fields: only the ones its operation knows, each as the CLI would take it."""

    def __init__(self, op: str, req: dict[str, Any], known: Iterable[str]) -> None:
        self.op, self.req = op, req
        unknown = sorted(set(req) - set(known) - set(ENVELOPE))
        if unknown:
            raise UsageError(f"{op} has no field {unknown[0]!r}", f"its fields: {', '.join(known) or 'none'}")

    def text(self, name: str, default: str | None = None, required: bool = False) -> str | None:
        value = self.req.get(name)
        if value is None:
            if required:
                raise UsageError(f"{self.op} needs {name!r}", f"add \"{name}\": ... to the request")
            return default
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise UsageError(f"invalid {name} {value!r}", "give it as text, as on the command line")
        return str(value)

    def texts(self, name: str, required: bool = False) -> list[str]:
        value = self.req.get(name)
        if value is None:
            if required:
                raise UsageError(f"{self.op} needs {name!r}", f"add \"{name}\": [...] to the request")
            return []
        items = value if isinstance(value, list) else [value]
        out = []
        for item in items:
            if isinstance(item, bool) or not isinstance(item, (str, int)):
                raise UsageError(f"invalid {name} {item!r}", "give a text or a list of texts")
            out.append(str(item))
        if required and not out:
            raise UsageError(f"{self.op} needs {name!r}", f"add \"{name}\": [...] to the request")
        return out

    def flag(self, name: str) -> bool:
        value = self.req.get(name, False)
        if not isinstance(value, bool):
            raise UsageError(f"invalid {name} {value!r}", "use true or false")
        return value


def _lobby_create(svc: Service, a: Args) -> Any:
    name = a.text("name", required=True)
    nets = tuple(parse_cidr(x) for x in a.texts("allow"))
    ttl = a.text("ttl")
    seconds = parse_duration(ttl) if ttl else None
    open_ = a.flag("open")
    most = parse_int(a.text("max_clients", "64") or "64", "--max-clients", 1, 65535)
    lobby, token = svc.lobby_create(parse_name(name or "", "lobby name"), nets, seconds, open_, most,
                                    region=a.text("region"), relay=a.text("relay"))
    return {"name": lobby.name, "id": lobby.id, "token": token, "allow": list(nets), "ttl": seconds, "open": open_,
            "relay": lobby.relay}


def _lobby_close(svc: Service, a: Args) -> Any:
    lobby = svc.lobby_close(a.text("name", required=True) or "")
    return {"name": lobby.name, "id": lobby.id}


def _lobby_list(svc: Service, a: Args) -> Any:
    return svc.lobbies(include_closed=a.flag("all"))


def _map_add(svc: Service, a: Args) -> Any:
    lobby = a.text("lobby", required=True) or ""
    host = parse_endpoint(a.text("host", required=True) or "")
    clients = [parse_endpoint(c) for c in a.texts("client", required=True)]
    rows = svc.map_add(lobby, host, clients, parse_proto(a.text("proto", "udp") or "udp"))
    return rows[0] if len(rows) == 1 else rows  # as 'natctl map add --json' prints them


def _map_remove(svc: Service, a: Args) -> Any:
    lobby, client = a.text("lobby", required=True) or "", a.text("client", required=True) or ""
    proto = parse_proto(a.text("proto", "udp") or "udp")
    svc.map_remove(lobby, parse_endpoint(client), proto)
    return {"lobby": lobby, "client": client, "proto": proto}


def _map_list(svc: Service, a: Args) -> Any:
    lobby = a.text("lobby")
    return [m for m in svc.mappings(counters=True) if lobby is None or m.lobby == lobby]


def _forward_add(svc: Service, a: Args) -> Any:
    port = parse_port(a.text("port", required=True) or "")
    to = parse_endpoint(a.text("to", required=True) or "")
    proto = parse_proto(a.text("proto", "tcp") or "tcp", FORWARD_PROTOS)
    ttl = a.text("ttl")
    fwd = svc.forward_add(port, to, proto, parse_duration(ttl) if ttl else None)
    return {"port": fwd.port, "proto": fwd.proto, "to": str(fwd.target), "ttl": fwd.ttl}


def _forward_remove(svc: Service, a: Args) -> Any:
    fwd = svc.forward_remove(parse_port(a.text("port", required=True) or ""))
    return {"port": fwd.port, "proto": fwd.proto, "to": str(fwd.target)}


def _forward_list(svc: Service, a: Args) -> Any:
    return svc.forwards(counters=True)


def _status(svc: Service, a: Args) -> Any:
    from natctl import preflight

    failing = [c.name for c in preflight.evaluate(preflight.gather(svc.settings)) if c.status == "fail"]
    return {"relay_ip": svc.relay_ip, "backend": svc.kernel.name, "lobbies": svc.lobbies(),
            "mappings": svc.mappings(counters=True), "forwards": svc.forwards(counters=True),
            "failing_checks": failing}


def _apply(svc: Service, a: Args) -> Any:
    return svc.apply()


def _cleanup(svc: Service, a: Args) -> Any:
    return svc.cleanup()


@dataclass(frozen=True)
class Op:
    run: Callable[[Service, Args], Any]
    fields: tuple[str, ...]
    changes: bool  # may change what the daemon listens on (a host port comes or goes)


OPS: dict[str, Op] = {
    "lobby.create": Op(_lobby_create, ("name", "allow", "ttl", "open", "max_clients", "region", "relay"), True),
    "lobby.close": Op(_lobby_close, ("name",), True),
    "lobby.list": Op(_lobby_list, ("all",), False),
    "map.add": Op(_map_add, ("lobby", "host", "client", "proto"), True),
    "map.remove": Op(_map_remove, ("lobby", "client", "proto"), True),
    "map.list": Op(_map_list, ("lobby",), False),
    "forward.add": Op(_forward_add, ("port", "to", "proto", "ttl"), True),
    "forward.remove": Op(_forward_remove, ("port",), True),
    "forward.list": Op(_forward_list, (), False),
    "status": Op(_status, (), False),
    "apply": Op(_apply, (), True),
    "cleanup": Op(_cleanup, (), True),
}


def handle(svc: Callable[[], Service], line: bytes | str) -> tuple[dict[str, Any], bool]:
    """One request line -> (its response, whether it changed anything). Never raises a NatctlError.

    ``svc`` gives the Service to use (made on first use, in the caller's thread)."""
    req: Any = None
    try:
        try:
            req = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            raise UsageError("the request is not JSON", 'send one JSON object per line, e.g. {"op": "lobby.list"}') \
                from None
        if not isinstance(req, dict):
            raise UsageError("the request is not a JSON object", 'send one per line, e.g. {"op": "lobby.list"}')
        name = req.get("op")
        op = OPS.get(name) if isinstance(name, str) else None
        if op is None or not isinstance(name, str):
            raise UsageError(f"unknown op {name!r}", "use one of " + ", ".join(OPS))
        service = svc()
        if "expect" in req and req["expect"] != expectations(service.settings):
            # natctl's CLI runs with other settings than this daemon: it makes the change itself.
            return _reply(req, {"ok": False, "code": 1, "mismatch": True,
                                "error": "this daemon runs with other settings (store, relay address, ports)"}), False
        result = op.run(service, Args(name, req, op.fields))
        return _reply(req, {"ok": True, "result": as_json(result)}), op.changes
    except NatctlError as err:
        return _reply(req, {"ok": False, "code": err.exit_code, "error": str(err)}), False


def _reply(req: Any, body: dict[str, Any]) -> dict[str, Any]:
    if isinstance(req, dict) and "id" in req:
        return {"id": req["id"], **body}
    return body


def encode(response: dict[str, Any]) -> bytes:
    return (json.dumps(response, sort_keys=True, default=str) + "\n").encode()


# --- the socket, in the daemon


def listen(path: str) -> socket.socket:
    """A listening socket at ``path``, mode 0600 from the start; a stale one (its daemon is gone) is replaced.

    Raises NatctlError if another process listens there, or if ``path`` is something else."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise NatctlError(f"{path} exists and is not a socket", "remove it, or set control_socket elsewhere")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except OSError:
                os.unlink(path)  # nobody answers: left by a daemon that was killed
            else:
                raise NatctlError(f"another process listens on {path}", "stop it, or set control_socket elsewhere")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)  # no moment at which anyone but the owner could connect
    try:
        sock.bind(path)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    sock.listen(64)
    sock.setblocking(False)
    return sock


def peer_uid(sock: socket.socket) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return int(struct.unpack("3i", creds)[1])


class _Conn:
    """One client: what it sent that is not a whole line yet, and the answers not sent yet."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.inbox, self.outbox = sock, bytearray(), bytearray()


class ControlServer:
    """The control socket of a running Daemon, served by a thread of its own with its own Service: requests
    never wait for the event loop, and the event loop (registrations, first packets) never waits for them."""

    def __init__(self, daemon: Daemon, path: str) -> None:
        self.daemon, self.path = daemon, path
        self._svc: Service | None = None  # the control thread's own (its own store connection)
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, name="natctl-control", daemon=True)
        self._refresh_due = False
        self.requests = 0

    async def start(self) -> None:
        self._listener = listen(self.path)
        self._thread.start()

    def _service(self) -> Service:
        if self._svc is None:
            self._svc = self.daemon._make_worker()
        return self._svc

    def _run(self, line: bytes) -> tuple[bytes, bool]:
        """One request; a failure that is natctl's bug answers, is logged, and starts afresh."""
        try:
            response, changed = handle(self._service, line)
        except Exception as err:  # a bug: say so, keep serving, with a fresh Service
            log("control_failed", error=repr(err))
            self._close_service()
            response, changed = {"ok": False, "code": 1, "error": f"internal error: {err!r}"}, True
        self.requests += 1
        return encode(response), changed

    def _serve(self) -> None:
        assert self._listener is not None
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        conns: dict[socket.socket, _Conn] = {}
        try:
            while True:
                for key, events in sel.select():
                    sock = key.fileobj
                    if sock is self._wake_r:
                        return
                    if sock is self._listener:
                        self._accept(sel, conns)
                    elif not self._serve_one(conns[sock], events):  # type: ignore[index]
                        self._drop(sel, conns, conns[sock])  # type: ignore[index]
                    else:
                        conn = conns[sock]  # type: ignore[index]
                        wanted = selectors.EVENT_READ if len(conn.outbox) < OUTBOX_MAX else 0
                        if conn.outbox:
                            wanted |= selectors.EVENT_WRITE
                        if wanted != key.events:
                            sel.modify(sock, wanted or selectors.EVENT_WRITE)
        finally:
            for conn in list(conns.values()):
                self._drop(sel, conns, conn)
            sel.close()
            self._close_service()

    def _accept(self, sel: selectors.BaseSelector, conns: dict[socket.socket, _Conn]) -> None:
        assert self._listener is not None
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if peer_uid(sock) not in (0, os.geteuid()):
            sock.close()
            return
        sock.setblocking(False)
        conns[sock] = _Conn(sock)
        sel.register(sock, selectors.EVENT_READ)

    def _drop(self, sel: selectors.BaseSelector, conns: dict[socket.socket, _Conn], conn: _Conn) -> None:
        conns.pop(conn.sock, None)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(conn.sock)
        conn.sock.close()

    def _serve_one(self, conn: _Conn, events: int) -> bool:
        """Read what came, answer every whole line, send what the socket takes; False: hang up."""
        if events & selectors.EVENT_READ:
            try:
                data = conn.sock.recv(1 << 16)
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                return False
            if data == b"":  # it is done sending: answer what it asked, then hang up
                if conn.outbox:
                    conn.sock.settimeout(5.0)
                    with contextlib.suppress(OSError):
                        conn.sock.sendall(conn.outbox)
                return False
            if data:
                conn.inbox += data
            changed = False
            while (end := conn.inbox.find(b"\n")) >= 0:
                line = bytes(conn.inbox[:end])
                del conn.inbox[:end + 1]
                if line.strip():
                    out, did = self._run(line)
                    conn.outbox += out
                    changed |= did
            if len(conn.inbox) > MAX_LINE:  # no end in sight: answer once, then hang up
                conn.outbox += encode({"ok": False, "code": 2, "error": f"request longer than {MAX_LINE} bytes"})
                self._send(conn)
                return False
            if changed:
                self._refresh_soon()
        return self._send(conn)

    def _send(self, conn: _Conn) -> bool:
        while conn.outbox:
            try:
                sent = conn.sock.send(conn.outbox)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            del conn.outbox[:sent]
        return True

    def _refresh_soon(self) -> None:
        """Have the event loop listen on a new lobby's host port (and stop on a closed one's) soon; once
        for a burst of changes."""
        if self._refresh_due:
            return
        self._refresh_due = True

        def refresh() -> None:
            self._refresh_due = False  # first: a change from now on asks again
            self.daemon.refresh_host_ports()

        with contextlib.suppress(RuntimeError):  # the loop is closing
            self.daemon.loop.call_soon_threadsafe(self.daemon.loop.call_later, REFRESH_AFTER, refresh)

    def _close_service(self) -> None:
        if self._svc is not None:
            with contextlib.suppress(Exception):
                self._svc.close()
            self._svc = None

    def close(self) -> None:
        """Stop serving (a request under way finishes first) and remove the socket."""
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread.is_alive():
            self._thread.join(30)
        for sock in (self._wake_r, self._wake_w):
            sock.close()
        if self._listener is not None:  # ours: remove it (never one that another process listens on)
            self._listener.close()
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)


class _Off:
    def close(self) -> None:
        pass


async def start(daemon: Daemon) -> ControlServer | _Off:
    """The daemon's control socket, listening; if it is off or cannot be made, the daemon carries on without."""
    path = socket_path(daemon.svc.settings)
    if path is None:
        return _Off()
    server = ControlServer(daemon, path)
    try:
        await server.start()
    except (NatctlError, OSError) as err:
        server.close()
        log("control_unavailable", path=path, error=str(err), note="the daemon runs without its control socket")
        return _Off()
    log("control_listening", path=path)
    return server
