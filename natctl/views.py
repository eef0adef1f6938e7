"""What the service returns: flat records whose field names are the --json keys.

These keys are a stable interface for scripts (documented in the README):
add fields, never rename or remove them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class LobbyView:
    name: str
    id: int
    allow: list[str]
    open: bool
    ttl: int | None
    created: float
    expires: float | None
    closed: float | None
    host: str | None
    host_port: int | None
    clients: int


@dataclass(frozen=True)
class MappingView:
    lobby: str
    proto: str
    host: str
    client: str
    relay_ip: str
    host_port: int
    client_port: int
    installed: bool = False
    to_host_packets: int = 0
    to_host_bytes: int = 0
    to_client_packets: int = 0
    to_client_bytes: int = 0
    last_seen: float = 0.0
    # The share of the to_* counts that the XDP accelerator forwarded (the rest went through nftables).
    xdp_to_host_packets: int = 0
    xdp_to_host_bytes: int = 0
    xdp_to_client_packets: int = 0
    xdp_to_client_bytes: int = 0


@dataclass(frozen=True)
class ForwardView:
    port: int
    proto: str
    to: str
    ttl: int | None
    created: float
    expires: float | None
    owner: str
    installed: bool = False
    packets: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class SyncResult:
    backend: str
    added: int
    deleted: int
    created_table: bool
    flows_forgotten: int
    seconds: float

    @property
    def changed(self) -> bool:
        return bool(self.added or self.deleted or self.created_table)


def as_json(obj: Any) -> Any:
    if isinstance(obj, (list, tuple)):
        return [as_json(o) for o in obj]
    if isinstance(obj, dict):
        return {k: as_json(v) for k, v in obj.items()}
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return obj
