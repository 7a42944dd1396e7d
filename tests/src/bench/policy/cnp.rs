//! The ClusterNetworkPolicies of `sepal-bench policy`: a mix of both tiers for the 1000-pod
//! control-plane cluster, and the Admin tier in front of the datapath server.
//!
//! The control-plane mix is what a security team's 500 policies over a 1000-pod cluster look
//! like: a few cluster-wide guardrails, per-namespace guardrails (by namespace name or label),
//! per-workload rules (pod-selector subjects), delegation to NetworkPolicy with `Pass`,
//! `networks` and `nodes` peers, port ranges and named ports. Subjects are as specific as real
//! ones are, so a pod is selected by about 15 Admin and 7 Baseline policies, not by hundreds.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use sepal_felix::policy::{
    validate_cluster_policy, Cluster, ClusterNetworkPolicy, ClusterPeer, Node, Pod, Ruleset,
};
use serde_json::{json, Value};

/// `kubernetes.io/metadata.name: NAME` as a namespace selector.
fn ns_name(name: &str) -> Value {
    json!({"matchLabels": {"kubernetes.io/metadata.name": name}})
}

fn labels(pairs: &[(&str, &str)]) -> Value {
    let m: serde_json::Map<String, Value> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), Value::from(*v)))
        .collect();
    json!({ "matchLabels": m })
}

fn pods(namespaces: Value, pods: Value) -> Value {
    json!({"pods": {"namespaceSelector": namespaces, "podSelector": pods}})
}

fn tcp(port: u16) -> Value {
    json!({"tcp": {"destinationPort": {"number": port}}})
}

fn tcp_range(start: u16, end: u16) -> Value {
    json!({"tcp": {"destinationPort": {"range": {"start": start, "end": end}}}})
}

fn udp(port: u16) -> Value {
    json!({"udp": {"destinationPort": {"number": port}}})
}

fn udp_range(start: u16, end: u16) -> Value {
    json!({"udp": {"destinationPort": {"range": {"start": start, "end": end}}}})
}

fn named(port: &str) -> Value {
    json!({ "destinationNamedPort": port })
}

fn rule(
    name: &str,
    action: &str,
    peers_key: &str,
    peers: Value,
    protocols: Option<Value>,
) -> Value {
    let mut r = json!({"name": name, "action": action, peers_key: peers});
    if let Some(p) = protocols {
        r["protocols"] = p;
    }
    r
}

fn from(name: &str, action: &str, peers: Value, protocols: Option<Value>) -> Value {
    rule(name, action, "from", peers, protocols)
}

fn to(name: &str, action: &str, peers: Value, protocols: Option<Value>) -> Value {
    rule(name, action, "to", peers, protocols)
}

fn cnp(
    name: String,
    tier: &str,
    priority: usize,
    subject: Value,
    ingress: Vec<Value>,
    egress: Vec<Value>,
) -> Result<Arc<ClusterNetworkPolicy>> {
    let mut spec = json!({"tier": tier, "priority": priority, "subject": subject});
    if !ingress.is_empty() {
        spec["ingress"] = Value::Array(ingress);
    }
    if !egress.is_empty() {
        spec["egress"] = Value::Array(egress);
    }
    let v = json!({
        "apiVersion": "policy.networking.k8s.io/v1alpha2",
        "kind": "ClusterNetworkPolicy",
        "metadata": {"name": name},
        "spec": spec,
    });
    serde_json::from_value(v)
        .map(Arc::new)
        .context("bench cluster policy")
}

/// DNS: the `app0` pods of `ns0` (the bench's infrastructure namespace).
fn dns() -> Value {
    pods(ns_name("ns0"), labels(&[("app", "app0")]))
}

/// Cluster policy `k` of the control-plane mix (`tweak` changes one of its ports: the
/// incremental bench's cluster policy edit). Ten kinds by `k % 10`; the six Admin kinds make
/// 60 % of them. `app`, the namespace and the priority derive from `k / 10`, so each kind has
/// one policy per app (50 apps) or five per namespace.
pub(super) fn big_cluster_policy(k: usize, tweak: usize) -> Result<Arc<ClusterNetworkPolicy>> {
    let j = k / 10;
    let a = j % 50;
    let app = format!("app{a}");
    let n = j % 10;
    let ns = format!("ns{n}");
    let tier = format!("t{}", j % 3);
    let role = format!("r{}", j % 4);
    let name = format!("cnp{k}");
    let all = json!({});
    match k % 10 {
        // Admin namespace guardrail: its own namespace is delegated to NetworkPolicy, dev
        // namespaces may not reach a port range, no pod reaches the metadata address.
        0 => cnp(
            name,
            "Admin",
            100 + j,
            json!({ "namespaces": ns_name(&ns) }),
            vec![
                from(
                    "same-namespace",
                    "Pass",
                    json!([{ "namespaces": ns_name(&ns) }]),
                    None,
                ),
                from(
                    "no-dev",
                    "Deny",
                    json!([{"namespaces": labels(&[("env", "dev")])}]),
                    Some(json!([tcp_range(
                        2000 + k as u16 + tweak as u16,
                        2099 + k as u16 + tweak as u16
                    )])),
                ),
            ],
            vec![to(
                "no-metadata",
                "Deny",
                json!([{"networks": ["169.254.169.254/32", format!("10.{}.0.0/16", 100 + j % 100)]}]),
                None,
            )],
        ),
        // Admin workload rule: monitoring reaches the named metrics port, its tier is
        // delegated, everyone else is kept off the app's HTTP port.
        1 => cnp(
            name,
            "Admin",
            500 + j,
            pods(all.clone(), labels(&[("app", &app)])),
            vec![
                from(
                    "monitoring",
                    "Accept",
                    json!([pods(ns_name("ns0"), labels(&[("role", "r0")]))]),
                    Some(json!([named("metrics")])),
                ),
                from(
                    "pass-tier",
                    "Pass",
                    json!([{"namespaces": labels(&[("tier", &tier)])}]),
                    None,
                ),
                from(
                    "http-from-elsewhere",
                    "Deny",
                    json!([{ "namespaces": all }]),
                    Some(json!([tcp(8080 + tweak as u16), named("http")])),
                ),
            ],
            vec![],
        ),
        // Admin workload egress: the API server on control-plane nodes, peers of one role
        // delegated, NodePort ranges of some networks denied.
        2 => cnp(
            name,
            "Admin",
            520 + j,
            pods(
                json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": [format!("t{}", (a % 10) % 3), format!("t{}", (a % 10 + 1) % 3)]}]}),
                labels(&[("app", &app)]),
            ),
            vec![],
            vec![
                to(
                    "apiserver",
                    "Accept",
                    json!([{"nodes": {"matchExpressions": [{"key": "node-role.kubernetes.io/control-plane", "operator": "Exists"}]}}]),
                    Some(json!([tcp(6443)])),
                ),
                to(
                    "same-role",
                    "Pass",
                    json!([pods(all.clone(), labels(&[("role", &role)]))]),
                    None,
                ),
                to(
                    "no-nodeports",
                    "Deny",
                    json!([{"networks": [format!("10.{}.0.0/16", j % 200), format!("192.168.{}.0/24", j % 250)]}]),
                    Some(json!([udp_range(30000, 32767), tcp_range(30000, 32767)])),
                ),
            ],
        ),
        // Admin per namespace and role: dev apps off the privileged ports, node exporters in.
        3 => cnp(
            name,
            "Admin",
            300 + j,
            pods(
                ns_name(&ns),
                labels(&[("role", &format!("r{}", (j / 10) % 4))]),
            ),
            vec![
                from(
                    "dev-privileged",
                    "Deny",
                    json!([pods(
                        labels(&[("env", "dev")]),
                        json!({"matchExpressions": [{"key": "app", "operator": "In", "values": [app, format!("app{}", (a + 1) % 50)]}]})
                    )]),
                    Some(json!([tcp_range(1, 1023), udp_range(1, 1023)])),
                ),
                from(
                    "node-exporter",
                    "Accept",
                    json!([{ "namespaces": ns_name("ns0") }]),
                    Some(json!([tcp(9100)])),
                ),
            ],
            vec![],
        ),
        // Admin, production workloads: production talks to production (delegated), never to
        // SMTP or IRC anywhere, and nothing from dev reaches it.
        4 => cnp(
            name,
            "Admin",
            540 + j,
            pods(labels(&[("env", "prod")]), labels(&[("app", &app)])),
            vec![from(
                "no-dev",
                "Deny",
                json!([{"namespaces": labels(&[("env", "dev")])}]),
                None,
            )],
            vec![
                to(
                    "prod",
                    "Pass",
                    json!([{"namespaces": labels(&[("env", "prod")])}]),
                    None,
                ),
                to(
                    "no-smtp-irc",
                    "Deny",
                    json!([{"networks": ["0.0.0.0/0"]}]),
                    Some(json!([tcp(25), tcp_range(6660, 6669)])),
                ),
            ],
        ),
        // Baseline per namespace: its own namespace on a port, deny from the rest.
        5 => cnp(
            name,
            "Baseline",
            100 + j,
            json!({ "namespaces": ns_name(&ns) }),
            vec![
                from(
                    "same-namespace",
                    "Accept",
                    json!([{ "namespaces": ns_name(&ns) }]),
                    Some(json!([tcp(8000 + j as u16)])),
                ),
                from("default-deny", "Deny", json!([{ "namespaces": all }]), None),
            ],
            vec![],
        ),
        // Baseline workload egress: DNS, the next app's named HTTP port, nothing else private.
        6 => cnp(
            name,
            "Baseline",
            500 + j,
            pods(all.clone(), labels(&[("app", &app)])),
            vec![],
            vec![
                to(
                    "dns",
                    "Accept",
                    json!([dns()]),
                    Some(json!([udp(53), tcp(53)])),
                ),
                to(
                    "upstream",
                    "Accept",
                    json!([pods(
                        all.clone(),
                        labels(&[("app", &format!("app{}", (a + 3) % 50))])
                    )]),
                    Some(json!([named("http")])),
                ),
                to(
                    "no-private",
                    "Deny",
                    json!([{"networks": ["10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]}]),
                    None,
                ),
            ],
        ),
        // Baseline per workload and role: the pod network's service ports, no node.
        7 => cnp(
            name,
            "Baseline",
            520 + j,
            pods(
                all.clone(),
                labels(&[("app", &app), ("role", &format!("r{}", (j / 3) % 4))]),
            ),
            vec![],
            vec![
                to(
                    "pod-network",
                    "Accept",
                    json!([{"networks": ["10.244.0.0/16"]}]),
                    Some(json!([tcp_range(8000, 8999)])),
                ),
                to("no-nodes", "Deny", json!([{ "nodes": all }]), None),
            ],
        ),
        // Baseline workload ingress: the caller app on one port, dev kept out.
        8 => cnp(
            name,
            "Baseline",
            540 + j,
            pods(labels(&[("tier", &tier)]), labels(&[("app", &app)])),
            vec![
                from(
                    "caller",
                    "Accept",
                    json!([pods(
                        all.clone(),
                        labels(&[("app", &format!("app{}", (a + 1) % 50))])
                    )]),
                    Some(json!([tcp(8080 + (k % 10) as u16)])),
                ),
                from(
                    "no-dev",
                    "Deny",
                    json!([{"namespaces": labels(&[("env", "dev")])}]),
                    None,
                ),
            ],
            vec![],
        ),
        // Admin: the first five cluster-wide (quarantine, metadata), the rest per workload
        // (its callers delegated, the rest of the tier off its metrics).
        _ if j < 5 => cnp(
            name,
            "Admin",
            j,
            json!({ "namespaces": all }),
            vec![from(
                "quarantine",
                "Deny",
                json!([{"namespaces": labels(&[("quarantine", "true")])}]),
                None,
            )],
            vec![to(
                "metadata",
                "Deny",
                json!([{"networks": [format!("169.254.{j}.0/24")]}]),
                None,
            )],
        ),
        _ => cnp(
            name,
            "Admin",
            560 + j,
            pods(ns_name(&format!("ns{}", a % 10)), labels(&[("app", &app)])),
            vec![
                from(
                    "callers",
                    "Pass",
                    json!([pods(
                        all.clone(),
                        labels(&[("app", &format!("app{}", (a + 1) % 50))])
                    )]),
                    Some(json!([tcp(8080), tcp_range(9000, 9100)])),
                ),
                from(
                    "metrics",
                    "Deny",
                    json!([{"namespaces": labels(&[("tier", &tier)])}]),
                    Some(json!([named("metrics")])),
                ),
            ],
            vec![],
        ),
    }
}

/// Labels the namespaces of the big cluster the policies select on (`env`, `team`; NetworkPolicy
/// looks only at `tier`), adds ten nodes (three control-plane) and `n` cluster policies.
pub(super) fn add_to(c: &mut Cluster, n: usize) -> Result<()> {
    for (i, ns) in c.namespaces.values_mut().enumerate() {
        let env = if i % 2 == 0 { "prod" } else { "dev" };
        ns.labels.insert("env".into(), env.into());
        ns.labels.insert("team".into(), format!("team{}", i % 4));
    }
    for i in 0..10u8 {
        let mut labels = BTreeMap::from([("kubernetes.io/hostname".into(), format!("node{i}"))]);
        if i < 3 {
            labels.insert(
                "node-role.kubernetes.io/control-plane".into(),
                String::new(),
            );
        }
        c.nodes.push(Arc::new(Node {
            name: format!("node{i}"),
            labels,
            ips: vec![IpAddr::V4(Ipv4Addr::new(10, 255, 0, i + 1))],
        }));
    }
    for k in 0..n {
        c.cluster_policies.push(big_cluster_policy(k, 0)?);
    }
    Ok(())
}

/// The Admin tier in front of the datapath server (`bench/server`, the client is
/// `bench/client`), in priority order: a cluster-wide quarantine, the server's privileged
/// ports, some remote peers denied, the client delegated to NetworkPolicy with `Pass`, and
/// everything else from a pod denied. The measured connections cross the first three policies'
/// rules, meet the Pass rule, leave the shared tier chain on the mark and reach the
/// NetworkPolicy (if `Pass` failed, `lockdown` would drop them and the bench would fail).
pub(super) fn datapath_policies(
    port: u16,
    iperf_port: u16,
) -> Result<Vec<Arc<ClusterNetworkPolicy>>> {
    let server = || pods(ns_name("bench"), labels(&[("app", "server")]));
    Ok(vec![
        cnp(
            "bench-quarantine".into(),
            "Admin",
            0,
            json!({"namespaces": {}}),
            vec![from(
                "quarantined",
                "Deny",
                json!([{"namespaces": labels(&[("quarantine", "true")])}]),
                None,
            )],
            vec![],
        )?,
        cnp(
            "bench-privileged-ports".into(),
            "Admin",
            10,
            server(),
            vec![
                from(
                    "privileged",
                    "Deny",
                    json!([{"namespaces": {}}]),
                    Some(json!([tcp_range(1, 1023), udp_range(1, 1023)])),
                ),
                from(
                    "monitoring",
                    "Accept",
                    json!([pods(ns_name("remote"), labels(&[("app", "peer0")]))]),
                    Some(json!([named("metrics")])),
                ),
            ],
            vec![],
        )?,
        cnp(
            "bench-remote-deny".into(),
            "Admin",
            20,
            server(),
            vec![from(
                "some-remote",
                "Deny",
                json!([pods(
                    ns_name("remote"),
                    json!({"matchExpressions": [{"key": "app", "operator": "In", "values": ["peer1", "peer2", "peer3"]}]})
                )]),
                None,
            )],
            vec![],
        )?,
        cnp(
            "bench-delegate".into(),
            "Admin",
            50,
            server(),
            vec![from(
                "client",
                "Pass",
                json!([pods(ns_name("bench"), labels(&[("app", "client")]))]),
                Some(json!([tcp(port), tcp(iperf_port)])),
            )],
            vec![],
        )?,
        cnp(
            "bench-lockdown".into(),
            "Admin",
            100,
            server(),
            vec![from("rest", "Deny", json!([{"namespaces": {}}]), None)],
            vec![],
        )?,
    ])
}

/// Fails when felix reported a problem with the bench's own policies: the bench would measure
/// something else than it claims.
pub(super) fn check_no_problems(rs: &Ruleset) -> Result<()> {
    if let Some(p) = rs.problems.first() {
        bail!(
            "{} problems in the bench's policies, first: {p:?}",
            rs.problems.len()
        );
    }
    Ok(())
}

/// Shape of the compiled tiers: (Admin, Baseline) policy chains, shared tier chains and the
/// rules in those.
pub(super) fn tier_shape(rs: &Ruleset) -> String {
    let count = |prefixes: &[&str]| -> (usize, usize) {
        let chains: Vec<_> = rs
            .chains
            .iter()
            .filter(|(name, _)| prefixes.iter().any(|p| name.starts_with(p)))
            .collect();
        (
            chains.len(),
            chains.iter().map(|(_, c)| c.rules.len()).sum(),
        )
    };
    let (admin, admin_rules) = count(&["ai-", "ae-"]);
    let (baseline, baseline_rules) = count(&["bi-", "be-"]);
    let (tier, tier_rules) = count(&["tai-", "tae-", "tbi-", "tbe-"]);
    format!(
        "{admin} Admin chains ({admin_rules} rules), {baseline} Baseline chains ({baseline_rules} rules), {tier} shared tier chains ({tier_rules} rules)"
    )
}

/// How many cluster policies a change of `pod` reaches the way felix's compiler decides what to
/// rebuild (the policy selects it, or one of its peers names it): all of them, and those only
/// because a `networks` CIDR holds the pod's address (peers whose compiled sets do not depend on
/// any pod).
pub(super) fn reached_by(cluster: &Cluster, pod: &Pod) -> (usize, usize) {
    let ns_labels = cluster.namespace_labels(&pod.namespace);
    let (mut all, mut networks_only) = (0, 0);
    for cnp in &cluster.cluster_policies {
        let (Some(p), _) = validate_cluster_policy(cnp) else {
            continue;
        };
        let selects = p.namespaces.matches(&ns_labels) && p.pods.matches(&pod.labels);
        let (mut by_pods, mut by_networks) = (false, false);
        for peer in p
            .ingress
            .iter()
            .chain(&p.egress)
            .flat_map(|r| r.peers.iter().flatten())
        {
            match peer {
                ClusterPeer::Pods { namespaces, pods } => {
                    by_pods |= namespaces.matches(&ns_labels) && pods.matches(&pod.labels)
                }
                ClusterPeer::Networks(ranges) => {
                    by_networks |= pod.ips.iter().any(|ip| ranges.contains(*ip))
                }
                ClusterPeer::Nodes(_) | ClusterPeer::Nothing => {}
            }
        }
        if selects || by_pods || by_networks {
            all += 1;
            if !selects && !by_pods {
                networks_only += 1;
            }
        }
    }
    (all, networks_only)
}
