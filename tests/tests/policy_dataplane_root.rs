//! The nftables dataplane against the kernel, needs root: incremental updates leave exactly the
//! state a full replace builds (random change sequences), a restarted agent adopts the table,
//! and no other table is ever touched.

use std::collections::BTreeMap;
use std::net::IpAddr;

use sepal_felix::nft::{Applied, Dataplane, Options};
use sepal_felix::policy::{compile, Cluster, NamedPort, Namespace, NetworkPolicy, Pod, Protocol};
use sepal_tests::netns::Netns;
use sepal_tests::Rng;

fn nft(ns: &Netns) -> Dataplane {
    Dataplane::in_netns(
        ns.path(),
        Options {
            nflog_group: Some(7),
            ..Options::default()
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
    let mut on = vec![false; POLICIES.len()];
    let mut kinds = BTreeMap::new();
    let mut last = None;
    for step in 0..40 {
        let i = rng.below(POLICIES.len());
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
    eprintln!("applies: {kinds:?}");

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
