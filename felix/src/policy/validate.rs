//! Validation of a NetworkPolicy as the API server does it, into a normalized form the compiler
//! and `explain` share; what the API server would reject is reported and left out.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use ipnetwork::IpNetwork;
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{AddrRanges, Protocol};

/// Traffic direction as seen from the selected pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Direction {
    Ingress,
    Egress,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        })
    }
}

/// A validated label selector: all requirements must hold (matchLabels are `In` one value).
/// The empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Selector {
    reqs: Vec<Requirement>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    In(String, BTreeSet<String>),
    NotIn(String, BTreeSet<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.reqs.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.reqs.is_empty()
    }
}

/// A validated peer (`from`/`to` entry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerSpec {
    /// Pods matching `pods` in namespaces matching `namespaces` (`None`: the policy's own).
    Pods {
        namespaces: Option<Selector>,
        pods: Selector,
    },
    /// `cidr` minus `except`, as address ranges.
    IpBlock { ranges: AddrRanges },
}

/// A validated port entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// A numeric port or `port`..=`endPort`; a protocol without a port is 0..=65535 of that
    /// protocol (every port).
    Range {
        protocol: Protocol,
        first: u16,
        last: u16,
    },
    /// A named port, resolved against the destination pod's container ports.
    Named { protocol: Protocol, name: String },
}

/// One validated ingress or egress rule; `None` means "any" (field absent or empty).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyRule {
    /// Index in the policy's `ingress`/`egress` list.
    pub index: usize,
    pub peers: Option<Vec<PeerSpec>>,
    pub ports: Option<Vec<PortSpec>>,
}

/// A validated policy. `ingress`/`egress` is `Some` when the policy isolates the selected pods
/// in that direction (per `policyTypes` and its defaulting), with the rules that allow traffic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub namespace: String,
    pub name: String,
    pub pod_selector: Selector,
    pub ingress: Option<Vec<PolicyRule>>,
    pub egress: Option<Vec<PolicyRule>>,
}

impl Policy {
    pub fn rules(&self, direction: Direction) -> Option<&Vec<PolicyRule>> {
        match direction {
            Direction::Ingress => self.ingress.as_ref(),
            Direction::Egress => self.egress.as_ref(),
        }
    }

    /// `namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What part of a policy a problem made Sepal ignore.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemScope {
    /// The whole policy (its `podSelector` or `policyTypes` is invalid: nothing of it applies).
    Policy,
    /// One rule; the rest of the policy applies.
    Rule(Direction, usize),
}

/// Invalid policy content, reported as the API server would have (field path and reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `NetworkPolicy` or `ClusterNetworkPolicy`.
    pub kind: &'static str,
    /// `namespace/name` of a NetworkPolicy, the name of a ClusterNetworkPolicy.
    pub policy: String,
    /// Field path, e.g. `spec.ingress[0].ports[1].endPort`.
    pub field: String,
    pub message: String,
    pub scope: ProblemScope,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ignored = match &self.scope {
            ProblemScope::Policy => "policy ignored".to_string(),
            // Cluster policies fail closed: an Accept rule matches nothing, others deny all.
            ProblemScope::Rule(d, i) if self.kind == super::cnp::CNP_KIND => {
                format!("rule {d}[{i}] fails closed")
            }
            ProblemScope::Rule(d, i) => format!("rule {d}[{i}] ignored"),
        };
        write!(
            f,
            "{} {}: {}: {} ({ignored})",
            self.kind, self.policy, self.field, self.message
        )
    }
}

/// Validates and normalizes a policy. Returns `None` when the policy as a whole is unusable.
pub fn validate(np: &NetworkPolicy) -> (Option<Policy>, Vec<Problem>) {
    let namespace = np.metadata.namespace.clone().unwrap_or_default();
    let name = np.metadata.name.clone().unwrap_or_default();
    let id = format!("{namespace}/{name}");
    let mut problems = Vec::new();
    let policy_problem = |field: &str, message: String| Problem {
        kind: "NetworkPolicy",
        policy: id.clone(),
        field: field.to_string(),
        message,
        scope: ProblemScope::Policy,
    };
    if namespace.is_empty() || name.is_empty() {
        problems.push(policy_problem(
            "metadata",
            "namespace and name are required".into(),
        ));
        return (None, problems);
    }
    let default_spec = Default::default();
    let spec = np.spec.as_ref().unwrap_or(&default_spec);
    let pod_selector = match spec.pod_selector.as_ref().map(selector) {
        None => Selector::default(),
        Some(Ok(s)) => s,
        Some(Err(msg)) => {
            problems.push(policy_problem("spec.podSelector", msg));
            return (None, problems);
        }
    };

    // policyTypes: defaulted like the API server does when absent or empty.
    let types = spec.policy_types.clone().unwrap_or_default();
    let (isolate_in, isolate_eg) = if types.is_empty() {
        (true, spec.egress.as_ref().is_some_and(|e| !e.is_empty()))
    } else {
        if types.len() > 2 {
            problems.push(policy_problem(
                "spec.policyTypes",
                "may not specify more than two policyTypes".into(),
            ));
            return (None, problems);
        }
        for t in &types {
            if t != "Ingress" && t != "Egress" {
                problems.push(policy_problem(
                    "spec.policyTypes",
                    format!("Unsupported value: {t:?}: supported values: \"Ingress\", \"Egress\""),
                ));
                return (None, problems);
            }
        }
        (
            types.iter().any(|t| t == "Ingress"),
            types.iter().any(|t| t == "Egress"),
        )
    };

    let mut rules_of = |direction: Direction, raw: Vec<RawRule<'_>>| -> Vec<PolicyRule> {
        let (list, peer_field) = match direction {
            Direction::Ingress => ("spec.ingress", "from"),
            Direction::Egress => ("spec.egress", "to"),
        };
        let mut out = Vec::new();
        for (index, (peers, ports)) in raw.into_iter().enumerate() {
            match rule(index, peers, ports) {
                Ok(r) => out.push(r),
                Err((field, message)) => problems.push(Problem {
                    kind: "NetworkPolicy",
                    policy: id.clone(),
                    field: format!("{list}[{index}].{}", field.replace("PEER", peer_field)),
                    message,
                    scope: ProblemScope::Rule(direction, index),
                }),
            }
        }
        out
    };
    let ingress = isolate_in.then(|| {
        let raw = spec
            .ingress
            .iter()
            .flatten()
            .map(|r| (r.from.as_ref(), r.ports.as_ref()))
            .collect();
        rules_of(Direction::Ingress, raw)
    });
    let egress = isolate_eg.then(|| {
        let raw = spec
            .egress
            .iter()
            .flatten()
            .map(|r| (r.to.as_ref(), r.ports.as_ref()))
            .collect();
        rules_of(Direction::Egress, raw)
    });
    (
        Some(Policy {
            namespace,
            name,
            pod_selector,
            ingress,
            egress,
        }),
        problems,
    )
}

type FieldError = (String, String);

/// A rule's peers (`from`/`to`) and ports as the API object holds them.
type RawRule<'a> = (
    Option<&'a Vec<NetworkPolicyPeer>>,
    Option<&'a Vec<NetworkPolicyPort>>,
);

fn rule(
    index: usize,
    peers: Option<&Vec<NetworkPolicyPeer>>,
    ports: Option<&Vec<NetworkPolicyPort>>,
) -> Result<PolicyRule, FieldError> {
    let peers = match peers {
        Some(list) if !list.is_empty() => Some(
            list.iter()
                .enumerate()
                .map(|(i, p)| peer(p).map_err(|(f, m)| (format!("PEER[{i}]{f}"), m)))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        _ => None,
    };
    let ports = match ports {
        Some(list) if !list.is_empty() => Some(
            list.iter()
                .enumerate()
                .map(|(i, p)| port(p).map_err(|(f, m)| (format!("ports[{i}]{f}"), m)))
                .collect::<Result<Vec<_>, _>>()?,
        ),
        _ => None,
    };
    Ok(PolicyRule {
        index,
        peers,
        ports,
    })
}

fn peer(p: &NetworkPolicyPeer) -> Result<PeerSpec, FieldError> {
    match (&p.pod_selector, &p.namespace_selector, &p.ip_block) {
        (None, None, None) => Err((String::new(), "must specify a peer".into())),
        (Some(_), _, Some(_)) | (_, Some(_), Some(_)) => Err((
            String::new(),
            "may not specify more than 1 peer type (ipBlock with podSelector or namespaceSelector)"
                .into(),
        )),
        (pods, namespaces, None) => {
            let pods = match pods {
                Some(s) => selector(s).map_err(|m| (".podSelector".to_string(), m))?,
                None => Selector::default(),
            };
            let namespaces = match namespaces {
                Some(s) => Some(selector(s).map_err(|m| (".namespaceSelector".to_string(), m))?),
                None => None,
            };
            Ok(PeerSpec::Pods { namespaces, pods })
        }
        (None, None, Some(block)) => {
            // A bare address is not a CIDR for the API server.
            let parsed = match block.cidr.contains('/') {
                true => block.cidr.parse::<IpNetwork>().ok(),
                false => None,
            };
            let cidr: IpNetwork = parsed.ok_or_else(|| {
                (
                    ".ipBlock.cidr".to_string(),
                    format!("{:?}: must be a valid CIDR", block.cidr),
                )
            })?;
            let mut ranges = AddrRanges::new();
            ranges.add_net(&cidr);
            for (i, e) in block.except.iter().flatten().enumerate() {
                let field = format!(".ipBlock.except[{i}]");
                let ex: IpNetwork = e
                    .parse()
                    .map_err(|_| (field.clone(), format!("{e:?}: must be a valid CIDR")))?;
                let same_family = ex.is_ipv4() == cidr.is_ipv4();
                if !same_family || !cidr.contains(ex.network()) || ex.prefix() <= cidr.prefix() {
                    return Err((field, format!("{e:?}: must be a strict subset of `cidr`")));
                }
                ranges.subtract_net(&ex);
            }
            Ok(PeerSpec::IpBlock { ranges })
        }
    }
}

fn port(p: &NetworkPolicyPort) -> Result<PortSpec, FieldError> {
    let protocol = match p.protocol.as_deref() {
        None => Protocol::Tcp,
        Some(s) => Protocol::from_api(s).ok_or_else(|| {
            (
                ".protocol".to_string(),
                format!("Unsupported value: {s:?}: supported values: \"SCTP\", \"TCP\", \"UDP\""),
            )
        })?,
    };
    match (&p.port, p.end_port) {
        (None, None) => Ok(PortSpec::Range {
            protocol,
            first: 0,
            last: u16::MAX,
        }),
        (None, Some(_)) => Err((
            ".endPort".into(),
            "may not be specified when `port` is not specified".into(),
        )),
        (Some(IntOrString::String(name)), end) => {
            if end.is_some() {
                return Err((
                    ".endPort".into(),
                    "may not be specified when `port` is non-numeric".into(),
                ));
            }
            if let Err(m) = port_name(name) {
                return Err((".port".into(), format!("{name:?}: {m}")));
            }
            Ok(PortSpec::Named {
                protocol,
                name: name.clone(),
            })
        }
        (Some(IntOrString::Int(n)), end) => {
            let first = valid_port(*n).ok_or_else(|| {
                (
                    ".port".to_string(),
                    format!("{n}: must be between 1 and 65535, inclusive"),
                )
            })?;
            let last = match end {
                None => first,
                Some(e) => {
                    let last = valid_port(e).ok_or_else(|| {
                        (
                            ".endPort".to_string(),
                            format!("{e}: must be between 1 and 65535, inclusive"),
                        )
                    })?;
                    if last < first {
                        return Err((
                            ".endPort".into(),
                            format!("{e}: must be greater than or equal to `port`"),
                        ));
                    }
                    last
                }
            };
            Ok(PortSpec::Range {
                protocol,
                first,
                last,
            })
        }
    }
}

fn valid_port(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|&p| p != 0)
}

/// IANA_SVC_NAME as the API server checks it: 1-15 chars of [a-z0-9-], at least one letter,
/// no leading, trailing or double hyphen.
pub(crate) fn port_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 15 {
        return Err("must be no more than 15 characters");
    }
    if !s
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)");
    }
    if !s.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err("must contain at least one letter (a-z)");
    }
    if s.starts_with('-') || s.ends_with('-') || s.contains("--") {
        return Err("must not begin or end with a hyphen, nor contain adjacent hyphens");
    }
    Ok(())
}

pub(crate) fn selector(s: &LabelSelector) -> Result<Selector, String> {
    let mut reqs = Vec::new();
    for (k, v) in s.match_labels.iter().flatten() {
        label_key(k).map_err(|m| format!("matchLabels: key {k:?}: {m}"))?;
        label_value(v).map_err(|m| format!("matchLabels: value {v:?}: {m}"))?;
        reqs.push(Requirement::In(k.clone(), BTreeSet::from([v.clone()])));
    }
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let at = format!("matchExpressions[{i}]");
        label_key(&e.key).map_err(|m| format!("{at}.key {:?}: {m}", e.key))?;
        let values: BTreeSet<String> = e.values.iter().flatten().cloned().collect();
        for v in &values {
            label_value(v).map_err(|m| format!("{at}.values: {v:?}: {m}"))?;
        }
        let req = match e.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => {
                return Err(format!(
                    "{at}.values: must be specified when `operator` is 'In' or 'NotIn'"
                ))
            }
            "Exists" | "DoesNotExist" if !values.is_empty() => {
                return Err(format!(
                "{at}.values: may not be specified when `operator` is 'Exists' or 'DoesNotExist'"
            ))
            }
            "In" => Requirement::In(e.key.clone(), values),
            "NotIn" => Requirement::NotIn(e.key.clone(), values),
            "Exists" => Requirement::Exists(e.key.clone()),
            "DoesNotExist" => Requirement::DoesNotExist(e.key.clone()),
            other => {
                return Err(format!(
                    "{at}.operator: {other:?} is not a valid label selector operator"
                ))
            }
        };
        reqs.push(req);
    }
    Ok(Selector { reqs })
}

/// A qualified name: 1-63 chars, alphanumeric at both ends, `-`, `_`, `.` inside.
fn qualified_name_part(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 63 {
        return Err("name part must be 1-63 characters");
    }
    let b = s.as_bytes();
    let ok_inner = b
        .iter()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    if !ok_inner || !b[0].is_ascii_alphanumeric() || !b[b.len() - 1].is_ascii_alphanumeric() {
        return Err("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character");
    }
    Ok(())
}

fn label_key(k: &str) -> Result<(), &'static str> {
    let name = match k.split_once('/') {
        Some((prefix, name)) => {
            let dns_ok = !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(|l| {
                    !l.is_empty()
                        && l.len() <= 63
                        && l.bytes()
                            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
                        && !l.starts_with('-')
                        && !l.ends_with('-')
                });
            if !dns_ok {
                return Err("prefix part must be a lowercase RFC 1123 subdomain");
            }
            name
        }
        None => k,
    };
    qualified_name_part(name)
}

fn label_value(v: &str) -> Result<(), &'static str> {
    if v.is_empty() {
        return Ok(());
    }
    qualified_name_part(v).map_err(|_| {
        "a valid label must be an empty string or consist of at most 63 alphanumeric characters, '-', '_' or '.', starting and ending with an alphanumeric character"
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn np(yaml: &str) -> NetworkPolicy {
        serde_norway::from_str(yaml).unwrap()
    }

    #[test]
    fn policy_types_default_from_egress_rules() {
        let (p, probs) = validate(&np(
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  egress: [{}]\n",
        ));
        let p = p.unwrap();
        assert!(probs.is_empty());
        assert_eq!(p.ingress, Some(vec![]));
        assert_eq!(p.egress.unwrap().len(), 1);
        let (p, _) = validate(&np(
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  egress: []\n",
        ));
        assert_eq!(p.unwrap().egress, None);
        let (p, _) = validate(&np(
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Egress]\n  ingress: [{}]\n",
        ));
        let p = p.unwrap();
        assert_eq!(p.ingress, None);
        assert_eq!(p.egress, Some(vec![]));
    }

    #[test]
    fn invalid_rule_is_reported_and_only_it_is_dropped() {
        let (p, probs) = validate(&np(r#"
metadata: {name: p, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - ports: [{port: 90, endPort: 80}]
  - from: [{ipBlock: {cidr: 10.0.0.0/24, except: [10.0.1.0/28]}}]
  - from: [{podSelector: {matchExpressions: [{key: pod, operator: In}]}}]
  - from: [{ipBlock: {cidr: 10.0.0.0/24}, podSelector: {}}]
  - ports: [{port: "Not_A_Name"}]
  - ports: [{protocol: ICMP}]
  - ports: [{port: serve-80-tcp, protocol: UDP}, {port: 80, endPort: 90}, {protocol: SCTP}]
"#));
        let p = p.unwrap();
        let ingress = p.ingress.unwrap();
        assert_eq!(ingress.len(), 1);
        assert_eq!(ingress[0].index, 6);
        assert_eq!(
            ingress[0].ports.as_ref().unwrap()[1],
            PortSpec::Range {
                protocol: Protocol::Tcp,
                first: 80,
                last: 90
            }
        );
        let fields: Vec<_> = probs.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "spec.ingress[0].ports[0].endPort",
                "spec.ingress[1].from[0].ipBlock.except[0]",
                "spec.ingress[2].from[0].podSelector",
                "spec.ingress[3].from[0]",
                "spec.ingress[4].ports[0].port",
                "spec.ingress[5].ports[0].protocol",
            ]
        );
        assert!(probs
            .iter()
            .all(|p| matches!(p.scope, ProblemScope::Rule(Direction::Ingress, _))));
    }

    #[test]
    fn invalid_pod_selector_ignores_the_policy() {
        let (p, probs) = validate(&np(
            "metadata: {name: p, namespace: x}\nspec:\n  podSelector: {matchLabels: {'bad key!': a}}\n",
        ));
        assert!(p.is_none());
        assert_eq!(probs[0].scope, ProblemScope::Policy);
    }

    #[test]
    fn selector_operators() {
        let s = selector(&serde_norway::from_str(
            "matchLabels: {a: '1'}\nmatchExpressions:\n- {key: b, operator: NotIn, values: ['2']}\n- {key: c, operator: Exists}\n- {key: d, operator: DoesNotExist}\n",
        ).unwrap())
        .unwrap();
        let l = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(s.matches(&l(&[("a", "1"), ("c", "")])));
        assert!(s.matches(&l(&[("a", "1"), ("b", "3"), ("c", "x")])));
        assert!(!s.matches(&l(&[("a", "1"), ("b", "2"), ("c", "x")])));
        assert!(!s.matches(&l(&[("a", "1")])));
        assert!(!s.matches(&l(&[("a", "1"), ("c", "x"), ("d", "")])));
        assert!(Selector::default().matches(&l(&[])));
    }
}
