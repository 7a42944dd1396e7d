//! ClusterNetworkPolicy in the ruleset: one chain per (policy, direction) holding its rules in
//! order, shared by every local pod it selects, the same way NetworkPolicies get theirs.
//!
//! An endpoint chain evaluates the tiers in the specification's order:
//! 1. Admin: a jump to the pod's Admin policies (one policy's chain, or a chain shared by pods
//!    with the same list, jumping to each in priority order). `Accept` accepts, `Deny` drops,
//!    `Pass` sets `PASS_MARK` and returns; the tier chain returns as soon as the mark is set, and
//!    the endpoint chain clears it.
//! 2. NetworkPolicy: when a NetworkPolicy isolates the pod, its verdict is final (allowed, or the
//!    default deny), as upstream says: Baseline is never reached.
//! 3. Baseline: like Admin, for pods no NetworkPolicy isolates; whatever falls through is allowed.
//!
//! Peers compile through the NetworkPolicy rule compiler (`compile_group`): a `namespaces` or
//! `pods` peer is a pod peer with a namespace selector, `networks` and `nodes` (the nodes'
//! addresses) are address blocks, so equal peers share their sets across both kinds of policy.

use super::cnp::{ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, RuleAction, Tier};
use super::compile::{
    compile_group, dir_index, fit_comment, short_hash, Ctx, GroupSource, NsLabels, PodIndex,
    RuleGroup, DIRECTIONS,
};
use super::recipe::Owners;
use super::validate::{Direction, PeerSpec, PolicyRule, PortSpec};
use super::{Action, AddrRanges, Chain, Cluster, Family, Match, NftRule, Pod, Protocol, Selector};

/// A validated ClusterNetworkPolicy and the names derived from it, computed once.
#[derive(Debug)]
pub(crate) struct CNamed {
    pub policy: ClusterPolicy,
    /// Its chain per direction (ingress, egress), and the comment of a jump to it.
    pub chain: [String; 2],
    pub jump_comment: [String; 2],
    /// Some rule of that direction is a `Pass` (the tier must check the mark after it).
    pub has_pass: [bool; 2],
    /// Some peer names nodes (their addresses change with the Node objects).
    pub uses_nodes: bool,
}

impl CNamed {
    pub fn new(policy: ClusterPolicy) -> CNamed {
        CNamed {
            chain: DIRECTIONS.map(|d| cluster_chain(&policy, d)),
            jump_comment: DIRECTIONS.map(|d| fit_comment(&policy.id(), &d.to_string())),
            has_pass: DIRECTIONS
                .map(|d| policy.rules(d).iter().any(|r| r.action == RuleAction::Pass)),
            uses_nodes: DIRECTIONS.into_iter().any(|d| {
                policy
                    .rules(d)
                    .iter()
                    .flat_map(|r| r.peers.iter().flatten())
                    .any(|p| matches!(p, ClusterPeer::Nodes(_)))
            }),
            policy,
        }
    }

    /// Does the policy have rules for `direction` (an empty list leaves that direction alone)?
    pub fn applies(&self, direction: Direction) -> bool {
        !self.policy.rules(direction).is_empty()
    }
}

/// Chain of a cluster policy's rules for one direction: `ai-`/`ae-` (Admin), `bi-`/`be-`.
fn cluster_chain(policy: &ClusterPolicy, direction: Direction) -> String {
    let t = match policy.tier {
        Tier::Admin => 'a',
        Tier::Baseline => 'b',
    };
    let d = match direction {
        Direction::Ingress => 'i',
        Direction::Egress => 'e',
    };
    format!("{t}{d}-{}", short_hash(&policy.id()))
}

/// The comment of a cluster policy rule: `Admin/NAME ingress[3] RULE-NAME` (the rule's name
/// cut to 40 bytes, so the whole fits nft's comment limit).
pub fn cluster_rule_comment(
    policy: &ClusterPolicy,
    direction: Direction,
    rule: &ClusterRule,
) -> String {
    let mut what = format!("{direction}[{}]", rule.index);
    if !rule.name.is_empty() {
        let mut end = rule.name.len().min(40);
        while !rule.name.is_char_boundary(end) {
            end -= 1;
        }
        what.push(' ');
        what.push_str(&rule.name[..end]);
    }
    fit_comment(&policy.id(), &what)
}

/// Does the policy's subject hold `pod`? (Its namespace's labels are in `ns_labels`.)
pub(crate) fn cluster_selects(ns_labels: &NsLabels, policy: &ClusterPolicy, pod: &Pod) -> bool {
    subject_holds(ns_labels, &policy.namespaces, &policy.pods, pod)
}

/// Does a subject (pods matching `pods` in namespaces matching `namespaces`) hold `pod`?
pub(crate) fn subject_holds(
    ns_labels: &NsLabels,
    namespaces: &Selector,
    pods: &Selector,
    pod: &Pod,
) -> bool {
    !pod.host_network
        && pods.matches(&pod.labels)
        && ns_labels
            .get(&*pod.namespace)
            .is_some_and(|labels| namespaces.matches(labels))
}

/// The pods of this node a subject holds, namespace by namespace.
pub(crate) fn local_subjects<'a>(
    index: &PodIndex<'a>,
    ns_labels: &NsLabels,
    namespaces: &Selector,
    pods: &Selector,
) -> Vec<&'a Pod> {
    index
        .namespaces()
        .filter(|ns| ns_labels.get(*ns).is_some_and(|l| namespaces.matches(l)))
        .flat_map(|ns| index.in_namespace(ns))
        .map(|&(_, pod)| pod)
        .filter(|pod| pod.host_iface.is_some() && subject_holds(ns_labels, namespaces, pods, pod))
        .collect()
}

/// The addresses of the nodes a selector names.
pub(crate) fn node_ranges(cluster: &Cluster, selector: &super::Selector) -> AddrRanges {
    let mut ranges = AddrRanges::new();
    for node in cluster.nodes.iter().filter(|n| selector.matches(&n.labels)) {
        for ip in &node.ips {
            ranges.add_ip(*ip);
        }
    }
    ranges
}

/// The address families the cluster policies' blocks use (besides the pods').
pub(crate) fn cluster_families<'a>(
    cluster: &Cluster,
    policies: impl Iterator<Item = &'a CNamed>,
) -> Vec<Family> {
    let mut out = Vec::new();
    for named in policies {
        for peer in DIRECTIONS
            .into_iter()
            .flat_map(|d| named.policy.rules(d).iter())
            .flat_map(|r| r.peers.iter().flatten())
        {
            let ranges = match peer {
                ClusterPeer::Networks(r) => r.clone(),
                ClusterPeer::Nodes(sel) => node_ranges(cluster, sel),
                _ => continue,
            };
            out.extend(Family::ALL.into_iter().filter(|&f| !ranges.is_empty(f)));
        }
    }
    out
}

/// A cluster policy rule as a NetworkPolicy-style rule for the rule compiler; `None` when it
/// matches nothing (every peer is one Sepal cannot match).
fn as_policy_rule(cluster: &Cluster, rule: &ClusterRule) -> Option<PolicyRule> {
    let peers = match &rule.peers {
        None => None,
        Some(list) => {
            let specs: Vec<PeerSpec> = list
                .iter()
                .filter_map(|p| match p {
                    ClusterPeer::Pods { namespaces, pods } => Some(PeerSpec::Pods {
                        namespaces: Some(namespaces.clone()),
                        pods: pods.clone(),
                    }),
                    ClusterPeer::Networks(ranges) => Some(PeerSpec::IpBlock {
                        ranges: ranges.clone(),
                    }),
                    ClusterPeer::Nodes(sel) => Some(PeerSpec::IpBlock {
                        ranges: node_ranges(cluster, sel),
                    }),
                    ClusterPeer::Nothing => None,
                })
                .collect();
            if specs.is_empty() {
                return None;
            }
            Some(specs)
        }
    };
    let ports = rule.ports.as_ref().map(|ports| {
        ports
            .iter()
            .flat_map(|p| match p {
                ClusterPort::Range {
                    protocol,
                    first,
                    last,
                } => vec![PortSpec::Range {
                    protocol: *protocol,
                    first: *first,
                    last: *last,
                }],
                // A named port has the protocol of the container port that has the name.
                ClusterPort::Named(name) => [Protocol::Tcp, Protocol::Udp, Protocol::Sctp]
                    .map(|protocol| PortSpec::Named {
                        protocol,
                        name: name.clone(),
                    })
                    .to_vec(),
            })
            .collect()
    });
    Some(PolicyRule {
        index: rule.index,
        peers,
        ports,
    })
}

/// One cluster policy's chains (for a node where it selects some pod).
pub(crate) fn compile_cluster_policy(ctx: &mut Ctx, named: &CNamed) -> Vec<(String, Chain)> {
    let policy = &named.policy;
    let selected_key = format!("cnp{:?}{:?}", policy.namespaces, policy.pods);
    let mut chains = Vec::new();
    for direction in DIRECTIONS {
        if !named.applies(direction) {
            continue;
        }
        let mut chain = Chain::default();
        for rule in policy.rules(direction) {
            let Some(converted) = as_policy_rule(ctx.cluster, rule) else {
                continue;
            };
            let src = GroupSource {
                namespace: "",
                selected_key: selected_key.clone(),
                comment: cluster_rule_comment(policy, direction, rule),
                action: match rule.action {
                    RuleAction::Accept => Action::Accept,
                    RuleAction::Deny => Action::Drop,
                    RuleAction::Pass => Action::Pass,
                },
                pod_network_only: true,
                owners: Owners::LocalSubjects {
                    namespaces: policy.namespaces.clone(),
                    pods: policy.pods.clone(),
                },
            };
            let group = RuleGroup {
                indices: vec![rule.index],
                rules: vec![&converted],
            };
            compile_group(ctx, &src, direction, &group, &mut chain.rules);
        }
        chains.push((named.chain[dir_index(direction)].clone(), chain));
    }
    chains
}

/// The jump from an endpoint chain into one tier, for the pod's policies of that tier in order:
/// straight to the one policy's chain, or to a chain shared by every pod with the same list.
/// Returns the jump and the shared chain (name and content) when there is one.
pub(crate) fn tier_jump(
    tier: Tier,
    policies: &[&CNamed],
    direction: Direction,
) -> (NftRule, Option<(String, Chain)>) {
    let d = dir_index(direction);
    if let [one] = policies {
        let jump = NftRule {
            matches: vec![],
            action: Action::Jump(one.chain[d].clone()),
            comment: one.jump_comment[d].clone(),
        };
        return (jump, None);
    }
    // Named after what decides its content: the chains in order and which of them can pass.
    let names: Vec<String> = policies
        .iter()
        .map(|n| format!("{}{}", n.chain[d], if n.has_pass[d] { "+" } else { "" }))
        .collect();
    let t = match tier {
        Tier::Admin => 'a',
        Tier::Baseline => 'b',
    };
    let shared = format!(
        "t{t}{}-{}",
        &super::compile::endpoint_chain("", direction)[..1],
        short_hash(&names.join("\n"))
    );
    let mut rules = Vec::new();
    for (i, n) in policies.iter().enumerate() {
        rules.push(NftRule {
            matches: vec![],
            action: Action::Jump(n.chain[d].clone()),
            comment: n.jump_comment[d].clone(),
        });
        if n.has_pass[d] && i + 1 < policies.len() {
            rules.push(NftRule {
                matches: vec![Match::Passed],
                action: Action::Return,
                comment: fit_comment(&n.policy.id(), &format!("{direction} passed")),
            });
        }
    }
    let jump = NftRule {
        matches: vec![],
        action: Action::Jump(shared.clone()),
        comment: format!("{tier} tier: {} policies", policies.len()),
    };
    (jump, Some((shared, Chain { rules })))
}

/// The rule after a tier that clears the Pass mark, when some policy of the tier can set it.
pub(crate) fn clear_pass(
    tier: Tier,
    policies: &[&CNamed],
    direction: Direction,
) -> Option<NftRule> {
    let d = dir_index(direction);
    policies.iter().any(|n| n.has_pass[d]).then(|| NftRule {
        matches: vec![Match::Passed],
        action: Action::ClearPass,
        comment: format!("{tier} tier passed"),
    })
}
