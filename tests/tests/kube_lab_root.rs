//! Root: the default lab (3 nodes, a BIRD ToR, six pods) with `--datastore kubernetes` against the
//! stand-in API server, which the lab reaches from every node namespace through its relay: the
//! lab's objects live in the API server, pods on three nodes reach each other through the ToR, a
//! NetworkPolicy is enforced and lifted, pods are applied, relabelled and deleted, and every agent
//! reports back (Node condition, SepalNodeStatus, Events on the BGPPeers when the ToR goes away).

use sepal_tests::fakeapi::FakeApi;
use sepal_tests::lab::{repo_file, wait_for, Lab};
use sepal_tests::require_root;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;

const NODES: [&str; 3] = ["node1", "node2", "node3"];

fn names(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| {
            let ns = o["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = o["metadata"]["name"].as_str().unwrap_or_default();
            if ns.is_empty() {
                name.to_string()
            } else {
                format!("{ns}/{name}")
            }
        })
        .collect()
}

#[test]
fn lab_end_to_end_with_the_kubernetes_datastore() {
    require_root();
    let api = FakeApi::start();
    let tmp = tempfile::tempdir().unwrap();
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).unwrap();
    let name = format!("kl{}", std::process::id());
    let lab = Lab::up_with(
        &name,
        None,
        &[
            "--datastore",
            "kubernetes",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ],
    );

    // The lab's objects are in the API server, with the pods' IPs in their status; no directory.
    let status = lab.status();
    assert_eq!(
        status["datastore"]["kubernetes"],
        kubeconfig.to_str().unwrap()
    );
    assert!(!Path::new("/run/sepal-lab")
        .join(&name)
        .join("datastore")
        .exists());
    assert_eq!(
        names(&api.list("Node")),
        NODES.iter().map(|n| n.to_string()).collect()
    );
    for ns in ["frontend", "backend", "default"] {
        assert!(api.get("Namespace", "", ns).is_some(), "namespace {ns}");
    }
    assert_eq!(api.list("BGPPeer").len(), 3);
    for pod in status["pods"].as_array().unwrap() {
        let (ns, pod_name) = (
            pod["namespace"].as_str().unwrap(),
            pod["name"].as_str().unwrap(),
        );
        let obj = api
            .get("Pod", ns, pod_name)
            .unwrap_or_else(|| panic!("Pod {ns}/{pod_name} not in the API server"));
        assert_eq!(obj["status"]["podIP"], pod["ips"][0], "{obj}");
        assert_eq!(obj["spec"]["nodeName"], pod["node"]);
    }
    // Every agent lists and watches the API server (through the relay in its namespace).
    assert!(
        api.requests("list", "pods") >= 3 && api.requests("watch", "bgppeers") >= 3,
        "pods listed {} times, bgppeers watched {} times",
        api.requests("list", "pods"),
        api.requests("watch", "bgppeers")
    );

    // Status back to the cluster: each Node's condition, and a SepalNodeStatus with its session
    // to the ToR Established, made by the BGPPeer of that node.
    wait_for(
        "NetworkUnavailable=False (SepalIsUp) on every Node",
        || api.list("Node"),
        |nodes| nodes.len() == 3 && nodes.iter().all(sepal_tests::fakeapi::sepal_is_up),
    );
    for node in NODES {
        let s = wait_for(
            &format!("{node}'s SepalNodeStatus with its ToR session Established"),
            || api.get("SepalNodeStatus", "", node),
            |s| {
                s.as_ref().is_some_and(|s| {
                    s["status"]["routesProgrammed"] == true
                        && s["status"]["establishedSessions"] == 1
                })
            },
        )
        .unwrap();
        let session = &s["status"]["sessions"][0];
        assert_eq!(session["peerAs"], 65000, "{s}");
        assert_eq!(session["state"], "Established", "{s}");
        assert_eq!(session["source"], format!("{node}-tor"), "{s}");
        assert!(
            session["since"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{s}"
        );
    }

    // Pods on three nodes reach each other, across nodes through the ToR.
    let all_ok = |m: &std::collections::BTreeMap<(String, String), bool>| {
        m.len() == 30 && m.values().all(|ok| *ok)
    };
    wait_for("every pod to reach every pod", || lab.ping(), all_ok);
    wait_for(
        "node3 to learn frontend/web-1",
        || lab.try_trace("frontend/web-1", "backend/db-1", "5432/TCP"),
        |ok| *ok,
    );
    let t = lab.trace("frontend/web-1", "backend/db-1", "5432/TCP");
    assert_eq!(
        (&t["router"], &t["hops"][1]["node"]),
        (&Value::from("tor"), &Value::from("node3")),
        "{t:#}"
    );

    // A NetworkPolicy, written to the API server: backend pods accept only the frontend namespace.
    let policy = repo_file("docs/examples/backend-allow-frontend.yaml");
    lab.apply(&policy, false);
    assert!(api
        .get("NetworkPolicy", "backend", "allow-frontend")
        .is_some());
    let enforced = |m: &std::collections::BTreeMap<(String, String), bool>| {
        m.len() == 30
            && m.iter().all(|((from, to), ok)| {
                *ok != (from.starts_with("backend/") && to.starts_with("backend/"))
            })
    };
    wait_for("the policy in force on every node", || lab.ping(), enforced);
    // Removed: everything flows again.
    lab.apply(&policy, true);
    assert!(api
        .get("NetworkPolicy", "backend", "allow-frontend")
        .is_none());
    wait_for("the policy lifted on every node", || lab.ping(), all_ok);

    // A pod through apply: created by CNI ADD with its IP in the API server, relabelled (the
    // object replaced, the old label gone), deleted by CNI DEL and from the API server.
    let pod_file = tmp.path().join("pod.yaml");
    std::fs::write(&pod_file, sepal_tests::lab::extra_pod("app: one, tier: a")).unwrap();
    lab.apply(&pod_file, false);
    let extra = api.get("Pod", "frontend", "extra").expect("the new pod");
    let extra_ip = extra["status"]["podIP"].as_str().unwrap().to_string();
    assert!(lab
        .ask("endpoints", "node2")
        .to_string()
        .contains(&extra_ip));
    std::fs::write(&pod_file, sepal_tests::lab::extra_pod("app: two")).unwrap();
    lab.apply(&pod_file, false);
    let relabelled = api.get("Pod", "frontend", "extra").unwrap();
    assert_eq!(
        relabelled["metadata"]["labels"],
        serde_json::json!({"app": "two"})
    );
    assert_eq!(relabelled["status"]["podIP"], extra_ip.as_str());
    lab.apply(&pod_file, true);
    assert!(api.get("Pod", "frontend", "extra").is_none());
    assert!(!lab
        .ask("endpoints", "node2")
        .to_string()
        .contains(&extra_ip));

    // The ToR goes away: each node's session fails, and a Warning Event says so on the BGPPeer
    // that made it, while the SepalNodeStatus shows the session's new state.
    let routers = lab.status()["routers"].clone();
    assert_eq!(routers[0]["kind"], "bird");
    let bird = std::process::Command::new("ip")
        .args(["netns", "pids", routers[0]["netns"].as_str().unwrap()])
        .output()
        .unwrap();
    for pid in String::from_utf8_lossy(&bird.stdout).split_whitespace() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "bird" {
            let pid: libc::pid_t = pid.parse().unwrap();
            // SAFETY: a plain signal to the lab's own BIRD, found in the lab's router namespace.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let events = wait_for(
        "BGPSessionDown Events on the three BGPPeers",
        || api.list("Event"),
        |events| {
            NODES.iter().all(|n| {
                events.iter().any(|e| {
                    e["reason"] == "BGPSessionDown"
                        && e["type"] == "Warning"
                        && e["regarding"]["kind"] == "BGPPeer"
                        && e["regarding"]["name"] == format!("{n}-tor")
                })
            })
        },
    );
    assert!(
        events
            .iter()
            .all(|e| e["metadata"]["namespace"] == "default"),
        "{events:?}"
    );
    let s = wait_for(
        "node1's SepalNodeStatus to show the session down",
        || api.get("SepalNodeStatus", "", "node1").unwrap(),
        |s| s["status"]["establishedSessions"] == 0,
    );
    assert_ne!(s["status"]["sessions"][0]["state"], "Established", "{s}");

    lab.down_cleanly();
}
