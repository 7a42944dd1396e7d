// The Kubernetes datastore against a real API server (and its controllers), checked against the
// dir datastore: the objects the server holds, and every change to them, must give the same model
// in both (`sepal datastore` prints it). The agent reads as its own ServiceAccount, under the
// RBAC deploy/ ships.

use sepal_tests::kube::{Cluster, Cutter, Options};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Generous bound for things that happen in milliseconds; only guards against hanging forever.
const WAIT: Duration = Duration::from_secs(60);

/// A running `sepal datastore`, killed on drop; its stdout and stderr lines arrive on channels.
struct Inspect {
    child: Child,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
}

impl Drop for Inspect {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    rx
}

fn inspect(args: &[&str]) -> Inspect {
    let mut child = Command::new(sepal_tests::bin_path("sepal"))
        .arg("datastore")
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("SEPAL_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn sepal datastore");
    let out = lines(child.stdout.take().expect("stdout"));
    let err = lines(child.stderr.take().expect("stderr"));
    Inspect { child, out, err }
}

/// The model's objects from one printed line, in a stable order.
fn items(line: &str) -> Vec<String> {
    let v: Value = serde_json::from_str(line).expect("sepal datastore prints JSON");
    assert_eq!(v["synced"], json!(true), "{line}");
    let mut items: Vec<String> = v["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i.to_string())
        .collect();
    items.sort();
    items
}

/// The model the dir datastore builds from these objects.
fn dir_model(objects: &[Value]) -> Vec<String> {
    let dir = tempfile::tempdir().expect("tempdir");
    for (i, o) in objects.iter().enumerate() {
        std::fs::write(dir.path().join(format!("obj-{i}.json")), o.to_string()).expect("write");
    }
    let spec = format!("dir:{}", dir.path().display());
    let p = inspect(&["--datastore", &spec]);
    let line = p.out.recv_timeout(WAIT).unwrap_or_else(|_| {
        let err: Vec<String> = p.err.try_iter().collect();
        panic!("dir datastore printed no model: {}", err.join("\n"))
    });
    items(&line)
}

fn kube_inspect(kubeconfig: &Path, watch: bool) -> Inspect {
    let kc = kubeconfig.display().to_string();
    let mut args = vec!["--datastore", "kubernetes", "--kubeconfig", kc.as_str()];
    if watch {
        args.push("--watch");
    }
    inspect(&args)
}

/// What the API server holds of every kind the kube datastore watches, as the server returns it
/// (its defaults, metadata and controllers' objects included): the input of the dir side of
/// every comparison, so both datastores get the same objects.
fn dump(c: &Cluster) -> Vec<Value> {
    let mut all = c.list(
        "nodes,namespaces,pods,services,networkpolicies.networking.k8s.io,\
         endpointslices.discovery.k8s.io,bgpconfigurations.sepal.dev,bgppeers.sepal.dev",
        &[],
    );
    all.extend(c.list("secrets", &["-n", "sepal-system"]));
    // ClusterNetworkPolicies where the CRD is served (the server returns v1beta1, its storage
    // version; the model reads either).
    if let Ok(out) = c.try_kubectl(
        &[
            "get",
            "clusternetworkpolicies.policy.networking.k8s.io",
            "-o",
            "json",
        ],
        None,
    ) {
        let v: Value = serde_json::from_str(&out).expect("kubectl get json");
        all.extend(v["items"].as_array().cloned().unwrap_or_default());
    }
    all
}

/// A real control plane with Sepal installed and `objects` applied; and the agent's kubeconfig.
fn cluster_with(objects: &[Value], o: Options) -> (Cluster, PathBuf) {
    let c = Cluster::start_with(o);
    c.install_sepal();
    c.apply(objects);
    let kc = c.agent_kubeconfig(None);
    (c, kc)
}

/// The kube datastore watching the cluster (through `server`, e.g. a relay) once its model
/// matches the dir model of what the server holds.
fn watching(c: &Cluster, server: Option<&str>) -> Inspect {
    let kc = c.agent_kubeconfig(server);
    let p = kube_inspect(&kc, true);
    wait_for_model(c, &p);
    p
}

/// Waits until the kube side prints the model the dir datastore builds from what the server
/// holds. Controllers change objects on their own (EndpointSlices, Namespace labels), so the
/// server is read again until the two agree.
fn wait_for_model(c: &Cluster, p: &Inspect) {
    let deadline = std::time::Instant::now() + WAIT;
    let mut last = Vec::new();
    let mut want = Vec::new();
    while std::time::Instant::now() < deadline {
        want = dir_model(&dump(c));
        let round = std::time::Instant::now() + Duration::from_secs(3);
        while std::time::Instant::now() < round {
            match p.out.recv_timeout(Duration::from_millis(200)) {
                Ok(line) => last = items(&line),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if last == want {
                return;
            }
        }
    }
    let err: Vec<String> = p.err.try_iter().collect();
    // A datastore that died (a zombie until the guard reaps it) explains a silent model.
    let pid = p.child.id();
    let state = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    panic!(
        "kubernetes model never matched the dir model\nwant: {want:#?}\nlast: {last:#?}\n\
         sepal datastore ({pid}): {}\nstderr:\n{}",
        state
            .lines()
            .find(|l| l.starts_with("State"))
            .unwrap_or("gone"),
        err.join("\n")
    );
}

/// The resourceVersion a request asked for (0 when none).
fn uri_resource_version(uri: &str) -> u64 {
    uri.split(['?', '&'])
        .find_map(|kv| kv.strip_prefix("resourceVersion="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// A small cluster touching every kind the datastore watches, in the shape the model keeps.
fn cluster() -> Vec<Value> {
    vec![
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-1",
               "labels": {"topology.sepal.dev/rack": "a"}, "annotations": {"sepal.dev/as-number": "65001"}},
               "spec": {"podCIDRs": ["10.244.1.0/24"], "podCIDR": "10.244.1.0/24"},
               "status": {"addresses": [{"type": "InternalIP", "address": "10.0.1.2"}]}}),
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-2"},
               "spec": {"podCIDRs": ["10.244.2.0/24"]},
               "status": {"addresses": [{"type": "InternalIP", "address": "10.0.2.2"}]}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web", "labels": {"team": "a"}}}),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1", "namespace": "web", "labels": {"app": "web"}},
               "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": IMAGE, "ports": [{"name": "http", "containerPort": 80}]}]},
               "status": {"phase": "Running", "podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}]}}),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-2", "namespace": "web", "labels": {"app": "web"}},
               "spec": {"nodeName": "node-2", "containers": [{"name": "c", "image": IMAGE}]},
               "status": {"phase": "Running", "podIP": "10.244.2.5", "podIPs": [{"ip": "10.244.2.5"}]}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "web"},
               "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80, "targetPort": "http"}], "selector": {"app": "web"}}}),
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy", "metadata": {"name": "allow-web", "namespace": "web"},
               "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "policyTypes": ["Ingress"],
                        "ingress": [{"ports": [{"port": "http"}]}]}}),
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": {"name": "web-abc", "namespace": "web",
               "labels": {"kubernetes.io/service-name": "web"}}, "addressType": "IPv4",
               "endpoints": [{"addresses": ["10.244.1.5"], "nodeName": "node-1", "conditions": {"ready": true}}]}),
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bgp-passwords", "namespace": "sepal-system"},
               "type": "Opaque", "data": {"tor": "czNjcmV0"}}),
        json!({"apiVersion": "sepal.dev/v1alpha1", "kind": "BGPConfiguration", "metadata": {"name": "default"},
               "spec": {"asNumber": 64512, "nodeToNodeMesh": false}}),
        json!({"apiVersion": "sepal.dev/v1alpha1", "kind": "BGPPeer", "metadata": {"name": "tor"},
               "spec": {"peerIP": "10.0.1.1", "asNumber": 65000,
                        "password": {"secretKeyRef": {"name": "bgp-passwords", "key": "tor"}}}}),
        cnp("deny-db"),
    ]
}

/// A ClusterNetworkPolicy touching the experimental channel's fields (nodes peers, named ports).
fn cnp(name: &str) -> Value {
    json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
           "metadata": {"name": name, "labels": {"owner": "security"}},
           "spec": {"tier": "Admin", "priority": 10,
                    "subject": {"pods": {"namespaceSelector": {"matchLabels": {"team": "a"}},
                                         "podSelector": {}}},
                    "ingress": [{"name": "from-web", "action": "Accept",
                                 "from": [{"namespaces": {"matchLabels": {"team": "a"}}}],
                                 "protocols": [{"destinationNamedPort": "http"}]}],
                    "egress": [{"action": "Deny", "to": [{"nodes": {}}, {"networks": ["10.0.0.0/8"]}]}]}})
}

/// Pods need an image to be admitted; no kubelet ever pulls it.
const IMAGE: &str = "registry.k8s.io/pause:3.10";

fn pod(name: &str, node: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": "web"},
           "spec": {"nodeName": node, "containers": [{"name": "c", "image": IMAGE}]},
           "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})
}

#[test]
fn kube_initial_sync_matches_dir_and_strips_server_noise() {
    let (c, kc) = cluster_with(&cluster(), Options::default());
    // The same objects as kubectl's client-side apply leaves them: its copy of the whole object
    // in an annotation, on top of the server's own metadata (managedFields, uid, ...).
    let web = cluster()[3].clone();
    c.try_kubectl(&["apply", "-f", "-"], Some(&web.to_string()))
        .expect("client-side apply");
    let p = kube_inspect(&kc, false);
    wait_for_model(&c, &p);
    // Both datastores keep of the metadata only identity, labels and annotations, and not
    // kubectl's copy of the object; a ClusterNetworkPolicy also its generation and version,
    // which its status writer reads.
    for item in dir_model(&dump(&c)) {
        let v: Value = serde_json::from_str(&item).expect("json");
        let meta = v["metadata"].as_object().expect("metadata");
        let mut kept = vec!["name", "namespace", "labels", "annotations"];
        if v["kind"] == "ClusterNetworkPolicy" {
            kept.extend(["generation", "resourceVersion"]);
        }
        for k in meta.keys() {
            assert!(
                kept.contains(&k.as_str()),
                "the model kept metadata.{k}: {item}"
            );
        }
        assert!(
            !item.contains("last-applied-configuration"),
            "the model kept kubectl's copy: {item}"
        );
    }
}

#[test]
fn kube_changes_match_dir() {
    let (c, _kc) = cluster_with(&cluster(), Options::default());
    let p = watching(&c, None);

    // A sequence of changes on every path: modify, delete, add, and status-only changes (Pod
    // conditions, as kubelet writes them) that must not show in the model.
    let mut relabelled = cluster()[3].clone();
    relabelled["metadata"]["labels"]["app"] = json!("api");
    c.apply(&[relabelled]);
    c.delete("service", "web", "web");
    c.apply(&[
        json!({"apiVersion": "sepal.dev/v1alpha1", "kind": "BGPPeer", "metadata": {"name": "rr"},
                     "spec": {"peerIP": "10.0.0.9", "asNumber": 64512, "node": "node-2"}}),
    ]);
    let mut conditions = pod("web-2", "node-2", "10.244.2.5");
    conditions["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
    c.apply(&[conditions]);
    c.apply(&[json!({"apiVersion": "sepal.dev/v1alpha1", "kind": "BGPConfiguration",
                     "metadata": {"name": "default"}, "spec": {"asNumber": 64512, "nodeToNodeMesh": true}})]);
    let mut reprioritized = cnp("deny-db");
    reprioritized["spec"]["priority"] = json!(20);
    c.apply(&[reprioritized, cnp("second")]);
    wait_for_model(&c, &p);
    c.delete(
        "clusternetworkpolicies.policy.networking.k8s.io",
        "",
        "deny-db",
    );
    wait_for_model(&c, &p);
}

#[test]
fn kube_without_the_cnp_crd_syncs_and_picks_it_up_later() {
    // A cluster that never installed network-policy-api's CRD: the datastore syncs (there are
    // no ClusterNetworkPolicies) and says so once.
    let objects: Vec<Value> = cluster()
        .into_iter()
        .filter(|o| o["kind"] != "ClusterNetworkPolicy")
        .collect();
    let o = Options {
        without_cnp_crd: true,
        ..Default::default()
    };
    let (c, _kc) = cluster_with(&objects, o);
    let p = watching(&c, None);
    // The CRD installed later, with a policy: picked up at the next check (every 30 s).
    c.install_cnp_crd();
    c.apply(&[cnp("deny-db")]);
    wait_for_model(&c, &p);
    // The CRD removed (its policies go with it): the model has none again.
    c.kubectl(&[
        "delete",
        "crd",
        "clusternetworkpolicies.policy.networking.k8s.io",
        "--wait=true",
    ]);
    wait_for_model(&c, &p);
    // The watch ends with the CRD; the datastore goes back to checking for it.
    let absent = "serves no policy.networking.k8s.io/v1alpha2 ClusterNetworkPolicy";
    let mut log = Vec::new();
    let deadline = std::time::Instant::now() + WAIT;
    while log.iter().filter(|l: &&String| l.contains(absent)).count() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "not logged once at the start and once after the removal:\n{}",
            log.join("\n")
        );
        if let Ok(l) = p.err.recv_timeout(Duration::from_millis(200)) {
            log.push(l);
        }
    }
    assert!(
        log.iter()
            .any(|l| l.contains("the ClusterNetworkPolicy CRD is served now")),
        "{}",
        log.join("\n")
    );
    // Nothing was refused: the checks are one-object lists, under the same RBAC rule.
    let refused: Vec<Value> = c
        .agent_requests()
        .into_iter()
        .filter(|e| e["responseStatus"]["code"] == 403)
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
}

#[test]
fn kube_relists_after_410_gone() {
    // No watch cache: watches are served by etcd itself, so history compacted away is 410 Gone
    // for a watch resuming from before it, as on any server once its cache window is past.
    let o = Options {
        apiserver_args: vec!["--watch-cache=false".into()],
        ..Default::default()
    };
    let (c, _kc) = cluster_with(&cluster(), o);
    let relay = Cutter::start(c.api_addr(), None);
    let p = watching(&c, Some(&format!("https://{}", relay.addr)));

    // An outage: the agent's connections are cut and refused while a pod goes, another comes,
    // and etcd compacts its history. Only a relist can notice the deleted pod.
    relay.hold(true);
    relay.cut();
    c.delete("pod", "web", "web-2");
    c.apply(&[pod("web-3", "node-2", "10.244.2.7")]);
    c.compact_etcd();
    let loads_before = c.agent_loads("pods").len();
    relay.hold(false);
    wait_for_model(&c, &p);
    assert!(
        c.agent_loads("pods").len() > loads_before,
        "the datastore did not load pods again after 410 Gone"
    );
}

#[test]
fn kube_resumes_from_its_resource_version_and_from_bookmarks() {
    let (c, _kc) = cluster_with(&cluster(), Options::default());
    let relay = Cutter::start(c.api_addr(), None);
    let p = watching(&c, Some(&format!("https://{}", relay.addr)));
    let lists = c.agent_calls("list", "pods").len();

    // A dropped connection: the watch resumes from the last resourceVersion it saw, and a pod
    // added meanwhile arrives from the server's history, with no relist.
    relay.cut();
    c.apply(&[pod("web-9", "node-1", "10.244.1.9")]);
    wait_for_model(&c, &p);

    // Changes to other resources only. The API server's next bookmark on the pods watch (it
    // sends one about a minute into a watch) carries a resourceVersion newer than any pod's, and
    // after the next cut the watch resumes from there.
    let pod_rv: u64 = c.get("pod", "web", "web-9").expect("web-9")["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|v| v.parse().ok())
        .expect("resourceVersion");
    for i in 0..3 {
        c.kubectl(&["create", "namespace", &format!("other-{i}")]);
    }
    // A consistent list makes the API server's pods cache catch up with etcd's revision (it asks
    // etcd for progress); the cache's revision is what its next bookmark carries.
    c.kubectl(&["get", "pods", "-A"]);
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let mut last_cut = std::time::Instant::now();
    loop {
        let resumed = c
            .agent_calls("watch", "pods")
            .iter()
            .map(|u| uri_resource_version(u))
            .max()
            .unwrap_or(0);
        if resumed > pod_rv {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the pods watch never resumed from a bookmark (newest pod change {pod_rv}, newest resume {resumed})"
        );
        // A watch cut before its first bookmark learns nothing: give each one 70 s.
        if last_cut.elapsed() > Duration::from_secs(70) {
            relay.cut();
            last_cut = std::time::Instant::now();
        }
        std::thread::sleep(Duration::from_secs(2));
    }
    c.delete("pod", "web", "web-9");
    wait_for_model(&c, &p);
    assert_eq!(
        c.agent_calls("list", "pods").len(),
        lists,
        "pods were relisted instead of resumed"
    );
}

#[test]
fn kube_forbidden_resource_is_reported_and_blocks_ready() {
    let c = Cluster::start();
    c.install_sepal();
    c.apply(&cluster());
    // The shipped ClusterRole without its EndpointSlice rule: the API server answers 403.
    c.remove_rbac_rule("endpointslices");
    let kc = c.agent_kubeconfig(None);
    let p = kube_inspect(&kc, true);
    let deadline = std::time::Instant::now() + WAIT;
    let mut seen = Vec::new();
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "no forbidden error logged:\n{}",
            seen.join("\n")
        );
        if let Ok(l) = p.err.recv_timeout(Duration::from_millis(200)) {
            let hit = l.contains("forbidden") && l.contains("endpointslices");
            seen.push(l);
            if hit {
                break;
            }
        }
    }
    assert!(
        p.out.try_recv().is_err(),
        "the datastore reported a synced model while endpointslices were forbidden"
    );
    let denied = c.agent_requests().into_iter().any(|e| {
        e["objectRef"]["resource"] == "endpointslices" && e["responseStatus"]["code"] == 403
    });
    assert!(
        denied,
        "the API server did not audit a 403 for endpointslices"
    );
    // Restoring the shipped RBAC lets the backoff retry succeed, and only then is the model
    // complete.
    c.restore_rbac();
    wait_for_model(&c, &p);
}

/// The cluster plus `n` more pods, each with a label of its own.
fn with_pods(n: usize) -> Vec<Value> {
    let mut objects = cluster();
    for i in 0..n {
        let mut p = pod(
            &format!("p{i}"),
            "node-1",
            &format!("10.244.{}.{}", 100 + i / 250, 1 + i % 250),
        );
        p["metadata"]["labels"] = json!({"i": i.to_string()});
        objects.push(p);
    }
    objects
}

#[test]
fn kube_pods_stream_in_protobuf_and_match_dir() {
    // The default server (WatchList on): Pods come as one watch list in protobuf, every one
    // exactly once, with no list request at all; the other resources are streamed too.
    let (c, kc) = cluster_with(&with_pods(1100), Options::default());
    let p = kube_inspect(&kc, false);
    wait_for_model(&c, &p);
    assert!(
        c.agent_calls("list", "pods").is_empty(),
        "pods were listed, not streamed"
    );
    let streamed = c.agent_calls("watch", "pods");
    assert!(
        streamed
            .iter()
            .any(|u| u.contains("sendInitialEvents=true")),
        "no watch list of pods: {streamed:?}"
    );
    assert!(
        c.agent_calls("list", "nodes").is_empty(),
        "nodes were listed, not streamed"
    );
}

#[test]
fn kube_without_watch_list_pages_its_initial_lists() {
    // A server with WatchList off refuses streamed lists: the datastore falls back to paged JSON
    // lists (1,000 objects a page), and the continue tokens walk every page exactly once.
    let o = Options {
        apiserver_args: vec!["--feature-gates=WatchList=false".into()],
        ..Default::default()
    };
    let (c, kc) = cluster_with(&with_pods(1100), o);
    let p = kube_inspect(&kc, false);
    wait_for_model(&c, &p);
    let pages = c
        .agent_calls("list", "pods")
        .iter()
        .filter(|u| u.contains("continue="))
        .count();
    assert!(
        pages >= 1,
        "pods were not listed in pages: {:?} {:?}",
        c.agent_calls("list", "pods"),
        c.agent_calls("watch", "pods")
    );
    assert!(
        !c.agent_calls("list", "nodes").is_empty(),
        "nodes were not listed after the streamed list was refused"
    );
}
