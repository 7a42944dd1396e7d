// Root: the real `sepal node` with `--datastore kubernetes` against the stand-in API server inside
// its node namespace; pods added through the real `sepal-cni` get addresses from the Node's pod CIDR.

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

#[test]
fn kube_datastore_pods_get_addresses_from_the_node_cidr() {
    sepal_tests::require_root();
    // The Node helper writes a dir datastore the agent will not read here; the Node object comes
    // from the API server instead, with a different CIDR to prove where it came from.
    let node = Node::new("kn1", &["10.77.0.0/24"]);
    let api = FakeApi::start_in_netns(&node.netns.path());
    api.apply(
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "kn1"},
        "spec": {"podCIDR": "10.244.9.0/24", "podCIDRs": ["10.244.9.0/24"]},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.255.255.2"}]}}),
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    let kubeconfig = tmp.path().join("kubeconfig");
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    let log_path = tmp.path().join("agent.log");
    let logf = std::fs::File::create(&log_path).expect("log");
    let child = node
        .netns
        .command(&[
            sepal_tests::bin_path("sepal").to_str().expect("utf-8"),
            "node",
            "--node-name",
            "kn1",
            "--datastore",
            "kubernetes",
            "--state-dir",
            node.state_dir.to_str().expect("utf-8"),
            "--socket",
            node.socket.to_str().expect("utf-8"),
        ])
        .env("KUBECONFIG", &kubeconfig)
        .stdin(Stdio::null())
        .stdout(logf.try_clone().expect("dup"))
        .stderr(logf)
        .spawn()
        .expect("start sepal node");
    let agent = Agent(child, log_path);

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
}
