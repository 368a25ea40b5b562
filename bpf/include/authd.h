/* SPDX-License-Identifier: Apache-2.0 */
/*
 * authd.h: the whole contract between the BPF datapath and authd's Python side.
 *
 * Every struct, enum value, map name and counter index that both sides use is declared here and nowhere
 * else. authd/datapath/layout.py mirrors it with ctypes; tests/unit/test_datapath_layout.py checks that
 * mirror against the BTF of the compiled object, so a change here that is not made there fails the build.
 *
 * All multi-byte integers are in host byte order, except addresses (network order, as on the wire).
 */
#ifndef AUTHD_H
#define AUTHD_H

#include <linux/types.h>

/* ------------------------------------------------------------------------------------------ handles */

#define AUTHD_IDENTITY_WORLD 0U          /* an address not in the ipcache */
#define AUTHD_IDENTITY_ANY 0xFFFFFFFFU   /* wildcard, policy keys only */
#define AUTHD_NODE_LOCAL 0U              /* node handle of this node; remote nodes are >= 1 */

enum authd_auth_type {
	AUTHD_AUTH_NONE = 0,
	AUTHD_AUTH_SPIRE = 1,
	AUTHD_AUTH_KTLS = 2, /* policy only: the pair's TCP must run in kernel TLS. This datapath cannot
			      * carry a connection into kTLS yet, so it drops such packets (ENCRYPTION_UNAVAILABLE)
			      * and never looks for an auth entry: none can let them pass in clear. */
};

enum authd_direction {
	AUTHD_DIR_INGRESS = 1, /* into the local endpoint */
	AUTHD_DIR_EGRESS = 2,  /* out of the local endpoint */
};

enum authd_family {
	AUTHD_FAMILY_IPV4 = 4,
	AUTHD_FAMILY_IPV6 = 6,
};

/* --------------------------------------------------------------------------------------------- maps */

#define AUTHD_MAP_IPCACHE "ipcache"
#define AUTHD_MAP_POLICY "policy"
#define AUTHD_MAP_AUTH "auth"
#define AUTHD_MAP_EVENTS "events"
#define AUTHD_MAP_COUNTERS "counters"
#define AUTHD_MAP_CONFIG "config"
#define AUTHD_MAP_AUTH_RATELIMIT "auth_ratelimit"
#define AUTHD_MAP_FLOWS "flows"
#define AUTHD_MAP_ENDPOINTS "endpoints"
#define AUTHD_MAP_AUTH_EVENTS "auth_events"
#define AUTHD_MAP_FRAGMENTS "fragments" /* the datapath's own: the ports of fragmented datagrams */
#define AUTHD_MAP_VERDICTS "verdicts"

/* Default sizes; authd sets the configured ones before load (bpf_map__set_max_entries). */
#define AUTHD_IPCACHE_ENTRIES 65536
#define AUTHD_POLICY_ENTRIES 16384
#define AUTHD_AUTH_ENTRIES 524288
#define AUTHD_EVENTS_BYTES (4 * 1024 * 1024)
#define AUTHD_RATELIMIT_ENTRIES 65536
#define AUTHD_FLOW_ENTRIES 65536
#define AUTHD_ENDPOINT_ENTRIES 65536
#define AUTHD_AUTH_EVENTS_BYTES (256 * 1024) /* auth-required events only: flow events cannot fill it */
#define AUTHD_FRAGMENT_ENTRIES 8192

/* ipcache: one LPM trie for both families. The family takes the first 32 bits of the key data, so
 * prefixlen = 32 + the IP prefix length; an IPv4 address fills addr[0..3] and leaves the rest zero. */
struct authd_ipcache_key {
	__u32 prefixlen;
	__u32 family; /* enum authd_family */
	__u8 addr[16];
};

#define AUTHD_IPCACHE_FAMILY_BITS 32

struct authd_ipcache_value {
	__u32 identity; /* identity handle, >= 256 when allocated */
	__u32 node;     /* AUTHD_NODE_LOCAL or a remote node handle */
	__u32 flags;    /* reserved, 0 */
};

/* endpoints: which workload-facing interface owns each local workload address. An LPM trie with the
 * ipcache's key layout; the value names the host-side interface. A packet that enters from a workload
 * interface must carry a source address that interface owns, and a packet delivered to a workload with a
 * local endpoint's source address must have entered the node through that endpoint's interface. Written
 * by authd (from the node's routes) and by the CNI plugin (`authd cni`, on ADD, from the pins alone). */
struct authd_endpoint_value {
	__u32 ifindex; /* the host-side interface that owns the address */
	__u32 flags;   /* AUTHD_ENDPOINT_F_*: who recorded it */
};

#define AUTHD_ENDPOINT_F_ROUTE 0x1 /* learned by authd from a route through the interface */
#define AUTHD_ENDPOINT_F_CNI 0x2   /* recorded by the CNI plugin */

/* policy: which (local, remote, direction) need authentication. Either identity may be
 * AUTHD_IDENTITY_ANY; lookups try (L,R), (L,ANY), (ANY,R), (ANY,ANY) and the first entry found decides,
 * so an entry with auth_type NONE exempts a pair from a wildcard. */
struct authd_policy_key {
	__u32 local;
	__u32 remote;
	__u8 direction; /* enum authd_direction */
	__u8 pad[3];
};

struct authd_policy_value {
	__u8 auth_type; /* enum authd_auth_type */
	__u8 pad[3];
};

/* auth: a pair authenticated until expires_tai_ns (CLOCK_TAI, bpf_ktime_get_tai_ns()). */
struct authd_auth_key {
	__u32 local;
	__u32 remote;
	__u32 remote_node;
	__u8 auth_type;
	__u8 pad[3];
};

struct authd_auth_value {
	__u64 expires_tai_ns;
};

/* config: one entry (key 0), written by authd at start and on reload. */
enum authd_flow_level {
	AUTHD_FLOWS_NONE = 0,   /* no flow events */
	AUTHD_FLOWS_DENIED = 1, /* denied verdicts only (first packet of a connection, SYNs, changes) */
	AUTHD_FLOWS_FIRST = 2,  /* every verdict on a connection's first packet, on SYNs and on changes */
	AUTHD_FLOWS_ALL = 3,    /* every packet: debugging only */
};

struct authd_config {
	__u32 flow_level;     /* enum authd_flow_level */
	__u32 tunnel_ifindex; /* authd's WireGuard interface, or 0: encryption not enforced. When set, a packet
			       * whose source is a remote workload (an ipcache entry on another node) is
			       * judged only if it entered the node through this interface, where WireGuard
			       * decrypted it from the peer that AllowedIPs binds that source to; otherwise it
			       * is dropped (NOT_ENCRYPTED), whatever the auth map holds. */
	__u64 auth_required_interval_ns; /* at most one auth-required event per auth key per interval */
};

/* flows: LRU table of connections, keyed from the local endpoint's side, so that a connection's replies
 * hit the entry of its first packet. An allowed entry lets the packets of its flow pass in both directions
 * without the ipcache, policy and auth lookups until recheck_ns; after that the next packet judges the flow
 * again, in the direction of the packet that opened it (origin), so that replies to a connection the
 * policy allowed pass, and a flow whose auth entry was removed or expired stops, both ways. While the
 * config names a tunnel, an entry whose remote end is a remote workload vouches for its remote end's
 * packets only when they entered through the tunnel (checked against the config on every packet, so a
 * tunnel set later binds established flows at once). recheck_ns is at most AUTHD_FLOW_RECHECK_NS ahead,
 * and never later than the auth entry's expiry. A denied entry only remembers the verdict reported last
 * (flow events); its packets are always judged again. A flow is opened by the first packet policy
 * allows; a denied entry that no allowed packet opened has origin 0, and its packets are judged in their
 * own direction, so a refused packet (a stray datagram, a forged one) never decides how the other
 * direction's packets are judged. */
struct authd_flow_key {
	__u8 family;
	__u8 protocol;
	__u16 local_port;
	__u16 remote_port;
	__u16 pad;
	__u8 local_addr[16];
	__u8 remote_addr[16];
};

struct authd_flow_value {
	__u64 recheck_ns;     /* CLOCK_MONOTONIC (coarse, bpf_ktime_get_coarse_ns()) */
	__u32 local;          /* identities as judged */
	__u32 remote;
	__u32 remote_node;
	__u32 local_ifindex;  /* workload interface that owns the local address; 0 on node-facing interfaces */
	__u32 remote_ifindex; /* interface owning the remote address if it is a local endpoint, else 0 */
	__u8 origin;          /* enum authd_direction of the packet that opened the flow; 0: none did */
	__u8 verdict;         /* enum authd_verdict */
	__u8 drop_reason;     /* enum authd_drop_reason */
	__u8 auth_type;       /* enum authd_auth_type the policy asked for */
	__u8 match;           /* enum authd_policy_match */
	__u8 flags;           /* AUTHD_FLOW_V_* */
	__u8 pad[2];
};

#define AUTHD_FLOW_V_TUNNELED 0x1 /* an allowed packet of the flow left through the tunnel, and a flow event
				   * said so (once per flow, not once per re-check) */

#define AUTHD_FLOW_RECHECK_NS 500000000ULL /* an allowed flow is judged again at least this often */

/* --------------------------------------------------------------------------------------- counters */

enum authd_counter {
	AUTHD_CNT_ALLOWED = 0,               /* passed, no authentication needed */
	AUTHD_CNT_ALLOWED_AUTH = 1,          /* passed with a live auth entry */
	AUTHD_CNT_DENIED_AUTH_REQUIRED = 2,  /* dropped: no auth entry */
	AUTHD_CNT_DENIED_AUTH_EXPIRED = 3,   /* dropped: auth entry expired */
	AUTHD_CNT_DENIED_MALFORMED = 4,      /* dropped: truncated or invalid header, VLAN stack too deep */
	AUTHD_CNT_AUTH_EVENTS = 5,           /* auth-required events emitted */
	AUTHD_CNT_AUTH_EVENTS_SUPPRESSED = 6,/* auth-required events held back by the rate limit */
	AUTHD_CNT_FLOW_EVENTS = 7,           /* flow events emitted */
	AUTHD_CNT_FLOW_EVENTS_LOST = 8,      /* flow events lost: the events ring buffer was full */
	AUTHD_CNT_NEIGHBOR = 9,              /* passed: ARP, or IPv6 neighbour discovery */
	AUTHD_CNT_AUTH_EVENTS_LOST = 10,     /* auth-required events lost: the auth_events ring buffer was full */
	AUTHD_CNT_DENIED_SOURCE_NOT_OWNED = 11,       /* dropped: source address not owned by the interface */
	AUTHD_CNT_DENIED_SOURCE_WRONG_INTERFACE = 12, /* dropped: a local endpoint's source from elsewhere */
	AUTHD_CNT_DENIED_DESTINATION_NOT_OWNED = 13,  /* dropped: destination not owned by the interface */
	AUTHD_CNT_DENIED_UNSUPPORTED = 14,   /* dropped: not ARP, IPv4 or IPv6 (on Ethernet interfaces) */
	AUTHD_CNT_ESTABLISHED = 15,          /* passed by an allowed flow (its packets, replies, ICMP errors) */
	AUTHD_CNT_DENIED_ROUTER_MESSAGE = 16, /* dropped: a router advertisement or redirect from a workload */
	AUTHD_CNT_DENIED_ENCRYPTION_UNAVAILABLE = 17, /* dropped: policy asks for kTLS, not available here */
	AUTHD_CNT_DENIED_NOT_ENCRYPTED = 18, /* dropped: a remote workload's source outside the tunnel */
	AUTHD_CNT_COUNT = 19,
};

#define AUTHD_COUNTER_SLOTS 32 /* map size: room for counters added later without resizing the pin */

/* The verdicts map counts each policy verdict (the ALLOWED, ESTABLISHED and DENIED counters) once more
 * by the packet's direction, at counter + AUTHD_COUNTER_SLOTS * (enum authd_direction - 1); the counters
 * map keeps the totals. */
#define AUTHD_VERDICT_SLOTS 64 /* 2 * AUTHD_COUNTER_SLOTS */

/* ---------------------------------------------------------------------------------------- verdicts */

enum authd_verdict {
	AUTHD_VERDICT_ALLOWED = 1,
	AUTHD_VERDICT_DENIED = 2,
};

enum authd_drop_reason {
	AUTHD_DROP_NONE = 0,
	AUTHD_DROP_AUTH_REQUIRED = 1,
	AUTHD_DROP_AUTH_EXPIRED = 2,
	AUTHD_DROP_MALFORMED = 3,              /* the parser does not fully understand the frame */
	AUTHD_DROP_SOURCE_NOT_OWNED = 4,       /* from a workload: source address not owned by the interface */
	AUTHD_DROP_SOURCE_WRONG_INTERFACE = 5, /* a local endpoint's source address that did not enter the
						* node through that endpoint's interface (underlay, node) */
	AUTHD_DROP_DESTINATION_NOT_OWNED = 6,  /* to a workload: destination not owned by the interface */
	AUTHD_DROP_UNSUPPORTED = 7,            /* not ARP, IPv4 or IPv6 */
	AUTHD_DROP_ROUTER_MESSAGE = 8,         /* from a workload: a router advertisement or an ICMP(v6)
						* redirect, which only the node's routers may send */
	AUTHD_DROP_ENCRYPTION_UNAVAILABLE = 9, /* policy asks for kTLS, which this node cannot provide */
	AUTHD_DROP_NOT_ENCRYPTED = 10,         /* a remote workload's source address on a packet that did not
						* enter the node through the tunnel (config tunnel_ifindex) */
};

/* What decided the verdict. */
enum authd_policy_match {
	AUTHD_MATCH_NONE = 0,   /* no policy entry: allowed */
	AUTHD_MATCH_EXEMPT = 1, /* a policy entry with auth_type NONE: allowed */
	AUTHD_MATCH_AUTH = 2,   /* a policy entry that requires authentication */
};

enum authd_hook {
	AUTHD_HOOK_INGRESS = 1,
	AUTHD_HOOK_EGRESS = 2,
};

/* ------------------------------------------------------------------------------------------ events */

enum authd_event_type {
	AUTHD_EVENT_AUTH_REQUIRED = 1,
	AUTHD_EVENT_FLOW = 2,
};

/* Sent on the auth_events ring buffer (flow events use events) when a packet is dropped for want of a
 * live auth entry, at most once per key per interval. */
struct authd_auth_event {
	__u32 type; /* AUTHD_EVENT_AUTH_REQUIRED */
	__u32 ifindex;
	__u64 timestamp_tai_ns;
	struct authd_auth_key key;
	__u8 direction;   /* enum authd_direction */
	__u8 drop_reason; /* AUTH_REQUIRED or AUTH_EXPIRED */
	__u8 family;      /* enum authd_family */
	__u8 protocol;
	__u32 pad;
	__u8 src_addr[16];
	__u8 dst_addr[16];
};

#define AUTHD_FLOW_F_PORTS 0x1    /* src_port/dst_port are valid */
#define AUTHD_FLOW_F_FRAGMENT 0x2 /* a non-first fragment: no L4 header */
#define AUTHD_FLOW_F_ARP 0x4      /* an ARP packet: addresses are its sender and target protocol addresses */
#define AUTHD_FLOW_F_REPLY 0x8    /* judged by its flow's origin direction (a reply, or an ICMP error) */
#define AUTHD_FLOW_F_ENCRYPTED 0x10 /* seen on the tunnel: it entered the node through the tunnel (config
				     * tunnel_ifindex), or leaves through it (the tunnel's egress hook) */

/* A policy verdict. Source and destination are as on the wire; the local endpoint is the source for
 * EGRESS and the destination for INGRESS. */
struct authd_flow_event {
	__u32 type; /* AUTHD_EVENT_FLOW */
	__u32 ifindex;
	__u64 timestamp_tai_ns;
	__u32 local_identity;
	__u32 remote_identity;
	__u32 remote_node;
	__u8 verdict;     /* enum authd_verdict */
	__u8 direction;   /* enum authd_direction */
	__u8 auth_type;   /* enum authd_auth_type the policy asked for */
	__u8 drop_reason; /* enum authd_drop_reason */
	__u8 family;      /* enum authd_family */
	__u8 protocol;    /* IPPROTO_* of the L4 header, or of the last header seen */
	__u8 tcp_flags;   /* FIN 0x01 SYN 0x02 RST 0x04 PSH 0x08 ACK 0x10 URG 0x20 ECE 0x40 CWR 0x80 */
	__u8 hook;        /* enum authd_hook */
	__u8 match;       /* enum authd_policy_match */
	__u8 flags;       /* AUTHD_FLOW_F_* */
	__u16 src_port;
	__u16 dst_port;
	__u16 pad;
	__u8 src_addr[16];
	__u8 dst_addr[16];
	__u32 pad2;
};

/* ------------------------------------------------------------------------------------------- attach */

/* tc filter handle and priority authd attaches with; BPF_TC_F_REPLACE at these replaces atomically. */
#define AUTHD_TC_HANDLE 0xa17d
#define AUTHD_TC_PRIORITY 1

#endif /* AUTHD_H */
