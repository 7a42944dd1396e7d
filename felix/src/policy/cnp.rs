//! ClusterNetworkPolicy validation: the resource's limits as its CRD states them (network-policy-api
//! v0.3.0, v1alpha2 and v1beta1 alike), into a normalized form the compiler and `explain` share.
//!
//! What the API server would never admit can still arrive (the dir datastore, an older CRD), and
//! is handled the way the specification asks for a peer it cannot understand, fail closed:
//! - a field of the policy as a whole (tier, priority, subject, the number of rules) is invalid:
//!   the policy is ignored, since whom it selects or where it ranks is unknown;
//! - a rule is invalid: an `Accept` rule matches nothing; a `Deny` or `Pass` rule, or one whose
//!   action is unknown, denies everything in its direction;
//! - a peer with no field set (its only field unknown to this version) makes the rule fail
//!   closed the same way; a `domainNames` peer (not supported: Sepal resolves no names) matches
//!   nothing.

use std::fmt;

use ipnetwork::IpNetwork;

use super::cnp_api::{ClusterNetworkPolicy, CnpPeer, CnpPort, CnpProtocol, CnpRule, NamespacedPod};
use super::validate::{selector, Direction, Problem, ProblemScope, Selector};
use super::{AddrRanges, Protocol};

/// Most rules per direction, peers per rule, protocols per rule, CIDRs and names per peer.
pub const MAX_ITEMS: usize = 25;
pub const MAX_PRIORITY: i64 = 1000;
pub const MAX_RULE_NAME: usize = 100;
const MAX_CIDR_LEN: usize = 43;

/// Where a ClusterNetworkPolicy ranks: Admin before NetworkPolicy, Baseline after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Tier {
    Admin,
    Baseline,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Admin => "Admin",
            Tier::Baseline => "Baseline",
        })
    }
}

/// What a matching rule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RuleAction {
    Accept,
    Deny,
    /// Skip the rest of this tier.
    Pass,
}

impl fmt::Display for RuleAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuleAction::Accept => "Accept",
            RuleAction::Deny => "Deny",
            RuleAction::Pass => "Pass",
        })
    }
}

/// A validated peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterPeer {
    /// Pods matching `pods` in namespaces matching `namespaces` (host-network pods never).
    Pods {
        namespaces: Selector,
        pods: Selector,
    },
    /// The addresses of nodes matching the selector.
    Nodes(Selector),
    /// Addresses in these CIDRs.
    Networks(AddrRanges),
    /// Matches nothing (a `domainNames` peer).
    Nothing,
}

/// A validated protocol match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterPort {
    Range {
        protocol: Protocol,
        first: u16,
        last: u16,
    },
    /// The destination pod's container port of that name, whatever its protocol.
    Named(String),
}

/// A validated rule. `peers`/`ports` `None`: every peer, every protocol and port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterRule {
    /// Index in the policy's `ingress`/`egress` list.
    pub index: usize,
    pub name: String,
    pub action: RuleAction,
    pub peers: Option<Vec<ClusterPeer>>,
    pub ports: Option<Vec<ClusterPort>>,
    /// The rule was invalid and stands for "deny everything" (fail closed).
    pub fail_closed: bool,
}

/// A validated ClusterNetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterPolicy {
    pub name: String,
    pub tier: Tier,
    pub priority: u16,
    /// Subject: pods matching `pods` in namespaces matching `namespaces`.
    pub namespaces: Selector,
    pub pods: Selector,
    pub ingress: Vec<ClusterRule>,
    pub egress: Vec<ClusterRule>,
}

impl ClusterPolicy {
    pub fn rules(&self, direction: Direction) -> &[ClusterRule] {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }

    /// `TIER/NAME`, as comments, problems and `explain` name it.
    pub fn id(&self) -> String {
        format!("{}/{}", self.tier, self.name)
    }

    /// Evaluation order within a tier: priority, then name (the specification leaves the
    /// order of equal priorities to implementations).
    pub fn order_key(&self) -> (Tier, u16, &str) {
        (self.tier, self.priority, &self.name)
    }
}

/// The kind `Problem::kind` names for these problems.
pub const CNP_KIND: &str = "ClusterNetworkPolicy";

type FieldError = (String, String);

/// Validates and normalizes a ClusterNetworkPolicy; `None` when the policy as a whole is unusable.
pub fn validate_cluster_policy(
    cnp: &ClusterNetworkPolicy,
) -> (Option<ClusterPolicy>, Vec<Problem>) {
    let name = cnp.name().to_string();
    let mut problems = Vec::new();
    let problem = |field: &str, message: String, scope: ProblemScope| Problem {
        kind: CNP_KIND,
        policy: name.clone(),
        field: field.to_string(),
        message,
        scope,
    };
    let whole = |field: &str, message: String| (field.to_string(), message);
    let checked = (|| -> Result<(Tier, u16, Selector, Selector), FieldError> {
        if name.is_empty() {
            return Err(whole("metadata.name", "name is required".into()));
        }
        let spec = &cnp.spec;
        let tier = match spec.tier.as_str() {
            "Admin" => Tier::Admin,
            "Baseline" => Tier::Baseline,
            other => {
                return Err(whole(
                    "spec.tier",
                    format!(
                        "Unsupported value: {other:?}: supported values: \"Admin\", \"Baseline\""
                    ),
                ))
            }
        };
        if !(0..=MAX_PRIORITY).contains(&spec.priority) {
            return Err(whole(
                "spec.priority",
                format!(
                    "{}: must be between 0 and {MAX_PRIORITY}, inclusive",
                    spec.priority
                ),
            ));
        }
        let (namespaces, pods) = match (&spec.subject.namespaces, &spec.subject.pods) {
            (Some(ns), None) => (
                selector(ns).map_err(|m| whole("spec.subject.namespaces", m))?,
                Selector::default(),
            ),
            (None, Some(p)) => {
                namespaced_pod(p).map_err(|(f, m)| whole(&format!("spec.subject.pods{f}"), m))?
            }
            _ => {
                return Err(whole(
                    "spec.subject",
                    "exactly one of `namespaces` and `pods` must be set".into(),
                ))
            }
        };
        for (list, rules) in [
            ("spec.ingress", &spec.ingress),
            ("spec.egress", &spec.egress),
        ] {
            let n = rules.as_ref().map_or(0, Vec::len);
            if n > MAX_ITEMS {
                return Err(whole(
                    list,
                    format!("Too many: {n}: must have at most {MAX_ITEMS} items"),
                ));
            }
        }
        Ok((tier, spec.priority as u16, namespaces, pods))
    })();
    let (tier, priority, namespaces, pods) = match checked {
        Ok(v) => v,
        Err((field, message)) => {
            problems.push(problem(&field, message, ProblemScope::Policy));
            return (None, problems);
        }
    };
    let mut rules_of = |direction: Direction, raw: &Option<Vec<CnpRule>>| -> Vec<ClusterRule> {
        let list = match direction {
            Direction::Ingress => "spec.ingress",
            Direction::Egress => "spec.egress",
        };
        let mut out = Vec::new();
        for (index, r) in raw.iter().flatten().enumerate() {
            match rule(direction, index, r) {
                Ok(rule) => out.push(rule),
                Err((field, message, action)) => {
                    problems.push(problem(
                        &format!("{list}[{index}]{field}"),
                        message,
                        ProblemScope::Rule(direction, index),
                    ));
                    // Fail closed: an Accept rule matches nothing, anything else denies all.
                    if action != Some(RuleAction::Accept) {
                        out.push(ClusterRule {
                            index,
                            name: r.name.chars().take(MAX_RULE_NAME).collect(),
                            action: RuleAction::Deny,
                            peers: None,
                            ports: None,
                            fail_closed: true,
                        });
                    }
                }
            }
        }
        out
    };
    let ingress = rules_of(Direction::Ingress, &cnp.spec.ingress);
    let egress = rules_of(Direction::Egress, &cnp.spec.egress);
    (
        Some(ClusterPolicy {
            name,
            tier,
            priority,
            namespaces,
            pods,
            ingress,
            egress,
        }),
        problems,
    )
}

fn namespaced_pod(p: &NamespacedPod) -> Result<(Selector, Selector), FieldError> {
    Ok((
        selector(&p.namespace_selector).map_err(|m| (".namespaceSelector".to_string(), m))?,
        selector(&p.pod_selector).map_err(|m| (".podSelector".to_string(), m))?,
    ))
}

/// A rule error: field path below the rule, message, and the rule's action if it was valid.
type RuleError = (String, String, Option<RuleAction>);

fn rule(direction: Direction, index: usize, r: &CnpRule) -> Result<ClusterRule, RuleError> {
    let action = match r.action.as_str() {
        "Accept" => RuleAction::Accept,
        "Deny" => RuleAction::Deny,
        "Pass" => RuleAction::Pass,
        other => {
            return Err((
                ".action".into(),
                format!(
                "Unsupported value: {other:?}: supported values: \"Accept\", \"Deny\", \"Pass\""
            ),
                None,
            ))
        }
    };
    let fail = |field: String, message: String| (field, message, Some(action));
    if r.name.chars().count() > MAX_RULE_NAME {
        return Err(fail(
            ".name".into(),
            format!("Too long: may not be more than {MAX_RULE_NAME} characters"),
        ));
    }
    let (field, raw_peers, other) = match direction {
        Direction::Ingress => ("from", &r.from, ("to", &r.to)),
        Direction::Egress => ("to", &r.to, ("from", &r.from)),
    };
    if other.1.is_some() {
        return Err(fail(
            format!(".{}", other.0),
            format!("field not allowed in an {direction} rule"),
        ));
    }
    let raw_peers = raw_peers.as_deref().unwrap_or_default();
    if raw_peers.is_empty() || raw_peers.len() > MAX_ITEMS {
        return Err(fail(
            format!(".{field}"),
            format!("must have 1 to {MAX_ITEMS} items, has {}", raw_peers.len()),
        ));
    }
    let mut peers = Vec::new();
    for (i, p) in raw_peers.iter().enumerate() {
        let at = |f: &str| format!(".{field}[{i}]{f}");
        peers.push(peer(direction, action, p).map_err(|(f, m)| fail(at(&f), m))?);
    }
    let ports = match &r.protocols {
        None => None,
        Some(list) => {
            if list.is_empty() || list.len() > MAX_ITEMS {
                return Err(fail(
                    ".protocols".into(),
                    format!("must have 1 to {MAX_ITEMS} items, has {}", list.len()),
                ));
            }
            let mut ports = Vec::new();
            for (i, p) in list.iter().enumerate() {
                ports.push(protocol(p).map_err(|(f, m)| fail(format!(".protocols[{i}]{f}"), m))?);
            }
            Some(ports)
        }
    };
    let named = ports
        .iter()
        .flatten()
        .any(|p| matches!(p, ClusterPort::Named(_)));
    if named
        && peers
            .iter()
            .any(|p| matches!(p, ClusterPeer::Nodes(_) | ClusterPeer::Networks(_)))
    {
        return Err(fail(
            String::new(),
            "networks/nodes/domainNames peer cannot be set with namedPorts since there are no namedPorts for networks/nodes/domainNames".into(),
        ));
    }
    Ok(ClusterRule {
        index,
        name: r.name.clone(),
        action,
        peers: Some(peers),
        ports,
        fail_closed: false,
    })
}

fn peer(direction: Direction, action: RuleAction, p: &CnpPeer) -> Result<ClusterPeer, FieldError> {
    let egress_only = p.nodes.is_some() || p.networks.is_some() || p.domain_names.is_some();
    if direction == Direction::Ingress && egress_only {
        return Err((
            String::new(),
            "nodes, networks and domainNames are egress peers only".into(),
        ));
    }
    let set = [
        p.namespaces.is_some(),
        p.pods.is_some(),
        p.nodes.is_some(),
        p.networks.is_some(),
        p.domain_names.is_some(),
    ]
    .into_iter()
    .filter(|s| *s)
    .count();
    match set {
        0 => {
            return Err((
                String::new(),
                "no peer field set (a field this version does not know?): failing closed".into(),
            ))
        }
        1 => {}
        _ => return Err((String::new(), "exactly one peer field must be set".into())),
    }
    if let Some(ns) = &p.namespaces {
        let namespaces = selector(ns).map_err(|m| (".namespaces".to_string(), m))?;
        return Ok(ClusterPeer::Pods {
            namespaces,
            pods: Selector::default(),
        });
    }
    if let Some(pods) = &p.pods {
        let (namespaces, pods) = namespaced_pod(pods).map_err(|(f, m)| (format!(".pods{f}"), m))?;
        return Ok(ClusterPeer::Pods { namespaces, pods });
    }
    if let Some(nodes) = &p.nodes {
        return Ok(ClusterPeer::Nodes(
            selector(nodes).map_err(|m| (".nodes".to_string(), m))?,
        ));
    }
    if let Some(networks) = &p.networks {
        if networks.is_empty() || networks.len() > MAX_ITEMS {
            return Err((
                ".networks".into(),
                format!("must have 1 to {MAX_ITEMS} items, has {}", networks.len()),
            ));
        }
        let mut ranges = AddrRanges::new();
        for (i, cidr) in networks.iter().enumerate() {
            ranges.add_net(&network(cidr).map_err(|m| (format!(".networks[{i}]"), m))?);
        }
        return Ok(ClusterPeer::Networks(ranges));
    }
    let names = p.domain_names.as_deref().unwrap_or_default();
    if action != RuleAction::Accept {
        return Err((
            ".domainNames".into(),
            "domainNames peers are only supported in Accept rules".into(),
        ));
    }
    if names.is_empty() || names.len() > MAX_ITEMS {
        return Err((
            ".domainNames".into(),
            format!("must have 1 to {MAX_ITEMS} items, has {}", names.len()),
        ));
    }
    Ok(ClusterPeer::Nothing)
}

/// A CIDR in canonical form: no host bits (v0.3.0's `cidr(self) == cidr(self).masked()`).
fn network(s: &str) -> Result<IpNetwork, String> {
    let net = (s.len() <= MAX_CIDR_LEN && s.contains('/'))
        .then(|| s.parse::<IpNetwork>().ok())
        .flatten()
        .ok_or_else(|| format!("{s:?}: Invalid CIDR format provided"))?;
    if net.network() != net.ip() {
        return Err(format!(
            "{s:?}: Invalid CIDR format provided (host bits set; {}/{} is the network)",
            net.network(),
            net.prefix()
        ));
    }
    Ok(net)
}

fn protocol(p: &CnpProtocol) -> Result<ClusterPort, FieldError> {
    let set = [
        p.tcp.is_some(),
        p.udp.is_some(),
        p.sctp.is_some(),
        p.destination_named_port.is_some(),
    ]
    .into_iter()
    .filter(|s| *s)
    .count();
    if set != 1 {
        return Err((String::new(), "exactly one field must be set".into()));
    }
    if let Some(name) = &p.destination_named_port {
        super::validate::port_name(name).map_err(|m| {
            (
                ".destinationNamedPort".to_string(),
                format!("{name:?}: {m}"),
            )
        })?;
        return Ok(ClusterPort::Named(name.clone()));
    }
    let (protocol, ports, field) = match (&p.tcp, &p.udp, &p.sctp) {
        (Some(t), _, _) => (Protocol::Tcp, t, ".tcp"),
        (_, Some(u), _) => (Protocol::Udp, u, ".udp"),
        (_, _, Some(s)) => (Protocol::Sctp, s, ".sctp"),
        _ => unreachable!("one field is set"),
    };
    let Some(port) = &ports.destination_port else {
        return Err((
            field.to_string(),
            "must have at least 1 property (destinationPort)".into(),
        ));
    };
    let (first, last) =
        port_range(port).map_err(|(f, m)| (format!("{field}.destinationPort{f}"), m))?;
    Ok(ClusterPort::Range {
        protocol,
        first,
        last,
    })
}

fn port_range(p: &CnpPort) -> Result<(u16, u16), FieldError> {
    let valid = |n: i64, f: &str| {
        u16::try_from(n).ok().filter(|&p| p != 0).ok_or_else(|| {
            (
                f.to_string(),
                format!("{n}: must be between 1 and 65535, inclusive"),
            )
        })
    };
    match (p.number, &p.range) {
        (Some(n), None) => valid(n, ".number").map(|n| (n, n)),
        (None, Some(r)) => {
            let start = valid(r.start, ".range.start")?;
            let end = valid(r.end, ".range.end")?;
            if start >= end {
                return Err((
                    ".range".into(),
                    "Start port must be less than End port".into(),
                ));
            }
            Ok((start, end))
        }
        _ => Err((
            String::new(),
            "exactly one of `number` and `range` must be set".into(),
        )),
    }
}
