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
from natctl.lab.netns import natctl_argv, run, spawn, stop
from natctl.lab.traffic import Delivery, payload, send_and_receive, udp_socket
from natctl.output import table

HOST_PORT, CLIENT_PORTS, HTTP_PORT = 27015, {"client1": 40001, "client2": 40002}, 8080


def natctl(lab: topology.Lab, state: str, *args: str, echo: bool = True) -> str:
    """Run the natctl CLI inside the relay namespace, as a user on the VPS would."""
    if echo:
        print(f"  relay# natctl {' '.join(args)}")
    proc = run(natctl_argv(state, *args), ns=lab.relay_ns, check=False)
    if proc.returncode != 0:
        raise NatctlError(f"natctl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _udp_round(lab: topology.Lab, ports: dict, socks: dict) -> list[Delivery]:
    relay = lab.relay_ip
    host = socks["host"]
    # client1 speaks first, as a player joining does; client2 hears from the
    # host first: both directions are in the kernel before any client traffic.
    return [
        send_and_receive(socks["client1"], host, (relay, ports["host"]), payload(1200), "client1", "host"),
        send_and_receive(host, socks["client1"], (relay, ports["client1"]), payload(64), "host", "client1"),
        send_and_receive(host, socks["client2"], (relay, ports["client2"]), payload(512), "host", "client2"),
        send_and_receive(socks["client2"], host, (relay, ports["host"]), payload(1), "client2", "host"),
        send_and_receive(socks["client2"], host, (relay, ports["host"]), payload(1472), "client2", "host"),
    ]


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
    for m in lab.members.values():
        print(f"   {m.name:8} {m.ip:12} behind {m.router} (seen on the internet as {m.public_ip})")
    print("\n2. The relay's admin creates a lobby and maps the two players to the host:")
    natctl(lab, state, "lobby", "create", "demo", "--allow", "198.18.0.0/15", "--ttl", "1h")
    socks = {"host": udp_socket(lab.ns("host"), port=HOST_PORT)}
    ports: dict[str, int] = {}
    for name, port in CLIENT_PORTS.items():
        socks[name] = udp_socket(lab.ns(name), port=port)
        out = natctl(lab, state, "map", "add", "--lobby", "demo", "--host",
                     f"{lab.members['host'].public_ip}:{HOST_PORT}", "--client",
                     f"{lab.members[name].public_ip}:{port}", "--json")
        got = json.loads(out)
        ports["host"], ports[name] = got["host_port"], got["client_port"]
    print(f"   host relay port {ports['host']}; client relay ports "
          + ", ".join(f"{n} {ports[n]}" for n in CLIENT_PORTS))
    # Each game socket has talked to the relay once (a host does when it
    # registers), which opens its home router toward the relay.
    for sock in socks.values():
        topology.say_hello(sock, lab)
    print("\n3. Real UDP both ways through the kernel (payloads checked byte for byte):")
    deliveries = _udp_round(lab, ports, socks)
    for s in socks.values():
        s.close()
    table("", ["from", "to", "sent to", "arrived from", "bytes", "payload"],
          [(d.sender, d.receiver, _hostport(d.sent_to), _hostport(d.seen_from) if d.seen_from else "LOST",
            d.size, "identical" if d.intact else "WRONG") for d in deliveries])
    # The promise: a client always sees the host as relay:host_port, the host
    # sees each client as relay:client_port.
    udp_ok = all(d.intact and d.seen_from == (lab.relay_ip, ports["host"] if d.sender == "host" else ports[d.sender])
                 for d in deliveries)
    print("\n4. TCP through a static forward: client1 downloads a file with curl from the host's web server:")
    tcp_ok, size = _tcp_check(lab, state, tmp)
    print(f"   {size} bytes over TCP: {'identical' if tcp_ok else 'WRONG'}")
    print("\n5. What the relay holds now:")
    print("\n".join("   " + ln for ln in natctl(lab, state, "status", echo=True).splitlines()))
    ok = udp_ok and tcp_ok
    print("\nResult: " + ("every packet arrived intact, from the promised addresses." if ok else "FAILED (see above)."))
    return 0 if ok else 1


def main(keep: bool = False) -> int:
    if os.geteuid() != 0:
        raise NatctlError("the demo builds network namespaces and needs root", "run it with sudo (or: make demo)")
    # Ctrl-C and SIGTERM both end in the teardown below (SIGINT may arrive ignored from a parent shell).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
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
