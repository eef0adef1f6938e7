"""What a GM gets (client configurations) and what OpenVPN reads (ccd files), and writing them out."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass

from natctl.gm.model import Gm, GmSettings

CCD_MARK = "# managed by natctl"  # natctl deletes only ccd files that carry this line


@dataclass(frozen=True)
class Identity:
    """A new GM's credentials, shown once in its client configuration and never stored."""

    public_key: str = ""  # WireGuard
    private_key: str = ""  # WireGuard
    pem: tuple[tuple[str, str], ...] = ()  # OpenVPN: (tag, PEM text) to inline: ca, cert, key, tls-crypt


def _header(gm: Gm, relay_ip: str, comment: str) -> list[str]:
    return [
        f"{comment} natctl: game master {gm.name}",
        f"{comment} Players reach your table at {relay_ip}:{gm.port} while a session is open",
        f"{comment} (natctl gm open {gm.name}); keep your game listening on its usual port (1802).",
    ]


def wireguard_config(gm: Gm, identity: Identity, settings: GmSettings, server_key: str, relay_ip: str) -> str:
    """A wg-quick configuration. The tunnel carries only the relay's VPN address, so the GM's
    other traffic never enters it; the keepalive holds the GM's NAT open so the relay can reach in."""
    endpoint = settings.endpoint or relay_ip
    return "\n".join([
        *_header(gm, relay_ip, "#"),
        "[Interface]",
        f"PrivateKey = {identity.private_key}",
        f"Address = {gm.address}/32",
        "",
        "[Peer]",
        f"PublicKey = {server_key}",
        f"Endpoint = {endpoint}:{settings.port}",
        f"AllowedIPs = {settings.relay_address}/32",
        "PersistentKeepalive = 25",
        "",
    ])


def ccd_file(gm: Gm, settings: GmSettings) -> str:
    """The fixed address for OpenVPN's client-config-dir (the server uses topology subnet)."""
    mask = ipaddress.IPv4Network(settings.subnet).netmask
    return f"{CCD_MARK}: game master {gm.name}\nifconfig-push {gm.address} {mask}\n"


def openvpn_config(gm: Gm, identity: Identity, settings: GmSettings, relay_ip: str) -> str:
    """An inline .ovpn profile: the server's CA, the GM's certificate and key (CN = the GM's name)."""
    endpoint = settings.endpoint or relay_ip
    lines = [
        *_header(gm, relay_ip, "#"),
        "client",
        "dev tun",
        "proto udp",
        f"remote {endpoint} {settings.port}",
        "nobind",
        "persist-key",
        "persist-tun",
        "remote-cert-tls server",
        "verb 3",
    ]
    for tag, pem in identity.pem:
        lines += [f"<{tag}>", pem.strip(), f"</{tag}>"]
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str, mode: int = 0o644) -> None:
    """Readers see the old file or the new one, never half of it."""
    tmp = f"{path}.natctl-tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
