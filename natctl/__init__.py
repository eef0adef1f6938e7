"""natctl: a relay controller for multiplayer games on one public IP."""

__version__ = "0.1.0"
