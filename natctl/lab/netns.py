"""Small tools for network namespaces: run a command in one, or open a socket in one."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from natctl.errors import NatctlError

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def need(*programs: str) -> None:
    missing = [p for p in programs if shutil.which(p) is None]
    if missing:
        raise NatctlError(f"missing program(s): {', '.join(missing)}", "run 'make setup' to install them")


def natctl_argv(state: str, *args: str, ns: str | None = None, relay_ip: str | None = None,
                python: Sequence[str] = (sys.executable,)) -> list[str]:
    """The command line that runs natctl's CLI (inside ``ns``) on its own store.

    The one way labs, the demo, the tests and the bench start natctl: as a user
    on the relay would, a new process each time.
    """
    argv = [*python, "-m", "natctl", "--state", state]
    if relay_ip:
        argv += ["--relay-ip", relay_ip]
    return (["ip", "netns", "exec", ns] if ns else []) + argv + list(args)


def run(argv: Sequence[str], ns: str | None = None, check: bool = True, input: str | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command (inside ``ns`` if given) and capture its output."""
    full = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    proc = subprocess.run(full, input=input, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise NatctlError(f"command failed ({proc.returncode}): {' '.join(full)}: {proc.stderr.strip()}")
    return proc


def spawn(argv: Sequence[str], ns: str | None = None, **kw: object) -> subprocess.Popen:
    """Start a background process (inside ``ns``) in its own process group."""
    full = (["ip", "netns", "exec", ns] if ns else []) + list(argv)
    return subprocess.Popen(full, start_new_session=True, **kw)  # type: ignore[call-overload]


def stop(proc: subprocess.Popen, timeout: float = 3.0) -> None:
    """Stop a process group: TERM, then KILL if it lingers."""
    if proc.poll() is not None:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout)
            return
        except subprocess.TimeoutExpired:
            continue


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def entered(ns: str) -> Iterator[None]:
    """Run the block with this thread inside namespace ``ns``.

    Sockets opened inside keep living in ``ns`` after the block, so a test can
    hold sockets of several namespaces at once.
    """
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)


def exists(ns: str) -> bool:
    return os.path.exists(f"/run/netns/{ns}")


def delete(ns: str) -> None:
    """Kill what runs in ``ns`` and delete it (its links go with it)."""
    if not exists(ns):
        return
    pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    run(["ip", "netns", "del", ns], check=False)
