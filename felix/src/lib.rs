//! Sepal's dataplane ("felix", after Calico's): it turns desired state into kernel state.
//! Each module owns one clearly marked piece of the kernel and never touches anything else.

/// Conntrack entries of flows a policy change denies: found and removed (revocation).
pub mod conntrack;
/// Running `nft` and `conntrack`, optionally in another network namespace.
pub mod exec;
/// Flow-log rules: rate-limited nflog copies of what the deciding policy rules take.
pub mod flow_log;
/// Pods' hostPorts: DNAT from the node's addresses, table `inet sepal-hostports`.
pub mod hostport;
/// nft's library, libnftables, loaded at run time (`nft -f -` without a process per change).
pub mod libnft;
/// Host-side veth discovery and removal.
pub mod links;
/// Work inside another network namespace from a thread of its own.
pub mod netns;
/// Reading an nflog group: the packets flow-log rules copy, decoded to flows.
pub mod nflog;
/// The nftables dataplane for the compiled policy, table `inet sepal`.
pub mod nft;
/// nft batches through libnftables or the `nft` tool.
pub mod nft_runner;
/// Incremental policy changes in nf_tables' netlink protocol, without libnftables' cache.
pub mod nft_wire;
/// NetworkPolicy compiler: pure model in, desired ruleset out.
pub mod policy;
/// Many route writes to one sendmsg, for large BGP tables.
pub mod route_batch;
/// Host routes of Sepal's route protocol number: pod /32s to veths, node-block blackholes,
/// BGP-learned routes.
pub mod routes;
/// Sysctls the node and each host-side veth need.
pub mod sysctl;

/// Route protocol number marking every kernel route Sepal owns (see /etc/iproute2/rt_protos:
/// 83 is unassigned; BIRD uses 12, zebra 11, Calico's felix 80).
pub const ROUTE_PROTO: u8 = 83;
