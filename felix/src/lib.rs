//! Sepal's dataplane ("felix", after Calico's): it turns desired state into kernel state.
//! Each module owns one clearly marked piece of the kernel and never touches anything else.

/// Host routes of Sepal's route protocol number: pod /32s to veths, node-block blackholes,
/// BGP-learned routes (owned by the routes/links engineer).
pub mod routes;
/// Sysctls the node and each host-side veth need (owned by the routes/links engineer).
pub mod sysctl;
/// Host-side veth discovery and removal (owned by the routes/links engineer).
pub mod links;
/// NetworkPolicy compiler: pure model in, desired ruleset out (owned by the policy engineer).
pub mod policy;
/// The nftables dataplane for the compiled policy, table `inet sepal` (owned by the policy engineer).
pub mod nft;

/// Route protocol number marking every kernel route Sepal owns (see /etc/iproute2/rt_protos:
/// 83 is unassigned; BIRD uses 12, zebra 11, Calico's felix 80).
pub const ROUTE_PROTO: u8 = 83;
