//! The real `sepal node` with `--datastore kubernetes` against a real control plane running in
//! its node's namespace (where the agent reaches it on loopback), authenticated as the
//! ServiceAccount deploy/10-rbac.yaml binds.

use crate::kube::{Cluster, Options};
use crate::node::Node;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A running agent, our own child: killed (SIGKILL) on drop, even when an assertion fails.
pub struct KubeAgent {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for KubeAgent {
    fn drop(&mut self) {
        crate::netns::kill(&mut self.child);
    }
}

impl KubeAgent {
    /// Starts the agent for Node `name` in `node`'s namespace, as the agent's ServiceAccount of
    /// `cluster`, reaching the API server at `server` (default: the cluster's own address), with
    /// `extra` flags. Returns at once; see [`KubeAgent::wait_ready`].
    pub fn start(
        node: &Node,
        cluster: &Cluster,
        name: &str,
        server: Option<&str>,
        extra: &[&str],
    ) -> KubeAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let kubeconfig = cluster.agent_kubeconfig(server);
        let log = dir.path().join("agent.log");
        let logf = std::fs::File::create(&log).expect("log");
        let sepal = crate::bin_path("sepal");
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
        KubeAgent {
            child,
            log,
            _dir: dir,
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still the one started (it has not exited).
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until `f` holds (60 s at most); panics with the agent's log otherwise.
    pub fn wait_until(&self, what: &str, mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !f() {
            assert!(
                Instant::now() < deadline,
                "{what}: not so; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until the agent answers STATUS through the plugin on `node`.
    pub fn wait_ready(&self, node: &Node) {
        self.wait_until("the agent answering STATUS", || {
            node.cni("STATUS", &crate::node::CniCall::status())
                .status
                .success()
        });
    }
}

/// A real control plane in `node`'s namespace, with Sepal installed from deploy/ and the node's
/// Node object (pod CIDR `cidr`).
pub fn cluster_for(node: &Node, cidr: &str, options: Options) -> Cluster {
    let c = Cluster::start_with(Options {
        netns: Some(node.netns.path()),
        ..options
    });
    c.install_sepal();
    c.apply(&[node_object(&node.name, cidr)]);
    c
}

/// A Node object as kube-controller-manager leaves it: pod CIDR allocated, InternalIP set.
pub fn node_object(name: &str, cidr: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
    "spec": {"podCIDR": cidr, "podCIDRs": [cidr]},
    "status": {"addresses": [{"type": "InternalIP", "address": "10.255.255.2"}]}})
}
