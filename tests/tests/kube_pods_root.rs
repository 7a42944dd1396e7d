// Root: the real `sepal node` with `--datastore kubernetes` against a real control plane running in
// its node namespace, authenticated as the ServiceAccount deploy/10-rbac.yaml binds; pods added
// through the real `sepal-cni` get addresses from the Node's pod CIDR, and the agent reports back
// (Node condition, SepalNodeStatus, Events) with exactly the access the shipped RBAC grants, as the
// API server's audit log of its requests shows.

use sepal_tests::kube::{Cluster, Options};
use sepal_tests::kube_agent::{cluster_for, KubeAgent};
use sepal_tests::netns::Netns;
use sepal_tests::node::{CniCall, Node};
use serde_json::{json, Value};
use std::time::Duration;

/// (API group, resource, verb) the RBAC rules in deploy/10-rbac.yaml grant.
fn granted() -> std::collections::BTreeSet<(String, String, String)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/10-rbac.yaml");
    let text = std::fs::read_to_string(path).expect("deploy/10-rbac.yaml");
    let mut out = std::collections::BTreeSet::new();
    for doc in serde_norway::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).expect("RBAC YAML");
        for rule in v["rules"].as_array().into_iter().flatten() {
            for g in rule["apiGroups"].as_array().into_iter().flatten() {
                for r in rule["resources"].as_array().into_iter().flatten() {
                    for verb in rule["verbs"].as_array().into_iter().flatten() {
                        out.insert((
                            g.as_str().unwrap_or_default().to_string(),
                            r.as_str().unwrap_or_default().to_string(),
                            verb.as_str().unwrap_or_default().to_string(),
                        ));
                    }
                }
            }
        }
    }
    out
}

fn sepal_is_up(c: &Cluster, name: &str) -> bool {
    c.get("node", "", name)
        .is_some_and(|n| sepal_tests::kube::sepal_is_up(&n))
}

/// Warning Events with `reason` about `name`, from any namespace.
fn warnings(c: &Cluster, reason: &str, name: &str) -> Vec<Value> {
    c.list("events.events.k8s.io", &[])
        .into_iter()
        .filter(|e| {
            e["reason"] == reason && e["regarding"]["name"] == name && e["type"] == "Warning"
        })
        .collect()
}

/// (API group, resource, verb) of every request the agent made, as the API server audited it,
/// and the requests RBAC refused.
fn audited(
    c: &Cluster,
) -> (
    std::collections::BTreeSet<(String, String, String)>,
    Vec<String>,
) {
    let mut used = std::collections::BTreeSet::new();
    let mut refused = Vec::new();
    for e in c.agent_requests() {
        let r = &e["objectRef"];
        let resource = match r["subresource"].as_str() {
            Some(sub) => format!("{}/{sub}", r["resource"].as_str().unwrap_or_default()),
            None => r["resource"].as_str().unwrap_or_default().to_string(),
        };
        let group = r["apiGroup"].as_str().unwrap_or_default().to_string();
        let verb = e["verb"].as_str().unwrap_or_default().to_string();
        if e["responseStatus"]["code"] == 403 {
            refused.push(format!(
                "{verb} {}",
                e["requestURI"].as_str().unwrap_or_default()
            ));
        }
        used.insert((group, resource, verb));
    }
    (used, refused)
}

#[test]
fn kube_datastore_pods_get_addresses_from_the_node_cidr() {
    sepal_tests::require_root();
    // The Node helper writes a dir datastore the agent will not read here; the Node object comes
    // from the API server instead, with a different CIDR to prove where it came from.
    let node = Node::new("kn1", &["10.77.0.0/24"]);
    let c = cluster_for(&node, "10.244.9.0/24", Options::default());
    // A BGP peer with a password: the agent reads that Secret, and only that one.
    c.apply(&[
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bgp-passwords", "namespace": "sepal-system"},
               "stringData": {"tor": "s3cret"}}),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "unrelated", "namespace": "sepal-system"},
               "stringData": {"x": "y"}}),
        json!({"apiVersion": "sepal.dev/v1alpha1", "kind": "BGPPeer", "metadata": {"name": "tor"},
               "spec": {"peerIP": "10.255.255.1", "asNumber": 65000,
                        "password": {"secretKeyRef": {"name": "bgp-passwords", "key": "tor"}}}}),
        // Selects nothing here; the agent writes its Accepted condition.
        json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
               "metadata": {"name": "quiet"},
               "spec": {"tier": "Baseline", "priority": 1,
                        "subject": {"namespaces": {"matchLabels": {"no-such": "namespace"}}}}}),
    ]);
    let agent = KubeAgent::start(&node, &c, None, &[]);
    agent.wait_ready(&node);
    let sandbox = Netns::new("kp1");
    let out = node.cni("ADD", &CniCall::pod("kc1", &sandbox.path(), "web", "web-1"));
    assert!(
        out.status.success(),
        "ADD failed: {} {}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    let result: Value = serde_json::from_slice(&out.stdout).expect("CNI result JSON");
    let addr = result["ips"][0]["address"]
        .as_str()
        .expect("address")
        .to_string();
    assert!(
        addr.starts_with("10.244.9."),
        "pod got {addr}, not from the API server's Node"
    );
    // The pod reaches the node (its address on the uplink) through the gateway the plugin set up.
    sandbox.run("ping -c1 -W2 10.255.255.2");

    // Status back to the cluster: the Node condition once routes are programmed, kubelet's kept.
    agent.wait_until("NetworkUnavailable=False (SepalIsUp) on the Node", || {
        sepal_is_up(&c, "kn1")
    });
    agent.wait_until("a SepalNodeStatus for kn1", || {
        c.get("sepalnodestatus", "", "kn1")
            .is_some_and(|s| s["status"]["routesProgrammed"] == json!(true))
    });
    agent.wait_until("the ClusterNetworkPolicy's Accepted condition", || {
        c.get(
            "clusternetworkpolicies.policy.networking.k8s.io",
            "",
            "quiet",
        )
        .is_some_and(|p| p["status"]["conditions"][0]["reason"] == "Valid")
    });
    // Invalid policy content never reaches the agent here: the API server refuses it, naming the
    // field Sepal's own validation names for the dir datastore (and the PolicyRejected Event the
    // status writer's test records against this server).
    c.kubectl(&["create", "namespace", "web"]);
    let bad = json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "bad", "namespace": "web"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock":
            {"cidr": "10.0.0.0/24", "except": ["10.0.1.0/28"]}}]}]}});
    let refused = c
        .try_kubectl(
            &["apply", "--server-side", "-f", "-"],
            Some(&bad.to_string()),
        )
        .expect_err("the API server admitted an except outside its cidr");
    assert!(
        refused.contains("spec.ingress[0].from[0].ipBlock.except[0]"),
        "{refused}"
    );

    // The Secret watch names its Secret: the agent never lists the namespace's others.
    let secret_reads: Vec<String> = c
        .agent_requests()
        .into_iter()
        .filter(|e| e["objectRef"]["resource"] == "secrets")
        .map(|e| e["requestURI"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        !secret_reads.is_empty(),
        "the agent never read its BGP password"
    );
    assert!(
        secret_reads
            .iter()
            .all(|u| u.contains("fieldSelector=metadata.name%3Dbgp-passwords")),
        "the agent read Secrets beyond the one its peer names: {secret_reads:?}"
    );

    // RBAC grants exactly what the agent asked for, and refused nothing. Creating the
    // SepalNodeStatus is a server-side apply (a PATCH), which the API server also authorizes as
    // `create`.
    let (used, refused) = audited(&c);
    assert!(refused.is_empty(), "RBAC refused the agent: {refused:?}");
    let granted = granted();
    let missing: Vec<_> = used.difference(&granted).collect();
    assert!(
        missing.is_empty(),
        "the agent needs access RBAC does not grant: {missing:?}"
    );
    // Events are written only when something goes wrong, which this run does not provoke: the
    // next test has the agent record one (Forbidden, on its Node), and the status writer's test
    // records and repeats them (a patch of the series), both as this ServiceAccount.
    // `list` goes unused on a server that streams lists (WatchList, on by default): the agent
    // loads every resource by a watch with sendInitialEvents. It stays granted for servers that
    // refuse that, where the agent lists in pages (kube_datastore runs one).
    let mut unused: Vec<_> = granted.difference(&used).collect();
    unused.retain(|(g, r, v)| {
        !(g == "sepal.dev" && r == "sepalnodestatuses" && v == "create"
            || g == "events.k8s.io" && r == "events"
            || v == "list" && used.contains(&(g.clone(), r.clone(), "watch".to_string())))
    });
    assert!(
        unused.is_empty(),
        "RBAC grants access the agent never uses: {unused:?}"
    );
}

/// A rule removed from the shipped RBAC makes the agent fail visibly: the 403 is logged, the
/// agent is not ready and says why, its Node stays NetworkUnavailable and carries a Warning Event
/// naming the resource. An agent that starts serving before its initial state is complete
/// (`--sync-timeout`) programs from a partial view, so it declares the node up only once the rule
/// is back and the state complete.
#[test]
fn a_missing_rbac_rule_fails_visibly_and_keeps_the_node_unavailable() {
    sepal_tests::require_root();
    let node = Node::new("kn2", &["10.77.1.0/24"]);
    let c = cluster_for(&node, "10.244.8.0/24", Options::default());
    c.remove_rbac_rule("endpointslices");
    let agent = KubeAgent::start(&node, &c, None, &["--sync-timeout", "1s"]);
    agent.wait_until("the forbidden resource in the agent's log", || {
        let l = agent.log();
        l.contains("forbidden") && l.contains("endpointslices")
    });
    agent.wait_until("the agent serving without its initial sync", || {
        agent.log().contains("serving anyway")
    });
    let status = node.netns.output(&[
        sepal_tests::bin_path("sepal").to_str().expect("utf-8"),
        "status",
        "--json",
        "--admin-socket",
        node.socket
            .with_file_name("admin.sock")
            .to_str()
            .expect("utf-8"),
    ]);
    let status: Value = serde_json::from_slice(&status.stdout).unwrap_or_default();
    assert_eq!(status["ready"], json!(false), "{status}");
    assert_eq!(
        status["datastore"]["forbidden"],
        json!(["endpointslices"]),
        "{status}"
    );
    agent.wait_until("a Forbidden Warning Event on the Node", || {
        warnings(&c, "Forbidden", "kn2").iter().any(|e| {
            e["note"]
                .as_str()
                .is_some_and(|n| n.contains("endpointslices"))
        })
    });
    // The status writer runs every 2 s: several rounds pass without the condition.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !sepal_is_up(&c, "kn2"),
        "the Node was declared up before the initial sync completed; log:\n{}",
        agent.log()
    );
    c.restore_rbac();
    agent.wait_until("NetworkUnavailable=False once the sync completed", || {
        sepal_is_up(&c, "kn2")
    });
}
