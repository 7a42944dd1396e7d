//! What a running lab is made of, saved beside its datastore so every `sepal lab` command (and
//! `down` after a half-finished `up`) knows exactly which namespaces and processes are its own.

use super::topology::{RouterKind, Topology};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Where labs keep their state: one directory per lab name.
pub const LABS_DIR: &str = "/run/sepal-lab";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub topology: Topology,
    pub nodes: Vec<NodeState>,
    pub routers: Vec<RouterState>,
    pub pods: Vec<PodState>,
    /// The API server the lab's objects live in (`up --kubernetes`, or `up --datastore
    /// kubernetes --kubeconfig FILE`) and the credentials for it; None: the dir datastore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig: Option<ApiServer>,
    /// The process relaying that API server into the node namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay_pid: Option<u32>,
    /// kube-proxy's mode on real nodes (`up --kubernetes --proxy-mode`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_mode: Option<super::node_runtime::kube_proxy::ProxyMode>,
}

/// How the lab and its agents reach the lab's API server.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiServer {
    /// What the lab writes its objects with: its own control plane's admin kubeconfig, or the
    /// user's `--kubeconfig`.
    pub admin_kubeconfig: PathBuf,
    /// What the agents read and report with: a ServiceAccount token of `sepal-system/sepal-node`
    /// (own control plane), or the user's `--kubeconfig`.
    pub agent_kubeconfig: PathBuf,
    /// The server's version, as its /version answered at `up` (None: it did not).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// The lab's own control plane (`up --kubernetes`); None: a server the lab does not own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<OwnControlPlane>,
}

/// A control plane `up --kubernetes` started and `down` stops.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OwnControlPlane {
    /// Its directory (credentials, etcd's data, logs), inside the lab's.
    pub dir: PathBuf,
    /// Where etcd, the Kubernetes binaries and kubectl are.
    pub bin_dir: PathBuf,
    /// Its supervisor, recorded as soon as it runs: stopping it stops every component.
    pub pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    pub as_number: u32,
    /// Underlay address on the link to each router, in router order.
    pub uplinks: Vec<String>,
    /// The same links' IPv6 addresses, in a dual-stack lab.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uplinks6: Vec<String>,
    #[serde(rename = "podCIDRs")]
    pub pod_cidrs: Vec<String>,
    pub pid: Option<u32>,
    /// Its `sepal lab node-runtime` supervisor (containerd, kubelet, kube-proxy), in a lab with
    /// real nodes (`up --kubernetes`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RouterState {
    pub name: String,
    pub kind: RouterKind,
    pub netns: String,
    pub as_number: u32,
    pub pids: Vec<u32>,
    /// Sessions over IPv6 link-local addresses (see the topology's `unnumbered`).
    #[serde(default)]
    pub unnumbered: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub netns: String,
    pub container_id: String,
    pub ips: Vec<String>,
    pub labels: BTreeMap<String, String>,
}

/// The directory of lab `name`.
pub fn lab_dir(name: &str) -> PathBuf {
    Path::new(LABS_DIR).join(name)
}

impl LabState {
    /// Whether the cluster has an IPv6 pod range: then the underlay carries IPv6 too.
    pub fn dual_stack(&self) -> bool {
        self.topology.pod_range6().is_some()
    }

    pub fn dir(&self) -> PathBuf {
        lab_dir(&self.name)
    }

    pub fn datastore(&self) -> PathBuf {
        self.dir().join("datastore")
    }

    /// Where `up --kubernetes` puts the lab's own control plane.
    pub fn control_plane_dir(&self) -> PathBuf {
        self.dir().join("control-plane")
    }

    /// The kubeconfig the lab writes objects with, when its objects live in an API server.
    pub fn admin_kubeconfig(&self) -> Option<&Path> {
        self.kubeconfig
            .as_ref()
            .map(|k| k.admin_kubeconfig.as_path())
    }

    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.dir().join("nodes").join(node)
    }

    pub fn router_dir(&self, router: &str) -> PathBuf {
        self.dir().join("routers").join(router)
    }

    /// The agent's CNI socket as the host sees it: with real nodes, the DaemonSet's
    /// /run/sepal/sepal.sock, which is the node directory's run/sepal (node_runtime/mount_ns.rs).
    pub fn socket(&self, node: &str) -> PathBuf {
        match self.real_nodes() {
            true => self.node_dir(node).join("run/sepal/sepal.sock"),
            false => self.node_dir(node).join("sepal.sock"),
        }
    }

    /// Whether the nodes run kubelet and the agents run from the DaemonSet (`up --kubernetes`).
    pub fn real_nodes(&self) -> bool {
        self.kubeconfig
            .as_ref()
            .is_some_and(|k| k.control_plane.is_some())
    }

    pub fn node(&self, name: &str) -> Option<&NodeState> {
        self.nodes.iter().find(|n| n.name == name)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&PodState> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// Namespace name of a pod of this lab.
    pub fn pod_netns(&self, namespace: &str, name: &str) -> String {
        format!("{}-pod-{namespace}-{name}", self.name)
    }

    pub fn load(name: &str) -> Result<LabState> {
        let path = lab_dir(name).join("lab.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("lab {name:?} is not up (no {})", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("corrupt lab state {}", path.display()))
    }

    /// Saves atomically (temp file + rename), so a crash never leaves a half-written state.
    pub fn save(&self) -> Result<()> {
        let path = self.dir().join("lab.json");
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &path).with_context(|| format!("save {}", path.display()))
    }

    /// Every namespace this lab owns, pods last.
    pub fn all_netns(&self) -> Vec<String> {
        let mut all: Vec<String> = self.routers.iter().map(|r| r.netns.clone()).collect();
        all.extend(self.nodes.iter().map(|n| n.netns.clone()));
        if self.real_nodes() {
            all.push(format!("{}-cp", self.name));
        }
        // A real Pod's namespace is its container's (a /proc path), not one of `ip netns`.
        all.extend(
            self.pods
                .iter()
                .filter(|p| !p.netns.starts_with('/'))
                .map(|p| p.netns.clone()),
        );
        all
    }
}
