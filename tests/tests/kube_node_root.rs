//! Root: one real kubelet node (containerd 2, runc, kubelet and kube-proxy from
//! scripts/kube-build) in a network namespace, registered with a real control plane running in
//! the same namespace, Ready with Debian's ptp + host-local plugins, running an agnhost Pod from
//! the lab's own image (no registry) that answers HTTP on its Pod IP and through a ClusterIP
//! Service (kube-proxy, nftables mode); `kubectl logs` and `exec` reach it; and once the node is stopped, nothing of it is
//! left: no process, no mount under its directory, no cgroup. A kubelet that fails takes the
//! half-started node down with an error naming it and its log.

use sepal_tests::kube::{kube_bin_dir, Cluster, Options};
use sepal_tests::kubelet::{ptp_conflist, KubeletNode, NodeOptions};
use sepal_tests::lab::{http_get_in, processes_mentioning, wait_for};
use sepal_tests::netns::{veth, Netns};
use sepal_tests::require_root;
use serde_json::{json, Value};
use std::path::Path;

fn mounts_under(dir: &Path) -> Vec<String> {
    mounts_seen_by("self", dir)
}

/// Mounts under `dir` in the mount namespace of process `pid` ("self": this one).
fn mounts_seen_by(pid: &str, dir: &Path) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
        .filter(|m| Path::new(m).starts_with(dir))
        .collect()
}

fn cgroup_left(cgroup: &str) -> Vec<String> {
    ["memory", "pids", "cpu", "unified", "systemd"]
        .iter()
        .map(|h| format!("/sys/fs/cgroup/{h}{cgroup}"))
        .filter(|p| Path::new(p).exists())
        .collect()
}

#[test]
fn one_kubelet_node_runs_a_pod() {
    require_root();
    for b in ["kubelet", "containerd", "agnhost", "pause"] {
        assert!(
            kube_bin_dir().join(b).is_file(),
            "{b} missing in {}: run scripts/kube-build",
            kube_bin_dir().display()
        );
    }
    // The node's namespace, with an uplink so it has an InternalIP of its own.
    let node_ns = Netns::new("kn");
    let up_ns = Netns::new("ku");
    veth(&node_ns, "eth0", &up_ns, "up0");
    node_ns.run("ip addr add 10.0.9.2/24 dev eth0; ip route add default via 10.0.9.1");
    up_ns.run("ip addr add 10.0.9.1/24 dev up0");
    node_ns.run("sysctl -qw net.ipv4.ip_forward=1");

    let cluster = Cluster::start_with(Options {
        netns: Some(node_ns.path()),
        node_lifecycle: true,
        ..Options::default()
    });
    let lab = format!("t{}", std::process::id());
    let ipam = tempfile::tempdir().expect("tempdir");
    let started = std::time::Instant::now();
    let node = KubeletNode::start(
        &cluster,
        &node_ns,
        &lab,
        "node1",
        NodeOptions {
            node_ip: Some("10.0.9.2".into()),
            cni_conflist: Some(ptp_conflist("10.250.0.0/24", ipam.path())),
            kube_proxy: Some("nftables".into()),
            ..NodeOptions::default()
        },
    );
    eprintln!(
        "node Ready in {:.1} s: {}",
        started.elapsed().as_secs_f64(),
        node.info
    );
    let dir = node.dir();
    let cgroup = node.cgroup();
    let images: Vec<String> = serde_json::from_value(node.info["images"].clone()).unwrap();
    let agnhost = images
        .iter()
        .find(|i| i.contains("/agnhost:"))
        .expect("agnhost image")
        .clone();
    assert!(images.iter().any(|i| i.contains("/pause:")), "{images:?}");

    // The Node as the API server has it: the lab's name, the node's address and version.
    let n: Value =
        serde_json::from_str(&cluster.kubectl(&["get", "node", "node1", "-o", "json"])).unwrap();
    let addresses = n["status"]["addresses"].to_string();
    assert!(addresses.contains("10.0.9.2"), "{addresses}");
    assert_eq!(n["status"]["nodeInfo"]["kubeletVersion"], cluster.version());
    assert!(
        n["status"]["nodeInfo"]["containerRuntimeVersion"]
            .as_str()
            .unwrap_or_default()
            .starts_with("containerd://2."),
        "{}",
        n["status"]["nodeInfo"]
    );

    // An agnhost Pod from the node's own image: scheduled, Running, with a Pod IP that
    // answers HTTP from the node.
    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "web", "namespace": "default", "labels": { "app": "web" } },
        "spec": {
            "containers": [{
                "name": "agnhost", "image": agnhost, "imagePullPolicy": "Never",
                "args": ["netexec", "--http-port=8080"],
                "readinessProbe": { "httpGet": { "path": "/healthz", "port": 8080 },
                                     "periodSeconds": 1 },
            }],
            "terminationGracePeriodSeconds": 1,
        }
    });
    cluster.apply(&[pod]);
    let running = wait_for(
        "the Pod to be Ready with an IP",
        || cluster.get("pods", "default", "web"),
        |p| {
            p.as_ref().is_some_and(|p| {
                p["status"]["phase"] == "Running"
                    && p["status"]["podIP"].is_string()
                    && p["status"]["containerStatuses"][0]["ready"] == true
            })
        },
    )
    .unwrap();
    let ip = running["status"]["podIP"].as_str().unwrap().to_string();
    assert!(ip.starts_with("10.250.0."), "{ip}");
    assert_eq!(running["spec"]["nodeName"], "node1");
    let hostname = http_get_in(&node_ns.path(), &ip, 8080, "/hostname").unwrap_or_else(|e| {
        panic!(
            "GET http://{ip}:8080/hostname: {e}\nkubelet:\n{}",
            node.log("kubelet")
        )
    });
    assert_eq!(hostname.trim(), "web");
    // Through a ClusterIP Service: kube-proxy's nftables rules in the node's namespace.
    let service = json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": { "name": "web", "namespace": "default" },
        "spec": { "selector": { "app": "web" },
                  "ports": [{ "port": 80, "targetPort": 8080, "protocol": "TCP" }] }
    });
    cluster.apply(&[service]);
    let svc = cluster.get("services", "default", "web").expect("Service");
    let cluster_ip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    let via_service = wait_for(
        "the ClusterIP to answer",
        || http_get_in(&node_ns.path(), &cluster_ip, 80, "/hostname"),
        |r| r.as_ref().is_ok_and(|h| h.trim() == "web"),
    );
    assert_eq!(via_service.unwrap().trim(), "web");
    assert!(node_ns.run("nft list tables").contains("kube-proxy"));

    // The API server reaches kubelet (InternalIP, its client certificate): logs and exec.
    let logs = cluster.kubectl(&["logs", "web"]);
    assert!(logs.contains("/healthz"), "{logs}");
    let out = cluster.kubectl(&["exec", "web", "--", "/agnhost", "dns-suffix"]);
    assert!(out.contains("cluster.local"), "{out}");

    // The Pod's processes are under the node's cgroup.
    let kubepods = format!("/sys/fs/cgroup/pids{cgroup}/kubepods");
    assert!(Path::new(&kubepods).is_dir(), "no {kubepods}");
    assert!(
        !mounts_seen_by(&node.pid().to_string(), &dir).is_empty(),
        "the Pod's mounts are under the node's directory"
    );
    assert_eq!(
        mounts_under(&dir),
        Vec::<String>::new(),
        "the node's mounts reach the host's mount namespace"
    );

    // Stopped: nothing of the node is left.
    let info = node.info.clone();
    node.stop();
    let pids: Vec<u64> = info["pids"]
        .as_object()
        .unwrap()
        .values()
        .filter_map(Value::as_u64)
        .collect();
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "PID {pid} left"
        );
    }
    assert_eq!(processes_mentioning(&dir.display().to_string()), vec![]);
    assert_eq!(mounts_under(&dir), Vec::<String>::new());
    assert_eq!(cgroup_left(&cgroup), Vec::<String>::new());
    assert!(!dir.exists(), "{} left", dir.display());
}

#[test]
fn a_failing_kubelet_names_itself_and_leaves_nothing() {
    require_root();
    let node_ns = Netns::new("kf");
    let cluster = Cluster::start_with(Options {
        netns: Some(node_ns.path()),
        ..Options::default()
    });
    let lab = format!("f{}", std::process::id());
    // containerd starts and the images are imported; kubelet then exits on a flag it lacks.
    let err = match KubeletNode::try_start(
        &cluster,
        &node_ns,
        &lab,
        "node1",
        NodeOptions {
            kubelet_args: vec!["--no-such-flag".into()],
            ..NodeOptions::default()
        },
    ) {
        Ok(_) => panic!("a kubelet with --no-such-flag started"),
        Err(e) => e,
    };
    assert!(err.contains("node node1 did not start"), "{err}");
    assert!(err.contains("kubelet exited"), "{err}");
    assert!(err.contains("kubelet.log"), "{err}");
    assert!(
        err.contains("no-such-flag"),
        "the log's end is in the error: {err}"
    );
    let cgroup = format!("/sepal/{lab}/node1");
    assert_eq!(cgroup_left(&cgroup), Vec::<String>::new());
    assert_eq!(processes_mentioning(&format!("/sepal/{lab}")), vec![]);
    // The node's directory, from the log path the error names: no process runs from it.
    let dir = err
        .split_whitespace()
        .find(|w| w.ends_with("/logs/kubelet.log:"))
        .and_then(|w| w.strip_suffix("/logs/kubelet.log:"))
        .expect("the kubelet log's path")
        .to_string();
    assert_eq!(processes_mentioning(&dir), vec![]);
    assert_eq!(mounts_under(Path::new(&dir)), Vec::<String>::new());
}

/// The Sepal image, as `sepal lab image` makes it from the built binaries (no registry, no base
/// image), imported into a node's containerd and run: `sepal --version`, and the programs the
/// agent and install-cni run inside it (nft, conntrack, sh, cp, mv, chmod) load their libraries.
#[test]
fn the_sepal_image_runs_on_a_node() {
    require_root();
    for b in ["kubelet", "containerd", "agnhost", "pause"] {
        assert!(
            kube_bin_dir().join(b).is_file(),
            "{b} missing in {}: run scripts/kube-build",
            kube_bin_dir().display()
        );
    }
    let node_ns = Netns::new("ks");
    node_ns.run("ip link set lo up; ip addr add 10.0.8.2/32 dev lo");
    node_ns.run("sysctl -qw net.ipv4.ip_forward=1");
    let cluster = Cluster::start_with(Options {
        netns: Some(node_ns.path()),
        // Lifts the not-ready taint kubelet registers with, once the Node is Ready.
        node_lifecycle: true,
        ..Options::default()
    });
    let lab = format!("s{}", std::process::id());
    let ipam = tempfile::tempdir().expect("tempdir");
    let started = std::time::Instant::now();
    let node = KubeletNode::start(
        &cluster,
        &node_ns,
        &lab,
        "node1",
        NodeOptions {
            node_ip: Some("10.0.8.2".into()),
            cni_conflist: Some(ptp_conflist("10.250.1.0/24", ipam.path())),
            sepal_image: true,
            ..NodeOptions::default()
        },
    );
    let images: Vec<String> = serde_json::from_value(node.info["images"].clone()).unwrap();
    let image = format!("sepal.dev/sepal:v{}", env!("CARGO_PKG_VERSION"));
    assert!(images.contains(&image), "{images:?}");
    eprintln!(
        "node Ready with the Sepal image in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let pod = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": { "name": "sepal-version", "namespace": "default" },
        "spec": {
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [
                { "name": "version", "image": image, "imagePullPolicy": "Never",
                  "command": ["sepal", "--version"] },
                { "name": "tools", "image": image, "imagePullPolicy": "Never",
                  "command": ["/bin/sh", "-ec",
                      "nft --version; conntrack --version; cp --version >/dev/null; \
                       mv --version >/dev/null; chmod --version >/dev/null; \
                       test -x /usr/local/bin/sepal-cni; echo tools-ok"] },
            ],
        }
    });
    cluster.apply(&[pod]);
    let done = wait_for(
        "the Pod to finish",
        || cluster.get("pods", "default", "sepal-version"),
        |p| {
            p.as_ref().is_some_and(|p| {
                p["status"]["phase"] == "Succeeded" || p["status"]["phase"] == "Failed"
            })
        },
    )
    .unwrap();
    let version = cluster.kubectl(&["logs", "sepal-version", "-c", "version"]);
    let tools = cluster.kubectl(&["logs", "sepal-version", "-c", "tools"]);
    assert_eq!(
        done["status"]["phase"],
        "Succeeded",
        "{}\nversion: {version}\ntools: {tools}\nkubelet:\n{}",
        done["status"],
        node.log("kubelet")
    );
    assert_eq!(
        version.trim(),
        format!("sepal {}", env!("CARGO_PKG_VERSION"))
    );
    assert!(tools.contains("nftables v"), "{tools}");
    assert!(tools.contains("conntrack v"), "{tools}");
    assert!(tools.contains("tools-ok"), "{tools}");
    eprintln!(
        "the Sepal image's Pod succeeded {:.1} s after the start",
        started.elapsed().as_secs_f64()
    );
    let dir = node.dir();
    node.stop();
    assert_eq!(processes_mentioning(&dir.display().to_string()), vec![]);
    assert_eq!(mounts_under(&dir), Vec::<String>::new());
}
