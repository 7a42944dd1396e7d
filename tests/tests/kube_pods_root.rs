// Root: the real `sepal node` with `--datastore kubernetes` against the stand-in API server inside
// its node namespace; pods added through the real `sepal-cni` get addresses from the Node's pod CIDR,
// and the agent reports back (Node condition, SepalNodeStatus, Events) with exactly the access
// deploy/'s RBAC grants.

use sepal_tests::fakeapi::FakeApi;
use sepal_tests::netns::Netns;
use sepal_tests::node::{CniCall, Node};
use serde_json::{json, Value};
use std::process::Stdio;
use std::time::{Duration, Instant};

/// Kills the agent (our own child) on drop, even when an assertion fails.
struct Agent(std::process::Child, std::path::PathBuf);

impl Drop for Agent {
    fn drop(&mut self) {
        sepal_tests::netns::kill(&mut self.0);
    }
}

fn log(a: &Agent) -> String {
    std::fs::read_to_string(&a.1).unwrap_or_default()
}

/// Waits until `f` holds; panics with the agent's log otherwise.
fn wait_until(agent: &Agent, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f() {
        assert!(
            Instant::now() < deadline,
            "{what}: not so; log:\n{}",
            log(agent)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

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

/// The real `sepal node` for `name` in `node`'s namespace, against `api`, with `extra` flags.
fn start_agent(
    node: &Node,
    api: &FakeApi,
    name: &str,
    extra: &[&str],
) -> (Agent, tempfile::TempDir) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let log_path = tmp.path().join("agent.log");
    let logf = std::fs::File::create(&log_path).expect("log");
    let sepal = sepal_tests::bin_path("sepal");
    let mut args = vec![
        sepal.to_str().expect("utf-8"),
        "node",
        "--node-name",
        name,
        "--datastore",
        "kubernetes",
        "--state-dir",
        node.state_dir.to_str().expect("utf-8"),
        "--socket",
        node.socket.to_str().expect("utf-8"),
        "--kubeconfig",
        kubeconfig.to_str().expect("utf-8"),
    ];
    args.extend(extra);
    let child = node
        .netns
        .command(&args)
        .stdin(Stdio::null())
        .stdout(logf.try_clone().expect("dup"))
        .stderr(logf)
        .spawn()
        .expect("start sepal node");
    (Agent(child, log_path), tmp)
}

fn node_object(name: &str, cidr: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
    "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
    "status": {"addresses": [{"type": "InternalIP", "address": "10.255.255.2"}]}})
}

fn sepal_is_up(api: &FakeApi, name: &str) -> bool {
    api.get("Node", "", name)
        .is_some_and(|n| sepal_tests::fakeapi::sepal_is_up(&n))
}

#[test]
fn kube_datastore_pods_get_addresses_from_the_node_cidr() {
    sepal_tests::require_root();
    // The Node helper writes a dir datastore the agent will not read here; the Node object comes
    // from the API server instead, with a different CIDR to prove where it came from.
    let node = Node::new("kn1", &["10.77.0.0/24"]);
    let api = FakeApi::start_in_netns(&node.netns.path());
    api.apply(node_object("kn1", "10.244.9.0/24"));
    let (agent, _tmp) = start_agent(&node, &api, "kn1", &[]);

    let deadline = Instant::now() + Duration::from_secs(60);
    while !node.cni("STATUS", &CniCall::status()).status.success() {
        assert!(
            Instant::now() < deadline,
            "agent not ready; log:\n{}",
            log(&agent)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let sandbox = Netns::new("kp1");
    let out = node.cni("ADD", &CniCall::pod("kc1", &sandbox.path(), "web", "web-1"));
    assert!(
        out.status.success(),
        "ADD failed: {} {}\nagent log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        log(&agent)
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
    assert!(api.requests("watch", "nodes") + api.requests("list", "nodes") >= 1);

    // Status back to the cluster: the Node condition once routes are programmed, kubelet's kept.
    wait_until(
        &agent,
        "NetworkUnavailable=False (SepalIsUp) on the Node",
        || sepal_is_up(&api, "kn1"),
    );
    wait_until(&agent, "a SepalNodeStatus for kn1", || {
        api.get("SepalNodeStatus", "", "kn1")
            .is_some_and(|s| s["status"]["routesProgrammed"] == json!(true))
    });
    // Invalid policy content: left out, and a Warning Event on the policy says why.
    api.apply(
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "bad", "namespace": "web"},
        "spec": {"podSelector": {}, "ingress": [{"from": [{"ipBlock":
            {"cidr": "10.0.0.0/24", "except": ["10.0.1.0/28"]}}]}]}}),
    );
    wait_until(&agent, "a PolicyRejected Event on web/bad", || {
        api.list("Event").iter().any(|e| {
            e["reason"] == "PolicyRejected"
                && e["regarding"]["name"] == "bad"
                && e["type"] == "Warning"
        })
    });

    // RBAC grants exactly what the agent asked for. Creating the SepalNodeStatus is a server-side
    // apply (a PATCH), which the API server also authorizes as `create`.
    let used = api.access();
    let granted = granted();
    let missing: Vec<_> = used.difference(&granted).collect();
    assert!(
        missing.is_empty(),
        "the agent needs access RBAC does not grant: {missing:?}"
    );
    // Events are patched only when one repeats (its series), which this run does not provoke;
    // the status writer's unit test covers that request against the stand-in server.
    let mut unused: Vec<_> = granted.difference(&used).collect();
    unused.retain(|(g, r, v)| {
        !(g == "sepal.dev" && r == "sepalnodestatuses" && v == "create"
            || g == "events.k8s.io" && r == "events" && v == "patch")
    });
    assert!(
        unused.is_empty(),
        "RBAC grants access the agent never uses: {unused:?}"
    );
}

/// An agent that starts serving before its datastore's initial state is complete (here RBAC
/// forbids a resource) programs from a partial view: it leaves its Node's network unavailable
/// until the state is complete, then declares it up.
#[test]
fn an_agent_serving_before_its_initial_sync_does_not_declare_the_node_up() {
    sepal_tests::require_root();
    let node = Node::new("kn2", &["10.77.1.0/24"]);
    let api = FakeApi::start_in_netns(&node.netns.path());
    api.apply(node_object("kn2", "10.244.8.0/24"));
    api.forbid("endpointslices");
    let (agent, _tmp) = start_agent(&node, &api, "kn2", &["--sync-timeout", "1s"]);
    wait_until(&agent, "the agent serving without its initial sync", || {
        log(&agent).contains("serving anyway")
    });
    // The status writer runs every 2 s: several rounds pass without the condition.
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !sepal_is_up(&api, "kn2"),
        "the Node was declared up before the initial sync completed; log:\n{}",
        log(&agent)
    );
    api.allow("endpointslices");
    wait_until(
        &agent,
        "NetworkUnavailable=False once the sync completed",
        || sepal_is_up(&api, "kn2"),
    );
}
