//! Root: Services on a real cluster (`sepal lab up --kubernetes`), kube-proxy on every node in
//! each of its modes, Sepal as the network, a BIRD ToR outside:
//! - a pod reaches a ClusterIP Service's backends on the other nodes;
//! - the ToR reaches a NodePort, and with `externalTrafficPolicy: Local` the backend sees the
//!   ToR's own address as the client;
//! - an ExternalIP in the BGPConfiguration's `serviceExternalIPs` is advertised to the ToR, and a
//!   request from the ToR to it reaches a backend;
//! - a NetworkPolicy that admits only some clients to the backends holds through the ClusterIP
//!   (kube-proxy DNATs before Sepal's forward hook sees the packet), and cuts the flows it now
//!   denies that were established through the ClusterIP, to a backend on the client's own node
//!   (whose conntrack entry holds the ClusterIP) and to one on another node;
//! - egress policy is judged on the backend kube-proxy chose: a flow through the ClusterIP's port
//!   80 to a backend's allowed 8080 stays, and is cut once 8080 is no longer allowed;
//! - a node reaches its own isolated pods (kubelet's probes).

use sepal_tests::lab::{http_get_in, status_node, wait_for, KeepAlive, Lab};
use sepal_tests::require_root;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const EXTERNAL_IP: &str = "10.200.0.10";

const TOPOLOGY: &str = r#"
podCIDR: [10.244.0.0/16]
nodes: [{name: node1}, {name: node2}, {name: node3}]
routers: [{name: tor, kind: bird, asNumber: 65000}]
namespaces: [{name: shop}]
pods:
  - {namespace: shop, name: web-1, node: node1, labels: {app: web}, containerPorts: [{name: http, containerPort: 8080}]}
  - {namespace: shop, name: web-2, node: node2, labels: {app: web}, containerPorts: [{name: http, containerPort: 8080}]}
  - {namespace: shop, name: web-3, node: node3, labels: {app: web}, containerPorts: [{name: http, containerPort: 8080}]}
  - {namespace: shop, name: client, node: node1, labels: {role: client}}
  - {namespace: shop, name: friend, node: node1, labels: {role: friend}}
manifests:
  - apiVersion: sepal.dev/v1alpha1
    kind: BGPConfiguration
    metadata: {name: default}
    spec:
      asNumber: 64512
      nodeToNodeMesh: false
      keepaliveTime: 3s
      holdTime: 9s
      serviceExternalIPs: [{cidr: 10.200.0.0/24}]
  - apiVersion: v1
    kind: Service
    metadata: {name: web, namespace: shop}
    spec:
      selector: {app: web}
      ports: [{port: 80, targetPort: 8080}]
  - apiVersion: v1
    kind: Service
    metadata: {name: web-local, namespace: shop}
    spec:
      type: NodePort
      externalTrafficPolicy: Local
      selector: {app: web}
      ports: [{port: 80, targetPort: 8080}]
  - apiVersion: v1
    kind: Service
    metadata: {name: web-ext, namespace: shop}
    spec:
      selector: {app: web}
      externalIPs: [10.200.0.10]
      ports: [{port: 80, targetPort: 8080}]
"#;

const ONLY_FRIENDS: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-friends, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
    - from: [{podSelector: {matchLabels: {role: friend}}}]
      ports: [{port: 8080}]
"#;

/// The friend may send to the web backends on `port` only.
fn friend_egress(port: u16) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: friend-egress, namespace: shop}}\n\
         spec:\n  podSelector: {{matchLabels: {{role: friend}}}}\n  policyTypes: [Egress]\n  \
         egress: [{{to: [{{podSelector: {{matchLabels: {{app: web}}}}}}], ports: [{{port: {port}}}]}}]\n"
    )
}

/// A kept-alive connection from `netns` through `ip:80` that kube-proxy delivered to a backend
/// `wanted` accepts (new connections until one is), with that backend's name.
fn keep_alive_to(netns: &Path, ip: &str, wanted: impl Fn(&str) -> bool) -> (String, KeepAlive) {
    for _ in 0..60 {
        if let Ok(mut c) = KeepAlive::open(netns, ip, 80) {
            if let Ok(host) = c.get("/hostname") {
                let host = host.trim().to_string();
                if wanted(&host) {
                    return (host, c);
                }
            }
        }
    }
    panic!("no connection through {ip}:80 reached the wanted backend in 60 tries");
}

/// Pod `shop/NAME`'s entry in a `lab status --json`.
fn pod<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["namespace"] == "shop" && p["name"] == name)
        .unwrap_or_else(|| panic!("shop/{name} not in {status}"))
}

fn pod_ip(status: &Value, name: &str) -> String {
    pod(status, name)["ips"][0].as_str().unwrap().to_string()
}

fn pod_netns(status: &Value, name: &str) -> PathBuf {
    PathBuf::from(pod(status, name)["netns"].as_str().unwrap())
}

fn node_ip(status: &Value, node: &str) -> String {
    status_node(status, node)["addresses"][0]
        .as_str()
        .unwrap()
        .to_string()
}

/// The backends' names one client reaches through `ip:port`, over `tries` requests.
fn hostnames(netns: &Path, ip: &str, port: u16, tries: usize) -> BTreeSet<String> {
    (0..tries)
        .filter_map(|_| http_get_in(netns, ip, port, "/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .collect()
}

fn services_with_kube_proxy(mode: &str) {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let topology = dir.path().join("lab.yaml");
    std::fs::write(&topology, TOPOLOGY).unwrap();
    let name = format!("ks{}{}", &mode[..1], std::process::id());
    let started = std::time::Instant::now();
    let lab = Lab::up_with(
        &name,
        Some(&topology),
        &["--kubernetes", "--proxy-mode", mode],
    );
    eprintln!(
        "lab up --kubernetes --proxy-mode {mode}: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let status = lab.status();
    assert_eq!(status["proxyMode"], mode);
    let svc = |name: &str| lab.kubectl_json(&["get", "service", "-n", "shop", name]);
    let cluster_ip = svc("web")["spec"]["clusterIP"]
        .as_str()
        .unwrap()
        .to_string();
    let client = pod_netns(&status, "client");
    let tor = PathBuf::from(format!("/run/netns/{name}-tor"));

    // Pod → ClusterIP → backends, those on the other nodes included.
    let reached = wait_for(
        "client (node1) to reach web-2 and web-3 through the ClusterIP",
        || hostnames(&client, &cluster_ip, 80, 20),
        |seen| seen.contains("web-2") && seen.contains("web-3"),
    );
    eprintln!("{mode}: through {cluster_ip}:80 the client reached {reached:?}");

    // The ToR reaches a NodePort; with externalTrafficPolicy Local the backend sees the ToR.
    let node_port = svc("web-local")["spec"]["ports"][0]["nodePort"]
        .as_u64()
        .unwrap() as u16;
    let node2 = node_ip(&status, "node2");
    let seen = wait_for(
        "the ToR to reach node2's NodePort",
        || http_get_in(&tor, &node2, node_port, "/clientip"),
        |r| r.is_ok(),
    )
    .unwrap();
    let tor_link = node2.rsplit_once('.').unwrap().0.to_string() + ".1";
    assert_eq!(
        seen.trim().rsplit_once(':').unwrap().0,
        tor_link,
        "externalTrafficPolicy: Local keeps the client's address"
    );

    // The ExternalIP is advertised to the ToR over BGP, and a request to it reaches a backend.
    wait_for(
        "the ToR to learn a route to the ExternalIP",
        || {
            std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &format!("{name}-tor"),
                    "ip",
                    "route",
                    "show",
                    "proto",
                    "bird",
                ])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        },
        |routes| routes.contains("10.200.0."),
    );
    let via_external = wait_for(
        "the ToR to reach a backend at the ExternalIP",
        || hostnames(&tor, EXTERNAL_IP, 80, 5),
        |seen| !seen.is_empty(),
    );
    assert!(
        via_external.iter().all(|h| h.starts_with("web-")),
        "{via_external:?}"
    );

    // Established flows through the ClusterIP before any policy: the client's to a backend on
    // its own node (web-1, where node1's conntrack entry holds the ClusterIP) and to one on
    // another node, the friend's to any backend.
    let friend = pod_netns(&status, "friend");
    let same_node = keep_alive_to(&client, &cluster_ip, |h| h == "web-1");
    let cross_node = keep_alive_to(&client, &cluster_ip, |h| h != "web-1");
    let friends_flow = keep_alive_to(&friend, &cluster_ip, |_| true);

    // A NetworkPolicy admitting only friends holds through the ClusterIP, and revokes the
    // client's established flows: judged where kube-proxy delivered them, not by the ClusterIP.
    let policy = dir.path().join("only-friends.yaml");
    std::fs::write(&policy, ONLY_FRIENDS).unwrap();
    let applied = std::time::Instant::now();
    lab.apply(&policy, false);
    for (what, mut flow) in [("same-node", same_node), ("cross-node", cross_node)] {
        wait_for(
            &format!("the client's established {what} flow through the ClusterIP to be cut"),
            || flow.1.get("/hostname").is_err(),
            |cut| *cut,
        );
        eprintln!(
            "{mode}: the client's {what} flow to {} cut {:.1} s after the policy",
            flow.0,
            applied.elapsed().as_secs_f64()
        );
    }
    wait_for(
        "the client to be refused through the ClusterIP",
        || hostnames(&client, &cluster_ip, 80, 6),
        |seen| seen.is_empty(),
    );
    let (friend_backend, mut friends_flow) = friends_flow;
    assert_eq!(
        friends_flow.get("/hostname").as_deref().map(str::trim),
        Ok(friend_backend.as_str()),
        "the friend's allowed flow was cut"
    );
    // A node reaches its own pods whatever their policy (kubelet's probes): node1 -> web-1.
    let node1 = PathBuf::from(format!(
        "/run/netns/{}",
        status_node(&status, "node1")["netns"].as_str().unwrap()
    ));
    let web1_ip = pod_ip(&status, "web-1");
    assert_eq!(
        http_get_in(&node1, &web1_ip, 8080, "/hostname").map(|h| h.trim().to_string()),
        Ok("web-1".to_string()),
        "node1 cannot reach its own isolated pod"
    );

    // Egress: the friend may reach the backends on 8080 only. Its flow through the ClusterIP's
    // port 80 is delivered to 8080, so it stays; narrowed to 9999, it is cut.
    let egress = dir.path().join("friend-egress.yaml");
    std::fs::write(&egress, friend_egress(8080)).unwrap();
    lab.apply(&egress, false);
    std::thread::sleep(std::time::Duration::from_secs(3));
    assert_eq!(
        friends_flow.get("/hostname").as_deref().map(str::trim),
        Ok(friend_backend.as_str()),
        "an egress policy that allows the backend's port cut the friend's Service flow"
    );
    std::fs::write(&egress, friend_egress(9999)).unwrap();
    lab.apply(&egress, false);
    wait_for(
        "the friend's flow to be cut once its egress no longer allows it",
        || friends_flow.get("/hostname").is_err(),
        |cut| *cut,
    );
    std::fs::write(&egress, friend_egress(8080)).unwrap();
    lab.apply(&egress, false);
    let friends = wait_for(
        "the friend to reach every backend through the ClusterIP",
        || hostnames(&friend, &cluster_ip, 80, 20),
        |seen| seen.len() == 3,
    );
    assert_eq!(friends.len(), 3);
    // Never once did the client get through while the policy held.
    assert!(hostnames(&client, &cluster_ip, 80, 10).is_empty());

    lab.down_cleanly();
}

#[test]
fn services_with_kube_proxy_nftables() {
    services_with_kube_proxy("nftables");
}

#[test]
fn services_with_kube_proxy_iptables() {
    services_with_kube_proxy("iptables");
}
