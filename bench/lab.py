"""The bench's lab: a relay with one interface, and a "world" holding every player.

```
   relay ns:  r<tag>  198.18.0.1/16          (one NIC, as on a VPS)
                 │ veth
   world ns:  w<tag>  198.18.1.2 (client), 198.18.2.2 (host), 198.18.3.2 (a stranger)
```

Leaner than the demo's topology on purpose: home routers would add two
masquerading hops per direction, all of it CPU work on the sender's core, and
the bench wants the sender to be as fast as possible. Mappings and NAT at the
relay are the same as in the deployment.

CPU layout on a machine with 2 or more CPUs (say which one a result used):
- the relay's interface has GRO on, so veth gives it a NAPI ring, and threaded
  NAPI, so its receive work runs in one kernel thread pinned to the relay CPU;
  userspace relays are pinned there too;
- the world's interface has TSO off (veth only hands a local sender's packets
  to the peer's NAPI ring when the sending device has no TSO) and RPS to the
  load CPU, so delivering the relay's output runs on the load CPU;
- sender, sink and echo run on the load CPU; flood packets end at an nftables
  netdev ingress counter in the world (no socket: a cheap sink, so that the
  receiving side is not the limit).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from bench.config import CLIENT_IP, HOST_IP, RELAY_IP, SINK_PORT, STRANGER_IP
from bench.tool import BenchError
from natctl.errors import KernelError, NatctlError
from natctl.lab import topology
from natctl.lab.netns import need, run

SINK_TABLE = "natctl_bench"


@dataclass
class BenchLab:
    tag: str
    base: topology.Lab  # owns the namespaces and removes them
    relay_if: str
    world_if: str
    relay_cpu: int
    load_cpu: int
    napi_pid: int | None = None
    layout: str = ""
    patience: float = 240.0  # seconds the bench may still wait for other work on the machine to pause

    @property
    def relay_ns(self) -> str:
        return self.base.relay_ns

    @property
    def world_ns(self) -> str:
        return self.base.inet_ns

    def on_load_cpu(self, argv: list[str]) -> list[str]:
        return ["taskset", "-c", str(self.load_cpu), *argv]

    def on_relay_cpu(self, argv: list[str]) -> list[str]:
        return ["taskset", "-c", str(self.relay_cpu), *argv]

    def sink_packets(self) -> int:
        """Flood packets that reached the host's side, read from the sink's counter."""
        out = run(["nft", "-j", "list", "chain", "netdev", SINK_TABLE, "sink"], ns=self.world_ns).stdout
        return parse_sink(json.loads(out))

    def drops(self) -> dict[str, int]:
        """Where packets can be lost: the relay's receive ring, its transmit, its sockets."""
        return {
            "into_relay": _link_stat(self.world_ns, self.world_if, "tx", "dropped"),
            "relay_rx": _link_stat(self.relay_ns, self.relay_if, "rx", "dropped"),
            "out_of_relay": _link_stat(self.relay_ns, self.relay_if, "tx", "dropped"),
            "relay_socket": self.relay_udp("RcvbufErrors"),
        }

    def relay_udp(self, field: str) -> int:
        """A UDP counter of the relay's namespace: InDatagrams (reached a socket), RcvbufErrors (a full one)."""
        return udp_stat(run(["cat", "/proc/net/snmp"], ns=self.relay_ns).stdout, field)

    def teardown(self) -> None:
        self.base.teardown()


def parse_sink(doc: dict) -> int:
    """The packet count of the sink rule's counter in ``nft -j list chain`` output."""
    for item in doc.get("nftables", []):
        for expr in item.get("rule", {}).get("expr", []):
            if "counter" in expr:
                return int(expr["counter"]["packets"])
    raise BenchError("the bench's sink counter is missing", "was the lab torn down underneath the bench?")


def udp_stat(snmp: str, field: str) -> int:
    """One UDP counter of /proc/net/snmp (its header line names them; 0 if missing)."""
    rows = [line.split() for line in snmp.splitlines() if line.startswith("Udp:")]
    if len(rows) < 2:
        return 0
    return int(dict(zip(rows[0][1:], rows[1][1:])).get(field, 0))


def _link_stat(ns: str, dev: str, direction: str, what: str) -> int:
    out = run(["ip", "-s", "-j", "link", "show", "dev", dev], ns=ns).stdout
    return int(json.loads(out)[0]["stats64"][direction][what])


def wait_bound(ns: str, port: int, timeout: float = 5.0) -> None:
    """Wait until a UDP socket listens on ``port`` in ``ns``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if run(["ss", "-Huln", "sport", "=", f":{port}"], ns=ns, check=False).stdout.strip():
            return
        time.sleep(0.02)
    raise BenchError(f"nothing listens on UDP port {port} in {ns}")


def write_sys(ns: str, path: str, value: str, check: bool = True) -> None:
    # 'ip netns exec' remounts /sys for the namespace, so its devices are visible there.
    run(["sh", "-c", f"echo {value} > {path}"], ns=ns, check=check)


def napi_thread(dev: str, timeout: float = 2.0) -> int:
    """The pid of the kernel thread doing ``dev``'s threaded NAPI (named napi/DEV-ID)."""
    prefix = f"napi/{dev}-"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    if (entry / "comm").read_text().startswith(prefix):
                        return int(entry.name)
                except OSError:
                    continue
        time.sleep(0.05)
    raise BenchError(f"no threaded NAPI thread for {dev}", "the kernel needs veth GRO and threaded NAPI")


def build(relay_cpu: int = 1, load_cpu: int = 0, tag: str | None = None) -> BenchLab:
    """Create the lab and its CPU layout; on any failure remove what was made and re-raise."""
    need("ip", "nft", "ethtool", "taskset", "sysctl")
    tag = tag or secrets.token_hex(2)
    prefix = f"nb{tag}"
    base = topology.Lab(prefix, f"{prefix}-relay", f"{prefix}-world", relay_ip=RELAY_IP)
    lab = BenchLab(tag, base, f"r{tag}", f"w{tag}", relay_cpu, load_cpu)
    try:
        _build(lab)
    except BaseException:
        lab.teardown()
        raise
    return lab


def _build(lab: BenchLab) -> None:
    relay, world = topology._ns(lab.base, "relay"), topology._ns(lab.base, "world")
    topology._sysctl(relay, "net.ipv4.ip_forward=1", "net.ipv4.conf.all.send_redirects=0",
                     "net.ipv4.conf.default.send_redirects=0")
    topology._veth(relay, lab.relay_if, world, lab.world_if)
    # The relay answers on the interface packets came in on: no redirects, ever.
    topology._sysctl(relay, f"net.ipv4.conf.{lab.relay_if}.send_redirects=0")
    run(["ip", "-n", relay, "addr", "add", f"{RELAY_IP}/16", "dev", lab.relay_if])
    for ip in (CLIENT_IP, HOST_IP, STRANGER_IP):
        run(["ip", "-n", world, "addr", "add", f"{ip}/16", "dev", lab.world_if])
    run(["nft", "-f", "-"], ns=world, input=(
        f"table netdev {SINK_TABLE} {{\n  chain sink {{\n"
        f'    type filter hook ingress device "{lab.world_if}" priority 0; policy accept;\n'
        f"    ip daddr {HOST_IP} udp dport {SINK_PORT} counter drop\n  }}\n}}\n"))
    if lab.relay_cpu == lab.load_cpu:
        lab.layout = (f"one CPU (CPU{lab.relay_cpu}) shared by sender, relay and sink: the relay's CPU time "
                      "is measured, but sender and relay compete")
        return
    run(["ethtool", "-K", lab.relay_if, "gro", "on"], ns=relay)
    write_sys(relay, f"/sys/class/net/{lab.relay_if}/threaded", "1")
    lab.napi_pid = napi_thread(lab.relay_if)
    run(["taskset", "-pc", str(lab.relay_cpu), str(lab.napi_pid)])
    run(["ethtool", "-K", lab.world_if, "tso", "off", "gro", "off"], ns=world)
    write_sys(world, f"/sys/class/net/{lab.world_if}/queues/rx-0/rps_cpus", format(1 << lab.load_cpu, "x"))
    lab.layout = (f"relay on CPU{lab.relay_cpu}: {lab.relay_if} receive work in its threaded-NAPI kernel thread "
                  f"(GRO on, UDP GRO forwarding off) pinned there, userspace relays pinned there; "
                  f"sender, sink and echo on CPU{lab.load_cpu}, world-side receive steered there by RPS")


def cpus() -> tuple[int, int]:
    """(relay CPU, load CPU): the last two CPUs this process may use, or one CPU twice."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) >= 2:
        return allowed[-1], allowed[-2]
    return allowed[0], allowed[0]


def need_root() -> None:
    if os.geteuid() != 0:
        raise KernelError("the bench builds network namespaces and must run as root", "run it with sudo")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM takes the same cleanup path as Ctrl-C


@contextmanager
def session(tag: str | None = None) -> Iterator[BenchLab]:
    """The lab for one run, as root, removed afterwards, also on failure, Ctrl-C or SIGTERM."""
    need_root()
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        lab = build(*cpus(), tag)
        try:
            yield lab
        finally:
            lab.teardown()
    finally:
        signal.signal(signal.SIGTERM, previous)


def standalone(main: Callable[[], int], prog: str) -> None:
    """Run a ``python -m bench.X`` command: natctl's one-line errors, not a traceback; 130 on Ctrl-C."""
    try:
        code = main()
    except NatctlError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        code = err.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        code = 130
    sys.exit(code)


def report(result: dict, path: str | None) -> int:
    """A standalone measurement's end: its JSON on stdout, and in ``path`` when given (--json FILE)."""
    print(json.dumps(result, indent=2))
    if path:
        with open(path, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0
