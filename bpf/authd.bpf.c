// SPDX-License-Identifier: Apache-2.0
/*
 * authd's tc programs: drop traffic between identities whose pair needs authentication and has no live
 * entry in the auth map, report why, and report policy verdicts as flow events.
 *
 * One object, four programs: ingress and egress hooks, for Ethernet devices (veth, physical) and for L3
 * devices without a link-layer header (wireguard, tun). Policy is L3: identities come from the source and
 * destination addresses, ports never change a verdict. L4 headers are parsed only for flow events.
 *
 * A passed packet returns TC_ACT_UNSPEC, so filters after authd's on the same hook still run (authd only
 * ever adds drops); a dropped one returns TC_ACT_SHOT.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#include "authd.h"

/* Only helpers that are not GPL-only are used, so the project licence is stated as is. */
char LICENSE[] SEC("license") = "Apache-2.0";

/* ------------------------------------------------------------------------------------------- maps */

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, AUTHD_IPCACHE_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__type(key, struct authd_ipcache_key);
	__type(value, struct authd_ipcache_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AUTHD_POLICY_ENTRIES);
	__type(key, struct authd_policy_key);
	__type(value, struct authd_policy_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, AUTHD_AUTH_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* memory follows the entries, not the configured maximum */
	__type(key, struct authd_auth_key);
	__type(value, struct authd_auth_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} auth SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, AUTHD_EVENTS_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, AUTHD_COUNTER_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct authd_config);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} config SEC(".maps");

/* Last auth-required event per auth key (TAI ns). */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, AUTHD_RATELIMIT_ENTRIES);
	__type(key, struct authd_auth_key);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} auth_ratelimit SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, AUTHD_FLOW_ENTRIES);
	__type(key, struct authd_flow_key);
	__type(value, struct authd_flow_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, AUTHD_ENDPOINT_ENTRIES);
	__uint(map_flags, BPF_F_NO_PREALLOC); /* required for LPM tries */
	__type(key, struct authd_ipcache_key);
	__type(value, struct authd_endpoint_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} endpoints SEC(".maps");

/* ------------------------------------------------------------------------------------------ parsing */

#define IPV6_MAX_EXT_HEADERS 8
#define VLAN_MAX_TAGS 2
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10
#define ND_FIRST_TYPE 133 /* ICMPv6 router solicitation */
#define ND_LAST_TYPE 137  /* ICMPv6 redirect */
#define ND_HOP_LIMIT 255

enum parse_result {
	PARSE_IP = 0,
	PARSE_NOT_IP = 1,
	PARSE_MALFORMED = 2,
};

/* What the programs know about a packet after parsing. Addresses are in network order. */
struct packet {
	__u8 family;
	__u8 protocol;
	__u8 tcp_flags;
	__u8 flags; /* AUTHD_FLOW_F_* */
	__u16 src_port;
	__u16 dst_port;
	__u8 src[16];
	__u8 dst[16];
	__u8 hop_limit;    /* IPv6 only */
	__u8 v6_fragment;  /* IPv6: a fragment header was seen (a first fragment has no F_FRAGMENT) */
	__u8 icmp6_type;   /* ICMPv6 only */
};

/* Ports and TCP flags; a truncated L4 header leaves them unset, which changes no verdict. */
static __always_inline void parse_l4(struct __sk_buff *skb, __u32 off, struct packet *p)
{
	__u8 buf[14]; /* TCP up to its flags byte; the first 4 bytes (ports) for UDP and SCTP */

	switch (p->protocol) {
	case IPPROTO_TCP:
		if (bpf_skb_load_bytes(skb, off, buf, 14) < 0)
			return;
		p->tcp_flags = buf[13];
		break;
	case IPPROTO_UDP:
	case IPPROTO_UDPLITE:
	case IPPROTO_SCTP:
		if (bpf_skb_load_bytes(skb, off, buf, 4) < 0)
			return;
		break;
	case IPPROTO_ICMPV6:
		if (bpf_skb_load_bytes(skb, off, buf, 1) == 0)
			p->icmp6_type = buf[0];
		return;
	default:
		return;
	}
	p->src_port = ((__u16)buf[0] << 8) | buf[1];
	p->dst_port = ((__u16)buf[2] << 8) | buf[3];
	p->flags |= AUTHD_FLOW_F_PORTS;
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, __u32 off, struct packet *p)
{
	struct iphdr ip;

	/* Too short to hold its addresses: it could otherwise slip past policy. */
	if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0)
		return PARSE_MALFORMED;
	if (ip.version != 4 || ip.ihl < 5)
		return PARSE_MALFORMED;
	p->family = AUTHD_FAMILY_IPV4;
	p->protocol = ip.protocol;
	__builtin_memcpy(p->src, &ip.saddr, 4);
	__builtin_memcpy(p->dst, &ip.daddr, 4);
	/* A non-first fragment has no L4 header; its verdict comes from its addresses like any other. */
	if (bpf_ntohs(ip.frag_off) & 0x1fff) {
		p->flags |= AUTHD_FLOW_F_FRAGMENT;
		return PARSE_IP;
	}
	/* IP options (ihl > 5) are skipped, never interpreted. */
	parse_l4(skb, off + ip.ihl * 4, p);
	return PARSE_IP;
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, __u32 off, struct packet *p)
{
	struct ipv6hdr ip6;
	__u8 nexthdr;
	__u8 ext[4];

	if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0)
		return PARSE_MALFORMED;
	if (ip6.version != 6)
		return PARSE_MALFORMED;
	p->family = AUTHD_FAMILY_IPV6;
	p->hop_limit = ip6.hop_limit;
	__builtin_memcpy(p->src, &ip6.saddr, 16);
	__builtin_memcpy(p->dst, &ip6.daddr, 16);
	nexthdr = ip6.nexthdr;
	off += sizeof(ip6);

	/* Walk a bounded number of extension headers to find L4; past the bound, or on a truncated
	 * extension header, L4 stays unknown, which only affects flow events. */
	for (int i = 0; i < IPV6_MAX_EXT_HEADERS; i++) {
		switch (nexthdr) {
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_DSTOPTS:
			if (bpf_skb_load_bytes(skb, off, ext, 2) < 0)
				goto unknown;
			nexthdr = ext[0];
			off += ((__u32)ext[1] + 1) * 8;
			break;
		case IPPROTO_AH:
			if (bpf_skb_load_bytes(skb, off, ext, 2) < 0)
				goto unknown;
			nexthdr = ext[0];
			off += ((__u32)ext[1] + 2) * 4;
			break;
		case IPPROTO_FRAGMENT:
			if (bpf_skb_load_bytes(skb, off, ext, 4) < 0)
				goto unknown;
			p->v6_fragment = 1;
			nexthdr = ext[0];
			off += 8;
			if (((((__u16)ext[2] << 8) | ext[3]) & 0xfff8) != 0) {
				p->protocol = nexthdr;
				p->flags |= AUTHD_FLOW_F_FRAGMENT;
				return PARSE_IP;
			}
			break;
		default:
			p->protocol = nexthdr;
			parse_l4(skb, off, p);
			return PARSE_IP;
		}
	}
unknown:
	p->protocol = nexthdr;
	return PARSE_IP;
}

/* Parse from the network header at nh_off with link-layer protocol proto (network order). */
static __always_inline int parse_l3(struct __sk_buff *skb, __u32 nh_off, __u16 proto, struct packet *p)
{
	if (proto == bpf_htons(ETH_P_IP))
		return parse_ipv4(skb, nh_off, p);
	if (proto == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(skb, nh_off, p);
	return PARSE_NOT_IP;
}

static __always_inline int parse_eth(struct __sk_buff *skb, struct packet *p)
{
	__u32 off = ETH_HLEN;
	__u16 proto;

	/* The frame's own ethertype, not skb->protocol: in-band VLAN tags (not offloaded) are skipped so
	 * a tagged IP packet cannot pass as "not IP". A runt frame carries no IP packet. */
	if (bpf_skb_load_bytes(skb, 12, &proto, 2) < 0)
		return PARSE_NOT_IP;
	for (int i = 0; i < VLAN_MAX_TAGS; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		if (bpf_skb_load_bytes(skb, off + 2, &proto, 2) < 0)
			return PARSE_NOT_IP;
		off += 4;
	}
	return parse_l3(skb, off, proto, p);
}

/* IPv6 neighbour discovery (RFC 4861) is how IPv6 finds link-layer addresses, as ARP does for IPv4,
 * and ARP is not IP and passes. Dropping it would cut a workload off its own link whatever the policy:
 * its node could no longer resolve its address. Only what the kernel accepts as neighbour discovery
 * passes: ICMPv6 types 133-137, unfragmented, with hop limit 255, which no router forwards, so that only
 * on-link senders (the node, the workload) can use this. */
static __always_inline int is_neighbor_discovery(const struct packet *p)
{
	return p->family == AUTHD_FAMILY_IPV6 && p->protocol == IPPROTO_ICMPV6 && !p->v6_fragment &&
	       p->hop_limit == ND_HOP_LIMIT &&
	       p->icmp6_type >= ND_FIRST_TYPE && p->icmp6_type <= ND_LAST_TYPE;
}

/* -------------------------------------------------------------------------------------- decisions */

/* One packet's verdict, from the local endpoint's point of view. */
struct decision {
	__u64 now; /* CLOCK_TAI ns, 0 until needed */
	__u32 ifindex;
	__u32 local;
	__u32 remote;
	__u32 remote_node;
	__u8 direction;
	__u8 hook;
	__u8 auth_type;
	__u8 match;
	__u8 verdict;
	__u8 drop_reason;
};

static __always_inline void count(__u32 index)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &index);

	if (value)
		*value += 1; /* per-CPU slot: no atomics needed */
}

static __always_inline __u64 now_tai(struct decision *d)
{
	if (!d->now)
		d->now = bpf_ktime_get_tai_ns();
	return d->now;
}

static __always_inline struct authd_ipcache_value *ipcache_lookup(__u8 family, const __u8 *addr)
{
	struct authd_ipcache_key key = {};

	key.family = family;
	if (family == AUTHD_FAMILY_IPV4) {
		key.prefixlen = AUTHD_IPCACHE_FAMILY_BITS + 32;
		__builtin_memcpy(key.addr, addr, 4);
	} else {
		key.prefixlen = AUTHD_IPCACHE_FAMILY_BITS + 128;
		__builtin_memcpy(key.addr, addr, 16);
	}
	return bpf_map_lookup_elem(&ipcache, &key);
}

static __always_inline struct authd_policy_value *policy_lookup(__u32 local, __u32 remote, __u8 direction)
{
	struct authd_policy_key key = {};
	struct authd_policy_value *value;

	key.direction = direction;
	key.local = local;
	key.remote = remote;
	value = bpf_map_lookup_elem(&policy, &key);
	if (value)
		return value;
	key.remote = AUTHD_IDENTITY_ANY;
	value = bpf_map_lookup_elem(&policy, &key);
	if (value)
		return value;
	key.local = AUTHD_IDENTITY_ANY;
	key.remote = remote;
	value = bpf_map_lookup_elem(&policy, &key);
	if (value)
		return value;
	key.remote = AUTHD_IDENTITY_ANY;
	return bpf_map_lookup_elem(&policy, &key);
}

static __always_inline void auth_key_of(const struct decision *d, struct authd_auth_key *key)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->local = d->local;
	key->remote = d->remote;
	key->remote_node = d->remote_node;
	key->auth_type = d->auth_type;
}

/* Policy and auth map: fills auth_type, match, verdict and drop_reason. */
static __always_inline void decide(struct decision *d)
{
	struct authd_policy_value *pol = policy_lookup(d->local, d->remote, d->direction);
	struct authd_auth_value *entry;
	struct authd_auth_key key;

	d->verdict = AUTHD_VERDICT_ALLOWED;
	d->drop_reason = AUTHD_DROP_NONE;
	if (!pol) {
		d->match = AUTHD_MATCH_NONE;
		count(AUTHD_CNT_ALLOWED);
		return;
	}
	d->auth_type = pol->auth_type;
	if (pol->auth_type == AUTHD_AUTH_NONE) {
		d->match = AUTHD_MATCH_EXEMPT;
		count(AUTHD_CNT_ALLOWED);
		return;
	}
	d->match = AUTHD_MATCH_AUTH;
	auth_key_of(d, &key);
	entry = bpf_map_lookup_elem(&auth, &key);
	if (!entry) {
		d->verdict = AUTHD_VERDICT_DENIED;
		d->drop_reason = AUTHD_DROP_AUTH_REQUIRED;
		count(AUTHD_CNT_DENIED_AUTH_REQUIRED);
		return;
	}
	if (entry->expires_tai_ns <= now_tai(d)) {
		d->verdict = AUTHD_VERDICT_DENIED;
		d->drop_reason = AUTHD_DROP_AUTH_EXPIRED;
		count(AUTHD_CNT_DENIED_AUTH_EXPIRED);
		return;
	}
	count(AUTHD_CNT_ALLOWED_AUTH);
}

/* ------------------------------------------------------------------------------------------- events */

/* Out of line (a BPF subprogram) so the event layouts are described in the object's BTF, which the
 * layout test compares with Python's mirror; it only runs when an event is sent. */
static __noinline void fill_auth_event(struct authd_auth_event *e, const struct packet *p,
				       const struct decision *d)
{
	__builtin_memset(e, 0, sizeof(*e));
	e->type = AUTHD_EVENT_AUTH_REQUIRED;
	e->ifindex = d->ifindex;
	e->timestamp_tai_ns = d->now;
	e->key.local = d->local;
	e->key.remote = d->remote;
	e->key.remote_node = d->remote_node;
	e->key.auth_type = d->auth_type;
	e->direction = d->direction;
	e->drop_reason = d->drop_reason;
	e->family = p->family;
	e->protocol = p->protocol;
	__builtin_memcpy(e->src_addr, p->src, 16);
	__builtin_memcpy(e->dst_addr, p->dst, 16);
}

static __noinline void fill_flow_event(struct authd_flow_event *e, const struct packet *p,
				       const struct decision *d)
{
	__builtin_memset(e, 0, sizeof(*e));
	e->type = AUTHD_EVENT_FLOW;
	e->ifindex = d->ifindex;
	e->timestamp_tai_ns = d->now;
	e->local_identity = d->local;
	e->remote_identity = d->remote;
	e->remote_node = d->remote_node;
	e->verdict = d->verdict;
	e->direction = d->direction;
	e->auth_type = d->auth_type;
	e->drop_reason = d->drop_reason;
	e->family = p->family;
	e->protocol = p->protocol;
	e->tcp_flags = p->tcp_flags;
	e->hook = d->hook;
	e->match = d->match;
	e->flags = p->flags;
	e->src_port = p->src_port;
	e->dst_port = p->dst_port;
	__builtin_memcpy(e->src_addr, p->src, 16);
	__builtin_memcpy(e->dst_addr, p->dst, 16);
}

/* At most one event per auth key per interval, across CPUs: the slot holding the last emit time is
 * claimed with compare-and-swap, so concurrent drops on several CPUs still send one event. */
static __always_inline void report_auth_required(const struct packet *p, struct decision *d,
						 const struct authd_config *cfg)
{
	struct authd_auth_key key;
	struct authd_auth_event *e;
	__u64 now = now_tai(d);
	__u64 interval = cfg ? cfg->auth_required_interval_ns : 0;
	__u64 *last;

	auth_key_of(d, &key);
	last = bpf_map_lookup_elem(&auth_ratelimit, &key);
	if (last) {
		__u64 old = *last;

		/* A clock stepped back makes now - old huge: an event is sent, never held back forever. */
		if (now - old < interval || __sync_val_compare_and_swap(last, old, now) != old) {
			count(AUTHD_CNT_AUTH_EVENTS_SUPPRESSED);
			return;
		}
	} else if (bpf_map_update_elem(&auth_ratelimit, &key, &now, BPF_NOEXIST) != 0) {
		count(AUTHD_CNT_AUTH_EVENTS_SUPPRESSED); /* another CPU sent it just now */
		return;
	}
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(AUTHD_CNT_RINGBUF_FULL);
		return;
	}
	fill_auth_event(e, p, d);
	bpf_ringbuf_submit(e, 0);
	count(AUTHD_CNT_AUTH_EVENTS);
}

static __always_inline void flow_key_of(const struct packet *p, const struct decision *d,
					struct authd_flow_key *key)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->family = p->family;
	key->protocol = p->protocol;
	if (d->direction == AUTHD_DIR_EGRESS) {
		key->local_port = p->src_port;
		key->remote_port = p->dst_port;
		__builtin_memcpy(key->local_addr, p->src, 16);
		__builtin_memcpy(key->remote_addr, p->dst, 16);
	} else {
		key->local_port = p->dst_port;
		key->remote_port = p->src_port;
		__builtin_memcpy(key->local_addr, p->dst, 16);
		__builtin_memcpy(key->remote_addr, p->src, 16);
	}
}

/* Whether this packet's verdict is reported: a connection's first packet, every TCP SYN (a retried
 * connect is news), and a verdict that differs from the last one seen on the connection. */
static __always_inline int flow_is_news(const struct packet *p, const struct decision *d)
{
	struct authd_flow_key key;
	struct authd_flow_value *seen;
	struct authd_flow_value value = {};
	int syn = p->protocol == IPPROTO_TCP && (p->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;

	/* Non-first fragments carry no ports: their connection reported with its first fragment. */
	if (p->flags & AUTHD_FLOW_F_FRAGMENT)
		return 0;
	flow_key_of(p, d, &key);
	seen = bpf_map_lookup_elem(&flows, &key);
	if (seen && seen->verdict == d->verdict && seen->drop_reason == d->drop_reason)
		return syn;
	value.verdict = d->verdict;
	value.drop_reason = d->drop_reason;
	bpf_map_update_elem(&flows, &key, &value, BPF_ANY);
	return 1;
}

static __always_inline void report_flow(const struct packet *p, struct decision *d, __u32 level)
{
	struct authd_flow_event *e;

	if (level == AUTHD_FLOWS_NONE)
		return;
	if (level != AUTHD_FLOWS_ALL) {
		if (!flow_is_news(p, d))
			return;
		if (level == AUTHD_FLOWS_DENIED && d->verdict != AUTHD_VERDICT_DENIED)
			return;
	}
	now_tai(d);
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(AUTHD_CNT_RINGBUF_FULL);
		return;
	}
	fill_flow_event(e, p, d);
	bpf_ringbuf_submit(e, 0);
	count(AUTHD_CNT_FLOW_EVENTS);
}

/* ------------------------------------------------------------------------------------------ programs */

static __always_inline int handle(struct __sk_buff *skb, __u8 hook, int has_eth)
{
	struct packet p = {};
	struct decision d = {};
	struct authd_ipcache_value *src, *dst;
	const struct authd_config *cfg;
	__u32 zero = 0;
	int src_local, dst_local, parsed;

	parsed = has_eth ? parse_eth(skb, &p) : parse_l3(skb, 0, (__u16)skb->protocol, &p);
	if (parsed == PARSE_NOT_IP) {
		count(AUTHD_CNT_NON_IP);
		return TC_ACT_UNSPEC;
	}
	if (parsed == PARSE_MALFORMED) {
		count(AUTHD_CNT_DENIED_MALFORMED);
		return TC_ACT_SHOT;
	}
	if (is_neighbor_discovery(&p)) {
		count(AUTHD_CNT_NON_IP);
		return TC_ACT_UNSPEC;
	}

	src = ipcache_lookup(p.family, p.src);
	dst = ipcache_lookup(p.family, p.dst);
	src_local = src && src->node == AUTHD_NODE_LOCAL;
	dst_local = dst && dst->node == AUTHD_NODE_LOCAL;

	/* The ipcache says which end is local; the hook only breaks ties (both ends local). At ingress a
	 * local source is leaving its endpoint; at egress a local destination is being delivered to it.
	 * On workload-facing interfaces this checks each packet once per local endpoint. */
	if (hook == AUTHD_HOOK_INGRESS ? src_local : (src_local && !dst_local)) {
		d.direction = AUTHD_DIR_EGRESS;
		d.local = src->identity;
		d.remote = dst ? dst->identity : AUTHD_IDENTITY_WORLD;
		d.remote_node = dst ? dst->node : AUTHD_NODE_LOCAL;
	} else if (dst_local) {
		d.direction = AUTHD_DIR_INGRESS;
		d.local = dst->identity;
		d.remote = src ? src->identity : AUTHD_IDENTITY_WORLD;
		d.remote_node = src ? src->node : AUTHD_NODE_LOCAL;
	} else {
		count(AUTHD_CNT_NOT_LOCAL);
		return TC_ACT_UNSPEC;
	}
	d.hook = hook;
	d.ifindex = skb->ifindex;

	decide(&d);
	cfg = bpf_map_lookup_elem(&config, &zero);
	if (d.verdict == AUTHD_VERDICT_DENIED)
		report_auth_required(&p, &d, cfg);
	report_flow(&p, &d, cfg ? cfg->flow_level : AUTHD_FLOWS_NONE);
	return d.verdict == AUTHD_VERDICT_DENIED ? TC_ACT_SHOT : TC_ACT_UNSPEC;
}

SEC("tc")
int authd_in(struct __sk_buff *skb)
{
	return handle(skb, AUTHD_HOOK_INGRESS, 1);
}

SEC("tc")
int authd_eg(struct __sk_buff *skb)
{
	return handle(skb, AUTHD_HOOK_EGRESS, 1);
}

SEC("tc")
int authd_in_l3(struct __sk_buff *skb)
{
	return handle(skb, AUTHD_HOOK_INGRESS, 0);
}

SEC("tc")
int authd_eg_l3(struct __sk_buff *skb)
{
	return handle(skb, AUTHD_HOOK_EGRESS, 0);
}
