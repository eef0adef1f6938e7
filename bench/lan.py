"""The virtual LAN's figures (as root, from the checkout: sudo .venv/bin/python -m bench.lan).

Unicast between two members through the relay (TCP throughput with iperf3, UDP round trips), and the
relay's CPU per broadcast fanned out to 8 and to 64 members (CPU of the relay's wireguard-go, which
also carries the kernel's netdev fan-out: tun writes are processed in the writer's context).
"""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, "tests")  # the LAN lab is the kernel tests' (tests/support/lan_lab.py)
from support import lan_lab  # noqa: E402
from support.serve import Daemon  # noqa: E402

PING = r'''
import socket, sys, time, statistics
mode, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
if mode == "pong":
    s.bind(("0.0.0.0", port)); s.settimeout(30)
    while True:
        d, a = s.recvfrom(2048); s.sendto(d, a)
        if d == b"end": break
else:
    target, n = sys.argv[3], int(sys.argv[4]); s.settimeout(2); rtts = []
    for i in range(n):
        t = time.perf_counter(); s.sendto(b"x" * 64, (target, port)); s.recv(2048); rtts.append(time.perf_counter() - t)
    s.sendto(b"end", (target, port))
    rtts.sort(); print(statistics.median(rtts) * 1e6, rtts[int(len(rtts) * 0.99)] * 1e6)
'''
BLAST = r'''
import socket, sys, time
n, rate = int(sys.argv[1]), float(sys.argv[2])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
for i in range(n):
    s.sendto(b"DISCOVER" + bytes(56), ("255.255.255.255", 23456)); time.sleep(1 / rate)
'''


def cpu(pid: int) -> float:
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ll = lan_lab.build()
    os.environ.update(ll.env)
    d = None
    for name, text in (("ping.py", PING), ("blast.py", BLAST)):
        with open(os.path.join(ll.tmp, name), "w") as fh:
            fh.write(text)
    try:
        tok = ll.relay.json("lan", "create", "bench", "--max-members", "80")["token"]
        d = Daemon(ll.lab, ll.state, os.path.join(ll.tmp, "serve.log")).start()
        a = ll.instance_up("machine", "a", tok, "a")
        ll.join("member3", "c", tok, "c")
        time.sleep(1)
        peer = "198.18.128.2"
        srv = subprocess.Popen([*ll.where("member3"), "iperf3", "-s", "-1"], stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        res = json.loads(subprocess.run([*ll.where(a), "iperf3", "-c", peer, "-t", "5", "-J"], capture_output=True,
                                        text=True).stdout)
        srv.wait(10)
        tcp = res["end"]["sum_received"]["bits_per_second"] / 1e6
        pong = subprocess.Popen([*ll.where("member3"), "/usr/bin/python3", os.path.join(ll.tmp, "ping.py"), "pong", "7000"])
        time.sleep(0.3)
        out = subprocess.run([*ll.where(a), "/usr/bin/python3", os.path.join(ll.tmp, "ping.py"), "ping", "7000", peer, "2000"],
                             capture_output=True, text=True).stdout.split()
        pong.wait(10)
        print(f"unicast a(instance, home-a) -> c(member3, home-b) through the relay: TCP {tcp:.0f} Mbit/s; "
              f"UDP 64 B round trip median {float(out[0]):.0f} us, p99 {float(out[1]):.0f} us")
        relay_wg = next(int(p) for p in subprocess.run(["ip", "netns", "pids", ll.lab.relay_ns], capture_output=True,
                                                        text=True).stdout.split()
                        if open(f"/proc/{p}/comm").read().strip() == "wireguard-go")
        members = 2
        for target in (8, 64):
            while members < target:
                ll.instance_up("machine", f"r{members}", tok, f"r{members}")
                members += 1
            time.sleep(2)
            n, rate = 2000, 400.0
            for attempt in range(3):
                c0 = cpu(relay_wg)
                subprocess.run([*ll.where(a), "/usr/bin/python3", os.path.join(ll.tmp, "blast.py"), str(n), str(rate)])
                time.sleep(1)
                used = cpu(relay_wg) - c0
                print(f"fan-out to {target} members ({target - 1} copies each): {n} broadcasts at {rate:.0f}/s, "
                      f"relay wireguard-go CPU {used:.2f} s = {used / n * 1e6:.0f} us per broadcast, "
                      f"{used / n / (target - 1) * 1e6:.1f} us per copy (run {attempt + 1})")
        fan = subprocess.run(["ip", "netns", "exec", ll.lab.relay_ns, "nft", "-j", "list", "table", "netdev",
                              "natctl_lan_fanout"], capture_output=True, text=True).stdout
        from natctl.lan.plan import fanout_counters
        print("netdev counters of the sender:", fanout_counters(fan).get("198.18.128.1"))
    finally:
        if d:
            d.stop()
        ll.teardown()


if __name__ == "__main__":
    main()
