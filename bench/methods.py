"""The relays compared, behind one small interface, so that new ones join by adding a class.

Each method relays the same flows in the same lab: a client in the world sends
to relay:P_h and the host sees it as relay:P_c. ``unavailable()`` says why a
method cannot run here (the suite then reports "not available" and no figure);
``prepared()`` is what the lab needs for it; ``start()`` returns the running
relay: where clients send, and which processes are the relay (for CPU time).
"""

from __future__ import annotations

import importlib.util
import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.config import CLIENT_IP, ECHO_PORT, HOST_IP, RELAY_IP, SINK_PORT, USER_HOST_PORTS, child_env
from bench.cpu import group_pids
from bench.lab import BenchLab, napi_thread, wait_bound, write_sys
from bench.tool import BenchError
from natctl.lab.netns import run, spawn, stop
from natctl.model import Endpoint


@dataclass(frozen=True)
class Flow:
    name: str
    client: Endpoint
    host: Endpoint


FLOOD = Flow("flood", Endpoint(CLIENT_IP, 40001), Endpoint(HOST_IP, SINK_PORT))
PROBE = Flow("probe", Endpoint(CLIENT_IP, 40002), Endpoint(HOST_IP, ECHO_PORT))
FLOWS = (FLOOD, PROBE)


@dataclass
class Context:
    tmp: str  # state files and logs go here; the runner removes it
    cgroup: str | None = None  # memory cgroup for natctl's worker (kernel memory of the maps)
    lifetime: float = 600.0  # no relay outlives this, whatever happens to the bench (the tool caps at 600)


@dataclass
class Running:
    targets: dict[str, tuple[str, int]]  # flow name -> where its client sends
    pids: Callable[[], list[int]]  # the relay's processes, now (empty for kernel relays)
    stop: Callable[[], None]
    info: dict[str, Any] = field(default_factory=dict)


class Method:
    name = ""
    label = ""
    in_kernel = False

    def unavailable(self) -> str | None:
        return None

    @contextmanager
    def prepared(self, lab: BenchLab) -> Iterator[None]:
        yield

    def start(self, lab: BenchLab, ctx: Context, mappings: int = 10, incremental: bool = False) -> Running:
        raise NotImplementedError


def _wait_ready(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Wait for the relay's 'ready' line."""
    assert proc.stdout is not None  # started with stdout=PIPE
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"the relay exited with {proc.returncode} before it was ready")
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready and b"ready" in proc.stdout.readline():
            return
    raise BenchError("the relay did not get ready in time")


class AsyncioRelay(Method):
    name, label = "asyncio", "asyncio relay (Python)"

    def start(self, lab: BenchLab, ctx: Context, mappings: int = 10, incremental: bool = False) -> Running:
        argv = [sys.executable, "-m", "bench.relay_asyncio", "--relay-ip", RELAY_IP,
                "--seconds", str(ctx.lifetime)]
        for i, flow in enumerate(FLOWS):
            argv += ["--lobby", f"{USER_HOST_PORTS + i}={flow.host}"]
        with open(os.path.join(ctx.tmp, "asyncio.log"), "ab") as log:
            proc = spawn(lab.on_relay_cpu(argv), ns=lab.relay_ns, stdout=subprocess.PIPE, stderr=log,
                         env=child_env())
        try:
            _wait_ready(proc)
        except BaseException:
            stop(proc)
            raise
        return Running({f.name: (RELAY_IP, USER_HOST_PORTS + i) for i, f in enumerate(FLOWS)},
                       lambda: group_pids(proc.pid), lambda: stop(proc))


class Socat(Method):
    name, label = "socat", "socat (generic forwarder)"

    def unavailable(self) -> str | None:
        return None if shutil.which("socat") else "socat is not installed (make setup installs it)"

    def start(self, lab: BenchLab, ctx: Context, mappings: int = 10, incremental: bool = False) -> Running:
        procs: list[subprocess.Popen] = []
        try:
            # One socat per client: UDP4-LISTEN answers the first peer only, as a port forward does.
            for i, flow in enumerate(FLOWS):
                argv = ["timeout", "-k", "2", str(int(ctx.lifetime)), "socat", "-b", "2048",
                        f"UDP4-LISTEN:{USER_HOST_PORTS + i},bind={RELAY_IP},reuseaddr",
                        f"UDP4:{flow.host},bind={RELAY_IP}:{20000 + i}"]
                procs.append(spawn(lab.on_relay_cpu(argv), ns=lab.relay_ns, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL))
                wait_bound(lab.relay_ns, USER_HOST_PORTS + i)
        except BaseException:
            for p in procs:
                stop(p)
            raise

        def stop_all() -> None:
            for p in procs:
                stop(p)

        return Running({f.name: (RELAY_IP, USER_HOST_PORTS + i) for i, f in enumerate(FLOWS)},
                       lambda: [pid for p in procs for pid in group_pids(p.pid)], stop_all)


def worker(lab: BenchLab, ctx: Context, op: str, *args: str, env: dict[str, str] | None = None,
           timeout: float = 600) -> dict[str, Any]:
    """Run natctl's bench worker (bench/worker.py) against the lab's relay."""
    argv = [sys.executable, "-m", "bench.worker", op, "--ns", lab.relay_ns,
            "--state", os.path.join(ctx.tmp, "natctl.db"), "--relay-ip", RELAY_IP, *args]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=child_env(**(env or {})))
    if proc.returncode != 0:
        raise BenchError(f"natctl worker {op} failed: {proc.stderr.strip()[-400:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class NatctlNft(Method):
    name, label, in_kernel = "nftables", "natctl, nftables", True
    accel = "none"
    env: dict[str, str] = {}

    def unavailable(self) -> str | None:
        if importlib.util.find_spec("nftables") is None:
            return "the nftables Python binding is missing (make setup)"
        return None if shutil.which("nft") else "nft is not installed"

    def start(self, lab: BenchLab, ctx: Context, mappings: int = 10, incremental: bool = False) -> Running:
        state = os.path.join(ctx.tmp, "natctl.db")
        for suffix in ("", "-wal", "-shm"):  # every start is a fresh store
            Path(state + suffix).unlink(missing_ok=True)
        args = ["install", "--mappings", str(mappings), "--accel", self.accel, "--interface", lab.relay_if]
        args += [a for f in FLOWS for a in ("--flow", f"{f.name}={f.client}={f.host}")]
        if ctx.cgroup:
            args += ["--cgroup", ctx.cgroup]
        if incremental:
            args.append("--incremental")
        info = worker(lab, ctx, *args, env=self.env)
        self.check(info)

        def uninstall() -> None:
            worker(lab, ctx, "uninstall", "--accel", self.accel, "--interface", lab.relay_if, env=self.env)
            # Flows of the old table must not outlive it (the next method starts clean).
            run(["conntrack", "-F"], ns=lab.relay_ns, check=False)

        return Running({name: (RELAY_IP, f["host_port"]) for name, f in info["flows"].items()},
                       lambda: [], uninstall, info)

    def check(self, info: dict[str, Any]) -> None:
        if "xdp" in str(info.get("backend")):
            raise BenchError(f"asked for nftables alone, got {info.get('backend')}")


class NatctlXdp(NatctlNft):
    name, label = "xdp", "natctl, XDP + nftables"
    accel = "xdp"
    env = {"NATCTL_XDP_MODE": "native"}  # veth in the lab: the peer runs XDP, so native works

    def unavailable(self) -> str | None:
        reason = super().unavailable()
        if reason:
            return reason
        for module in ("natctl.kernel.accel", "natctl.kernel.xdp", "natctl.lab.xdp"):
            if importlib.util.find_spec(module) is None:
                return f"the XDP accelerator is not in this checkout ({module} is missing)"
        from natctl.kernel import xdp

        if not Path(xdp.OBJECT).exists():
            return f"the XDP program is not built ({xdp.OBJECT}; run make setup)"
        return None

    @contextmanager
    def prepared(self, lab: BenchLab) -> Iterator[None]:
        """The lab's part (natctl.lab.xdp): the peer runs XDP_PASS and computes full checksums.

        The peer's NAPI (XDP gives it one) is threaded and pinned to the load
        CPU, so delivering the relay's output stays off the relay's CPU.
        """
        from natctl.lab import xdp as labxdp

        try:
            labxdp.attach_pass(lab.world_ns, lab.world_if)
            run(["ethtool", "-K", lab.world_if, "tx", "off"], ns=lab.world_ns)
            if lab.napi_pid:
                write_sys(lab.world_ns, f"/sys/class/net/{lab.world_if}/threaded", "1")
                pid = str(napi_thread(lab.world_if))
                run(["taskset", "-pc", str(lab.load_cpu), pid])
                # Ahead of the sender on that CPU: the sink must never be what drops XDP_TX frames.
                run(["chrt", "-f", "-p", "10", pid])
            yield
        finally:
            write_sys(lab.world_ns, f"/sys/class/net/{lab.world_if}/threaded", "0", check=False)
            labxdp.detach_all(lab.world_ns, lab.world_if)
            labxdp.detach_all(lab.relay_ns, lab.relay_if)
            run(["ethtool", "-K", lab.world_if, "tx", "on"], ns=lab.world_ns, check=False)

    def check(self, info: dict[str, Any]) -> None:
        backend = str(info.get("backend"))
        if "xdp(" not in backend or "detached" in backend:
            raise BenchError(f"natctl did not attach its XDP program (backend {backend})")


# A new method is named in bench.config.METHOD_NAMES too: --methods is checked there (the tests hold them equal).
METHODS: dict[str, Method] = {m.name: m for m in (AsyncioRelay(), Socat(), NatctlNft(), NatctlXdp())}
