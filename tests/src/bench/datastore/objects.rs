// The cluster the datastore bench loads: Nodes, Namespaces, Pods, Services and NetworkPolicies
// shaped as kubelet and users write them. Pure functions of the sizes, so every run loads the
// same cluster.
//
// Addressing: the bench's control plane runs node IPAM over CLUSTER_CIDR, a /10 split into
// /26s (65,536 of them, IPAM's most); each Node brings its own /26 there (IPAM then only marks
// it used) and its Pods take addresses from it, as a real cluster's would. 5,000 Nodes at 30
// Pods each fit with room to spare; a /16 would hold 1,024 Nodes.
//
// Selection: Pod p carries app-(p mod services), in that app's namespace, so each Service selects
// its own Pods (every Pod is behind exactly one Service, 15 each at the default sizes) and the
// EndpointSlices the controller makes hold every Pod once, as in a typical cluster.

use serde_json::{json, Value};

pub const NAMESPACES: usize = 50;
/// The Node the measured agent runs as.
pub const AGENT_NODE: &str = "node-0";
/// The pod range the control plane's node IPAM splits, and the size of each Node's share.
pub const CLUSTER_CIDR: &str = "10.128.0.0/10";
pub const NODE_MASK: u8 = 26;
/// Nodes that fit in CLUSTER_CIDR at a /26 each (node addresses 172.16.0.0/16 hold as many).
pub const MAX_NODES: usize = 65_536;
/// Addresses of a /26 a Pod gets: .2 to .62 (not the network, the first host, the broadcast).
pub const MAX_PODS_PER_NODE: usize = 61;

#[derive(Debug, Clone, Copy)]
pub struct Sizes {
    pub nodes: usize,
    pub pods: usize,
    pub policies: usize,
    pub services: usize,
}

impl Sizes {
    pub fn objects(&self) -> usize {
        self.nodes + NAMESPACES + self.pods + self.policies + self.services
    }
}

const TIME: &str = "2026-01-01T00:00:00Z";

fn node_name(n: usize) -> String {
    format!("node-{n}")
}

/// The first address of node n's /26 in CLUSTER_CIDR.
fn node_base(n: usize) -> [usize; 4] {
    let quads = n / 4;
    [10, 128 + quads / 256, quads % 256, (n % 4) * 64]
}

fn node_ip(n: usize) -> String {
    format!("172.16.{}.{}", n / 256, n % 256)
}

/// The app index of Pod p; its namespace follows from it.
fn app_of(s: &Sizes, p: usize) -> usize {
    p % s.services.max(1)
}

fn namespace_of_app(app: usize) -> String {
    format!("ns-{}", app % NAMESPACES)
}

pub fn namespace(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": format!("ns-{i}"), "labels": {"team": format!("t{}", i % 7)}}})
}

/// A Node as kubelet registers it: addresses, capacity, conditions, images (status comes with the
/// create for Nodes); spec.podCIDRs preset (see the module comment).
pub fn node(n: usize) -> Value {
    let [a, b, c, d] = node_base(n);
    let name = node_name(n);
    json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64", "topology.sepal.dev/rack": format!("r{}", n / 40)}},
        "spec": {"podCIDR": format!("{a}.{b}.{c}.{d}/26"), "podCIDRs": [format!("{a}.{b}.{c}.{d}/26")]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": node_ip(n)}, {"type": "Hostname", "address": name}],
            "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110", "ephemeral-storage": "100Gi"},
            "allocatable": {"cpu": "7800m", "memory": "31Gi", "pods": "110", "ephemeral-storage": "95Gi"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady", "message": "kubelet is posting ready status",
                "lastHeartbeatTime": TIME, "lastTransitionTime": TIME}],
            "nodeInfo": {"machineID": "0123456789abcdef", "systemUUID": "0123-4567", "bootID": "89ab-cdef",
                "kernelVersion": "6.12.0", "osImage": "Debian GNU/Linux 13", "containerRuntimeVersion": "containerd://2.1.0",
                "kubeletVersion": "v1.36.3", "kubeProxyVersion": "", "operatingSystem": "linux", "architecture": "amd64"},
            "images": [{"names": ["registry.example/app@sha256:0123456789abcdef", "registry.example/app:1.2.3"], "sizeBytes": 123456789},
                       {"names": ["registry.example/sidecar@sha256:fedcba9876543210", "registry.example/sidecar:0.9"], "sizeBytes": 23456789}]}})
}

/// Pod p without its status (the create; admission adds the ServiceAccount volume, QoS class,
/// tolerations) and its status as kubelet then writes it through the status subresource.
pub fn pod(s: &Sizes, p: usize) -> (Value, Value) {
    let n = p % s.nodes;
    let [a, b, c, d] = node_base(n);
    let ip = format!("{a}.{b}.{c}.{}", d + 2 + p / s.nodes);
    let app = app_of(s, p);
    let pod = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("app-{p}-7d9f8b6c5-x2k4q"), "namespace": namespace_of_app(app),
            "labels": {"app": format!("app-{app}"), "pod-template-hash": "7d9f8b6c5", "tier": "backend"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": TIME}},
        "spec": {"nodeName": node_name(n), "serviceAccountName": "default", "restartPolicy": "Always",
            "containers": [{"name": "app", "image": "registry.example/app:1.2.3",
                "env": [{"name": "MODE", "value": "production"}, {"name": "LOG", "value": "info"}],
                "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "256Mi"}},
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 10}}]}});
    let ready = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": TIME});
    let status = json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
        "hostIP": node_ip(n), "hostIPs": [{"ip": node_ip(n)}], "startTime": TIME,
        "conditions": [ready("PodReadyToStartContainers"), ready("Initialized"), ready("Ready"),
                       ready("ContainersReady"), ready("PodScheduled")],
        "containerStatuses": [{"name": "app", "ready": true, "started": true, "restartCount": 0,
            "image": "registry.example/app:1.2.3", "imageID": "registry.example/app@sha256:0123456789abcdef",
            "containerID": format!("containerd://{p:064x}"), "state": {"running": {"startedAt": TIME}}}]});
    (pod, status)
}

pub fn service(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": format!("svc-{i}"), "namespace": namespace_of_app(i)},
        "spec": {"type": "ClusterIP", "selector": {"app": format!("app-{i}")},
            "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}})
}

pub fn policy(s: &Sizes, i: usize) -> Value {
    let app = i % s.services.max(1);
    json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": format!("policy-{i}"), "namespace": namespace_of_app(app)},
        "spec": {"podSelector": {"matchLabels": {"app": format!("app-{app}")}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", i % 7)}}},
                                  {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}],
                         "ports": [{"port": "http", "protocol": "TCP"}]}]}})
}

/// Pods the EndpointSlices should list once the controller has caught up.
pub fn expected_endpoints(s: &Sizes) -> usize {
    if s.services == 0 {
        0
    } else {
        s.pods
    }
}

/// Pod p's replacement in churn round `round`: the same Pod (node, address, app) under a new
/// name, as a Deployment's rollout replaces it.
pub fn replacement(s: &Sizes, p: usize, round: usize) -> (Value, Value) {
    let (mut pod, status) = pod(s, p);
    pod["metadata"]["name"] = json!(format!("app-{p}-7d9f8b6c5-r{round}"));
    (pod, status)
}

/// The Pods churn round `round` replaces: `count` original Pods, each on a different Node where
/// the cluster has that many (never the agent's own node-0), and none replaced by an earlier
/// round. Walks the Pods off node-0 by (slot, node), so consecutive Pods sit on consecutive Nodes.
pub fn churned(s: &Sizes, round: usize, count: usize) -> Vec<usize> {
    let others = s.nodes.saturating_sub(1).max(1);
    (round * count..(round + 1) * count)
        .map(|i| {
            let (slot, node) = (i / others, 1 + i % others);
            (slot * s.nodes + node.min(s.nodes - 1)) % s.pods
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use std::net::Ipv4Addr;

    const LIMITS: Sizes = Sizes {
        nodes: 5000,
        pods: 150_000,
        policies: 5000,
        services: 10_000,
    };

    fn cidr_of(node: &Value) -> (Ipv4Addr, u8) {
        let c = node["spec"]["podCIDR"].as_str().unwrap();
        let (ip, len) = c.split_once('/').unwrap();
        (ip.parse().unwrap(), len.parse().unwrap())
    }

    #[test]
    fn every_node_gets_its_own_slash_26_inside_the_cluster_cidr() {
        let (net, len) = CLUSTER_CIDR.split_once('/').unwrap();
        let (net, len): (Ipv4Addr, u32) = (net.parse().unwrap(), len.parse().unwrap());
        let mask = u32::MAX << (32 - len);
        let mut seen = BTreeSet::new();
        for n in [0, 1, 1023, 1024, 4999, MAX_NODES - 1] {
            let (ip, l) = cidr_of(&node(n));
            assert_eq!(l, NODE_MASK);
            assert_eq!(u32::from(ip) & mask, u32::from(net), "node {n}: {ip}");
            assert_eq!(
                u32::from(ip) % 64,
                0,
                "node {n}: {ip} is not a /26's first address"
            );
            assert!(seen.insert(ip), "node {n}: {ip} twice");
        }
    }

    #[test]
    fn pods_take_addresses_of_their_nodes_block() {
        for p in [0, 4999, 5000, 149_999] {
            let (pod, status) = pod(&LIMITS, p);
            let node = node(p % LIMITS.nodes);
            assert_eq!(pod["spec"]["nodeName"], node["metadata"]["name"]);
            let (block, _) = cidr_of(&node);
            let ip: Ipv4Addr = status["podIP"].as_str().unwrap().parse().unwrap();
            let offset = u32::from(ip) - u32::from(block);
            assert!((2..=62).contains(&offset), "pod {p}: {ip} in {block}/26");
        }
    }

    #[test]
    fn a_churn_round_spreads_over_distinct_nodes_never_the_agents_and_rounds_differ() {
        let mut all = BTreeSet::new();
        for round in 0..6 {
            let pods = churned(&LIMITS, round, 500);
            let nodes: BTreeSet<usize> = pods.iter().map(|p| p % LIMITS.nodes).collect();
            assert_eq!(nodes.len(), 500);
            assert!(!nodes.contains(&0));
            for p in pods {
                assert!(p < LIMITS.pods);
                assert!(all.insert(p), "pod {p} churned twice");
            }
        }
    }
}
