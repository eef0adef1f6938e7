"""What forwarding needs on this machine: checked (``natctl doctor``) and, where safe, fixed.

A fresh VPS has ``net.ipv4.ip_forward=0``: the daemon then delivers a client's
first packet itself and the kernel forwards nothing after it, without a word.
``evaluate`` is pure (``Facts`` in, ``Check`` results out); ``read_facts`` and
``gather`` read the facts from /proc/sys and the system (natctl.kernel.forwarding
turns forwarding on before a process first writes mappings to the kernel).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass, replace

from natctl.config import Settings
from natctl.errors import NatctlError
from natctl.kernel.forwarding import SYSCTL_DROPIN, TURN_ON, read_int
from natctl.kernel.nft import TABLE

FORWARD_KEYS = ("net.ipv4.ip_forward", "net.ipv4.conf.all.forwarding")  # the same switch, two names
# Where sysctl.d(5) files live; a name in an earlier directory hides the same name in later ones.
SYSCTL_DIRS = ("etc/sysctl.d", "run/sysctl.d", "usr/local/lib/sysctl.d", "usr/lib/sysctl.d", "lib/sysctl.d")


@dataclass(frozen=True)
class Facts:
    """What the checks look at; every field may be unknown (None) when it could not be read."""

    ip_forward: int | None = None
    forward_at_boot: int | None = None  # the last value the sysctl files set (None: none sets it, the kernel's 0)
    boot_source: str = ""  # the file that sets it
    interface: str = ""  # the relay's interface (the default route's); "" unknown
    rp_filter_all: int | None = None
    rp_filter_iface: int | None = None
    conntrack: bool = False  # nf_conntrack is loaded or can be
    nat: bool = False  # nf_nat is loaded or can be
    nft_nat: bool | None = None  # the kernel takes nftables nat chains (None: nft could not be asked)
    relay_ip: str = ""
    relay_ip_local: bool | None = None
    # A fleet's relay (store = "postgresql://..."); all empty on one relay with its own SQLite store.
    store: str = ""  # the store's URL without its password
    store_error: str = ""  # why it could not be reached ("" when it answered)
    member: str = ""  # this relay's name in the fleet ("" when its relay IP has not joined)
    member_state: str = ""
    heartbeat_age: float | None = None  # seconds since its last heartbeat, by the database's clock
    dead_after: float = 0.0


@dataclass(frozen=True)
class Check:
    """One line of `natctl doctor`: a check, whether it passed, and what to do if not."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    fatal: bool = True  # a failed check that is not fatal is a warning: the relay may still work

    @property
    def status(self) -> str:
        return "pass" if self.ok else "fail" if self.fatal else "warn"


def evaluate(f: Facts) -> list[Check]:
    """Every check, in the order a person would fix them."""
    return [_forwarding(f), _at_boot(f), _rp_filter(f), *_modules(f), _relay_ip(f), *_fleet(f)]


def _forwarding(f: Facts) -> Check:
    fix = f"{TURN_ON} (any natctl change does it too); 'natctl install-units' keeps it on after a reboot"
    if f.ip_forward == 1:
        return Check("ip_forward", True, "IP forwarding is on")
    return Check("ip_forward", False, "cannot read /proc/sys/net/ipv4/ip_forward" if f.ip_forward is None
                 else "IP forwarding is off: clients' packets after the first one are dropped", fix)


def _at_boot(f: Facts) -> Check:
    # Not fatal: with fix_forwarding on, natctl turns it on again at its first change after a reboot.
    if f.forward_at_boot == 1:
        return Check("ip_forward at boot", True, f"{f.boot_source} turns it on")
    where = f"{f.boot_source} turns it off" if f.forward_at_boot is not None else "no sysctl file turns it on"
    return Check("ip_forward at boot", False, f"{where}: after a reboot nothing is forwarded until natctl's next change",
                 f"natctl install-units (writes /etc/sysctl.d/{SYSCTL_DROPIN})", fatal=False)


def _rp_filter(f: Facts) -> Check:
    # The kernel uses the larger of conf/all and conf/IFACE. Strict (1) drops a packet whose
    # source is routed back through another interface; loose (2) and off (0) never do here.
    value = max((v for v in (f.rp_filter_all, f.rp_filter_iface) if v is not None), default=None)
    iface = f.interface or "the relay's interface"
    if value is None:
        return Check("rp_filter", False, "cannot read net.ipv4.conf.*.rp_filter", "", fatal=False)
    if value != 1:
        return Check("rp_filter", True, f"{'loose (2)' if value == 2 else 'off (0)'} on {iface}")
    return Check("rp_filter", False, f"strict (1) on {iface}: a packet is dropped when the route back to its "
                 "sender leaves by another interface", "sysctl -w net.ipv4.conf.all.rp_filter=2", fatal=False)


def _modules(f: Facts) -> list[Check]:
    out = []
    for name, have, module in (("conntrack", f.conntrack, "nf_conntrack"), ("nat", f.nat, "nf_nat")):
        if f.nft_nat:  # a nat chain in the kernel is proof of both
            out.append(Check(name, True, "the kernel takes nftables NAT chains"))
        elif have and (f.nft_nat is None or name == "conntrack"):
            out.append(Check(name, True, f"{module} is available"))
        else:
            out.append(Check(name, False, "the kernel refused an nftables NAT chain" if f.nft_nat is False
                             else f"the kernel has no {module}",
                             "use a kernel with nftables NAT (Debian's linux-image-amd64); "
                             f"in a container, 'modprobe {module}' on the host"))
    return out


def _relay_ip(f: Facts) -> Check:
    # Not fatal: a floating IP that the provider DNATs to this machine is not one of its addresses.
    if not f.relay_ip:
        return Check("relay ip", False, "no relay IP: no default route and no relay_ip setting",
                     "pass --relay-ip or set relay_ip in /etc/natctl/natctl.toml")
    if f.relay_ip_local is False:
        return Check("relay ip", False, f"{f.relay_ip} is not an address of this machine: fine for a floating IP "
                     "the provider forwards here; otherwise a typo", "check --relay-ip / relay_ip", fatal=False)
    return Check("relay ip", True, f"{f.relay_ip} is an address of this machine")


def _fleet(f: Facts) -> list[Check]:
    if not f.store:
        return []
    if f.store_error:
        return [Check("store", False, f"{f.store} does not answer: {f.store_error}",
                      "start the database, or fix the URL, the network or TLS (README: When one VPS is not enough); "
                      "forwarding goes on meanwhile")]
    out = [Check("store", True, f"{f.store} answers")]
    if not f.member:
        return out + [Check("fleet member", False, f"relay IP {f.relay_ip or '?'} has not joined the fleet",
                            "natctl relay join --region NAME")]
    out.append(Check("fleet member", f.member_state != "dead", f"this relay is {f.member} ({f.member_state})",
                     "start its daemon: it comes back live, and takes new lobbies again"))
    late = f.heartbeat_age is not None and f.heartbeat_age >= f.dead_after
    out.append(Check("heartbeat", not late, "no heartbeat yet" if f.heartbeat_age is None else
                     f"last heartbeat {f.heartbeat_age:.1f} s ago" + (": the others declare it dead and move its lobbies"
                                                                      if late else ""),
                     "natctl serve (systemctl start natctl)", fatal=False))
    return out


# --- the adapter: facts from files (under ``root``, a fake one in tests), the route, the table


def _text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:
        return None


def _module(root: str, name: str, release: str) -> bool:
    """Loaded (or built in with parameters), or listed among the running kernel's modules."""
    if os.path.isdir(os.path.join(root, "sys/module", name)):
        return True
    for index in ("modules.dep", "modules.builtin"):
        lines = (_text(os.path.join(root, "lib/modules", release, index)) or "").splitlines()
        if any(line.split(":")[0].rsplit("/", 1)[-1].split(".ko")[0] == name for line in lines):
            return True
    return False


def boot_forward(root: str = "/") -> tuple[int | None, str]:
    """The value the sysctl files give ip_forward at boot (None if none sets it), and which file."""
    files: dict[str, str] = {}
    for d in SYSCTL_DIRS:
        try:
            names = os.listdir(os.path.join(root, d))
        except OSError:
            continue
        for name in names:
            if name.endswith(".conf"):
                files.setdefault(name, os.path.join(root, d, name))
    paths = [files[n] for n in sorted(files)] + [os.path.join(root, "etc/sysctl.conf")]
    value, source = None, ""
    for path in paths:
        for line in (_text(path) or "").splitlines():
            key, sep, val = line.strip().lstrip("-").partition("=")
            if sep and key.strip().replace("/", ".") in FORWARD_KEYS and val.strip().isdigit():
                value, source = int(val.strip()), path.removeprefix(root.rstrip("/"))
    return value, source


def read_facts(root: str = "/", interface: str = "", relay_ip: str = "", relay_ip_local: bool | None = None,
               nft_nat: bool | None = None, release: str | None = None) -> Facts:
    """The facts that files hold under ``root``; the others are passed in (see ``gather``)."""
    conf = os.path.join(root, "proc/sys/net/ipv4")
    release = release or os.uname().release
    at_boot, source = boot_forward(root)
    return Facts(
        ip_forward=read_int(os.path.join(conf, "ip_forward")), forward_at_boot=at_boot, boot_source=source,
        interface=interface, rp_filter_all=read_int(os.path.join(conf, "conf/all/rp_filter")),
        rp_filter_iface=read_int(os.path.join(conf, "conf", interface, "rp_filter")) if interface else None,
        # conntrack's sysctl appears in a namespace once the module serves it
        conntrack=os.path.exists(os.path.join(root, "proc/sys/net/netfilter/nf_conntrack_max"))
        or _module(root, "nf_conntrack", release),
        nat=_module(root, "nf_nat", release), nft_nat=nft_nat, relay_ip=relay_ip, relay_ip_local=relay_ip_local)


def local_or_any(ip: str) -> str:
    """Listen on the relay IP itself, so every reply leaves from the address the peer sent to
    (on a VPS whose public IP sits on lo or is a secondary address, 0.0.0.0 answers from another)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((ip, 0))
            return ip
        except OSError:
            return "0.0.0.0"


def nft_nat() -> bool | None:
    """Does the kernel take nftables nat chains? None if nft cannot be asked (not root, no binding).

    natctl's own nat chains prove it without a write; otherwise a check-only
    transaction adds one: the kernel validates it (loading modules) and aborts it.
    """
    try:
        import nftables
    except ImportError:
        return None
    if os.geteuid() != 0:
        return None
    nft = nftables.Nftables()
    nft.set_json_output(True)
    rc, out, _ = nft.cmd("list chains inet")
    listing = json.loads(out).get("nftables", []) if rc == 0 and out.strip() else []
    if any(item.get("chain", {}).get("table") == TABLE and item["chain"].get("type") == "nat" for item in listing):
        return True
    nft.set_dry_run(True)
    rc, _, _ = nft.cmd(f"add table inet {TABLE}_probe\n"
                       f"add chain inet {TABLE}_probe p {{ type nat hook postrouting priority srcnat; }}")
    return rc == 0


def gather(settings: Settings) -> Facts:
    """This machine's facts; never fails (what cannot be read stays unknown)."""
    from natctl.kernel.links import default_route

    try:
        route_if, route_ip = default_route()
    except (NatctlError, OSError):  # no default route: both unknown
        route_if, route_ip = "", ""
    relay_ip = settings.relay_ip or route_ip
    facts = read_facts(interface=settings.interface or route_if, relay_ip=relay_ip,
                       relay_ip_local=local_or_any(relay_ip) == relay_ip if relay_ip else None, nft_nat=nft_nat())
    if settings.store:
        from natctl.fleet.service import facts as fleet_facts

        facts = replace(facts, **fleet_facts(settings, relay_ip))
    return facts
