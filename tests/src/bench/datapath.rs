//! `sepal-bench datapath`: single-stream TCP (iperf3) from a pod on one node to a pod on another,
//! three ways in one run: through Sepal (real agents, routes learned over the BGP mesh, pods
//! through `sepal-cni`); the same two nodes with hand-made pods, static routes and no agent (the
//! limit); and the hand-made pods across a kernel VXLAN overlay. A fourth path, the static one
//! with the nftables table the Sepal nodes run copied in, shows what that table alone costs. Runs
//! interleave so that load on the machine falls on all of them alike; CPU per MB (sender and
//! receiver with their softirq work) is reported next to throughput, as load barely moves it.
//! Also times agent start to BGP routes in both kernels, and counts the conntrack entries on a
//! Sepal node (none: with no pod isolated its table does not turn connection tracking on).

use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::iperf;
use crate::netns::{veth, Netns};
use crate::node::{CniCall, Node};

const BLOCKS: [&str; 2] = ["10.244.0.0/24", "10.244.1.0/24"];
const UNDERLAY: [&str; 2] = ["192.168.100.1", "192.168.100.2"];
/// Hand-made pods take the 10th address of their node's block.
const HANDMADE_PODS: [&str; 2] = ["10.244.0.10", "10.244.1.10"];
const VXLAN_MTU: u32 = 1450;
/// Host side of a hand-made pod's veth, named like Sepal's so that its nft rules match it too.
const HOST_VETH: &str = "sephand0";

struct Args {
    seconds: u64,
    runs: usize,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut a = Args {
        seconds: 5,
        runs: 3,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value: u64 = it
            .next()
            .with_context(|| format!("{flag} needs a value"))?
            .parse()
            .with_context(|| format!("{flag} needs a number"))?;
        match flag.as_str() {
            "--seconds" => a.seconds = value.max(1),
            "--runs" => a.runs = value.max(1) as usize,
            other => bail!("unknown option {other}; options: --seconds N --runs N"),
        }
    }
    Ok(a)
}

/// Two nodes joined by one underlay veth and one pod on each, an iperf3 server in the second pod.
struct PodPath {
    label: &'static str,
    client: Netns,
    server_ip: String,
    server: Child,
    _server_pod: Netns,
    _agents: Vec<Node>,
    _nodes: Vec<Netns>,
}

impl Drop for PodPath {
    fn drop(&mut self) {
        crate::netns::kill(&mut self.server);
    }
}

impl PodPath {
    fn new(
        label: &'static str,
        pods: [Netns; 2],
        server_ip: String,
        agents: Vec<Node>,
        nodes: Vec<Netns>,
    ) -> Result<PodPath> {
        let [client, server_pod] = pods;
        let server = server_pod
            .command(&["iperf3", "-s", "-B", &server_ip])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("start iperf3 -s (Debian package iperf3)")?;
        let path = PodPath {
            label,
            client,
            server_ip,
            server,
            _server_pod: server_pod,
            _agents: agents,
            _nodes: nodes,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !path
            ._server_pod
            .try_run("ss -Hltn sport = :5201")
            .is_ok_and(|s| !s.trim().is_empty())
        {
            if Instant::now() > deadline {
                bail!("{label}: iperf3 server not listening after 10 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(path)
    }

    /// One iperf3 run: steady Gbit/s (see `iperf`), and the CPU time of sender and receiver
    /// (with the forwarding softirq work they run) per MB, which other load barely moves.
    fn gbps(&self, seconds: u64) -> Result<(f64, f64)> {
        let args = iperf::client_args(&self.server_ip, seconds);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.client.output(&args);
        let run = iperf::parse(&out.stdout, self.label)?;
        Ok((run.steady_bps / 1e9, run.cpu_us_per_mb))
    }
}

fn node_object(i: usize, name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec:\n  podCIDR: {b}\n  podCIDRs: [{b}]\n\
         status:\n  addresses: [{{type: InternalIP, address: \"{a}\"}}]\n",
        b = BLOCKS[i],
        a = UNDERLAY[i]
    )
}

/// The node's protocol-83 route to the other node's block, once it goes through the underlay.
fn has_bgp_route(node: &Node, block: &str) -> bool {
    node.netns
        .try_run(&format!("ip route show proto 83 {block}"))
        .is_ok_and(|r| r.contains("via"))
}

/// Sepal: two nodes running `sepal node` over a two-node mesh with fast timers, a pod on each
/// through `sepal-cni`. Returns the path and the time from agent start to both routes installed.
fn sepal() -> Result<(PodPath, Duration)> {
    let names = ["bs0", "bs1"];
    let mut nodes = [
        Node::new(names[0], &[BLOCKS[0]]),
        Node::new(names[1], &[BLOCKS[1]]),
    ];
    veth(&nodes[0].netns, "ul", &nodes[1].netns, "ul");
    for (i, n) in nodes.iter().enumerate() {
        n.netns
            .run(&format!("ip addr add {}/24 dev ul", UNDERLAY[i]));
    }
    let bgp = "apiVersion: sepal.dev/v1alpha1\nkind: BGPConfiguration\nmetadata:\n  name: default\nspec:\n  \
               nodeToNodeMesh: true\n  keepaliveTime: 1s\n  holdTime: 3s\n";
    for n in &nodes {
        for (i, name) in names.iter().enumerate() {
            std::fs::write(
                n.datastore.join(format!("node-{name}.yaml")),
                node_object(i, name),
            )?;
        }
        std::fs::write(n.datastore.join("bgp.yaml"), bgp)?;
    }
    let start = Instant::now();
    for n in &mut nodes {
        n.spawn_agent();
    }
    let deadline = start + Duration::from_secs(30);
    while !(has_bgp_route(&nodes[0], BLOCKS[1]) && has_bgp_route(&nodes[1], BLOCKS[0])) {
        if Instant::now() > deadline {
            bail!(
                "sepal: BGP routes not installed after 30 s\n--- bs0:\n{}\n--- bs1:\n{}",
                nodes[0].agent_log(),
                nodes[1].agent_log()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let converged = start.elapsed();
    let mut ips = Vec::new();
    let mut pods = Vec::new();
    for (i, n) in nodes.iter_mut().enumerate() {
        n.wait_agent_ready();
        let pod = Netns::new(&format!("bsp{i}"));
        let call = CniCall::pod(
            &format!("bench-dp{i}"),
            &pod.path(),
            "bench",
            &format!("dp{i}"),
        );
        let out = n.cni("ADD", &call);
        if !out.status.success() {
            bail!(
                "sepal-cni ADD on {}: {} {}",
                n.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let result: Value = serde_json::from_slice(&out.stdout).context("CNI result")?;
        let ip = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .context("CNI result without an address")?
            .to_string();
        ips.push(ip);
        pods.push(pod);
    }
    let pods: [Netns; 2] = pods.try_into().map_err(|_| anyhow::anyhow!("two pods"))?;
    let path = PodPath::new("sepal", pods, ips[1].clone(), nodes.into(), Vec::new())?;
    Ok((path, converged))
}

/// The same two nodes and pods made by hand, as Sepal makes them (veth, /32, proxy ARP for the
/// pods' gateway), with static routes to the other node's block: straight over the underlay, or
/// over a kernel VXLAN device with static FDB and neighbour entries (pods at MTU 1450).
fn handmade(
    label: &'static str,
    tag: &str,
    vxlan: bool,
    nft_ruleset: Option<&str>,
) -> Result<PodPath> {
    let nodes = [
        Netns::new(&format!("{tag}n")),
        Netns::new(&format!("{tag}n")),
    ];
    veth(&nodes[0], "ul", &nodes[1], "ul");
    let mut pods = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let other = UNDERLAY[1 - i];
        n.run(&format!(
            "sysctl -qw net.ipv4.ip_forward=1 && ip addr add {}/24 dev ul && ip route add default via {other} dev ul",
            UNDERLAY[i]
        ));
        let pod = Netns::new(&format!("{tag}p"));
        veth(n, HOST_VETH, &pod, "eth0");
        let ip = HANDMADE_PODS[i];
        let mtu = if vxlan { VXLAN_MTU } else { 1500 };
        n.run(&format!(
            "ip link set {HOST_VETH} mtu {mtu} && sysctl -qw net.ipv4.conf.{HOST_VETH}.proxy_arp=1 \
             net.ipv4.neigh.{HOST_VETH}.proxy_delay=0 && ip route add {ip}/32 dev {HOST_VETH} scope link"
        ));
        pod.run(&format!(
            "ip link set eth0 mtu {mtu} && ip addr add {ip}/32 dev eth0 && ip route add 169.254.1.1 dev eth0 scope link \
             && ip route add default via 169.254.1.1 dev eth0"
        ));
        pods.push(pod);
    }
    if vxlan {
        for (i, n) in nodes.iter().enumerate() {
            n.run(&format!(
                "ip link add vxlan0 type vxlan id 4096 local {} dstport 4789 nolearning \
                 && ip link set vxlan0 mtu {VXLAN_MTU} up && ip addr add 10.245.{i}.0/32 dev vxlan0",
                UNDERLAY[i]
            ));
        }
        for (i, n) in nodes.iter().enumerate() {
            let j = 1 - i;
            let link: Value = serde_json::from_str(&nodes[j].run("ip -j link show vxlan0"))?;
            let mac = link[0]["address"]
                .as_str()
                .context("vxlan0 without a MAC address")?;
            n.run(&format!(
                "ip neigh add 10.245.{j}.0 lladdr {mac} dev vxlan0 nud permanent \
                 && bridge fdb add {mac} dev vxlan0 dst {} \
                 && ip route add {} via 10.245.{j}.0 dev vxlan0 onlink",
                UNDERLAY[j], BLOCKS[j]
            ));
        }
    } else {
        for (i, n) in nodes.iter().enumerate() {
            let j = 1 - i;
            n.run(&format!(
                "ip route add {} via {} dev ul onlink",
                BLOCKS[j], UNDERLAY[j]
            ));
        }
    }
    if let Some(ruleset) = nft_ruleset {
        let file = tempfile::NamedTempFile::new()?;
        std::fs::write(file.path(), ruleset)?;
        for n in &nodes {
            n.try_run(&format!("nft -f {}", file.path().display()))
                .map_err(|e| anyhow::anyhow!("{label}: loading Sepal's nft table: {e}"))?;
        }
    }
    let pods: [Netns; 2] = pods.try_into().map_err(|_| anyhow::anyhow!("two pods"))?;
    PodPath::new(
        label,
        pods,
        HANDMADE_PODS[1].to_string(),
        Vec::new(),
        nodes.into(),
    )
}

/// What Sepal puts on the path that the hand-made nodes lack, to read next to the figures.
fn sepal_additions(path: &PodPath) -> String {
    let node = &path._agents[0].netns;
    let mtu = path
        .client
        .try_run("cat /sys/class/net/eth0/mtu")
        .unwrap_or_default();
    let tables = node.try_run("nft list tables").unwrap_or_default();
    let rp = node
        .try_run("sysctl -n net.ipv4.conf.all.rp_filter net.ipv4.conf.ul.rp_filter")
        .unwrap_or_default();
    format!(
        "sepal pod MTU {}; node nft tables: {}; rp_filter (all, ul): {}",
        mtu.trim(),
        tables.split_whitespace().collect::<Vec<_>>().join(" "),
        rp.split_whitespace().collect::<Vec<_>>().join(", ")
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

pub fn run(args: &[String]) -> Result<()> {
    let a = parse(args)?;
    crate::require_root();
    let (sepal, converged) = sepal()?;
    let converged_ms = converged.as_secs_f64() * 1000.0;
    println!(
        "sepal: agents started -> BGP routes in both kernels in {converged_ms:.0} ms (keepalive 1 s, hold 3 s)"
    );
    let sepal_table = sepal._agents[0]
        .netns
        .try_run("nft list table inet sepal")
        .map_err(|e| anyhow::anyhow!("reading the Sepal node's nft table: {e}"))?;
    let paths = [
        sepal,
        handmade("static", "bst", false, None)?,
        handmade("vxlan", "bvx", true, None)?,
        handmade("st+nft", "bsn", false, Some(&sepal_table))?,
    ];
    println!("{}", sepal_additions(&paths[0]));
    let mut figures: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    let mut cpu: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    // Each run starts with another path, so no path always runs first (or right after another).
    for run in 0..a.runs {
        for k in 0..paths.len() {
            let i = (run + k) % paths.len();
            let (g, cpu_us) = paths[i].gbps(a.seconds)?;
            println!(
                "run {}: {:<7}{g:>7.2} Gbit/s, {cpu_us:>5.0} us CPU per MB",
                run + 1,
                paths[i].label
            );
            figures[i].push(g);
            cpu[i].push(cpu_us);
        }
    }
    // With no pod isolated Sepal's table holds no `ct` expression, so nothing made the kernel
    // track the runs' connections on its nodes.
    let tracked = paths[0]._agents[0]
        .netns
        .try_run("conntrack -C")
        .unwrap_or_else(|e| format!("unknown ({e})"));
    println!(
        "conntrack entries on a Sepal node after the runs: {}",
        tracked.trim()
    );
    // CPU per MB of static routes over Sepal's, per run (each run has every path), median.
    let cpu_ratio = median(cpu[1].iter().zip(&cpu[0]).map(|(s, p)| s / p).collect());
    let nft_cpu_ratio = median(cpu[1].iter().zip(&cpu[3]).map(|(s, p)| s / p).collect());
    let cpu_med: Vec<f64> = cpu.into_iter().map(median).collect();
    println!(
        "CPU per MB (iperf3 sender + receiver with their softirq work; steady under load): sepal {:.0}, static {:.0}, \
         vxlan {:.0}, st+nft {:.0} us; static/sepal {cpu_ratio:.3}, static/st+nft {nft_cpu_ratio:.3}",
        cpu_med[0], cpu_med[1], cpu_med[2], cpu_med[3]
    );
    let med: Vec<f64> = figures.into_iter().map(median).collect();
    let (sepal_gbps, static_gbps, vxlan_gbps, nft_gbps) = (med[0], med[1], med[2], med[3]);
    println!(
        "medians of {} runs of {} s, single TCP stream pod -> pod across nodes: sepal {sepal_gbps:.2}, \
         static routes {static_gbps:.2}, vxlan {vxlan_gbps:.2} Gbit/s; sepal/static {:.3}, sepal/vxlan {:.3}",
        a.runs,
        a.seconds,
        sepal_gbps / static_gbps,
        sepal_gbps / vxlan_gbps
    );
    println!(
        "static routes with the Sepal nodes' nft table copied in: {nft_gbps:.2} Gbit/s, {:.3} of static \
         (what the table's conntrack and rules cost without any agent)",
        nft_gbps / static_gbps
    );
    println!(
        "{}",
        serde_json::json!({
            "sepal_gbps": round(sepal_gbps, 2),
            "static_gbps": round(static_gbps, 2),
            "vxlan_gbps": round(vxlan_gbps, 2),
            "ratio_vs_static": round(sepal_gbps / static_gbps, 3),
            "ratio_vs_vxlan": round(sepal_gbps / vxlan_gbps, 3),
            "routes_converged_ms": converged_ms.round(),
            "static_with_sepal_nft_gbps": round(nft_gbps, 2),
            "nft_ratio_vs_static": round(nft_gbps / static_gbps, 3),
            "cpu_ratio_vs_static": round(cpu_ratio, 3),
            "nft_cpu_ratio_vs_static": round(nft_cpu_ratio, 3),
        })
    );
    Ok(())
}
