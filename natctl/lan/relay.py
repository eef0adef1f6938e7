"""The LANs on the relay: one WireGuard interface (natctl.gm.wireguard's code path), a route per LAN,
and the two nftables tables of natctl.lan.plan, made to match the rows in one step."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass

from natctl.errors import KernelError
from natctl.gm.wireguard import Interface, create, run
from natctl.lan import plan
from natctl.lan.model import Lan, LanSettings, Member


@dataclass(frozen=True)
class Peer:
    """A member's tunnel as the relay's interface sees it."""

    allowed: str
    last_handshake: float | None
    endpoint: str | None
    rx_bytes: int  # from the member
    tx_bytes: int  # to the member


class LanInterface(Interface):
    def _create(self) -> None:
        create(self.iface, "NATCTL_LAN_INTERFACE=")


class Relay:
    """The kernel side of every LAN on this relay."""

    def __init__(self, settings: LanSettings, key_file: str) -> None:
        self.settings = settings
        self.iface = settings.interface
        self.wg = LanInterface(settings.interface, settings.listen_port, key_file, None, settings.mtu)

    def public_key(self) -> str:
        return self.wg.server_public_key()

    def sync(self, lans: Sequence[Lan], members: Sequence[Member]) -> None:
        """Peers, routes and rules exactly for these rows; the interface is made when a LAN exists."""
        if not lans and not self.wg.exists():
            self._nft(plan.relay_ruleset(self.iface, [], []))
            return
        self.wg.ensure_up()
        # no redirects: members talk to each other through the relay on purpose
        run(["sysctl", "-q", "-w", f"net.ipv4.conf.{self.iface}.send_redirects=0"], check=False)
        self.wg.set_peers({m.public_key: f"{m.address}/32" for m in members})
        self._routes([lan.subnet for lan in lans])
        self._nft(plan.relay_ruleset(self.iface, lans, members))

    def _routes(self, subnets: Sequence[str]) -> None:
        out = run(["ip", "-j", "-4", "route", "show", "dev", self.iface]).stdout
        have = {r["dst"] for r in json.loads(out or "[]") if "/" in r.get("dst", "")}
        for dst in sorted(have - set(subnets)):
            run(["ip", "route", "del", dst, "dev", self.iface], check=False)
        for dst in sorted(set(subnets) - have):
            run(["ip", "route", "replace", dst, "dev", self.iface])

    def _nft(self, script: str) -> None:
        proc = run(["nft", "-f", "-"], input=script, check=False)
        if proc.returncode != 0:
            raise KernelError(f"nft refused the LAN rules: {proc.stderr.strip().splitlines()[-1:]}",
                              "natctl lan needs nftables with the netdev family (Linux 5.x or later)")

    def down(self) -> bool:
        """Remove the rules and the interface (the rows stay: 'natctl lan up' restores)."""
        self._nft(plan.relay_ruleset(self.iface, [], []))
        return self.wg.down()

    # --- what the kernel saw

    def peers(self) -> dict[str, Peer]:
        if not self.wg.exists():
            return {}
        out = {}
        for line in run(["wg", "show", self.iface, "dump"]).stdout.splitlines()[1:]:
            key, _psk, endpoint, allowed, shake, rx, tx, *_ = line.split("\t")
            out[key] = Peer(allowed, float(shake) or None, None if endpoint == "(none)" else endpoint, int(rx), int(tx))
        return out

    def fanout_counters(self) -> dict[str, tuple[int, int]]:
        proc = run(["nft", "-j", "list", "table", "netdev", plan.FANOUT], check=False)
        return plan.fanout_counters(proc.stdout) if proc.returncode == 0 else {}

    def local_networks(self) -> list[str]:
        """The relay's own IPv4 networks (every interface but loopback and the LAN's): no LAN may overlap them."""
        out = run(["ip", "-j", "-4", "addr", "show"]).stdout
        nets = []
        for link in json.loads(out or "[]"):
            if link.get("ifname") in ("lo", self.iface):
                continue
            for a in link.get("addr_info", []):
                nets.append(f"{a['local']}/{a['prefixlen']}")
        return nets

    def now(self) -> float:
        return time.time()
