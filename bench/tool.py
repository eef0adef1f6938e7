"""The C load tool (udpblast.c): compiled on first use with the machine's cc, run, parsed.

Python cannot flood at line rate, so sending, sinking, echoing and timing round
trips are done by a small sendmmsg/recvmmsg program. It is built into a
git-ignored directory (``build/bench`` in the checkout, or
``$NATCTL_BENCH_BUILD``) and rebuilt when its source changes.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.config import ROOT
from natctl.errors import NatctlError

SOURCE = Path(__file__).with_name("udpblast.c")  # beside this module, in the bench package


class BenchError(NatctlError):
    """The bench could not run or could not make sense of a tool's output."""


def build_dir() -> Path:
    env = os.environ.get("NATCTL_BENCH_BUILD")
    if env:
        return Path(env)
    return ROOT / "build" / "bench"


def compiler() -> str:
    for cc in ("cc", "gcc", "clang"):
        if shutil.which(cc):
            return cc
    raise BenchError("no C compiler found (cc, gcc or clang)", "run 'make setup' (it installs clang)")


def ensure_tool() -> Path:
    """Path of the compiled tool, building it if it is missing or older than its source."""
    out = build_dir() / "udpblast"
    if out.exists() and out.stat().st_mtime >= SOURCE.stat().st_mtime:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: a concurrent bench never runs half a binary.
    fd, tmp = tempfile.mkstemp(prefix=".udpblast-", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run([compiler(), "-O2", "-Wall", "-o", tmp, str(SOURCE)],
                              capture_output=True, text=True, timeout=120)
        if proc.returncode != 0:
            raise BenchError(f"cannot compile {SOURCE.name}: {proc.stderr.strip()[:300]}",
                             "check the C compiler (make setup installs clang)")
        os.chmod(tmp, 0o755)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def parse_output(text: str) -> dict:
    """The tool's result: the last line of its output that is a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(doc, dict) and "mode" in doc:
                return doc
    raise BenchError(f"no result from the load tool in its output: {text.strip()[:200]!r}",
                     "run the tool by hand to see why")


def argv(mode: str, **opts: object) -> list[str]:
    """Command line for one mode; option names follow the tool's (--src, --dst, --bind, ...)."""
    if mode not in ("send", "recv", "echo", "rtt"):
        raise BenchError(f"unknown load tool mode {mode!r}")
    out = [str(ensure_tool()), mode]
    for key, value in opts.items():
        if value is not None:
            out += [f"--{key}", str(value)]
    return out
