"""OpenVPN as the GMs' VPN: natctl writes a ccd file with each GM's fixed address.

natctl does not run the OpenVPN server; the server's configuration names the
same subnet (``topology subnet``, ``server NET MASK nopool``) and
``client-config-dir``. With ``ccd-exclusive`` a removed GM can no longer connect.
Certificates come from the server's easy-rsa PKI (CN = the GM's name).
"""

from __future__ import annotations

import os

from natctl.errors import KernelError, NotFound
from natctl.gm.model import Gm, GmSettings, Tunnel
from natctl.gm.render import CCD_MARK, Identity, ccd_file, openvpn_config, write_atomic


def parse_status(text: str) -> dict[str, tuple[str, str]]:
    """Common name -> (real address, virtual address), from an OpenVPN status file (version 2 or 3)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("CLIENT_LIST"):
            cols = line.replace("\t", ",").split(",")
            if len(cols) > 3:
                out[cols[1]] = (cols[2], cols[3])
    return out


class OpenVpn:
    kind = "openvpn"

    def __init__(self, settings: GmSettings) -> None:
        self.settings = settings
        self.ccd = settings.openvpn_ccd

    def identity(self, name: str) -> Identity:
        pki = self.settings.openvpn_pki
        files = [("ca", os.path.join(pki, "ca.crt")), ("cert", os.path.join(pki, "issued", f"{name}.crt")),
                 ("key", os.path.join(pki, "private", f"{name}.key"))]
        if self.settings.openvpn_tls_crypt:
            files.append(("tls-crypt", self.settings.openvpn_tls_crypt))
        pem = []
        for tag, path in files:
            try:
                with open(path) as fh:
                    pem.append((tag, fh.read()))
            except OSError:
                raise NotFound(f"no OpenVPN {tag} for GM {name!r} at {path}",
                               f"create it first (easy-rsa: ./easyrsa build-client-full {name} nopass), "
                               "or point natctl gm --openvpn-pki at the PKI") from None
        return Identity(pem=tuple(pem))

    def client_config(self, gm: Gm, identity: Identity, relay_ip: str) -> str:
        return openvpn_config(gm, identity, self.settings, relay_ip)

    def ensure_up(self) -> None:
        if not os.path.isdir(self.ccd):
            raise KernelError(f"the OpenVPN client-config-dir {self.ccd} does not exist",
                              "create it and name it in the server config (client-config-dir), "
                              "or set natctl gm --openvpn-ccd")

    def down(self) -> bool:
        return False  # the OpenVPN server is not natctl's to stop

    def sync(self, gms: list[Gm]) -> None:
        """ccd files for exactly these GMs; files natctl did not write are left alone."""
        if not os.path.isdir(self.ccd):
            return
        want = {g.name: ccd_file(g, self.settings) for g in gms if g.vpn == self.kind}
        for name in os.listdir(self.ccd):
            path = os.path.join(self.ccd, name)
            if name in want or not os.path.isfile(path):
                continue
            with open(path) as fh:
                if fh.readline().startswith(CCD_MARK):
                    os.unlink(path)
        for name, text in want.items():
            path = os.path.join(self.ccd, name)
            if not os.path.exists(path) or open(path).read() != text:
                write_atomic(path, text)

    def tunnels(self, gms: list[Gm], now: float) -> dict[str, Tunnel]:
        try:
            with open(self.settings.openvpn_status) as fh:
                clients = parse_status(fh.read())
        except OSError:
            problem = (f"no OpenVPN status at {self.settings.openvpn_status}: start the OpenVPN server, "
                       "or point natctl gm --openvpn-status at its status file")
            return {g.name: Tunnel("down", problem=problem) for g in gms}
        out = {}
        for g in gms:
            real, virtual = clients.get(g.name, ("", ""))
            if virtual == g.address:
                out[g.name] = Tunnel("up", None, real)
            else:
                out[g.name] = Tunnel("down", problem="it is not connected to the OpenVPN server: connect "
                                     f"with the profile from 'natctl gm add {g.name}', then retry")
        return out
