"""`natctl demo`: a whole relay in a throwaway lab, with real UDP and TCP, checked byte for byte.

It drives natctl exactly as a user would (the CLI, inside the relay's namespace)
and removes everything it made, also on Ctrl-C or failure.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from natctl.errors import NatctlError
from natctl.lab import topology
from natctl.lab.gamehost import GameHost
from natctl.lab.netns import natctl_argv, run, spawn, stop
from natctl.lab.traffic import Delivery, payload, send_and_receive, udp_socket
from natctl.output import table

HOST_PORT, CLIENT_PORTS, HTTP_PORT = 27015, {"client1": 40001, "client2": 40002}, 8080
REGISTRATION_PORT = 8809


def natctl(lab: topology.Lab, state: str, *args: str, echo: bool = True) -> str:
    """Run the natctl CLI inside the relay namespace, as a user on the VPS would."""
    if echo:
        print(f"  relay# natctl {' '.join(args)}")
    proc = run(natctl_argv(state, *args), ns=lab.relay_ns, check=False)
    if proc.returncode != 0:
        raise NatctlError(f"natctl {' '.join(args)} failed: {proc.stderr.strip()}")
    for line in proc.stderr.splitlines():  # what natctl tells its user, e.g. that it turned forwarding on
        print(f"  {line}")
    return proc.stdout


def _udp_round(lab: topology.Lab, host_port: int, host: GameHost, socks: dict) -> list[Delivery]:
    """Players speak first, as players joining do; the host answers whoever it heard."""
    relay = lab.relay_ip
    out = [send_and_receive(socks["client1"], host, (relay, host_port), payload(1200), "client1", "host")]
    seen = {"client1": out[0].seen_from}
    out.append(send_and_receive(socks["client2"], host, (relay, host_port), payload(1), "client2", "host"))
    seen["client2"] = out[1].seen_from
    for name, size in (("client1", 64), ("client2", 512)):
        to = seen[name]
        if to is not None:
            out.append(send_and_receive(host, socks[name], to, payload(size), "host", name))
    out.append(send_and_receive(socks["client2"], host, (relay, host_port), payload(1472), "client2", "host"))
    return out


def _serve(lab: topology.Lab, state: str, tmp: str) -> subprocess.Popen:
    """`natctl serve` in the relay, as the systemd unit runs it; returns once it listens."""
    print("  relay# natctl serve &")
    log = os.path.join(tmp, "serve.log")
    with open(log, "wb") as out:
        proc = spawn(natctl_argv(state, "serve"), ns=lab.relay_ns, stdout=out, stderr=out)
    deadline = time.monotonic() + 10
    while '"started"' not in open(log).read():
        if proc.poll() is not None or time.monotonic() > deadline:
            stop(proc)
            raise NatctlError(f"natctl serve did not start: {open(log).read().strip()}")
        time.sleep(0.05)
    time.sleep(0.2)  # the registration port opens right after the start line
    return proc


def _tcp_check(lab: topology.Lab, state: str, tmp: str) -> tuple[bool, int]:
    blob = os.urandom(256 * 1024)
    with open(os.path.join(tmp, "map.bin"), "wb") as fh:
        fh.write(blob)
    topology.open_home_port(lab, "host", HTTP_PORT)
    server = spawn([sys.executable, "-m", "http.server", str(HTTP_PORT), "--bind", "0.0.0.0", "--directory", tmp],
                   ns=lab.ns("host"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        natctl(lab, state, "forward", "add", "--port", str(HTTP_PORT), "--to",
               f"{lab.members['host'].public_ip}:{HTTP_PORT}", "--proto", "tcp", "--ttl", "10m")
        deadline = time.monotonic() + 5
        out = os.path.join(tmp, "downloaded.bin")
        while True:
            got = run(["curl", "-sS", "--max-time", "3", "-o", out, f"http://{lab.relay_ip}:{HTTP_PORT}/map.bin"],
                      ns=lab.ns("client1"), check=False)
            if got.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        data = open(out, "rb").read() if got.returncode == 0 else b""
    finally:
        stop(server)
    return data == blob, len(blob)


def run_demo(lab: topology.Lab, tmp: str) -> int:
    state = os.path.join(tmp, "natctl.db")
    print(f"\n1. A relay at {lab.relay_ip}; a game host behind one home router, two players behind another.")
    print("   Both routers are stock Linux masquerade: replies get in only from where a machine sent to.")
    for m in lab.members.values():
        print(f"   {m.name:8} {m.ip:12} behind {m.router} (seen on the internet as {m.public_ip})")
    print("\n2. The relay's admin creates a lobby and runs the daemon:")
    token = json.loads(natctl(lab, state, "lobby", "create", "demo", "--allow", "198.18.0.0/15", "--ttl", "1h",
                              "--json"))["token"]
    daemon = _serve(lab, state, tmp)
    socks = {name: udp_socket(lab.ns(name), port=port) for name, port in CLIENT_PORTS.items()}
    host = GameHost(udp_socket(lab.ns("host"), port=HOST_PORT), (lab.relay_ip, REGISTRATION_PORT), token)
    try:
        print("\n3. The game host registers from its game socket (the reference client, registration v2):")
        relay_ip, host_port = host.start()
        print(f"   players join at {relay_ip}:{host_port}")
        time.sleep(0.3)  # the daemon opens its listener on the new host port
        print("\n4. Players send first; the relay admits each on its first packet, the host opens its NAT")
        print("   toward the player's relay port, and from then on the kernel forwards (bytes checked):")
        deliveries = _udp_round(lab, host_port, host, socks)
    finally:
        host.close()
        for s in socks.values():
            s.close()
    maps = {m["client"]: m["client_port"] for m in json.loads(natctl(lab, state, "map", "list", "--json", echo=False))}
    client_ports = {name: maps.get(f"{lab.members[name].public_ip}:{port}") for name, port in CLIENT_PORTS.items()}
    table("", ["from", "to", "sent to", "arrived from", "bytes", "payload"],
          [(d.sender, d.receiver, _hostport(d.sent_to), _hostport(d.seen_from) if d.seen_from else "LOST",
            d.size, "identical" if d.intact else "WRONG") for d in deliveries])
    # The promise: a player always sees the host as relay:host_port, the host sees each player
    # as relay:client_port.
    udp_ok = len(deliveries) == 5 and all(
        d.intact and d.seen_from == (lab.relay_ip, host_port if d.sender == "host" else client_ports[d.sender])
        for d in deliveries)
    print("\n5. TCP through a static forward: client1 downloads a file with curl from the host's web server:")
    tcp_ok, size = _tcp_check(lab, state, tmp)
    print(f"   {size} bytes over TCP: {'identical' if tcp_ok else 'WRONG'}")
    print("\n6. What the relay holds now:")
    print("\n".join("   " + ln for ln in natctl(lab, state, "status", echo=True).splitlines()))
    stop(daemon)
    ok = udp_ok and tcp_ok
    print("\nResult: " + ("every packet arrived intact, from the promised addresses." if ok else "FAILED (see above)."))
    return 0 if ok else 1


def prepare() -> None:
    """What every demo needs first: root, and Ctrl-C and SIGTERM ending in its teardown (SIGINT may arrive
    ignored from a parent shell)."""
    if os.geteuid() != 0:
        raise NatctlError("the demo builds network namespaces and needs root", "run it with sudo (or: make demo)")
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def main(keep: bool = False) -> int:
    prepare()
    print("Building the lab (network namespaces, 198.18.0.0/15 only) ...")
    lab = topology.build()
    tmp = tempfile.mkdtemp(prefix="natctl-demo-")
    try:
        code = run_demo(lab, tmp)
        if keep:
            print(f"\nThe lab stays up (namespaces {lab.prefix}-*). Press Ctrl-C to remove it.")
            signal.pause()
        return code
    finally:
        lab.teardown()
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        print("Lab removed.")


def _hostport(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"
