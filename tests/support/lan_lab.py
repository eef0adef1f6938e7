"""The LAN scenario's machines as network namespaces: a relay, a "machine" behind one home router
running instances, and members behind another; plus a discovery program written the way LAN games
find each other (interfaces enumerated, BROADCAST ones used).

Everything it makes has a unique name (namespaces, WireGuard interfaces and so their control sockets,
which all namespaces share), and ``teardown`` removes it all, also after a failure. Only
198.18.0.0/15 and loopback are used, the LANs' pool included.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

from natctl.gm.wireguard import socket_path, stale_socket
from natctl.lab import topology
from natctl.lab.netns import natctl_argv, need, run, stop
from natctl.lan import member as mb
from support.cli import Cli

SITES = {"home-a": ["machine"], "home-b": ["member3", "member4"]}
POOL = "198.18.128.0/20"
PYTHON = "/usr/bin/python3"  # the discovery program needs the standard library only, and runs as nobody

# A LAN game's discovery, as games do it: enumerate interfaces (SIOCGIFFLAGS, SIOCGIFBRDADDR), and on
# every one flagged BROADCAST (not loopback) send a query to 255.255.255.255 from the interface's
# address; the host answers unicast. Multicast: a group joined on those interfaces, a datagram to it.
DISCOVER = r'''
import fcntl, json, select, socket, struct, sys, time

SIOCGIFFLAGS, SIOCGIFADDR, SIOCGIFBRDADDR, IFF_BROADCAST, IFF_LOOPBACK = 0x8913, 0x8915, 0x8919, 0x2, 0x8


def interfaces():
    out = []
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for _, name in socket.if_nameindex():
        req = struct.pack("16sH14s", name.encode(), 0, bytes(14))
        flags = struct.unpack("16sH", fcntl.ioctl(probe, SIOCGIFFLAGS, req)[:18])[1]
        if not flags & IFF_BROADCAST or flags & IFF_LOOPBACK:
            continue
        try:
            addr = socket.inet_ntoa(fcntl.ioctl(probe, SIOCGIFADDR, req)[20:24])
            brd = socket.inet_ntoa(fcntl.ioctl(probe, SIOCGIFBRDADDR, req)[20:24])
        except OSError:
            continue
        out.append((name, addr, brd))
    return out


def main():
    mode, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    end = time.monotonic() + seconds
    if mode == "host":  # answer every query, unicast, until the time is up
        name = sys.argv[4]
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        print("ready", flush=True)
        while (left := end - time.monotonic()) > 0:
            if select.select([s], [], [], left)[0]:
                data, addr = s.recvfrom(2048)
                if data.startswith(b"DISCOVER"):
                    s.sendto(b"HERE " + name.encode(), addr)
        return
    if mode == "search":  # a query from every broadcast interface; print who answered
        found = {}
        ifs = interfaces()
        socks = []
        for _, addr, brd in ifs:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            s.bind((addr, 0))
            socks.append(s)
        while time.monotonic() < end and not found:
            for s in socks:
                s.sendto(b"DISCOVER", ("255.255.255.255", port))
            stop = time.monotonic() + 0.5
            while (left := stop - time.monotonic()) > 0:
                ready = select.select(socks, [], [], left)[0]
                for s in ready:
                    data, addr = s.recvfrom(2048)
                    found[data.decode()] = addr[0]
        print(json.dumps({"interfaces": ifs, "found": found}))
        return
    if mode == "listen":  # count datagrams (broadcast, multicast, unicast) on a port; join a group first
        group = sys.argv[4]
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", port))
        for _, addr, _ in interfaces():
            s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, socket.inet_aton(group) + socket.inet_aton(addr))
        print("ready", flush=True)
        got = []
        while (left := end - time.monotonic()) > 0:
            if select.select([s], [], [], left)[0]:
                data, addr = s.recvfrom(4096)
                got.append([data.decode(errors="replace"), addr[0], addr[1]])
        print(json.dumps(got), flush=True)
        return
    if mode == "send":  # n datagrams to an address, from the first broadcast interface's address
        target, count, tag = sys.argv[4], int(sys.argv[5]), sys.argv[6]
        name, addr, _ = interfaces()[0]
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(addr))
        s.bind((addr, 47000))
        for i in range(count):
            s.sendto(f"{tag} {i}".encode(), (target, port))
            time.sleep(0.01)
        return

    if mode == "echo":  # TCP and UDP echo on one port until the time is up
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        t.bind(("0.0.0.0", port))
        t.listen(4)
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.bind(("0.0.0.0", port))
        print("ready", flush=True)
        while (left := end - time.monotonic()) > 0:
            ready = select.select([t, u], [], [], left)[0]
            if u in ready:
                data, addr = u.recvfrom(65535)
                u.sendto(data, addr)
            if t in ready:
                c, _ = t.accept()
                c.settimeout(10)
                while data := c.recv(65536):
                    c.sendall(data)
                c.close()
        return
    if mode == "check":  # payloads through an echo: TCP bytes and UDP datagrams up to the MTU, intact
        import hashlib, os
        target, mtu = sys.argv[4], int(sys.argv[5])
        blob = os.urandom(1 << 20)
        c = socket.create_connection((target, port), timeout=10)
        c.sendall(blob)
        c.shutdown(socket.SHUT_WR)
        back = b""
        while data := c.recv(65536):
            back += data
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.settimeout(2)
        u.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER = IP_PMTUDISC_DO: never fragment
        sizes, intact = [1, 100, 1000, mtu - 28], 0
        for size in sizes:
            payload = os.urandom(size)
            for _ in range(3):
                u.sendto(payload, (target, port))
                try:
                    if u.recv(65535) == payload:
                        intact += 1
                        break
                except OSError:
                    continue
        try:
            u.sendto(bytes(mtu - 27), (target, port))
            too_big = "sent"
        except OSError as err:
            too_big = err.strerror
        print(json.dumps({"tcp": hashlib.sha256(back).hexdigest() == hashlib.sha256(blob).hexdigest(),
                          "tcp_bytes": len(back), "udp_intact": intact, "udp_sizes": len(sizes), "too_big": too_big}))
        return


main()
'''


# python-zeroconf (Debian's python3-zeroconf): a real mDNS service and browser, nobody's code but theirs.
ZEROCONF = r'''
import socket, sys, time
from zeroconf import ServiceBrowser, ServiceInfo, Zeroconf

KIND = "_natctltest._udp.local."
mode, seconds = sys.argv[1], float(sys.argv[2])
zc = Zeroconf()
if mode == "publish":
    name, address = sys.argv[3], sys.argv[4]
    info = ServiceInfo(KIND, f"{name}.{KIND}", addresses=[socket.inet_aton(address)], port=27015,
                       properties={"game": "lan"})
    zc.register_service(info)
    print("ready", flush=True)
    time.sleep(seconds)
    zc.unregister_service(info)
else:
    found = {}

    class Seen:
        def add_service(self, zc, kind, name):
            found[name] = None

        def update_service(self, zc, kind, name):
            pass

        def remove_service(self, zc, kind, name):
            pass

    ServiceBrowser(zc, KIND, Seen())
    end = time.monotonic() + seconds
    while time.monotonic() < end and not found:
        time.sleep(0.1)
    for name in found:
        info = zc.get_service_info(KIND, name, timeout=3000)
        found[name] = info.parsed_addresses() if info else None
    print(found, flush=True)
zc.close()
'''


class LanLab:
    def __init__(self, lab: topology.Lab, tmp: str) -> None:
        self.lab, self.tmp = lab, tmp
        self.tag = lab.prefix[-6:]
        self.iface = f"{lab.prefix}lan"
        self.state = os.path.join(tmp, "relay", "natctl.db")
        self.env = {"NATCTL_CONFIG": "/nonexistent", "NATCTL_LAN_INTERFACE": self.iface, "NATCTL_LAN_POOL": POOL,
                    "NATCTL_LAN_LISTEN_PORT": "51821"}
        self.relay = LanCli(lab.relay_ns, self.state, self.env)
        self.script = os.path.join(tmp, "discover.py")
        with open(self.script, "w") as fh:
            fh.write(DISCOVER)
        os.chmod(self.script, 0o644)
        self.zeroconf = os.path.join(tmp, "zc.py")
        with open(self.zeroconf, "w") as fh:
            fh.write(ZEROCONF)
        os.chmod(self.zeroconf, 0o644)
        self.instances: list[tuple[str, str]] = []  # (name, machine namespace)
        self.procs: list[subprocess.Popen] = []

    def name(self, short: str) -> str:
        """A name unique on this machine for an instance or a tunnel (interfaces are machine-wide)."""
        return f"{self.tag}{short}"[:11]

    def natctl(self, *args: str) -> list[str]:
        return natctl_argv(self.state, *args)

    def member(self, ns_name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """natctl on a member's machine (a namespace of the lab)."""
        proc = subprocess.run(["ip", "netns", "exec", self.lab.ns(ns_name), *natctl_argv("/nonexistent/m.db", *args)],
                              capture_output=True, text=True, timeout=60, env={**os.environ, **self.env})
        if check and proc.returncode != 0:
            raise AssertionError(f"natctl {' '.join(args)} on {ns_name} exited {proc.returncode}: {proc.stderr}")
        return proc

    def instance_up(self, machine: str, short: str, token: str, member: str) -> str:
        """An instance on ``machine``: natctl runs on the host and plays that namespace's machine."""
        name = self.name(short)
        self.instances.append((name, self.lab.ns(machine)))
        proc = subprocess.run(natctl_argv("/nonexistent/m.db", "lan", "instance", "up", token, "--name", name,
                                          "--relay", self.lab.relay_ip, "--member", member,
                                          "--machine-ns", self.lab.ns(machine)),
                              capture_output=True, text=True, timeout=60, env={**os.environ, **self.env})
        assert proc.returncode == 0, proc.stderr
        return name

    def join(self, machine: str, short: str, token: str, member: str) -> str:
        """``natctl lan join`` on a machine: the game's interface beside the machine's own."""
        name = self.name(short)
        self.instances.append((name, self.lab.ns(machine)))
        self.member(machine, "lan", "join", self.lab.relay_ip, token, "--name", member, "--tunnel", name)
        return name

    def where(self, who: str) -> list[str]:
        """The command prefix that runs a program where member ``who`` plays: an instance or a machine."""
        if who in dict(self.instances) and mb.ns_exists(f"natctl-{who}"):
            return ["ip", "netns", "exec", f"natctl-{who}", *mb_user()]
        return ["ip", "netns", "exec", self.lab.ns(who), *mb_user()]

    def start(self, who: str, *args: str) -> subprocess.Popen:
        proc = subprocess.Popen([*self.where(who), PYTHON, self.script, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.procs.append(proc)
        return proc

    def call(self, who: str, *args: str, timeout: float = 30) -> str:
        proc = subprocess.run([*self.where(who), PYTHON, self.script, *args], capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def teardown(self) -> None:
        for p in self.procs:
            stop(p)
        for name, ns in self.instances:
            mb.down(name, mb.Machine(ns))
        self.relay("lan", "down", check=False)
        run(["ip", "link", "delete", "dev", self.iface], ns=self.lab.relay_ns, check=False)
        self.lab.teardown()
        for iface in [self.iface, *(f"nlw-{n}" for n, _ in self.instances)]:
            if stale_socket(socket_path(iface)):
                os.unlink(socket_path(iface))
        shutil.rmtree(self.tmp, ignore_errors=True)


def mb_user() -> list[str]:
    """Games run as nobody, as a player would (the discovery program needs no privilege)."""
    return ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


class LanCli(Cli):
    """natctl in the relay with its own store and its own LAN interface."""

    def __init__(self, ns: str, state: str, env: dict[str, str]) -> None:
        super().__init__(ns, state)
        self.env = env

    def __call__(self, *args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
        return super().__call__(*args, check=check, env={**self.env, **(env or {})})


def build() -> LanLab:
    need("wireguard-go", "wg", "tc", "nft", "setpriv")
    lab = topology.build(SITES)
    try:
        tmp = tempfile.mkdtemp(prefix=f"{lab.prefix}-")
        os.chmod(tmp, 0o755)
        os.makedirs(os.path.join(tmp, "relay"))
        return LanLab(lab, tmp)
    except BaseException:
        lab.teardown()
        raise


def wait_ready(proc: subprocess.Popen, seconds: float = 10) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + seconds
    line = proc.stdout.readline()  # bounded by the program's own time limit
    assert line.strip() == "ready" and time.monotonic() < deadline, (line, proc.stderr.read() if proc.stderr else "")
