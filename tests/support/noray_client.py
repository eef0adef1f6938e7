"""A noray client written from noray's protocol (as netfox's Noray for Godot speaks it): TCP lines to
the control port, the pid as a datagram from the game socket to the registrar port until ``OK``."""

from __future__ import annotations

import socket
import time


class NorayPeer:
    def __init__(self, tcp: socket.socket, relay_ip: str, registrar_port: int = 8809) -> None:
        self.tcp, self.relay_ip, self.registrar_port = tcp, relay_ip, registrar_port
        self.buffer = b""
        self.oid = self.pid = ""

    def send(self, line: str) -> None:
        self.tcp.sendall(line.encode() + b"\n")

    def lines(self, seconds: float = 1.0, want: int = 1) -> list[str]:
        """Lines received within ``seconds`` (returns early once ``want`` lines are there)."""
        out: list[str] = []
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            while b"\n" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\n", 1)
                out.append(raw.decode())
            if len(out) >= want:
                break
            self.tcp.settimeout(left)
            try:
                data = self.tcp.recv(4096)
            except TimeoutError:
                break
            if not data:
                break
            self.buffer += data
        return out

    def register_host(self) -> tuple[str, str]:
        self.send("register-host")
        got = dict(line.split(" ", 1) for line in self.lines(2.0, want=2))
        self.oid, self.pid = got["set-oid"], got["set-pid"]
        return self.oid, self.pid

    def register_remote(self, udp: socket.socket, tries: int = 40) -> bool:
        """Send the pid from the game socket until the registrar answers OK (netfox: every 0.1 s, 8 s)."""
        udp.settimeout(0.1)
        for _ in range(tries):
            udp.sendto(self.pid.encode(), (self.relay_ip, self.registrar_port))
            try:
                data, src = udp.recvfrom(64)
            except TimeoutError:
                continue
            if src == (self.relay_ip, self.registrar_port):
                return data == b"OK"
        return False

    def connect_relay(self, oid: str) -> None:
        self.send(f"connect-relay {oid}")

    def expect(self, command: str, seconds: float = 2.0) -> str | None:
        """The data of the next line of ``command`` within ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            for line in self.lines(left):
                cmd, _, data = line.partition(" ")
                if cmd == command:
                    return data
        return None
