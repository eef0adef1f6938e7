"""The benchmark suite: natctl against the relays people run today, in a lab of namespaces.

``natctl bench`` (natctl/cli/bench.py) is the front door; ``runner.run`` does the
work; ``methods`` holds the relays compared (asyncio, socat, natctl with
nftables, natctl with XDP), each pluggable and each able to say it is not
available rather than make up a figure.
"""
