// Root: ClusterNetworkPolicy through the real `sepal node` with the Kubernetes datastore, on a real
// control plane with network-policy-api's CRD (experimental channel, as scripts/kube-build copies
// it): an Admin Deny policy reaches the node's `inet sepal` table and stops the traffic it names,
// each policy gets its `Accepted` condition (a valid one True/Valid, one the CRD admits but felix
// ignores False/Invalid, with a PolicyRejected Event), and removing the policy lets the traffic
// through again. Without the CRD the agent syncs, serves and declares its node up all the same.

use sepal_tests::kube::{Cluster, Options};
use sepal_tests::kube_agent::{cluster_for, KubeAgent};
use sepal_tests::netns::Netns;
use sepal_tests::node::{CniCall, Node};
use serde_json::{json, Value};

const CNPS: &str = "clusternetworkpolicies.policy.networking.k8s.io";

fn pod(name: &str, node: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x"}]}})
}

fn cnp(name: &str, subject: Value, ingress: Value) -> Value {
    json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
           "metadata": {"name": name},
           "spec": {"tier": "Admin", "priority": 5, "subject": subject, "ingress": ingress}})
}

fn add(node: &Node, name: &str) -> (Netns, String) {
    let netns = Netns::new(&format!("c{name}"));
    let out = node.cni(
        "ADD",
        &CniCall::pod(&format!("ctr-{name}"), &netns.path(), "default", name),
    );
    assert!(
        out.status.success(),
        "ADD {name}: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let result: Value = serde_json::from_slice(&out.stdout).expect("ADD result");
    let ip = result["ips"][0]["address"].as_str().expect("address");
    (netns, ip.split('/').next().expect("ip").to_string())
}

fn pings(from: &Netns, to: &str) -> bool {
    from.try_run(&format!("ping -c1 -W1 -q {to}")).is_ok()
}

/// The `Accepted` condition of a policy: (status, reason, message), once written.
fn accepted(c: &Cluster, name: &str) -> Option<(String, String, String)> {
    let p = c.get(CNPS, "", name)?;
    let cond = p["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?
        .clone();
    assert_eq!(
        cond["observedGeneration"], p["metadata"]["generation"],
        "{name}: {cond}"
    );
    let s = |k: &str| cond[k].as_str().unwrap_or_default().to_string();
    Some((s("status"), s("reason"), s("message")))
}

fn sepal_is_up(c: &Cluster, node: &str) -> bool {
    c.get("node", "", node)
        .is_some_and(|n| sepal_tests::kube::sepal_is_up(&n))
}

#[test]
fn cluster_network_policy_reaches_the_table_and_gets_its_condition() {
    sepal_tests::require_root();
    let node = Node::new("kc", &["10.77.3.0/24"]);
    let c = cluster_for(&node, "10.244.21.0/24", Options::default());
    let server = json!({"pods": {"namespaceSelector": {}, "podSelector": {"matchLabels": {"app": "server"}}}});
    c.apply(&[
        pod("server", "kc"),
        pod("client", "kc"),
        pod("friend", "kc"),
        cnp(
            "deny-client",
            server.clone(),
            json!([{"name": "no-client", "action": "Deny",
                    "from": [{"pods": {"namespaceSelector": {},
                                       "podSelector": {"matchLabels": {"app": "client"}}}}]}]),
        ),
        // The CRD does not check label keys; felix does, and ignores the policy.
        cnp(
            "bad-subject",
            json!({"namespaces": {"matchLabels": {"not a key!": "x"}}}),
            json!([{"action": "Deny", "from": [{"namespaces": {}}]}]),
        ),
    ]);
    let agent = KubeAgent::start(&node, &c, None, &[]);
    agent.wait_ready(&node);
    let (_server, server_ip) = add(&node, "server");
    let (client, _) = add(&node, "client");
    let (friend, _) = add(&node, "friend");

    // In the table, and in force.
    let table = || node.netns.run("nft list table inet sepal");
    agent.wait_until("the Deny rule in table inet sepal", || {
        table().contains("Admin/deny-client ingress[0] no-client")
    });
    assert!(
        !pings(&client, &server_ip),
        "client -> server passed the Deny"
    );
    assert!(pings(&friend, &server_ip), "friend -> server denied");

    // The conditions, as every agent computes them.
    agent.wait_until("Accepted on both policies", || {
        accepted(&c, "deny-client").is_some() && accepted(&c, "bad-subject").is_some()
    });
    let (status, reason, _) = accepted(&c, "deny-client").expect("condition");
    assert_eq!((status.as_str(), reason.as_str()), ("True", "Valid"));
    let (status, reason, message) = accepted(&c, "bad-subject").expect("condition");
    assert_eq!((status.as_str(), reason.as_str()), ("False", "Invalid"));
    assert!(
        message.contains("spec.subject.namespaces") && message.contains("not a key!"),
        "{message}"
    );
    // The problem is an Event on the policy too (cluster-scoped: in `default`).
    agent.wait_until("a PolicyRejected Event on bad-subject", || {
        c.list("events.events.k8s.io", &["-n", "default"])
            .iter()
            .any(|e| {
                e["reason"] == "PolicyRejected"
                    && e["regarding"]["kind"] == "ClusterNetworkPolicy"
                    && e["regarding"]["name"] == "bad-subject"
            })
    });

    // Removed: out of the table, and the traffic passes.
    c.delete(CNPS, "", "deny-client");
    agent.wait_until("the Deny rule gone from table inet sepal", || {
        !table().contains("Admin/deny-client")
    });
    assert!(
        pings(&client, &server_ip),
        "client -> server after the removal"
    );
}

#[test]
fn without_the_cnp_crd_the_agent_syncs_and_serves() {
    sepal_tests::require_root();
    let node = Node::new("kn", &["10.77.4.0/24"]);
    let c = cluster_for(
        &node,
        "10.244.22.0/24",
        Options {
            without_cnp_crd: true,
            ..Default::default()
        },
    );
    c.apply(&[pod("web", "kn")]);
    let agent = KubeAgent::start(&node, &c, None, &[]);
    agent.wait_ready(&node);
    // Declared up only once synced: the missing CRD counts as no ClusterNetworkPolicy.
    agent.wait_until("NetworkUnavailable=False (SepalIsUp)", || {
        sepal_is_up(&c, "kn")
    });
    let (_web, _) = add(&node, "web");
    let log = agent.log();
    assert_eq!(
        log.matches("serves no policy.networking.k8s.io/v1alpha2 ClusterNetworkPolicy")
            .count(),
        1,
        "{log}"
    );
}
