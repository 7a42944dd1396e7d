//! The agent's health endpoints in their failure paths, as kubelet's probes see them: `/readyz`
//! answers 503 and names what is missing (no pod block, a datastore that never synced), and
//! `/healthz` answers 503 once the agent's lock has not been acquired within its bound, here
//! because the disk under its state directory stopped answering.

use sepal_tests::netns::{http_get, try_http_get, Netns};
use sepal_tests::node::{CniCall, Node};
use std::time::{Duration, Instant};

const METRICS: &str = "127.0.0.1:9464";

/// Polls `path` until it answers `code`; returns the body.
fn wait_for(node: &Node, path: &str, code: u16, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let got = try_http_get(&node.netns.path(), METRICS, path);
        if let Ok((c, body)) = &got {
            if *c == code {
                return body.clone();
            }
        }
        assert!(
            Instant::now() < deadline,
            "{path} never answered {code} (last: {:?}); agent log:\n{}",
            got.ok(),
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn readyz_names_a_missing_pod_block_until_the_node_gets_one() {
    let mut node = Node::new("hr", &["10.244.13.0/24"]);
    let node_file = node.datastore.join("node-hr.yaml");
    let with_block = std::fs::read_to_string(&node_file).unwrap();
    std::fs::write(
        &node_file,
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: hr\nspec: {}\n",
    )
    .unwrap();
    node.agent_args = vec!["--metrics-addr".into(), METRICS.into()];
    node.spawn_agent();
    let body = wait_for(&node, "/readyz", 503, Duration::from_secs(20));
    assert_eq!(body.trim(), "not ready: no pod block for this node");
    // Alive all the same: only readiness depends on the block.
    assert_eq!(http_get(&node.netns.path(), METRICS, "/healthz").0, 200);
    std::fs::write(&node_file, with_block).unwrap();
    assert_eq!(
        wait_for(&node, "/readyz", 200, Duration::from_secs(20)).trim(),
        "ok"
    );
}

#[test]
fn readyz_names_a_datastore_that_never_synced() {
    let node = Node::new("hs", &["10.244.14.0/24"]);
    // An API server address nothing listens on: every connection is refused.
    let kubeconfig = node.state_dir.with_extension("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1', insecure-skip-tls-verify: true}}]\n\
         users: [{name: u, user: {token: t}}]\ncontexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\n",
    )
    .unwrap();
    let mut cmd = node.agent_command_with("kubernetes");
    cmd.args([
        "--kubeconfig",
        kubeconfig.to_str().unwrap(),
        "--sync-timeout",
        "1s",
        "--metrics-addr",
        METRICS,
    ]);
    let mut agent = cmd.spawn().expect("start sepal node");
    let body = wait_for(&node, "/readyz", 503, Duration::from_secs(20));
    sepal_tests::netns::kill(&mut agent);
    assert!(
        body.starts_with("not ready: datastore not synced"),
        "{body:?}"
    );
}

/// The stuck agent: its state directory's disk stops answering in the middle of an ADD (a FIFO
/// in place of the IPAM temp file blocks the write the way a hung disk or NFS mount would, and
/// no stand-in is involved: this is the real agent blocked in a real write). `/healthz` fails
/// once the lock has been held past its 5 s bound, and recovers when the write returns.
#[test]
fn healthz_fails_while_the_agent_is_stuck_and_recovers() {
    let mut node = Node::new("hh", &["10.244.15.0/24"]);
    node.agent_args = vec!["--metrics-addr".into(), METRICS.into()];
    node.start_agent();
    assert_eq!(http_get(&node.netns.path(), METRICS, "/healthz").0, 200);
    let fifo = node.state_dir.join(".ipam.json.tmp");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(made.success());
    let sandbox = Netns::new("hp");
    let add = std::thread::scope(|s| {
        let add = s.spawn(|| {
            node.cni(
                "ADD",
                &CniCall::pod("ctr-stuck", &sandbox.path(), "default", "stuck"),
            )
        });
        let started = Instant::now();
        let body = wait_for(&node, "/healthz", 503, Duration::from_secs(30));
        assert!(
            started.elapsed() >= Duration::from_secs(4),
            "503 after only {:?}",
            started.elapsed()
        );
        assert!(
            body.contains("busy for over 5s") || body.contains("event loop has not run for"),
            "{body:?}"
        );
        // The disk answers again: the agent's write drains into the reader.
        let mut written = Vec::new();
        use std::io::Read;
        std::fs::File::open(&fifo)
            .expect("open fifo")
            .read_to_end(&mut written)
            .expect("read fifo");
        assert!(!written.is_empty(), "the agent wrote nothing");
        add.join().expect("ADD thread")
    });
    let _ = std::fs::remove_file(&fifo);
    assert_eq!(
        wait_for(&node, "/healthz", 200, Duration::from_secs(10)).trim(),
        "ok"
    );
    // The blocked write could not be made durable (a FIFO cannot be fsynced): the ADD failed
    // cleanly, with a clear error and nothing left behind, and the next one succeeds.
    let stdout = String::from_utf8_lossy(&add.stdout);
    assert!(!add.status.success(), "{stdout}");
    assert!(stdout.contains("ipam.json"), "{stdout}");
    let again = node.cni(
        "ADD",
        &CniCall::pod("ctr-stuck", &sandbox.path(), "default", "stuck"),
    );
    assert!(
        again.status.success(),
        "{}",
        String::from_utf8_lossy(&again.stdout)
    );
}
