"""Real sockets in lab namespaces: send, receive, and check payloads byte for byte."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from typing import Protocol

from natctl.lab.netns import entered


def udp_socket(ns: str, ip: str = "0.0.0.0", port: int = 0) -> socket.socket:
    """A UDP socket bound inside ``ns`` (it stays there after this returns)."""
    with entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((ip, port))
    s.settimeout(2.0)
    return s


def tcp_connect(ns: str, addr: tuple[str, int], timeout: float = 3.0) -> socket.socket:
    with entered(ns):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(addr)
    return s


class Datagrams(Protocol):
    """A UDP socket, or what stands in for one (natctl.lab.gamehost.GameHost)."""

    def sendto(self, data: bytes, addr: tuple[str, int], /) -> int: ...

    def recvfrom(self, size: int, /) -> tuple[bytes, tuple[str, int]]: ...

    def settimeout(self, seconds: float | None, /) -> None: ...


def payload(size: int) -> bytes:
    return os.urandom(size)


@dataclass
class Delivery:
    sender: str
    receiver: str
    sent_to: tuple[str, int]
    seen_from: tuple[str, int] | None
    size: int
    intact: bool


def send_and_receive(sender: Datagrams, receiver: Datagrams, to: tuple[str, int], data: bytes,
                     sender_name: str = "", receiver_name: str = "", timeout: float = 2.0) -> Delivery:
    """Send one datagram and wait for it; ``seen_from`` is None if it never arrived."""
    receiver.settimeout(timeout)
    sender.sendto(data, to)
    try:
        got, src = receiver.recvfrom(65535)
    except TimeoutError:
        return Delivery(sender_name, receiver_name, to, None, len(data), False)
    return Delivery(sender_name, receiver_name, to, src, len(data), got == data)


def collect(sock: Datagrams, count: int, seconds: float = 3.0) -> list[tuple[bytes, tuple[str, int]]]:
    """Receive up to ``count`` datagrams within ``seconds``."""
    got: list[tuple[bytes, tuple[str, int]]] = []
    deadline = time.monotonic() + seconds
    while len(got) < count and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recvfrom(65535))
        except (TimeoutError, OSError):
            break
    return got


def drain(sock: socket.socket) -> list[tuple[bytes, tuple[str, int]]]:
    """Everything already queued on a socket, without waiting."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recvfrom(65535))
    except (BlockingIOError, OSError):
        pass
    finally:
        sock.setblocking(True)
    return out
