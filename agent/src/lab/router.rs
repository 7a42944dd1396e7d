//! The lab's top-of-rack routers: BIRD 2, FRR or GoBGP peering with every node (eBGP), or a plain
//! L3 switch with static routes (`none`). Configs use fast timers so a lab converges in seconds.

use super::fabric;
use super::net;
use super::peering;
use super::state::{LabState, NodeState, RouterState};
use super::topology::{RouterKind, RouterRole};
use anyhow::{bail, Context, Result};
use ipnetwork::IpNetwork;
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

/// The IPv4 subnet of that link.
pub fn link_subnet(index: usize, node_index: usize) -> String {
    format!("10.{index}.{}.0/24", node_index + 1)
}

/// The router's IPv6 address on that link, in a dual-stack lab (a /64 per link).
pub fn router_addr6(index: usize, node_index: usize) -> String {
    format!("fd00:{index}:{}::1", node_index + 1)
}

/// The node's IPv6 address on its link to router `index`, in a dual-stack lab.
pub fn node_addr6(index: usize, node_index: usize) -> String {
    format!("fd00:{index}:{}::2", node_index + 1)
}

/// Starts the router's routing (daemon or static routes) once its links and the nodes exist.
pub fn start(lab: &LabState, index: usize) -> Result<Vec<u32>> {
    let router = &lab.routers[index];
    let dir = lab.router_dir(&router.name);
    std::fs::create_dir_all(&dir)?;
    // The ToR accepts only prefixes inside the cluster's pod ranges.
    let pod_range = lab
        .topology
        .pod_cidr
        .iter()
        .find(|n| n.is_ipv4())
        .copied()
        .context("the topology's podCIDR has no IPv4 range for the ToR's import filter")?;
    let ranges = PodRanges {
        v4: pod_range,
        v6: lab.topology.pod_range6().map(IpNetwork::V6),
        services: service_range(&lab.topology.manifests),
    };
    let spec = &lab.topology.routers[index];
    if spec.role == RouterRole::Spine {
        return fabric::start_spine(lab, index, &ranges, &dir);
    }
    // The nodes on this router's links, with their positions (addresses derive from them).
    let nodes: Vec<(usize, &NodeState)> = lab
        .nodes
        .iter()
        .enumerate()
        .filter(|(n, _)| lab.topology.cabled(index, *n))
        .collect();
    let tor = Tor {
        router,
        index,
        nodes: &nodes,
        ranges: &ranges,
        bfd: spec.bfd,
    };
    match router.kind {
        RouterKind::None => {
            static_routes(&tor, ranges.v6.is_some())?;
            Ok(Vec::new())
        }
        // The bridge forwards as soon as its ports exist (see the lab's underlay).
        RouterKind::Switch => Ok(Vec::new()),
        RouterKind::Bird => start_bird(lab, &tor, &dir),
        RouterKind::Frr => start_frr(lab, &tor, &dir),
        RouterKind::Gobgp => start_gobgp(lab, &tor, &dir),
    }
}

/// A top-of-rack router as its configuration sees it: the nodes it is cabled to.
pub struct Tor<'a> {
    pub router: &'a RouterState,
    pub index: usize,
    pub nodes: &'a [(usize, &'a NodeState)],
    pub ranges: &'a PodRanges,
    /// BFD on its sessions (BIRD, FRR).
    pub bfd: bool,
}

/// The cluster's pod ranges the ToR accepts routes in; `v6` only in a dual-stack lab.
pub struct PodRanges {
    pub v4: IpNetwork,
    pub v6: Option<IpNetwork>,
    /// The first IPv4 Service range the topology's BGPConfiguration advertises, if any.
    pub services: Option<IpNetwork>,
}

/// The first IPv4 range among the Service addresses a BGPConfiguration in `manifests`
/// advertises (serviceExternalIPs, serviceLoadBalancerIPs, serviceClusterIPs).
pub fn service_range(manifests: &[serde_json::Value]) -> Option<IpNetwork> {
    let config = manifests.iter().find(|m| m["kind"] == "BGPConfiguration")?;
    [
        "serviceExternalIPs",
        "serviceLoadBalancerIPs",
        "serviceClusterIPs",
    ]
    .iter()
    .flat_map(|k| config["spec"][k].as_array().cloned().unwrap_or_default())
    .filter_map(|e| e["cidr"].as_str()?.parse::<IpNetwork>().ok())
    .find(|n| n.is_ipv4())
}

/// A plain L3 switch: a route to every node block via the node's address on its link (IPv6
/// blocks only where the link has IPv6, in a dual-stack lab).
fn static_routes(tor: &Tor, dual_stack: bool) -> Result<()> {
    let (router, index) = (tor.router, tor.index);
    for &(n, node) in tor.nodes {
        for block in &node.pod_cidrs {
            let via = match block.contains(':') {
                false => node_addr(index, n),
                true if dual_stack => node_addr6(index, n),
                true => continue,
            };
            net::sh(
                &router.netns,
                &format!("ip route replace {block} via {via}"),
            )?;
        }
    }
    Ok(())
}

/// Hold and keepalive times of the lab's ToR sessions (the nodes' BGPPeers use the same).
pub const HOLD: &str = "9";
pub const KEEPALIVE: &str = "3";

/// The values the peering templates (docs/peering/) take for router `index`: no password and
/// no default route in the lab; the cluster's pod ranges as the import filter (the templates'
/// IPv6 sections only in a dual-stack lab).
fn template_values(tor: &Tor) -> (peering::Values, Vec<peering::Values>) {
    let (router, index, ranges) = (tor.router, tor.index, tor.ranges);
    let pod_range = &ranges.v4;
    let mut global = peering::values([
        ("ROUTER_ID", Some(router_addr(index, 0))),
        ("TOR_AS", Some(router.as_number.to_string())),
        ("HOLD", Some(HOLD.into())),
        ("KEEPALIVE", Some(KEEPALIVE.into())),
        ("PASSWORD", None),
        ("DEFAULT_ROUTE", None),
        ("POD_RANGE", Some(pod_range.to_string())),
        ("POD_RANGE_LEN", Some(pod_range.prefix().to_string())),
        ("SERVICE_RANGE", ranges.services.map(|r| r.to_string())),
        (
            "SERVICE_RANGE_LEN",
            ranges.services.map(|r| r.prefix().to_string()),
        ),
    ]);
    global.extend(peering::values([
        ("POD_RANGE6", ranges.v6.map(|r| r.to_string())),
        ("POD_RANGE6_LEN", ranges.v6.map(|r| r.prefix().to_string())),
    ]));
    let per_node = tor
        .nodes
        .iter()
        .map(|&(n, node)| {
            peering::values([
                ("NAME", Some(bird_name(&node.name))),
                ("TOR_ADDR", Some(router_addr(index, n))),
                ("NODE_ADDR", Some(node_addr(index, n))),
                ("NODE_AS", Some(node.as_number.to_string())),
                ("TOR_ADDR6", ranges.v6.map(|_| router_addr6(index, n))),
            ])
        })
        .collect();
    (global, per_node)
}

/// One of the peering templates filled for a ToR.
pub fn config(template: &str, tor: &Tor) -> Result<String> {
    let (global, per_node) = template_values(tor);
    peering::render(template, &global, &per_node)
        .map_err(|e| anyhow::anyhow!("ToR config template: {e}"))
}

/// The router's interface on its link to node `node_index`.
pub fn router_if(node_index: usize) -> String {
    format!("n{}", node_index + 1)
}

/// The guide's FRR configuration turned unnumbered: each node's neighbor is the router's
/// interface to it (`neighbor IFACE interface`), found by router advertisements, sent every 3 s
/// so the lab comes up fast.
fn unnumbered_frr(config: &str, tor: &Tor) -> String {
    let mut out = String::new();
    for &(n, _) in tor.nodes {
        out.push_str(&format!(
            "interface {}\n ipv6 nd ra-interval 3\n no ipv6 nd suppress-ra\nexit\n",
            router_if(n)
        ));
    }
    let mut text = config.to_string();
    for &(n, _) in tor.nodes {
        let (addr, iface) = (node_addr(tor.index, n), router_if(n));
        text = text
            .replace(
                &format!("neighbor {addr} remote-as"),
                &format!("neighbor {iface} interface remote-as"),
            )
            .replace(&format!("neighbor {addr} "), &format!("neighbor {iface} "));
    }
    out.push_str(&text);
    out
}

/// The guide's BIRD configuration turned unnumbered: each session goes to the node's
/// link-local address on the router's interface to it, carries IPv4 with IPv6 next hops, and
/// BIRD advertises itself on those interfaces so the nodes find it.
fn unnumbered_bird(config: &str, tor: &Tor) -> Result<String> {
    let index = tor.index;
    let mut text = config.replace(
        "ipv4 { import filter sepal_pods;",
        "ipv4 { extended next hop on; import filter sepal_pods;",
    );
    let mut radv = String::from("protocol radv {\n");
    for &(n, node) in tor.nodes {
        let node_if = format!("eth{index}");
        let ll = link_local(&node.netns, &node_if)?;
        // The session's source is the router's link-local address, not its IPv4 one.
        text = text.replace(&format!("local {} as", router_addr(index, n)), "local as");
        text = text.replace(
            &format!("neighbor {} as", node_addr(index, n)),
            &format!("interface \"{}\"; neighbor {ll} as", router_if(n)),
        );
        radv.push_str(&format!(
            "  interface \"{}\" {{ min ra interval 3; max ra interval 4; default lifetime 0; }};\n",
            router_if(n)
        ));
    }
    radv.push_str("}\n");
    Ok(text + &radv)
}

/// The link-local address of `iface` in namespace `ns`, once duplicate address detection is over.
fn link_local(ns: &str, iface: &str) -> Result<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let out = net::sh(ns, &format!("ip -6 -o addr show dev {iface} scope link"))?;
        let addr = out
            .split_whitespace()
            .nth(3)
            .and_then(|a| a.split('/').next());
        match addr {
            Some(a) if !out.contains("tentative") => return Ok(a.to_string()),
            _ if std::time::Instant::now() > deadline => {
                bail!("{ns}: no link-local address on {iface} after 10 s")
            }
            _ => std::thread::sleep(std::time::Duration::from_millis(100)),
        }
    }
}

/// BIRD protocol names are identifiers; node names may hold '-'.
fn bird_name(node: &str) -> String {
    format!("n_{}", node.replace('-', "_"))
}

/// BIRD 2: one eBGP session per node (and per spine above it), routes learned go to the
/// router's kernel (ECMP merged).
fn start_bird(lab: &LabState, tor: &Tor, dir: &Path) -> Result<Vec<u32>> {
    let mut text = config(peering::BIRD, tor)?;
    if tor.bfd {
        text = bird_bfd(&text);
    }
    if tor.router.unnumbered {
        text = unnumbered_bird(&text, tor)?;
    }
    text.push_str(&fabric::tor_uplinks(lab, tor.index, RouterKind::Bird));
    spawn_bird(tor.router, &text, dir)
}

/// The guide's BIRD configuration with BFD: a `bfd` protocol on every interface, and `bfd on`
/// in the node sessions' template.
pub fn bird_bfd(config: &str) -> String {
    config
        .replace(
            "protocol device { }\n",
            "protocol device { }\nprotocol bfd { interface \"*\" { min rx interval 300 ms; \
             min tx interval 300 ms; multiplier 3; }; }\n",
        )
        .replace(
            "  graceful restart on;\n",
            "  graceful restart on;\n  bfd on;\n",
        )
}

/// Starts BIRD in the router's namespace with `config`.
pub fn spawn_bird(router: &RouterState, config: &str, dir: &Path) -> Result<Vec<u32>> {
    let conf = dir.join("bird.conf");
    std::fs::write(&conf, config)?;
    let (ctl, log) = (dir.join("bird.ctl"), dir.join("bird.log"));
    let pid = net::spawn_daemon(
        &router.netns,
        &["bird", "-f", "-c", path(&conf)?, "-s", path(&ctl)?],
        &log,
    )?;
    Ok(vec![pid])
}

/// FRR: zebra (kernel routes) + bgpd (+ bfdd with BFD), run as the `frr` user with sockets in
/// the lab directory.
fn start_frr(lab: &LabState, tor: &Tor, dir: &Path) -> Result<Vec<u32>> {
    let mut config = config(peering::FRR, tor)?;
    if tor.bfd {
        // Before the unnumbered rewrite, which turns these addresses into interfaces too.
        config.push_str(&format!("router bgp {}\n", tor.router.as_number));
        for &(n, _) in tor.nodes {
            config.push_str(&format!(" neighbor {} bfd\n", node_addr(tor.index, n)));
        }
    }
    if tor.router.unnumbered {
        config = unnumbered_frr(&config, tor);
    }
    config.push_str(&fabric::tor_uplinks(lab, tor.index, RouterKind::Frr));
    spawn_frr(tor.router, &config, tor.bfd, dir)
}

/// Starts zebra, bfdd (with `bfd`) and bgpd with `config`; their pids.
pub fn spawn_frr(router: &RouterState, config: &str, bfd: bool, dir: &Path) -> Result<Vec<u32>> {
    let mut pids = vec![start_frr_daemon(router, dir, "zebra", "")?];
    if bfd {
        pids.push(start_frr_daemon(router, dir, "bfdd", "")?);
    }
    pids.push(start_frr_daemon(router, dir, "bgpd", config)?);
    Ok(pids)
}

/// Where FRR's daemons of one router keep their sockets and pid files; zebra's API socket is
/// `zserv.api` in it.
fn frr_run_dir(dir: &Path) -> std::path::PathBuf {
    dir.join("frr")
}

/// Starts one FRR daemon (`zebra`, `bfdd` or `bgpd`) with `config`, as the `frr` user it drops to, with
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
    let bfdctl = run.join("bfdd.sock");
    let mut args = vec![
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
    if daemon == "bfdd" {
        args.extend(["--bfdctl", path(&bfdctl)?]);
    }
    let pid = net::spawn_daemon(&router.netns, &args, &dir.join(format!("{daemon}.log")))?;
    if daemon == "zebra" {
        wait_for(&zserv)?;
    }
    Ok(pid)
}

/// GoBGP: gobgpd peering with every node, and the loop from docs/peering/ that copies its best
/// paths into the router's kernel (gobgpd has no FIB of its own, and its zebra client does not
/// speak the zebra API of the FRR release Debian ships).
fn start_gobgp(lab: &LabState, tor: &Tor, dir: &Path) -> Result<Vec<u32>> {
    let mut text = config(peering::GOBGP, tor)?;
    text.push_str(&fabric::tor_uplinks(lab, tor.index, RouterKind::Gobgp));
    spawn_gobgp(tor.router, &text, dir)
}

/// Starts gobgpd with `config` and the kernel sync loop beside it; their pids.
pub fn spawn_gobgp(router: &RouterState, config: &str, dir: &Path) -> Result<Vec<u32>> {
    let conf = dir.join("gobgpd.toml");
    std::fs::write(&conf, config)?;
    let gobgpd = net::spawn_daemon(
        &router.netns,
        &["gobgpd", "-f", path(&conf)?, "--pprof-disable", "-p"],
        &dir.join("gobgpd.log"),
    )?;
    let sync = dir.join("gobgp-fib.sh");
    std::fs::write(&sync, peering::GOBGP_FIB)?;
    let fib = net::spawn_daemon(
        &router.netns,
        &["sh", path(&sync)?],
        &dir.join("gobgp-fib.log"),
    )?;
    Ok(vec![gobgpd, fib])
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

pub fn path(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("non-UTF-8 path {}", p.display()))
}
