"""CPU time and memory of processes (the relay's, the daemon's), and the machine a run happened on.

The relay's CPU time is the exact run time (``/proc/PID/task/*/schedstat``,
nanoseconds) of the threads that do the relaying: the kernel thread that
receives on the relay's interface (all of the forwarding for nftables and XDP)
plus every process of a userspace relay. Other work on the same core (another
test suite, say) is not counted there; it shows up as ``others_s``: the core's
busy time from ``/proc/stat`` minus the relay's, so a disturbed run is visible.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bench.config import ROOT


def task_runtime_ns(pid: int) -> int:
    """Run time of every thread of ``pid`` so far (0 if it is gone)."""
    total = 0
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return 0
    for task in tasks:
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            continue
    return total


def status_kib(field: str, pid: int | str = "self") -> int:
    """A memory figure (VmRSS, VmHWM) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def group_pids(pgid: int) -> list[int]:
    """Processes of a process group (a relay and anything it forked, e.g. socat children)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid:
            out.append(int(entry.name))
    return out


def parse_proc_stat(text: str, cpu: int) -> tuple[int, int]:
    """(busy, total) ticks of one CPU; steal is neither (the hypervisor's, not ours)."""
    for line in text.splitlines():
        parts = line.split()
        if parts and parts[0] == f"cpu{cpu}":
            user, nice, system, idle, iowait, irq, softirq = (int(v) for v in parts[1:8])
            busy = user + nice + system + irq + softirq
            return busy, busy + idle + iowait
    raise ValueError(f"cpu{cpu} not in /proc/stat")


HZ = os.sysconf("SC_CLK_TCK")


def busy_ticks(cpu: int) -> int:
    return parse_proc_stat(Path("/proc/stat").read_text(), cpu)[0]


@dataclass(frozen=True)
class Sample:
    t: float
    relay_ns: int
    core_busy: int
    core_total: int


def sample(relay_pids: list[int], napi_pid: int | None, cpu: int) -> Sample:
    pids = list(relay_pids) + ([napi_pid] if napi_pid else [])
    busy, total = parse_proc_stat(Path("/proc/stat").read_text(), cpu)
    return Sample(time.monotonic(), sum(task_runtime_ns(p) for p in pids), busy, total)


def spent(a: Sample, b: Sample) -> dict[str, float]:
    """Relay CPU seconds between two samples, the core's busy seconds, and the rest (others)."""
    relay = (b.relay_ns - a.relay_ns) / 1e9
    core = (b.core_busy - a.core_busy) / HZ
    return {"relay_cpu_s": relay, "core_busy_s": core, "others_s": max(0.0, core - relay),
            "wall_s": b.t - a.t}


def _version(argv: list[str]) -> str:
    if not shutil.which(argv[0]):
        return "not installed"
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kib = 0
    return {
        "kernel": platform.release(),
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "memory_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "nft": _version(["nft", "--version"]),
        "socat": _socat_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_average": os.getloadavg(),
        "commit": commit(),
    }


def commit() -> str:
    """The checkout's commit, '+changes' if tracked files differ from it (others may be editing)."""
    root = str(ROOT)
    try:
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head + ("+changes" if dirty else "")) if head else "unknown"


def _socat_version() -> str:
    if not shutil.which("socat"):
        return "not installed"
    out = subprocess.run(["socat", "-V"], capture_output=True, text=True, timeout=5).stdout
    return next((ln.strip() for ln in out.splitlines() if "socat version" in ln), "unknown")
