//! Compiler and explain tests on a small x/y/z × a/b/c cluster, like the upstream e2e model.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;
use crate::nft;

pub(crate) fn cluster(policies: &[&str]) -> Cluster {
    let mut c = Cluster::default();
    for (ni, ns) in ["x", "y", "z"].iter().enumerate() {
        c.namespaces.insert(
            ns.to_string(),
            Namespace {
                name: ns.to_string(),
                labels: BTreeMap::from([("ns".to_string(), ns.to_string())]),
            },
        );
        for (pi, pod) in ["a", "b", "c"].iter().enumerate() {
            let mut ports = Vec::new();
            for port in [80u16, 81] {
                for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
                    ports.push(NamedPort {
                        name: format!("serve-{port}-{}", proto.nft()).into(),
                        protocol: proto,
                        port,
                    });
                }
            }
            c.pods.push(std::sync::Arc::new(Pod {
                namespace: (*ns).into(),
                name: (*pod).into(),
                labels: BTreeMap::from([("pod".to_string(), pod.to_string())]).into(),
                ips: vec![format!("10.244.0.{}", 10 + ni * 3 + pi).parse().unwrap()],
                host_iface: Some(format!("sep{ns}{pod}")),
                ports: ports.into(),
                host_network: false,
            }));
        }
    }
    for p in policies {
        c.policies
            .push(std::sync::Arc::new(serde_norway::from_str(p).unwrap()));
    }
    c
}

fn pod(s: &str) -> ExplainPeer {
    let (namespace, name) = s.split_once('/').unwrap();
    ExplainPeer::Pod {
        namespace: namespace.into(),
        name: name.into(),
    }
}

fn allowed(c: &Cluster, from: &str, to: &str, proto: Protocol, port: u16) -> bool {
    explain(c, &pod(from), &pod(to), proto, port)
        .unwrap()
        .allowed
}

const DENY_X: &str = "metadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n";
const ALLOW_B_TO_A: &str = r#"
metadata: {name: allow-b, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{port: serve-81-tcp}, {port: 1000, endPort: 2000, protocol: UDP}]
"#;

#[test]
fn compile_is_deterministic_and_isolates_only_selected_pods() {
    let c = cluster(&[DENY_X, ALLOW_B_TO_A]);
    let a = compile(&c);
    let mut c2 = c.clone();
    c2.pods.reverse();
    c2.policies.reverse();
    assert_eq!(a, compile(&c2));
    assert_eq!(
        a.ingress_dispatch.keys().collect::<Vec<_>>(),
        vec!["sepxa", "sepxb", "sepxc"]
    );
    assert!(a.egress_dispatch.is_empty());
    assert_eq!(a.endpoints.len(), 9);
    let chain = &a.chains["in-sepxa"];
    assert_eq!(chain.rules.last().unwrap().action, Action::Drop);
    // named port resolved on x/a itself; UDP range in the proto-port set
    let named: Vec<&Set> = a
        .sets
        .iter()
        .filter(|(n, _)| n.ends_with("-named4"))
        .map(|(_, s)| s)
        .collect();
    assert_eq!(
        named[0].elements.iter().collect::<Vec<_>>(),
        vec!["10.244.0.10 . tcp . 81"]
    );
    let ports: Vec<&Set> = a
        .sets
        .iter()
        .filter(|(n, _)| n.ends_with("-ports"))
        .map(|(_, s)| s)
        .collect();
    assert_eq!(
        ports[0].elements.iter().collect::<Vec<_>>(),
        vec!["udp . 1000-2000"]
    );
    let full = nft::render_full(&a, &nft::Options::default());
    assert!(full.starts_with("table inet sepal {}\ndelete table inet sepal\n"));
}

#[test]
fn explain_names_the_deciding_rule() {
    let c = cluster(&[DENY_X, ALLOW_B_TO_A]);
    assert!(allowed(&c, "x/b", "x/a", Protocol::Tcp, 81));
    assert!(!allowed(&c, "x/b", "x/a", Protocol::Tcp, 80));
    assert!(!allowed(&c, "x/c", "x/a", Protocol::Tcp, 81));
    assert!(allowed(&c, "x/b", "x/a", Protocol::Udp, 1500));
    assert!(allowed(&c, "x/a", "y/a", Protocol::Tcp, 80));
    assert!(allowed(&c, "x/a", "x/a", Protocol::Tcp, 80));
    let e = explain(&c, &pod("x/b"), &pod("x/a"), Protocol::Tcp, 81).unwrap();
    assert_eq!(
        e.ingress,
        DirectionVerdict::Allowed {
            policy: "x/allow-b".into(),
            rule: 0,
            comment: "x/allow-b ingress[0]".into()
        }
    );
    let e = explain(&c, &pod("y/a"), &pod("x/b"), Protocol::Tcp, 80).unwrap();
    assert_eq!(
        e.ingress,
        DirectionVerdict::Denied {
            isolated_by: vec!["x/deny".into()]
        }
    );
    let outside: IpAddr = "192.0.2.1".parse().unwrap();
    let e = explain(
        &c,
        &ExplainPeer::Ip(outside),
        &pod("y/a"),
        Protocol::Tcp,
        80,
    )
    .unwrap();
    assert!(e.allowed);
    assert_eq!(e.egress, DirectionVerdict::NotAPod);
    assert!(matches!(
        explain(&c, &pod("q/a"), &pod("y/a"), Protocol::Tcp, 80),
        Err(ExplainError::UnknownPod(_))
    ));
}

#[test]
fn egress_named_port_resolves_on_the_peer_and_diff_is_small() {
    let egress = r#"
metadata: {name: eg, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  egress:
  - to: [{namespaceSelector: {matchExpressions: [{key: ns, operator: NotIn, values: [x]}]}}]
    ports: [{port: serve-80-udp, protocol: UDP}]
"#;
    let c = cluster(&[egress]);
    assert!(allowed(&c, "x/a", "y/b", Protocol::Udp, 80));
    assert!(!allowed(&c, "x/a", "x/b", Protocol::Udp, 80));
    assert!(!allowed(&c, "x/a", "y/b", Protocol::Udp, 81));
    let a = compile(&c);
    let named = a
        .sets
        .iter()
        .find(|(n, _)| n.ends_with("-named4"))
        .map(|(_, s)| s)
        .unwrap();
    assert_eq!(named.elements.len(), 6);
    // A new pod in y only adds one element.
    let mut c2 = c.clone();
    let mut newpod = (*c.pods[4]).clone();
    newpod.name = "d".into();
    newpod.ips = vec!["10.244.0.99".parse().unwrap()];
    newpod.host_iface = None;
    c2.pods.push(newpod.into());
    let diff = nft::render_diff(&a, &compile(&c2), &nft::Options::default());
    assert_eq!(diff.lines().count(), 1, "{diff}");
    assert!(diff.contains("10.244.0.99 . udp . 80"));
}

#[test]
fn dump_for_manual_check() {
    if let Ok(path) = std::env::var("SEPAL_DUMP_NFT") {
        let egress = "metadata: {name: eg, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.244.0.11/32]}}, {podSelector: {}}]\n    ports: [{port: serve-80-udp, protocol: UDP}, {port: 80}]\n";
        let a = compile(&cluster(&[DENY_X, ALLOW_B_TO_A, egress]));
        let b = compile(&cluster(&[ALLOW_B_TO_A]));
        let o = nft::Options {
            nflog_group: Some(5),
            ..nft::Options::default()
        };
        std::fs::write(format!("{path}.full"), nft::render_full(&a, &o)).unwrap();
        std::fs::write(format!("{path}.diff"), nft::render_diff(&a, &b, &o)).unwrap();
        std::fs::write(format!("{path}.diff2"), nft::render_diff(&b, &a, &o)).unwrap();
    }
}

/// The comments of the rules in the (one) policy ingress chain, in order.
fn ingress_rule_comments(rs: &Ruleset) -> Vec<&str> {
    let (_, chain) = rs
        .chains
        .iter()
        .find(|(n, _)| n.starts_with("pi-"))
        .expect("a policy ingress chain");
    chain.rules.iter().map(|r| r.comment.as_str()).collect()
}

#[test]
fn rules_with_equal_ports_share_one_nft_rule_and_explain_names_the_group() {
    let p = r#"
metadata: {name: many, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{port: 80}]
  - from: [{namespaceSelector: {matchLabels: {ns: y}}}]
    ports: [{port: 80}]
  - from: [{namespaceSelector: {matchLabels: {ns: z}}}]
    ports: [{port: 81}]
"#;
    let c = cluster(&[p]);
    let rs = compile(&c);
    let comments = ingress_rule_comments(&rs);
    assert_eq!(comments, vec!["x/many ingress[0,1]", "x/many ingress[2]"]);
    let e = explain(&c, &pod("y/c"), &pod("x/a"), Protocol::Tcp, 80).unwrap();
    assert_eq!(
        e.ingress,
        DirectionVerdict::Allowed {
            policy: "x/many".into(),
            rule: 1,
            comment: "x/many ingress[0,1]".into()
        }
    );
    assert!(!allowed(&c, "y/c", "x/a", Protocol::Tcp, 81));
    assert!(allowed(&c, "z/c", "x/a", Protocol::Tcp, 81));
    // Only IPv4 is in use: no IPv6 sets or rules.
    assert!(rs.sets.keys().all(|n| !n.ends_with('6')));
}

#[test]
fn single_addresses_go_to_hash_sets_and_wider_blocks_to_an_interval_set() {
    let p = r#"
metadata: {name: mixed, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress:
  - from:
    - podSelector: {matchLabels: {pod: b}}
    - ipBlock: {cidr: 192.0.2.7/32}
    - ipBlock: {cidr: 198.51.100.0/24, except: [198.51.100.128/25]}
    ports: [{port: 80}, {port: 81}]
  - from: [{ipBlock: {cidr: 203.0.113.9/32}}]
    ports: [{port: 1000, endPort: 2000}]
"#;
    let c = cluster(&[p]);
    let rs = compile(&c);
    let set = |suffix: &str| -> Vec<(&String, &Set)> {
        rs.sets
            .iter()
            .filter(|(n, _)| n.ends_with(suffix))
            .collect()
    };
    let elements = |s: &Set| s.elements.iter().cloned().collect::<Vec<_>>();
    // Rule 0: the pod and the /32 in a hash set, the /25 left of the /24 in an interval set.
    let hosts = set("-peer4");
    assert_eq!(hosts.len(), 2);
    let (hosts0, hosts1) = (hosts[0].1, hosts[1].1);
    let mut all_hosts = [elements(hosts0), elements(hosts1)];
    all_hosts.sort();
    assert_eq!(
        all_hosts,
        [
            vec!["10.244.0.11".to_string(), "192.0.2.7".into()],
            vec!["203.0.113.9".to_string()]
        ]
    );
    assert!(hosts
        .iter()
        .all(|(_, s)| s.kind == SetKind::Addr(Family::V4)));
    let wide = set("-peer4r");
    assert_eq!(wide.len(), 1);
    assert_eq!(wide[0].1.kind, SetKind::AddrInterval(Family::V4));
    assert_eq!(elements(wide[0].1), vec!["198.51.100.0/25"]);
    // Single ports in a hash set, the endPort range in an interval set.
    let mut port_kinds: Vec<SetKind> = set("-ports").iter().map(|(_, s)| s.kind).collect();
    port_kinds.sort();
    assert_eq!(
        port_kinds,
        vec![SetKind::ProtoPort, SetKind::ProtoPortInterval]
    );
    // One nft rule per peer set, both counted under the policy rule's comment.
    let comments = ingress_rule_comments(&rs);
    assert_eq!(
        comments,
        vec![
            "x/mixed ingress[0]",
            "x/mixed ingress[0]",
            "x/mixed ingress[1]"
        ]
    );
    assert!(allowed(&c, "x/b", "x/a", Protocol::Tcp, 81));
    assert!(!allowed(&c, "x/c", "x/a", Protocol::Tcp, 80));
    let full = nft::render_full(&rs, &nft::Options::default());
    assert!(full.contains("{ type ipv4_addr; }"));
    assert!(full.contains("{ type ipv4_addr; flags interval; }"));
    assert!(full.contains("{ type inet_proto . inet_service; }"));
}

#[test]
fn explain_cli_arguments_parse() {
    assert_eq!(parse_port("80/TCP"), Ok((80, Protocol::Tcp)));
    assert_eq!(parse_port("53/udp"), Ok((53, Protocol::Udp)));
    assert_eq!(parse_port("8080"), Ok((8080, Protocol::Tcp)));
    assert!(parse_port("0/TCP").is_err());
    assert!(parse_port("80/ICMP").is_err());
    assert_eq!("x/a".parse::<ExplainPeer>(), Ok(pod("x/a")));
    assert_eq!(
        "10.0.0.1".parse::<ExplainPeer>(),
        Ok(ExplainPeer::Ip("10.0.0.1".parse().unwrap()))
    );
    assert!("x".parse::<ExplainPeer>().is_err());
    assert!("x/a/b".parse::<ExplainPeer>().is_err());
}

#[test]
fn egress_named_and_numeric_ports_in_one_rule_both_apply() {
    let egress = r#"
metadata: {name: eg, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  egress:
  - to: [{podSelector: {matchLabels: {pod: b}}}]
    ports: [{port: serve-80-tcp}, {port: 81}]
"#;
    let c = cluster(&[egress]);
    assert!(allowed(&c, "x/a", "x/b", Protocol::Tcp, 80));
    assert!(allowed(&c, "x/a", "x/b", Protocol::Tcp, 81));
    assert!(!allowed(&c, "x/a", "x/c", Protocol::Tcp, 80));
    let rs = compile(&c);
    let named: Vec<&Set> = rs
        .sets
        .iter()
        .filter(|(n, _)| n.ends_with("-named4"))
        .map(|(_, s)| s)
        .collect();
    assert_eq!(named.len(), 1);
    // x/b is 10.244.0.11: its serve-80-tcp port, and no other pod's.
    assert_eq!(
        named[0].elements.iter().collect::<Vec<_>>(),
        vec!["10.244.0.11 . tcp . 80"]
    );
}

#[test]
fn a_reused_compiler_equals_a_fresh_one() {
    let variants = [
        vec![DENY_X],
        vec![DENY_X, ALLOW_B_TO_A],
        vec![ALLOW_B_TO_A],
        vec![],
        vec![DENY_X],
    ];
    let mut compiler = Compiler::default();
    for (i, policies) in variants.iter().enumerate() {
        let mut c = cluster(policies);
        // A policy edited in place (same name, new content) and a pod relabelled.
        if i == 4 {
            std::sync::Arc::make_mut(&mut c.policies[0])
                .spec
                .as_mut()
                .unwrap()
                .policy_types = Some(vec!["Egress".into()]);
            let pod = std::sync::Arc::make_mut(&mut c.pods[1]);
            std::sync::Arc::make_mut(&mut pod.labels).insert("pod".into(), "a".into());
        }
        assert_eq!(compiler.compile(&c), compile(&c), "step {i}");
    }
}

#[test]
fn comments_of_long_names_fit_nft() {
    // Found by the agent/policy fuzz target: the default deny comment of a pod with a long
    // name (Kubernetes allows 253 bytes) passed nft's 128-byte limit, and nft refused the
    // whole batch, every pod's rules with it.
    // So did the jump to a policy with a long name (also up to 253 bytes).
    let long = |end: &str| format!("{}{end}", "p".repeat(250));
    let long_policy = DENY_X.replace("name: deny", &format!("name: {}", long("-np")));
    let mut c = cluster(&[DENY_X, &long_policy]);
    for (i, name) in [long("-a0"), long("-b0")].iter().enumerate() {
        c.pods.push(std::sync::Arc::new(Pod {
            namespace: "x".into(),
            name: name.as_str().into(),
            ips: vec![format!("10.244.1.{i}").parse().unwrap()],
            host_iface: Some(format!("seplong{i}")),
            ..Pod::default()
        }));
    }
    let rs = compile(&c);
    let comments: Vec<&str> = rs
        .chains
        .values()
        .flat_map(|ch| ch.rules.iter().map(|r| r.comment.as_str()))
        .collect();
    assert!(comments.iter().all(|c| c.len() <= 128), "{comments:?}");
    assert!(comments
        .iter()
        .any(|c| c.contains('~') && c.ends_with(" ingress")));
    let a = default_deny_comment("x", &long("-a0"), Direction::Ingress);
    let b = default_deny_comment("x", &long("-b0"), Direction::Ingress);
    assert!(
        a.len() <= 128 && a != b && a.ends_with("ingress default deny"),
        "{a}"
    );
    assert!(comments.contains(&a.as_str()));
    assert_eq!(
        default_deny_comment("x", "a", Direction::Egress),
        "x/a egress default deny"
    );
    // explain finds the shortened comment's counter.
    let denied = explain(
        &c,
        &pod("x/a"),
        &pod(&format!("x/{}", long("-a0"))),
        Protocol::Tcp,
        80,
    )
    .unwrap();
    assert!(!denied.allowed);
}
