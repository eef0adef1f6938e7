"""Adapters to the kernel: nftables, conntrack, XDP, links."""
