"""The benchmark suite, same as `natctl bench` (see bench/README.md), without the console script.

    sudo .venv/bin/python -m bench [--quick] [--methods asyncio,socat,nftables,xdp] [--readme README.md]
"""

from __future__ import annotations

import sys

from natctl.cli import main

if __name__ == "__main__":
    sys.argv = ["natctl", "bench", *sys.argv[1:]]
    main()
