//! NetworkPolicy compiler: felix's own small cluster model and networking.k8s.io/v1 policies in,
//! a deterministic desired nftables ruleset (sets, per-endpoint chains, dispatch maps) out. Pure code.
//!
//! Semantics follow the Kubernetes NetworkPolicy API exactly: a pod is isolated for a direction
//! only when some policy selects it for that direction; the allowed traffic of all policies
//! selecting it is the union of their rules; replies of allowed flows are always allowed (conntrack).
//! Policies are validated as the API server would; a rule it would have rejected is ignored and
//! reported, the rest of the policy still applies (a rejected rule never widens what is allowed).
//!
//! Use from the agent:
//! 1. Keep a `Cluster`: namespaces and their labels, every pod with its `podIPs` (pods of this
//!    node with `host_iface` set to their host veth, e.g. as soon as CNI ADD picked the IP and
//!    the veth name), named container ports, and all NetworkPolicies.
//! 2. Keep a `Compiler`; `let (rs, touched) = compiler.update(&cluster)` rebuilds only what the
//!    change affects (`compile(&cluster)` is a fresh one); log `rs.problems` (and surface them
//!    as policy status).
//! 3. `dataplane.apply_update(rs, touched)` with a `nft::Dataplane` created once at start: the
//!    first apply replaces (adopts) the previous run's table atomically, later ones send only the
//!    difference at the names the update touched. CNI ADD should return after the apply that
//!    includes the new pod.
//! 4. `sepal policy explain`: `explain` on the same cluster; the deciding rule's `comment` and
//!    `default_deny_comment` look up packets with `nft::packets_for` on
//!    `nft::Dataplane::counters`.

mod addr;
mod cnp;
pub mod cnp_api;
mod compile;
mod compiler;
mod explain;
mod recipe;
mod tiers;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

pub use addr::{AddrRanges, Family};
pub use cnp::{
    validate_cluster_policy, ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, RuleAction, Tier,
};
pub use cnp_api::ClusterNetworkPolicy;
pub use compile::{
    compile, default_deny_comment, Action, Chain, Match, NftRule, Ruleset, Set, SetKind, PASS_MARK,
};
pub use compiler::{Compiler, Touched};
pub use explain::{
    explain, parse_port, DirectionVerdict, ExplainError, Explainer, Explanation,
    Peer as ExplainPeer,
};
pub use k8s_openapi::api::networking::v1::NetworkPolicy;
pub use tiers::cluster_rule_comment;
pub use validate::{
    validate, Direction, PeerSpec, Policy, PolicyRule, PortSpec, Problem, ProblemScope, Selector,
};

/// The label the API server puts on every namespace, holding the namespace's name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Everything the compiler looks at: namespaces, pods (local ones have a host veth) and policies.
#[derive(Debug, Clone, Default)]
pub struct Cluster {
    pub namespaces: BTreeMap<String, Namespace>,
    /// Shared: the caller, the compiler's memory of the last compile and the revocation thread
    /// each hold the cluster's pods, a pointer each.
    pub pods: Vec<Arc<Pod>>,
    /// Shared like the pods (the compiler keeps each policy it validated, to see what changed).
    pub policies: Vec<Arc<NetworkPolicy>>,
    /// ClusterNetworkPolicies of both tiers, shared like the policies.
    pub cluster_policies: Vec<Arc<ClusterNetworkPolicy>>,
    /// The cluster's nodes, for ClusterNetworkPolicy `nodes` peers.
    pub nodes: Vec<Arc<Node>>,
}

/// A node as ClusterNetworkPolicy sees it: its labels and every IP of its `status.addresses`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Node {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub ips: Vec<IpAddr>,
}

/// A namespace and its labels.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// Labels, shared: a pod's labels are usually its ReplicaSet's, and the compiler keeps a copy of
/// every pod of the cluster besides its caller's.
pub type Labels = Arc<BTreeMap<String, String>>;

/// A pod as policy sees it. The shared parts (`Arc`) make a copy of a cluster's pods cost a few
/// words per pod, not a copy of its labels and names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pod {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    pub labels: Labels,
    /// The pod's IPs (Pod status `podIPs`); a pod without IPs yet is in no address set.
    pub ips: Vec<IpAddr>,
    /// Host-side veth of a pod on this node; `None` for pods on other nodes.
    pub host_iface: Option<String>,
    /// Named container ports (`containers[].ports[]` with a `name`).
    pub ports: Arc<[NamedPort]>,
    /// The pod uses its node's network: ClusterNetworkPolicy neither selects it nor names it
    /// as a peer (its address is the node's).
    pub host_network: bool,
}

/// A named container port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NamedPort {
    pub name: Box<str>,
    pub protocol: Protocol,
    pub port: u16,
}

/// The transport protocols NetworkPolicy knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// Parses the API spelling (`TCP`, `UDP`, `SCTP`; case-sensitive like the API server).
    pub fn from_api(s: &str) -> Option<Protocol> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The nftables keyword (also the IANA protocol name).
    pub fn nft(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
            Protocol::Sctp => 132,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        })
    }
}

impl Cluster {
    /// Labels of a namespace, always including `kubernetes.io/metadata.name` (the API server
    /// sets it on every namespace; a namespace not yet seen still has its name label).
    pub fn namespace_labels(&self, name: &str) -> BTreeMap<String, String> {
        let mut labels = self
            .namespaces
            .get(name)
            .map(|ns| ns.labels.clone())
            .unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_string(), name.to_string());
        labels
    }

    /// The pod `namespace/name`, if known.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods
            .iter()
            .find(|p| &*p.namespace == namespace && &*p.name == name)
            .map(|p| &**p)
    }
}

impl Pod {
    /// The pod's port of that name and protocol, as a named NetworkPolicy port resolves.
    pub fn named_port(&self, name: &str, protocol: Protocol) -> Option<u16> {
        self.ports
            .iter()
            .find(|p| &*p.name == name && p.protocol == protocol)
            .map(|p| p.port)
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
pub(crate) mod tests;
#[cfg(test)]
mod tiers_tests;
