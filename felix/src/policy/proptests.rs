//! Property: a long-lived `Compiler` fed any sequence of cluster changes compiles exactly what a
//! fresh one compiles from the final state, and its `Touched` names every difference (a diff
//! over the touched names equals a diff over everything).

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;
use crate::nft;

/// Policies with the shapes the compiler treats differently: selectors of both kinds, named
/// ports on either side, ipBlocks with except, port ranges, egress-only, IPv6, invalid content.
const TEMPLATES: &[&str] = &[
    "spec: {podSelector: {}}",
    "spec:\n  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: b}}}]\n    ports: [{port: 80}]",
    "spec:\n  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {matchLabels: {team: blue}}, podSelector: {matchLabels: {app: b}}}]\n    ports: [{port: http}]",
    "spec:\n  podSelector: {matchLabels: {role: web}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{podSelector: {matchLabels: {role: db}}}]\n    ports: [{port: http}, {port: 53, protocol: UDP}]",
    "spec:\n  podSelector: {matchLabels: {app: c}}\n  policyTypes: [Egress]\n  egress:\n  - ports: [{port: http}]",
    "spec:\n  podSelector: {matchExpressions: [{key: app, operator: In, values: [a, b]}]}\n  ingress:\n  - from: [{ipBlock: {cidr: 10.0.0.0/28, except: [10.0.0.8/30]}}, {podSelector: {matchLabels: {role: db}}}]",
    "spec:\n  podSelector: {matchExpressions: [{key: role, operator: Exists}]}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/29}}]\n    ports: [{port: http}, {port: 1000, endPort: 2000}]",
    "spec:\n  podSelector: {matchLabels: {app: b}}\n  ingress:\n  - from: [{namespaceSelector: {}}]\n    ports: [{port: 1000, endPort: 2000, protocol: UDP}]\n  - from: [{podSelector: {}}]\n    ports: [{port: 1000, endPort: 2000, protocol: UDP}]",
    "spec:\n  podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [a]}]}\n  ingress:\n  - from: [{ipBlock: {cidr: 'fd00::/120'}}]\n  - ports: [{port: http}]",
    "spec:\n  podSelector: {matchLabels: {app: a}}\n  ingress:\n  - ports: [{port: 99999}]\n  - from: [{podSelector: {matchLabels: {role: web}}}]",
    "spec:\n  podSelector: {}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - {}\n  egress:\n  - to: [{namespaceSelector: {matchExpressions: [{key: team, operator: DoesNotExist}]}}]",
];

/// ClusterNetworkPolicy specs: both tiers, all three actions, every peer kind, named ports,
/// ranges, equal priorities, and content that fails closed.
const CLUSTER_TEMPLATES: &[&str] = &[
    "spec:\n  tier: Admin\n  priority: 10\n  subject: {namespaces: {matchLabels: {team: blue}}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {matchLabels: {team: red}}}]}",
    "spec:\n  tier: Admin\n  priority: 5\n  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: a}}}}\n  ingress:\n  - {action: Pass, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: b}}}}], protocols: [{tcp: {destinationPort: {number: 80}}}]}\n  - {action: Deny, from: [{namespaces: {}}]}",
    "spec:\n  tier: Baseline\n  priority: 5\n  subject: {namespaces: {}}\n  ingress:\n  - {action: Accept, from: [{namespaces: {matchLabels: {team: blue}}}]}\n  - {action: Deny, from: [{namespaces: {}}]}",
    "spec:\n  tier: Admin\n  priority: 10\n  subject: {namespaces: {}}\n  egress:\n  - {action: Accept, to: [{networks: [10.0.0.0/28, 'fd00::/120']}]}\n  - {action: Deny, to: [{nodes: {matchLabels: {zone: a}}}]}\n  - {action: Pass, to: [{pods: {namespaceSelector: {matchLabels: {team: red}}, podSelector: {matchLabels: {role: db}}}}], protocols: [{destinationNamedPort: http}, {udp: {destinationPort: {range: {start: 1000, end: 2000}}}}]}",
    "spec:\n  tier: Baseline\n  priority: 1\n  subject: {pods: {namespaceSelector: {matchLabels: {team: red}}, podSelector: {}}}\n  ingress:\n  - {action: Pass, from: [{namespaces: {}}], protocols: [{destinationNamedPort: http}]}\n  egress:\n  - {action: Deny, to: [{nodes: {}}]}",
    "spec:\n  tier: Admin\n  priority: 10\n  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {role: web}}}}\n  ingress:\n  - {action: Accept, from: [{}]}\n  - {action: Deny, from: [{}]}\n  egress:\n  - {action: Accept, to: [{domainNames: [example.com]}]}",
    "spec:\n  tier: Admin\n  priority: 1001\n  subject: {namespaces: {}}\n  ingress:\n  - {action: Deny, from: [{namespaces: {}}]}",
];

const NAMESPACES: [&str; 3] = ["x", "y", "z"];

/// One change to the cluster, with raw numbers picking what it changes.
#[derive(Debug, Clone)]
enum Change {
    UpsertPod {
        ns: u8,
        name: u8,
        labels: u8,
        ip: u8,
        local: u8,
        port: u8,
    },
    DeletePod {
        ns: u8,
        name: u8,
    },
    UpsertPolicy {
        ns: u8,
        name: u8,
        template: u8,
    },
    DeletePolicy {
        ns: u8,
        name: u8,
    },
    NamespaceLabel {
        ns: u8,
        team: u8,
    },
    UpsertClusterPolicy {
        name: u8,
        template: u8,
    },
    DeleteClusterPolicy {
        name: u8,
    },
    UpsertNode {
        name: u8,
        zone: u8,
        ip: u8,
    },
}

fn change() -> impl Strategy<Value = Change> {
    prop_oneof![
        4 => (0u8..3, 0u8..5, any::<u8>(), 0u8..24, 0u8..4, 0u8..3).prop_map(
            |(ns, name, labels, ip, local, port)| Change::UpsertPod { ns, name, labels, ip, local, port }
        ),
        1 => (0u8..3, 0u8..5).prop_map(|(ns, name)| Change::DeletePod { ns, name }),
        3 => (0u8..3, 0u8..3, 0u8..TEMPLATES.len() as u8).prop_map(
            |(ns, name, template)| Change::UpsertPolicy { ns, name, template }
        ),
        1 => (0u8..3, 0u8..3).prop_map(|(ns, name)| Change::DeletePolicy { ns, name }),
        1 => (0u8..3, 0u8..3).prop_map(|(ns, team)| Change::NamespaceLabel { ns, team }),
        3 => (0u8..4, 0u8..CLUSTER_TEMPLATES.len() as u8).prop_map(
            |(name, template)| Change::UpsertClusterPolicy { name, template }
        ),
        1 => (0u8..4).prop_map(|name| Change::DeleteClusterPolicy { name }),
        1 => (0u8..3, 0u8..2, 0u8..20).prop_map(|(name, zone, ip)| Change::UpsertNode { name, zone, ip }),
    ]
}

fn apply(c: &mut Cluster, change: &Change) {
    match *change {
        Change::UpsertPod {
            ns,
            name,
            labels,
            ip,
            local,
            port,
        } => {
            let ns = NAMESPACES[ns as usize].to_string();
            let name = format!("p{name}");
            let mut l = BTreeMap::new();
            l.insert(
                "app".to_string(),
                ["a", "b", "c", "d"][labels as usize % 4].to_string(),
            );
            if labels & 4 != 0 {
                l.insert(
                    "role".to_string(),
                    ["web", "db"][(labels >> 3) as usize % 2].to_string(),
                );
            }
            // A few addresses, some shared, some IPv6, some none (no status yet).
            let ips = match ip {
                0 => vec![],
                1..=15 => vec![format!("10.0.0.{ip}").parse().unwrap()],
                16..=19 => vec![format!("fd00::{ip}").parse().unwrap()],
                _ => vec![
                    format!("10.0.1.{ip}").parse().unwrap(),
                    format!("fd00::1:{ip}").parse().unwrap(),
                ],
            };
            let ports = match port {
                0 => vec![],
                p => vec![NamedPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 8000 + p as u16,
                }],
            };
            let pod = std::sync::Arc::new(Pod {
                // 3: a host-network pod (no veth of its own).
                host_iface: (1..=2).contains(&local).then(|| format!("sep{ns}{name}")),
                namespace: ns.into(),
                name: name.into(),
                labels: l.into(),
                ips,
                ports: ports.into(),
                host_network: local == 3,
            });
            match c
                .pods
                .iter_mut()
                .find(|p| p.namespace == pod.namespace && p.name == pod.name)
            {
                Some(p) => *p = pod,
                None => c.pods.push(pod),
            }
        }
        Change::DeletePod { ns, name } => {
            let name = format!("p{name}");
            c.pods
                .retain(|p| !(&*p.namespace == NAMESPACES[ns as usize] && *p.name == *name));
        }
        Change::UpsertPolicy { ns, name, template } => {
            let (ns, name) = (NAMESPACES[ns as usize], format!("np{name}"));
            let yaml = format!(
                "metadata: {{name: {name}, namespace: {ns}}}\n{}\n",
                TEMPLATES[template as usize]
            );
            let np: std::sync::Arc<NetworkPolicy> =
                std::sync::Arc::new(serde_norway::from_str(&yaml).unwrap());
            match c.policies.iter_mut().find(|p| {
                p.metadata.namespace.as_deref() == Some(ns)
                    && p.metadata.name.as_deref() == Some(&name)
            }) {
                Some(p) => *p = np,
                None => c.policies.push(np),
            }
        }
        Change::DeletePolicy { ns, name } => {
            let name = format!("np{name}");
            c.policies.retain(|p| {
                !(p.metadata.namespace.as_deref() == Some(NAMESPACES[ns as usize])
                    && p.metadata.name.as_deref() == Some(&name))
            });
        }
        Change::UpsertClusterPolicy { name, template } => {
            let name = format!("cnp{name}");
            let yaml = format!(
                "metadata: {{name: {name}}}\n{}\n",
                CLUSTER_TEMPLATES[template as usize]
            );
            let cnp: std::sync::Arc<ClusterNetworkPolicy> =
                std::sync::Arc::new(serde_norway::from_str(&yaml).unwrap());
            match c.cluster_policies.iter_mut().find(|p| p.name() == name) {
                Some(p) => *p = cnp,
                None => c.cluster_policies.push(cnp),
            }
        }
        Change::DeleteClusterPolicy { name } => {
            let name = format!("cnp{name}");
            c.cluster_policies.retain(|p| p.name() != name);
        }
        Change::UpsertNode { name, zone, ip } => {
            let node = std::sync::Arc::new(Node {
                name: format!("n{name}"),
                labels: BTreeMap::from([(
                    "zone".to_string(),
                    ["a", "b"][zone as usize].to_string(),
                )]),
                ips: match ip {
                    0..=14 => vec![format!("10.0.0.{ip}").parse().unwrap()],
                    _ => vec![format!("fd00::{ip}").parse().unwrap()],
                },
            });
            match c.nodes.iter_mut().find(|n| n.name == node.name) {
                Some(n) => *n = node,
                None => c.nodes.push(node),
            }
        }
        Change::NamespaceLabel { ns, team } => {
            let ns = NAMESPACES[ns as usize].to_string();
            let entry = c.namespaces.entry(ns.clone()).or_insert(Namespace {
                name: ns,
                labels: BTreeMap::new(),
            });
            match team {
                0 => entry.labels.remove("team"),
                t => entry
                    .labels
                    .insert("team".into(), ["red", "blue"][t as usize - 1].into()),
            };
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn incremental_compile_equals_a_fresh_compile(changes in prop::collection::vec(change(), 1..40)) {
        let mut cluster = Cluster::default();
        let mut compiler = Compiler::default();
        let mut before = compiler.compile(&cluster);
        let opts = nft::Options::default();
        for (step, ch) in changes.iter().enumerate() {
            apply(&mut cluster, ch);
            let (rs, touched) = compiler.update(&cluster);
            let fresh = compile(&cluster);
            prop_assert_eq!(rs, &fresh, "step {}: {:?}", step, ch);
            if !touched.full {
                let scope = nft::Scope::touched(touched);
                prop_assert_eq!(
                    nft::render_diff_in(&before, rs, &scope, &opts),
                    nft::render_diff(&before, rs, &opts),
                    "step {}: {:?}", step, ch
                );
                prop_assert_eq!(
                    nft::narrows_in(&before, rs, &scope),
                    nft::narrows(&before, rs)
                );
            }
            before = fresh;
        }
    }
}
