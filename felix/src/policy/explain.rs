//! `explain`: the verdict NetworkPolicy gives one packet (from, to, protocol, port) and the policy
//! rule that decided it, evaluated on the same validated model the compiler turns into nftables.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::IpAddr;

use super::cnp::{
    validate_cluster_policy, ClusterPeer, ClusterPolicy, ClusterPort, ClusterRule, RuleAction, Tier,
};
use super::compile::{
    group_comment, ns_labels, peer_matches_pod, rule_groups, selects, validated, NsLabels,
};
use super::tiers::{cluster_rule_comment, cluster_selects, node_ranges};
use super::validate::{Direction, PeerSpec, Policy, PortSpec};
use super::{default_deny_comment, Cluster, Family, Pod, Protocol};
use crate::nft::{packets_for, RuleCounter};

/// One end of the packet: a pod by name, or an address (which may belong to a pod).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peer {
    Pod { namespace: String, name: String },
    Ip(IpAddr),
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Pod { namespace, name } => write!(f, "{namespace}/{name}"),
            Peer::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

impl std::str::FromStr for Peer {
    type Err = String;

    /// `NS/POD` or an IP address, as `sepal policy explain --from/--to` take them.
    fn from_str(s: &str) -> Result<Peer, String> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Peer::Ip(ip));
        }
        match s.split_once('/') {
            Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => {
                Ok(Peer::Pod {
                    namespace: ns.to_string(),
                    name: pod.to_string(),
                })
            }
            _ => Err(format!("{s:?}: expected NAMESPACE/POD or an IP address")),
        }
    }
}

/// Parses `80/TCP` (protocol optional, TCP by default; `tcp`, `udp`, `sctp` in any case).
pub fn parse_port(s: &str) -> Result<(u16, Protocol), String> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| format!("{s:?}: port must be 1-65535"))?;
    let proto = Protocol::from_api(&proto.to_ascii_uppercase())
        .ok_or_else(|| format!("{s:?}: protocol must be TCP, UDP or SCTP"))?;
    Ok((port, proto))
}

/// The outcome for one direction (egress of the source, ingress of the destination).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DirectionVerdict {
    /// The end is not a pod (an outside address): NetworkPolicy does not apply to it.
    NotAPod,
    /// No policy selects the pod for this direction: everything is allowed.
    NotIsolated,
    /// Allowed by this policy rule (`comment` is the nftables rule comment, for the counters).
    Allowed {
        policy: String,
        rule: usize,
        comment: String,
    },
    /// Isolated by these policies and none of their rules allows the packet.
    Denied { isolated_by: Vec<String> },
    /// Decided by a ClusterNetworkPolicy rule (`Accept` or `Deny`) in the Admin tier, or in the
    /// Baseline tier for a pod no NetworkPolicy isolates.
    Cluster(RuleRef),
}

impl DirectionVerdict {
    pub fn allows(&self) -> bool {
        match self {
            DirectionVerdict::Denied { .. } => false,
            DirectionVerdict::Cluster(rule) => rule.action == RuleAction::Accept,
            _ => true,
        }
    }

    /// The tier that decided: `Admin`, `NetworkPolicy`, `Baseline`, or `None` when nothing did
    /// (not a pod, or no policy had a say: allowed by default).
    pub fn tier(&self) -> Option<&'static str> {
        match self {
            DirectionVerdict::Allowed { .. } | DirectionVerdict::Denied { .. } => {
                Some("NetworkPolicy")
            }
            DirectionVerdict::Cluster(rule) => Some(match rule.tier {
                Tier::Admin => "Admin",
                Tier::Baseline => "Baseline",
            }),
            DirectionVerdict::NotAPod | DirectionVerdict::NotIsolated => None,
        }
    }
}

/// A ClusterNetworkPolicy rule that decided or passed a packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleRef {
    pub tier: Tier,
    /// The ClusterNetworkPolicy's name.
    pub policy: String,
    pub direction: Direction,
    /// Index in the policy's `ingress`/`egress` list, and the rule's `name`.
    pub rule: usize,
    pub name: String,
    pub action: RuleAction,
    /// The rule was invalid and denies everything (fail closed).
    pub fail_closed: bool,
    /// The nftables rule comment, for the counters.
    pub comment: String,
}

impl fmt::Display for RuleRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ClusterNetworkPolicy {} rule {}[{}]",
            self.tier, self.policy, self.direction, self.rule
        )?;
        if !self.name.is_empty() {
            write!(f, " {:?}", self.name)?;
        }
        if self.fail_closed {
            f.write_str(" (invalid, failing closed)")?;
        }
        Ok(())
    }
}

/// Verdict for a packet plus what decided each direction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explanation {
    pub allowed: bool,
    /// The source and destination pods (`namespace/name`), when the ends are pods.
    pub source: Option<String>,
    pub destination: Option<String>,
    /// Loopback: a pod talking to itself never leaves its network namespace.
    pub loopback: bool,
    pub egress: DirectionVerdict,
    pub ingress: DirectionVerdict,
    /// `Pass` rules the packet met before the decision, per direction (egress, ingress).
    pub passed: [Vec<RuleRef>; 2],
}

impl fmt::Display for Explanation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "verdict: {}",
            if self.allowed { "ALLOW" } else { "DENY" }
        )?;
        if self.loopback {
            return writeln!(
                f,
                "reason: a pod's traffic to itself never reaches the node"
            );
        }
        for ((what, v), passed) in [("egress", &self.egress), ("ingress", &self.ingress)]
            .into_iter()
            .zip(&self.passed)
        {
            for rule in passed {
                writeln!(f, "{what}: passed to the next tier by {rule}")?;
            }
            match v {
                DirectionVerdict::Cluster(rule) => {
                    let verb = match rule.action {
                        RuleAction::Accept => "accepted",
                        _ => "denied",
                    };
                    writeln!(f, "{what}: {verb} by {rule}")?
                }
                DirectionVerdict::NotAPod => writeln!(f, "{what}: not a pod, no policy applies")?,
                DirectionVerdict::NotIsolated => {
                    writeln!(f, "{what}: no policy selects the pod, allowed")?
                }
                DirectionVerdict::Allowed { comment, .. } => {
                    writeln!(f, "{what}: allowed by {comment}")?
                }
                DirectionVerdict::Denied { isolated_by } => writeln!(
                    f,
                    "{what}: denied: isolated by {} and no rule matches",
                    isolated_by.join(", ")
                )?,
            }
        }
        Ok(())
    }
}

impl Explanation {
    /// The packets nftables counted for each direction's decision: the deciding rule's counter
    /// when allowed (summed over the pods sharing that policy's chain), the isolated pod's
    /// default-deny counter when denied; `None` where no rule decides (not isolated, not a pod).
    pub fn counted(&self, counters: &BTreeMap<(String, String), RuleCounter>) -> [Option<u64>; 2] {
        let count = |v: &DirectionVerdict, pod: &Option<String>, direction: Direction| match v {
            DirectionVerdict::Allowed { comment, .. } => Some(packets_for(counters, comment)),
            DirectionVerdict::Cluster(rule) => Some(packets_for(counters, &rule.comment)),
            DirectionVerdict::Denied { .. } => {
                let (ns, name) = pod.as_deref()?.split_once('/')?;
                Some(packets_for(
                    counters,
                    &default_deny_comment(ns, name, direction),
                ))
            }
            DirectionVerdict::NotAPod | DirectionVerdict::NotIsolated => None,
        };
        [
            count(&self.egress, &self.source, Direction::Egress),
            count(&self.ingress, &self.destination, Direction::Ingress),
        ]
    }

    /// The explanation followed by the kernel's counters for each decision.
    pub fn report(&self, counters: &BTreeMap<(String, String), RuleCounter>) -> String {
        let mut out = self.to_string();
        if self.loopback {
            return out;
        }
        for ((what, v), n) in [("egress", &self.egress), ("ingress", &self.ingress)]
            .into_iter()
            .zip(self.counted(counters))
        {
            let Some(n) = n else { continue };
            let line = match v {
                DirectionVerdict::Allowed { comment, .. } => {
                    format!("counter {what}: rule \"{comment}\" matched {n} packets\n")
                }
                DirectionVerdict::Cluster(rule) => {
                    format!(
                        "counter {what}: rule \"{}\" matched {n} packets\n",
                        rule.comment
                    )
                }
                _ => format!("counter {what}: the pod's default deny dropped {n} packets\n"),
            };
            out.push_str(&line);
        }
        out
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExplainError {
    #[error("pod {0} is not known")]
    UnknownPod(String),
    #[error("pod {0} has no IP address yet")]
    NoAddress(String),
    #[error("{0} and {1} have no address of the same family")]
    FamilyMismatch(String, String),
}

struct End<'a> {
    pod: Option<&'a Pod>,
    ip: IpAddr,
}

/// One direction's question: the far end, the destination pod (named ports), protocol, port.
#[derive(Clone, Copy)]
struct Packet<'e, 'a> {
    direction: Direction,
    other: &'e End<'a>,
    dst: Option<&'a Pod>,
    protocol: Protocol,
    port: u16,
}

/// The validated policies and lookup tables of one cluster model, built once and asked about
/// any number of packets (revocation checks every conntrack entry with one).
pub struct Explainer<'a> {
    cluster: &'a Cluster,
    policies: Vec<Policy>,
    /// Valid ClusterNetworkPolicies in evaluation order (tier, priority, name).
    cluster_policies: Vec<ClusterPolicy>,
    ns_labels: NsLabels,
    pod_by_ip: HashMap<IpAddr, &'a Pod>,
}

impl<'a> Explainer<'a> {
    pub fn new(cluster: &'a Cluster) -> Explainer<'a> {
        let (policies, _) = validated(cluster);
        let mut pod_by_ip = HashMap::new();
        for pod in &cluster.pods {
            for ip in &pod.ips {
                pod_by_ip.entry(*ip).or_insert(&**pod);
            }
        }
        let mut cluster_policies: Vec<ClusterPolicy> = cluster
            .cluster_policies
            .iter()
            .filter_map(|c| validate_cluster_policy(c).0)
            .collect();
        cluster_policies.sort_by(|a, b| a.order_key().cmp(&b.order_key()));
        Explainer {
            cluster,
            policies,
            cluster_policies,
            ns_labels: ns_labels(cluster),
            pod_by_ip,
        }
    }

    /// The pod holding `ip`, if any.
    pub fn pod_of(&self, ip: &IpAddr) -> Option<&'a Pod> {
        self.pod_by_ip.get(ip).copied()
    }

    fn resolve(&self, peer: &Peer, family: Option<Family>) -> Result<End<'a>, ExplainError> {
        match peer {
            Peer::Ip(ip) => Ok(End {
                pod: self.pod_of(ip),
                ip: *ip,
            }),
            Peer::Pod { namespace, name } => {
                let pod = self
                    .cluster
                    .pod(namespace, name)
                    .ok_or_else(|| ExplainError::UnknownPod(peer.to_string()))?;
                let ip = pod
                    .ips
                    .iter()
                    .find(|ip| family.is_none_or(|f| Family::of(ip) == f))
                    .ok_or_else(|| match family {
                        None => ExplainError::NoAddress(peer.to_string()),
                        Some(_) => ExplainError::FamilyMismatch(peer.to_string(), String::new()),
                    })?;
                Ok(End {
                    pod: Some(pod),
                    ip: *ip,
                })
            }
        }
    }

    /// Explains the verdict for a new connection from `from` to `to` on `port`/`protocol`.
    pub fn explain(
        &self,
        from: &Peer,
        to: &Peer,
        protocol: Protocol,
        port: u16,
    ) -> Result<Explanation, ExplainError> {
        // Pick addresses of one family: the destination's family decides when it is an IP.
        let (src, dst) = match (from, to) {
            (_, Peer::Ip(ip)) => {
                let dst = self.resolve(to, None)?;
                let src = self
                    .resolve(from, Some(Family::of(ip)))
                    .map_err(|e| match e {
                        ExplainError::FamilyMismatch(a, _) => {
                            ExplainError::FamilyMismatch(a, to.to_string())
                        }
                        e => e,
                    })?;
                (src, dst)
            }
            _ => {
                let src = self.resolve(from, None)?;
                let dst = self
                    .resolve(to, Some(Family::of(&src.ip)))
                    .map_err(|e| match e {
                        ExplainError::FamilyMismatch(a, _) => {
                            ExplainError::FamilyMismatch(from.to_string(), a)
                        }
                        e => e,
                    })?;
                (src, dst)
            }
        };
        if let (Some(a), Some(b)) = (src.pod, dst.pod) {
            if std::ptr::eq(a, b) {
                return Ok(Explanation {
                    allowed: true,
                    source: Some(format!("{}/{}", a.namespace, a.name)),
                    destination: Some(format!("{}/{}", b.namespace, b.name)),
                    loopback: true,
                    egress: DirectionVerdict::NotIsolated,
                    ingress: DirectionVerdict::NotIsolated,
                    passed: Default::default(),
                });
            }
        }
        let (egress, egress_passed) = self.check(Direction::Egress, &src, &dst, protocol, port);
        let (ingress, ingress_passed) = self.check(Direction::Ingress, &dst, &src, protocol, port);
        let id = |end: &End| end.pod.map(|p| format!("{}/{}", p.namespace, p.name));
        Ok(Explanation {
            allowed: egress.allows() && ingress.allows(),
            source: id(&src),
            destination: id(&dst),
            loopback: false,
            egress,
            ingress,
            passed: [egress_passed, ingress_passed],
        })
    }

    /// One direction: `subject` is the pod whose policies apply (the source for egress, the
    /// destination for ingress), `other` the far end. Tiers in order: Admin, NetworkPolicy,
    /// Baseline; also the `Pass` rules met on the way.
    fn check(
        &self,
        direction: Direction,
        subject: &End,
        other: &End,
        protocol: Protocol,
        port: u16,
    ) -> (DirectionVerdict, Vec<RuleRef>) {
        let Some(pod) = subject.pod else {
            return (DirectionVerdict::NotAPod, Vec::new());
        };
        // Named ports resolve on the destination pod in both directions.
        let dst = match direction {
            Direction::Ingress => subject.pod,
            Direction::Egress => other.pod,
        };
        let packet = Packet {
            direction,
            other,
            dst,
            protocol,
            port,
        };
        let mut passed = Vec::new();
        if let Some(v) = self.tier(Tier::Admin, pod, &packet, &mut passed) {
            return (v, passed);
        }
        let v = self.network_policy_tier(pod, &packet);
        if v != DirectionVerdict::NotIsolated {
            return (v, passed);
        }
        let v = self.tier(Tier::Baseline, pod, &packet, &mut passed);
        (v.unwrap_or(DirectionVerdict::NotIsolated), passed)
    }

    /// The first rule of the tier's policies selecting `pod` that matches decides (`Some`), or
    /// passes the packet on (recorded in `passed`); `None` when the tier has no say.
    fn tier(
        &self,
        tier: Tier,
        pod: &Pod,
        packet: &Packet,
        passed: &mut Vec<RuleRef>,
    ) -> Option<DirectionVerdict> {
        let direction = packet.direction;
        for policy in self
            .cluster_policies
            .iter()
            .filter(|p| p.tier == tier && cluster_selects(&self.ns_labels, p, pod))
        {
            for rule in policy.rules(direction) {
                if !self.cluster_rule_matches(rule, packet) {
                    continue;
                }
                let found = RuleRef {
                    tier,
                    policy: policy.name.clone(),
                    direction,
                    rule: rule.index,
                    name: rule.name.clone(),
                    action: rule.action,
                    fail_closed: rule.fail_closed,
                    comment: cluster_rule_comment(policy, direction, rule),
                };
                if rule.action == RuleAction::Pass {
                    passed.push(found);
                    return None;
                }
                return Some(DirectionVerdict::Cluster(found));
            }
        }
        None
    }

    fn cluster_rule_matches(&self, rule: &ClusterRule, packet: &Packet) -> bool {
        let other = packet.other;
        let peer_ok = match &rule.peers {
            None => true,
            Some(peers) => peers.iter().any(|peer| match peer {
                ClusterPeer::Pods { namespaces, pods } => other.pod.is_some_and(|p| {
                    !p.host_network
                        && pods.matches(&p.labels)
                        && self
                            .ns_labels
                            .get(&*p.namespace)
                            .is_some_and(|l| namespaces.matches(l))
                }),
                ClusterPeer::Networks(ranges) => ranges.contains(other.ip),
                ClusterPeer::Nodes(sel) => node_ranges(self.cluster, sel).contains(other.ip),
                ClusterPeer::Nothing => false,
            }),
        };
        let port_ok = match &rule.ports {
            None => true,
            Some(ports) => ports.iter().any(|p| match p {
                ClusterPort::Range {
                    protocol,
                    first,
                    last,
                } => *protocol == packet.protocol && (*first..=*last).contains(&packet.port),
                ClusterPort::Named(name) => packet
                    .dst
                    .is_some_and(|pod| pod.named_port(name, packet.protocol) == Some(packet.port)),
            }),
        };
        peer_ok && port_ok
    }

    /// The NetworkPolicy tier: allowed by a rule, denied by isolation, or not isolated.
    fn network_policy_tier(&self, pod: &Pod, packet: &Packet) -> DirectionVerdict {
        let Packet {
            direction,
            other,
            dst,
            protocol,
            port,
        } = *packet;
        let mut isolated_by = Vec::new();
        for policy in self.policies.iter().filter(|p| selects(p, pod)) {
            let Some(rules) = policy.rules(direction) else {
                continue;
            };
            isolated_by.push(policy.id());
            for rule in rules {
                let peer_ok = match &rule.peers {
                    None => true,
                    Some(peers) => peers
                        .iter()
                        .any(|peer| peer_allows(&self.ns_labels, policy, peer, other)),
                };
                let port_ok = match &rule.ports {
                    None => true,
                    Some(ports) => ports.iter().any(|p| port_allows(p, protocol, port, dst)),
                };
                if peer_ok && port_ok {
                    return DirectionVerdict::Allowed {
                        policy: policy.id(),
                        rule: rule.index,
                        comment: rule_groups(rules)
                            .iter()
                            .find(|g| g.indices.contains(&rule.index))
                            .map(|g| group_comment(policy, direction, &g.indices))
                            .unwrap_or_default(),
                    };
                }
            }
        }
        if isolated_by.is_empty() {
            DirectionVerdict::NotIsolated
        } else {
            DirectionVerdict::Denied { isolated_by }
        }
    }
}

/// Explains the verdict for a new connection from `from` to `to` on `port`/`protocol`.
pub fn explain(
    cluster: &Cluster,
    from: &Peer,
    to: &Peer,
    protocol: Protocol,
    port: u16,
) -> Result<Explanation, ExplainError> {
    Explainer::new(cluster).explain(from, to, protocol, port)
}

fn peer_allows(ns_labels: &NsLabels, policy: &Policy, peer: &PeerSpec, other: &End) -> bool {
    match peer {
        PeerSpec::IpBlock { ranges } => ranges.contains(other.ip),
        PeerSpec::Pods { .. } => other
            .pod
            .is_some_and(|pod| peer_matches_pod(ns_labels, &policy.namespace, peer, pod)),
    }
}

fn port_allows(spec: &PortSpec, protocol: Protocol, port: u16, dst: Option<&Pod>) -> bool {
    match spec {
        PortSpec::Range {
            protocol: p,
            first,
            last,
        } => *p == protocol && (*first..=*last).contains(&port),
        PortSpec::Named { protocol: p, name } => {
            *p == protocol && dst.and_then(|pod| pod.named_port(name, protocol)) == Some(port)
        }
    }
}
