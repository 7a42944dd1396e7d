//! The real `sepal node` with `--datastore kubernetes` against a real control plane running in
//! its node's namespace (where the agent reaches it on loopback), authenticated as the
//! ServiceAccount deploy/10-rbac.yaml binds.

use crate::kube::{Cluster, Options};
use crate::node::Node;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::process::Child;
use std::time::{Duration, Instant};

/// A running agent, our own child: killed (SIGKILL) on drop, even when an assertion fails.
pub struct KubeAgent {
    child: Child,
    log: PathBuf,
}

impl Drop for KubeAgent {
    fn drop(&mut self) {
        crate::netns::kill(&mut self.child);
    }
}

impl KubeAgent {
    /// Starts the agent for `node` (its Node object has the same name) in its namespace, as the
    /// agent's ServiceAccount of `cluster`, reaching the API server at `server` (default: the
    /// cluster's own address), with `extra` flags; its output goes to the node's agent log.
    /// Returns at once; see [`KubeAgent::wait_ready`].
    pub fn start(
        node: &Node,
        cluster: &Cluster,
        server: Option<&str>,
        extra: &[&str],
    ) -> KubeAgent {
        let kubeconfig = cluster.agent_kubeconfig(server);
        std::fs::File::create(node.log_path()).expect("agent log");
        let child = node
            .agent_command_with("kubernetes")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(extra)
            .spawn()
            .expect("start sepal node");
        KubeAgent {
            child,
            log: node.log_path(),
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
