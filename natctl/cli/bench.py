"""natctl bench: the front door of the benchmark suite, which lives beside natctl in the checkout (bench/)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

import natctl
from natctl.cli.common import JsonOpt
from natctl.errors import NatctlError


def checkout_root() -> Path:
    """The checkout natctl runs from, on sys.path so that ``import bench`` finds the suite there.

    The suite is not part of the package: natctl installed from a wheel has no
    checkout beside it, and says where to get one.
    """
    root = Path(natctl.__file__).resolve().parents[1]
    if not (root / "bench" / "__init__.py").is_file():
        raise NatctlError("the benchmark suite is not installed with natctl (it lives in natctl's repository)",
                          "clone the repository and run 'make bench' there")
    if sys.path[:1] != [str(root)]:  # first: a bench/ in the current directory must not shadow it
        sys.path.insert(0, str(root))
    return root


def bench(
    quick: Annotated[bool, typer.Option("--quick", help="A short run of everything (about a minute).")] = False,
    methods: Annotated[Optional[str], typer.Option(help="Comma-separated: asyncio, socat, nftables, xdp. "
                                                  "(default: all)", show_default=False)] = None,
    runs: Annotated[Optional[int], typer.Option(help="Floods per method and size (the median is reported). "
                                               "(default: 5, quick 1)", show_default=False)] = None,
    seconds: Annotated[Optional[float], typer.Option(help="Longest flood, seconds. (default: 2, quick 1)",
                                                     show_default=False)] = None,
    packets: Annotated[Optional[int], typer.Option(help="Most packets per flood. (default: 3000000, quick 1000000)",
                                                   show_default=False)] = None,
    scale: Annotated[bool, typer.Option(help="Also measure 1,000 to 100,000 installed mappings and memory.")] = True,
    out: Annotated[str, typer.Option(help="Where the JSON and PNG go.")] = "bench/results",
    readme: Annotated[Optional[str], typer.Option(help="Write the figures between the bench markers of this "
                                                  "README.", show_default=False)] = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure natctl against an asyncio relay and socat in a lab of namespaces (root; about 6 minutes)."""
    checkout_root()
    from bench.config import make_config
    from bench.main import execute

    cfg = make_config(quick=quick, methods=methods, runs=runs, seconds=seconds, packets=packets, scale=scale, out=out)
    execute(cfg, "natctl " + shlex.join(sys.argv[1:]), readme=readme, as_json=as_json)
