//! The compiler proper: validated policies and the cluster model in, the desired ruleset out.
//! Names of sets and chains derive from stable identities (policy, rule, interface), never from
//! content, so a pod or label change only changes set elements and the dataplane diff stays small.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use sha2::{Digest, Sha256};

use super::validate::{validate, Direction, PeerSpec, Policy, PolicyRule, PortSpec, Problem};
use super::{AddrRanges, Cluster, Family, Pod, Protocol};

/// Type of a named set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    /// Interval set of addresses of one family.
    Addr(Family),
    /// Interval set of `inet_proto . inet_service`.
    ProtoPort,
    /// Set of `addr . inet_proto . inet_service` (named ports resolved per pod).
    AddrProtoPort(Family),
}

/// A named set and its elements in nftables element syntax.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub kind: SetKind,
    pub elements: BTreeSet<String>,
}

/// One match of a rule; all of a rule's matches must hold.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Match {
    /// Source address in an address set.
    SrcAddr(Family, String),
    /// Destination address in an address set.
    DstAddr(Family, String),
    /// `meta l4proto . th dport` in a proto-port set.
    ProtoPort(String),
    /// `daddr . meta l4proto . th dport` in a named-port set.
    DstAddrProtoPort(Family, String),
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Allowed for good (ingress: the last check on the path).
    Accept,
    /// Allowed by egress; back to the base chain, which still checks the destination's ingress.
    Return,
    Drop,
}

/// A rule with its counter; `comment` names the policy rule it came from (for counters and explain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NftRule {
    pub matches: Vec<Match>,
    pub action: Action,
    pub comment: String,
}

/// A regular chain with its rules in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Chain {
    pub rules: Vec<NftRule>,
}

/// The desired content of table `inet sepal` (besides its fixed base chain), deterministic for a
/// given cluster model.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ruleset {
    pub sets: BTreeMap<String, Set>,
    pub chains: BTreeMap<String, Chain>,
    /// Host veth → chain checking traffic to the pod (dispatch on `oifname`).
    pub ingress_dispatch: BTreeMap<String, String>,
    /// Host veth → chain checking traffic from the pod (dispatch on `iifname`).
    pub egress_dispatch: BTreeMap<String, String>,
    /// Every local pod's host veth (invalid conntrack state is dropped on these).
    pub endpoints: BTreeSet<String>,
    /// Invalid policy content that was left out.
    pub problems: Vec<Problem>,
}

fn short_hash(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    hex::encode(&digest[..5])
}

/// Rule comment naming the policy rule, e.g. `x/allow-a ingress[0]`; nftables keeps at most 128
/// bytes, so long names are cut and made unique with a hash.
pub(crate) fn rule_comment(policy: &Policy, direction: Direction, index: usize) -> String {
    let full = format!("{} {direction}[{index}]", policy.id());
    if full.len() <= 120 {
        return full;
    }
    let id = policy.id();
    let mut cut = 90;
    while !id.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{} {direction}[{index}]", &id[..cut], short_hash(&id))
}

/// Chain name of an endpoint and direction.
pub(crate) fn endpoint_chain(iface: &str, direction: Direction) -> String {
    match direction {
        Direction::Ingress => format!("in-{iface}"),
        Direction::Egress => format!("eg-{iface}"),
    }
}

/// Every validated policy, sorted by namespace and name, plus the problems found.
pub(crate) fn validated(cluster: &Cluster) -> (Vec<Policy>, Vec<Problem>) {
    let mut policies = Vec::new();
    let mut problems = Vec::new();
    for np in &cluster.policies {
        let (p, mut probs) = validate(np);
        problems.append(&mut probs);
        policies.extend(p);
    }
    policies.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    problems.sort_by(|a, b| (&a.policy, &a.field).cmp(&(&b.policy, &b.field)));
    (policies, problems)
}

/// Does `policy` select `pod`?
pub(crate) fn selects(policy: &Policy, pod: &Pod) -> bool {
    pod.namespace == policy.namespace && policy.pod_selector.matches(&pod.labels)
}

/// Is `pod` one of the pods a selector peer of `policy` names?
pub(crate) fn peer_matches_pod(
    cluster: &Cluster,
    ns_labels: &mut BTreeMap<String, BTreeMap<String, String>>,
    policy: &Policy,
    peer: &PeerSpec,
    pod: &Pod,
) -> bool {
    match peer {
        PeerSpec::Pods { namespaces, pods } => {
            let ns_ok = match namespaces {
                None => pod.namespace == policy.namespace,
                Some(sel) => {
                    let labels = ns_labels
                        .entry(pod.namespace.clone())
                        .or_insert_with(|| cluster.namespace_labels(&pod.namespace));
                    sel.matches(labels)
                }
            };
            ns_ok && pods.matches(&pod.labels)
        }
        PeerSpec::IpBlock { ranges } => pod.ips.iter().any(|ip| ranges.contains(*ip)),
    }
}

/// Builds the desired ruleset for the node whose pods have `host_iface` set.
pub fn compile(cluster: &Cluster) -> Ruleset {
    let (policies, problems) = validated(cluster);
    let mut rs = Ruleset {
        problems,
        ..Ruleset::default()
    };
    let mut ns_labels = BTreeMap::new();

    // Rules per (policy index, direction), shared by every local endpoint the policy selects.
    let mut compiled: BTreeMap<(usize, Direction), Vec<NftRule>> = BTreeMap::new();
    // For each pod (by index), the policies selecting it, in policy order.
    let mut policies_of_pod: Vec<Vec<usize>> = vec![Vec::new(); cluster.pods.len()];
    for (pi, policy) in policies.iter().enumerate() {
        let mut selected: Vec<&Pod> = Vec::new();
        for (idx, pod) in cluster.pods.iter().enumerate() {
            if selects(policy, pod) {
                selected.push(pod);
                policies_of_pod[idx].push(pi);
            }
        }
        for direction in [Direction::Ingress, Direction::Egress] {
            let Some(rules) = policy.rules(direction) else {
                continue;
            };
            let mut out = Vec::new();
            for rule in rules {
                compile_rule(
                    cluster,
                    &mut ns_labels,
                    policy,
                    direction,
                    rule,
                    &selected,
                    &mut rs.sets,
                    &mut out,
                );
            }
            compiled.insert((pi, direction), out);
        }
    }

    // Per-endpoint chains: only for directions in which some policy isolates the pod.
    let mut local: Vec<(usize, &Pod)> = cluster
        .pods
        .iter()
        .enumerate()
        .filter(|(_, p)| p.host_iface.is_some())
        .collect();
    local.sort_by(|a, b| a.1.host_iface.cmp(&b.1.host_iface));
    for (idx, pod) in local {
        let Some(iface) = pod.host_iface.as_deref() else {
            continue;
        };
        rs.endpoints.insert(iface.to_string());
        for direction in [Direction::Ingress, Direction::Egress] {
            let mut chain = Chain::default();
            let mut isolated = false;
            for &pi in &policies_of_pod[idx] {
                let Some(rules) = compiled.get(&(pi, direction)) else {
                    continue;
                };
                isolated = true;
                chain.rules.extend(rules.iter().cloned());
            }
            if !isolated {
                continue;
            }
            chain.rules.push(NftRule {
                matches: vec![],
                action: Action::Drop,
                comment: format!("{}/{} {direction} default deny", pod.namespace, pod.name),
            });
            let name = endpoint_chain(iface, direction);
            match direction {
                Direction::Ingress => rs.ingress_dispatch.insert(iface.to_string(), name.clone()),
                Direction::Egress => rs.egress_dispatch.insert(iface.to_string(), name.clone()),
            };
            rs.chains.insert(name, chain);
        }
    }
    rs
}

#[allow(clippy::too_many_arguments)]
fn compile_rule(
    cluster: &Cluster,
    ns_labels: &mut BTreeMap<String, BTreeMap<String, String>>,
    policy: &Policy,
    direction: Direction,
    rule: &PolicyRule,
    selected: &[&Pod],
    sets: &mut BTreeMap<String, Set>,
    out: &mut Vec<NftRule>,
) {
    let d = match direction {
        Direction::Ingress => 'i',
        Direction::Egress => 'e',
    };
    let base = format!("{d}{}-{}", short_hash(&policy.id()), rule.index);
    let comment = rule_comment(policy, direction, rule.index);
    let action = match direction {
        Direction::Ingress => Action::Accept,
        Direction::Egress => Action::Return,
    };

    // Peer pods (for egress named ports) and the peer address set.
    let peer_pods: Vec<&Pod> = match &rule.peers {
        None => cluster.pods.iter().collect(),
        Some(peers) => cluster
            .pods
            .iter()
            .filter(|pod| {
                peers
                    .iter()
                    .any(|peer| peer_matches_pod(cluster, ns_labels, policy, peer, pod))
            })
            .collect(),
    };
    // Egress rules with only named ports match on the named-port set alone.
    let needs_peer_set = direction == Direction::Ingress
        || rule
            .ports
            .as_ref()
            .is_none_or(|ports| ports.iter().any(|p| matches!(p, PortSpec::Range { .. })));
    let peer_sets: Option<[String; 2]> =
        rule.peers.as_ref().filter(|_| needs_peer_set).map(|peers| {
            let mut ranges = AddrRanges::new();
            for peer in peers {
                match peer {
                    PeerSpec::IpBlock { ranges: r } => ranges.union(r),
                    PeerSpec::Pods { .. } => {
                        for pod in cluster
                            .pods
                            .iter()
                            .filter(|pod| peer_matches_pod(cluster, ns_labels, policy, peer, pod))
                        {
                            for ip in &pod.ips {
                                ranges.add_ip(*ip);
                            }
                        }
                    }
                }
            }
            Family::ALL.map(|family| {
                let name = format!("{base}-peer{}", fam(family));
                sets.insert(
                    name.clone(),
                    Set {
                        kind: SetKind::Addr(family),
                        elements: ranges.elements(family).into_iter().collect(),
                    },
                );
                name
            })
        });
    let peer_match = |family: Family| -> Option<Match> {
        peer_sets.as_ref().map(|names| {
            let name = names[family as usize].clone();
            match direction {
                Direction::Ingress => Match::SrcAddr(family, name),
                Direction::Egress => Match::DstAddr(family, name),
            }
        })
    };

    let Some(ports) = &rule.ports else {
        // Every port and protocol.
        match &peer_sets {
            None => out.push(NftRule {
                matches: vec![],
                action,
                comment,
            }),
            Some(_) => {
                for family in Family::ALL {
                    out.push(NftRule {
                        matches: peer_match(family).into_iter().collect(),
                        action,
                        comment: comment.clone(),
                    });
                }
            }
        }
        return;
    };

    let mut numeric: BTreeMap<Protocol, Vec<(u16, u16)>> = BTreeMap::new();
    let mut named: Vec<(Protocol, &str)> = Vec::new();
    for p in ports {
        match p {
            PortSpec::Range {
                protocol,
                first,
                last,
            } => numeric.entry(*protocol).or_default().push((*first, *last)),
            PortSpec::Named { protocol, name } => named.push((*protocol, name)),
        }
    }
    if !numeric.is_empty() {
        let name = format!("{base}-ports");
        let mut elements = BTreeSet::new();
        for (proto, mut ranges) in numeric {
            ranges.sort_unstable();
            let mut merged: Vec<(u16, u16)> = Vec::new();
            for (s, e) in ranges {
                match merged.last_mut() {
                    Some(last) if s as u32 <= last.1 as u32 + 1 => last.1 = last.1.max(e),
                    _ => merged.push((s, e)),
                }
            }
            for (s, e) in merged {
                elements.insert(if s == e {
                    format!("{} . {s}", proto.nft())
                } else {
                    format!("{} . {s}-{e}", proto.nft())
                });
            }
        }
        sets.insert(
            name.clone(),
            Set {
                kind: SetKind::ProtoPort,
                elements,
            },
        );
        match &peer_sets {
            None => out.push(NftRule {
                matches: vec![Match::ProtoPort(name)],
                action,
                comment: comment.clone(),
            }),
            Some(_) => {
                for family in Family::ALL {
                    out.push(NftRule {
                        matches: peer_match(family)
                            .into_iter()
                            .chain([Match::ProtoPort(name.clone())])
                            .collect(),
                        action,
                        comment: comment.clone(),
                    });
                }
            }
        }
    }
    if !named.is_empty() {
        // Ingress: the selected pod's own port of that name; egress: the peer pod's.
        let owners: &[&Pod] = match direction {
            Direction::Ingress => selected,
            Direction::Egress => &peer_pods,
        };
        for family in Family::ALL {
            let mut elements = BTreeSet::new();
            for pod in owners {
                for &(proto, pname) in &named {
                    let Some(port) = pod.named_port(pname, proto) else {
                        continue;
                    };
                    for ip in pod.ips.iter().filter(|ip| Family::of(ip) == family) {
                        elements.insert(format!("{} . {} . {port}", ip_elem(ip), proto.nft()));
                    }
                }
            }
            let name = format!("{base}-named{}", fam(family));
            sets.insert(
                name.clone(),
                Set {
                    kind: SetKind::AddrProtoPort(family),
                    elements,
                },
            );
            let mut matches: Vec<Match> = match direction {
                Direction::Ingress => peer_match(family).into_iter().collect(),
                // The named-port set already holds only the peer pods' addresses.
                Direction::Egress => vec![],
            };
            matches.push(Match::DstAddrProtoPort(family, name));
            out.push(NftRule {
                matches,
                action,
                comment: comment.clone(),
            });
        }
    }
}

fn fam(f: Family) -> &'static str {
    match f {
        Family::V4 => "4",
        Family::V6 => "6",
    }
}

fn ip_elem(ip: &IpAddr) -> String {
    ip.to_string()
}
