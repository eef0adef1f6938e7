"""Links and addresses of the relay's own network namespace.

Read from /proc/net/route and one ioctl, not rtnetlink: every changing command
that does not get --relay-ip and --interface asks this, and pyroute2 alone
takes longer to import than the whole command should take.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct

from natctl.errors import NatctlError

# This thread's network namespace's IPv4 routes (main table); /proc/net follows the process's first thread.
ROUTES = ("/proc/thread-self/net/route", "/proc/net/route")
RTF_UP = 0x1
SIOCGIFADDR = 0x8915


def default_routes(text: str) -> list[str]:
    """Interfaces of the IPv4 default routes in a /proc/net/route listing, lowest metric first."""
    found = []
    for line in text.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 8 or cols[0] == "*":  # "*": no interface (unreachable, blackhole)
            continue
        dest, flags, metric, mask = cols[1], int(cols[3], 16), int(cols[6]), cols[7]
        if int(dest, 16) == 0 and int(mask, 16) == 0 and flags & RTF_UP:
            found.append((metric, cols[0]))
    return [name for _, name in sorted(found, key=lambda m: m[0])]


def ipv4_address(name: str) -> str | None:
    """The interface's primary IPv4 address; None if it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            req = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
        except OSError as err:
            if err.errno in (errno.EADDRNOTAVAIL, errno.ENODEV):
                return None
            raise
    return socket.inet_ntoa(req[20:24])  # struct ifreq: 16 bytes of name, then a sockaddr_in


def default_route() -> tuple[str, str]:
    """(interface name, its first IPv4 address) of the IPv4 default route."""
    names: list[str] = []
    for path in ROUTES:
        try:
            with open(path) as fh:
                names = default_routes(fh.read())
            break
        except OSError:
            continue
    if not names:
        raise NatctlError("there is no IPv4 default route to find the relay's address from",
                          "pass --relay-ip and --interface, or set relay_ip in /etc/natctl/natctl.toml")
    name = names[0]
    addr = ipv4_address(name)
    if addr is None:
        raise NatctlError(f"the default route's interface {name} has no IPv4 address", "pass --relay-ip")
    return name, addr
