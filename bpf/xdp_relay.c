// SPDX-License-Identifier: GPL-2.0
/* natctl's XDP fast path: rewrite a mapped UDP packet and send it straight
 * back out, before the kernel stack (conntrack, NAT, routing) sees it.
 *
 * It holds the same mappings as the nftables maps (see natctl.h). Anything it
 * does not own, or cannot forward safely, it passes to the stack untouched,
 * where nftables handles it: XDP accelerates, nftables guarantees.
 *
 * Built by bpf/Makefile: clang -O2 -g -target bpf (no kernel headers needed).
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "natctl.h"

#define AF_INET 2
#define IP_MF_OFFSET 0x3fff /* more-fragments flag and fragment offset */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, NATCTL_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct natctl_key);
	__type(value, struct natctl_rewrite);
} natctl_relay SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, NATCTL_MAX_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct natctl_key);
	__type(value, struct natctl_flow_stats);
} natctl_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, NATCTL_C_MAX);
	__type(key, __u32);
	__type(value, __u64);
} natctl_count SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} natctl_lease SEC(".maps");

/* The daemon that owns these mappings stopped renewing its lease (see natctl.h):
 * the other relays are about to, or did, move its lobbies. */
static __always_inline int lease_over(void)
{
	__u32 zero = 0;
	__u64 *deadline = bpf_map_lookup_elem(&natctl_lease, &zero);

	return deadline && *deadline && bpf_ktime_get_ns() > *deadline;
}

static __always_inline void count(__u32 which)
{
	__u64 *slot = bpf_map_lookup_elem(&natctl_count, &which);

	if (slot)
		*slot += 1; /* per-CPU slot: no atomics needed */
}

static __always_inline int pass(__u32 why)
{
	count(why);
	return XDP_PASS;
}

/* Fold a 32-bit one's complement sum into 16 bits. */
static __always_inline __u16 fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m'), accumulated over changed words.
 * Words are taken as they sit in memory; the one's complement sum does not
 * depend on byte order, so nothing is converted. */
static __always_inline __u32 acc16(__u32 acc, __u16 from, __u16 to)
{
	return acc + (__u16)~from + to;
}

static __always_inline __u32 acc32(__u32 acc, __u32 from, __u32 to)
{
	return acc16(acc16(acc, from & 0xffff, to & 0xffff), from >> 16, to >> 16);
}

/* A header whose checksum is wrong would be dropped by the stack: pass it
 * there rather than forward it. */
static __always_inline int ip_checksum_ok(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u32 sum = 0;

#pragma unroll
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += w[i];
	return fold(sum) == 0xffff;
}

SEC("xdp")
int natctl_xdp(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 frame_len = ctx->data_end - ctx->data;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct udphdr *udp;

	count(NATCTL_C_SEEN);
	if ((void *)(eth + 1) > data_end)
		return pass(NATCTL_C_PASS_MALFORMED);
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return pass(NATCTL_C_PASS_NOT_IPV4);

	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return pass(NATCTL_C_PASS_MALFORMED);
	if (ip->version != 4 || ip->ihl < 5)
		return pass(NATCTL_C_PASS_MALFORMED);
	if (ip->ihl != 5)
		return pass(NATCTL_C_PASS_OPTIONS);
	if (ip->frag_off & bpf_htons(IP_MF_OFFSET))
		return pass(NATCTL_C_PASS_FRAGMENT);
	if (ip->protocol != IPPROTO_UDP)
		return pass(NATCTL_C_PASS_NOT_UDP);

	udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > data_end)
		return pass(NATCTL_C_PASS_MALFORMED);
	/* The frame may carry Ethernet padding after the IP packet, never less. */
	__u32 tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len < sizeof(*ip) + sizeof(*udp) || tot_len > frame_len - sizeof(*eth) ||
	    bpf_ntohs(udp->len) != tot_len - sizeof(*ip) || !ip_checksum_ok(ip))
		return pass(NATCTL_C_PASS_MALFORMED);

	struct natctl_key key = {.saddr = ip->saddr, .sport = udp->source, .dport = udp->dest};
	struct natctl_rewrite *rw = bpf_map_lookup_elem(&natctl_relay, &key);

	if (!rw)
		return pass(NATCTL_C_PASS_NO_KEY);
	if (lease_over())
		return pass(NATCTL_C_PASS_FENCED);
	/* A host's PUNCH (natctl.daemon.wire: 10 bytes, "NATC" v2 type 5) is for the
	 * daemon on the relay, never for the client this port maps to, however late. */
	if (udp->len == bpf_htons(sizeof(*udp) + NATCTL_PUNCH_SIZE)) {
		__u8 *p = (void *)(udp + 1);
		if ((void *)(p + 6) <= data_end && p[0] == 'N' && p[1] == 'A' && p[2] == 'T' && p[3] == 'C' &&
		    p[4] == 2 && p[5] == 5)
			return pass(NATCTL_C_PASS_PUNCH);
	}
	if (ip->ttl <= 1)
		return pass(NATCTL_C_PASS_TTL);

	/* Ask the kernel's FIB for the egress interface and both MACs before
	 * touching the packet: a PASS must leave it exactly as it came. */
	struct bpf_fib_lookup fib = {
		.family = AF_INET,
		.tos = ip->tos,
		.l4_protocol = IPPROTO_UDP,
		.sport = rw->new_sport,
		.dport = rw->new_dport,
		.tot_len = tot_len,
		.ipv4_src = rw->new_saddr,
		.ipv4_dst = rw->new_daddr,
		.ifindex = ctx->ingress_ifindex,
	};
	long rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);

	if (rc == BPF_FIB_LKUP_RET_NO_NEIGH)
		return pass(NATCTL_C_PASS_NO_NEIGH);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return pass(NATCTL_C_PASS_FIB);

	/* IP: addresses and TTL change; the header checksum follows. */
	__u16 ttl_word = *(__u16 *)&ip->ttl;
	__u32 ip_acc = (__u16)~ip->check;

	ip_acc = acc32(ip_acc, ip->saddr, rw->new_saddr);
	ip_acc = acc32(ip_acc, ip->daddr, rw->new_daddr);
	ip->ttl -= 1;
	ip_acc = acc16(ip_acc, ttl_word, *(__u16 *)&ip->ttl);
	ip->check = ~fold(ip_acc);

	/* UDP: the pseudo-header addresses and both ports change. A zero
	 * checksum means "none" and stays zero; a computed zero is sent as
	 * 0xffff (RFC 768). */
	if (udp->check) {
		__u32 udp_acc = (__u16)~udp->check;

		udp_acc = acc32(udp_acc, ip->saddr, rw->new_saddr);
		udp_acc = acc32(udp_acc, ip->daddr, rw->new_daddr);
		udp_acc = acc16(udp_acc, udp->source, rw->new_sport);
		udp_acc = acc16(udp_acc, udp->dest, rw->new_dport);
		__u16 check = ~fold(udp_acc);
		udp->check = check ? check : 0xffff;
	}
	ip->saddr = rw->new_saddr;
	ip->daddr = rw->new_daddr;
	udp->source = rw->new_sport;
	udp->dest = rw->new_dport;
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);

	struct natctl_flow_stats *st = bpf_map_lookup_elem(&natctl_flows, &key);
	if (st) {
		st->packets += 1;
		st->bytes += tot_len;
		st->last_seen = bpf_ktime_get_ns();
	}
	if (fib.ifindex == ctx->ingress_ifindex) {
		count(NATCTL_C_TX);
		return XDP_TX;
	}
	count(NATCTL_C_REDIRECT);
	return bpf_redirect(fib.ifindex, 0);
}

char _license[] SEC("license") = "GPL";
