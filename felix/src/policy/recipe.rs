//! The sets whose elements come from pods: peer address sets and named-port sets. Each is built
//! from a `Recipe` the compiler keeps beside the set, so that a pod change rebuilds only the sets
//! whose recipe names that pod, and leaves the chains of policies that merely name it as a peer
//! untouched (their rules look the set up by name; only its elements change).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use super::compile::{peer_matches_pod, Ctx, NsLabels, Set, SetKind};
use super::tiers::{local_subjects, subject_holds};
use super::validate::PeerSpec;
use super::{AddrRanges, Family, Pod, Protocol, Selector};

/// How to build a group of pod-dependent sets (all families, and a peer group's interval sets
/// beside its hash sets). `key` is the prefix of every set name the recipe builds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Recipe {
    /// Peer address sets: the addresses of the pods the peers name, and the ipBlocks' own.
    Peers {
        key: String,
        peers: Vec<PeerSpec>,
        /// The policy's namespace, which a pod peer without a namespace selector means.
        namespace: String,
        /// Host-network pods are left out (ClusterNetworkPolicy).
        pod_network_only: bool,
    },
    /// Named-port sets: `addr . proto . port` of the owners' ports with those names.
    Named {
        key: String,
        owners: Owners,
        named: Vec<(Protocol, String)>,
        pod_network_only: bool,
    },
}

/// Whose ports a named-port set resolves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Owners {
    /// The peer pods of an egress rule (`None`: every pod).
    Peers {
        peers: Option<Vec<PeerSpec>>,
        namespace: String,
    },
    /// The pods a NetworkPolicy selects: its namespace's pods matching the selector.
    Selected {
        namespace: String,
        selector: Selector,
    },
    /// The pods of this node a ClusterNetworkPolicy's subject holds (its ingress rules only
    /// ever decide traffic to them, so remote subjects would be dead elements).
    LocalSubjects {
        namespaces: Selector,
        pods: Selector,
    },
}

/// The name of a peer group's set of one family (`wide`: its interval set).
pub(crate) fn peer_set_name(key: &str, family: Family, wide: bool) -> String {
    format!("{key}-peer{}{}", fam(family), if wide { "r" } else { "" })
}

/// The name of a named-port set of one family.
pub(crate) fn named_set_name(key: &str, family: Family) -> String {
    format!("{key}-named{}", fam(family))
}

/// The recipe key a set name starts with.
pub(crate) fn key_of(set: &str) -> &str {
    set.split('-').next().unwrap_or(set)
}

impl Recipe {
    pub(crate) fn key(&self) -> &str {
        match self {
            Recipe::Peers { key, .. } | Recipe::Named { key, .. } => key,
        }
    }

    /// Can `pod` (one version of it) change what this recipe builds?
    pub(crate) fn depends_on(&self, ns_labels: &NsLabels, pod: &Pod) -> bool {
        match self {
            // Only pod peers: an ipBlock's addresses are the block's, whoever holds them.
            Recipe::Peers {
                peers,
                namespace,
                pod_network_only,
                ..
            } => {
                counted(pod, *pod_network_only)
                    && peers.iter().any(|peer| {
                        matches!(peer, PeerSpec::Pods { .. })
                            && peer_matches_pod(ns_labels, namespace, peer, pod)
                    })
            }
            Recipe::Named {
                owners,
                pod_network_only,
                ..
            } => {
                counted(pod, *pod_network_only)
                    && match owners {
                        Owners::Peers { peers: None, .. } => true,
                        Owners::Peers {
                            peers: Some(peers),
                            namespace,
                        } => peers
                            .iter()
                            .any(|peer| peer_matches_pod(ns_labels, namespace, peer, pod)),
                        Owners::Selected {
                            namespace,
                            selector,
                        } => *pod.namespace == **namespace && selector.matches(&pod.labels),
                        Owners::LocalSubjects { namespaces, pods } => {
                            pod.host_iface.is_some()
                                && subject_holds(ns_labels, namespaces, pods, pod)
                        }
                    }
            }
        }
    }

    /// Builds the recipe's sets into `ctx.sets`. Returns the names built, by family.
    pub(crate) fn build(&self, ctx: &mut Ctx) -> BTreeMap<Family, Vec<String>> {
        match self {
            Recipe::Peers {
                key,
                peers,
                namespace,
                pod_network_only,
            } => build_peers(ctx, key, peers, namespace, *pod_network_only),
            Recipe::Named {
                key,
                owners,
                named,
                pod_network_only,
            } => {
                let owners: Vec<&Pod> = match owners {
                    Owners::LocalSubjects { namespaces, pods } => {
                        local_subjects(ctx.index, ctx.ns_labels, namespaces, pods)
                    }
                    Owners::Selected {
                        namespace,
                        selector,
                    } => ctx
                        .index
                        .in_namespace(namespace)
                        .iter()
                        .map(|&(_, pod)| pod)
                        .filter(|pod| selector.matches(&pod.labels))
                        .collect(),
                    Owners::Peers { peers, namespace } => {
                        peer_pods(ctx, peers.as_deref(), namespace, *pod_network_only)
                    }
                };
                build_named(ctx, key, named, &owners)
            }
        }
    }
}

/// A pod that changed: its version before and after (`None`: absent).
pub(crate) type PodChange<'a> = (Option<&'a Pod>, Option<&'a Pod>);

impl Recipe {
    /// The elements `pod` puts into the recipe's pod-dependent sets (when it depends on it).
    fn elements_of(&self, ns_labels: &NsLabels, pod: &Pod) -> Vec<(String, String)> {
        if !self.depends_on(ns_labels, pod) {
            return Vec::new();
        }
        match self {
            Recipe::Peers { key, .. } => pod
                .ips
                .iter()
                .map(|ip| (peer_set_name(key, Family::of(ip), false), ip.to_string()))
                .collect(),
            Recipe::Named { key, named, .. } => {
                let mut out = Vec::new();
                for (proto, pname) in named {
                    let Some(port) = pod.named_port(pname, *proto) else {
                        continue;
                    };
                    for ip in &pod.ips {
                        let element = format!("{ip} . {} . {port}", proto.nft());
                        out.push((named_set_name(key, Family::of(ip)), element));
                    }
                }
                out
            }
        }
    }

    /// Updates the recipe's sets in `sets` for the pods in `changed`, as `build` would make
    /// them from the pods now in the cluster: a new version's elements join; an old version's
    /// leave unless another pod (`holders`: the pods now holding an address) or an ipBlock
    /// still puts them there. Returns the names of the sets that changed.
    pub(crate) fn patch<'p>(
        &self,
        sets: &mut BTreeMap<String, Set>,
        changed: &[PodChange],
        ns_labels: &NsLabels,
        holders: &dyn Fn(&IpAddr) -> Vec<&'p Pod>,
    ) -> BTreeSet<String> {
        let mut touched = BTreeSet::new();
        let mut leaving: BTreeSet<(String, String)> = BTreeSet::new();
        for (old, new) in changed {
            let joining = new
                .map(|p| self.elements_of(ns_labels, p))
                .unwrap_or_default();
            if let Some(old) = old {
                leaving.extend(
                    self.elements_of(ns_labels, old)
                        .into_iter()
                        .filter(|e| !joining.contains(e)),
                );
            }
            for (name, element) in joining {
                if let Some(set) = sets.get_mut(&name) {
                    if set.elements.insert(element) {
                        touched.insert(name);
                    }
                }
            }
        }
        for (name, element) in leaving {
            let Some(set) = sets.get_mut(&name) else {
                continue;
            };
            if !set.elements.contains(&element) || self.still_held(ns_labels, &element, holders) {
                continue;
            }
            set.elements.remove(&element);
            touched.insert(name);
        }
        touched
    }

    /// Does some pod now in the cluster, or an ipBlock of the peers, put `element` in a set?
    fn still_held<'p>(
        &self,
        ns_labels: &NsLabels,
        element: &str,
        holders: &dyn Fn(&IpAddr) -> Vec<&'p Pod>,
    ) -> bool {
        let addr = element.split(' ').next().unwrap_or(element);
        let Ok(ip) = addr.parse::<IpAddr>() else {
            return true;
        };
        let by_pod = holders(&ip).into_iter().any(|pod| {
            self.elements_of(ns_labels, pod)
                .iter()
                .any(|(_, e)| e == element)
        });
        by_pod
            || match self {
                Recipe::Peers { peers, .. } => {
                    let mut blocks = AddrRanges::new();
                    for peer in peers {
                        if let PeerSpec::IpBlock { ranges } = peer {
                            blocks.union(ranges);
                        }
                    }
                    blocks
                        .hosts_and_ranges(Family::of(&ip))
                        .0
                        .iter()
                        .any(|host| host == element)
                }
                Recipe::Named { .. } => false,
            }
    }
}

/// Does `pod` count as a pod at all (`pod_network_only`: host-network pods do not)?
fn counted(pod: &Pod, pod_network_only: bool) -> bool {
    !(pod_network_only && pod.host_network)
}

/// The pods the peers name (`None`: every pod), each once.
fn peer_pods<'a>(
    ctx: &Ctx<'a, '_>,
    peers: Option<&[PeerSpec]>,
    namespace: &str,
    pod_network_only: bool,
) -> Vec<&'a Pod> {
    let counts = |pod: &Pod| counted(pod, pod_network_only);
    match peers {
        None => ctx
            .cluster
            .pods
            .iter()
            .map(|p| &**p)
            .filter(|p| counts(p))
            .collect(),
        Some(peers) => {
            let mut found: BTreeMap<usize, &Pod> = BTreeMap::new();
            for peer in peers {
                found.extend(ctx.index.peer_pods(ctx.ns_labels, namespace, peer));
            }
            found.into_values().filter(|p| counts(p)).collect()
        }
    }
}

/// Per family, pod addresses and single-address ipBlocks in a hash set (constant-time lookup,
/// cheap to update), wider ipBlock ranges in an interval set beside it.
fn build_peers(
    ctx: &mut Ctx,
    key: &str,
    peers: &[PeerSpec],
    namespace: &str,
    pod_network_only: bool,
) -> BTreeMap<Family, Vec<String>> {
    let counts = |pod: &Pod| counted(pod, pod_network_only);
    let mut ips: BTreeSet<IpAddr> = BTreeSet::new();
    let mut blocks = AddrRanges::new();
    let mut has_pods = false;
    for peer in peers {
        match peer {
            PeerSpec::IpBlock { ranges } => blocks.union(ranges),
            PeerSpec::Pods { .. } => {
                has_pods = true;
                ips.extend(
                    ctx.index
                        .peer_pods(ctx.ns_labels, namespace, peer)
                        .into_iter()
                        .filter(|(_, pod)| counts(pod))
                        .flat_map(|(_, pod)| pod.ips.iter().copied()),
                )
            }
        }
    }
    let mut names = BTreeMap::new();
    for &family in ctx.families {
        let (hosts, wide) = blocks.hosts_and_ranges(family);
        let mut family_names = Vec::new();
        // The hash set exists whenever pods could join it, and as the one (empty) set when the
        // blocks leave nothing of this family: no peer matches then.
        if has_pods || !hosts.is_empty() || wide.is_empty() {
            let elements: BTreeSet<String> = ips
                .iter()
                .filter(|ip| Family::of(ip) == family)
                .map(IpAddr::to_string)
                .chain(hosts)
                .collect();
            let set = Set {
                kind: SetKind::Addr(family),
                elements,
            };
            let name = peer_set_name(key, family, false);
            ctx.sets.insert(name.clone(), set);
            family_names.push(name);
        }
        if !wide.is_empty() {
            let set = Set {
                kind: SetKind::AddrInterval(family),
                elements: wide.into_iter().collect(),
            };
            let name = peer_set_name(key, family, true);
            ctx.sets.insert(name.clone(), set);
            family_names.push(name);
        }
        names.insert(family, family_names);
    }
    names
}

fn build_named(
    ctx: &mut Ctx,
    key: &str,
    named: &[(Protocol, String)],
    owners: &[&Pod],
) -> BTreeMap<Family, Vec<String>> {
    let mut names = BTreeMap::new();
    for &family in ctx.families {
        let mut elements = BTreeSet::new();
        for pod in owners {
            for (proto, pname) in named {
                let Some(port) = pod.named_port(pname, *proto) else {
                    continue;
                };
                for ip in pod.ips.iter().filter(|ip| Family::of(ip) == family) {
                    elements.insert(format!("{ip} . {} . {port}", proto.nft()));
                }
            }
        }
        let name = named_set_name(key, family);
        ctx.sets.insert(
            name.clone(),
            Set {
                kind: SetKind::AddrProtoPort(family),
                elements,
            },
        );
        names.insert(family, vec![name]);
    }
    names
}

pub(crate) fn fam(f: Family) -> &'static str {
    match f {
        Family::V4 => "4",
        Family::V6 => "6",
    }
}
