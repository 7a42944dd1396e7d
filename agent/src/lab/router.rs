//! The lab's top-of-rack routers: BIRD 2, FRR or GoBGP peering with every node (eBGP), or a plain
//! L3 switch with static routes (`none`). Configs use fast timers so a lab converges in seconds.

use super::net;
use super::state::{LabState, NodeState, RouterState};
use super::topology::RouterKind;
use anyhow::{bail, Context, Result};
use std::fmt::Write as _;
use std::path::Path;

/// Fails with the Debian package to install when a router's daemon is missing.
pub fn check_installed(kind: RouterKind) -> Result<()> {
    let Some((program, package)) = kind.package() else {
        return Ok(());
    };
    let found = if program.starts_with('/') {
        Path::new(program).exists()
    } else {
        std::env::var_os("PATH")
            .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
            .unwrap_or(false)
    };
    if !found {
        bail!("router kind {kind:?} needs {program}: install the Debian package `{package}` (apt-get install -y {package})");
    }
    Ok(())
}

/// Router `index`'s address on its link to node `node_index` (both 0-based).
pub fn router_addr(index: usize, node_index: usize) -> String {
    format!("10.{index}.{}.1", node_index + 1)
}

/// Node `node_index`'s address on its link to router `index`.
pub fn node_addr(index: usize, node_index: usize) -> String {
    format!("10.{index}.{}.2", node_index + 1)
}

/// Starts the router's routing (daemon or static routes) once its links and the nodes exist.
pub fn start(lab: &LabState, index: usize) -> Result<Vec<u32>> {
    let router = &lab.routers[index];
    let dir = lab.router_dir(&router.name);
    std::fs::create_dir_all(&dir)?;
    match router.kind {
        RouterKind::None => {
            static_routes(router, index, &lab.nodes)?;
            Ok(Vec::new())
        }
        RouterKind::Bird => start_bird(router, index, &lab.nodes, &dir),
        RouterKind::Frr => start_frr(router, index, &lab.nodes, &dir),
        RouterKind::Gobgp => start_gobgp(router, index, &lab.nodes, &dir),
    }
}

fn static_routes(router: &RouterState, index: usize, nodes: &[NodeState]) -> Result<()> {
    for (n, node) in nodes.iter().enumerate() {
        for block in &node.pod_cidrs {
            if !block.contains(':') {
                net::sh(
                    &router.netns,
                    &format!("ip route replace {block} via {}", node_addr(index, n)),
                )?;
            }
        }
    }
    Ok(())
}

/// BIRD 2: one eBGP session per node, routes learned go to the router's kernel (ECMP merged).
pub fn bird_config(router: &RouterState, index: usize, nodes: &[NodeState]) -> String {
    let mut c = format!(
        "router id {rid};\nprotocol device {{ }}\n\
         protocol kernel {{ merge paths on; ipv4 {{ import none; export where source = RTS_BGP; }}; }}\n\
         template bgp nodes {{\n  local as {asn};\n  connect delay time 1; connect retry time 1; error wait time 1, 5;\n  \
         hold time 9; keepalive time 3;\n  graceful restart on;\n  ipv4 {{ import all; export all; }};\n}}\n",
        rid = router_addr(index, 0),
        asn = router.as_number
    );
    for (n, node) in nodes.iter().enumerate() {
        let _ = writeln!(
            c,
            "protocol bgp {} from nodes {{ local {} as {}; neighbor {} as {}; }}",
            bird_name(&node.name),
            router_addr(index, n),
            router.as_number,
            node_addr(index, n),
            node.as_number
        );
    }
    c
}

/// BIRD protocol names are identifiers; node names may hold '-'.
fn bird_name(node: &str) -> String {
    format!("n_{}", node.replace('-', "_"))
}

fn start_bird(
    router: &RouterState,
    index: usize,
    nodes: &[NodeState],
    dir: &Path,
) -> Result<Vec<u32>> {
    let conf = dir.join("bird.conf");
    std::fs::write(&conf, bird_config(router, index, nodes))?;
    let (ctl, log) = (dir.join("bird.ctl"), dir.join("bird.log"));
    let pid = net::spawn_daemon(
        &router.netns,
        &["bird", "-f", "-c", path(&conf)?, "-s", path(&ctl)?],
        &log,
    )?;
    Ok(vec![pid])
}

/// FRR: zebra (kernel routes) + bgpd, run as the `frr` user with sockets in the lab directory.
pub fn frr_config(router: &RouterState, index: usize, nodes: &[NodeState]) -> String {
    let mut c = format!(
        "frr defaults traditional\nhostname {}\nrouter bgp {}\n bgp router-id {}\n no bgp ebgp-requires-policy\n \
         no bgp network import-check\n bgp graceful-restart\n",
        router.name,
        router.as_number,
        router_addr(index, 0)
    );
    for (n, node) in nodes.iter().enumerate() {
        let peer = node_addr(index, n);
        let _ = write!(
            c,
            " neighbor {peer} remote-as {}\n neighbor {peer} timers 3 9\n neighbor {peer} timers connect 1\n",
            node.as_number
        );
    }
    c.push_str(" address-family ipv4 unicast\n  maximum-paths 8\n exit-address-family\n");
    c
}

fn start_frr(
    router: &RouterState,
    index: usize,
    nodes: &[NodeState],
    dir: &Path,
) -> Result<Vec<u32>> {
    let zebra = start_frr_daemon(router, dir, "zebra", "")?;
    let config = frr_config(router, index, nodes);
    let bgpd = start_frr_daemon(router, dir, "bgpd", &config)?;
    Ok(vec![zebra, bgpd])
}

/// Where FRR's daemons of one router keep their sockets and pid files; zebra's API socket is
/// `zserv.api` in it.
fn frr_run_dir(dir: &Path) -> std::path::PathBuf {
    dir.join("frr")
}

/// Starts one FRR daemon (`zebra` or `bgpd`) with `config`, as the `frr` user it drops to, with
/// its sockets in the router's directory; waits for zebra's API socket before returning.
fn start_frr_daemon(router: &RouterState, dir: &Path, daemon: &str, config: &str) -> Result<u32> {
    let run = frr_run_dir(dir);
    std::fs::create_dir_all(&run)?;
    let chown = std::process::Command::new("chown")
        .args(["-R", "frr:frr", path(dir)?])
        .status()?;
    if !chown.success() {
        bail!(
            "chown frr:frr {} failed (is the frr package installed?)",
            dir.display()
        );
    }
    let conf = dir.join(format!("{daemon}.conf"));
    std::fs::write(&conf, config)?;
    let (binary, pid_file, zserv) = (
        format!("/usr/lib/frr/{daemon}"),
        run.join(format!("{daemon}.pid")),
        run.join("zserv.api"),
    );
    let args = [
        binary.as_str(),
        "-P",
        "0",
        "-f",
        path(&conf)?,
        "-i",
        path(&pid_file)?,
        "-z",
        path(&zserv)?,
        "--vty_socket",
        path(&run)?,
    ];
    let pid = net::spawn_daemon(&router.netns, &args, &dir.join(format!("{daemon}.log")))?;
    if daemon == "zebra" {
        wait_for(&zserv)?;
    }
    Ok(pid)
}

/// GoBGP: gobgpd peering with every node; it installs nothing in the kernel by itself, so it
/// feeds FRR's zebra (started alongside) over the zebra API, as GoBGP deployments do.
pub fn gobgp_config(
    router: &RouterState,
    index: usize,
    nodes: &[NodeState],
    zserv: &Path,
) -> String {
    let mut c = format!(
        "[global.config]\n  as = {}\n  router-id = \"{}\"\n\n[zebra.config]\n  enabled = true\n  url = \"unix:{}\"\n  version = 6\n  software-name = \"frr8.4\"\n",
        router.as_number,
        router_addr(index, 0),
        zserv.display()
    );
    for (n, node) in nodes.iter().enumerate() {
        let _ = write!(
            c,
            "\n[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{}\"\n    peer-as = {}\n  \
             [neighbors.timers.config]\n    connect-retry = 1\n    hold-time = 9\n    keepalive-interval = 3\n",
            node_addr(index, n),
            node.as_number
        );
    }
    c
}

fn start_gobgp(
    router: &RouterState,
    index: usize,
    nodes: &[NodeState],
    dir: &Path,
) -> Result<Vec<u32>> {
    let zebra = start_frr_daemon(router, dir, "zebra", "")?;
    let conf = dir.join("gobgpd.toml");
    let zserv = frr_run_dir(dir).join("zserv.api");
    std::fs::write(&conf, gobgp_config(router, index, nodes, &zserv))?;
    let gobgpd = net::spawn_daemon(
        &router.netns,
        &["gobgpd", "-f", path(&conf)?, "--pprof-disable", "-p"],
        &dir.join("gobgpd.log"),
    )?;
    Ok(vec![zebra, gobgpd])
}

fn wait_for(socket: &Path) -> Result<()> {
    for _ in 0..100 {
        if socket.exists() {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    bail!("{} did not appear", socket.display())
}

fn path(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("non-UTF-8 path {}", p.display()))
}
