//! `sepal lab`: a whole cluster on one Linux box — node namespaces running the real agent, pods
//! attached by the real CNI plugin, a real BGP router — plus the commands to inspect and change it.

mod agents;
mod cabling;
mod cluster;
pub mod control_plane;
mod fabric;
mod kubeapi;
mod kubectl;
mod net;
pub mod node_runtime;
mod objects;
mod peering;
mod ping;
mod real_nodes;
mod relay;
mod router;
pub mod state;
pub mod topology;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use state::{lab_dir, ApiServer, LabState, NodeState, RouterState};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use topology::{check_lab_name, RouterKind, Topology, DEFAULT_LAB};

/// The nodes' AS in the lab's own BGPConfiguration, and on a switch each node's.
const CLUSTER_AS: u32 = 64512;

#[derive(Debug, Args)]
pub struct LabArgs {
    #[command(subcommand)]
    pub command: LabCommand,
}

#[derive(Debug, Subcommand)]
pub enum LabCommand {
    /// Build the lab from a topology file (the built-in 3-node lab without one).
    Up {
        topology: Option<PathBuf>,
        #[arg(long)]
        name: Option<String>,
        /// Run the lab on a Kubernetes control plane of its own (etcd, kube-apiserver,
        /// kube-controller-manager, kube-scheduler from scripts/kube-build): Sepal installed
        /// from deploy/, the agents on their ServiceAccount, Node podCIDRs from node IPAM.
        #[arg(long, conflicts_with_all = ["datastore", "kubeconfig"])]
        kubernetes: bool,
        /// kube-proxy's mode on the nodes of a `--kubernetes` lab.
        #[arg(long, value_enum, default_value_t = node_runtime::kube_proxy::ProxyMode::Nftables, requires = "kubernetes")]
        proxy_mode: node_runtime::kube_proxy::ProxyMode,
        /// Where the lab's objects live and its agents read them: a directory of its own (`dir`)
        /// or the API server of `--kubeconfig` (`kubernetes`).
        #[arg(long, value_enum, default_value_t = LabDatastore::Dir)]
        datastore: LabDatastore,
        /// Kubeconfig of the API server for `--datastore kubernetes` (its server on loopback).
        #[arg(long)]
        kubeconfig: Option<PathBuf>,
    },
    /// Remove everything the lab created: its processes, namespaces and files. Idempotent.
    Down {
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
    },
    /// Stop one node's agent: SIGTERM (it ends its BGP sessions with a Cease), or with `--kill`
    /// SIGKILL, as a crash would. The node keeps the kernel state the agent left.
    StopAgent {
        node: String,
        #[arg(long)]
        kill: bool,
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
    },
    /// Start a stopped node's agent again and wait until it answers CNI STATUS.
    StartAgent {
        node: String,
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
    },
    /// Nodes, routers and pods with their namespaces and addresses.
    Status {
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Create or update objects (Pods go through CNI ADD), like `kubectl apply -f`.
    Apply {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
    },
    /// Delete objects (Pods go through CNI DEL), like `kubectl delete -f`.
    Delete {
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
    },
    /// Run a command in a node, a router, or a pod given as NAMESPACE/POD.
    Exec {
        target: String,
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// kubectl against the lab's API server as its admin, e.g. `kubectl -- get nodes -o wide`.
    Kubectl {
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// The pod-to-pod connectivity matrix (one ping each way).
    Ping {
        #[arg(long, default_value = DEFAULT_LAB)]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Runs a Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager,
    /// kube-scheduler) on loopback until SIGTERM: `up --kubernetes` and the tests start it.
    #[command(hide = true)]
    ControlPlane(control_plane::ControlPlaneArgs),
    /// Runs one Kubernetes node (containerd and kubelet) in a network namespace until SIGTERM,
    /// registered with a control plane's API server; the tests start it.
    #[command(hide = true)]
    NodeRuntime(node_runtime::NodeRuntimeArgs),
    /// Writes the Sepal image (the binaries beside this one, the programs and libraries they
    /// use) as an OCI archive into DIR, for `ctr images import`; prints its name and path.
    #[command(hide = true)]
    Image {
        #[arg(long)]
        out: PathBuf,
    },
    /// Relays the lab's API server into its node namespaces (started by `up`).
    #[command(hide = true)]
    ApiRelay {
        #[arg(long)]
        name: String,
    },
}

impl LabCommand {
    /// The lab's long-running processes, which hold network connections.
    pub fn has_sockets(&self) -> bool {
        matches!(
            self,
            LabCommand::ControlPlane(_) | LabCommand::NodeRuntime(_) | LabCommand::ApiRelay { .. }
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LabDatastore {
    Dir,
    Kubernetes,
}

pub fn run(args: LabArgs) -> Result<()> {
    if let LabCommand::Image { out } = &args.command {
        return node_runtime::sepal_image::run(out);
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("sepal lab needs root: it creates network namespaces and veths");
    }
    match args.command {
        LabCommand::Up {
            topology,
            name,
            kubernetes,
            proxy_mode,
            datastore,
            kubeconfig,
        } => {
            let store = match (kubernetes, datastore, kubeconfig) {
                (true, _, _) => Store::OwnControlPlane,
                (false, LabDatastore::Kubernetes, Some(kc)) => Store::Server(kc),
                (false, LabDatastore::Kubernetes, None) => {
                    bail!("--datastore kubernetes needs --kubeconfig (or use --kubernetes)")
                }
                (false, LabDatastore::Dir, Some(_)) => {
                    bail!("--kubeconfig is for --datastore kubernetes")
                }
                (false, LabDatastore::Dir, None) => Store::Dir,
            };
            up(topology, name, store, proxy_mode)
        }
        LabCommand::Down { name } => down(&name),
        LabCommand::StopAgent { node, kill, name } => {
            agents::stop(&mut LabState::load(&name)?, &node, kill)
        }
        LabCommand::StartAgent { node, name } => agents::start(&mut LabState::load(&name)?, &node),
        LabCommand::Status { name, json } => status(&LabState::load(&name)?, json),
        LabCommand::Apply { file, name } => apply(&mut LabState::load(&name)?, &file, false),
        LabCommand::Delete { file, name } => apply(&mut LabState::load(&name)?, &file, true),
        LabCommand::Exec {
            target,
            name,
            command,
        } => exec(&LabState::load(&name)?, &target, &command),
        LabCommand::Ping { name, json } => ping::matrix(&LabState::load(&name)?, json),
        LabCommand::Kubectl { name, args } => kubectl::exec(&LabState::load(&name)?, &args),
        LabCommand::ApiRelay { name } => relay::run(&LabState::load(&name)?),
        LabCommand::ControlPlane(args) => control_plane::run(args),
        LabCommand::NodeRuntime(args) => node_runtime::run(args),
        LabCommand::Image { .. } => unreachable!("handled above"),
    }
}

/// Where a lab's objects live, from `up`'s flags.
enum Store {
    /// A directory of the lab's own.
    Dir,
    /// A control plane of the lab's own (`--kubernetes`).
    OwnControlPlane,
    /// The API server of this kubeconfig (`--datastore kubernetes --kubeconfig FILE`).
    Server(PathBuf),
}

fn up(
    topology: Option<PathBuf>,
    name: Option<String>,
    store: Store,
    proxy_mode: node_runtime::kube_proxy::ProxyMode,
) -> Result<()> {
    let topo = match &topology {
        Some(path) => Topology::parse(
            &std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?,
        )
        .with_context(|| format!("topology {}", path.display()))?,
        None => Topology::default_lab(),
    };
    let name = name
        .or_else(|| topo.name.clone())
        .unwrap_or_else(|| DEFAULT_LAB.to_string());
    check_lab_name(&name)?;
    if lab_dir(&name).join("lab.json").exists() {
        bail!("lab {name:?} is already up; `sepal lab down --name {name}` first");
    }
    for r in &topo.routers {
        router::check_installed(r.kind)?;
    }
    objects::sibling_binary("sepal-cni")?;
    let node_ipam = matches!(store, Store::OwnControlPlane);
    if node_ipam {
        cluster::check_topology(&topo)?;
    }
    net::ensure_neighbour_room(neighbours(&topo))?;
    let mut lab = plan(&name, topo, node_ipam)?;
    match store {
        Store::OwnControlPlane => {
            lab.proxy_mode = Some(proxy_mode);
            lab.kubeconfig = Some(cluster::planned(&lab)?);
            std::fs::create_dir_all(lab.dir())?;
        }
        Store::Server(kc) => {
            let kc = std::path::absolute(&kc)?;
            relay::api_address(&kc)?;
            lab.kubeconfig = Some(ApiServer {
                version: kubeapi::version(&kc).ok(),
                admin_kubeconfig: kc.clone(),
                agent_kubeconfig: kc,
                control_plane: None,
            });
            std::fs::create_dir_all(lab.dir())?;
        }
        Store::Dir => std::fs::create_dir_all(lab.datastore())?,
    }
    lab.save()?;
    let started = Instant::now();
    match build(lab) {
        Ok(lab) => {
            eprintln!("lab {name} up in {:.1} s", started.elapsed().as_secs_f64());
            status(&lab, false)
        }
        Err(e) => {
            eprintln!("lab {name}: up failed, removing what was built");
            let _ = down(&name);
            Err(e)
        }
    }
}

/// About how many neighbour entries a family's table needs for the lab: on a switch every node
/// has every other as a neighbour; behind routers each link has two ends; each pod and its node
/// are neighbours of each other.
fn neighbours(topo: &Topology) -> usize {
    let n = topo.nodes.len();
    let links: usize = (0..n).map(|i| topo.routers_of(i).len()).sum();
    let segment = if topo.switched() { n * n } else { 2 * links };
    segment + 2 * topo.pods.len() + 4 * topo.routers.len()
}

/// Derives every name and address from the topology before anything is created, so `down`
/// can remove a half-built lab. With `node_ipam`, the nodes' blocks are left to the control
/// plane's node IPAM and filled in once it has handed them out.
fn plan(name: &str, topo: Topology, node_ipam: bool) -> Result<LabState> {
    let mut nodes = Vec::new();
    for (i, spec) in topo.nodes.iter().enumerate() {
        nodes.push(NodeState {
            name: spec.name.clone(),
            netns: format!("{name}-{}", spec.name),
            // On a switch the nodes mesh over iBGP in the cluster's AS; behind ToRs each node
            // has an AS of its own.
            as_number: spec.as_number.unwrap_or(match topo.switched() {
                true => CLUSTER_AS,
                false => 64512 + 1 + i as u32,
            }),
            uplinks: uplink_routers(&topo, i)
                .map(|r| router::node_addr(r, i))
                .collect(),
            uplinks6: match topo.pod_range6() {
                Some(_) => uplink_routers(&topo, i)
                    .map(|r| router::node_addr6(r, i))
                    .collect(),
                None => Vec::new(),
            },
            pod_cidrs: match node_ipam {
                true => Vec::new(),
                false => topo.node_blocks(i)?.iter().map(|b| b.to_string()).collect(),
            },
            pid: None,
            runtime_pid: None,
        });
    }
    let routers = topo
        .routers
        .iter()
        .map(|r| RouterState {
            name: r.name.clone(),
            kind: r.kind,
            netns: format!("{name}-{}", r.name),
            as_number: r.as_number,
            pids: Vec::new(),
            unnumbered: r.unnumbered,
        })
        .collect();
    Ok(LabState {
        name: name.to_string(),
        topology: topo,
        nodes,
        routers,
        pods: Vec::new(),
        kubeconfig: None,
        relay_pid: None,
        proxy_mode: None,
    })
}

/// The routers node `node` has a link to; a lab without routers still gives each node the
/// address it would have on router 0's link.
fn uplink_routers(topo: &Topology, node: usize) -> impl Iterator<Item = usize> {
    match topo.routers.is_empty() {
        true => vec![0],
        false => topo.routers_of(node),
    }
    .into_iter()
}

fn build(lab: LabState) -> Result<LabState> {
    if lab.real_nodes() {
        return real_nodes::build(lab);
    }
    build_with_own_agents(lab)
}

/// The lab whose agents it runs itself, on a dir datastore or an API server it does not own.
fn build_with_own_agents(mut lab: LabState) -> Result<LabState> {
    underlay(&lab, true)?;

    // The control plane's objects, then the agents that read them.
    for ns in &lab.topology.namespaces {
        objects::write_object(&lab, &objects::namespace_object(&ns.name, &ns.labels))?;
    }
    objects::write_object(
        &lab,
        &objects::namespace_object("default", &Default::default()),
    )?;
    for (node, spec) in lab.nodes.iter().zip(&lab.topology.nodes) {
        objects::write_object(&lab, &node_object(node, spec))?;
    }
    for obj in bgp_objects(&lab)
        .into_iter()
        .chain(lab.topology.manifests.clone())
    {
        objects::write_object(&lab, &obj)?;
    }
    if lab.kubeconfig.is_some() {
        lab.relay_pid = Some(relay::start(&lab)?);
        lab.save()?;
    }
    for i in 0..lab.nodes.len() {
        let pid = agents::spawn(&lab, i, false)?;
        lab.nodes[i].pid = Some(pid);
        lab.save()?;
    }
    for i in 0..lab.routers.len() {
        let pids = router::start(&lab, i)?;
        lab.routers[i].pids = pids;
        lab.save()?;
    }
    for node in &lab.nodes {
        wait_agent_ready(&lab, node)?;
    }

    // Pods, through CNI, as kubelet would create them.
    for spec in lab.topology.pods.clone() {
        let ports: Vec<Value> = spec
            .container_ports
            .iter()
            .map(|p| json!({"name": p.name, "containerPort": p.container_port, "protocol": p.protocol}))
            .collect();
        let object = json!({
            "metadata": {"name": spec.name, "namespace": spec.namespace, "labels": spec.labels},
            "spec": {"nodeName": spec.node, "containers": [{"name": "main", "image": "lab", "ports": ports}]},
        });
        let req = objects::PodRequest::from_object(&object)?;
        let pod = objects::create_pod(&lab, req)?;
        lab.pods.push(pod);
        lab.save()?;
    }
    wait_routes(&lab);
    Ok(lab)
}

/// Namespaces and the underlay: every node has one link to each router cabled to it (every
/// router, or its rack's ToRs), and a default route across them; spines are cabled to every
/// ToR. A real node's agent turns forwarding on itself (`forwarding` false).
fn underlay(lab: &LabState, forwarding: bool) -> Result<()> {
    for r in &lab.routers {
        net::add_netns(&r.netns, true)?;
        if r.kind == RouterKind::Switch {
            net::sh(
                &r.netns,
                "ip link add br0 type bridge && ip link set br0 up",
            )?;
        }
    }
    fabric::cable(lab)?;
    fabric::route_uplinks(lab)?;
    for (n, node) in lab.nodes.iter().enumerate() {
        net::add_netns(&node.netns, forwarding)?;
        let routers = lab.topology.routers_of(n);
        for (r, router) in routers.iter().map(|&r| (r, &lab.routers[r])) {
            let node_if = format!("eth{r}");
            let router_if = format!("n{}", n + 1);
            net::veth(&node.netns, &node_if, &router.netns, &router_if)?;
            if router.kind == RouterKind::Switch {
                switch_port(lab, n, r, &node_if, &router_if)?;
                continue;
            }
            net::sh(
                &node.netns,
                &format!("ip addr add {}/24 dev {node_if}", router::node_addr(r, n)),
            )?;
            net::sh(
                &router.netns,
                &format!(
                    "ip addr add {}/24 dev {router_if}",
                    router::router_addr(r, n)
                ),
            )?;
            fabric::route_subnet(lab, &router::link_subnet(r, n), r)?;
            if lab.dual_stack() {
                // Without duplicate address detection: the addresses are usable at once.
                net::sh(
                    &node.netns,
                    &format!(
                        "ip addr add {}/64 dev {node_if} nodad",
                        router::node_addr6(r, n)
                    ),
                )?;
                net::sh(
                    &router.netns,
                    &format!(
                        "ip addr add {}/64 dev {router_if} nodad",
                        router::router_addr6(r, n)
                    ),
                )?;
            }
        }
        // A switch is no gateway: off its segment there is nothing to reach.
        let routers: Vec<usize> = routers
            .into_iter()
            .filter(|&r| lab.routers[r].kind != RouterKind::Switch)
            .collect();
        let gateways: Vec<String> = routers
            .iter()
            .map(|&r| format!("nexthop via {}", router::router_addr(r, n)))
            .collect();
        if !gateways.is_empty() {
            net::sh(
                &node.netns,
                &format!("ip route add default {}", gateways.join(" ")),
            )?;
        }
        if lab.dual_stack() && !routers.is_empty() {
            let gateways6: Vec<String> = routers
                .iter()
                .map(|&r| format!("nexthop via {}", router::router_addr6(r, n)))
                .collect();
            net::sh(
                &node.netns,
                &format!("ip -6 route add default {}", gateways6.join(" ")),
            )?;
        }
    }
    Ok(())
}

/// A node's link to switch `r`: a bridge port on the switch, and on the node an address in the
/// one subnet all the switch's nodes share (10.r.0.0/16, fd00:r::/32), so every node is on-link
/// for every other and BGP next hops need no router.
fn switch_port(lab: &LabState, n: usize, r: usize, node_if: &str, port: &str) -> Result<()> {
    let (node, switch) = (&lab.nodes[n], &lab.routers[r]);
    net::sh(
        &switch.netns,
        &format!("ip link set {port} master br0 && ip link set {port} up"),
    )?;
    net::sh(
        &node.netns,
        &format!("ip addr add {}/16 dev {node_if}", router::node_addr(r, n)),
    )?;
    if lab.dual_stack() {
        net::sh(
            &node.netns,
            &format!(
                "ip addr add {}/32 dev {node_if} nodad",
                router::node_addr6(r, n)
            ),
        )?;
    }
    Ok(())
}

/// Waits until every router can forward to every pod, i.e. has the nodes' blocks from BGP in its
/// kernel (on a switch: every node has every other node's blocks), and every agent knows every
/// pod (other nodes learn a pod from its Pod object, written after its CNI ADD), so the first
/// `lab ping` or `sepal trace` after `up` sees the network as it will stay. A lab that has not
/// converged in time stays up, with a warning naming what is missing, for the operator to
/// inspect with `sepal status` and the router's own tools.
fn wait_routes(lab: &LabState) {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(60);
    // IPv6 pod addresses count only where the underlay carries IPv6.
    let routed: Vec<std::net::IpAddr> = lab
        .pods
        .iter()
        .flat_map(|p| p.ips.iter())
        .filter_map(|ip| ip.split('/').next()?.parse().ok())
        .filter(|ip: &std::net::IpAddr| lab.dual_stack() || ip.is_ipv4())
        .collect();
    loop {
        if unconverged(lab, &routed, false).is_empty() {
            if !lab.routers.is_empty() {
                eprintln!(
                    "routes and pods converged in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
            }
            return;
        }
        if Instant::now() > deadline {
            eprintln!(
                "warning: the lab has not converged after 60 s: {}",
                unconverged(lab, &routed, true).join(", ")
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What keeps the lab from having converged: a router (or, on a switch, a node) without a route
/// to a pod's address, an agent that does not know a pod. Without `all`, the first thing found.
fn unconverged(lab: &LabState, routed: &[std::net::IpAddr], all: bool) -> Vec<String> {
    let mut missing = Vec::new();
    for r in lab.routers.iter().filter(|r| r.kind != RouterKind::Switch) {
        for ip in routed {
            if net::sh(&r.netns, &format!("ip route get {ip}")).is_err() {
                missing.push(format!("{} has no route to {ip}", r.name));
                if !all {
                    return missing;
                }
            }
        }
    }
    if lab.topology.switched() {
        for node in &lab.nodes {
            let table = route_destinations(&node.netns);
            for ip in routed
                .iter()
                .filter(|ip| !table.iter().any(|d| d.contains(**ip)))
            {
                missing.push(format!("{} has no route to {ip}", node.name));
                if !all {
                    return missing;
                }
            }
        }
    }
    missing.extend(pods_unknown(lab, all));
    missing
}

/// The destinations of the namespace's main routing tables (IPv4 and IPv6), default routes left
/// out: on a switch's segment a node reaches what these cover, and nothing else.
fn route_destinations(netns: &str) -> Vec<ipnetwork::IpNetwork> {
    ["ip -j -4 route show", "ip -j -6 route show"]
        .iter()
        .filter_map(|cmd| net::sh(netns, cmd).ok())
        .filter_map(|text| serde_json::from_str::<Vec<Value>>(&text).ok())
        .flatten()
        .filter_map(|r| r["dst"].as_str()?.parse().ok())
        .collect()
}

/// "node does not know pod" for every agent that cannot yet resolve a lab pod to its addresses
/// (without `all`, the first one), asked as `sepal trace` asks each node on a packet's path.
fn pods_unknown(lab: &LabState, all: bool) -> Vec<String> {
    let mut unknown = Vec::new();
    for node in &lab.nodes {
        let socket = crate::admin::admin_socket_beside(&lab.socket(&node.name));
        for pod in &lab.pods {
            let name = format!("{}/{}", pod.namespace, pod.name);
            let request = crate::admin::AdminRequest::Trace(crate::admin::TraceRequest {
                from: name.clone(),
                to: name.clone(),
                port: None,
            });
            if crate::admin::call::<Value>(&socket, &request).is_err() {
                unknown.push(format!("{} does not know {name}", node.name));
                if !all {
                    return unknown;
                }
            }
        }
    }
    unknown
}

/// The lab's BGP design, as an operator would apply it: with BGP routers, every node peers (eBGP,
/// fast timers) with each router on its link and the node mesh is off; with a static router the
/// mesh is off too, as the router already carries every block; on a switch the nodes run the
/// iBGP mesh. A BGPConfiguration among the topology's manifests replaces the default one written
/// here (e.g. the mesh off, for route reflectors).
fn bgp_objects(lab: &LabState) -> Vec<Value> {
    let own_config = lab
        .topology
        .manifests
        .iter()
        .any(|m| m["kind"] == "BGPConfiguration");
    let mut objects = Vec::new();
    if !own_config && !lab.routers.is_empty() {
        objects.push(json!({
            "apiVersion": "sepal.dev/v1alpha1", "kind": "BGPConfiguration",
            "metadata": {"name": "default"},
            "spec": {"asNumber": CLUSTER_AS, "nodeToNodeMesh": lab.topology.switched(),
                     "keepaliveTime": "3s", "holdTime": "9s"},
        }));
    }
    for (r, router) in lab.routers.iter().enumerate() {
        if !router.kind.speaks_bgp() {
            continue;
        }
        for (n, node) in lab.nodes.iter().enumerate() {
            if !lab.topology.cabled(r, n) {
                continue;
            }
            let mut spec = json!({"asNumber": router.as_number, "node": node.name,
                                  "keepaliveTime": "3s", "holdTime": "9s"});
            if lab.topology.routers[r].bfd {
                spec["bfd"] = json!({"enabled": true});
            }
            if router.unnumbered {
                // The node's end of the link; the router's address comes from its RAs.
                spec["interface"] = json!(format!("eth{r}"));
            } else {
                spec["peerIP"] = json!(router::router_addr(r, n));
            }
            objects.push(json!({
                "apiVersion": "sepal.dev/v1alpha1", "kind": "BGPPeer",
                "metadata": {"name": format!("{}-{}", node.name, router.name)},
                "spec": spec,
            }));
        }
    }
    objects
}

/// The Node as the lab registers it; without podCIDRs when node IPAM is to give them.
fn node_object(node: &NodeState, spec: &topology::NodeSpec) -> Value {
    // IPv4 first: the agent peers from its first address. Its first IPv6 address is the next hop
    // of its IPv6 blocks towards mesh peers; a ToR session gives the address on its own link.
    let addresses: Vec<Value> = node
        .uplinks
        .iter()
        .chain(&node.uplinks6)
        .map(|a| json!({"type": "InternalIP", "address": a}))
        .collect();
    let mut object = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": node.name,
            "labels": {"kubernetes.io/hostname": node.name},
            "annotations": {"sepal.dev/as-number": node.as_number.to_string()},
        },
        "status": {"addresses": addresses},
    });
    if !node.pod_cidrs.is_empty() {
        object["spec"] = json!({"podCIDR": node.pod_cidrs.first(), "podCIDRs": node.pod_cidrs});
    }
    if let Some(id) = spec.route_reflector_cluster_id {
        object["metadata"]["annotations"]["sepal.dev/route-reflector-cluster-id"] =
            json!(id.to_string());
    }
    object
}

/// Waits until the node's agent answers STATUS through the plugin, as kubelet's readiness would.
fn wait_agent_ready(lab: &LabState, node: &NodeState) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let plugin = objects::sibling_binary("sepal-cni")?;
    let config = json!({"cniVersion": "1.1.0", "name": "sepal", "type": "sepal-cni", "socket": lab.socket(&node.name)});
    loop {
        let mut cmd = net::command_in(&node.netns, &[plugin.to_str().context("plugin path")?]);
        cmd.env("CNI_COMMAND", "STATUS")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null());
        let mut child = cmd.spawn()?;
        if let Some(mut stdin) = child.stdin.take() {
            use std::io::Write;
            let _ = stdin.write_all(config.to_string().as_bytes());
        }
        if child.wait()?.success() {
            return Ok(());
        }
        if node.pid.is_some_and(|pid| !net::alive(pid)) || Instant::now() > deadline {
            let log = std::fs::read_to_string(lab.node_dir(&node.name).join("agent.log"))
                .unwrap_or_default();
            bail!("agent on {} is not ready; its log:\n{log}", node.name);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn down(name: &str) -> Result<()> {
    check_lab_name(name)?;
    let Ok(lab) = LabState::load(name) else {
        eprintln!("lab {name} is not up");
        return Ok(());
    };
    // Real nodes first, all at once: each tears down its kubelet, containers and containerd.
    std::thread::scope(|scope| {
        for node in &lab.nodes {
            if let Some(pid) = node.runtime_pid {
                let dir = lab.node_dir(&node.name);
                scope.spawn(move || real_nodes::stop_node(pid, &dir));
            }
        }
    });
    for pid in lab
        .nodes
        .iter()
        .filter_map(|n| n.pid)
        .chain(lab.routers.iter().flat_map(|r| r.pids.clone()))
        .chain(lab.relay_pid)
    {
        net::stop(pid);
    }
    // After the agents, which would otherwise log the API server's going.
    if let Some(cp) = lab
        .kubeconfig
        .as_ref()
        .and_then(|k| k.control_plane.as_ref())
    {
        cluster::stop(cp);
    }
    // Pods first (their veth peers live in the nodes), then nodes and routers.
    let mut all = lab.all_netns();
    all.reverse();
    all.extend(
        lab.topology
            .pods
            .iter()
            .map(|p| lab.pod_netns(&p.namespace, &p.name)),
    );
    for ns in all {
        net::del_netns(&ns);
    }
    std::fs::remove_dir_all(lab.dir())
        .with_context(|| format!("remove {}", lab.dir().display()))?;
    eprintln!("lab {name} down");
    Ok(())
}

/// The stable JSON form of `status --json` (see the lab issue): names, namespaces, addresses.
fn status_json(lab: &LabState) -> Value {
    if lab.real_nodes() {
        return real_status_json(lab);
    }
    let nodes: Vec<Value> = lab
        .nodes
        .iter()
        .map(|n| {
            json!({"name": n.name, "netns": n.netns,
                   "addresses": net::addresses(&n.netns, |dev| dev.starts_with("eth")),
                   "podCIDRs": n.pod_cidrs})
        })
        .collect();
    let routers = routers_json(lab);
    let pods: Vec<Value> = lab
        .pods
        .iter()
        .map(|p| {
            json!({"namespace": p.namespace, "name": p.name, "node": p.node, "netns": p.netns,
                   "ips": p.ips, "labels": p.labels})
        })
        .collect();
    let datastore = match lab.admin_kubeconfig() {
        Some(kc) => json!({"kubernetes": kc}),
        None => json!(lab.datastore()),
    };
    let api = lab.kubeconfig.as_ref();
    json!({"name": lab.name, "datastore": datastore,
           "kubeconfig": api.map(|k| &k.admin_kubeconfig),
           "kubernetesVersion": api.and_then(|k| k.version.as_ref()),
           "nodes": nodes, "routers": routers, "links": cabling::links(lab), "pods": pods})
}

/// The routers, each with its role, rack and BGP sessions as its daemon reports them.
fn routers_json(lab: &LabState) -> Vec<Value> {
    lab.routers
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let spec = &lab.topology.routers[i];
            json!({"name": r.name, "kind": r.kind, "netns": r.netns,
                   "role": spec.role, "rack": spec.rack, "asNumber": r.as_number,
                   "addresses": net::addresses(&r.netns, |dev| dev != "lo"),
                   "sessions": cabling::sessions(lab, i)})
        })
        .collect()
}

/// A real cluster's status: its nodes and pods as the API server has them, and the images
/// every node holds.
fn real_status_json(lab: &LabState) -> Value {
    let routers = routers_json(lab);
    let (nodes, images, pods, error) =
        match (real_nodes::nodes_status(lab), real_nodes::pods_status(lab)) {
            (Ok((nodes, images)), Ok(pods)) => (nodes, images, pods, None),
            (Err(e), _) | (_, Err(e)) => {
                (Vec::new(), Vec::new(), Vec::new(), Some(format!("{e:#}")))
            }
        };
    let api = lab.kubeconfig.as_ref();
    let mut s = json!({"name": lab.name, "datastore": {"kubernetes": lab.admin_kubeconfig()},
           "kubeconfig": api.map(|k| &k.admin_kubeconfig),
           "kubernetesVersion": api.and_then(|k| k.version.as_ref()),
           "proxyMode": lab.proxy_mode,
           "nodes": nodes, "routers": routers, "links": cabling::links(lab), "pods": pods,
           "images": images});
    if let Some(e) = error {
        s["error"] = json!(e);
    }
    s
}

/// The lab router that holds `ip` on one of its links (for `sepal trace` to name the hop).
pub fn router_with_address(lab: &LabState, ip: std::net::IpAddr) -> Option<String> {
    let ip = ip.to_string();
    lab.routers
        .iter()
        .find(|r| {
            net::addresses(&r.netns, |_| true)
                .iter()
                .any(|a| a.split('/').next() == Some(ip.as_str()))
        })
        .map(|r| r.name.clone())
}

fn status(lab: &LabState, as_json: bool) -> Result<()> {
    let s = status_json(lab);
    if as_json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    match &lab.kubeconfig {
        Some(api) => {
            let version = api.version.as_deref().unwrap_or("version unknown");
            let whose = match api.control_plane {
                Some(_) => "its own control plane",
                None => "an API server it does not own",
            };
            println!(
                "lab {}   datastore kubernetes: {whose}, Kubernetes {version}",
                lab.name
            );
            println!(
                "kubeconfig {}   (`sepal lab kubectl --name {} -- get nodes`)",
                api.admin_kubeconfig.display(),
                lab.name
            );
        }
        None => println!("lab {}   datastore {}", lab.name, lab.datastore().display()),
    }
    println!(
        "\n{:<12} {:<22} {:<28} POD CIDRS",
        "NODE", "NETNS", "ADDRESSES"
    );
    for n in s["nodes"].as_array().into_iter().flatten() {
        println!(
            "{:<12} {:<22} {:<28} {}",
            n["name"].as_str().unwrap_or(""),
            n["netns"].as_str().unwrap_or(""),
            join(&n["addresses"]),
            join(&n["podCIDRs"])
        );
    }
    if !lab.routers.is_empty() {
        print_fabric(&s);
    }
    println!(
        "\n{:<24} {:<8} {:<16} {:<34} LABELS",
        "POD",
        "NODE",
        "IPS",
        if lab.real_nodes() { "STATUS" } else { "NETNS" }
    );
    if lab.real_nodes() {
        for p in s["pods"].as_array().into_iter().flatten() {
            println!(
                "{:<24} {:<8} {:<16} {:<34} {}",
                format!(
                    "{}/{}",
                    p["namespace"].as_str().unwrap_or(""),
                    p["name"].as_str().unwrap_or("")
                ),
                p["node"].as_str().unwrap_or(""),
                join(&p["ips"]),
                match p["ready"].as_bool() {
                    Some(true) => "Ready",
                    _ => p["phase"].as_str().unwrap_or("Pending"),
                },
                p["labels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
        if let Some(e) = s["error"].as_str() {
            println!("\nthe API server did not answer: {e}");
        }
        return Ok(());
    }
    for p in &lab.pods {
        let labels: Vec<String> = p.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<24} {:<8} {:<16} {:<34} {}",
            format!("{}/{}", p.namespace, p.name),
            p.node,
            p.ips.join(","),
            p.netns,
            labels.join(",")
        );
    }
    Ok(())
}

/// The routers, the cables and every router's sessions, from `status --json`'s values.
fn print_fabric(s: &Value) {
    let text = |v: &Value| v.as_str().unwrap_or("").to_string();
    println!(
        "\n{:<12} {:<22} {:<8} {:<6} {:<6} {:<7} ADDRESSES",
        "ROUTER", "NETNS", "KIND", "ROLE", "RACK", "AS"
    );
    let routers = s["routers"].as_array().cloned().unwrap_or_default();
    for r in &routers {
        let kind = match r["kind"].as_str() {
            Some("none") => "static".to_string(),
            _ => text(&r["kind"]),
        };
        println!(
            "{:<12} {:<22} {:<8} {:<6} {:<6} {:<7} {}",
            text(&r["name"]),
            text(&r["netns"]),
            kind,
            text(&r["role"]),
            r["rack"].as_str().unwrap_or("-"),
            match kind.as_str() {
                "switch" => "-".to_string(),
                _ => r["asNumber"].to_string(),
            },
            join(&r["addresses"])
        );
    }
    println!("\n{:<36} CABLED TO", "LINK");
    for l in s["links"].as_array().into_iter().flatten() {
        let end = |e: &Value| {
            format!(
                "{} {} {}",
                text(&e["name"]),
                text(&e["interface"]),
                text(&e["address"])
            )
        };
        println!("{:<36} {}", end(&l["a"]), end(&l["b"]));
    }
    println!("\n{:<12} {:<12} {:<26} STATE", "ROUTER", "PEER", "ADDRESS");
    for r in &routers {
        for session in r["sessions"].as_array().into_iter().flatten() {
            println!(
                "{:<12} {:<12} {:<26} {}",
                text(&r["name"]),
                text(&session["peer"]),
                text(&session["address"]),
                text(&session["state"])
            );
        }
    }
}

fn join(v: &Value) -> String {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn apply(lab: &mut LabState, file: &PathBuf, delete: bool) -> Result<()> {
    let text = std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
    let docs = objects::documents(&text).with_context(|| format!("parse {}", file.display()))?;
    if lab.real_nodes() {
        return real_nodes::apply(lab, &text, &docs, delete);
    }
    for obj in docs {
        let kind = obj["kind"]
            .as_str()
            .context("object without kind")?
            .to_string();
        let id = format!(
            "{}/{}",
            kind.to_ascii_lowercase(),
            obj["metadata"]["name"].as_str().unwrap_or("?")
        );
        match (kind.as_str(), delete) {
            ("Pod", false) => {
                let req = objects::PodRequest::from_object(&obj)?;
                let existing = lab
                    .pods
                    .iter()
                    .position(|p| p.namespace == req.namespace && p.name == req.name);
                if let Some(i) = existing {
                    lab.pods[i].labels = req.labels.clone();
                    objects::write_pod(lab, &lab.pods[i], req.object)?;
                    println!("{id} configured");
                } else {
                    let pod = objects::create_pod(lab, req)?;
                    lab.pods.push(pod);
                    println!("{id} created");
                }
            }
            ("Pod", true) => {
                let req = objects::PodRequest::from_object(&obj).ok();
                let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default");
                let name = obj["metadata"]["name"].as_str().unwrap_or_default();
                let _ = req;
                if let Some(i) = lab
                    .pods
                    .iter()
                    .position(|p| p.namespace == ns && p.name == name)
                {
                    let pod = lab.pods.remove(i);
                    objects::delete_pod(lab, &pod)?;
                    println!("{id} deleted");
                } else {
                    println!("{id} not found");
                }
            }
            ("Namespace", false) => {
                let name = obj["metadata"]["name"]
                    .as_str()
                    .context("Namespace without name")?;
                let labels =
                    serde_json::from_value(obj["metadata"]["labels"].clone()).unwrap_or_default();
                objects::write_object(lab, &objects::namespace_object(name, &labels))?;
                println!("{id} configured");
            }
            (_, false) => {
                objects::write_object(lab, &obj)?;
                println!("{id} configured");
            }
            (_, true) => {
                objects::remove_object(lab, &obj)?;
                println!("{id} deleted");
            }
        }
        lab.save()?;
    }
    Ok(())
}

fn exec(lab: &LabState, target: &str, command: &[String]) -> Result<()> {
    use std::os::unix::process::CommandExt;
    if let (Some((ns, pod)), true) = (target.split_once('/'), lab.real_nodes()) {
        // A real Pod: as its owner would, through the API server and its kubelet.
        let mut args = vec![
            "exec".to_string(),
            "-n".into(),
            ns.into(),
            pod.into(),
            "--".into(),
        ];
        args.extend(command.iter().cloned());
        return kubectl::exec(lab, &args);
    }
    let netns = if let Some((ns, pod)) = target.split_once('/') {
        lab.pod(ns, pod)
            .with_context(|| format!("no pod {target} in lab {}", lab.name))?
            .netns
            .clone()
    } else if let Some(node) = lab.node(target) {
        node.netns.clone()
    } else if let Some(router) = lab.routers.iter().find(|r| r.name == target) {
        router.netns.clone()
    } else {
        bail!("no node, router or pod {target:?} in lab {}", lab.name);
    };
    let args: Vec<&str> = command.iter().map(String::as_str).collect();
    let err = net::command_in(&netns, &args).exec();
    Err(err).with_context(|| format!("exec in {netns}"))
}
