"""`natctl serve` in a lab's relay namespace, its JSON log in a file (the kernel tests' daemon)."""

from __future__ import annotations

import time

from natctl.lab.gamehost import GameHost
from natctl.lab.serve import Daemon

REG = 8809  # the registration port


def host_lobby(lab, relay, daemon: Daemon, game: dict, *create_args: str) -> tuple[str, int, str]:
    """Create lobby g, start the daemon, register the host from its game socket with the reference
    client (registration v2: it opens its stock router toward each new client); the host's loop owns
    ``game["host"]`` from here on. Returns (relay_ip, host_port, token) once the host port listens."""
    token = relay.json("lobby", "create", "g", *create_args)["token"]
    daemon.start()
    game["host"] = GameHost(game["host"], (lab.relay_ip, REG), token)
    relay_ip, host_port = game["host"].start()
    time.sleep(0.3)  # the daemon opens its listener on the new host port
    return relay_ip, host_port, token
