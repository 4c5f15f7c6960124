// SPDX-License-Identifier: GPL-2.0
// tapgraph: the process behind every TCP connect, however briefly it lived.
//
// One raw tracepoint, inet_sock_set_state(sk, oldstate, newstate):
// - newstate == SYN_SENT runs in the connecting process's context (tcp_v4_connect/tcp_v6_connect):
//   remember sk -> (tgid, comm). The source port may still be 0 here (inet_hash_connect picks it
//   after the state is set), so nothing is emitted yet.
// - oldstate == SYN_SENT and newstate ESTABLISHED or CLOSE (refused, timed out, or the connect
//   failed): the 4-tuple is complete; emit it with the remembered process and forget sk.
// - oldstate == SYN_RECV and newstate ESTABLISHED: a connection this host accepted (softirq
//   context: no process; user space names the server after its listener). With these the agent
//   needs no SYN-ACK capture for short-lived connections.
// Events go to user space through a ring buffer; a full ring drops the event and counts it.
//
// Field offsets come from the running kernel's BTF (CO-RE): the structs below name only the fields
// read, with preserve_access_index, so no vmlinux.h is needed at build time.

#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#define AF_INET 2
#define AF_INET6 10
#define IPPROTO_TCP 6
#define TCP_ESTABLISHED 1
#define TCP_SYN_SENT 2
#define TCP_SYN_RECV 3
#define TCP_CLOSE 7
#define COMM_LEN 16
// 1 MiB: about 14,500 events (64 bytes and an 8-byte header each).
#define RING_SIZE (1 << 20)

struct in6_addr {
	union {
		__u8 u6_addr8[16];
	} in6_u;
} __attribute__((preserve_access_index));

struct ns_common {
	unsigned int inum;
} __attribute__((preserve_access_index));

struct net {
	struct ns_common ns;
} __attribute__((preserve_access_index));

typedef struct {
	struct net *net;
} possible_net_t;

struct sock_common {
	__be32 skc_daddr;
	__be32 skc_rcv_saddr;
	__be16 skc_dport;
	__u16 skc_num;
	unsigned short skc_family;
	possible_net_t skc_net;
	struct in6_addr skc_v6_daddr;
	struct in6_addr skc_v6_rcv_saddr;
} __attribute__((preserve_access_index));

struct sock {
	struct sock_common __sk_common;
	__u16 sk_protocol;
} __attribute__((preserve_access_index));

// The source port as connect chose it: unlike skc_num, it is not cleared when a failed connect
// releases its port just before the CLOSE transition.
struct inet_sock {
	__be16 inet_sport;
} __attribute__((preserve_access_index));

// Who connected: set at SYN_SENT, read at the next transition.
struct connector {
	__u32 tgid;
	char comm[COMM_LEN];
};

// One finished connect, as user space reads it (agent/src/bpf.rs parses exactly this layout:
// 64 bytes, little-endian host order except the addresses, which are network order).
struct event {
	__u32 tgid;
	__u32 netns;
	__u16 family;   // AF_INET or AF_INET6
	__u16 sport;    // host order
	__u16 dport;    // host order
	__u8 outcome;   // 1 established, 7 closed before establishing (refused, failed)
	__u8 side;      // 0: this host connected (client); 1: this host accepted (server)
	__u8 saddr[16]; // IPv4 in the first 4 bytes
	__u8 daddr[16];
	char comm[COMM_LEN];
};

_Static_assert(sizeof(struct event) == 64, "agent/src/bpf.rs reads 64-byte events");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct connector);
} CONNECTING SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, RING_SIZE);
} EVENTS SEC(".maps");

// Index 0: events dropped on a full ring.
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} RING_FULL SEC(".maps");

// Sends one event for `sk`; counts it in RING_FULL when the ring has no room. The ring wakes the
// reader only once it is half full: events are read at the next snapshot anyway, and a wake-up
// per connection would cost more than the rest of the tracer (the reader also looks every 250 ms).
static __always_inline int emit(struct sock *sk, __u32 tgid, const char *comm, __u8 outcome, __u8 side)
{
	struct event *e = bpf_ringbuf_reserve(&EVENTS, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		__u64 *full = bpf_map_lookup_elem(&RING_FULL, &zero);
		if (full)
			*full += 1;
		return 0;
	}
	e->tgid = tgid;
	if (comm)
		__builtin_memcpy(e->comm, comm, COMM_LEN);
	else
		__builtin_memset(e->comm, 0, COMM_LEN);
	e->netns = BPF_CORE_READ(sk, __sk_common.skc_net.net, ns.inum);
	e->family = BPF_CORE_READ(sk, __sk_common.skc_family);
	e->sport = __builtin_bswap16(BPF_CORE_READ((struct inet_sock *)sk, inet_sport));
	e->dport = __builtin_bswap16(BPF_CORE_READ(sk, __sk_common.skc_dport));
	e->outcome = outcome;
	e->side = side;
	__builtin_memset(e->saddr, 0, 16);
	__builtin_memset(e->daddr, 0, 16);
	if (e->family == AF_INET) {
		__be32 s = BPF_CORE_READ(sk, __sk_common.skc_rcv_saddr);
		__be32 d = BPF_CORE_READ(sk, __sk_common.skc_daddr);
		__builtin_memcpy(e->saddr, &s, 4);
		__builtin_memcpy(e->daddr, &d, 4);
	} else {
		BPF_CORE_READ_INTO(&e->saddr, sk, __sk_common.skc_v6_rcv_saddr.in6_u.u6_addr8);
		BPF_CORE_READ_INTO(&e->daddr, sk, __sk_common.skc_v6_daddr.in6_u.u6_addr8);
	}
	__u64 wake = bpf_ringbuf_query(&EVENTS, BPF_RB_AVAIL_DATA) > RING_SIZE / 2 ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP;
	bpf_ringbuf_submit(e, wake);
	return 0;
}

SEC("raw_tracepoint/inet_sock_set_state")
int inet_sock_set_state(struct bpf_raw_tracepoint_args *ctx)
{
	struct sock *sk = (struct sock *)ctx->args[0];
	int oldstate = (int)ctx->args[1];
	int newstate = (int)ctx->args[2];
	__u64 key = (__u64)sk;

	if (newstate == TCP_SYN_SENT) {
		if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
			return 0;
		struct connector c = {};
		c.tgid = bpf_get_current_pid_tgid() >> 32;
		bpf_get_current_comm(&c.comm, sizeof(c.comm));
		bpf_map_update_elem(&CONNECTING, &key, &c, BPF_ANY);
		return 0;
	}
	if (oldstate == TCP_SYN_RECV && newstate == TCP_ESTABLISHED) {
		if (BPF_CORE_READ(sk, sk_protocol) != IPPROTO_TCP)
			return 0;
		return emit(sk, 0, 0, TCP_ESTABLISHED, 1);
	}
	if (oldstate != TCP_SYN_SENT)
		return 0;
	struct connector *c = bpf_map_lookup_elem(&CONNECTING, &key);
	if (!c)
		return 0;
	struct connector who = *c;
	bpf_map_delete_elem(&CONNECTING, &key);
	return emit(sk, who.tgid, who.comm, newstate, 0);
}

char LICENSE[] SEC("license") = "GPL";
