"""A virtual LAN per lobby: every member gets a virtual IP on the relay's WireGuard, broadcasts and
multicast are fanned out by the relay's kernel to the other members of that LAN and no one else.

``model`` (settings, rows, the address pool: pure), ``plan`` (the nftables rules: pure),
``store`` (rows), ``relay`` (the interface, routes and rules on the relay), ``service`` (every
change through one function), ``wire`` and ``handler`` (joining by token through the daemon's
registration port), ``member`` (the member's side: keys, join, tunnels, instances).
"""
