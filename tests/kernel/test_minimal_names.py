"""natctl on a minimal system: no /etc/protocols, no /etc/services (Debian without netbase).

There nft prints protocols as numbers (17, not "udp"); natctl must read the
kernel's state exactly as on a full system. Each natctl command runs in a
private mount namespace where both files are hidden under /dev/null, then in
the lab's relay namespace.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import threading

import pytest

from natctl.lab import topology
from natctl.lab.netns import entered, run
from natctl.lab.traffic import payload, send_and_receive, tcp_connect
from support import labs
from support.cli import Cli
from support.scenarios import add, pub

pytestmark = pytest.mark.kernel
# Hand-made mappings: the lab's home routers are cones here (see support.labs.cone_lab for why).
lab = pytest.fixture(scope="module", name="lab")(labs.cone_lab)

# unshare makes the mounts private to natctl's process; the script ends by running the rest.
HIDE = ["unshare", "--mount", "sh", "-c",
        'for f in /etc/protocols /etc/services; do [ -e "$f" ] && mount --bind /dev/null "$f"; done; exec "$@"', "sh"]
TCP_PORT = 7000


@pytest.fixture
def minimal(relay: Cli) -> Cli:
    """The relay fixture's natctl (same store, same cleanup), on a system without the name files."""
    return Cli(relay.ns, relay.state, relay.relay_ip, prefix=HIDE)


def tcp_transfer(lab: topology.Lab, size: int) -> None:
    """client1 sends ``size`` bytes to relay:TCP_PORT; host2 answers with their digest."""
    blob = os.urandom(size)
    with entered(lab.ns("host2")):
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", TCP_PORT))
    server.listen(1)
    server.settimeout(5)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(5)
            digest = hashlib.sha256()
            while chunk := conn.recv(65536):
                digest.update(chunk)
            conn.sendall(digest.digest())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with tcp_connect(lab.ns("client1"), (lab.relay_ip, TCP_PORT), timeout=5) as client:
            client.sendall(blob)
            client.shutdown(socket.SHUT_WR)
            answer = b""
            while len(answer) < 32 and (chunk := client.recv(32)):
                answer += chunk
        assert answer == hashlib.sha256(blob).digest()
    finally:
        thread.join(5)
        server.close()


def test_the_name_files_are_hidden_from_natctl(lab, minimal):
    probe = "import socket; socket.getprotobyname('udp')"
    hidden = subprocess.run([*HIDE, "ip", "netns", "exec", lab.relay_ns, "python3", "-c", probe], check=False,
                            capture_output=True)
    assert hidden.returncode != 0  # as on a system without netbase
    listing = subprocess.run([*HIDE, "ip", "netns", "exec", lab.relay_ns, "nft", "-j", "list", "tables"],
                             check=False, capture_output=True)
    assert listing.returncode == 0, listing.stderr


def test_counters_and_cleanup_without_name_files(lab, minimal, socks):
    minimal("lobby", "create", "a")
    m1 = add(minimal, lab, socks, "a", "host", "client1")
    m2 = add(minimal, lab, socks, "a", "host", "client2")
    r = lab.relay_ip
    for _ in range(3):
        d = send_and_receive(socks["client1"], socks["host"], (r, m1["host_port"]), payload(200))
        assert d.intact and d.seen_from == (r, m1["client_port"]), d
        d = send_and_receive(socks["host"], socks["client1"], (r, m1["client_port"]), payload(200))
        assert d.intact and d.seen_from == (r, m1["host_port"]), d
    topology.open_home_port(lab, "host2", TCP_PORT)
    minimal("forward", "add", "--port", str(TCP_PORT), "--to", f"{lab.members['host2'].public_ip}:{TCP_PORT}",
            "--proto", "tcp")
    tcp_transfer(lab, 100_000)

    status = minimal.json("status")
    assert all(m["installed"] for m in status["mappings"])  # the kernel's elements read back as planned
    counts = {m["client"]: (m["to_host_packets"], m["to_client_packets"]) for m in status["mappings"]}
    assert counts[pub(lab, socks, "client1")] == (3, 3)
    (fwd,) = status["forwards"]
    assert fwd["installed"] and fwd["packets"] > 0
    # What the kernel holds reads back as exactly what the store says: nothing to redo.
    result = minimal.json("apply")
    assert (result["added"], result["deleted"], result["created_table"]) == (0, 0, False)

    # Drop the kernel's tag, so the next change diffs the store against the kernel's listing,
    # and the elements it deletes (and their conntrack flows) come from that listing.
    run(["nft", "flush", "set", "inet", "natctl", "generation"], ns=lab.relay_ns)
    minimal("map", "remove", "--lobby", "a", "--client", pub(lab, socks, "client1"))
    minimal("forward", "remove", str(TCP_PORT))
    status = minimal.json("status")
    assert [m["client"] for m in status["mappings"]] == [pub(lab, socks, "client2")] and status["forwards"] == []
    assert minimal.json("apply")["deleted"] == 0
    d = send_and_receive(socks["client2"], socks["host"], (r, m2["host_port"]), payload(100))
    assert d.intact and d.seen_from == (r, m2["client_port"]), d  # the other mapping still relays
