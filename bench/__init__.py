"""The benchmark suite: natctl against the relays people run today, in a lab of namespaces.

It lives beside the natctl package, in the checkout, not inside it: an
installed natctl does not carry it. ``natctl bench`` (natctl/cli/bench.py) is
the front door and finds it here; ``python -m bench`` is the same without the
console script. ``runner.run`` does the work; ``methods`` holds the relays
compared (asyncio, socat, natctl with nftables, natctl with XDP), each
pluggable and each able to say it is not available rather than make up a
figure; ``config`` holds the settings and constants every module shares.
"""
