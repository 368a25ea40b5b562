// SPDX-License-Identifier: Apache-2.0
/*
 * authd's tc programs: drop traffic between identities whose pair needs authentication and has no live
 * entry in the auth map, drop packets whose addresses are not where they claim to come from, report why,
 * and report policy verdicts as flow events.
 *
 * One object, four programs: ingress and egress hooks, for workload-facing Ethernet interfaces (the host
 * side of a pod's veth) and for node-facing L3 devices without a link-layer header (wireguard, tun).
 *
 * Which end of a packet is local follows from the interface, never from whether the ipcache knows an
 * address: on a workload interface the workload behind it is local (the source at ingress, the packet
 * coming from the workload; the destination at egress), on a node-facing interface the node's side is
 * (the destination at ingress, the source at egress). An address the ipcache does not know is `world`.
 *
 * Source binding (the endpoints map says which workload interface owns each local workload address): a
 * packet from a workload must carry a source its interface owns, a packet to a workload a destination its
 * interface owns, and a packet whose source is a local endpoint's address must have entered the node
 * through that endpoint's interface (skb->ingress_ifindex at egress), wherever it goes.
 *
 * Tunnel binding (config tunnel_ifindex, set while authd runs WireGuard between nodes): a packet coming
 * from a remote workload (its source's ipcache entry is on another node) must have entered the node
 * through the tunnel, where WireGuard's AllowedIPs tie that source to the peer of the node hosting it;
 * otherwise it is dropped as NOT_ENCRYPTED, before policy, so that no auth entry (L, R, A) lets a packet
 * claiming R pass in clear. Flow events say ENCRYPTED for packets that entered through the tunnel and,
 * where authd's programs run on the tunnel itself, for those leaving through it.
 *
 * Policy is L3: identities come from the addresses, ports never change a verdict. L4 headers key the flow
 * table (replies of allowed flows pass) and fill flow events.
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

/* Flow events. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, AUTHD_EVENTS_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} events SEC(".maps");

/* Auth-required events, apart from flow events so that a burst of flows cannot crowd them out. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, AUTHD_AUTH_EVENTS_BYTES);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} auth_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, AUTHD_COUNTER_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} counters SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, AUTHD_VERDICT_SLOTS);
	__type(key, __u32);
	__type(value, __u64);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} verdicts SEC(".maps");

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

/* Fragmented datagrams: the ports of each one whose first fragment passed, so that its later fragments
 * (no L4 header) are judged as packets of its flow. Keyed as the kernel reassembles (RFC 791, 8200):
 * addresses, protocol and identification. The datapath's own: authd's Python side never reads it. */
struct fragment_key {
	__u8 family;
	__u8 protocol;
	__u16 pad;
	__u32 id; /* network order; IPv4's 16 bits in the first two bytes */
	__u8 src[16];
	__u8 dst[16];
};

struct fragment_value {
	__u16 src_port;
	__u16 dst_port;
	__u8 flags; /* AUTHD_FLOW_F_PORTS, or 0 for a protocol without ports (ICMP) */
	__u8 pad[3];
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, AUTHD_FRAGMENT_ENTRIES);
	__type(key, struct fragment_key);
	__type(value, struct fragment_value);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fragments SEC(".maps");

/* ------------------------------------------------------------------------------------------ parsing */

#define IPV6_MAX_EXT_HEADERS 8
#define VLAN_MAX_TAGS 2 /* QinQ; a deeper stack is malformed */
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_ACK 0x10
#define ND_FIRST_TYPE 133 /* ICMPv6 router solicitation */
#define ND_LAST_TYPE 137  /* ICMPv6 redirect */
#define ND_REDIRECT 137
#define ND_ROUTER_ADVERT 134
#define ND_NEIGHBOR_SOLICIT 135
#define ND_NEIGHBOR_ADVERT 136
#define ND_HOP_LIMIT 255
#define MLD_FIRST_TYPE 130 /* query */
#define MLD_LAST_TYPE 132  /* done */
#define MLD2_REPORT 143
/* ICMP errors that quote the packet they are about (linux/icmp.h pulls in libc headers). */
#define ICMP_DEST_UNREACH 3
#define ICMP_TIME_EXCEEDED 11
#define ICMP_PARAMETERPROB 12
#define ICMP_REDIRECT 5 /* not judged by what it quotes: a router message */
#define ICMPV6_DEST_UNREACH 1 /* 1-4: destination unreachable, packet too big, time exceeded, parameter */
#define ICMPV6_PARAMPROB 4
#define ARP_HRD_ETHER 1

enum parse_result {
	PARSE_IP = 0,
	PARSE_ARP = 1,
	PARSE_MALFORMED = 2,
	PARSE_UNSUPPORTED = 3,
};

/* What the programs know about a packet after parsing. Addresses are in network order. */
struct packet {
	__u8 family;
	__u8 protocol;
	__u8 tcp_flags;
	__u8 flags;        /* AUTHD_FLOW_F_* */
	__u16 src_port;
	__u16 dst_port;
	__u8 src[16];      /* for ARP: the sender protocol address */
	__u8 dst[16];      /* for ARP: the target protocol address */
	__u8 hop_limit;    /* IPv6 only */
	__u8 v6_fragment;  /* IPv6: a fragment header was seen (a first fragment has no F_FRAGMENT) */
	__u8 first_fragment; /* the first fragment of a fragmented datagram (more follow) */
	__u8 pad0[3];
	__u32 frag_id;     /* a fragment's identification, network order (IPv4: 16 bits) */
	__u8 icmp_type;    /* ICMP and ICMPv6 */
	__u8 quoted;       /* an ICMP or ICMPv6 error: the fields below describe the packet it quotes */
	__u16 quoted_src_port;
	__u16 quoted_dst_port;
	__u8 quoted_protocol;
	__u8 pad[3];
	__u8 quoted_src[16];
	__u8 quoted_dst[16];
	__u8 nd_target[16]; /* neighbour solicitation and advertisement */
};

/* Headers are read in place, from the packet's linear part (skb->data to skb->data_end), where the
 * headers of nearly every packet are; a header beyond it, or beyond HEADER_MAX_OFF, is copied out with
 * bpf_skb_load_bytes instead, which reads the non-linear part too. Returns a pointer to len readable
 * bytes at off (in the packet or in buf), or 0 when the packet ends first. */
#define HEADER_MAX_OFF 512

static __always_inline const void *header(struct __sk_buff *skb, __u32 off, void *buf, __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;

	if (off <= HEADER_MAX_OFF && data + off + len <= data_end)
		return data + off;
	if (bpf_skb_load_bytes(skb, off, buf, len) < 0)
		return 0;
	return buf;
}

static __always_inline int has_ports(__u8 protocol)
{
	return protocol == IPPROTO_TCP || protocol == IPPROTO_UDP || protocol == IPPROTO_UDPLITE ||
	       protocol == IPPROTO_SCTP;
}

/* The packet an ICMPv4 error quotes: its IPv4 header and the first 4 bytes of its L4 header. */
static __always_inline void parse_quoted_ipv4(struct __sk_buff *skb, __u32 off, struct packet *p)
{
	struct iphdr ip;
	__u8 ports[4];

	if (bpf_skb_load_bytes(skb, off, &ip, sizeof(ip)) < 0 || ip.version != 4 || ip.ihl < 5)
		return;
	__builtin_memcpy(p->quoted_src, &ip.saddr, 4);
	__builtin_memcpy(p->quoted_dst, &ip.daddr, 4);
	p->quoted_protocol = ip.protocol;
	if (has_ports(ip.protocol) && !(bpf_ntohs(ip.frag_off) & 0x1fff)) {
		if (bpf_skb_load_bytes(skb, off + ip.ihl * 4, ports, 4) < 0)
			return;
		p->quoted_src_port = ((__u16)ports[0] << 8) | ports[1];
		p->quoted_dst_port = ((__u16)ports[2] << 8) | ports[3];
	}
	p->quoted = 1;
}

/* The packet an ICMPv6 error quotes; extension headers are not walked (the flow is then not found). */
static __always_inline void parse_quoted_ipv6(struct __sk_buff *skb, __u32 off, struct packet *p)
{
	struct ipv6hdr ip6;
	__u8 ports[4];

	if (bpf_skb_load_bytes(skb, off, &ip6, sizeof(ip6)) < 0 || ip6.version != 6)
		return;
	__builtin_memcpy(p->quoted_src, &ip6.saddr, 16);
	__builtin_memcpy(p->quoted_dst, &ip6.daddr, 16);
	p->quoted_protocol = ip6.nexthdr;
	if (has_ports(ip6.nexthdr)) {
		if (bpf_skb_load_bytes(skb, off + sizeof(ip6), ports, 4) < 0)
			return;
		p->quoted_src_port = ((__u16)ports[0] << 8) | ports[1];
		p->quoted_dst_port = ((__u16)ports[2] << 8) | ports[3];
	}
	p->quoted = 1;
}

/* Ports and TCP flags; a truncated L4 header leaves them unset. ICMP errors: the quoted packet; neighbour
 * solicitations and advertisements: the target address. */
static __always_inline void parse_l4(struct __sk_buff *skb, __u32 off, struct packet *p)
{
	__u8 buf[14]; /* TCP up to its flags byte; the first 4 bytes (ports) for UDP and SCTP */
	const __u8 *l4;

	switch (p->protocol) {
	case IPPROTO_TCP:
		l4 = header(skb, off, buf, 14);
		if (!l4)
			return;
		p->tcp_flags = l4[13];
		break;
	case IPPROTO_UDP:
	case IPPROTO_UDPLITE:
	case IPPROTO_SCTP:
		l4 = header(skb, off, buf, 4);
		if (!l4)
			return;
		break;
	case IPPROTO_ICMP:
		l4 = header(skb, off, buf, 1);
		if (!l4)
			return;
		p->icmp_type = l4[0];
		if (l4[0] == ICMP_DEST_UNREACH || l4[0] == ICMP_TIME_EXCEEDED || l4[0] == ICMP_PARAMETERPROB)
			parse_quoted_ipv4(skb, off + 8, p);
		return;
	case IPPROTO_ICMPV6:
		l4 = header(skb, off, buf, 1);
		if (!l4)
			return;
		p->icmp_type = l4[0];
		if (l4[0] >= ICMPV6_DEST_UNREACH && l4[0] <= ICMPV6_PARAMPROB)
			parse_quoted_ipv6(skb, off + 8, p);
		else if (l4[0] == ND_NEIGHBOR_SOLICIT || l4[0] == ND_NEIGHBOR_ADVERT)
			bpf_skb_load_bytes(skb, off + 8, p->nd_target, 16); /* truncated: stays :: */
		return;
	default:
		return;
	}
	p->src_port = ((__u16)l4[0] << 8) | l4[1];
	p->dst_port = ((__u16)l4[2] << 8) | l4[3];
	p->flags |= AUTHD_FLOW_F_PORTS;
}

static __always_inline int parse_ipv4(struct __sk_buff *skb, __u32 off, struct packet *p)
{
	struct iphdr buf;
	const struct iphdr *ip = header(skb, off, &buf, sizeof(buf));

	/* Too short to hold its addresses: it could otherwise slip past policy. */
	if (!ip)
		return PARSE_MALFORMED;
	if (ip->version != 4 || ip->ihl < 5)
		return PARSE_MALFORMED;
	p->family = AUTHD_FAMILY_IPV4;
	p->protocol = ip->protocol;
	__builtin_memcpy(p->src, &ip->saddr, 4);
	__builtin_memcpy(p->dst, &ip->daddr, 4);
	/* A non-first fragment has no L4 header: its flow is the one its first fragment recorded, if any. */
	if (ip->frag_off & bpf_htons(0x3fff)) { /* more fragments, or an offset */
		__builtin_memcpy(&p->frag_id, &ip->id, 2);
		if (ip->frag_off & bpf_htons(0x1fff)) {
			p->flags |= AUTHD_FLOW_F_FRAGMENT;
			return PARSE_IP;
		}
		p->first_fragment = 1;
	}
	/* IP options (ihl > 5) are skipped, never interpreted. */
	parse_l4(skb, off + ip->ihl * 4, p);
	return PARSE_IP;
}

static __always_inline int parse_ipv6(struct __sk_buff *skb, __u32 off, struct packet *p)
{
	struct ipv6hdr buf;
	const struct ipv6hdr *ip6 = header(skb, off, &buf, sizeof(buf));
	__u8 nexthdr;
	__u8 ext[8];

	if (!ip6)
		return PARSE_MALFORMED;
	if (ip6->version != 6)
		return PARSE_MALFORMED;
	p->family = AUTHD_FAMILY_IPV6;
	p->hop_limit = ip6->hop_limit;
	__builtin_memcpy(p->src, &ip6->saddr, 16);
	__builtin_memcpy(p->dst, &ip6->daddr, 16);
	nexthdr = ip6->nexthdr;
	off += sizeof(*ip6);

	/* Walk a bounded number of extension headers to find L4; past the bound, or on a truncated
	 * extension header, L4 stays unknown: the flow has no ports. */
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
			if (bpf_skb_load_bytes(skb, off, ext, 8) < 0)
				goto unknown;
			p->v6_fragment = 1;
			nexthdr = ext[0];
			off += 8;
			__builtin_memcpy(&p->frag_id, &ext[4], 4);
			if (((((__u16)ext[2] << 8) | ext[3]) & 0xfff8) != 0) {
				p->protocol = nexthdr;
				p->flags |= AUTHD_FLOW_F_FRAGMENT;
				return PARSE_IP;
			}
			p->first_fragment = ext[3] & 1; /* an atomic fragment (no more) is a whole datagram */
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

/* Ethernet ARP for IPv4, the only kind a workload needs; anything else claiming to be ARP is malformed. */
static __always_inline int parse_arp(struct __sk_buff *skb, __u32 off, struct packet *p)
{
	struct {
		__be16 ar_hrd;
		__be16 ar_pro;
		__u8 ar_hln;
		__u8 ar_pln;
		__be16 ar_op;
		__u8 sha[ETH_ALEN];
		__u8 spa[4];
		__u8 tha[ETH_ALEN];
		__u8 tpa[4];
	} __attribute__((packed)) arp;

	if (bpf_skb_load_bytes(skb, off, &arp, sizeof(arp)) < 0)
		return PARSE_MALFORMED;
	if (arp.ar_hrd != bpf_htons(ARP_HRD_ETHER) || arp.ar_pro != bpf_htons(ETH_P_IP) ||
	    arp.ar_hln != ETH_ALEN || arp.ar_pln != 4)
		return PARSE_MALFORMED;
	p->family = AUTHD_FAMILY_IPV4;
	p->flags = AUTHD_FLOW_F_ARP;
	__builtin_memcpy(p->src, arp.spa, 4);
	__builtin_memcpy(p->dst, arp.tpa, 4);
	return PARSE_ARP;
}

/* Parse from the network header at nh_off with link-layer protocol proto (network order). */
static __always_inline int parse_l3(struct __sk_buff *skb, __u32 nh_off, __u16 proto, struct packet *p)
{
	if (proto == bpf_htons(ETH_P_IP))
		return parse_ipv4(skb, nh_off, p);
	if (proto == bpf_htons(ETH_P_IPV6))
		return parse_ipv6(skb, nh_off, p);
	return PARSE_UNSUPPORTED;
}

static __always_inline int parse_eth(struct __sk_buff *skb, struct packet *p)
{
	__u32 off = ETH_HLEN;
	__u32 tags = skb->vlan_present; /* the outer tag, which the kernel takes off the frame before tc */
	__u16 buf, proto;
	const __u16 *type;

	/* The frame's own ethertype, not skb->protocol. The kernel strips stacked priority tags (VID 0)
	 * and delivers the packet inside, so tags are followed up to VLAN_MAX_TAGS in all, counting the
	 * one already taken off; a deeper stack is malformed, never "not IP". */
	type = header(skb, 12, &buf, 2);
	if (!type)
		return PARSE_MALFORMED;
	proto = *type;
	for (int i = 0; i <= VLAN_MAX_TAGS; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		if (tags >= VLAN_MAX_TAGS)
			return PARSE_MALFORMED;
		type = header(skb, off + 2, &buf, 2);
		if (!type)
			return PARSE_MALFORMED;
		proto = *type;
		off += 4;
		tags++;
	}
	if (proto == bpf_htons(ETH_P_ARP))
		return parse_arp(skb, off, p);
	return parse_l3(skb, off, proto, p);
}

/* IPv6 neighbour discovery (RFC 4861) is how IPv6 finds link-layer addresses, as ARP does for IPv4.
 * Dropping it would cut a workload off its own link whatever the policy: its node could no longer
 * resolve its address. Only what the kernel accepts as neighbour discovery counts: ICMPv6 types 133-137,
 * unfragmented, with hop limit 255, which no router forwards, so that only on-link senders (the node, the
 * workload) can use this. Its addresses are still checked against the endpoints map. */
static __always_inline int is_neighbor_discovery(const struct packet *p)
{
	return p->family == AUTHD_FAMILY_IPV6 && p->protocol == IPPROTO_ICMPV6 && !p->v6_fragment &&
	       p->hop_limit == ND_HOP_LIMIT &&
	       p->icmp_type >= ND_FIRST_TYPE && p->icmp_type <= ND_LAST_TYPE;
}

/* What only a router sends: IPv6 router advertisements and redirects, IPv4 redirects. From a workload
 * they would let it steer its node's or its neighbours' routes (a pod must not act as a router), so they
 * are dropped however they are addressed; the node's own advertisements to workloads pass. A
 * non-first fragment has no ICMP header and is not one (the kernel drops fragmented neighbour
 * discovery). */
static __always_inline int is_router_message(const struct packet *p)
{
	if (p->flags & AUTHD_FLOW_F_FRAGMENT)
		return 0;
	if (p->family == AUTHD_FAMILY_IPV6)
		return p->protocol == IPPROTO_ICMPV6 &&
		       (p->icmp_type == ND_ROUTER_ADVERT || p->icmp_type == ND_REDIRECT);
	return p->protocol == IPPROTO_ICMP && p->icmp_type == ICMP_REDIRECT;
}

static __always_inline int same_address(const __u8 *a, const __u8 *b)
{
	__u64 a0, a1, b0, b1;

	__builtin_memcpy(&a0, a, 8);
	__builtin_memcpy(&a1, a + 8, 8);
	__builtin_memcpy(&b0, b, 8);
	__builtin_memcpy(&b1, b + 8, 8);
	return a0 == b0 && a1 == b1;
}

static __always_inline int is_unspecified6(const __u8 *addr)
{
	__u64 hi, lo;

	__builtin_memcpy(&hi, addr, 8);
	__builtin_memcpy(&lo, addr + 8, 8);
	return hi == 0 && lo == 0;
}

static __always_inline int is_zero4(const __u8 *addr)
{
	__u32 v;

	__builtin_memcpy(&v, addr, 4);
	return v == 0;
}

/* Multicast listener discovery (RFC 3810: queries 130, reports 131 and 143, done 132), which every IPv6
 * host sends from its link-local address when an interface comes up. Like neighbour discovery it
 * manages the link and passes; only what never leaves the link counts: unfragmented, hop limit 1, from
 * :: or a link-local address (checked with the other link-control sources). */
static __always_inline int is_multicast_listener_discovery(const struct packet *p)
{
	return p->family == AUTHD_FAMILY_IPV6 && p->protocol == IPPROTO_ICMPV6 && !p->v6_fragment &&
	       p->hop_limit == 1 &&
	       ((p->icmp_type >= MLD_FIRST_TYPE && p->icmp_type <= MLD_LAST_TYPE) || p->icmp_type == MLD2_REPORT);
}

/* ::, or fe80::/10: the source addresses neighbour discovery may use besides the interface's own. */
static __always_inline int is_nd_source(const __u8 *addr)
{
	return is_unspecified6(addr) || (addr[0] == 0xfe && (addr[1] & 0xc0) == 0x80);
}

/* -------------------------------------------------------------------------------------- decisions */

/* One packet's verdict, from the local endpoint's point of view. */
struct decision {
	__u64 now;          /* CLOCK_TAI ns, 0 until needed */
	__u64 auth_expires; /* the live auth entry's expiry (CLOCK_TAI), when one decided */
	__u32 ifindex;
	__u32 local;
	__u32 remote;
	__u32 remote_node;
	__u8 direction;     /* the packet's direction */
	__u8 hook;
	__u8 auth_type;
	__u8 match;
	__u8 verdict;
	__u8 drop_reason;
	__u8 flags;         /* AUTHD_FLOW_F_REPLY */
};

static __always_inline void count(__u32 index)
{
	__u64 *value = bpf_map_lookup_elem(&counters, &index);

	if (value)
		*value += 1; /* per-CPU slot: no atomics needed */
}

/* A policy verdict: its total, and its count in the packet's direction. */
static __always_inline void count_verdict(const struct decision *d, __u32 counter)
{
	__u32 index = counter + AUTHD_COUNTER_SLOTS * (d->direction == AUTHD_DIR_EGRESS);
	__u64 *value = bpf_map_lookup_elem(&verdicts, &index);

	count(counter);
	if (value)
		*value += 1;
}

static __always_inline __u64 now_tai(struct decision *d)
{
	if (!d->now)
		d->now = bpf_ktime_get_tai_ns();
	return d->now;
}

/* A host-prefix lookup in an LPM trie keyed like the ipcache (ipcache, endpoints). */
static __always_inline void *address_lookup(void *map, __u8 family, const __u8 *addr)
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
	return bpf_map_lookup_elem(map, &key);
}

/* The interface that owns a local workload address, or 0. */
static __always_inline __u32 owner_of(__u8 family, const __u8 *addr)
{
	struct authd_endpoint_value *owner = address_lookup(&endpoints, family, addr);

	return owner ? owner->ifindex : 0;
}

/* Identities from the ipcache: an address it does not know is world; the local side is world also when
 * the ipcache places its address on another node. */
static __always_inline void identify(struct decision *d, __u8 family, const __u8 *local, const __u8 *remote)
{
	struct authd_ipcache_value *l = address_lookup(&ipcache, family, local);
	struct authd_ipcache_value *r = address_lookup(&ipcache, family, remote);

	d->local = l && l->node == AUTHD_NODE_LOCAL ? l->identity : AUTHD_IDENTITY_WORLD;
	d->remote = r ? r->identity : AUTHD_IDENTITY_WORLD;
	d->remote_node = r ? r->node : AUTHD_NODE_LOCAL;
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

static __always_inline void deny(struct decision *d, __u8 reason, __u32 counter)
{
	d->verdict = AUTHD_VERDICT_DENIED;
	d->drop_reason = reason;
	count_verdict(d, counter);
}

/* Policy and auth map for traffic in `direction`: fills auth_type, match, verdict and drop_reason. */
static __always_inline void decide(struct decision *d, __u8 direction)
{
	struct authd_policy_value *pol = policy_lookup(d->local, d->remote, direction);
	struct authd_auth_value *entry;
	struct authd_auth_key key;

	d->verdict = AUTHD_VERDICT_ALLOWED;
	d->drop_reason = AUTHD_DROP_NONE;
	if (!pol) {
		d->match = AUTHD_MATCH_NONE;
		count_verdict(d, AUTHD_CNT_ALLOWED);
		return;
	}
	d->auth_type = pol->auth_type;
	if (pol->auth_type == AUTHD_AUTH_NONE) {
		d->match = AUTHD_MATCH_EXEMPT;
		count_verdict(d, AUTHD_CNT_ALLOWED);
		return;
	}
	d->match = AUTHD_MATCH_AUTH;
	if (pol->auth_type == AUTHD_AUTH_KTLS) {
		/* Never in clear, whatever the auth map holds (see enum authd_auth_type). */
		deny(d, AUTHD_DROP_ENCRYPTION_UNAVAILABLE, AUTHD_CNT_DENIED_ENCRYPTION_UNAVAILABLE);
		return;
	}
	auth_key_of(d, &key);
	entry = bpf_map_lookup_elem(&auth, &key);
	if (!entry) {
		deny(d, AUTHD_DROP_AUTH_REQUIRED, AUTHD_CNT_DENIED_AUTH_REQUIRED);
		return;
	}
	d->auth_expires = entry->expires_tai_ns;
	if (d->auth_expires <= now_tai(d)) {
		deny(d, AUTHD_DROP_AUTH_EXPIRED, AUTHD_CNT_DENIED_AUTH_EXPIRED);
		return;
	}
	count_verdict(d, AUTHD_CNT_ALLOWED_AUTH);
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
	e->flags = p->flags | d->flags;
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
	e = bpf_ringbuf_reserve(&auth_events, sizeof(*e), 0);
	if (!e) {
		count(AUTHD_CNT_AUTH_EVENTS_LOST);
		return;
	}
	fill_auth_event(e, p, d);
	bpf_ringbuf_submit(e, 0);
	count(AUTHD_CNT_AUTH_EVENTS);
}

/* news: the connection's first packet, a TCP SYN, or a verdict that differs from the last one reported. */
static __always_inline void report_flow(const struct packet *p, struct decision *d, __u32 level, int news)
{
	struct authd_flow_event *e;

	if (level == AUTHD_FLOWS_NONE)
		return;
	if (level != AUTHD_FLOWS_ALL) {
		if (!news)
			return;
		if (level == AUTHD_FLOWS_DENIED && d->verdict != AUTHD_VERDICT_DENIED)
			return;
	}
	now_tai(d);
	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count(AUTHD_CNT_FLOW_EVENTS_LOST);
		return;
	}
	fill_flow_event(e, p, d);
	bpf_ringbuf_submit(e, 0);
	count(AUTHD_CNT_FLOW_EVENTS);
}

/* ------------------------------------------------------------------------------------------- flows */

static __always_inline void flow_key_of(const struct packet *p, __u8 direction, struct authd_flow_key *key)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->family = p->family;
	key->protocol = p->protocol;
	if (direction == AUTHD_DIR_EGRESS) {
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

/* The flow an ICMP error is about, keyed from the same local endpoint as the error itself: the quoted
 * packet went out of the local endpoint (direction INGRESS: the error comes back to it) or came into it
 * (EGRESS: the local endpoint reports an error about it). 0 when the quoted packet is not the local
 * endpoint's: such an error is judged by its own addresses. */
static __always_inline int quoted_flow_key_of(const struct packet *p, __u8 direction, struct authd_flow_key *key)
{
	const __u8 *local = direction == AUTHD_DIR_EGRESS ? p->src : p->dst;

	__builtin_memset(key, 0, sizeof(*key));
	key->family = p->family;
	key->protocol = p->quoted_protocol;
	if (direction == AUTHD_DIR_INGRESS) {
		if (!same_address(p->quoted_src, local))
			return 0;
		key->local_port = p->quoted_src_port;
		key->remote_port = p->quoted_dst_port;
		__builtin_memcpy(key->local_addr, p->quoted_src, 16);
		__builtin_memcpy(key->remote_addr, p->quoted_dst, 16);
	} else {
		if (!same_address(p->quoted_dst, local))
			return 0;
		key->local_port = p->quoted_dst_port;
		key->remote_port = p->quoted_src_port;
		__builtin_memcpy(key->local_addr, p->quoted_dst, 16);
		__builtin_memcpy(key->remote_addr, p->quoted_src, 16);
	}
	return 1;
}

static __always_inline void fragment_key_of(const struct packet *p, struct fragment_key *key)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->family = p->family;
	key->protocol = p->protocol;
	key->id = p->frag_id;
	__builtin_memcpy(key->src, p->src, 16);
	__builtin_memcpy(key->dst, p->dst, 16);
}

/* A passed first fragment: its datagram's later fragments belong to its flow. */
static __always_inline void record_fragment(const struct packet *p)
{
	struct fragment_key key;
	struct fragment_value value = {};

	fragment_key_of(p, &key);
	value.src_port = p->src_port;
	value.dst_port = p->dst_port;
	value.flags = p->flags & AUTHD_FLOW_F_PORTS;
	bpf_map_update_elem(&fragments, &key, &value, BPF_ANY);
}

/* A later fragment takes the ports its first fragment recorded; 0 when no first fragment passed (lost,
 * out of order, dropped, or evicted): the flow cannot be known, and the fragment is judged by its
 * addresses alone. */
static __always_inline int resolve_fragment(struct packet *p)
{
	struct fragment_key key;
	struct fragment_value *value;

	fragment_key_of(p, &key);
	value = bpf_map_lookup_elem(&fragments, &key);
	if (!value)
		return 0;
	p->src_port = value->src_port;
	p->dst_port = value->dst_port;
	p->flags |= value->flags;
	return 1;
}

/* Whether a flow entry is allowed and not yet due for its re-check. */
static __always_inline int flow_live(const struct authd_flow_value *f)
{
	return f->verdict == AUTHD_VERDICT_ALLOWED && bpf_ktime_get_coarse_ns() < f->recheck_ns;
}

/* Whether an allowed flow entry vouches for this packet right now: live, and the addresses still arrive
 * where the entry saw them (the source through the interface that owns it, if a local endpoint's, or
 * through the tunnel, if a remote workload's while a tunnel is configured; from a workload, a source its
 * interface owns; to a workload, a destination its interface owns). */
static __always_inline int flow_vouches(const struct authd_flow_value *f, __u8 direction, __u32 arrived,
					int from_workload, int to_workload, __u32 ifindex, __u32 tunnel)
{
	__u32 src_owner = direction == AUTHD_DIR_EGRESS ? f->local_ifindex : f->remote_ifindex;

	if (!flow_live(f))
		return 0;
	if (src_owner ? src_owner != arrived : from_workload)
		return 0;
	/* From a remote workload: only through the tunnel, the config of now (not of when it was judged). */
	if (tunnel && direction == AUTHD_DIR_INGRESS && f->remote_node != AUTHD_NODE_LOCAL && arrived != tunnel)
		return 0;
	return !to_workload || f->local_ifindex == ifindex;
}

/* ------------------------------------------------------------------------------------------ programs */

static __always_inline int handle(struct __sk_buff *skb, __u8 hook, int workload)
{
	struct packet p = {};
	struct decision d = {};
	struct authd_flow_key key;
	struct authd_flow_value *f = 0;
	const struct authd_config *cfg;
	const __u8 *local_addr, *remote_addr;
	__u32 zero = 0;
	__u32 src_owner, dst_owner, local_owner, remote_owner, target_owner, tunnel;
	/* The interface the packet entered the node through (at tc ingress: this one). */
	__u32 arrived = hook == AUTHD_HOOK_INGRESS ? skb->ifindex : skb->ingress_ifindex;
	int from_workload = workload && hook == AUTHD_HOOK_INGRESS;
	int to_workload = workload && hook == AUTHD_HOOK_EGRESS;
	int parsed, syn, tabled, news, link_control, router_message, leaving_tunnel;
	__u8 origin;

	/* From a workload, or out of the node: the local end is the source. */
	d.direction = from_workload || (!workload && hook == AUTHD_HOOK_EGRESS) ? AUTHD_DIR_EGRESS : AUTHD_DIR_INGRESS;
	parsed = workload ? parse_eth(skb, &p) : parse_l3(skb, 0, (__u16)skb->protocol, &p);
	if (parsed == PARSE_MALFORMED) {
		count_verdict(&d, AUTHD_CNT_DENIED_MALFORMED);
		return TC_ACT_SHOT;
	}
	if (parsed == PARSE_UNSUPPORTED) {
		count_verdict(&d, AUTHD_CNT_DENIED_UNSUPPORTED);
		return TC_ACT_SHOT;
	}
	d.hook = hook;
	d.ifindex = skb->ifindex;
	syn = p.protocol == IPPROTO_TCP && (p.tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_ACK)) == TCP_FLAG_SYN;
	/* Connections use the table: not ICMP errors, not neighbour discovery, not a workload's router
	 * messages (which an ICMP flow's entry must not pass), not later fragments whose first did not pass. */
	link_control = is_neighbor_discovery(&p) || is_multicast_listener_discovery(&p);
	router_message = from_workload && is_router_message(&p);
	tabled = parsed == PARSE_IP && !p.quoted && !link_control && !router_message &&
		 (!(p.flags & AUTHD_FLOW_F_FRAGMENT) || resolve_fragment(&p));
	cfg = bpf_map_lookup_elem(&config, &zero);
	tunnel = cfg ? cfg->tunnel_ifindex : 0;
	/* The tunnel's own egress hook (authd's L3 programs attached to the WireGuard interface). */
	leaving_tunnel = !workload && hook == AUTHD_HOOK_EGRESS && tunnel && skb->ifindex == tunnel;
	if (tunnel && (arrived == tunnel || leaving_tunnel))
		d.flags = AUTHD_FLOW_F_ENCRYPTED;

	/* Fast path: a packet of an allowed flow, not a new connection. */
	if (tabled) {
		flow_key_of(&p, d.direction, &key);
		f = bpf_map_lookup_elem(&flows, &key);
		if (f && !syn &&
		    flow_vouches(f, d.direction, arrived, from_workload, to_workload, skb->ifindex, tunnel)) {
			count_verdict(&d, AUTHD_CNT_ESTABLISHED);
			if (p.first_fragment)
				record_fragment(&p);
			/* The flow's first allowed packet into the tunnel is news: the event says it left encrypted. */
			news = leaving_tunnel && !(f->flags & AUTHD_FLOW_V_TUNNELED);
			if (news)
				f->flags |= AUTHD_FLOW_V_TUNNELED;
			if (cfg && (news || cfg->flow_level == AUTHD_FLOWS_ALL)) {
				d.flags |= f->origin != d.direction ? AUTHD_FLOW_F_REPLY : 0;
				d.local = f->local;
				d.remote = f->remote;
				d.remote_node = f->remote_node;
				d.verdict = f->verdict;
				d.auth_type = f->auth_type;
				d.match = f->match;
				report_flow(&p, &d, cfg->flow_level, news);
			}
			return TC_ACT_UNSPEC;
		}
	}

	local_addr = d.direction == AUTHD_DIR_EGRESS ? p.src : p.dst;
	remote_addr = d.direction == AUTHD_DIR_EGRESS ? p.dst : p.src;
	src_owner = owner_of(p.family, p.src);
	dst_owner = owner_of(p.family, p.dst);
	local_owner = d.direction == AUTHD_DIR_EGRESS ? src_owner : dst_owner;
	remote_owner = d.direction == AUTHD_DIR_EGRESS ? dst_owner : src_owner;
	identify(&d, p.family, local_addr, remote_addr);

	/* Source binding. */
	if (src_owner && src_owner != arrived) {
		if (from_workload)
			deny(&d, AUTHD_DROP_SOURCE_NOT_OWNED, AUTHD_CNT_DENIED_SOURCE_NOT_OWNED);
		else
			deny(&d, AUTHD_DROP_SOURCE_WRONG_INTERFACE, AUTHD_CNT_DENIED_SOURCE_WRONG_INTERFACE);
	} else if (from_workload && !src_owner &&
		   !(parsed == PARSE_ARP && is_zero4(p.src)) &&            /* ARP probe */
		   !(link_control && is_nd_source(p.src))) { /* ND, MLD from :: or link-local */
		deny(&d, AUTHD_DROP_SOURCE_NOT_OWNED, AUTHD_CNT_DENIED_SOURCE_NOT_OWNED);
	} else if (tunnel && d.direction == AUTHD_DIR_INGRESS && d.remote_node != AUTHD_NODE_LOCAL &&
		   arrived != tunnel) {
		/* A remote workload's source that WireGuard did not decrypt (see the tunnel binding above). */
		deny(&d, AUTHD_DROP_NOT_ENCRYPTED, AUTHD_CNT_DENIED_NOT_ENCRYPTED);
	} else if (from_workload && is_neighbor_discovery(&p) &&
		   (p.icmp_type == ND_NEIGHBOR_ADVERT ||
		    (p.icmp_type == ND_NEIGHBOR_SOLICIT && is_unspecified6(p.src))) &&
		   (target_owner = owner_of(AUTHD_FAMILY_IPV6, p.nd_target)) && target_owner != skb->ifindex) {
		/* An advertisement, or a duplicate address probe, for another endpoint's address. */
		deny(&d, AUTHD_DROP_SOURCE_NOT_OWNED, AUTHD_CNT_DENIED_SOURCE_NOT_OWNED);
	} else if (router_message) {
		deny(&d, AUTHD_DROP_ROUTER_MESSAGE, AUTHD_CNT_DENIED_ROUTER_MESSAGE);
	} else if (to_workload && parsed == PARSE_IP && !link_control && dst_owner != skb->ifindex) {
		deny(&d, AUTHD_DROP_DESTINATION_NOT_OWNED, AUTHD_CNT_DENIED_DESTINATION_NOT_OWNED);
	}
	if (d.verdict == AUTHD_VERDICT_DENIED) {
		/* Reported once per flow and reason; the entry of an allowed flow is left alone (a spoofed
		 * packet must not change how the real one is judged). */
		news = !(f && f->verdict == AUTHD_VERDICT_DENIED && f->drop_reason == d.drop_reason);
		if (tabled && !f && cfg && cfg->flow_level != AUTHD_FLOWS_NONE) {
			struct authd_flow_value value = {}; /* origin 0: a refused packet opens no flow */

			value.verdict = d.verdict;
			value.drop_reason = d.drop_reason;
			bpf_map_update_elem(&flows, &key, &value, BPF_ANY);
		}
		report_flow(&p, &d, cfg ? cfg->flow_level : AUTHD_FLOWS_NONE, news);
		return TC_ACT_SHOT;
	}
	if (parsed == PARSE_ARP || link_control) {
		count(AUTHD_CNT_NEIGHBOR);
		return TC_ACT_UNSPEC;
	}

	/* ICMP errors: judged by the flow they quote when the table holds it as allowed. */
	if (p.quoted && quoted_flow_key_of(&p, d.direction, &key)) {
		f = bpf_map_lookup_elem(&flows, &key);
		if (f && flow_live(f) && f->local_ifindex == local_owner) {
			count_verdict(&d, AUTHD_CNT_ESTABLISHED);
			d.verdict = AUTHD_VERDICT_ALLOWED;
			d.flags |= AUTHD_FLOW_F_REPLY;
			report_flow(&p, &d, cfg ? cfg->flow_level : AUTHD_FLOWS_NONE, 0);
			return TC_ACT_UNSPEC;
		}
		f = 0;
	}

	/* A packet of an opened flow that the entry could not vouch for (re-check due, stopped, or a reply
	 * seen first on this side) is judged as the flow's origin: the direction of the first packet policy
	 * allowed. So an allowed flow's replies pass, and a flow stopped on a re-check (its auth entry
	 * removed or expired) stays stopped both ways: its replies cannot reopen it. An entry without an
	 * origin only remembers refused packets; they opened nothing, so every packet is judged in its own
	 * direction until one is allowed and opens the flow. */
	origin = d.direction;
	if (f && !syn && f->origin && f->origin != d.direction) {
		d.flags |= AUTHD_FLOW_F_REPLY;
		origin = f->origin;
	}
	decide(&d, origin);
	if (d.verdict == AUTHD_VERDICT_DENIED && d.drop_reason != AUTHD_DROP_ENCRYPTION_UNAVAILABLE)
		report_auth_required(&p, &d, cfg); /* an attestation cannot help a kTLS pair */

	news = 1;
	if (tabled) {
		struct authd_flow_value value = {};
		__u64 now = bpf_ktime_get_coarse_ns();
		__u64 recheck = now + AUTHD_FLOW_RECHECK_NS;

		if (d.match == AUTHD_MATCH_AUTH && d.verdict == AUTHD_VERDICT_ALLOWED &&
		    d.auth_expires - d.now < AUTHD_FLOW_RECHECK_NS)
			recheck = now + (d.auth_expires - d.now);
		value.recheck_ns = recheck;
		value.local = d.local;
		value.remote = d.remote;
		value.remote_node = d.remote_node;
		value.local_ifindex = local_owner;
		value.remote_ifindex = remote_owner;
		/* A refusal keeps the origin the entry had: a stopped flow stays the flow it was. */
		value.origin = d.verdict == AUTHD_VERDICT_ALLOWED ? origin : (f ? f->origin : 0);
		value.verdict = d.verdict;
		value.drop_reason = d.drop_reason;
		value.auth_type = d.auth_type;
		value.match = d.match;
		value.flags = f && f->verdict == d.verdict ? f->flags : 0;
		if (leaving_tunnel && d.verdict == AUTHD_VERDICT_ALLOWED)
			value.flags |= AUTHD_FLOW_V_TUNNELED;
		if (f && syn && origin != f->origin && d.verdict == AUTHD_VERDICT_DENIED &&
		    f->verdict == AUTHD_VERDICT_ALLOWED) {
			/* A refused SYN against an allowed flow's ports (from its other end) leaves it be. */
		} else if (f) {
			news = syn || f->verdict != d.verdict || f->drop_reason != d.drop_reason ||
			       (value.flags & ~f->flags & AUTHD_FLOW_V_TUNNELED);
			*f = value;
		} else if (d.verdict == AUTHD_VERDICT_ALLOWED ||
			   (cfg && cfg->flow_level != AUTHD_FLOWS_NONE)) {
			/* Denied flows are tabled only to report each once. */
			bpf_map_update_elem(&flows, &key, &value, BPF_ANY);
		}
		if (p.first_fragment && d.verdict == AUTHD_VERDICT_ALLOWED)
			record_fragment(&p);
	} else if (p.flags & AUTHD_FLOW_F_FRAGMENT) {
		news = 0; /* reported with the connection's first fragment */
	}
	report_flow(&p, &d, cfg ? cfg->flow_level : AUTHD_FLOWS_NONE, news);
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
