"""Run natctl as an unprivileged user (uid 65534), as players and non-root admins would.

A checkout often lives where other users cannot read it (/root is 0700 on
Debian), and so does its venv. ``python()`` then gives an interpreter command
and environment that work for uid 65534: the system Python (the venv's base)
with a world-readable copy of natctl and of the distributions it needs
(resolved from their metadata, test and bench extras left out).
"""

from __future__ import annotations

import atexit
import functools
import importlib.metadata as md
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def readable_by_others(path: str | Path) -> bool:
    """Can a user with no relation to ``path``'s owner read it (every directory on the way searchable)?"""
    p = Path(os.path.realpath(path))
    for parent in reversed(p.parents):
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
    return bool(os.stat(p).st_mode & stat.S_IROTH)


def _requirements(name: str, seen: set[str]) -> None:
    key = name.lower().replace("_", "-")
    if key in seen:
        return
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        return  # provided by the system (e.g. the nftables binding), readable already
    seen.add(key)
    for req in dist.requires or ():
        if "extra ==" in req:
            continue
        _requirements(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0], seen)


@functools.cache
def python() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(argv, extra environment) that start this Python with natctl importable by uid 65534."""
    import natctl

    package = Path(natctl.__file__).parent
    if readable_by_others(sys.executable) and readable_by_others(package / "__init__.py"):
        return (sys.executable,), ()
    root = Path(tempfile.mkdtemp(prefix="natctl-unprivileged-"))
    atexit.register(shutil.rmtree, root, True)
    root.chmod(0o755)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(package, root / "src" / "natctl", ignore=ignore)
    names: set[str] = set()
    _requirements("natctl", names)
    for name in sorted(names - {"natctl"}):
        dist = md.distribution(name)
        for f in dist.files or ():
            src = Path(dist.locate_file(f))
            if src.suffix == ".pyc" or not src.is_file() or ".." in f.parts:
                continue
            dest = root / "site" / f
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    base = os.path.realpath(sys.executable)  # the venv's base: the system Python, readable by all
    return (base,), (("PYTHONPATH", f"{root / 'src'}:{root / 'site'}"), ("PYTHONDONTWRITEBYTECODE", "1"))
