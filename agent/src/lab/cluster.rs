//! The lab's own Kubernetes control plane (`up --kubernetes`): started inside the lab's
//! directory with the topology's pod ranges and block sizes, so kube-controller-manager's node
//! IPAM hands out the Nodes' podCIDRs as in a real cluster, and stopped by `down`.

use super::control_plane::{self, components::Layout, Endpoints};
use super::state::{ApiServer, LabState, OwnControlPlane};
use super::topology::Topology;
use anyhow::{bail, Context, Result};
use ipnetwork::IpNetwork;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long kube-controller-manager may take to give a new Node its podCIDRs.
const POD_CIDR_TIMEOUT: Duration = Duration::from_secs(30);

/// `sepal lab control-plane` flags for the topology: its first IPv4 pod range, its first IPv6
/// one too in a dual-stack lab, and the node block sizes.
pub fn cluster_args(topo: &Topology, bin_dir: &Path) -> Result<Vec<String>> {
    let v4 = topo
        .pod_cidr
        .iter()
        .find(|c| c.is_ipv4())
        .context("the topology's podCIDR has no IPv4 range for node IPAM")?;
    let mut ranges = vec![v4.to_string()];
    ranges.extend(topo.pod_range6().map(|r| r.to_string()));
    let bin = bin_dir.to_str().context("the Kubernetes binaries' path")?;
    Ok(vec![
        format!("--bin-dir={bin}"),
        format!("--cluster-cidr={}", ranges.join(",")),
        format!("--node-cidr-mask-size={}", topo.block_size),
        format!("--node-cidr-mask-size-ipv6={}", topo.block_size6),
    ])
}

/// Node IPAM plans the blocks here: a node's own podCIDRs in the topology would be a second plan.
pub fn check_topology(topo: &Topology) -> Result<()> {
    if let Some(n) = topo
        .nodes
        .iter()
        .find(|n| n.route_reflector_cluster_id.is_some())
    {
        bail!(
            "node {}: routeReflectorClusterID is for labs on a dir datastore; with --kubernetes \
             annotate the Node with sepal.dev/route-reflector-cluster-id instead",
            n.name
        );
    }
    if let Some(n) = topo.nodes.iter().find(|n| !n.pod_cidrs.is_empty()) {
        bail!(
            "node {} gives its own podCIDRs; with --kubernetes, kube-controller-manager hands \
             them out from the topology's podCIDR (remove them, or use the dir datastore)",
            n.name
        );
    }
    Ok(())
}

/// What the lab records before its control plane starts: where it will be, and with what.
pub fn planned(lab: &LabState) -> Result<ApiServer> {
    let dir = lab.control_plane_dir();
    let env = std::env::var_os("SEPAL_KUBE_BIN").map(std::path::PathBuf::from);
    let bin_dir = control_plane::bin_dir(env.as_deref())?;
    Ok(ApiServer {
        admin_kubeconfig: Layout { dir: dir.clone() }.admin_kubeconfig(),
        agent_kubeconfig: lab.dir().join("agent.kubeconfig"),
        version: None,
        control_plane: Some(OwnControlPlane {
            dir,
            bin_dir,
            pid: None,
        }),
    })
}

/// Starts the lab's control plane and waits until every component is ready; its supervisor's
/// PID is in the lab's state from the moment it runs, so `down` stops a start it interrupted.
pub fn start(lab: &mut LabState, netns: Option<&Path>, extra: &[String]) -> Result<Endpoints> {
    let cp = own(lab)?.clone();
    let mut args = cluster_args(&lab.topology, &cp.bin_dir)?;
    args.extend(extra.iter().cloned());
    let endpoints = control_plane::start_detached(&cp.dir, netns, &args, |pid| {
        set_pid(lab, pid);
        lab.save()
    })
    .map_err(|e| anyhow::anyhow!("{}", supervisor_error(&format!("{e:#}"))))?;
    set_pid(lab, endpoints.pid);
    if let Some(api) = lab.kubeconfig.as_mut() {
        api.admin_kubeconfig = endpoints.admin_kubeconfig.clone();
        api.version = Some(endpoints.kubernetes_version.clone());
    }
    lab.save()?;
    // The supervisor is this process's child until `up` exits: reap it when it exits (a failed
    // `up` stops it), or `stop` would wait on a zombie.
    let pid = nix::unistd::Pid::from_raw(endpoints.pid as i32);
    std::thread::spawn(move || nix::sys::wait::waitpid(pid, None));
    Ok(endpoints)
}

/// The supervisor's own error (it names the component and its log), from the tail of its log
/// that a failed start reports: the lines before it are the components' progress.
fn supervisor_error(tail: &str) -> String {
    const MARK: &str = "sepal: error: ";
    match tail.rfind(MARK) {
        Some(i) => tail[i + MARK.len()..].to_string(),
        None => format!("the lab's control plane did not start: {tail}"),
    }
}

fn own(lab: &LabState) -> Result<&OwnControlPlane> {
    lab.kubeconfig
        .as_ref()
        .and_then(|k| k.control_plane.as_ref())
        .context("this lab has no control plane of its own")
}

fn set_pid(lab: &mut LabState, pid: u32) {
    if let Some(cp) = lab
        .kubeconfig
        .as_mut()
        .and_then(|k| k.control_plane.as_mut())
    {
        cp.pid = Some(pid);
    }
}

/// Stops the control plane and every component, if its supervisor still runs. Only a process
/// whose command line names the control plane's directory is signalled: after a crash and a
/// reboot, the recorded PID may be someone else's.
pub fn stop(cp: &OwnControlPlane) {
    let Some(pid) = cp.pid else { return };
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let dir = cp.dir.as_os_str().as_encoded_bytes();
    if cmdline.split(|b| *b == 0).any(|arg| arg == dir) {
        control_plane::stop(pid);
    }
}

/// Waits until kube-controller-manager has given every Node its podCIDRs (both families in a
/// dual-stack lab) and records them in the lab's nodes: the agents and a static router use them.
pub fn read_pod_cidrs(lab: &mut LabState) -> Result<()> {
    let kubeconfig = lab
        .admin_kubeconfig()
        .context("the lab has no API server")?
        .to_path_buf();
    let families = 1 + usize::from(lab.dual_stack());
    let deadline = Instant::now() + POD_CIDR_TIMEOUT;
    for i in 0..lab.nodes.len() {
        let name = lab.nodes[i].name.clone();
        let cidrs = loop {
            let node = super::kubeapi::get(&kubeconfig, "v1", "Node", &name)?
                .with_context(|| format!("Node {name} is not in the API server"))?;
            let cidrs: Vec<String> = node["spec"]["podCIDRs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|c| c.as_str().map(str::to_string))
                .collect();
            if cidrs.len() >= families {
                break cidrs;
            }
            if Instant::now() > deadline {
                let log = own(lab)?.dir.join("logs/kube-controller-manager.log");
                bail!(
                    "kube-controller-manager gave Node {name} no podCIDRs in {} s; its log is {}",
                    POD_CIDR_TIMEOUT.as_secs(),
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        for c in &cidrs {
            c.parse::<IpNetwork>()
                .with_context(|| format!("Node {name}'s podCIDR {c:?}"))?;
        }
        lab.nodes[i].pod_cidrs = cidrs;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ipam_gets_the_topologys_ranges_and_block_sizes() {
        let topo = Topology::default_lab();
        let a = cluster_args(&topo, Path::new("/k")).unwrap();
        assert_eq!(
            a,
            [
                "--bin-dir=/k",
                "--cluster-cidr=10.244.0.0/16",
                "--node-cidr-mask-size=24",
                "--node-cidr-mask-size-ipv6=64"
            ]
        );
        let dual = Topology::parse(
            "podCIDR: [10.8.0.0/16, fd00:8::/56]\nblockSize: 26\nblockSize6: 80\nnodes: [{name: a}]\n",
        )
        .unwrap();
        let a = cluster_args(&dual, Path::new("/k")).unwrap();
        assert!(a.contains(&"--cluster-cidr=10.8.0.0/16,fd00:8::/56".to_string()));
        assert!(a.contains(&"--node-cidr-mask-size=26".to_string()));
        assert!(a.contains(&"--node-cidr-mask-size-ipv6=80".to_string()));
    }

    #[test]
    fn a_failed_start_reports_the_supervisors_error() {
        let tail = "\x1b[2m..\x1b[0m INFO ready component=etcd\nsepal: error: the control plane \
                    did not start: kube-apiserver exited (exit status: 1); its log is /x:\nbad flag";
        assert_eq!(
            supervisor_error(tail),
            "the control plane did not start: kube-apiserver exited (exit status: 1); \
             its log is /x:\nbad flag"
        );
        assert_eq!(
            supervisor_error("no such file"),
            "the lab's control plane did not start: no such file"
        );
    }

    #[test]
    fn a_nodes_own_pod_cidrs_are_refused() {
        let own = Topology::parse("nodes: [{name: a, podCIDRs: [10.9.0.0/24]}]\n").unwrap();
        assert!(check_topology(&own)
            .unwrap_err()
            .to_string()
            .contains("node a"));
        assert!(check_topology(&Topology::default_lab()).is_ok());
    }
}
