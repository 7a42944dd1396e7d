//! The compiler proper: validated policies and the cluster model in, the desired ruleset out.
//! Set names derive from stable identities (policy, rule), never from their content, so a pod or
//! label change only changes set elements and the dataplane diff stays small.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use sha2::{Digest, Sha256};

use super::recipe::{named_set_name, peer_set_name, Owners, Recipe};
use super::validate::{validate, Direction, PeerSpec, Policy, PolicyRule, PortSpec, Problem};
use super::{Cluster, Compiler, Family, Pod, Protocol};

/// Type of a named set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SetKind {
    /// Set of single addresses of one family (pod peers, single-address ipBlocks).
    Addr(Family),
    /// Interval set of addresses of one family (ipBlock ranges wider than one address).
    AddrInterval(Family),
    /// Set of `inet_proto . inet_service` (single ports).
    ProtoPort,
    /// Interval set of `inet_proto . inet_service` (with `endPort` ranges).
    ProtoPortInterval,
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
    /// A ClusterNetworkPolicy `Pass` rule matched in the tier being evaluated (`PASS_MARK`).
    Passed,
}

impl Match {
    /// The named set this match looks up, if any.
    pub fn set(&self) -> Option<&str> {
        match self {
            Match::SrcAddr(_, set)
            | Match::DstAddr(_, set)
            | Match::ProtoPort(set)
            | Match::DstAddrProtoPort(_, set) => Some(set),
            Match::Passed => None,
        }
    }
}

/// The packet mark bit a `Pass` rule sets to leave its tier: the tier chain returns when it is
/// set, and the endpoint chain clears it before the next tier (nftables has no multi-level
/// return). Bits 14 and 15 are kube-proxy's; this one is Sepal's alone.
pub const PASS_MARK: u32 = 0x0010_0000;

/// What a matching rule does.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Action {
    /// Allowed in this direction (egress and ingress are separate base chains, so an egress
    /// accept still leaves the destination's ingress check).
    Accept,
    Drop,
    /// Evaluate a policy's chain (it accepts or returns).
    Jump(String),
    /// Set `PASS_MARK` and return: the rest of this tier is skipped.
    Pass,
    /// Back to the calling chain.
    Return,
    /// Clear `PASS_MARK` and go on (no verdict).
    ClearPass,
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
    /// Host veth → chain checking traffic from the pod to its own node (input hook, `iifname`):
    /// ClusterNetworkPolicy egress rules apply there; NetworkPolicy always allows it.
    pub local_dispatch: BTreeMap<String, String>,
    /// Every local pod's host veth (invalid conntrack state is dropped on these).
    pub endpoints: BTreeSet<String>,
    /// Invalid policy content that was left out.
    pub problems: Vec<Problem>,
}

pub(crate) fn short_hash(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    hex::encode(&digest[..5])
}

/// Comment of an isolated pod's final drop rule: its counter is the pod's dropped packets.
pub fn default_deny_comment(namespace: &str, name: &str, direction: Direction) -> String {
    fit_comment(
        &format!("{namespace}/{name}"),
        &format!("{direction} default deny"),
    )
}

/// `ID WHAT`, within nft's 128 bytes for a comment (longer ones fail the whole batch): a long
/// `ID` (a pod's or policy's `namespace/name`, up to 317 bytes) keeps its first 70 bytes and
/// gets a hash of the whole for the rest, so comments stay distinct and readable.
pub(crate) fn fit_comment(id: &str, what: &str) -> String {
    let full = format!("{id} {what}");
    if full.len() <= 120 {
        return full;
    }
    let mut cut = 70.min(id.len());
    while !id.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{} {what}", &id[..cut], short_hash(id))
}

/// Chain name of an endpoint and direction.
pub(crate) fn endpoint_chain(iface: &str, direction: Direction) -> String {
    match direction {
        Direction::Ingress => format!("in-{}", chain_safe(iface)),
        Direction::Egress => format!("eg-{}", chain_safe(iface)),
    }
}

/// An interface name as it can go into a chain name.
fn chain_safe(iface: &str) -> std::borrow::Cow<'_, str> {
    // Interface names may hold characters nft identifiers cannot; those get a hashed name.
    let plain = iface
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if plain {
        iface.into()
    } else {
        format!("x{}", short_hash(iface)).into()
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
    *pod.namespace == *policy.namespace && policy.pod_selector.matches(&pod.labels)
}

/// Labels of every namespace that has pods or a Namespace object, computed once per compile.
pub(crate) type NsLabels = BTreeMap<String, BTreeMap<String, String>>;

pub(crate) fn ns_labels(cluster: &Cluster) -> NsLabels {
    let mut out = NsLabels::new();
    for name in cluster
        .namespaces
        .keys()
        .map(String::as_str)
        .chain(cluster.pods.iter().map(|p| &*p.namespace))
    {
        if !out.contains_key(name) {
            out.insert(name.to_string(), cluster.namespace_labels(name));
        }
    }
    out
}

/// Pods by namespace (with their index in `cluster.pods`): a policy selects only pods of its
/// own namespace and most peers name few namespaces, so nothing scans every pod per policy.
pub(crate) struct PodIndex<'a> {
    by_ns: BTreeMap<&'a str, Vec<(usize, &'a Pod)>>,
    all: Vec<(usize, &'a Pod)>,
}

impl<'a> PodIndex<'a> {
    pub(crate) fn new(cluster: &'a Cluster) -> PodIndex<'a> {
        let mut by_ns: BTreeMap<&str, Vec<(usize, &Pod)>> = BTreeMap::new();
        for (i, pod) in cluster.pods.iter().enumerate() {
            by_ns.entry(&*pod.namespace).or_default().push((i, pod));
        }
        PodIndex {
            by_ns,
            all: cluster.pods.iter().map(|p| &**p).enumerate().collect(),
        }
    }

    /// The namespaces that have pods.
    pub(crate) fn namespaces(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.by_ns.keys().copied()
    }

    pub(crate) fn in_namespace(&self, ns: &str) -> &[(usize, &'a Pod)] {
        self.by_ns.get(ns).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The pods a peer names (for an ipBlock: the pods whose address is in it).
    /// `namespace`: the policy's own, which a peer without a namespace selector means.
    pub(crate) fn peer_pods(
        &self,
        ns_labels: &NsLabels,
        namespace: &str,
        peer: &PeerSpec,
    ) -> Vec<(usize, &'a Pod)> {
        match peer {
            PeerSpec::Pods {
                namespaces: None,
                pods,
            } => self
                .in_namespace(namespace)
                .iter()
                .filter(|(_, p)| pods.matches(&p.labels))
                .copied()
                .collect(),
            PeerSpec::Pods {
                namespaces: Some(sel),
                pods,
            } => self
                .by_ns
                .iter()
                .filter(|(ns, _)| ns_labels.get(**ns).is_some_and(|l| sel.matches(l)))
                .flat_map(|(_, list)| list.iter())
                .filter(|(_, p)| pods.matches(&p.labels))
                .copied()
                .collect(),
            PeerSpec::IpBlock { ranges } => self
                .all
                .iter()
                .filter(|(_, p)| p.ips.iter().any(|ip| ranges.contains(*ip)))
                .copied()
                .collect(),
        }
    }
}

/// Is `pod` one of the pods a selector peer of a policy in `namespace` names?
pub(crate) fn peer_matches_pod(
    ns_labels: &NsLabels,
    namespace: &str,
    peer: &PeerSpec,
    pod: &Pod,
) -> bool {
    match peer {
        PeerSpec::Pods { namespaces, pods } => {
            let ns_ok = match namespaces {
                None => *pod.namespace == *namespace,
                Some(sel) => ns_labels
                    .get(&*pod.namespace)
                    .is_some_and(|labels| sel.matches(labels)),
            };
            ns_ok && pods.matches(&pod.labels)
        }
        PeerSpec::IpBlock { ranges } => pod.ips.iter().any(|ip| ranges.contains(*ip)),
    }
}

/// Rules of one policy direction that have identical `ports`: they compile into one nftables
/// rule over the union of their peers (same meaning, one set lookup instead of many).
pub(crate) struct RuleGroup<'a> {
    pub indices: Vec<usize>,
    pub rules: Vec<&'a PolicyRule>,
}

pub(crate) fn rule_groups(rules: &[PolicyRule]) -> Vec<RuleGroup<'_>> {
    let mut groups: Vec<RuleGroup> = Vec::new();
    for rule in rules {
        match groups.iter_mut().find(|g| g.rules[0].ports == rule.ports) {
            Some(g) => {
                g.indices.push(rule.index);
                g.rules.push(rule);
            }
            None => groups.push(RuleGroup {
                indices: vec![rule.index],
                rules: vec![rule],
            }),
        }
    }
    groups
}

/// Comment of a rule group: `x/allow ingress[0]`, `x/allow ingress[0,2]`, or for long lists
/// `x/allow ingress[0,1,…+198]`.
pub(crate) fn group_comment(policy: &Policy, direction: Direction, indices: &[usize]) -> String {
    let list: Vec<String> = indices.iter().map(|i| i.to_string()).collect();
    let mut joined = list.join(",");
    if joined.len() > 24 {
        joined = format!("{},{},…+{}", list[0], list[1], list.len() - 2);
    }
    fit_comment(&policy.id(), &format!("{direction}[{joined}]"))
}

/// Name of the chain holding a policy's rules for one direction.
pub(crate) fn policy_chain(policy: &Policy, direction: Direction) -> String {
    let d = match direction {
        Direction::Ingress => "pi",
        Direction::Egress => "pe",
    };
    format!("{d}-{}", short_hash(&policy.id()))
}

pub(crate) const DIRECTIONS: [Direction; 2] = [Direction::Ingress, Direction::Egress];

pub(crate) fn dir_index(direction: Direction) -> usize {
    match direction {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// Builds the desired ruleset for the node whose pods have `host_iface` set (a fresh
/// `Compiler`; the agent keeps one, which recompiles only what a change affects).
pub fn compile(cluster: &Cluster) -> Ruleset {
    Compiler::default().compile(cluster)
}

/// Address families anything in the cluster uses; rules for an unused family would only ever
/// look up empty sets.
pub(crate) fn families_in_use<'a>(
    cluster: &Cluster,
    policies: impl Iterator<Item = &'a Policy> + Clone,
) -> Vec<Family> {
    Family::ALL
        .into_iter()
        .filter(|&f| {
            cluster
                .pods
                .iter()
                .any(|p| p.ips.iter().any(|ip| Family::of(ip) == f))
                || policies.clone().any(|p| {
                    [&p.ingress, &p.egress]
                        .into_iter()
                        .flatten()
                        .flatten()
                        .flat_map(|r| r.peers.iter().flatten())
                        .any(|peer| {
                            matches!(peer, PeerSpec::IpBlock { ranges } if !ranges.is_empty(f))
                        })
                })
        })
        .collect()
}

/// What one compile round shares between the policies it compiles: the sets built so far in
/// this round (a set's name determines its content, so the first build serves every policy).
pub(crate) struct Ctx<'a, 'b> {
    pub cluster: &'a Cluster,
    pub index: &'b PodIndex<'a>,
    pub ns_labels: &'b NsLabels,
    pub families: &'b [Family],
    pub sets: &'b mut HashMap<String, Set>,
    /// How this round's pod-dependent sets were built, by recipe key.
    pub recipes: &'b mut HashMap<String, Recipe>,
    /// The sets in use, current for this cluster state, and the recipes of the pod-dependent
    /// ones: a policy being rebuilt reuses them instead of building them again.
    pub current: &'b BTreeMap<String, Set>,
    pub kept: &'b HashMap<String, Recipe>,
}

impl Ctx<'_, '_> {
    /// The names of a kept recipe's sets in use, by family, as `names` lists them for a family;
    /// `None` unless every family has one.
    pub(crate) fn reuse(
        &self,
        key: &str,
        names: impl Fn(Family) -> Vec<String>,
    ) -> Option<BTreeMap<Family, Vec<String>>> {
        if !self.kept.contains_key(key) {
            return None;
        }
        self.families
            .iter()
            .map(|&f| {
                let present: Vec<String> = names(f)
                    .into_iter()
                    .filter(|n| self.current.contains_key(n))
                    .collect();
                (!present.is_empty()).then_some((f, present))
            })
            .collect()
    }
}

/// What a rule group compiles for: the policy's namespace (what a peer without a namespace
/// selector means; empty for cluster policies, whose peers always name namespaces), a key for
/// what decides the selected pods (ingress named-port sets are named after it), and the rules'
/// comment and action.
pub(crate) struct GroupSource<'p> {
    pub namespace: &'p str,
    pub selected_key: String,
    pub comment: String,
    pub action: Action,
    /// Pod peers leave out host-network pods (ClusterNetworkPolicy: their address is the node's).
    pub pod_network_only: bool,
    /// Whose ports the rules' ingress named ports are: the pods `selected_key` describes.
    pub owners: Owners,
}

impl GroupSource<'_> {
    /// A NetworkPolicy's allow rules.
    pub(crate) fn network_policy<'p>(
        policy: &'p Policy,
        direction: Direction,
        group: &RuleGroup,
    ) -> GroupSource<'p> {
        GroupSource {
            namespace: &policy.namespace,
            selected_key: format!("{}{:?}", policy.namespace, policy.pod_selector),
            comment: group_comment(policy, direction, &group.indices),
            action: Action::Accept,
            pod_network_only: false,
            owners: Owners::Selected {
                namespace: policy.namespace.clone(),
                selector: policy.pod_selector.clone(),
            },
        }
    }
}

pub(crate) fn compile_group(
    ctx: &mut Ctx,
    src: &GroupSource,
    direction: Direction,
    group: &RuleGroup,
    out: &mut Vec<NftRule>,
) {
    let comment = src.comment.clone();
    let action = src.action.clone();
    let ports = &group.rules[0].ports;
    // Any rule of the group without peers allows every peer.
    let peers: Option<Vec<&PeerSpec>> = if group.rules.iter().any(|r| r.peers.is_none()) {
        None
    } else {
        Some(
            group
                .rules
                .iter()
                .flat_map(|r| r.peers.iter().flatten())
                .collect(),
        )
    };

    // Egress rules with only named ports match on the named-port set alone.
    let needs_peer_set = direction == Direction::Ingress
        || ports
            .as_ref()
            .is_none_or(|ports| ports.iter().any(|p| matches!(p, PortSpec::Range { .. })));
    // Sets built without host-network pods are not the same sets.
    let pods_only = if src.pod_network_only {
        "|pod-network"
    } else {
        ""
    };
    // Per family, the peer sets a packet's address is looked up in (a rule for each). Named
    // after what the peers are (selectors, blocks, and the policy's namespace when a peer means
    // "this namespace"), so every policy naming the same peers shares them; `-peerNr` holds
    // only static ipBlock content.
    let this_namespace = |peers: &[&PeerSpec]| {
        peers.iter().any(|p| {
            matches!(
                p,
                PeerSpec::Pods {
                    namespaces: None,
                    ..
                }
            )
        })
    };
    let peer_sets: Option<BTreeMap<Family, Vec<String>>> =
        peers.as_ref().filter(|_| needs_peer_set).map(|peers| {
            let mut key = format!("{peers:?}");
            if this_namespace(peers) {
                key.push_str(src.namespace);
            }
            key.push_str(pods_only);
            let key = format!("a{}", short_hash(&key));
            // Both sets of a family are built together: either one present means both were.
            let built = |sets: &HashMap<String, Set>, f: Family| -> Option<Vec<String>> {
                let names: Vec<String> =
                    [peer_set_name(&key, f, false), peer_set_name(&key, f, true)]
                        .into_iter()
                        .filter(|n| sets.contains_key(n))
                        .collect();
                (!names.is_empty()).then_some(names)
            };
            let cached: Option<BTreeMap<Family, Vec<String>>> = ctx
                .families
                .iter()
                .map(|&f| built(ctx.sets, f).map(|names| (f, names)))
                .collect();
            if let Some(names) = cached {
                return names;
            }
            let pair = |f| vec![peer_set_name(&key, f, false), peer_set_name(&key, f, true)];
            if let Some(names) = ctx.reuse(&key, pair) {
                return names;
            }
            let recipe = Recipe::Peers {
                key,
                peers: peers.iter().map(|&p| p.clone()).collect(),
                namespace: src.namespace.to_string(),
                pod_network_only: src.pod_network_only,
            };
            let names = recipe.build(ctx);
            ctx.recipes.insert(recipe.key().to_string(), recipe);
            names
        });
    // The peer matches of a family, one per peer set (one rule each); `[None]` when every peer
    // is allowed.
    let peer_matches = |family: Family| -> Vec<Option<Match>> {
        let Some(names) = &peer_sets else {
            return vec![None];
        };
        names
            .get(&family)
            .into_iter()
            .flatten()
            .map(|name| {
                Some(match direction {
                    Direction::Ingress => Match::SrcAddr(family, name.clone()),
                    Direction::Egress => Match::DstAddr(family, name.clone()),
                })
            })
            .collect()
    };

    // Every peer match a rule needs, one rule each: per family one per peer set, or a single
    // `None` (no family needed) when every peer is allowed.
    let families = ctx.families;
    let every_peer_match = || -> Vec<Option<Match>> {
        match &peer_sets {
            None => vec![None],
            Some(_) => families.iter().flat_map(|&f| peer_matches(f)).collect(),
        }
    };
    let rule = |peer: Option<Match>, then: Option<Match>| NftRule {
        matches: peer.into_iter().chain(then).collect(),
        action: action.clone(),
        comment: comment.clone(),
    };

    let Some(ports) = ports else {
        // Every port and protocol.
        out.extend(every_peer_match().into_iter().map(|peer| rule(peer, None)));
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
        // Port lists are static policy content: sets are named after it and shared.
        let name = format!("p{}-ports", short_hash(&format!("{numeric:?}")));
        // Single ports only: a hash set of them. With a range (`endPort`): an interval set,
        // whose elements must not overlap, so touching ranges merge.
        let kind = if numeric.values().flatten().any(|(s, e)| s != e) {
            SetKind::ProtoPortInterval
        } else {
            SetKind::ProtoPort
        };
        let mut elements = BTreeSet::new();
        for (proto, mut ranges) in numeric {
            ranges.sort_unstable();
            let mut merged: Vec<(u16, u16)> = Vec::new();
            for (s, e) in ranges {
                match merged.last_mut() {
                    Some(last)
                        if kind == SetKind::ProtoPortInterval && s as u32 <= last.1 as u32 + 1 =>
                    {
                        last.1 = last.1.max(e)
                    }
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
        ctx.sets.insert(name.clone(), Set { kind, elements });
        out.extend(
            every_peer_match()
                .into_iter()
                .map(|peer| rule(peer, Some(Match::ProtoPort(name.clone())))),
        );
    }
    if !named.is_empty() {
        // Ingress: the selected pod's own port of that name; egress: the peer pod's. The set is
        // named after what decides its content, so policies resolving the same names on the
        // same pods share it.
        let owners_key = match direction {
            Direction::Ingress => src.selected_key.clone(),
            Direction::Egress => {
                let mut key = format!("{peers:?}");
                if peers.as_deref().is_none_or(this_namespace) {
                    key.push_str(src.namespace);
                }
                key.push_str(pods_only);
                key
            }
        };
        let key = format!(
            "n{}",
            short_hash(&format!("{direction}{owners_key}{named:?}"))
        );
        let built = ctx
            .families
            .iter()
            .all(|&f| ctx.sets.contains_key(&named_set_name(&key, f)));
        let reused = ctx.reuse(&key, |f| vec![named_set_name(&key, f)]).is_some();
        if !built && !reused {
            let owners = match direction {
                Direction::Ingress => src.owners.clone(),
                Direction::Egress => Owners::Peers {
                    peers: peers
                        .as_ref()
                        .map(|peers| peers.iter().map(|&p| p.clone()).collect()),
                    namespace: src.namespace.to_string(),
                },
            };
            let recipe = Recipe::Named {
                key: key.clone(),
                owners,
                named: named.iter().map(|&(p, n)| (p, n.to_string())).collect(),
                pod_network_only: src.pod_network_only,
            };
            recipe.build(ctx);
            ctx.recipes.insert(key.clone(), recipe);
        }
        for &family in ctx.families {
            let name = named_set_name(&key, family);
            let peers = match direction {
                Direction::Ingress => peer_matches(family),
                // The named-port set already holds only the peer pods' addresses.
                Direction::Egress => vec![None],
            };
            out.extend(
                peers
                    .into_iter()
                    .map(|peer| rule(peer, Some(Match::DstAddrProtoPort(family, name.clone())))),
            );
        }
    }
}
