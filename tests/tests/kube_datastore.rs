// The Kubernetes datastore against the stand-in API server, checked against the dir datastore: the
// same objects and the same changes must give the same model (`sepal datastore` prints it).

use sepal_tests::fakeapi::FakeApi;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
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
        .env("RUST_LOG", "info")
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

fn kube_inspect(api: &FakeApi, dir: &tempfile::TempDir, watch: bool) -> Inspect {
    let kc = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kc).expect("kubeconfig");
    let kc = kc.display().to_string();
    let mut args = vec!["--datastore", "kubernetes", "--kubeconfig", kc.as_str()];
    if watch {
        args.push("--watch");
    }
    inspect(&args)
}

/// The stand-in API server holding `objects`, and the kube datastore watching it once its model
/// matches them (the temporary directory holds its kubeconfig).
fn watching(objects: &[Value]) -> (FakeApi, tempfile::TempDir, Inspect) {
    let api = FakeApi::start();
    api.apply_all(objects.iter().cloned());
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = kube_inspect(&api, &tmp, true);
    wait_for_model(&p, &dir_model(objects));
    (api, tmp, p)
}

/// Waits until the kube side prints a model equal to `want`; panics with the last one otherwise.
fn wait_for_model(p: &Inspect, want: &[String]) {
    let deadline = std::time::Instant::now() + WAIT;
    let mut last = Vec::new();
    while std::time::Instant::now() < deadline {
        match p.out.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                last = items(&line);
                if last == want {
                    return;
                }
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let err: Vec<String> = p.err.try_iter().collect();
    panic!(
        "kubernetes model never matched the dir model\nwant: {want:#?}\nlast: {last:#?}\nstderr:\n{}",
        err.join("\n")
    );
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
               "spec": {"nodeName": "node-1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 80}]}]},
               "status": {"phase": "Running", "podIP": "10.244.1.5", "podIPs": [{"ip": "10.244.1.5"}]}}),
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-2", "namespace": "web", "labels": {"app": "web"}},
               "spec": {"nodeName": "node-2", "containers": [{"name": "c"}]},
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
    ]
}

fn key(o: &Value) -> (String, String, String) {
    (
        o["kind"].as_str().unwrap_or_default().to_string(),
        o["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        o["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

/// The same objects as a real API server and `kubectl apply` would leave them: server metadata,
/// kubectl's copy of the object, status conditions, container details. None of it is in the model.
fn noisy(objects: &[Value]) -> Vec<Value> {
    objects
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let applied = o.to_string();
            let mut o = o.clone();
            let meta = &mut o["metadata"];
            meta["uid"] = json!(format!("0000-{i}"));
            meta["resourceVersion"] = json!("12345");
            meta["generation"] = json!(3);
            meta["creationTimestamp"] = json!("2026-01-01T00:00:00Z");
            meta["managedFields"] = json!([{"manager": "kubectl", "operation": "Apply"}]);
            meta["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] =
                json!(applied);
            match o["kind"].as_str() {
                Some("Node") => {
                    o["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
                    o["status"]["images"] = json!([{"names": ["x"], "sizeBytes": 1}]);
                }
                Some("Pod") => {
                    o["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
                    o["status"]["hostIP"] = json!("10.0.1.2");
                    o["spec"]["containers"][0]["image"] = json!("nginx:1");
                    o["spec"]["containers"][0]["env"] = json!([{"name": "A", "value": "B"}]);
                    o["spec"]["restartPolicy"] = json!("Always");
                }
                _ => {}
            }
            o
        })
        .collect()
}

#[test]
fn both_datastores_strip_server_noise_alike() {
    let clean = cluster();
    let want = dir_model(&clean);
    let objects = noisy(&clean);
    assert_eq!(dir_model(&objects), want, "the dir datastore kept noise");
    let api = FakeApi::start();
    api.apply_all(objects);
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = kube_inspect(&api, &tmp, false);
    wait_for_model(&p, &want);
}

#[test]
fn kube_initial_sync_matches_dir() {
    let objects = cluster();
    let want = dir_model(&objects);
    assert_eq!(want.len(), objects.len());
    let api = FakeApi::start();
    api.apply_all(objects.iter().cloned());
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = kube_inspect(&api, &tmp, false);
    wait_for_model(&p, &want);
}

#[test]
fn kube_changes_match_dir() {
    let mut objects = cluster();
    let (api, _tmp, p) = watching(&objects);

    // A sequence of changes on every path: modify, delete, add, and server-side noise (status
    // conditions, managed fields) that must not show in the model.
    objects[3]["metadata"]["labels"]["app"] = json!("api");
    api.apply(objects[3].clone());
    let gone = objects.remove(5);
    api.delete("Service", "web", "web");
    let _ = gone;
    let extra = json!({"apiVersion": "sepal.dev/v1alpha1", "kind": "BGPPeer", "metadata": {"name": "rr"},
                       "spec": {"peerIP": "10.0.0.9", "asNumber": 64512, "node": "node-2"}});
    objects.push(extra.clone());
    api.apply(extra);
    let mut noisy = objects[4].clone();
    noisy["status"]["conditions"] = json!([{"type": "Ready", "status": "True"}]);
    noisy["metadata"]["managedFields"] = json!([{"manager": "kubelet"}]);
    api.apply(noisy);
    let idx = objects
        .iter()
        .position(|o| key(o).0 == "BGPConfiguration")
        .expect("config");
    objects[idx]["spec"]["nodeToNodeMesh"] = json!(true);
    api.apply(objects[idx].clone());
    wait_for_model(&p, &dir_model(&objects));
}

#[test]
fn kube_relists_after_410_gone() {
    let mut objects = cluster();
    let (api, _tmp, p) = watching(&objects);

    // During an outage objects change and history is compacted: resuming from the old
    // resourceVersion gets 410, and only a relist can notice the deleted pod.
    api.set_unavailable(true);
    api.cut_watches();
    let idx = objects
        .iter()
        .position(|o| key(o) == ("Pod".into(), "web".into(), "web-2".into()))
        .expect("pod");
    objects.remove(idx);
    api.delete("Pod", "web", "web-2");
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-3", "namespace": "web"},
                     "spec": {"nodeName": "node-2", "containers": [{"name": "c"}]},
                     "status": {"phase": "Pending"}});
    objects.push(pod.clone());
    api.apply(pod);
    api.compact();
    let lists_before = api.requests("list", "pods");
    api.set_unavailable(false);
    wait_for_model(&p, &dir_model(&objects));
    assert!(
        api.requests("list", "pods") > lists_before,
        "the datastore did not relist pods after 410 Gone"
    );
}

#[test]
fn kube_resumes_from_its_resource_version_and_from_bookmarks() {
    let mut objects = cluster();
    let (api, _tmp, p) = watching(&objects);
    let lists = api.requests("list", "pods");

    // A dropped connection: the watch resumes from the last resourceVersion it saw, and a pod
    // added meanwhile arrives from the server's history, with no relist.
    api.cut_watches();
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-9", "namespace": "web"},
                     "spec": {"nodeName": "node-1", "containers": [{"name": "c"}]},
                     "status": {"phase": "Running", "podIP": "10.244.1.9"}});
    objects.push(pod.clone());
    api.apply(pod);
    wait_for_model(&p, &dir_model(&objects));

    // Changes to other resources only: the pods watch learns the newer resourceVersion from the
    // bookmark at its (re)start, and resumes from it next time...
    for i in 0..3 {
        api.apply(json!({"apiVersion": "v1", "kind": "Secret",
                         "metadata": {"name": format!("s{i}"), "namespace": "other"}}));
    }
    let newest = api.resource_version();
    let deadline = std::time::Instant::now() + WAIT;
    while api.last_watch_from("pods").unwrap_or(0) < newest {
        assert!(
            std::time::Instant::now() < deadline,
            "the pods watch never resumed from the bookmark's resourceVersion {newest}: {:?}",
            api.last_watch_from("pods")
        );
        api.cut_watches();
        std::thread::sleep(Duration::from_millis(200));
    }
    // ...so history compacted after that is no 410 for it: still no relist of pods.
    api.compact();
    api.cut_watches();
    let removed = objects.pop().expect("web-9");
    let _ = removed;
    api.delete("Pod", "web", "web-9");
    wait_for_model(&p, &dir_model(&objects));
    assert_eq!(
        api.requests("list", "pods"),
        lists,
        "pods were relisted instead of resumed"
    );
}

#[test]
fn kube_forbidden_resource_is_reported_and_blocks_ready() {
    let api = FakeApi::start();
    let objects = cluster();
    api.apply_all(objects.iter().cloned());
    api.forbid("endpointslices");
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = kube_inspect(&api, &tmp, true);
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
    // Fixing RBAC lets the backoff retry succeed, and only then is the model complete.
    api.allow("endpointslices");
    wait_for_model(&p, &dir_model(&objects));
}

#[test]
fn kube_paged_initial_list_matches_dir() {
    // More pods than one list page (kube's watcher asks for 500 at a time): the continue tokens
    // must walk every page exactly once.
    let mut objects = cluster();
    for i in 0..1234 {
        objects.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("p{i}"), "namespace": "web", "labels": {"i": i.to_string()}},
            "spec": {"nodeName": "node-1", "containers": [{"name": "c"}]},
            "status": {"phase": "Running", "podIP": format!("10.244.{}.{}", 100 + i / 250, 1 + i % 250)}}));
    }
    let want = dir_model(&objects);
    let api = FakeApi::start();
    api.apply_all(objects.iter().cloned());
    let tmp = tempfile::tempdir().expect("tempdir");
    let p = kube_inspect(&api, &tmp, false);
    wait_for_model(&p, &want);
    assert!(
        api.requests("list", "pods") >= 3,
        "pods were not listed in pages"
    );
}
