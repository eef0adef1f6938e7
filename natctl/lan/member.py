"""A member's side: its key pair, joining by token, its WireGuard config, and its tunnels on Linux.

On Linux a tunnel is brought up so that a game sees an ordinary LAN (games pick where to
broadcast by enumerating interfaces, and skip point-to-point ones such as a WireGuard device):

```
 instance namespace natctl-N                 the machine (or the lab's namespace playing it)
 ┌──────────────────────────────┐            ┌───────────────────────────────────────────────┐
 │ game ── lan0 (veth)          │            │ nlv-N (veth) ──tc mirred──▶ nlw-N (WireGuard) ─┼─UDP─▶ relay
 │   BROADCAST, V/24 brd +,     │◀──────────▶│        ◀──nft netdev fwd──                     │
 │   default route, MTU = tunnel│            │ (no address, no route: never routed here)      │
 └──────────────────────────────┘            └───────────────────────────────────────────────┘
```

Outbound, a tc filter hands every IPv4 packet the game's interface sends (unicast, its LAN's
broadcast, 255.255.255.255, multicast) to the WireGuard device unchanged; inbound, an nftables
netdev chain hands packets for the member's address to the veth with an Ethernet header. The
machine itself never routes the LAN, and an instance's only way out is its tunnel. Without
``instance`` (``natctl lan join`` on Linux) the game's interface ``nlg-N`` stays in the machine's
own namespace beside its other interfaces.
"""

from __future__ import annotations

import base64
import configparser
import ipaddress
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from natctl.errors import Conflict, KernelError, NatctlError, NotFound, UsageError
from natctl.gm.wireguard import create, forget_socket
from natctl.lan import plan, wire
from natctl.lan.model import LIMITED_BROADCAST, MULTICAST

if TYPE_CHECKING:
    from natctl.lan.service import Joined

REGISTRATION_PORT = 8809
GAME_IF = "lan0"
KEEPALIVE = 25
_INSTANCE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,10}$")


# --- keys


def keypair() -> tuple[str, str]:
    """(private, public) in base64, made here: the private key never leaves this machine."""
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    except ImportError:  # no cryptography package: wireguard-tools
        private = _wg(["genkey"])
        return private, _wg(["pubkey"], private + "\n")
    key = X25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode(), base64.b64encode(pub).decode()


def _wg(args: list[str], input: str | None = None) -> str:
    if shutil.which("wg") is None:
        raise NatctlError("neither the Python package cryptography nor WireGuard's wg is installed",
                          "install one of them (pip install cryptography, or wireguard-tools)")
    return subprocess.run(["wg", *args], input=input, capture_output=True, text=True, check=True).stdout.strip()


# --- the config a member gets


@dataclass(frozen=True)
class Config:
    """A member's tunnel: a standard WireGuard config holds exactly this."""

    lan: str
    member: str
    private_key: str
    address: str
    prefixlen: int
    server_key: str
    endpoint: str  # host:port
    mtu: int

    @property
    def subnet(self) -> str:
        return str(ipaddress.IPv4Network(f"{self.address}/{self.prefixlen}", strict=False))


def render_config(j: Joined, private_key: str, endpoint_host: str) -> str:
    """A wg-quick / WireGuard-app config from what the relay gave a member (natctl.lan.service.Joined)."""
    return config_text(Config(j.lan, j.member, private_key, j.address, j.prefixlen, j.server_key,
                              f"{endpoint_host}:{j.port}", j.mtu))


def config_text(c: Config) -> str:
    """The tunnel carries the LAN's subnet, its broadcasts and multicast: nothing else of the machine's."""
    return "\n".join([
        f"# natctl lan: member {c.member} of LAN {c.lan}, virtual IP {c.address}",
        "# Import into the WireGuard app (Windows, macOS, Android) or 'natctl lan instance up THIS-FILE' (Linux).",
        f"# natctl-lan = {c.lan}",
        f"# natctl-member = {c.member}",
        "[Interface]",
        f"PrivateKey = {c.private_key}",
        f"Address = {c.address}/{c.prefixlen}",
        f"MTU = {c.mtu}",
        "",
        "[Peer]",
        f"PublicKey = {c.server_key}",
        f"Endpoint = {c.endpoint}",
        f"AllowedIPs = {c.subnet}, {MULTICAST}, {LIMITED_BROADCAST}/32",
        f"PersistentKeepalive = {KEEPALIVE}",
        "",
    ])


def parse_config(text: str) -> Config:
    meta = dict(re.findall(r"^# natctl-(lan|member) = (\S+)$", text, re.M))
    parser = configparser.ConfigParser(strict=False, comment_prefixes=("#", ";"))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    try:
        parser.read_string(text)
        iface, peer = parser["Interface"], parser["Peer"]
        addr = ipaddress.IPv4Interface(iface["Address"].split(",")[0].strip())
        return Config(meta.get("lan", ""), meta.get("member", ""), iface["PrivateKey"].strip(), str(addr.ip),
                      addr.network.prefixlen, peer["PublicKey"].strip(), peer["Endpoint"].strip(),
                      int(iface.get("MTU", "1420")))
    except (configparser.Error, KeyError, ValueError) as err:
        raise UsageError(f"not a WireGuard config natctl can use ({err})",
                         "pass the file 'natctl lan join --out' or 'natctl lan add --out' wrote") from None


# --- joining


def split_relay(relay: str, default_port: int = REGISTRATION_PORT) -> tuple[str, int]:
    host, sep, port = relay.rpartition(":")
    if not sep:
        return relay, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError(f"invalid relay {relay!r}", "use HOST or HOST:PORT (the registration port, default 8809)")
    return host, int(port)


def request(relay: str, token: str, name: str, public_key: str, tries: int = 5, wait: float = 1.0,
            netns: str | None = None) -> wire.JoinedReply:
    """Ask the relay's registration port for a place in the LAN; resend until answered (from ``netns``,
    the namespace that plays the machine in a lab)."""
    host, port = split_relay(relay)
    try:
        target = socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_DGRAM)[0][4]
    except (socket.gaierror, IndexError):
        raise UsageError(f"cannot resolve relay {host!r}", "check the relay's name or use its IP address") from None
    try:
        data = wire.encode_join(token, name, public_key, secrets.randbits(32))
    except ValueError:
        raise UsageError("a LAN token is 16-64 printable characters and a member name 1-32",
                         "copy the token 'natctl lan create' printed") from None
    nonce = int.from_bytes(data[6:10], "big")
    with _socket(netns) as s:
        for _ in range(tries):
            s.sendto(data, target)
            deadline = time.monotonic() + wait
            while (left := deadline - time.monotonic()) > 0:
                s.settimeout(left)
                try:
                    reply, _src = s.recvfrom(512)
                except TimeoutError:
                    break
                except OSError:  # ICMP unreachable: try again after the wait
                    time.sleep(max(0.0, deadline - time.monotonic()))
                    break
                try:
                    answer = wire.decode_reply(reply)
                except wire.WireError:
                    continue
                if isinstance(answer, wire.JoinedReply):
                    if answer.nonce == nonce:
                        return answer
                elif answer[0] == nonce:
                    code = answer[1]
                    raise Conflict(f"the relay refused to join: {wire.ERRORS.get(code, f'error {code}')}",
                                   "ask the LAN's admin" if code != wire.ERR_NAME else "join with another --name")
    raise NotFound(f"no answer from {host}:{port} after {tries * wait:g} s",
                   "the token is wrong or the LAN expired (ask for the current token), or the relay's UDP "
                   f"port {port} is unreachable")


def _socket(netns: str | None) -> socket.socket:
    if netns is None:
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    from natctl.lab.netns import entered

    with entered(netns):
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)


def join(relay: str, token: str, name: str, netns: str | None = None) -> Config:
    """Make a key pair, join, and return the member's tunnel config."""
    private, public = keypair()
    reply = request(relay, token, name, public, netns=netns)
    host, _ = split_relay(relay)
    return Config("", name, private, reply.address, reply.prefixlen, reply.server_key, f"{host}:{reply.port}", reply.mtu)


def default_name(suffix: str = "") -> str:
    base = re.sub(r"[^A-Za-z0-9_.-]", "-", socket.gethostname()) or "member"
    return (base[: 31 - len(suffix)] + ("-" + suffix if suffix else ""))[:32]


# --- tunnels on Linux


@dataclass(frozen=True)
class Names:
    """Everything a tunnel makes is named after it, so that 'down' finds it all again."""

    name: str
    instance: bool

    @property
    def ns(self) -> str:
        return f"natctl-{self.name}"

    @property
    def tunnel(self) -> str:
        return f"nlw-{self.name}"

    @property
    def port(self) -> str:
        return f"nlv-{self.name}"

    @property
    def game(self) -> str:
        return GAME_IF if self.instance else f"nlg-{self.name}"

    @property
    def table(self) -> str:
        return plan.member_table(self.name)


def check_instance_name(name: str) -> str:
    if not _INSTANCE.match(name):
        raise UsageError(f"invalid instance name {name!r}", "use 1-11 lowercase letters, digits, '-' or '_'")
    return name


class Machine:
    """Runs commands on the machine (or in the namespace that plays it in a lab: ``netns``)."""

    def __init__(self, netns: str | None = None) -> None:
        self.netns = netns

    def argv(self, argv: Sequence[str]) -> list[str]:
        if not self.netns:
            return list(argv)
        if argv[0] == "ip":
            return ["ip", "-n", self.netns, *argv[1:]]
        return ["ip", "netns", "exec", self.netns, *argv]

    def run(self, argv: Sequence[str], input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        full = self.argv(argv)
        env = {k: v for k, v in os.environ.items() if k != "LOG_LEVEL"}
        try:
            proc = subprocess.run(full, input=input, capture_output=True, text=True, timeout=20, env=env)
        except FileNotFoundError:
            raise KernelError(f"{full[0]} is not installed", "install iproute2, nftables and wireguard-tools") from None
        if check and proc.returncode != 0:
            why = (proc.stderr.strip().splitlines() or [str(proc.returncode)])[-1]
            raise KernelError(f"{' '.join(argv[:4])} failed: {why}", "natctl lan needs root on Linux (sudo)")
        return proc

    def has_link(self, name: str) -> bool:
        return self.run(["ip", "link", "show", "dev", name], check=False).returncode == 0


def ns_exists(ns: str) -> bool:
    return os.path.exists(f"/run/netns/{ns}")


def up(cfg: Config, name: str, instance: bool = True, machine: Machine | None = None) -> Names:
    """Bring a member's tunnel up (an instance's namespace with it); on any failure remove what was made."""
    if os.geteuid() != 0:
        raise KernelError("bringing a LAN tunnel up needs root", "run it with sudo (the game itself runs as you)")
    m = machine or Machine()
    n = Names(check_instance_name(name), instance)
    if (instance and ns_exists(n.ns)) or m.has_link(n.tunnel):
        raise Conflict(f"instance {name!r} is already up", f"pick another --name, or remove it: natctl lan instance down {name}")
    try:
        _up(cfg, n, m)
    except BaseException:
        down(name, m)
        raise
    return n


def _up(cfg: Config, n: Names, m: Machine) -> None:
    _make_tunnel(cfg, n, m)
    game_ns = n.ns if n.instance else m.netns
    if n.instance:
        subprocess.run(["ip", "netns", "add", n.ns], check=True, capture_output=True)
        subprocess.run(["ip", "-n", n.ns, "link", "set", "lo", "up"], check=True, capture_output=True)
        m.run(["ip", "link", "add", n.port, "type", "veth", "peer", "name", n.game, "netns", n.ns])
    else:
        m.run(["ip", "link", "add", n.port, "type", "veth", "peer", "name", n.game])
    g = Machine(game_ns)
    for link, machine in ((n.port, m), (n.game, g)):
        machine.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{link}.disable_ipv6=1"], check=False)
    m.run(["ip", "link", "set", n.port, "mtu", str(cfg.mtu), "up"])
    g.run(["ip", "link", "set", n.game, "mtu", str(cfg.mtu), "arp", "off", "up"])
    g.run(["ip", "address", "add", f"{cfg.address}/{cfg.prefixlen}", "brd", "+", "dev", n.game])
    if n.instance:  # the tunnel is the instance's only way out: 255.255.255.255 and multicast too
        g.run(["ip", "route", "add", "default", "dev", n.game])
    mac = _mac(g, n.game)
    m.run(["ip", "neigh", "replace", cfg.address, "lladdr", mac, "dev", n.port, "nud", "permanent"])
    m.run(["tc", "qdisc", "add", "dev", n.port, "clsact"])
    m.run(["tc", "filter", "add", "dev", n.port, "ingress", "protocol", "ip", "u32", "match", "u32", "0", "0",
           "action", "mirred", "egress", "redirect", "dev", n.tunnel])
    proc = m.run(["nft", "-f", "-"], input=plan.member_ruleset(n.name, n.tunnel, n.port, cfg.address), check=False)
    if proc.returncode != 0:
        raise KernelError(f"nft refused the tunnel's rules: {proc.stderr.strip()}", "natctl lan needs nftables (netdev)")


def _make_tunnel(cfg: Config, n: Names, m: Machine) -> None:
    if m.netns:  # a lab's machine: wireguard-go must run (its UDP socket live) in that namespace
        if m.run(["ip", "link", "add", n.tunnel, "type", "wireguard"], check=False).returncode != 0:
            proc = m.run(["wireguard-go", n.tunnel], check=False)
            if proc.returncode != 0 or not m.has_link(n.tunnel):
                raise KernelError(f"wireguard-go could not create {n.tunnel}",
                                  "install wireguard-go (or use a kernel with WireGuard)")
    else:
        create(n.tunnel, "natctl lan instance up --name")
    m.run(["wg", "set", n.tunnel, "private-key", "/dev/stdin", "peer", cfg.server_key, "endpoint", cfg.endpoint,
           "allowed-ips", "0.0.0.0/0", "persistent-keepalive", str(KEEPALIVE)], input=cfg.private_key + "\n")
    m.run(["sysctl", "-q", "-w", f"net.ipv6.conf.{n.tunnel}.disable_ipv6=1"], check=False)
    m.run(["ip", "link", "set", n.tunnel, "mtu", str(cfg.mtu), "up"])


def _mac(machine: Machine, link: str) -> str:
    import json

    out = machine.run(["ip", "-j", "link", "show", "dev", link]).stdout
    return str(json.loads(out)[0]["address"])


def down(name: str, machine: Machine | None = None) -> list[str]:
    """Remove a tunnel and everything it made (its namespace and what runs there); what was removed."""
    m = machine or Machine()
    n = Names(name, True)
    gone = []
    if m.run(["nft", "delete", "table", "netdev", n.table], check=False).returncode == 0:
        gone.append(f"table netdev {n.table}")
    for link in (n.port, n.tunnel):  # the veth takes its peer with it; wireguard-go exits with its device
        if m.has_link(link) and m.run(["ip", "link", "delete", "dev", link], check=False).returncode == 0:
            gone.append(link)
    if ns_exists(n.ns):
        kill_all(n.ns)
        subprocess.run(["ip", "netns", "del", n.ns], capture_output=True)
        gone.append(f"namespace {n.ns}")
    forget_socket(n.tunnel, wait=2.0)
    return gone


def kill_all(ns: str) -> None:
    pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(int(pid), sig)
            except (ProcessLookupError, ValueError):
                pass
        deadline = time.monotonic() + 2
        while pids and time.monotonic() < deadline:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            if pids:
                time.sleep(0.05)
        if not pids:
            return


# --- running a program in an instance


def who(user: str | None) -> tuple[int, int, str] | None:
    """(uid, gid, name) to run as: --user, else the user sudo ran natctl for; None: stay root."""
    if user:
        try:
            pw = pwd.getpwnam(user) if not user.isdigit() else pwd.getpwuid(int(user))
        except KeyError:
            raise UsageError(f"no user {user!r} on this machine", "pass an existing --user") from None
        return pw.pw_uid, pw.pw_gid, pw.pw_name
    uid = os.environ.get("SUDO_UID")
    if uid and uid.isdigit():
        gid = os.environ.get("SUDO_GID", uid)
        return int(uid), int(gid) if gid.isdigit() else int(uid), os.environ.get("SUDO_USER", uid)
    return None


def run_argv(name: str, command: Sequence[str], user: str | None = None) -> list[str]:
    n = Names(check_instance_name(name), True)
    if not ns_exists(n.ns):
        raise NotFound(f"no instance {name!r} is up", f"start it first: natctl lan instance up TOKEN-OR-CONFIG --name {name}")
    if not command:
        raise UsageError("no command to run", f"natctl lan instance run {name} -- COMMAND ARGS...")
    argv = ["ip", "netns", "exec", n.ns]
    person = who(user)
    if person is not None:
        uid, gid, _ = person
        argv += ["setpriv", "--reuid", str(uid), "--regid", str(gid), "--clear-groups", "--"]
    return argv + list(command)


def run_in(name: str, command: Sequence[str], user: str | None = None) -> int:
    """Run ``command`` in the instance (as the calling user) until it exits; Ctrl-C is passed on to it."""
    argv = run_argv(name, command, user)
    env = dict(os.environ)
    person = who(user)
    if person is not None:
        try:
            pw = pwd.getpwuid(person[0])
            env.update(HOME=pw.pw_dir, USER=pw.pw_name, LOGNAME=pw.pw_name)
        except KeyError:
            pass
    proc = subprocess.Popen(argv, env=env, start_new_session=True)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        _stop(proc)
        raise


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGINT, 3.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 2.0)):
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def play(relay: str, token: str, command: Sequence[str], name: str | None = None, member: str | None = None,
         user: str | None = None, machine: Machine | None = None) -> int:
    """Join, bring an instance up, run the game in it, and remove the instance whatever happens."""
    inst = check_instance_name(name or f"p{secrets.token_hex(3)}")
    cfg = join(relay, token, member or default_name(inst), machine.netns if machine else None)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        up(cfg, inst, True, machine)
        return run_in(inst, command, user)
    finally:
        down(inst, machine)
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt
