"""natctl join on loopback: TCP and UDP relayed both ways, counters, errors, and a clean exit.

No root needed: the player's side must work without admin rights.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import socket
import subprocess
import time

import pytest

from natctl.errors import NatctlError, UsageError
from natctl.join import Joiner, parse_hostport
from support.unprivileged import NOBODY, python


async def banner_echo_server(banner: bytes) -> asyncio.Server:
    """A stand-in for the GM's game: a banner, then everything echoed."""
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(banner)
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


class UdpEcho(asyncio.DatagramProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.transport.sendto(b"echo:" + data, addr)  # type: ignore[attr-defined]


async def started(joiner: Joiner) -> asyncio.Task:
    task = asyncio.create_task(joiner.main())
    await asyncio.wait_for(joiner.ready.wait(), 5)
    return task


async def stop(task: asyncio.Task) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_parse_hostport() -> None:
    assert parse_hostport("relay.example.org:1803") == ("relay.example.org", 1803)
    assert parse_hostport("198.18.0.1:1802") == ("198.18.0.1", 1802)
    for bad in ("relay", ":1802", "relay:0", "relay:x"):
        with pytest.raises(UsageError):
            parse_hostport(bad)


def test_tcp_two_connections_at_once_both_ways() -> None:
    async def scenario() -> None:
        server = await banner_echo_server(b"GM gm1 here\n")
        out = io.StringIO()
        joiner = Joiner(("127.0.0.1", server.sockets[0].getsockname()[1]), ("127.0.0.1", 0), ("tcp",), out, 0.05)
        task = await started(joiner)
        blob = os.urandom(300_000)
        conns = [await asyncio.open_connection(*joiner.local) for _ in range(2)]
        for reader, _ in conns:
            assert await asyncio.wait_for(reader.readline(), 3) == b"GM gm1 here\n"
        assert joiner.stats.open == 2
        for reader, writer in conns:
            writer.write(blob)
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(), 5) == blob
            writer.close()
        for _ in range(100):  # bounded: both relayed connections close after the echo
            if joiner.stats.open == 0:
                break
            await asyncio.sleep(0.02)
        assert (joiner.stats.open, joiner.stats.total) == (0, 2)
        assert joiner.stats.sent == 2 * len(blob) and joiner.stats.received == 2 * (len(blob) + 12)
        await stop(task)
        server.close()
        text = out.getvalue()
        assert "tcp #1 open" in text and "tcp #2 closed" in text and "sent" in text

    asyncio.run(scenario())


def test_udp_each_game_socket_gets_its_own_replies() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        echo, _ = await loop.create_datagram_endpoint(UdpEcho, local_addr=("127.0.0.1", 0))
        joiner = Joiner(("127.0.0.1", echo.get_extra_info("sockname")[1]), ("127.0.0.1", 0), ("udp", "tcp"),
                        io.StringIO(), 0.05)
        task = await started(joiner)
        socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
        for i, s in enumerate(socks):
            s.setblocking(False)
            s.sendto(b"hello %d" % i, joiner.local)
        for i, s in enumerate(socks):
            data = await asyncio.wait_for(loop.sock_recv(s, 2048), 3)
            assert data == b"echo:hello %d" % i
            s.close()
        assert joiner.stats.udp_peers == 2
        await stop(task)
        echo.close()

    asyncio.run(scenario())


def test_unreachable_relay_is_reported_and_the_game_is_hung_up_on() -> None:
    async def scenario() -> None:
        with socket.socket() as probe:  # a port where nothing listens
            probe.bind(("127.0.0.1", 0))
            dead = probe.getsockname()[1]
        out = io.StringIO()
        joiner = Joiner(("127.0.0.1", dead), ("127.0.0.1", 0), ("tcp",), out, 0.05)
        task = await started(joiner)
        reader, writer = await asyncio.open_connection(*joiner.local)
        assert await asyncio.wait_for(reader.read(), 3) == b""
        writer.close()
        await stop(task)
        assert "refused" in out.getvalue() and "session open" in out.getvalue()

    asyncio.run(scenario())


def test_a_taken_local_port_is_a_one_line_error() -> None:
    async def scenario() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            joiner = Joiner(("127.0.0.1", 9), taken.getsockname(), ("tcp",), io.StringIO())
            with pytest.raises(NatctlError, match="cannot listen"):
                await joiner.main()

    asyncio.run(scenario())


@pytest.mark.parametrize("command", [["-m", "natctl", "join"], ["-S", "-m", "natctl.join"]],
                         ids=["natctl-join", "stdlib-only"])
def test_the_command_stops_on_ctrl_c_and_leaves_nothing(tmp_path, command) -> None:
    """As a player runs it: a process, no privileges, no files; Ctrl-C ends it and frees the port.
    ``-S`` (no site-packages) shows that a copy of the source is enough: no dependency is needed."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    interpreter, extra = python()  # one that uid 65534 can run, wherever the checkout is
    argv = [*interpreter, *command, "127.0.0.1:9", "--local", f"127.0.0.1:{port}"]
    if os.geteuid() == 0:  # prove it needs no admin rights
        argv = [*NOBODY, *argv]
    work = tmp_path / "cwd"
    work.mkdir()
    work.chmod(0o777)
    env = {"PATH": os.environ["PATH"], "HOME": str(work), "PYTHONPATH": os.path.dirname(os.path.dirname(
        os.path.dirname(os.path.abspath(__file__)))), "PYTHONDONTWRITEBYTECODE": "1", **dict(extra)}
    proc = subprocess.Popen(argv, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # bounded: wait until it listens
            with socket.socket() as c:
                if c.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        else:
            pytest.fail("natctl join did not start listening")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped:" in out and err == ""
    assert list(work.iterdir()) == []
    with socket.socket() as again:  # the port is free again
        again.bind(("127.0.0.1", port))
