//! A real Kubernetes node for a test: containerd and kubelet (built by scripts/kube-build) under
//! `sepal lab node-runtime`, in one of the test's network namespaces, registered with the test's
//! control plane ([`crate::kube::Cluster`]). Dropping the [`KubeletNode`] (a panicking test too)
//! stops the supervisor, which tears down every process, mount and cgroup of the node; if the
//! test process dies, the supervisor gets SIGTERM from the kernel and does the same.

use crate::kube::{kube_bin_dir, Cluster};
use crate::netns::Netns;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

/// How a test wants its node.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// The node's InternalIP (an address of the namespace).
    pub node_ip: Option<String>,
    /// More kubelet flags.
    pub kubelet_args: Vec<String>,
    /// Run kube-proxy too, in this mode (`nftables`, `iptables`).
    pub kube_proxy: Option<String>,
    /// A CNI conflist (JSON) to install, with Debian's reference plugins (/usr/lib/cni) beside
    /// it; without one the node stays NotReady until something installs a network.
    pub cni_conflist: Option<String>,
    /// Also import the Sepal image (`sepal lab image`) from the test's binaries.
    pub sepal_image: bool,
}

/// A running node, owned by the test.
pub struct KubeletNode {
    supervisor: Child,
    dir: Option<tempfile::TempDir>,
    /// `node.json`: name, PIDs, logs, the containerd socket, the cgroup, the images.
    pub info: Value,
}

/// Debian's reference CNI plugins (package containernetworking-plugins).
pub const DEBIAN_CNI_PLUGINS: &str = "/usr/lib/cni";

/// A `ptp` + `host-local` conflist handing out `subnet`, its IPAM state in `data_dir`.
pub fn ptp_conflist(subnet: &str, data_dir: &Path) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "ptp-test",
        "plugins": [{
            "type": "ptp",
            "ipMasq": false,
            "mtu": 1500,
            "ipam": {
                "type": "host-local",
                "ranges": [[{ "subnet": subnet }]],
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": data_dir.display().to_string(),
            }
        }]
    })
    .to_string()
}

impl Drop for KubeletNode {
    fn drop(&mut self) {
        // kubelet and containerd get 10 s each, then the cleanup of Pods, mounts and cgroups.
        crate::kube::stop_supervisor(&mut self.supervisor, Duration::from_secs(60));
        drop(self.dir.take());
    }
}

impl KubeletNode {
    /// The node's supervisor: its mount namespace is the node's (node_runtime/mount_ns.rs).
    pub fn pid(&self) -> u32 {
        self.supervisor.id()
    }

    /// Starts node `name` in `netns` against `cluster` and waits until its Node is registered
    /// (and Ready, with a CNI config). `lab` names its cgroup (/sepal/LAB/NAME).
    pub fn start(
        cluster: &Cluster,
        netns: &Netns,
        lab: &str,
        name: &str,
        o: NodeOptions,
    ) -> KubeletNode {
        KubeletNode::try_start(cluster, netns, lab, name, o)
            .unwrap_or_else(|e| panic!("node {name} did not start:\n{e}"))
    }

    /// [`KubeletNode::start`], or the supervisor's log once it has given up (and torn down
    /// what it had started).
    pub fn try_start(
        cluster: &Cluster,
        netns: &Netns,
        lab: &str,
        name: &str,
        o: NodeOptions,
    ) -> Result<KubeletNode, String> {
        let dir = tempfile::Builder::new()
            .prefix("sepal-node-")
            .tempdir()
            .expect("tempdir");
        let mut cmd = Command::new(crate::bin_path("sepal"));
        cmd.args(["lab", "node-runtime", "--dir"])
            .arg(dir.path().join("node"))
            .args(["--name", name, "--lab", lab, "--control-plane"])
            .arg(cluster.dir())
            .arg("--netns")
            .arg(netns.path())
            .arg("--bin-dir")
            .arg(kube_bin_dir());
        if let Some(ip) = &o.node_ip {
            cmd.args(["--node-ip", ip]);
        }
        if let Some(mode) = &o.kube_proxy {
            cmd.args(["--kube-proxy", mode]);
        }
        for a in &o.kubelet_args {
            cmd.arg(format!("--kubelet-arg={a}"));
        }
        if o.sepal_image {
            cmd.arg("--sepal-image");
        }
        if let Some(conflist) = &o.cni_conflist {
            let file = dir.path().join("10-test.conflist");
            std::fs::write(&file, conflist).expect("write conflist");
            cmd.arg("--cni-config")
                .arg(&file)
                .args(["--cni-plugins", DEBIAN_CNI_PLUGINS]);
        }
        let log_path = dir.path().join("supervisor.log");
        let (supervisor, line) = crate::kube::start_supervisor(cmd, &log_path);
        let mut node = KubeletNode {
            supervisor,
            dir: Some(dir),
            info: Value::Null,
        };
        match serde_json::from_str::<Value>(&line) {
            Ok(v) => {
                node.info = v;
                Ok(node)
            }
            Err(_) => {
                let _ = node.supervisor.wait();
                Err(std::fs::read_to_string(&log_path).unwrap_or_default())
            }
        }
    }

    /// The node's directory (containerd's and kubelet's roots, logs).
    pub fn dir(&self) -> PathBuf {
        self.dir.as_ref().expect("dir").path().join("node")
    }

    pub fn cgroup(&self) -> String {
        self.info["cgroup"].as_str().unwrap_or_default().to_string()
    }

    /// A component's log (`containerd`, `kubelet`), for a failing test's message.
    pub fn log(&self, component: &str) -> String {
        let path = self.info["logs"][component].as_str().unwrap_or_default();
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Stops the node now (what dropping it does), so a test can check what it left.
    pub fn stop(self) {
        drop(self)
    }
}
