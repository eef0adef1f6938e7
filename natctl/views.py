"""What the service returns: flat records whose field names are the --json keys.

These keys are a stable interface for scripts (documented in the README):
add fields, never rename or remove them. The one exception is what only the
kernel knows (a record's ``kernel_fields``: installed, counters): None there
means the kernel was not or could not be read (not root), and --json leaves
those keys out rather than print a false or a 0 it does not know.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, ClassVar, TypeVar


@dataclass(frozen=True)
class LobbyView:
    """One lobby as listings show it."""

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
    relay: str = ""  # the fleet relay it is placed on ("" on one relay)


@dataclass(frozen=True)
class MappingView:
    """One mapping as listings and `map add` show it."""

    lobby: str
    proto: str
    host: str
    client: str
    relay_ip: str
    host_port: int
    client_port: int
    # What the kernel holds and counted; None: unknown (see kernel_fields). A new mapping's are
    # known without a read: installed once applied, nothing counted yet.
    installed: bool | None = False
    to_host_packets: int | None = 0
    to_host_bytes: int | None = 0
    to_client_packets: int | None = 0
    to_client_bytes: int | None = 0
    last_seen: float = 0.0  # from the store (the last cleanup's look at the counters)
    # The share of the to_* counts that the XDP accelerator forwarded (the rest went through nftables).
    xdp_to_host_packets: int | None = 0
    xdp_to_host_bytes: int | None = 0
    xdp_to_client_packets: int | None = 0
    xdp_to_client_bytes: int | None = 0

    kernel_fields: ClassVar[tuple[str, ...]] = (
        "installed", "to_host_packets", "to_host_bytes", "to_client_packets", "to_client_bytes",
        "xdp_to_host_packets", "xdp_to_host_bytes", "xdp_to_client_packets", "xdp_to_client_bytes")


@dataclass(frozen=True)
class ForwardView:
    """One port forward as listings show it."""

    port: int
    proto: str
    to: str
    ttl: int | None
    created: float
    expires: float | None
    owner: str
    # What the kernel holds and counted; None: unknown (see kernel_fields).
    installed: bool | None = False
    packets: int | None = 0
    bytes: int | None = 0

    kernel_fields: ClassVar[tuple[str, ...]] = ("installed", "packets", "bytes")


@dataclass(frozen=True)
class SyncResult:
    """What one sync did to the kernel."""

    backend: str
    added: int
    deleted: int
    created_table: bool
    flows_forgotten: int
    seconds: float
    # How the kernel was known before the change: "read" (its maps read and compared), "ruleset" (nftables'
    # ruleset generation proved it as natctl's last write left it: no map of it read), "scoped" (only the
    # change's own elements, the kernel carrying the store's tag)
    checked: str = "read"

    @property
    def changed(self) -> bool:
        return bool(self.added or self.deleted or self.created_table)


V = TypeVar("V", MappingView, ForwardView)


def unknown(view: V) -> V:
    """``view`` with its kernel fields unknown: the kernel was not, or could not be, read."""
    nothing: dict[str, Any] = dict.fromkeys(view.kernel_fields)
    return replace(view, **nothing)


def cell(value: bool | int | None) -> str:
    """A kernel field in a table: yes/NO for installed, the count, or ? when the kernel could not be read."""
    if value is None:
        return "?"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    return str(value)


def as_json(obj: Any) -> Any:
    if isinstance(obj, (list, tuple)):
        return [as_json(o) for o in obj]
    if isinstance(obj, dict):
        return {k: as_json(v) for k, v in obj.items()}
    if hasattr(obj, "__dataclass_fields__"):
        out = asdict(obj)
        for k in getattr(obj, "kernel_fields", ()):
            if out.get(k, 0) is None:  # unknown: left out, never printed as false or 0
                del out[k]
        return out
    return obj


@dataclass(frozen=True)
class RelayView:
    """One relay of a fleet (natctl relay list)."""

    name: str
    ip: str
    region: str
    state: str  # live, draining or dead as the fleet marked it; "silent" when its heartbeat is late
    heartbeat_age: float  # seconds since its last heartbeat, by the database's clock
    capacity: int
    lobbies: int
    mappings: int
    pps: float
    registration_port: int
