//! The model's pod: only what policy and routing read, so 100k pods fit in a few tens of MiB. Both
//! datastores convert to it as objects arrive; the full Pod never stays in memory.

use super::wire::PodWire;
use sepal_felix::policy::{NamedPort, Pod, Protocol};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

/// Pod labels, shared between pods with the same set (a Deployment's replicas all have one).
pub type Labels = Arc<BTreeMap<String, String>>;

/// `status.phase`; absent or unknown spellings are `Unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodPhase {
    Pending,
    Running,
    Succeeded,
    Failed,
    #[default]
    Unknown,
}

impl PodPhase {
    fn from_api(s: &str) -> PodPhase {
        match s {
            "Pending" => PodPhase::Pending,
            "Running" => PodPhase::Running,
            "Succeeded" => PodPhase::Succeeded,
            "Failed" => PodPhase::Failed,
            _ => PodPhase::Unknown,
        }
    }

    fn api(self) -> &'static str {
        match self {
            PodPhase::Pending => "Pending",
            PodPhase::Running => "Running",
            PodPhase::Succeeded => "Succeeded",
            PodPhase::Failed => "Failed",
            PodPhase::Unknown => "Unknown",
        }
    }
}

/// A pod as policy and routing see it: what NetworkPolicy reads, in felix's type (reached
/// through `Deref`), plus what only the agent reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodInfo {
    /// Namespace (shared with the namespace's other pods, see `Interner`), name (shared with the
    /// model's key of the pod), labels, IPs (`status.podIPs`, else `status.podIP`; empty until
    /// kubelet reports them) and named container ports (`containers[].ports[]` with a `name`;
    /// unnamed ones are not kept, nothing refers to them). The policy engine holds this same
    /// `Arc`: the cluster's pods are not copied for it.
    pub policy: Arc<Pod>,
    /// `spec.nodeName`; `None` while unscheduled. Shared with the node's other pods.
    pub node: Option<Arc<str>>,
    pub phase: PodPhase,
    /// `metadata.deletionTimestamp` is set: the pod is terminating.
    pub deleting: bool,
    pub host_network: bool,
}

impl std::ops::Deref for PodInfo {
    type Target = Pod;

    fn deref(&self) -> &Pod {
        &self.policy
    }
}

fn protocol_api(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "TCP",
        Protocol::Udp => "UDP",
        Protocol::Sctp => "SCTP",
    }
}

impl PodInfo {
    /// The compact form of a Pod. Namespaced like the API server does (`default` when unset);
    /// `None` without a name. IPs that do not parse are left out (the API server validates them).
    pub fn from_wire(pod: PodWire) -> Option<PodInfo> {
        let PodWire {
            metadata: meta,
            spec,
            status,
        } = pod;
        let name = meta.name.filter(|n| !n.is_empty())?;
        let mut ips: Vec<IpAddr> = status
            .pod_ips
            .iter()
            .filter_map(|ip| ip.ip.parse().ok())
            .collect();
        if ips.is_empty() {
            ips.extend(status.pod_ip.and_then(|ip| ip.parse::<IpAddr>().ok()));
        }
        let ports = spec
            .containers
            .iter()
            .flat_map(|c| c.ports.iter())
            .filter_map(|p| {
                Some(NamedPort {
                    name: p.name.as_deref()?.into(),
                    protocol: Protocol::from_api(p.protocol.as_deref().unwrap_or("TCP"))?,
                    port: u16::try_from(p.container_port).ok()?,
                })
            })
            .collect();
        let policy = Pod {
            namespace: super::wire::namespace_of(meta.namespace.as_deref()),
            name: name.into(),
            labels: Arc::new(meta.labels.unwrap_or_default()),
            ips,
            host_iface: None,
            ports,
            host_network: spec.host_network.unwrap_or(false),
        };
        Some(PodInfo {
            policy: Arc::new(policy),
            node: spec
                .node_name
                .as_deref()
                .filter(|n| !n.is_empty())
                .map(Arc::from),
            phase: status
                .phase
                .as_deref()
                .map_or(PodPhase::Unknown, PodPhase::from_api),
            deleting: meta.deletion_timestamp.is_some(),
            host_network: spec.host_network.unwrap_or(false),
        })
    }

    /// The pod as a (reduced) Pod object, for `sepal datastore`; reading it back with
    /// `Object::from_value` gives the same `PodInfo`.
    pub fn to_value(&self) -> Value {
        let mut meta = json!({"name": &*self.name, "namespace": &*self.namespace});
        if !self.labels.is_empty() {
            meta["labels"] = json!(&*self.labels);
        }
        if self.deleting {
            // The time is not kept; only that the pod is terminating.
            meta["deletionTimestamp"] = json!("1970-01-01T00:00:00Z");
        }
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| json!({"name": &*p.name, "containerPort": p.port, "protocol": protocol_api(p.protocol)}))
            .collect();
        let mut spec = json!({"containers": [{"name": "", "ports": ports}]});
        if let Some(n) = &self.node {
            spec["nodeName"] = json!(&**n);
        }
        if self.host_network {
            spec["hostNetwork"] = json!(true);
        }
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| json!({"ip": ip.to_string()}))
            .collect();
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec,
               "status": {"phase": self.phase.api(), "podIPs": ips}})
    }
}

/// Shares equal label sets and names between pods: with many replicas per Deployment and many pods
/// per namespace and node, one copy each instead of one per pod. Entries nothing else holds are
/// dropped once the table has doubled since the last sweep, so churn does not grow it.
#[derive(Debug, Default, Clone)]
pub struct Interner {
    labels: std::collections::HashSet<Labels>,
    ports: std::collections::HashSet<Arc<[NamedPort]>>,
    names: std::collections::HashSet<Arc<str>>,
    live_after_sweep: usize,
}

impl Interner {
    /// Replaces the pod's shareable parts by the shared copies.
    pub fn intern(&mut self, pod: &mut PodInfo) {
        // A pod fresh from its datastore: its policy view is not shared yet.
        if let Some(p) = Arc::get_mut(&mut pod.policy) {
            p.labels = Self::share(&mut self.labels, &p.labels);
            if !p.ports.is_empty() {
                p.ports = Self::share(&mut self.ports, &p.ports);
            }
            p.namespace = Self::share(&mut self.names, &p.namespace);
        }
        if let Some(node) = &pod.node {
            pod.node = Some(Self::share(&mut self.names, node));
        }
        if self.labels.len() + self.ports.len() + self.names.len() > 2 * self.live_after_sweep + 64
        {
            self.sweep();
        }
    }

    /// The same for a slice's namespace and node names.
    pub fn intern_slice(&mut self, slice: &mut super::SliceInfo) {
        slice.namespace = Self::share(&mut self.names, &slice.namespace);
        for node in &mut slice.ready_nodes {
            *node = Self::share(&mut self.names, node);
        }
    }

    fn share<T: ?Sized + Eq + std::hash::Hash>(
        set: &mut std::collections::HashSet<Arc<T>>,
        v: &Arc<T>,
    ) -> Arc<T> {
        match set.get(v) {
            Some(shared) => shared.clone(),
            None => {
                set.insert(v.clone());
                v.clone()
            }
        }
    }

    /// Drops the entries only the table holds.
    fn sweep(&mut self) {
        self.labels.retain(|l| Arc::strong_count(l) > 1);
        self.ports.retain(|p| Arc::strong_count(p) > 1);
        self.names.retain(|n| Arc::strong_count(n) > 1);
        self.live_after_sweep = self.labels.len() + self.ports.len() + self.names.len();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.labels.len() + self.ports.len() + self.names.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(v: Value) -> PodInfo {
        PodInfo::from_wire(serde_json::from_value(v).unwrap()).unwrap()
    }

    #[test]
    fn keeps_only_what_policy_and_routing_read() {
        let p = pod(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "resourceVersion": "7",
                         "labels": {"app": "web"}, "annotations": {"a": "b"},
                         "deletionTimestamp": "2026-01-01T00:00:00Z",
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"nodeName": "n1", "hostNetwork": false,
                     "containers": [{"name": "c", "image": "nginx",
                     "ports": [{"name": "http", "containerPort": 80}, {"containerPort": 81},
                               {"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]},
            "status": {"phase": "Running", "podIP": "10.244.1.5",
                       "podIPs": [{"ip": "10.244.1.5"}, {"ip": "fd00::5"}],
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }));
        assert_eq!(&*p.namespace, "ns");
        assert_eq!(p.node.as_deref(), Some("n1"));
        assert_eq!(p.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(
            p.ips,
            vec![
                "10.244.1.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        let ports: Vec<(&str, Protocol, u16)> = p
            .ports
            .iter()
            .map(|p| (&*p.name, p.protocol, p.port))
            .collect();
        assert_eq!(
            ports,
            vec![("http", Protocol::Tcp, 80), ("dns", Protocol::Udp, 53)]
        );
        assert_eq!(p.phase, PodPhase::Running);
        assert!(p.deleting && !p.host_network);
    }

    #[test]
    fn defaults_and_round_trip() {
        let bare = pod(json!({"metadata": {"name": "p"}}));
        assert_eq!(&*bare.namespace, "default");
        assert_eq!((bare.node.clone(), bare.phase), (None, PodPhase::Unknown));
        // Only podIP (older kubelets): still one IP.
        let old = pod(json!({"metadata": {"name": "p"}, "status": {"podIP": "10.0.0.1"}}));
        assert_eq!(old.ips.len(), 1);
        let full = pod(
            json!({"metadata": {"name": "p", "namespace": "x", "labels": {"a": "b"},
            "deletionTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"nodeName": "n", "hostNetwork": true, "containers": [{"name": "c",
                     "ports": [{"name": "h", "containerPort": 1, "protocol": "SCTP"}]}]},
            "status": {"phase": "Pending", "podIPs": [{"ip": "10.0.0.1"}]}}),
        );
        for p in [bare, old, full] {
            assert_eq!(pod(p.to_value()), p);
        }
        assert!(
            PodInfo::from_wire(serde_json::from_value(json!({"metadata": {}})).unwrap()).is_none()
        );
    }

    #[test]
    fn interner_shares_and_forgets() {
        let mut i = Interner::default();
        let mk = |n: usize| {
            pod(
                json!({"metadata": {"name": format!("p{n}"), "namespace": "ns",
                "labels": {"app": "web"}}, "spec": {"nodeName": "n1", "containers": []}}),
            )
        };
        let mut a = mk(1);
        let mut b = mk(2);
        i.intern(&mut a);
        i.intern(&mut b);
        assert!(Arc::ptr_eq(&a.labels, &b.labels));
        assert!(Arc::ptr_eq(&a.namespace, &b.namespace));
        assert!(Arc::ptr_eq(
            a.node.as_ref().unwrap(),
            b.node.as_ref().unwrap()
        ));
        drop((a, b));
        // Many distinct, short-lived label sets: the table is swept instead of growing.
        for n in 0..1000 {
            let mut p = mk(n);
            Arc::make_mut(&mut p.policy).labels =
                Arc::new([("n".to_string(), n.to_string())].into());
            i.intern(&mut p);
        }
        assert!(i.len() < 200, "interner kept {} entries", i.len());
    }
}
