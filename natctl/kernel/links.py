"""Links and addresses of the relay's own network namespace (pyroute2)."""

from __future__ import annotations

from natctl.errors import NatctlError


def default_route() -> tuple[str, str]:
    """(interface name, its first IPv4 address) of the IPv4 default route."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        routes = [r for r in ipr.get_routes(family=2) if r.get("dst_len") == 0 and r.get_attr("RTA_OIF")]
        if not routes:
            raise NatctlError("there is no IPv4 default route to find the relay's address from",
                              "pass --relay-ip and --interface, or set relay_ip in /etc/natctl/natctl.toml")
        oif = routes[0].get_attr("RTA_OIF")
        name = ipr.get_links(oif)[0].get_attr("IFLA_IFNAME")
        addrs = [a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=2, index=oif)]
    if not addrs:
        raise NatctlError(f"the default route's interface {name} has no IPv4 address", "pass --relay-ip")
    return name, addrs[0]
