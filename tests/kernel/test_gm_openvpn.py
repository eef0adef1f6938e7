"""OpenVPN as the GMs' VPN, for real: natctl writes the ccd file and the profile, a real OpenVPN server
on the relay hands out the fixed address, the GM behind NAT connects with that profile as printed,
and a player reaches the GM's table through the session's forward."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from natctl.lab import topology
from natctl.lab.netns import natctl_argv, run, spawn, stop
from natctl.lab.traffic import tcp_connect
from support import gm_scenario

pytestmark = pytest.mark.kernel
SUBNET = "198.18.252.0/24"
EXT = {"server": "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n",
       "client": "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature\n"}


def make_pki(pki) -> None:
    """A throwaway CA in easy-rsa's layout: ca.crt, issued/NAME.crt, private/NAME.key."""
    for d in ("issued", "private"):
        (pki / d).mkdir(parents=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run(["openssl", "req", "-x509", *ec, "-keyout", str(pki / "private" / "ca.key"), "-out", str(pki / "ca.crt"),
         "-subj", "/CN=natctl test CA", "-days", "1"])
    for name, kind in (("server", "server"), ("gm1", "client")):
        key, csr, crt = pki / "private" / f"{name}.key", pki / f"{name}.csr", pki / "issued" / f"{name}.crt"
        (pki / f"{kind}.ext").write_text(EXT[kind])
        run(["openssl", "req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}"])
        run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(pki / "ca.crt"), "-CAkey",
             str(pki / "private" / "ca.key"), "-CAcreateserial", "-out", str(crt), "-days", "1",
             "-extfile", str(pki / f"{kind}.ext")])


@pytest.fixture(scope="module")
def lab():
    lab = topology.build({"home-gm1": ["gm1"], "home-players": ["player1"]})
    try:
        yield lab
    finally:
        lab.teardown()


def test_openvpn_ccd_profile_and_session(lab, tmp_path):
    pki, ccd, status = tmp_path / "pki", tmp_path / "ccd", tmp_path / "status.log"
    make_pki(pki)
    ccd.mkdir()
    server_conf = tmp_path / "server.conf"
    server_conf.write_text("\n".join([
        "dev tun", "topology subnet", "server 198.18.252.0 255.255.255.0 nopool", "proto udp", "port 1194",
        f"ca {pki / 'ca.crt'}", f"cert {pki / 'issued' / 'server.crt'}", f"key {pki / 'private' / 'server.key'}",
        "dh none", f"client-config-dir {ccd}", "ccd-exclusive", f"status {status} 1", "status-version 2",
        "keepalive 2 10", "disable-dco", "verb 3", ""]))
    env = {**os.environ, "NATCTL_CONFIG": "/nonexistent",
           "NATCTL_GM_VPN": "openvpn", "NATCTL_GM_SUBNET": SUBNET, "NATCTL_GM_OPENVPN_CCD": str(ccd),
           "NATCTL_GM_OPENVPN_PKI": str(pki), "NATCTL_GM_OPENVPN_STATUS": str(status)}

    def natctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(natctl_argv(str(tmp_path / "natctl.db"), *args, ns=lab.relay_ns), capture_output=True,
                              text=True, env=env, timeout=60)
        assert not check or proc.returncode == 0, proc.stderr
        return proc

    procs = []
    try:
        procs.append(spawn(["openvpn", "--config", str(server_conf)], ns=lab.relay_ns,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        profile = natctl("gm", "add", "gm1").stdout
        assert (ccd / "gm1").read_text().endswith("ifconfig-push 198.18.252.2 255.255.255.0\n")
        (tmp_path / "gm1.ovpn").write_text(profile)
        assert "tunnel is down" in natctl("gm", "open", "gm1", check=False).stderr
        procs.append(spawn(["openvpn", "--config", str(tmp_path / "gm1.ovpn")], ns=lab.ns("gm1"),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(spawn(["socat", f"TCP-LISTEN:{gm_scenario.GAME_PORT},reuseaddr,fork",
                            f"SYSTEM:echo '{gm_scenario.banner('gm1')}'"], ns=lab.ns("gm1")))
        gm_scenario.wait_for("gm1 on the OpenVPN server", lambda: status.exists() and ",gm1," in status.read_text())
        natctl("gm", "open", "gm1", "--for", "10m")
        (gm,) = json.loads(natctl("gm", "list", "--json").stdout)
        assert (gm["address"], gm["tunnel"], gm["session"]) == ("198.18.252.2", "up", True)
        with tcp_connect(lab.ns("player1"), (lab.relay_ip, gm["port"])) as s:
            assert s.makefile("rb").readline().decode().strip() == gm_scenario.banner("gm1")
        natctl("gm", "remove", "gm1")
        assert sorted(os.listdir(ccd)) == []
    finally:
        for p in procs:
            stop(p)
