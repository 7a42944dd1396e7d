//! ClusterNetworkPolicy tiers on the x/y/z × a/b/c cluster of `tests`: what `explain` decides,
//! and the endpoint chains the compiler lays out for it.

use std::sync::Arc;

use super::tests::cluster;
use super::*;
use crate::nft;

fn with_cnps(policies: &[&str], cnps: &[&str]) -> Cluster {
    let mut c = cluster(policies);
    for (ns, team) in [("x", "blue"), ("y", "red"), ("z", "red")] {
        c.namespaces
            .get_mut(ns)
            .unwrap()
            .labels
            .insert("team".into(), team.into());
    }
    for p in cnps {
        c.cluster_policies
            .push(Arc::new(serde_norway::from_str(p).unwrap()));
    }
    c
}

fn peer(s: &str) -> ExplainPeer {
    s.parse().unwrap()
}

fn verdict(c: &Cluster, from: &str, to: &str, port: &str) -> Explanation {
    let (port, proto) = parse_port(port).unwrap();
    explain(c, &peer(from), &peer(to), proto, port).unwrap()
}

const ADMIN_DENY_RED_TO_BLUE: &str = r#"
metadata: {name: deny-red}
spec:
  tier: Admin
  priority: 20
  subject: {namespaces: {matchLabels: {team: blue}}}
  ingress:
  - {name: no-red, action: Deny, from: [{namespaces: {matchLabels: {team: red}}}]}
"#;

const ADMIN_PASS_Y: &str = r#"
metadata: {name: pass-y}
spec:
  tier: Admin
  priority: 10
  subject: {namespaces: {matchLabels: {team: blue}}}
  ingress:
  - {action: Pass, from: [{namespaces: {matchLabels: {kubernetes.io/metadata.name: y}}}]}
"#;

const BASELINE_DENY_ALL: &str = r#"
metadata: {name: baseline-deny}
spec:
  tier: Baseline
  priority: 0
  subject: {namespaces: {}}
  ingress:
  - {action: Accept, from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {pod: a}}}}]}
  - {action: Deny, from: [{namespaces: {}}]}
"#;

const NP_ALLOW_ALL_TO_XA: &str = r#"
metadata: {name: allow-all, namespace: x}
spec:
  podSelector: {matchLabels: {pod: a}}
  ingress: [{from: [{namespaceSelector: {}}]}]
"#;

#[test]
fn admin_deny_overrides_network_policy() {
    let c = with_cnps(&[NP_ALLOW_ALL_TO_XA], &[ADMIN_DENY_RED_TO_BLUE]);
    let e = verdict(&c, "y/b", "x/a", "80");
    assert!(!e.allowed);
    let DirectionVerdict::Cluster(rule) = &e.ingress else {
        panic!("{e:?}")
    };
    assert_eq!(
        (
            rule.tier,
            rule.policy.as_str(),
            rule.rule,
            rule.name.as_str()
        ),
        (Tier::Admin, "deny-red", 0, "no-red")
    );
    assert_eq!(rule.comment, "Admin/deny-red ingress[0] no-red");
    assert_eq!(e.ingress.tier(), Some("Admin"));
    // Within the namespace, NetworkPolicy decides.
    let e = verdict(&c, "x/b", "x/a", "80");
    assert!(e.allowed);
    assert_eq!(e.ingress.tier(), Some("NetworkPolicy"));
}

#[test]
fn pass_skips_the_rest_of_the_tier_only() {
    // Priority 10 passes y before priority 20 denies red: y is up to NetworkPolicy, z is denied.
    let c = with_cnps(
        &[NP_ALLOW_ALL_TO_XA],
        &[ADMIN_DENY_RED_TO_BLUE, ADMIN_PASS_Y],
    );
    let e = verdict(&c, "y/b", "x/a", "80");
    assert!(e.allowed, "{e}");
    assert_eq!(e.passed[1].len(), 1);
    assert_eq!(e.passed[1][0].policy, "pass-y");
    assert!(e
        .to_string()
        .contains("passed to the next tier by Admin ClusterNetworkPolicy pass-y"));
    assert!(!verdict(&c, "z/b", "x/a", "80").allowed);
    // Priority order, not list order: the same with the policies listed the other way.
    let mut c2 = c.clone();
    c2.cluster_policies.reverse();
    assert!(verdict(&c2, "y/b", "x/a", "80").allowed);
    // Passed with nothing below: Baseline, then allowed by default.
    let c = with_cnps(&[], &[ADMIN_DENY_RED_TO_BLUE, ADMIN_PASS_Y]);
    assert!(verdict(&c, "y/b", "x/b", "80").allowed);
    assert!(!verdict(&c, "z/b", "x/b", "80").allowed);
}

#[test]
fn baseline_applies_only_where_no_network_policy_isolates() {
    let c = with_cnps(&[NP_ALLOW_ALL_TO_XA], &[BASELINE_DENY_ALL]);
    // x/a is isolated by NetworkPolicy: its allow-all decides, Baseline is never reached.
    assert!(verdict(&c, "y/b", "x/a", "80").allowed);
    // x/b is not: Baseline accepts pods labelled a and denies the rest.
    let e = verdict(&c, "y/b", "x/b", "80");
    assert!(!e.allowed);
    assert_eq!(e.ingress.tier(), Some("Baseline"));
    assert!(verdict(&c, "y/a", "x/b", "80").allowed);
    // An outside address is no pod: Baseline's peers (all pods) do not match it.
    let e = verdict(&c, "192.0.2.1", "x/b", "80");
    assert!(e.allowed);
    assert_eq!(e.ingress, DirectionVerdict::NotIsolated);
}

#[test]
fn protocols_networks_nodes_and_named_ports() {
    let cnp = r#"
metadata: {name: egress}
spec:
  tier: Admin
  priority: 1
  subject: {pods: {namespaceSelector: {matchLabels: {team: blue}}, podSelector: {matchLabels: {pod: a}}}}
  egress:
  - {action: Accept, to: [{networks: [192.0.2.0/24]}], protocols: [{tcp: {destinationPort: {range: {start: 8000, end: 8080}}}}]}
  - {action: Deny, to: [{networks: [192.0.2.0/24]}]}
  - {action: Deny, to: [{nodes: {matchLabels: {role: control}}}]}
  - {action: Deny, to: [{pods: {namespaceSelector: {}, podSelector: {}}}], protocols: [{destinationNamedPort: serve-81-udp}]}
"#;
    let mut c = with_cnps(&[], &[cnp]);
    c.nodes.push(Arc::new(Node {
        name: "cp".into(),
        labels: [("role".to_string(), "control".to_string())].into(),
        ips: vec!["198.51.100.7".parse().unwrap()],
    }));
    assert!(verdict(&c, "x/a", "192.0.2.9", "8080").allowed);
    assert!(!verdict(&c, "x/a", "192.0.2.9", "8081").allowed);
    assert!(!verdict(&c, "x/a", "192.0.2.9", "53/UDP").allowed);
    assert!(!verdict(&c, "x/a", "198.51.100.7", "443").allowed);
    assert!(verdict(&c, "x/a", "198.51.100.8", "443").allowed);
    assert!(!verdict(&c, "x/a", "y/b", "81/UDP").allowed);
    assert!(verdict(&c, "x/a", "y/b", "81/TCP").allowed);
    // Not a subject.
    assert!(verdict(&c, "x/b", "192.0.2.9", "8081").allowed);
}

#[test]
fn invalid_rules_fail_closed() {
    let cnp = r#"
metadata: {name: broken}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {matchLabels: {team: blue}}}
  ingress:
  - {action: Accept, from: [{}]}
  - {action: Accept, from: [{namespaces: {}}], protocols: [{tcp: {destinationPort: {number: 0}}}]}
  egress:
  - {action: Deny, to: [{}]}
"#;
    let c = with_cnps(&[], &[cnp]);
    let (p, problems) = validate_cluster_policy(&c.cluster_policies[0]);
    let p = p.unwrap();
    // The Accept rules match nothing, the Deny rule denies everything.
    assert!(p.ingress.is_empty());
    assert_eq!(p.egress.len(), 1);
    assert!(p.egress[0].fail_closed);
    let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
    assert_eq!(
        fields,
        [
            "spec.ingress[0].from[0]",
            "spec.ingress[1].protocols[0].tcp.destinationPort.number",
            "spec.egress[0].to[0]"
        ]
    );
    assert!(verdict(&c, "y/a", "x/a", "80").allowed);
    let e = verdict(&c, "x/a", "y/a", "80");
    assert!(!e.allowed);
    assert!(e.to_string().contains("failing closed"), "{e}");
    // A policy-level problem ignores the policy.
    let bad = "metadata: {name: bad}\nspec: {tier: Admin, priority: 1001, subject: {namespaces: {}}, ingress: [{action: Deny, from: [{namespaces: {}}]}]}\n";
    let c = with_cnps(&[], &[bad]);
    assert!(verdict(&c, "y/a", "x/a", "80").allowed);
    assert_eq!(compile(&c).problems[0].field, "spec.priority");
}

#[test]
fn endpoint_chains_evaluate_the_tiers_in_order() {
    let c = with_cnps(
        &[NP_ALLOW_ALL_TO_XA],
        &[ADMIN_DENY_RED_TO_BLUE, ADMIN_PASS_Y, BASELINE_DENY_ALL],
    );
    let rs = compile(&c);
    let chain = |name: &str| {
        rs.chains[name]
            .rules
            .iter()
            .map(|r| nft::render_rule(r, &nft::Options::default()))
            .collect::<Vec<_>>()
    };
    // x/a: Admin tier (two policies: a shared tier chain), clear the pass mark, NetworkPolicy
    // and its default deny; Baseline never.
    let xa = chain("in-sepxa");
    assert_eq!(xa.len(), 4, "{xa:#?}");
    assert!(xa[0].contains("jump tai-"), "{xa:#?}");
    assert!(
        xa[1].contains("meta mark set meta mark and 0xffefffff"),
        "{xa:#?}"
    );
    assert!(xa[2].contains("jump pi-"), "{xa:#?}");
    assert!(
        xa[3].ends_with("drop comment \"x/a ingress default deny\""),
        "{xa:#?}"
    );
    // x/b: Admin, clear, then Baseline (no Pass there: nothing to clear after it). Nothing in
    // it is the pod's own: a chain shared by the pods with the same tiers.
    let xb_name = &rs.ingress_dispatch["sepxb"];
    assert!(xb_name.starts_with("si-"), "{xb_name}");
    let xb = chain(xb_name);
    assert_eq!(xb.len(), 3, "{xb:#?}");
    assert!(xb[2].contains("jump bi-"), "{xb:#?}");
    // y/b: Baseline only, like y/a.
    let yb = chain(&rs.ingress_dispatch["sepyb"]);
    assert_eq!(yb.len(), 1, "{yb:#?}");
    assert_eq!(rs.ingress_dispatch["sepyb"], rs.ingress_dispatch["sepya"]);
    // The shared Admin chain: pass-y (priority 10) first, its mark checked, then deny-red.
    let Action::Jump(tier) = &rs.chains["in-sepxa"].rules[0].action else {
        panic!()
    };
    let t = chain(tier);
    assert!(t[0].contains("comment \"Admin/pass-y ingress\""), "{t:#?}");
    assert_eq!(
        t[1],
        "meta mark and 0x00100000 != 0 counter return comment \"Admin/pass-y ingress passed\""
    );
    assert!(
        t[2].contains("comment \"Admin/deny-red ingress\""),
        "{t:#?}"
    );
    // Pass sets the mark and returns.
    let pass = &rs.chains[&t[0]
        .split("jump ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap()
        .to_string()];
    let rendered = nft::render_rule(&pass.rules[0], &nft::Options::default());
    assert!(
        rendered.contains("meta mark set meta mark or 0x00100000 return"),
        "{rendered}"
    );
}

#[test]
fn host_network_pods_are_neither_subjects_nor_peers() {
    let mut c = with_cnps(&[], &[ADMIN_DENY_RED_TO_BLUE]);
    for pod in c.pods.iter_mut().filter(|p| &*p.name == "c") {
        let pod = Arc::make_mut(pod);
        pod.host_network = true;
        pod.host_iface = None;
    }
    assert!(!verdict(&c, "y/a", "x/a", "80").allowed);
    assert!(verdict(&c, "y/c", "x/a", "80").allowed);
    let rs = compile(&c);
    let peers: Vec<&Set> = rs
        .sets
        .values()
        .filter(|s| s.kind == SetKind::Addr(Family::V4))
        .collect();
    assert_eq!(peers.len(), 1);
    // y/a, y/b, z/a, z/b: not y/c or z/c.
    assert_eq!(peers[0].elements.len(), 4, "{peers:?}");
}

#[test]
fn traffic_to_the_own_node_meets_the_cluster_tiers_only() {
    let admin = r#"
metadata: {name: no-nodes}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {matchLabels: {team: blue}}}
  egress:
  - {action: Deny, to: [{nodes: {}}]}
"#;
    let baseline = r#"
metadata: {name: baseline-no-nodes}
spec:
  tier: Baseline
  priority: 1
  subject: {namespaces: {matchLabels: {team: red}}}
  egress:
  - {action: Deny, to: [{nodes: {}}]}
"#;
    let np_egress_y_a = r#"
metadata: {name: egress, namespace: y}
spec:
  podSelector: {matchLabels: {pod: a}}
  policyTypes: [Egress]
  egress: [{}]
"#;
    let rs = compile(&with_cnps(&[np_egress_y_a], &[admin, baseline]));
    // x (Admin) and y/b, y/c, z (Baseline) check their traffic to the node; y/a is isolated by
    // a NetworkPolicy, which always allows the pod's node: Baseline does not apply to it.
    let local: Vec<&str> = rs.local_dispatch.keys().map(String::as_str).collect();
    assert_eq!(
        local,
        ["sepxa", "sepxb", "sepxc", "sepyb", "sepyc", "sepza", "sepzb", "sepzc"]
    );
    // One chain per set of tiers, shared: x's pods meet the Admin policy, the others Baseline.
    let xa = &rs.local_dispatch["sepxa"];
    assert!(xa.starts_with("sl-"), "{xa}");
    assert_eq!(rs.chains[xa].rules.len(), 1);
    for (iface, chain) in &rs.local_dispatch {
        let expected = if iface.starts_with("sepx") {
            xa
        } else {
            &rs.local_dispatch["sepyb"]
        };
        assert_eq!(chain, expected, "{iface}");
    }
    assert_ne!(xa, &rs.local_dispatch["sepyb"]);
}

#[test]
fn a_new_pod_leaves_the_chains_of_the_policies_selecting_it() {
    let cnp = r#"
metadata: {name: web}
spec:
  tier: Admin
  priority: 1
  subject: {namespaces: {matchLabels: {team: blue}}}
  ingress:
  - {action: Accept, from: [{namespaces: {}}], protocols: [{destinationNamedPort: web}]}
"#;
    let np = "metadata: {name: a, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{podSelector: {}}]}]\n";
    let mut c = with_cnps(&[np], &[cnp]);
    let mut compiler = Compiler::default();
    compiler.update(&c);
    // A second pod like x/a, on this node, with a port the cluster policy names.
    c.pods.push(Arc::new(Pod {
        namespace: "x".into(),
        name: "a2".into(),
        labels: Arc::new([("pod".to_string(), "a".to_string())].into()),
        ips: vec!["10.244.2.1".parse().unwrap()],
        host_iface: Some("sepxa2".into()),
        ports: vec![NamedPort {
            name: "web".into(),
            protocol: Protocol::Tcp,
            port: 8080,
        }]
        .into(),
        host_network: false,
    }));
    let (rs, touched) = compiler.update(&c);
    // The policies' own chains (`pi-`, `ai-`, ...) are left as they were.
    let policy_chain = |name: &&String| {
        ["pi-", "pe-", "ai-", "ae-", "bi-", "be-"]
            .iter()
            .any(|p| name.starts_with(p))
    };
    let rebuilt: Vec<&String> = touched.chains.iter().filter(policy_chain).collect();
    assert!(rebuilt.is_empty(), "{rebuilt:?}");
    assert!(touched.ifaces.contains("sepxa2"));
    // The cluster policy's named-port set of its local subjects was patched instead.
    let named: Vec<&String> = touched
        .sets
        .iter()
        .filter(|s| rs.sets[*s].elements.contains("10.244.2.1 . tcp . 8080"))
        .collect();
    assert_eq!(named.len(), 1, "{:?}", touched.sets);
    assert_eq!(rs, &compile(&c));
}
