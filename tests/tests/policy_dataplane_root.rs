//! The nftables dataplane against the kernel, needs root: incremental updates, sent over netlink
//! directly (`sepal_felix::nft_wire`), leave exactly the state a full replace through nft builds
//! (random change sequences with NetworkPolicies, ClusterNetworkPolicies of both tiers and flow
//! logs), a restarted agent adopts the table, and no other table is ever touched.

use std::collections::BTreeMap;
use std::net::IpAddr;

use sepal_felix::flow_log::FlowLog;
use sepal_felix::nft::{Applied, Dataplane, Options};
use sepal_felix::policy::{
    compile, Cluster, ClusterNetworkPolicy, NamedPort, Namespace, NetworkPolicy, Pod, Protocol,
};
use sepal_tests::netns::Netns;
use sepal_tests::Rng;

fn nft(ns: &Netns) -> Dataplane {
    Dataplane::in_netns(
        ns.path(),
        Options {
            nflog_group: Some(7),
            // Flow-log rules (limit and log) before every deciding rule, allowed ones too.
            flow_log: Some(FlowLog {
                group: 9,
                allowed: true,
                rate: 20,
            }),
        },
    )
}

/// `nft -s list table inet sepal` with top-level blocks and set elements sorted, so listings
/// compare by content regardless of creation order and hash-set iteration order.
fn normalized(ns: &Netns) -> String {
    let text = ns.run("nft -s list table inet sepal");
    let mut blocks: Vec<String> = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        if line.starts_with("\tset ") || line.starts_with("\tmap ") || line.starts_with("\tchain ")
        {
            cur.clear();
        }
        cur.push_str(line.trim());
        cur.push(' ');
        if line == "\t}" {
            blocks.push(sort_elements(&cur));
            cur.clear();
        }
    }
    blocks.sort();
    blocks.join("\n")
}

fn sort_elements(block: &str) -> String {
    let Some(start) = block.find("elements = {") else {
        return block.to_string();
    };
    let body_start = start + "elements = {".len();
    let Some(len) = block[body_start..].find('}') else {
        return block.to_string();
    };
    let mut items: Vec<&str> = block[body_start..body_start + len]
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    items.sort();
    format!(
        "{}{}{}",
        &block[..body_start],
        items.join(", "),
        &block[body_start + len..]
    )
}

const POLICIES: &[&str] = &[
    "metadata: {name: deny, namespace: x}\nspec: {podSelector: {}}",
    "metadata: {name: deny-eg, namespace: y}\nspec: {podSelector: {matchLabels: {pod: a}}, policyTypes: [Egress]}",
    "metadata: {name: from-y, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {team: red}}}], ports: [{port: 80}, {port: 1000, endPort: 2000, protocol: UDP}]}]",
    "metadata: {name: named, namespace: z}\nspec:\n  podSelector: {}\n  ingress: [{ports: [{port: serve-81-tcp}, {port: serve-80-sctp, protocol: SCTP}]}]",
    "metadata: {name: eg-named, namespace: x}\nspec:\n  podSelector: {matchExpressions: [{key: pod, operator: NotIn, values: [c]}]}\n  egress: [{to: [{podSelector: {matchLabels: {pod: b}}, namespaceSelector: {}}], ports: [{port: serve-80-udp, protocol: UDP}]}]",
    "metadata: {name: cidr, namespace: y}\nspec:\n  podSelector: {}\n  ingress: [{from: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.0.12/30, 10.244.1.0/24]}}, {ipBlock: {cidr: 'fd00::/64', except: ['fd00::8/125']}}]}]",
    "metadata: {name: allow-all, namespace: z}\nspec: {podSelector: {matchLabels: {pod: b}}, ingress: [{}], egress: [{}], policyTypes: [Ingress, Egress]}",
];

/// Both tiers, every action, every peer kind, ports single, ranged and named, both families.
const CLUSTER_POLICIES: &[&str] = &[
    r#"{"metadata": {"name": "admin"}, "spec": {"tier": "Admin", "priority": 5,
        "subject": {"namespaces": {"matchLabels": {"team": "red"}}},
        "ingress": [
          {"name": "pass-x", "action": "Pass", "from": [{"namespaces": {"matchLabels": {"kubernetes.io/metadata.name": "x"}}}]},
          {"name": "deny-c", "action": "Deny", "from": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "c"}}}}],
           "protocols": [{"tcp": {"destinationPort": {"number": 80}}}, {"udp": {"destinationPort": {"range": {"start": 1000, "end": 2000}}}}]},
          {"name": "web", "action": "Accept", "from": [{"namespaces": {}}], "protocols": [{"destinationNamedPort": "serve-81-tcp"}]}],
        "egress": [
          {"name": "nets", "action": "Accept", "to": [{"networks": ["10.96.0.0/12", "192.168.0.0/16", "fd00:1::/64", "0.0.0.0/0"]}],
           "protocols": [{"sctp": {"destinationPort": {"number": 5}}}]},
          {"name": "pass-b", "action": "Pass", "to": [{"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "b"}}}}]}]}}"#,
    r#"{"metadata": {"name": "baseline"}, "spec": {"tier": "Baseline", "priority": 1,
        "subject": {"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"pod": "a"}}}},
        "ingress": [{"name": "deny-all", "action": "Deny", "from": [{"namespaces": {}}]}],
        "egress": [{"name": "deny-far", "action": "Deny", "to": [{"networks": ["11.0.0.0/8"]}], "protocols": [{"tcp": {"destinationPort": {"range": {"start": 1, "end": 1024}}}}]}]}}"#,
];

fn cluster_policy(json: &str) -> std::sync::Arc<ClusterNetworkPolicy> {
    let mut v: serde_json::Value = serde_json::from_str(json).expect("test policy JSON");
    v["apiVersion"] = "policy.networking.k8s.io/v1alpha2".into();
    v["kind"] = "ClusterNetworkPolicy".into();
    std::sync::Arc::new(serde_json::from_value(v).expect("test cluster policy"))
}

fn cluster(rng: &mut Rng, on: &[bool], extra_pods: usize) -> Cluster {
    let mut c = Cluster::default();
    for ns in ["x", "y", "z"] {
        let mut labels = BTreeMap::new();
        if rng.below(2) == 0 {
            labels.insert("team".to_string(), "red".to_string());
        }
        c.namespaces.insert(
            ns.into(),
            Namespace {
                name: ns.into(),
                labels,
            },
        );
    }
    let ports: std::sync::Arc<[NamedPort]> = [80u16, 81]
        .iter()
        .flat_map(|&port| {
            [Protocol::Tcp, Protocol::Udp, Protocol::Sctp].map(|protocol| NamedPort {
                name: format!("serve-{port}-{}", protocol.nft()).into(),
                protocol,
                port,
            })
        })
        .collect();
    for i in 0..9 + extra_pods {
        let ns = ["x", "y", "z"][i % 3];
        let pod = ["a", "b", "c"][rng.below(3)];
        let v4: IpAddr = format!("10.244.{}.{}", i / 200, 10 + i % 200)
            .parse()
            .unwrap();
        let v6: IpAddr = format!("fd00::{:x}", i + 1).parse().unwrap();
        c.pods.push(
            Pod {
                namespace: ns.into(),
                name: format!("p{i}").into(),
                labels: BTreeMap::from([("pod".to_string(), pod.to_string())]).into(),
                ips: vec![v4, v6],
                // The first 9 are local; the others live on other nodes.
                host_iface: (i < 9).then(|| format!("sep{i}")),
                ports: ports.clone(),
                host_network: false,
            }
            .into(),
        );
    }
    for (p, enabled) in POLICIES.iter().zip(on) {
        if *enabled {
            let np: NetworkPolicy = serde_norway::from_str(p).unwrap();
            c.policies.push(np.into());
        }
    }
    for (p, enabled) in CLUSTER_POLICIES.iter().zip(&on[POLICIES.len()..]) {
        if *enabled {
            c.cluster_policies.push(cluster_policy(p));
        }
    }
    c
}

#[test]
fn incremental_updates_equal_a_full_replace_root() {
    sepal_tests::require_root();
    let inc = Netns::new("pinc");
    let full = Netns::new("pfull");
    // A foreign table (kube-proxy's, say) that must survive everything below.
    for ns in [&inc, &full] {
        ns.run("nft add table inet other && nft add chain inet other c '{ type filter hook forward priority 0; }' && nft add rule inet other c counter");
    }
    let mut dp_inc = nft(&inc);
    let mut rng = Rng(0x5e9a1);
    let mut on = vec![false; POLICIES.len() + CLUSTER_POLICIES.len()];
    let mut kinds = BTreeMap::new();
    let mut last = None;
    for step in 0..40 {
        let i = rng.below(on.len());
        on[i] = !on[i];
        let extra = rng.below(20);
        let c = cluster(&mut rng, &on, extra);
        let rs = compile(&c);
        assert!(rs.problems.is_empty(), "{:?}", rs.problems);
        let applied = dp_inc
            .apply(&rs)
            .unwrap_or_else(|e| panic!("step {step}: {e}"));
        *kinds
            .entry(
                format!("{applied:?}")
                    .split(' ')
                    .next()
                    .unwrap_or("")
                    .to_string(),
            )
            .or_insert(0) += 1;
        if step > 0 {
            assert!(
                !matches!(applied, Applied::Full),
                "step {step}: incremental update fell back to a full replace"
            );
        }
        let mut dp_full = nft(&full);
        assert_eq!(dp_full.apply(&rs).unwrap(), Applied::Full);
        assert_eq!(
            normalized(&inc),
            normalized(&full),
            "step {step}: incremental state differs from a full replace"
        );
        last = Some(rs);
    }
    let (netlink, text) = dp_inc.diffs_sent();
    eprintln!("applies: {kinds:?}; differences over netlink {netlink}, as nft text {text}");
    // Text only where a base chain comes or goes (first isolation in a direction).
    assert!(
        netlink >= 25 && text <= 10,
        "netlink {netlink}, text {text}"
    );

    // A restarted agent adopts the table: nothing flushed before its first apply, which then
    // replaces the table in one transaction.
    let before = normalized(&inc);
    // A base chain (and with it conntrack) only for a direction some local pod is isolated in.
    let last = last.expect("40 steps");
    for (dispatch, chain, iface) in [
        (&last.ingress_dispatch, "chain pod-ingress", "oifname"),
        (&last.egress_dispatch, "chain pod-egress", "iifname"),
    ] {
        let invalid = format!("ct state invalid {iface} \"sep*\"");
        assert_eq!(before.contains(chain), !dispatch.is_empty(), "{before}");
        assert_eq!(before.contains(&invalid), !dispatch.is_empty(), "{before}");
    }
    let mut restarted = nft(&inc);
    assert!(restarted.table_exists().unwrap());
    assert_eq!(normalized(&inc), before);
    let c = cluster(&mut rng, &on, 3);
    assert_eq!(restarted.apply(&compile(&c)).unwrap(), Applied::Full);
    assert_eq!(restarted.apply(&compile(&c)).unwrap(), Applied::Unchanged);

    // Counters parse; deleting removes only Sepal's table.
    restarted.counters().unwrap();
    restarted.delete().unwrap();
    assert!(!restarted.table_exists().unwrap());
    assert!(inc.run("nft list tables").contains("table inet other"));
    assert!(full.run("nft list tables").contains("table inet other"));
}

/// libnftables, as the dataplane loads it, programs the namespace it was opened in (not the
/// caller's), runs a batch as one transaction, and reports nft's error for a bad one.
#[test]
fn libnftables_runs_batches_in_its_namespace_root() {
    use sepal_felix::libnft::Libnft;
    use sepal_felix::netns::on_thread_in;
    let ns = Netns::new("plib");
    let mut lib = on_thread_in(&ns.path(), Libnft::open)
        .expect("enter netns")
        .expect("libnftables loads");
    let ran = on_thread_in(&ns.path(), || {
        lib.run("add table inet sepal-libtest\nadd chain inet sepal-libtest c\n")
    })
    .expect("enter netns");
    assert_eq!(ran, Ok(String::new()));
    assert!(ns
        .run("nft list tables")
        .contains("table inet sepal-libtest"));
    // A failing command rolls back the whole batch.
    let bad = on_thread_in(&ns.path(), || {
        lib.run("add chain inet sepal-libtest d\nadd rule inet sepal-libtest nosuchchain accept\n")
    })
    .expect("enter netns");
    let err = bad.expect_err("a rule in a missing chain fails");
    assert!(err.contains("No such file or directory"), "{err}");
    assert!(!ns
        .run("nft list table inet sepal-libtest")
        .contains("chain d"));
}

/// A netlink batch the kernel refuses changes nothing (one transaction), and the dataplane then
/// restores the desired state: here someone removed, behind Sepal's back, an element the next
/// difference deletes, so the batch fails at that step.
#[test]
fn a_refused_netlink_batch_leaves_nothing_half_done_root() {
    use sepal_felix::nft_wire::{self, WireError, WireSocket};
    sepal_tests::require_root();
    let ns = Netns::new("prej");
    let reference = Netns::new("pref");
    let on = vec![true; POLICIES.len() + CLUSTER_POLICIES.len()];
    let before = compile(&cluster(&mut Rng(1), &on, 6));
    let after = compile(&cluster(&mut Rng(1), &on, 5));
    let (set, gone) = before
        .sets
        .iter()
        .find_map(|(name, set)| {
            let kept = &after.sets.get(name)?.elements;
            let gone = set.elements.difference(kept).next()?;
            Some((name.clone(), gone.clone()))
        })
        .expect("the removed pod leaves some set");
    let mut dp = nft(&ns);
    assert_eq!(dp.apply(&before).unwrap(), Applied::Full);
    ns.run(&format!(
        "nft delete element inet sepal {set} '{{ {gone} }}'"
    ));
    let tampered = normalized(&ns);

    // The difference alone, over netlink: refused at that step, and nothing of it applied.
    let mut socket = WireSocket::open_in(&ns.path()).expect("netlink socket in the namespace");
    let opts = Options::default();
    match nft_wire::send_diff(&mut socket, &before, &after, &opts) {
        Err(WireError::Refused { step, errno }) => {
            assert_eq!(errno, libc::ENOENT, "{step}");
            assert!(step.contains(&set), "{step}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        normalized(&ns),
        tampered,
        "a refused batch changed the table"
    );

    // The dataplane: the netlink batch and the text difference fail, the full replace restores.
    assert_eq!(dp.apply(&after).unwrap(), Applied::Full);
    assert_eq!(dp.diffs_sent(), (0, 1));
    let mut fresh = nft(&reference);
    assert_eq!(fresh.apply(&after).unwrap(), Applied::Full);
    assert_eq!(normalized(&ns), normalized(&reference));
}
