//! `up --kubernetes`: the lab as a real cluster. The control plane runs in a namespace of its own
//! on the fabric (linked to the first router, so API server and kubelets reach each other as in a
//! data centre); every node runs containerd, kubelet and kube-proxy (`sepal lab node-runtime`);
//! Sepal is installed by `kubectl apply` of deploy/ with only the image pointed at the lab's
//! image; the topology's pods are real Pods, started by kubelet through `sepal-cni`.

use super::control_plane::Endpoints;
use super::node_runtime::{self, images, kube_proxy::ProxyMode, sepal_image};
use super::state::{LabState, PodState};
use super::{fabric, kubeapi, net, router};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The control plane's link to the first router: 10.0.0.0/24 is the one link subnet no node uses
/// (node n's link to router r is 10.r.(n+1).0/24).
pub const CP_ADDR: &str = "10.0.0.2";
const CP_GATEWAY: &str = "10.0.0.1";
/// The control plane's link.
const CP_SUBNET: &str = "10.0.0.0/24";

/// How long nodes, the DaemonSet and the Pods each may take.
const NODE_TIMEOUT: Duration = Duration::from_secs(180);
const READY_TIMEOUT: Duration = Duration::from_secs(180);

/// deploy/ as `kubectl apply -f deploy/crds/ -f deploy/` reads it, in that order.
const DEPLOY: &[(&str, &str)] = &[
    (
        "crds/bgpconfigurations.sepal.dev.yaml",
        include_str!("../../../deploy/crds/bgpconfigurations.sepal.dev.yaml"),
    ),
    (
        "crds/bgppeers.sepal.dev.yaml",
        include_str!("../../../deploy/crds/bgppeers.sepal.dev.yaml"),
    ),
    (
        "crds/sepalnodestatuses.sepal.dev.yaml",
        include_str!("../../../deploy/crds/sepalnodestatuses.sepal.dev.yaml"),
    ),
    (
        "00-namespace.yaml",
        include_str!("../../../deploy/00-namespace.yaml"),
    ),
    ("10-rbac.yaml", include_str!("../../../deploy/10-rbac.yaml")),
    (
        "20-config.yaml",
        include_str!("../../../deploy/20-config.yaml"),
    ),
    (
        "30-daemonset.yaml",
        include_str!("../../../deploy/30-daemonset.yaml"),
    ),
    (
        "31-bfd-daemonset.yaml",
        include_str!("../../../deploy/31-bfd-daemonset.yaml"),
    ),
];

pub fn cp_netns(lab: &LabState) -> String {
    format!("{}-cp", lab.name)
}

/// The control plane's namespace, on a link of its own to the first router; every node routes
/// to it through that router.
pub fn link_control_plane(lab: &LabState) -> Result<()> {
    let Some(router0) = lab.routers.first() else {
        bail!("--kubernetes needs a router: the control plane and the nodes meet through it");
    };
    let ns = cp_netns(lab);
    net::add_netns(&ns, false)?;
    net::veth(&ns, "eth0", &router0.netns, "cp")?;
    net::sh(
        &ns,
        &format!("ip addr add {CP_ADDR}/24 dev eth0 && ip route add default via {CP_GATEWAY}"),
    )?;
    net::sh(
        &router0.netns,
        &format!("ip addr add {CP_GATEWAY}/24 dev cp"),
    )?;
    // Nodes on the first router's links go straight to it; in a leaf-spine lab the others
    // reach it through their own ToRs and the spines.
    fabric::route_subnet(lab, CP_SUBNET, 0)?;
    for (n, node) in lab.nodes.iter().enumerate() {
        if lab.topology.cabled(0, n) {
            net::sh(
                &node.netns,
                &format!(
                    "ip route add {CP_ADDR}/32 via {}",
                    router::router_addr(0, n)
                ),
            )?;
        }
    }
    Ok(())
}

/// `sepal lab control-plane` flags beyond the cluster's ranges: its API server advertised on the
/// fabric, and the node lifecycle controller, which lifts the not-ready taint.
pub fn control_plane_args() -> Vec<String> {
    vec![
        format!("--advertise-address={CP_ADDR}"),
        "--node-lifecycle".to_string(),
    ]
}

/// The API server's URL as nodes reach it.
pub fn fabric_server(endpoints: &Endpoints) -> String {
    format!("https://{CP_ADDR}:{}", endpoints.ports.api_server)
}

/// The kubeconfig the host uses (the lab, `lab kubectl`, the tests): the control plane's admin
/// kubeconfig with its server replaced by the host relay's loopback port.
pub fn host_kubeconfig(lab: &LabState, endpoints: &Endpoints, relay_port: u16) -> Result<PathBuf> {
    let text = std::fs::read_to_string(&endpoints.admin_kubeconfig)
        .with_context(|| format!("read {}", endpoints.admin_kubeconfig.display()))?;
    let from = format!("https://127.0.0.1:{}", endpoints.ports.api_server);
    if !text.contains(&from) {
        bail!(
            "{} does not name the server {from}",
            endpoints.admin_kubeconfig.display()
        );
    }
    let path = lab.dir().join("admin.kubeconfig");
    super::control_plane::write_private(
        &path,
        &text.replace(&from, &format!("https://127.0.0.1:{relay_port}")),
    )?;
    Ok(path)
}

/// Every image the nodes import, written once into the lab's image folder before the nodes start
/// (they would otherwise write the same archives at the same time).
fn write_images(bin: &Path, sepal_bin: &Path, cache: &Path) -> Result<()> {
    std::fs::create_dir_all(cache)?;
    let names = images::ImageNames::load(bin)?;
    for image in [
        images::pause(&names, bin),
        images::agnhost(&names, bin)?,
        sepal_image::image(sepal_bin)?,
    ] {
        let file = cache.join(sepal_image::archive_name(&image.name));
        images::ensure_archive(&image, &file)?;
    }
    Ok(())
}

/// The node runtimes' directories are the lab's node directories.
pub fn ready_file(lab: &LabState, node: &str) -> PathBuf {
    node_runtime::NodeLayout {
        dir: lab.node_dir(node),
    }
    .ready_file()
}

/// Starts every node's runtime (in parallel) and waits until each has registered its Node.
pub fn start_nodes(lab: &mut LabState, endpoints: &Endpoints, mode: ProxyMode) -> Result<()> {
    let cp = lab
        .kubeconfig
        .as_ref()
        .and_then(|k| k.control_plane.clone())
        .context("the lab has no control plane of its own")?;
    let sepal = std::env::current_exe()?;
    let sepal_bin = sepal.parent().context("sepal's directory")?.to_path_buf();
    let cache = lab.dir().join("images");
    let t = Instant::now();
    write_images(&cp.bin_dir, &sepal_bin, &cache)?;
    eprintln!("images written in {:.1} s", t.elapsed().as_secs_f64());
    let server = fabric_server(endpoints);
    for i in 0..lab.nodes.len() {
        let node = lab.nodes[i].clone();
        let dir = lab.node_dir(&node.name);
        std::fs::create_dir_all(&dir)?;
        let mode = mode.name();
        let args: Vec<String> = vec![
            "lab".into(),
            "node-runtime".into(),
            format!("--dir={}", dir.display()),
            format!("--name={}", node.name),
            format!("--lab={}", lab.name),
            format!("--control-plane={}", cp.dir.display()),
            format!("--server={server}"),
            format!("--netns=/run/netns/{}", node.netns),
            format!("--node-ip={}", node.uplinks[0]),
            format!("--kube-proxy={mode}"),
            format!("--image-cache={}", cache.display()),
            format!("--bin-dir={}", cp.bin_dir.display()),
            "--sepal-image".into(),
        ];
        let log = std::fs::File::create(dir.join("node-runtime.log"))?;
        let child = std::process::Command::new("setsid")
            .arg(&sepal)
            .args(&args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("start node {}", node.name))?;
        lab.nodes[i].runtime_pid = Some(child.id());
        lab.save()?;
        // Reaped when it exits, so `down` does not wait on a zombie.
        std::thread::spawn(move || {
            let mut child = child;
            let _ = child.wait();
        });
    }
    let deadline = Instant::now() + NODE_TIMEOUT;
    for node in lab.nodes.clone() {
        let ready = ready_file(lab, &node.name);
        let log = lab.node_dir(&node.name).join("node-runtime.log");
        while !ready.exists() {
            let gone = node.runtime_pid.is_some_and(|p| !net::alive(p));
            if gone || Instant::now() > deadline {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "node {} did not start{}; its log is {}:\n{}",
                    node.name,
                    if gone { "" } else { " in time" },
                    log.display(),
                    tail.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    Ok(())
}

/// Stops a node's runtime and waits until it has torn its node down (kubelet, containers,
/// containerd, mounts, cgroups): up to a minute, then SIGKILL.
pub fn stop_node(pid: u32, dir: &Path) {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let dir_arg = format!("--dir={}", dir.display());
    if !cmdline
        .split(|b| *b == 0)
        .any(|arg| arg == dir_arg.as_bytes())
    {
        return;
    }
    let p = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(60);
    while net::alive(pid) && !net::is_zombie(pid) {
        if Instant::now() > deadline {
            let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The Node annotation the agents read their AS number from, which kubelet cannot set.
pub fn annotate_nodes(lab: &LabState) -> Result<()> {
    let kc = lab.admin_kubeconfig().context("no API server")?;
    for node in &lab.nodes {
        kubeapi::put(
            kc,
            &json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": node.name,
                             "annotations": {"sepal.dev/as-number": node.as_number.to_string()}},
            }),
        )?;
    }
    Ok(())
}

/// The deploy/ manifests with every image that names Sepal's replaced by `image`.
pub fn deploy_manifests(image: &str) -> Result<String> {
    let daemonset = DEPLOY
        .iter()
        .find(|(f, _)| *f == "30-daemonset.yaml")
        .map(|(_, t)| *t)
        .context("deploy/30-daemonset.yaml")?;
    let released = daemonset
        .lines()
        .find_map(|l| l.trim().strip_prefix("image: "))
        .context("deploy/30-daemonset.yaml names no image")?
        .trim();
    let mut all = String::new();
    for (file, text) in DEPLOY {
        all.push_str(&format!("---\n# deploy/{file}\n"));
        all.push_str(&text.replace(&format!("image: {released}"), &format!("image: {image}")));
        all.push('\n');
    }
    Ok(all)
}

/// kubectl as the lab's admin; stdout, or an error with what kubectl printed.
pub fn kubectl(lab: &LabState, args: &[&str], stdin: Option<&str>) -> Result<String> {
    use std::io::Write;
    let mut child = super::kubectl::command(lab)?
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("run kubectl")?;
    let mut input = child.stdin.take().context("kubectl stdin")?;
    if let Some(text) = stdin {
        input.write_all(text.as_bytes())?;
    }
    drop(input);
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `kubectl apply -f deploy/crds/ -f deploy/`, the image pointed at the lab's, then waits until
/// the CRDs are served.
pub fn install_sepal(lab: &LabState) -> Result<()> {
    let manifests = deploy_manifests(&sepal_image::name())?;
    kubectl(lab, &["apply", "-f", "-"], Some(&manifests))?;
    kubectl(
        lab,
        &[
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/bgpconfigurations.sepal.dev",
            "crd/bgppeers.sepal.dev",
            "crd/sepalnodestatuses.sepal.dev",
        ],
        None,
    )?;
    Ok(())
}

/// Waits until the DaemonSets run a Ready agent and BFD daemon on every node and every Node is
/// Ready.
pub fn wait_sepal_ready(lab: &LabState) -> Result<()> {
    let timeout = format!("--timeout={}s", READY_TIMEOUT.as_secs());
    kubectl(
        lab,
        &[
            "-n",
            "sepal-system",
            "rollout",
            "status",
            "daemonset/sepal-node",
            &timeout,
        ],
        None,
    )
    .map_err(|e| e.context(agent_logs_hint(lab, "sepal-node")))?;
    // `rollout status` knows only RollingUpdate; sepal-bfd is OnDelete.
    wait_daemonset_ready(lab, "sepal-bfd")
        .map_err(|e| e.context(agent_logs_hint(lab, "sepal-bfd")))?;
    kubectl(
        lab,
        &["wait", "--for=condition=Ready", &timeout, "node", "--all"],
        None,
    )?;
    Ok(())
}

/// Waits until DaemonSet `name` has a Ready pod on every node it schedules to.
fn wait_daemonset_ready(lab: &LabState, name: &str) -> Result<()> {
    let deadline = std::time::Instant::now() + READY_TIMEOUT;
    loop {
        let ds: serde_json::Value = serde_json::from_str(&kubectl(
            lab,
            &["-n", "sepal-system", "get", "daemonset", name, "-o", "json"],
            None,
        )?)?;
        let status = &ds["status"];
        let want = status["desiredNumberScheduled"].as_u64().unwrap_or(0);
        if want > 0 && status["numberReady"].as_u64() == Some(want) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "{name}: {} of {want} pods Ready after {} s",
                status["numberReady"].as_u64().unwrap_or(0),
                READY_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn agent_logs_hint(lab: &LabState, ds: &str) -> String {
    format!(
        "the {ds} DaemonSet is not Ready (see `sepal lab kubectl --name {} -- -n \
         sepal-system get pods -o wide` and `... logs ds/{ds}`; kubelet logs are in {})",
        lab.name,
        lab.dir().join("nodes/NODE/logs/kubelet.log").display()
    )
}

/// The topology's pod as a real Pod: agnhost's netexec (HTTP on the first TCP port given,
/// UDP on the first UDP one), pinned to its node.
pub fn pod_object(lab: &LabState, spec: &super::topology::PodSpec) -> Result<Value> {
    let names = images::ImageNames::load(&own_bin(lab)?)?;
    let port = |proto: &str, default: u16| {
        spec.container_ports
            .iter()
            .find(|p| p.protocol.eq_ignore_ascii_case(proto))
            .map_or(default, |p| p.container_port)
    };
    let ports: Vec<Value> = spec
        .container_ports
        .iter()
        .map(|p| json!({"name": p.name, "containerPort": p.container_port, "protocol": p.protocol}))
        .collect();
    Ok(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": spec.labels},
        "spec": {
            "nodeName": spec.node,
            "terminationGracePeriodSeconds": 2,
            "containers": [{
                "name": "main", "image": names.agnhost, "imagePullPolicy": "Never",
                "args": ["netexec", format!("--http-port={}", port("TCP", 8080)),
                         format!("--udp-port={}", port("UDP", 8081))],
                "ports": ports,
            }],
        },
    }))
}

fn own_bin(lab: &LabState) -> Result<PathBuf> {
    lab.kubeconfig
        .as_ref()
        .and_then(|k| k.control_plane.as_ref())
        .map(|c| c.bin_dir.clone())
        .context("the lab has no control plane of its own")
}

/// Waits until the Pod runs Ready with its IPs, and returns it as the lab records it: its
/// network namespace is its container's, entered by PID (kubelet's namespaces live in the node's
/// own mount namespace, which `ip netns` cannot see).
pub fn wait_pod(lab: &LabState, namespace: &str, name: &str) -> Result<PodState> {
    let kc = lab.admin_kubeconfig().context("no API server")?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let pod = kubeapi::get_namespaced(kc, "v1", "Pod", namespace, name)?;
        if let Some(pod) = pod.as_ref().filter(|p| is_ready(p)) {
            let node = pod["spec"]["nodeName"].as_str().unwrap_or_default();
            let container = pod["status"]["containerStatuses"][0]["containerID"]
                .as_str()
                .unwrap_or_default();
            let id = container.strip_prefix("containerd://").unwrap_or(container);
            let pid = task_pid(lab, node, id)?;
            return Ok(PodState {
                namespace: namespace.to_string(),
                name: name.to_string(),
                node: node.to_string(),
                netns: format!("/proc/{pid}/ns/net"),
                container_id: id.to_string(),
                ips: pod["status"]["podIPs"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|i| i["ip"].as_str().map(str::to_string))
                    .collect(),
                labels: serde_json::from_value(pod["metadata"]["labels"].clone())
                    .unwrap_or_default(),
            });
        }
        if Instant::now() > deadline {
            bail!(
                "Pod {namespace}/{name} is not Ready after {} s: {}",
                READY_TIMEOUT.as_secs(),
                pod.map(|p| p["status"].to_string())
                    .unwrap_or_else(|| "not in the API server".into())
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn is_ready(pod: &Value) -> bool {
    pod["status"]["podIP"].is_string()
        && pod["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
}

/// The host PID of a container's task, from the node's containerd.
fn task_pid(lab: &LabState, node: &str, container: &str) -> Result<u32> {
    let layout = node_runtime::NodeLayout {
        dir: lab.node_dir(node),
    };
    let text =
        node_runtime::containerd::ctr(&own_bin(lab)?, &layout, &["-n", "k8s.io", "tasks", "ls"])?;
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?, f.next()?.parse::<u32>().ok()?))
        })
        .find(|(id, _)| *id == container)
        .map(|(_, pid)| pid)
        .with_context(|| format!("container {container} has no task on node {node}"))
}

/// Nodes as the API server has them, for `lab status`.
pub fn nodes_status(lab: &LabState) -> Result<(Vec<Value>, Vec<String>)> {
    let list: Value = serde_json::from_str(&kubectl(lab, &["get", "nodes", "-o", "json"], None)?)?;
    let mut nodes = Vec::new();
    let mut common: Option<std::collections::BTreeSet<String>> = None;
    for n in list["items"].as_array().into_iter().flatten() {
        let name = n["metadata"]["name"].as_str().unwrap_or_default();
        let ready = n["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        let images: std::collections::BTreeSet<String> = n["status"]["images"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|i| i["names"].as_array().cloned().unwrap_or_default())
            .filter_map(|s| s.as_str().map(str::to_string))
            .filter(|s| !s.contains("@sha256:"))
            .collect();
        common = Some(match common {
            None => images,
            Some(c) => c.intersection(&images).cloned().collect(),
        });
        let netns = lab.node(name).map(|s| s.netns.clone()).unwrap_or_default();
        nodes.push(json!({
            "name": name,
            "netns": netns,
            "ready": ready,
            "addresses": n["status"]["addresses"].as_array().into_iter().flatten()
                .filter(|a| a["type"] == "InternalIP").filter_map(|a| a["address"].as_str()).collect::<Vec<_>>(),
            "podCIDRs": n["spec"]["podCIDRs"],
            "kubeletVersion": n["status"]["nodeInfo"]["kubeletVersion"],
        }));
    }
    Ok((nodes, common.unwrap_or_default().into_iter().collect()))
}

/// Pods as the API server has them, every namespace, for `lab status`.
pub fn pods_status(lab: &LabState) -> Result<Vec<Value>> {
    let list: Value = serde_json::from_str(&kubectl(
        lab,
        &["get", "pods", "--all-namespaces", "-o", "json"],
        None,
    )?)?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let ns = p["metadata"]["namespace"].as_str().unwrap_or_default();
            let name = p["metadata"]["name"].as_str().unwrap_or_default();
            let netns = lab
                .pod(ns, name)
                .map(|s| s.netns.clone())
                .unwrap_or_default();
            json!({
                "namespace": ns,
                "name": name,
                "node": p["spec"]["nodeName"],
                "phase": p["status"]["phase"],
                "ready": is_ready(p),
                "hostNetwork": p["spec"]["hostNetwork"].as_bool().unwrap_or(false),
                "ips": p["status"]["podIPs"].as_array().into_iter().flatten()
                    .filter_map(|i| i["ip"].as_str()).collect::<Vec<_>>(),
                "labels": p["metadata"]["labels"],
                "netns": netns,
            })
        })
        .collect())
}

/// `up --kubernetes`: the underlay, the control plane in its namespace, the host's relay to it,
/// the routers, the nodes, Sepal from deploy/, then the topology's objects and Pods.
pub fn build(mut lab: LabState) -> Result<LabState> {
    super::underlay(&lab, false)?;
    link_control_plane(&lab)?;
    let t = Instant::now();
    let netns = PathBuf::from("/run/netns").join(cp_netns(&lab));
    let endpoints = super::cluster::start(&mut lab, Some(&netns), &control_plane_args())?;
    lab.relay_pid = Some(super::relay::start(&lab)?);
    lab.save()?;
    let kubeconfig = host_kubeconfig(&lab, &endpoints, super::relay::host_port(&lab)?)?;
    if let Some(api) = lab.kubeconfig.as_mut() {
        api.admin_kubeconfig = kubeconfig.clone();
        api.agent_kubeconfig = kubeconfig;
    }
    lab.save()?;
    eprintln!(
        "control plane (Kubernetes {}) ready in {:.1} s at {}",
        endpoints.kubernetes_version,
        t.elapsed().as_secs_f64(),
        fabric_server(&endpoints)
    );
    for i in 0..lab.routers.len() {
        let pids = router::start(&lab, i)?;
        lab.routers[i].pids = pids;
        lab.save()?;
    }

    let t = Instant::now();
    let mode = lab.proxy_mode.unwrap_or(ProxyMode::Nftables);
    start_nodes(&mut lab, &endpoints, mode)?;
    super::cluster::read_pod_cidrs(&mut lab)?;
    annotate_nodes(&lab)?;
    lab.save()?;
    eprintln!(
        "{} nodes registered in {:.1} s (kubelet, containerd, kube-proxy in {} mode)",
        lab.nodes.len(),
        t.elapsed().as_secs_f64(),
        mode.name()
    );

    let t = Instant::now();
    install_sepal(&lab)?;
    let kc = lab
        .admin_kubeconfig()
        .context("no API server")?
        .to_path_buf();
    for ns in &lab.topology.namespaces {
        kubeapi::put(&kc, &super::objects::namespace_object(&ns.name, &ns.labels))?;
    }
    for obj in super::bgp_objects(&lab)
        .into_iter()
        .chain(lab.topology.manifests.clone())
    {
        kubeapi::put(&kc, &obj)?;
    }
    wait_sepal_ready(&lab)?;
    eprintln!(
        "Sepal installed from deploy/ and Ready on every node in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let t = Instant::now();
    for spec in lab.topology.pods.clone() {
        kubeapi::put(&kc, &pod_object(&lab, &spec)?)?;
    }
    for spec in lab.topology.pods.clone() {
        let pod = wait_pod(&lab, &spec.namespace, &spec.name)?;
        lab.pods.push(pod);
        lab.save()?;
    }
    if !lab.pods.is_empty() {
        eprintln!(
            "{} Pods Ready in {:.1} s",
            lab.pods.len(),
            t.elapsed().as_secs_f64()
        );
    }
    super::wait_routes(&lab);
    Ok(lab)
}

/// `lab apply|delete -f FILE` on real nodes: kubectl's; the Pods it names are then waited for
/// (Ready, or gone) and recorded, as `up` records the topology's.
pub fn apply(lab: &mut LabState, text: &str, docs: &[Value], delete: bool) -> Result<()> {
    let verb = if delete { "delete" } else { "apply" };
    let mut args = vec![verb, "-f", "-"];
    if delete {
        args.extend(["--wait=true", "--ignore-not-found"]);
    }
    print!("{}", kubectl(lab, &args, Some(text))?);
    let pods = docs.iter().filter(|d| d["kind"] == "Pod").filter_map(|d| {
        let name = d["metadata"]["name"].as_str()?;
        let ns = d["metadata"]["namespace"].as_str().unwrap_or("default");
        Some((ns.to_string(), name.to_string()))
    });
    for (ns, name) in pods.collect::<Vec<_>>() {
        lab.pods.retain(|p| !(p.namespace == ns && p.name == name));
        if !delete {
            let pod = wait_pod(lab, &ns, &name)?;
            lab.pods.push(pod);
        }
    }
    lab.save()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_is_applied_with_only_the_image_changed() {
        let text = deploy_manifests("sepal.dev/sepal:lab").unwrap();
        assert!(!text.contains("ghcr.io/"), "{text}");
        // install-cni and the agent in sepal-node, the daemon in sepal-bfd.
        assert_eq!(text.matches("image: sepal.dev/sepal:lab").count(), 3);
        let released = DEPLOY[6]
            .1
            .lines()
            .find_map(|l| l.trim().strip_prefix("image: "))
            .unwrap();
        for (file, original) in DEPLOY {
            let changed =
                original.replace(&format!("image: {released}"), "image: sepal.dev/sepal:lab");
            assert!(
                text.contains(&changed),
                "deploy/{file} changed beyond its image"
            );
        }
    }
}
