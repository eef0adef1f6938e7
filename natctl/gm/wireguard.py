"""natctl's own WireGuard interface, driven with ``ip`` and ``wg``.

Where the kernel has no WireGuard module, Debian's ``wireguard-go`` runs the
interface in userspace. Its control socket, /var/run/wireguard/IFACE.sock, is
shared by every network namespace on the machine, so the interface name must
be unique machine-wide. The interface holds no state worth keeping: ``sync``
makes its peers exactly the GM rows, and ``ensure_up`` rebuilds it (after a
reboot, say) from the store and the server key file.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence

from natctl.errors import KernelError
from natctl.gm.model import Gm, GmSettings, Tunnel
from natctl.gm.render import Identity, wireguard_config

SOCKET_DIR = "/var/run/wireguard"


def run(argv: Sequence[str], input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LOG_LEVEL"}  # wireguard-go: keep the daemon quiet
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=True, text=True, timeout=15, env=env)
    except FileNotFoundError:
        raise KernelError(f"{argv[0]} is not installed", "run 'make setup' (it installs wireguard-tools "
                          "and wireguard-go)") from None
    if check and proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("┌", "│", "└"))]
        raise KernelError(f"{' '.join(argv[:3])} failed: {lines[-1] if lines else proc.returncode}",
                          "natctl must run as root; see the message for the cause")
    return proc


def socket_path(interface: str) -> str:
    return os.path.join(SOCKET_DIR, f"{interface}.sock")


def stale_socket(path: str) -> bool:
    """A socket file that nobody answers on (its wireguard-go was killed)."""
    if not os.path.exists(path):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return True
    return False


class Interface:
    """A WireGuard interface natctl owns: its key file, the device (kernel or wireguard-go) and its peers.

    What it carries is the caller's: the GMs' VPN (``WireGuard`` below) and the LANs (natctl.lan.relay)
    each own one, with their own name, port and key.
    """

    def __init__(self, iface: str, port: int, key_file: str, address: str | None = None, mtu: int | None = None) -> None:
        self.iface, self.port, self.key_file = iface, port, key_file
        self.address = address  # CIDR the interface holds (the relay's address in the VPN), or none
        self.mtu = mtu

    # --- keys

    def server_public_key(self) -> str:
        """The relay's public key; its private key is made once, in a 0600 file beside the store."""
        if not os.path.exists(self.key_file):
            private = run(["wg", "genkey"]).stdout.strip()
            try:
                fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another natctl made it first: use theirs
                pass
            else:
                with os.fdopen(fd, "w") as fh:
                    fh.write(private + "\n")
        with open(self.key_file) as fh:
            return run(["wg", "pubkey"], input=fh.read()).stdout.strip()

    def identity(self, name: str) -> Identity:
        private = run(["wg", "genkey"]).stdout.strip()
        return Identity(public_key=run(["wg", "pubkey"], input=private + "\n").stdout.strip(), private_key=private)

    # --- the interface

    def exists(self) -> bool:
        return run(["ip", "link", "show", "dev", self.iface], check=False).returncode == 0

    def ensure_up(self) -> None:
        """Create the interface if it is missing, then (again) set its key, port and address."""
        self.server_public_key()
        if not self.exists():
            self._create()
        run(["wg", "set", self.iface, "listen-port", str(self.port), "private-key", self.key_file])
        if self.address:
            run(["ip", "address", "replace", self.address, "dev", self.iface])
        if self.mtu:
            run(["ip", "link", "set", self.iface, "mtu", str(self.mtu)])
        run(["ip", "link", "set", self.iface, "up"])

    def _create(self) -> None:
        create(self.iface)

    def down(self) -> bool:
        """Delete the interface; wireguard-go exits with it. True if it existed."""
        existed = self.exists()
        if existed:
            run(["ip", "link", "delete", "dev", self.iface])
        forget_socket(self.iface)
        return existed

    # --- peers

    def peers(self) -> dict[str, tuple[str, float | None, str | None]]:
        """public key -> (allowed ips, last handshake, endpoint), from ``wg show IFACE dump``."""
        out = {}
        for line in run(["wg", "show", self.iface, "dump"]).stdout.splitlines()[1:]:
            key, _psk, endpoint, allowed, handshake, *_ = line.split("\t")
            out[key] = (allowed, float(handshake) or None, None if endpoint == "(none)" else endpoint)
        return out

    def set_peers(self, want: dict[str, str]) -> None:
        """Make the peers exactly ``want`` (public key -> allowed IPs), in one ``wg set``."""
        have = self.peers()
        argv = ["wg", "set", self.iface]
        for key in sorted(set(have) - set(want)):
            argv += ["peer", key, "remove"]
        for key, allowed in sorted(want.items()):
            if key not in have or have[key][0] != allowed:
                argv += ["peer", key, "allowed-ips", allowed]
        if len(argv) > 3:
            run(argv)


def create(iface: str, option: str = "natctl gm --interface") -> None:
    """A WireGuard device called ``iface``: the kernel's, or wireguard-go's when the kernel has no module."""
    if run(["ip", "link", "add", iface, "type", "wireguard"], check=False).returncode == 0:
        return
    # No kernel module: userspace. wireguard-go forks a daemon and returns once the
    # interface and its control socket exist.
    if shutil.which("wireguard-go") is None:
        raise KernelError("the kernel has no WireGuard module and wireguard-go is not installed",
                          "run 'make setup' (or apt-get install wireguard-go)")
    proc = run(["wireguard-go", iface], check=False)
    if proc.returncode != 0 or run(["ip", "link", "show", "dev", iface], check=False).returncode != 0:
        why = (proc.stderr.strip().splitlines() or ["no interface appeared"])[-1]
        raise KernelError(f"wireguard-go could not create {iface} ({why})",
                          "another WireGuard interface on this machine may use that name: "
                          f"pick another with '{option} NAME'")


def forget_socket(iface: str, wait: float = 3.0) -> None:
    """Remove the control socket a deleted wireguard-go interface leaves behind (never a live one)."""
    path = socket_path(iface)
    deadline = time.monotonic() + wait
    while os.path.exists(path) and time.monotonic() < deadline:
        if stale_socket(path):  # never remove a live socket: it may be another namespace's interface
            os.unlink(path)
            break
        time.sleep(0.05)


class WireGuard(Interface):
    """The GMs' VPN: one interface whose peers are exactly the GM rows."""

    kind = "wireguard"

    def __init__(self, settings: GmSettings, key_file: str) -> None:
        super().__init__(settings.interface, settings.port, key_file,
                         f"{settings.relay_address}/{settings.network.prefixlen}")
        self.settings = settings

    def client_config(self, gm: Gm, identity: Identity, relay_ip: str) -> str:
        return wireguard_config(gm, identity, self.settings, self.server_public_key(), relay_ip)

    def sync(self, gms: list[Gm]) -> None:
        """Make the peers exactly these GMs, in one ``wg set``. Nothing to do while the interface is down."""
        if not self.exists():
            return
        self.set_peers({g.public_key: f"{g.address}/32" for g in gms if g.vpn == self.kind})

    def tunnels(self, gms: list[Gm], now: float) -> dict[str, Tunnel]:
        if not self.exists():
            problem = f"the VPN interface {self.iface} is down: start it with 'natctl gm up'"
            return {g.name: Tunnel("down", problem=problem) for g in gms}
        peers = self.peers()
        out = {}
        for g in gms:
            _allowed, shake, endpoint = peers.get(g.public_key, ("", None, None))
            if shake is not None and now - shake < self.settings.handshake_timeout:
                out[g.name] = Tunnel("up", shake, endpoint)
                continue
            when = "it has never connected" if shake is None else f"last handshake {int(now - shake)}s ago"
            out[g.name] = Tunnel("down", shake, endpoint, f"{when}: activate the WireGuard tunnel from "
                                 f"'natctl gm add {g.name}' on the GM's machine, then retry")
        return out
