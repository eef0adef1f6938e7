"""`natctl demo --fleet`: three relays on one throwaway PostgreSQL, in namespaces, one of them killed.

It drives natctl as the README does (each relay's shell: relay join, serve, lobby create; hosts
registering with the reference client at one well-known relay), checks every echo byte for byte,
and removes everything it made, also on Ctrl-C or failure.
"""

from __future__ import annotations

import signal
import tempfile
import time

from natctl.demo import prepare
from natctl.lab import fleet as fleetlab
from natctl.lab.fleet import Echo, FleetLab, echoed
from natctl.lab.traffic import payload, udp_socket
from natctl.output import table

SITES = {"home-a": ["host-a"], "home-b": ["host-b"], "home-p": ["p1", "p2"]}
REGIONS = ("eu", "eu", "us")


def _say(fleet: FleetLab, relay: fleetlab.Relay, *args: str) -> str:
    print(f"  {relay.name}# natctl {' '.join(args)}")
    return fleet.natctl(relay, *args).stdout


def _relays(fleet: FleetLab, on: fleetlab.Relay) -> None:
    rows = fleet.json(on, "relay", "list")
    table("", ["relay", "ip", "region", "state", "lobbies"],
          [(r["name"], r["ip"], r["region"], r["state"], r["lobbies"]) for r in rows])


def run_demo(fleet: FleetLab) -> int:
    r1, r2, r3 = fleet.relays
    print(f"\n1. Three relays (fresh VPSes, forwarding off) share one PostgreSQL at {fleet.pg.url}:")
    for r in fleet.relays:
        print(f"  {r.name}# natctl relay join --region {r.region} --name {r.name}    ({r.ip})")
    fleet.start()
    print("  every relay# natctl serve &")
    print("\n2. An operator creates lobbies on relay1; each is placed by region, then load:")
    made = {"a": fleet.json(r1, "lobby", "create", "a", "--open"),
            "b": fleet.json(r1, "lobby", "create", "b", "--open", "--region", "us")}
    print("  relay1# natctl lobby create a --open;  natctl lobby create b --open --region us")
    table("", ["lobby", "placed on"], [(n, m["relay"]) for n, m in made.items()])
    print(f"\n3. Both hosts register at one well-known address ({r3.name}, {r3.ip}); the reply sends each")
    print("   to the relay that holds its lobby (registration v3), and its players play there:")
    hosts = {n: Echo(fleet.lab.ns(f"host-{n}"), r3.ip, made[n]["token"]) for n in made}
    players = {"a": udp_socket(fleet.lab.ns("p1"), port=41000), "b": udp_socket(fleet.lab.ns("p2"), port=41001)}
    try:
        time.sleep(0.5)  # each relay's daemon opens the new host port's listener
        ok = True
        for n in made:
            passed = echoed(players[n], hosts[n].address, payload(1200))
            ok &= passed
            print(f"   lobby {n}: players send to {hosts[n].address[0]}:{hosts[n].address[1]} "
                  f"({fleet.at(hosts[n].address[0]).name}); 1200 bytes echoed {'intact' if passed else 'LOST'}")
        _relays(fleet, r2)
        victim = fleet.at(hosts["a"].address[0])
        print(f"\n4. {victim.name} dies (its daemon killed, its kernel table gone). The others watch its heartbeat")
        print("   stop, move lobby a to a live relay of its region, the host's keepalives go unanswered and it")
        print("   asks the well-known address again; its player follows the host:")
        fleet.kill(victim)
        survivor = next(r for r in fleet.relays if r.region == victim.region and r is not victim)
        took = fleetlab.wait_for("lobby a forwarding again", lambda: hosts["a"].address[0] == survivor.ip and echoed(
            players["a"], hosts["a"].address, payload(800), tries=1, wait=0.3), seconds=30)
        print(f"   lobby a forwards again through {survivor.name}, {took:.1f} s after the kill "
              f"(heartbeat 0.5 s, dead after 3 s here; the defaults are 2 s and 10 s)")
        still = echoed(players["b"], hosts["b"].address, payload(800))
        ok &= still
        print(f"   lobby b, on {fleet.at(hosts['b'].address[0]).name}, never noticed: {'intact' if still else 'LOST'}")
        _relays(fleet, survivor)
        print("\n5. The database stops for 4 seconds: every relay keeps forwarding what it has.")
        fleet.pg.stop()
        down = time.monotonic()
        try:
            sent = 20
            passed_b = sum(echoed(players["b"], hosts["b"].address, payload(300) + bytes([i]), tries=1)
                           for i in range(sent))
            refused = fleet.natctl(r3, "lobby", "create", "during", check=False)
            time.sleep(max(0.0, 4.0 - (time.monotonic() - down)))  # longer than dead_after
            print(f"   {passed_b} of {sent} datagrams echoed with the database down;")
            print(f"   a change meanwhile: {refused.stderr.strip()}")
            ok &= passed_b == sent and refused.returncode == 8
        finally:
            fleet.pg.start()
        fleetlab.wait_for("the relays beating again", lambda: all(
            r["state"] == "live" for r in fleet.json(r3, "relay", "list") if r["name"] != victim.name), seconds=15)
        print("   back: nobody was declared dead for it.")
    finally:
        for h in hosts.values():
            h.close()
        for s in players.values():
            s.close()
    print("\nResult: " + ("every echo arrived intact, through the relay that holds its lobby." if ok
                          else "FAILED (see above)."))
    return 0 if ok else 1


def main(keep: bool = False) -> int:
    prepare()
    print("Building the fleet lab (PostgreSQL in a temp dir, network namespaces on 198.18.0.0/15) ...")
    with tempfile.TemporaryDirectory(prefix="natctl-fleet-demo-") as tmp:
        fleet = fleetlab.build(tmp, REGIONS, SITES)
        try:
            code = run_demo(fleet)
            if keep:
                print(f"\nThe fleet stays up (namespaces {fleet.lab.prefix}-*, store {fleet.pg.url}). Ctrl-C removes it.")
                signal.pause()
            return code
        finally:
            fleet.close()
            print("Fleet lab removed.")

