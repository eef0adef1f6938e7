/* natctl's XDP accelerator: the contract between the BPF program and Python.
 *
 * Every struct here is mirrored by natctl/kernel/bpf_layout.py, and
 * tests/test_bpf_layout.py checks sizes and offsets against this file.
 * Change both together.
 *
 * Byte order: addresses and ports in keys and rewrite values are in network
 * order, as they sit in the packet, so the program compares and copies them
 * without conversion. Counters and timestamps are in host order.
 */
#ifndef NATCTL_H
#define NATCTL_H

#include <linux/types.h>

/* Map names as the kernel reports them (at most 15 characters): natctl finds
 * its maps again through the program attached to the interface, by name. */
#define NATCTL_PROG_NAME "natctl_xdp"
#define NATCTL_RELAY_MAP "natctl_relay"
#define NATCTL_FLOWS_MAP "natctl_flows"
#define NATCTL_COUNT_MAP "natctl_count"
#define NATCTL_LEASE_MAP "natctl_lease"

/* Two entries per UDP mapping (both directions). Maps are not preallocated,
 * so a small relay pays only for what it holds. */
#define NATCTL_MAX_ENTRIES 262144
#define NATCTL_PUNCH_SIZE 10 /* bytes of a registration-v2 PUNCH (natctl.daemon.wire) */

/* One direction of one mapping: what a packet arriving at the relay carries. */
struct natctl_key {
	__u32 saddr; /* sender's address */
	__u16 sport; /* sender's port */
	__u16 dport; /* relay port it was sent to */
};

/* The rewrite for that direction: relay:new_sport -> new_daddr:new_dport. */
struct natctl_rewrite {
	__u32 new_saddr; /* the relay's address */
	__u32 new_daddr; /* the peer's address */
	__u16 new_sport; /* the relay port the peer sees */
	__u16 new_dport; /* the peer's port */
};

/* Per mapping direction and per CPU: what XDP forwarded (PASSed packets are
 * counted by nftables instead, never by both). Python creates the entry
 * (zeroed) before the mapping and deletes it after, so the program never
 * inserts. */
struct natctl_flow_stats {
	__u64 packets;
	__u64 bytes;     /* IP bytes (header included), like nftables' counters */
	__u64 last_seen; /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
};

/* A fleet relay's lease (natctl_lease, one entry, key 0): the bpf_ktime_get_ns()
 * (CLOCK_MONOTONIC) after which mapped packets are passed to the stack, where
 * the nftables fence drops them; its daemon pushes it forward every heartbeat.
 * 0: no lease (a single relay never sets one). See natctl/fleet/fence.py. */

/* Per-CPU counters, one slot each: why a packet was forwarded or passed. */
enum natctl_counter {
	NATCTL_C_SEEN = 0,       /* every frame the program saw */
	NATCTL_C_TX,             /* rewritten and bounced out of the same interface */
	NATCTL_C_REDIRECT,       /* rewritten and redirected to another interface */
	NATCTL_C_PASS_NOT_IPV4,  /* ARP, IPv6, VLAN tags, ... */
	NATCTL_C_PASS_MALFORMED, /* truncated, bad version or lengths, bad IP checksum */
	NATCTL_C_PASS_OPTIONS,   /* IP options */
	NATCTL_C_PASS_FRAGMENT,
	NATCTL_C_PASS_NOT_UDP,
	NATCTL_C_PASS_NO_KEY,    /* not a mapping: registration, unknown senders, ... */
	NATCTL_C_PASS_TTL,       /* TTL <= 1: the stack sends the ICMP */
	NATCTL_C_PASS_NO_NEIGH,  /* next hop's MAC unknown: the stack resolves it */
	NATCTL_C_PASS_FIB,       /* no route, forwarding off, MTU too small, ... */
	NATCTL_C_PASS_PUNCH,     /* a host's punch: for the daemon (natctl.daemon.punch) */
	NATCTL_C_PASS_FENCED,    /* a fleet relay's lease ran out: nftables' fence drops it (natctl.fleet.fence) */
	NATCTL_C_MAX,
};

#endif
