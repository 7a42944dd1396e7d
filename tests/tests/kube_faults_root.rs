// Root: API server faults on a real control plane. The real `sepal node` (Kubernetes datastore)
// reaches the real API server through a relay the test can hold: for 60 s every connection is
// reset and every new one closed, as when the API server is stopped behind its address. Routing,
// the existing pods and their policy stay exactly as they were; a CNI ADD still succeeds (IPAM is
// local); the agent's retries back off; when the server returns, a policy change made then takes
// effect with no restart. Then etcd compacts its history during the agent's watches: the agent
// lists again (410 Gone) and its dataplane does not change. Last, a malformed object the API
// server admits gets a clear log line and changes nothing else.

use sepal_tests::kube::{Cluster, Cutter, Options};
use sepal_tests::kube_agent::{cluster_for, KubeAgent};
use sepal_tests::netns::Netns;
use sepal_tests::node::{CniCall, Node};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const OUTAGE: Duration = Duration::from_secs(60);

fn pod(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "default", "labels": {"app": name}},
           "spec": {"nodeName": "kf", "containers": [{"name": "c", "image": "x"}]}})
}

/// The server admits only `from` (app labels).
fn server_policy(from: &[&str]) -> Value {
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
           "metadata": {"name": "server", "namespace": "default"},
           "spec": {"podSelector": {"matchLabels": {"app": "server"}}, "policyTypes": ["Ingress"],
                    "ingress": [{"from": [{"podSelector": {"matchExpressions":
                        [{"key": "app", "operator": "In", "values": from}]}}]}]}})
}

fn add(node: &Node, name: &str) -> (Netns, String) {
    let netns = Netns::new(&format!("f{name}"));
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

/// What the node's kernel holds for Sepal: its routes and its policy table (without counters).
fn dataplane(node: &Node) -> BTreeSet<String> {
    node.netns
        .run("ip -4 route show proto 83; ip -6 route show proto 83; nft -s list table inet sepal")
        .lines()
        .map(str::to_string)
        .collect()
}

fn sepal_is_up(c: &Cluster) -> bool {
    c.get("node", "", "kf")
        .is_some_and(|n| sepal_tests::kube::sepal_is_up(&n))
}

#[test]
fn the_node_rides_out_api_server_faults() {
    sepal_tests::require_root();
    let node = Node::new("kf", &["10.77.2.0/24"]);
    // No watch cache: watches are served by etcd itself, so a compaction is 410 Gone for a
    // watch resuming from before it, as on any server once its cache window is past.
    let c = cluster_for(
        &node,
        "10.244.16.0/24",
        Options {
            apiserver_args: vec!["--watch-cache=false".into()],
            ..Default::default()
        },
    );
    c.apply(&[
        pod("server"),
        pod("client"),
        pod("intruder"),
        pod("late"),
        server_policy(&["client"]),
    ]);
    let relay = Cutter::start(c.api_addr(), Some(&node.netns.path()));
    let mut agent = KubeAgent::start(&node, &c, Some(&format!("https://{}", relay.addr)), &[]);
    agent.wait_ready(&node);
    agent.wait_until("NetworkUnavailable=False (SepalIsUp)", || sepal_is_up(&c));
    let pid = agent.pid();
    let (_server, server_ip) = add(&node, "server");
    let (client, client_ip) = add(&node, "client");
    let (intruder, _) = add(&node, "intruder");
    assert!(pings(&client, &server_ip), "client -> server");
    assert!(!pings(&intruder, &server_ip), "intruder -> server passed");
    let before = dataplane(&node);

    // The outage.
    let refused_before = relay.refused();
    relay.hold(true);
    relay.cut();
    let started = Instant::now();
    let add_started = Instant::now();
    let (late, late_ip) = add(&node, "late");
    let add_ms = add_started.elapsed().as_millis();
    let during = dataplane(&node);
    let added: Vec<&String> = during.difference(&before).collect();
    let removed: Vec<&String> = before.difference(&during).collect();
    assert!(
        removed.is_empty() && added.iter().all(|l| l.contains(&late_ip)),
        "the ADD during the outage changed more than its own route: +{added:?} -{removed:?}"
    );
    let mut checks = 0;
    while started.elapsed() < OUTAGE {
        assert_eq!(
            dataplane(&node),
            during,
            "the dataplane changed during the outage"
        );
        assert!(
            pings(&client, &server_ip),
            "client -> server during the outage"
        );
        assert!(pings(&late, &client_ip), "late -> client during the outage");
        assert!(
            !pings(&intruder, &server_ip),
            "intruder -> server passed during the outage"
        );
        assert!(
            !pings(&late, &server_ip),
            "late -> server passed during the outage"
        );
        checks += 1;
        std::thread::sleep(Duration::from_secs(5));
    }
    let retries = relay.refused() - refused_before;
    relay.hold(false);
    assert!(agent.running(), "the agent exited during the outage");
    // About ten watches, each backing off from 0.8 s to 10 s, and the status writer from 2 s to
    // 60 s: about 70 connections in 60 s. Retrying without backoff would be thousands.
    assert!(
        retries <= 150,
        "{retries} connections in a {OUTAGE:?} outage: the agent does not back off"
    );

    // Back: a change made now takes effect, with the same process.
    c.apply(&[server_policy(&["client", "intruder"])]);
    let back = Instant::now();
    agent.wait_until("the policy change after the outage applied", || {
        pings(&intruder, &server_ip)
    });
    let converged_ms = back.elapsed().as_millis();
    assert_eq!(agent.pid(), pid);
    assert!(agent.running());
    assert!(sepal_is_up(&c), "the Node lost its condition");
    assert!(pings(&client, &server_ip));

    // etcd compacts its history while the agent watches; its connections then drop, and its
    // watches resume from before the compaction: 410 Gone, a relist, and no dataplane change.
    let settled = dataplane(&node);
    c.kubectl(&["create", "configmap", "bump", "-n", "default"]);
    let loads_before = c.agent_loads("pods").len() + c.agent_loads("networkpolicies").len();
    c.compact_etcd();
    relay.cut();
    agent.wait_until("a relist after the compaction", || {
        c.agent_loads("pods").len() + c.agent_loads("networkpolicies").len() > loads_before
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        dataplane(&node),
        settled,
        "the relist after a compaction changed the dataplane"
    );
    assert!(pings(&client, &server_ip) && pings(&intruder, &server_ip));

    // A malformed object the API server admits (the CRD schema cannot tell a bad address):
    // one clear log line naming it, and nothing else changes.
    c.apply(&[
        json!({"apiVersion": "sepal.dev/v1alpha1", "kind": "BGPPeer",
                     "metadata": {"name": "typo"},
                     "spec": {"peerIP": "10.0.0.300", "asNumber": 65000}}),
    ]);
    agent.wait_until("a log line about the malformed BGPPeer", || {
        agent.log().contains("typo") && agent.log().contains("10.0.0.300")
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        dataplane(&node),
        settled,
        "a malformed object changed the dataplane"
    );
    let mentions = agent
        .log()
        .lines()
        .filter(|l| l.contains("10.0.0.300"))
        .count();
    assert!(agent.running() && agent.pid() == pid);
    eprintln!(
        "outage {OUTAGE:?}: ADD during it {add_ms} ms, dataplane unchanged over {checks} checks, \
         {retries} connection attempts refused (backoff); a change after it applied in \
         {converged_ms} ms with no restart; compaction: relisted, dataplane unchanged; \
         malformed BGPPeer: {mentions} log line(s), nothing else changed"
    );
}
