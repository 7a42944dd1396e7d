//! Root: the default lab (3 nodes, a BIRD ToR, six pods) on a real Kubernetes control plane.
//!
//! - `up --kubernetes`: a real cluster. Its own control plane on the fabric, node IPAM handing
//!   out the Nodes' podCIDRs, a kubelet, containerd and kube-proxy on every node, Sepal installed
//!   by `kubectl apply` of deploy/ (its install-cni writing each node's own CNI directories, its
//!   agent on the host network with its ServiceAccount), the topology's pods real Pods that
//!   reach each other; `lab kubectl` and `lab exec` through the API server, pods applied,
//!   relabelled and deleted, and `down` leaving nothing.
//! - `up --datastore kubernetes --kubeconfig FILE` on a server the lab does not own (a test
//!   cluster, its admin kubeconfig): the objects there, every agent reporting back (Node
//!   condition, SepalNodeStatus, the sessions' state when the ToR goes away), a
//!   NetworkPolicy enforced and lifted.
//! - a control plane that cannot start takes the half-started lab down with its error.

use sepal_tests::kube::sepal_is_up;
use sepal_tests::kube::{kube_bin_dir, Cluster};
use sepal_tests::lab::{netns_list, processes_mentioning, repo_file, wait_for, Lab};
use sepal_tests::{bin_path, require_root};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

const NODES: [&str; 3] = ["node1", "node2", "node3"];

type Matrix = BTreeMap<(String, String), bool>;

fn all_reach_all(m: &Matrix) -> bool {
    m.len() == 30 && m.values().all(|ok| *ok)
}

fn names(objects: &[Value]) -> BTreeSet<String> {
    objects
        .iter()
        .map(|o| {
            let ns = o["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = o["metadata"]["name"].as_str().unwrap_or_default();
            if ns.is_empty() {
                name.to_string()
            } else {
                format!("{ns}/{name}")
            }
        })
        .collect()
}

fn items(list: Value) -> Vec<Value> {
    list["items"].as_array().cloned().unwrap_or_default()
}

fn node_names() -> BTreeSet<String> {
    NODES.iter().map(|n| n.to_string()).collect()
}

/// The Pods the lab's status lists are in the API server (`get`), with their IPs and nodes.
fn pods_match_status(status: &Value, get: impl Fn(&str, &str) -> Option<Value>) {
    for pod in status["pods"].as_array().unwrap() {
        let (ns, name) = (
            pod["namespace"].as_str().unwrap(),
            pod["name"].as_str().unwrap(),
        );
        let obj = get(ns, name).unwrap_or_else(|| panic!("Pod {ns}/{name} not in the API server"));
        assert_eq!(obj["status"]["podIP"], pod["ips"][0], "{obj}");
        assert_eq!(obj["spec"]["nodeName"], pod["node"]);
        assert_eq!(
            obj["status"]["containerStatuses"][0]["ready"], true,
            "{obj}"
        );
    }
}

/// A real Pod for `lab apply`: agnhost's netexec on node2, with `labels` (YAML flow mapping body).
fn real_pod(labels: &str) -> String {
    let images = std::fs::read_to_string(kube_bin_dir().join("IMAGES")).unwrap();
    let agnhost = images
        .lines()
        .find_map(|l| l.strip_prefix("agnhost "))
        .unwrap()
        .trim()
        .to_string();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: extra, namespace: frontend, labels: {{{labels}}}}}\n\
         spec: {{nodeName: node2, terminationGracePeriodSeconds: 1, containers: [{{name: main, \
         image: \"{agnhost}\", imagePullPolicy: Never, args: [netexec]}}]}}\n"
    )
}

#[test]
fn lab_on_its_own_control_plane() {
    require_root();
    for b in [
        "kubelet",
        "containerd",
        "kube-proxy",
        "agnhost",
        "kube-apiserver",
    ] {
        assert!(
            kube_bin_dir().join(b).is_file(),
            "{b} missing in {}: run scripts/kube-build",
            kube_bin_dir().display()
        );
    }
    let host_conflist = Path::new("/etc/cni/net.d/10-sepal.conflist");
    let host_had_conflist = host_conflist.exists();
    let name = format!("kk{}", std::process::id());
    let started = std::time::Instant::now();
    let lab = Lab::up_with(&name, None, &["--kubernetes"]);
    eprintln!(
        "lab up --kubernetes (3 kubelet nodes, Sepal from deploy/): {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Status names the admin kubeconfig and the version scripts/kube-build built.
    let status = lab.status();
    let kubeconfig = status["kubeconfig"]
        .as_str()
        .expect("kubeconfig")
        .to_string();
    assert!(kubeconfig.starts_with(&format!("{}/", lab.dir().display())));
    assert!(Path::new(&kubeconfig).is_file());
    let built = std::fs::read_to_string(kube_bin_dir().join("VERSION")).unwrap();
    let built = built.trim();
    assert_eq!(status["kubernetesVersion"], built);
    let text = sepal_tests::lab::sepal_ok(&["lab", "status", "--name", &name]);
    assert!(text.contains(&kubeconfig) && text.contains(built), "{text}");

    // Real nodes: every Node Ready and registered by its own kubelet at the pinned version; the
    // DaemonSet's agent Ready on each, on the host network; the images on every node.
    for node in status["nodes"].as_array().unwrap() {
        assert_eq!(node["ready"], true, "{node}");
        assert_eq!(node["kubeletVersion"], built, "{node}");
    }
    let agents: Vec<&Value> = status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["namespace"] == "sepal-system")
        .collect();
    let agent_nodes: BTreeSet<String> = agents
        .iter()
        .map(|p| p["node"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(agent_nodes, node_names(), "{agents:?}");
    assert!(
        agents
            .iter()
            .all(|p| p["ready"] == true && p["hostNetwork"] == true),
        "{agents:?}"
    );
    let images = sepal_tests::lab::strs(&status["images"]);
    for want in [
        "registry.k8s.io/pause:",
        "e2e-test-images/agnhost:",
        "sepal.dev/sepal:",
    ] {
        assert!(
            images.iter().any(|i| i.contains(want)),
            "{want}: {images:?}"
        );
    }
    // install-cni wrote the plugin and the conflist into each node's own directories.
    for node in NODES {
        let dir = lab.dir().join("nodes").join(node);
        assert!(dir.join("cni/net.d/10-sepal.conflist").is_file(), "{node}");
        assert!(dir.join("cni/bin/sepal-cni").is_file(), "{node}");
    }
    assert_eq!(
        host_conflist.exists(),
        host_had_conflist,
        "the host's /etc/cni was written"
    );

    // The Nodes' podCIDRs are node IPAM's, inside the cluster CIDR, and what status shows.
    let nodes = items(lab.kubectl_json(&["get", "nodes"]));
    assert_eq!(names(&nodes), node_names());
    let cluster: ipnetwork::IpNetwork = "10.244.0.0/16".parse().unwrap();
    let mut blocks = BTreeSet::new();
    for node in &nodes {
        let name = node["metadata"]["name"].as_str().unwrap();
        let cidrs = sepal_tests::lab::strs(&node["spec"]["podCIDRs"]);
        assert_eq!(cidrs.len(), 1, "{node}");
        let block: ipnetwork::IpNetwork = cidrs[0].parse().unwrap();
        assert!(
            cluster.contains(block.network()) && block.prefix() == 24,
            "{node}"
        );
        assert!(blocks.insert(block), "{block} given twice");
        let shown = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == name)
            .unwrap();
        assert_eq!(shown["podCIDRs"], json!(cidrs), "{shown}");
    }
    pods_match_status(&status, |ns, pod| {
        let out = lab.kubectl(&["get", "pod", "-n", ns, pod, "-o", "json"]);
        serde_json::from_slice(&out.stdout).ok()
    });

    // Every pod reaches every pod, and the agents report as their ServiceAccount: each Node's
    // condition is patched by it, and the audit log holds its requests, none refused.
    wait_for("every pod to reach every pod", || lab.ping(), all_reach_all);
    wait_for(
        "NetworkUnavailable=False (SepalIsUp) on every Node",
        || items(lab.kubectl_json(&["get", "nodes"])),
        |nodes| nodes.len() == 3 && nodes.iter().all(sepal_is_up),
    );
    let endpoints: Value = serde_json::from_str(
        &std::fs::read_to_string(lab.dir().join("control-plane/control-plane.json")).unwrap(),
    )
    .unwrap();
    let audit = std::fs::read_to_string(endpoints["auditLog"].as_str().unwrap()).unwrap();
    let requests: Vec<Value> = audit
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let agent = "system:serviceaccount:sepal-system:sepal-node";
    assert!(
        requests
            .iter()
            .any(|r| r["user"]["username"] == agent && r["verb"] == "watch"),
        "no agent request audited"
    );
    let refused: Vec<&Value> = requests
        .iter()
        .filter(|r| {
            r["responseStatus"]["code"]
                .as_u64()
                .is_some_and(|c| c == 403)
        })
        .collect();
    assert!(refused.is_empty(), "refused: {refused:?}");

    // kubectl's exit code passes through.
    assert!(lab
        .kubectl(&["get", "nodes", "-o", "wide"])
        .status
        .success());
    let missing = lab.kubectl(&["get", "pod", "-n", "frontend", "nonexistent"]);
    assert_eq!(missing.status.code(), Some(1));

    // `lab exec NS/POD` is kubectl exec: from one pod, another pod's netexec over TCP.
    let pods: Vec<&Value> = status["pods"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["namespace"] != "sepal-system")
        .collect();
    let (a, b) = (
        pods[0],
        pods.iter().find(|p| p["node"] != pods[0]["node"]).unwrap(),
    );
    let target = format!("{}:8080", b["ips"][0].as_str().unwrap());
    let from = format!(
        "{}/{}",
        a["namespace"].as_str().unwrap(),
        a["name"].as_str().unwrap()
    );
    sepal_tests::lab::sepal_ok(&[
        "lab",
        "exec",
        "--name",
        &name,
        &from,
        "--",
        "/agnhost",
        "connect",
        &target,
        "--timeout=5s",
    ]);

    // A pod through apply: its object and IP in the API server, relabelled (the old label
    // gone), deleted: gone from the API server, and from the agent's endpoints.
    let tmp = tempfile::tempdir().unwrap();
    let pod_file = tmp.path().join("pod.yaml");
    let get_extra = || {
        let out = lab.kubectl(&["get", "pod", "-n", "frontend", "extra", "-o", "json"]);
        serde_json::from_slice::<Value>(&out.stdout).ok()
    };
    std::fs::write(&pod_file, real_pod("app: one, tier: a")).unwrap();
    lab.apply(&pod_file, false);
    let extra = get_extra().expect("the new pod");
    let extra_ip = extra["status"]["podIP"].as_str().unwrap().to_string();
    assert_eq!(extra["spec"]["nodeName"], "node2");
    assert!(lab
        .ask("endpoints", "node2")
        .to_string()
        .contains(&extra_ip));
    std::fs::write(&pod_file, real_pod("app: two")).unwrap();
    lab.apply(&pod_file, false);
    let relabelled = get_extra().unwrap();
    assert_eq!(relabelled["metadata"]["labels"], json!({"app": "two"}));
    assert_eq!(relabelled["status"]["podIP"], extra_ip.as_str());
    lab.apply(&pod_file, true);
    assert!(
        get_extra().is_none(),
        "frontend/extra is still in the API server"
    );
    wait_for(
        "node2's agent to drop the deleted pod",
        || lab.ask("endpoints", "node2").to_string(),
        |e| !e.contains(&extra_ip),
    );

    rolling_update_loses_no_ping(&lab, a, b);

    // Down: no namespace, process (kubelets, containerd, agents, router, relay, control plane)
    // or file left.
    lab.down_cleanly();
}

/// A rolling update of the DaemonSet to a new image (the same binaries under a new tag on every
/// node) replaces each node's agent in turn, while pod `a` pings pod `b` on another node every
/// 50 ms: graceful restart (the ToR and the nodes keep the restarting node's routes) and the
/// adopted dataplane carry every packet.
fn rolling_update_loses_no_ping(lab: &Lab, a: &Value, b: &Value) {
    let status = lab.status();
    let image = status["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i.as_str())
        .find(|i| i.starts_with("sepal.dev/sepal:"))
        .unwrap()
        .to_string();
    let update = format!("{image}-update");
    for node in NODES {
        let socket = lab
            .dir()
            .join("nodes")
            .join(node)
            .join("containerd/containerd.sock");
        let out = std::process::Command::new(kube_bin_dir().join("ctr"))
            .arg("--address")
            .arg(&socket)
            .args(["-n", "k8s.io", "images", "tag", &image, &update])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let before: BTreeSet<String> = agents(lab);
    let bfd_before = pods_of(lab, "bfd");
    assert_eq!(
        bfd_before.len(),
        3,
        "a sepal-bfd pod per node: {bfd_before:?}"
    );
    let from = a["netns"].as_str().unwrap();
    let to = b["ips"][0].as_str().unwrap();
    let ping = std::process::Command::new("nsenter")
        .arg(format!("--net={from}"))
        .args(["ping", "-q", "-i", "0.05", to])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    let started = std::time::Instant::now();
    let set = lab.kubectl(&[
        "-n",
        "sepal-system",
        "set",
        "image",
        "daemonset/sepal-node",
        &format!("sepal={update}"),
        &format!("install-cni={update}"),
    ]);
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let rollout = lab.kubectl(&[
        "-n",
        "sepal-system",
        "rollout",
        "status",
        "daemonset/sepal-node",
        "--timeout=240s",
    ]);
    assert!(
        rollout.status.success(),
        "{}",
        String::from_utf8_lossy(&rollout.stderr)
    );
    let took = started.elapsed();
    std::thread::sleep(std::time::Duration::from_secs(2));
    // ping prints its summary on SIGINT.
    let stopped = std::process::Command::new("kill")
        .args(["-INT", &ping.id().to_string()])
        .status()
        .unwrap();
    assert!(stopped.success());
    let out = ping.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    let after = agents(lab);
    assert!(
        before.is_disjoint(&after),
        "agents not replaced: {before:?} {after:?}"
    );
    // BFD runs apart from the agents: a rollout of sepal-node leaves sepal-bfd's pods alone.
    assert_eq!(
        pods_of(lab, "bfd"),
        bfd_before,
        "sepal-bfd restarted with the agents"
    );
    let (sent, received) = ping_counts(&summary);
    eprintln!(
        "rolling update of 3 agents in {:.1} s: {received}/{sent} pings answered",
        took.as_secs_f64()
    );
    assert!(sent > 0 && received == sent, "lost pings: {summary}");
}

/// The agents' Pod names (sepal-node's; sepal-bfd's stay through its rollouts).
fn agents(lab: &Lab) -> BTreeSet<String> {
    pods_of(lab, "node")
}

/// The Pod names of one of Sepal's DaemonSets, by its component label.
fn pods_of(lab: &Lab, component: &str) -> BTreeSet<String> {
    let selector = format!("app.kubernetes.io/component={component}");
    items(lab.kubectl_json(&["-n", "sepal-system", "get", "pods", "-l", &selector]))
        .iter()
        .map(|p| p["metadata"]["name"].as_str().unwrap().to_string())
        .collect()
}

/// (transmitted, received) from ping's summary line.
fn ping_counts(summary: &str) -> (u64, u64) {
    let line = summary
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {summary}"));
    let n: Vec<u64> = line
        .split(',')
        .filter_map(|f| f.split_whitespace().next()?.parse().ok())
        .collect();
    (n[0], n[1])
}

#[test]
fn lab_on_an_existing_api_server() {
    require_root();
    // The cluster outlives the lab (dropped after it): the agents talk to it until `down`.
    let cluster = Cluster::start();
    cluster.install_crds();
    let kubeconfig = cluster.admin_kubeconfig();
    let name = format!("kc{}", std::process::id());
    let lab = Lab::up_with(
        &name,
        None,
        &[
            "--datastore",
            "kubernetes",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ],
    );

    // The lab's objects are in the API server, with the pods' IPs in their status; no directory.
    let status = lab.status();
    assert_eq!(
        status["datastore"]["kubernetes"],
        kubeconfig.to_str().unwrap()
    );
    assert_eq!(status["kubeconfig"], kubeconfig.to_str().unwrap());
    assert_eq!(status["kubernetesVersion"], cluster.version());
    assert!(!lab.dir().join("datastore").exists());
    let nodes = cluster.list("nodes", &[]);
    assert_eq!(names(&nodes), node_names());
    for ns in ["frontend", "backend", "default"] {
        assert!(cluster.get("namespace", "", ns).is_some(), "namespace {ns}");
    }
    assert_eq!(cluster.list("bgppeers", &[]).len(), 3);
    pods_match_status(&status, |ns, pod| cluster.get("pod", ns, pod));
    // The lab planned these podCIDRs itself (node IPAM is not its own here).
    for node in &nodes {
        let shown = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == node["metadata"]["name"])
            .unwrap();
        assert_eq!(node["spec"]["podCIDRs"], shown["podCIDRs"], "{node}");
    }

    // Status back to the cluster: each Node's condition, and a SepalNodeStatus with its session
    // to the ToR Established, made by the BGPPeer of that node.
    wait_for(
        "NetworkUnavailable=False (SepalIsUp) on every Node",
        || cluster.list("nodes", &[]),
        |nodes| nodes.len() == 3 && nodes.iter().all(sepal_is_up),
    );
    for node in NODES {
        let s = wait_for(
            &format!("{node}'s SepalNodeStatus with its ToR session Established"),
            || cluster.get("sepalnodestatus", "", node),
            |s| {
                s.as_ref().is_some_and(|s| {
                    s["status"]["routesProgrammed"] == true
                        && s["status"]["establishedSessions"] == 1
                })
            },
        )
        .unwrap();
        let session = &s["status"]["sessions"][0];
        assert_eq!(session["peerAs"], 65000, "{s}");
        assert_eq!(session["state"], "Established", "{s}");
        assert_eq!(session["source"], format!("{node}-tor"), "{s}");
    }

    // Pods on three nodes reach each other, across nodes through the ToR.
    wait_for("every pod to reach every pod", || lab.ping(), all_reach_all);
    wait_for(
        "node3 to learn frontend/web-1",
        || lab.try_trace("frontend/web-1", "backend/db-1", "5432/TCP"),
        |ok| *ok,
    );
    let t = lab.trace("frontend/web-1", "backend/db-1", "5432/TCP");
    assert_eq!(
        (&t["router"], &t["hops"][1]["node"]),
        (&Value::from("tor"), &Value::from("node3")),
        "{t:#}"
    );

    // A NetworkPolicy, written to the API server: backend pods accept only the frontend namespace.
    let policy = repo_file("docs/examples/backend-allow-frontend.yaml");
    lab.apply(&policy, false);
    assert!(cluster
        .get("networkpolicy", "backend", "allow-frontend")
        .is_some());
    let enforced = |m: &Matrix| {
        m.len() == 30
            && m.iter().all(|((from, to), ok)| {
                *ok != (from.starts_with("backend/") && to.starts_with("backend/"))
            })
    };
    wait_for("the policy in force on every node", || lab.ping(), enforced);
    lab.apply(&policy, true);
    assert!(cluster
        .get("networkpolicy", "backend", "allow-frontend")
        .is_none());
    wait_for(
        "the policy lifted on every node",
        || lab.ping(),
        all_reach_all,
    );

    // The ToR goes away: each node's session fails, and the SepalNodeStatus shows the session's
    // new state. (The Warning Event on the BGPPeer is not asserted: a real API server refuses
    // the agent's Event, whose generateName ends in '.'.)
    let routers = lab.status()["routers"].clone();
    assert_eq!(routers[0]["kind"], "bird");
    let bird = std::process::Command::new("ip")
        .args(["netns", "pids", routers[0]["netns"].as_str().unwrap()])
        .output()
        .unwrap();
    for pid in String::from_utf8_lossy(&bird.stdout).split_whitespace() {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() == "bird" {
            let pid: libc::pid_t = pid.parse().unwrap();
            // SAFETY: a plain signal to the lab's own BIRD, found in the lab's router namespace.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    let s = wait_for(
        "node1's SepalNodeStatus to show the session down",
        || cluster.get("sepalnodestatus", "", "node1").unwrap(),
        |s| s["status"]["establishedSessions"] == 0,
    );
    assert_ne!(s["status"]["sessions"][0]["state"], "Established", "{s}");

    // Down removes the lab, not the objects it wrote to a server it does not own.
    lab.down_cleanly();
    assert_eq!(names(&cluster.list("nodes", &[])), node_names());
}

#[test]
fn a_control_plane_that_cannot_start_takes_the_lab_down() {
    require_root();
    // The real etcd, controller manager and scheduler, and a kube-apiserver that refuses its
    // flags: the control plane fails after etcd has started.
    let bin = tempfile::tempdir().unwrap();
    for f in [
        "etcd",
        "kube-controller-manager",
        "kube-scheduler",
        "kubectl",
        "VERSION",
        "crds",
    ] {
        std::os::unix::fs::symlink(kube_bin_dir().join(f), bin.path().join(f)).unwrap();
    }
    let apiserver = bin.path().join("kube-apiserver");
    std::fs::write(
        &apiserver,
        "#!/bin/sh\necho 'Error: unknown flag: --lab' >&2\nexit 1\n",
    )
    .unwrap();
    std::fs::set_permissions(
        &apiserver,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();

    let name = format!("kf{}", std::process::id());
    // A guard, should `up` leave anything behind after all.
    let lab = Lab { name: name.clone() };
    let out = std::process::Command::new(bin_path("sepal"))
        .args(["lab", "up", "--kubernetes", "--name", &name])
        .env("SEPAL_KUBE_BIN", bin.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("kube-apiserver exited")
            && stderr.contains("kube-apiserver.log")
            && stderr.contains("unknown flag: --lab"),
        "{stderr}"
    );
    assert!(!lab.dir().exists(), "{} left", lab.dir().display());
    let left: Vec<String> = netns_list()
        .into_iter()
        .filter(|n| n.starts_with(&name))
        .collect();
    assert!(left.is_empty(), "namespaces left: {left:?}");
    let dir = format!("{}/", lab.dir().display());
    let stray = processes_mentioning(&dir);
    assert!(stray.is_empty(), "processes left: {stray:?}");
}
