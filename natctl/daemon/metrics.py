"""Prometheus metrics of the daemon (text endpoint on localhost with --metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

REGISTRY = CollectorRegistry()
REGISTRATIONS = Counter("natctl_registrations", "Host registrations accepted", registry=REGISTRY)
REGISTRATION_REJECTS = Counter("natctl_registration_rejections", "Registrations refused", ["reason"],
                               registry=REGISTRY)
ADMISSIONS = Counter("natctl_admissions", "Clients admitted on their first packet", registry=REGISTRY)
REJECTIONS = Counter("natctl_rejections", "Packets from senders a lobby does not admit", ["reason"],
                     registry=REGISTRY)
DELIVERED = Counter("natctl_first_packets_delivered", "Packets delivered by the daemon while admitting",
                    registry=REGISTRY)
PUNCHES = Counter("natctl_punches", "Hosts asked to open their NAT toward a client port, by outcome", ["result"],
                  registry=REGISTRY)
PUNCH_REJECTS = Counter("natctl_punch_rejections", "Datagrams on a client port that were not a host's punch",
                        ["reason"], registry=REGISTRY)
NORAY = Counter("natctl_noray_events", "noray protocol events (hosts, udp_registered, relays, unknown_pid, "
                "unknown_oid, unknown_command, junk, refused)", ["event"], registry=REGISTRY)
MAPPINGS = Gauge("natctl_active_mappings", "Client mappings installed", registry=REGISTRY)
SYNC_SECONDS = Histogram("natctl_sync_duration_seconds", "Time to change the kernel, per change",
                         buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1, 5), registry=REGISTRY)
SYNC_FAILURES = Counter("natctl_sync_failures", "Kernel changes that failed", registry=REGISTRY)
EXPIRED = Counter("natctl_expired", "Mappings, lobbies and forwards removed by cleanup", ["kind"],
                  registry=REGISTRY)


def serve_metrics(address: str) -> None:
    """Start the text endpoint; ``address`` is HOST:PORT (keep it on localhost)."""
    host, _, port = address.rpartition(":")
    start_http_server(int(port), addr=host or "127.0.0.1", registry=REGISTRY)
