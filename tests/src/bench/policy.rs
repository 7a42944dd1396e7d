//! `sepal-bench policy`: (1) compile + apply time of a 1000-pod / 500-policy cluster, full and
//! after one change, and again with 500 ClusterNetworkPolicies of both tiers beside the
//! policies; (2) datapath cost between two pods behind 10,000 peers' worth of selectors and
//! ipBlocks, with the NetworkPolicy alone and with Admin-tier ClusterNetworkPolicies in front of
//! it: throughput vs no policy, new-connection rate vs a linear iptables ruleset, each also as
//! CPU per byte and per connection (steady on a loaded machine), and next to a table that only
//! turns conntrack on (the floor for any conntrack-based policy).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sepal_felix::nft::{render_diff_in, Dataplane, Options, Scope};
use sepal_felix::policy::{
    compile, Cluster, Compiler, NamedPort, Namespace, NetworkPolicy, Pod, Protocol,
};

mod cnp;

use super::iperf::{self, IperfRun};
use crate::netns::{veth, Netns};

#[derive(Clone, Copy)]
struct Args {
    pods: usize,
    policies: usize,
    /// ClusterNetworkPolicies of the second control-plane run (0: no such run).
    cluster_policies: usize,
    peers: usize,
    seconds: u64,
    runs: usize,
    /// Also the control plane at this many times the pods and NetworkPolicies (0 or 1: not).
    scale: usize,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut a = Args {
        pods: 1000,
        policies: 500,
        cluster_policies: 500,
        peers: 10_000,
        seconds: 2,
        runs: 5,
        scale: 10,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .with_context(|| format!("{flag} needs a value"))?
            .parse::<usize>()
            .with_context(|| format!("{flag} needs a number"))?;
        match flag.as_str() {
            "--pods" => a.pods = value,
            "--policies" => a.policies = value,
            "--cluster-policies" => a.cluster_policies = value,
            "--peers" => a.peers = value,
            "--seconds" => a.seconds = value as u64,
            "--runs" => a.runs = value.max(1),
            "--scale" => a.scale = value,
            other => {
                bail!("unknown option {other}; options: --pods --policies --cluster-policies --peers --seconds --runs --scale")
            }
        }
    }
    Ok(a)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn named_ports() -> Arc<[NamedPort]> {
    Arc::new([
        NamedPort {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 8080,
        },
        NamedPort {
            name: "metrics".into(),
            protocol: Protocol::Tcp,
            port: 9090,
        },
    ])
}

fn pod(ns: &str, name: String, labels: &[(&str, String)], ip: Ipv4Addr, local: bool) -> Arc<Pod> {
    Arc::new(Pod {
        namespace: ns.into(),
        host_iface: local.then(|| format!("sep{}", &name[..name.len().min(12)])),
        name: name.into(),
        labels: Arc::new(
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        ),
        ips: vec![IpAddr::V4(ip)],
        ports: named_ports(),
        host_network: false,
    })
}

fn policy(yaml: &str) -> Result<Arc<NetworkPolicy>> {
    serde_norway::from_str(yaml)
        .map(Arc::new)
        .context("bench policy")
}

/// 10 namespaces × pods/10 pods (all on this node), `policies` policies of mixed shapes.
fn big_cluster(pods: usize, policies: usize) -> Result<Cluster> {
    let mut c = Cluster::default();
    for n in 0..10 {
        let name = format!("ns{n}");
        c.namespaces.insert(
            name.clone(),
            Namespace {
                name,
                labels: BTreeMap::from([("tier".into(), format!("t{}", n % 3))]),
            },
        );
    }
    for i in 0..pods {
        c.pods.push(pod(
            &format!("ns{}", i % 10),
            format!("p{i}"),
            &[
                ("app", format!("app{}", i % 50)),
                ("role", format!("r{}", i % 4)),
            ],
            Ipv4Addr::new(10, 244, (i / 250) as u8, (i % 250) as u8 + 1),
            true,
        ));
    }
    for k in 0..policies {
        c.policies.push(policy(&big_policy(k))?);
    }
    Ok(c)
}

fn big_policy(k: usize) -> String {
    let ns = k % 10;
    let app = k % 50;
    match k % 5 {
        0 => format!(
            "metadata: {{name: pol{k}, namespace: ns{ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: app{app}}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: app{}}}}}}}]\n    ports: [{{port: 8080}}, {{port: 9000, endPort: 9100}}]\n",
            (app + 1) % 50
        ),
        1 => format!(
            "metadata: {{name: pol{k}, namespace: ns{ns}}}\nspec:\n  podSelector: {{matchLabels: {{role: r{}}}}}\n  ingress:\n  - from: [{{namespaceSelector: {{matchLabels: {{tier: t{}}}}}}}]\n    ports: [{{port: http}}]\n",
            k % 4,
            k % 3
        ),
        2 => format!(
            "metadata: {{name: pol{k}, namespace: ns{ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: app{app}}}}}\n  ingress:\n  - from: [{{ipBlock: {{cidr: 10.{}.0.0/16, except: [10.{}.1.0/24]}}}}]\n",
            k % 200,
            k % 200
        ),
        3 => format!(
            "metadata: {{name: pol{k}, namespace: ns{ns}}}\nspec:\n  podSelector: {{matchExpressions: [{{key: app, operator: In, values: [app{app}, app{}]}}]}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{role: r{}}}}}}}]\n    ports: [{{port: metrics}}, {{port: 53, protocol: UDP}}]\n",
            (app + 7) % 50,
            k % 4
        ),
        _ => format!(
            "metadata: {{name: pol{k}, namespace: ns{ns}}}\nspec:\n  podSelector: {{matchLabels: {{app: app{app}}}}}\n  ingress:\n  - from: [{{namespaceSelector: {{matchExpressions: [{{key: tier, operator: NotIn, values: [t0]}}]}}, podSelector: {{matchLabels: {{role: r{}}}}}}}]\n",
            k % 4
        ),
    }
}

fn nft_in(ns: &Netns) -> Dataplane {
    Dataplane::in_netns(ns.path(), Options::default())
}

/// CPU time used so far by this process and its waited-for children (nft), user + system.
fn cpu_time_ms() -> f64 {
    let used = |who| {
        // SAFETY: getrusage fills the zeroed struct it is given.
        let mut r: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut r) };
        let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
        ms(r.ru_utime) + ms(r.ru_stime)
    };
    used(libc::RUSAGE_SELF) + used(libc::RUSAGE_CHILDREN)
}

/// One control-plane run's figures (ms; medians).
struct ControlPlane {
    full: f64,
    /// Parts of a full apply: compile, rendering the nft text (timed apart), and the rest of
    /// `resync` (nft parsing the batch, the kernel's transaction, a copy of the ruleset).
    full_compile: f64,
    full_render: f64,
    full_nft: f64,
    /// One NetworkPolicy changed, one ClusterNetworkPolicy changed (`None` without them), one
    /// new pod, one pod relabelled.
    policy: f64,
    cluster_policy: Option<f64>,
    pod: f64,
    relabel: f64,
    /// CPU per incremental change (this process and nft), median over every change.
    cpu: f64,
}

impl ControlPlane {
    /// The worst of the incremental medians.
    fn incremental(&self) -> f64 {
        [self.policy, self.pod, self.relabel]
            .into_iter()
            .chain(self.cluster_policy)
            .fold(0.0, f64::max)
    }
}

/// The incremental changes measured, in order: each iteration makes one of each.
const CHANGES: [&str; 4] = [
    "one policy changed",
    "one cluster policy changed",
    "one new pod",
    "one pod relabelled",
];

/// One incremental change (ms): from model change to kernel ack, and its parts: the compiler's
/// update, rendering the difference (timed apart, again) and the rest (nft's parsing, the
/// kernel's transaction).
#[derive(Debug, Clone, Copy, Default)]
struct Change {
    wall: f64,
    compile: f64,
    diff: f64,
    nft: f64,
    cpu: f64,
    commands: usize,
    touched: usize,
}

/// The big cluster, with `cnps` ClusterNetworkPolicies besides its NetworkPolicies (0: none).
fn control_plane(a: &Args, cnps: usize) -> Result<ControlPlane> {
    let ns = Netns::new("bpol");
    let mut cluster = big_cluster(a.pods, a.policies)?;
    if cnps > 0 {
        cnp::add_to(&mut cluster, cnps)?;
    }
    let what = if cnps > 0 {
        format!(
            "{} NetworkPolicies + {cnps} ClusterNetworkPolicies",
            a.policies
        )
    } else {
        format!("{} NetworkPolicies", a.policies)
    };
    let mut dp = nft_in(&ns);
    let (mut fulls, mut compiles, mut renders, mut nfts) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..a.runs {
        dp.delete().ok();
        let t = Instant::now();
        let rs = compile(&cluster);
        let compiled = t.elapsed().as_secs_f64() * 1000.0;
        let t_apply = Instant::now();
        dp.resync(&rs)?;
        let applied = t_apply.elapsed().as_secs_f64() * 1000.0;
        fulls.push(t.elapsed().as_secs_f64() * 1000.0);
        let t = Instant::now();
        let text = sepal_felix::nft::render_full(&rs, &Options::default());
        let rendered = t.elapsed().as_secs_f64() * 1000.0;
        std::hint::black_box(text);
        compiles.push(compiled);
        renders.push(rendered);
        nfts.push(applied - rendered);
    }
    let t = Instant::now();
    let rs = compile(&cluster);
    let compile_ms = t.elapsed().as_secs_f64() * 1000.0;
    cnp::check_no_problems(&rs)?;
    if let Ok(path) = std::env::var("SEPAL_BENCH_DUMP") {
        let path = if cnps > 0 {
            format!("{path}.cnp")
        } else {
            path
        };
        std::fs::write(
            path,
            sepal_felix::nft::render_full(&rs, &Options::default()),
        )?;
    }
    let text_bytes = sepal_felix::nft::render_full(&rs, &Options::default()).len();
    println!(
        "control plane, {what} (compile alone {compile_ms:.1} ms): {} pods (all local) -> {} sets, {} chains, {} rules, {} KiB of nft text",
        a.pods,
        rs.sets.len(),
        rs.chains.len(),
        rs.chains.values().map(|c| c.rules.len()).sum::<usize>(),
        text_bytes / 1024
    );
    if cnps > 0 {
        println!("  tiers: {}", cnp::tier_shape(&rs));
        let reach: Vec<(usize, usize)> = cluster
            .pods
            .iter()
            .map(|p| cnp::reached_by(&cluster, p))
            .collect();
        let all = median(reach.iter().map(|r| r.0 as f64).collect());
        let networks = median(reach.iter().map(|r| r.1 as f64).collect());
        println!("  a pod's change reaches {all:.0} of the {cnps} cluster policies (median over pods; {networks:.0} of them only through a networks CIDR holding its address)");
    }
    // One policy change (and one cluster policy change), one new pod, one pod relabelled, each
    // from model change to kernel ack, as the agent does it: a long-lived compiler (it
    // remembers validated policies) and the dataplane.
    let mut compiler = Compiler::default();
    let (rs, touched) = compiler.update(&cluster);
    dp.apply_update(rs, touched)?;
    let mut last = rs.clone();
    // By kind of change (`CHANGES` order).
    let mut samples: [Vec<Change>; 4] = Default::default();
    let mut timed = |dp: &mut Dataplane, cluster: &Cluster| -> Result<Change> {
        let cpu = cpu_time_ms();
        let t = Instant::now();
        let (rs, touched) = compiler.update(cluster);
        let compile = t.elapsed().as_secs_f64() * 1000.0;
        dp.apply_update(rs, touched)?;
        let wall = t.elapsed().as_secs_f64() * 1000.0;
        let cpu = cpu_time_ms() - cpu;
        // Not timed above: the diff the dataplane just rendered, again, for the breakdown.
        let t = Instant::now();
        let diff = render_diff_in(&last, rs, &Scope::touched(touched), &Options::default());
        let diff_ms = t.elapsed().as_secs_f64() * 1000.0;
        if let Ok(path) = std::env::var("SEPAL_BENCH_DUMP_DIFFS") {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            writeln!(f, "# --- change (cluster policies: {cnps})\n{diff}")?;
        }
        let change = Change {
            wall,
            compile,
            diff: diff_ms,
            nft: wall - compile - diff_ms,
            cpu,
            commands: diff.lines().count(),
            touched: touched.chains.len() + touched.sets.len(),
        };
        last = rs.clone();
        Ok(change)
    };
    for i in 0..10 {
        let yaml = format!(
            "metadata: {{name: pol7, namespace: ns7}}\nspec:\n  podSelector: {{matchLabels: {{app: app7}}}}\n  ingress:\n  - from: [{{podSelector: {{matchLabels: {{app: app{}}}}}}}]\n    ports: [{{port: {}}}]\n",
            i % 50,
            8000 + i
        );
        let idx = cluster
            .policies
            .iter()
            .position(|p| p.metadata.name.as_deref() == Some("pol7"))
            .context("pol7")?;
        cluster.policies[idx] = policy(&yaml)?;
        samples[0].push(timed(&mut dp, &cluster)?);

        if cnps > 11 {
            // A workload's Admin policy (app1's) gets another port in its Deny rule.
            let idx = cluster
                .cluster_policies
                .iter()
                .position(|p| p.name() == "cnp11")
                .context("cnp11")?;
            cluster.cluster_policies[idx] = cnp::big_cluster_policy(11, i + 1)?;
            samples[1].push(timed(&mut dp, &cluster)?);
        }

        cluster.pods.push(pod(
            "ns3",
            format!("new{i}"),
            &[("app", format!("app{}", i % 50)), ("role", "r1".into())],
            Ipv4Addr::new(10, 245, 0, i as u8 + 1),
            true,
        ));
        samples[2].push(timed(&mut dp, &cluster)?);

        // An existing pod moves to the next app (a Deployment's label edit reaches each pod).
        let idx = (i * 97 + 13) % a.pods.max(1);
        let old = cluster.pods[idx].clone();
        let app: usize = old
            .labels
            .get("app")
            .and_then(|v| v.strip_prefix("app"))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let mut labels = (*old.labels).clone();
        labels.insert("app".into(), format!("app{}", (app + 1) % 50));
        cluster.pods[idx] = Arc::new(Pod {
            labels: Arc::new(labels),
            ..(*old).clone()
        });
        samples[3].push(timed(&mut dp, &cluster)?);
    }
    let kind = |k: usize| -> Option<Change> {
        let s = &samples[k];
        let m = |f: fn(&Change) -> f64| median(s.iter().map(f).collect());
        (!s.is_empty()).then(|| Change {
            wall: m(|c| c.wall),
            compile: m(|c| c.compile),
            diff: m(|c| c.diff),
            nft: m(|c| c.nft),
            cpu: m(|c| c.cpu),
            commands: m(|c| c.commands as f64) as usize,
            touched: m(|c| c.touched as f64) as usize,
        })
    };
    let all: Vec<f64> = samples.iter().flatten().map(|c| c.cpu).collect();
    let cpu_count = all.len();
    let cp = ControlPlane {
        full: median(fulls),
        full_compile: median(compiles),
        full_render: median(renders),
        full_nft: median(nfts),
        policy: kind(0).map_or(0.0, |c| c.wall),
        cluster_policy: kind(1).map(|c| c.wall),
        pod: kind(2).map_or(0.0, |c| c.wall),
        relabel: kind(3).map_or(0.0, |c| c.wall),
        cpu: median(all),
    };
    println!(
        "  full compile + apply (atomic replace): {:.1} ms (median of {}): compile {:.1}, render {:.1}, nft + kernel {:.1} ms",
        cp.full, a.runs, cp.full_compile, cp.full_render, cp.full_nft
    );
    for (k, what) in CHANGES.iter().enumerate() {
        if let Some(c) = kind(k) {
            println!(
                "  {what} -> in the kernel: {:.1} ms (median of 10): compile {:.1}, diff {:.1}, nft + kernel {:.1} ms; {} commands, {} chains and sets touched; CPU {:.1} ms",
                c.wall, c.compile, c.diff, c.nft, c.commands, c.touched, c.cpu
            );
        }
    }
    println!(
        "  CPU per incremental change (this process and nft, user + system): {:.1} ms (median of {cpu_count}); wall time above includes waiting for a CPU on a busy machine",
        cp.cpu,
    );
    Ok(cp)
}

// ---------------------------------------------------------------------------------------------
// Datapath

const SRV_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 20);
const CLI_IP: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
const PORT: u16 = 8080;

struct Lab {
    node: Netns,
    cli: Netns,
    srv: Netns,
    _up: Netns,
}

fn lab() -> Lab {
    let node = Netns::new("bnode");
    let up = Netns::new("bup");
    veth(&node, "eth0", &up, "eth0");
    node.run("ip addr add 10.255.255.2/24 dev eth0 && ip route add default dev eth0 && sysctl -qw net.ipv4.ip_forward=1");
    let mut pods = Vec::new();
    for (tag, host, ip) in [("bcli", "sepcli", CLI_IP), ("bsrv", "sepsrv", SRV_IP)] {
        let p = Netns::new(tag);
        veth(&node, host, &p, "eth0");
        node.run(&format!(
            "ip link set {host} address ee:ee:ee:ee:ee:ee && sysctl -qw net.ipv4.conf.{host}.proxy_arp=1 net.ipv4.neigh.{host}.proxy_delay=0 && ip route add {ip}/32 dev {host} scope link"
        ));
        p.run(&format!("ip addr add {ip}/32 dev eth0 && ip route add 169.254.1.1 dev eth0 scope link && ip route add default via 169.254.1.1 dev eth0"));
        pods.push(p);
    }
    let srv = pods.pop().expect("srv");
    let cli = pods.pop().expect("cli");
    Lab {
        node,
        cli,
        srv,
        _up: up,
    }
}

/// The server pod isolated by one policy whose rules name `peers` sources: half pods picked by
/// label selectors (on other nodes), half ipBlocks; the client is matched by the last rule.
fn datapath_cluster(peers: usize) -> Result<(Cluster, Vec<Ipv4Addr>)> {
    let mut c = Cluster::default();
    let mut sources = Vec::new();
    let half = peers / 2;
    for i in 0..half {
        // Every other address, so no two peers merge into one range.
        let ip = Ipv4Addr::new(10, 250, (i / 125) as u8, (i % 125) as u8 * 2 + 1);
        sources.push(ip);
        c.pods.push(pod(
            "remote",
            format!("r{i}"),
            &[("app", format!("peer{}", i % 100))],
            ip,
            false,
        ));
    }
    let mut rules = String::new();
    for r in 0..100 {
        rules.push_str(&format!(
            "  - from: [{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: remote}}}}, podSelector: {{matchLabels: {{app: peer{r}}}}}}}]\n    ports: [{{port: {PORT}}}, {{port: 5201}}]\n"
        ));
    }
    let blocks: Vec<Ipv4Addr> = (0..peers - half)
        .map(|i| Ipv4Addr::new(10, 251, (i / 125) as u8, (i % 125) as u8 * 2 + 1))
        .collect();
    for chunk in blocks.chunks(50) {
        let list: Vec<String> = chunk
            .iter()
            .map(|ip| format!("{{ipBlock: {{cidr: {ip}/32}}}}"))
            .collect();
        rules.push_str(&format!(
            "  - from: [{}]\n    ports: [{{port: {PORT}}}, {{port: 5201}}]\n",
            list.join(", ")
        ));
    }
    sources.extend(&blocks);
    rules.push_str(&format!(
        "  - from: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: client}}}}}}]\n    ports: [{{port: {PORT}}}, {{port: 5201}}]\n"
    ));
    c.policies.push(policy(&format!(
        "metadata: {{name: server, namespace: bench}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n{rules}"
    ))?);
    c.pods.push(Arc::new(Pod {
        host_iface: Some("sepcli".into()),
        ..Arc::unwrap_or_clone(pod(
            "bench",
            "client".into(),
            &[("app", "client".into())],
            CLI_IP,
            false,
        ))
    }));
    c.pods.push(Arc::new(Pod {
        host_iface: Some("sepsrv".into()),
        ..Arc::unwrap_or_clone(pod(
            "bench",
            "server".into(),
            &[("app", "server".into())],
            SRV_IP,
            false,
        ))
    }));
    Ok((c, sources))
}

/// The same allow list as linear iptables rules, one per peer, client last (Calico/kube-router
/// style: conntrack first, then one rule per allowed source, then drop).
fn iptables_rules(sources: &[Ipv4Addr]) -> String {
    let mut s = String::from("*filter\n:SEPAL-BENCH - [0:0]\n");
    s.push_str("-A FORWARD -o sepsrv -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n");
    s.push_str("-A FORWARD -o sepsrv -j SEPAL-BENCH\n");
    for ip in sources.iter().chain([&CLI_IP]) {
        s.push_str(&format!(
            "-A SEPAL-BENCH -s {ip}/32 -p tcp -m multiport --dports {PORT},5201 -j ACCEPT\n"
        ));
    }
    s.push_str("-A SEPAL-BENCH -j DROP\nCOMMIT\n");
    s
}

/// Client threads in the connect/close loop: one per core of the 2-core reference machine. A
/// connection's whole handshake (SYN through the node's forward path, SYN-ACK, ACK) runs in
/// softirq in the connecting thread's own `connect`, so each thread keeps a core busy with
/// exactly the per-connection work where a ruleset's price shows; more threads only queue.
const CONNECTORS: usize = 2;

/// Accept queue of the bench server: far more than a run's connections could ever pile up while
/// the accept thread waits for a CPU, so no SYN is dropped on a full queue (which would cost the
/// client a 1 s retransmission and measure scheduling instead of rules).
const BACKLOG: libc::c_int = 4096;

/// One connect/close loop: the rate, what it cost, and whether any SYN was lost on the way.
#[derive(Debug, Clone, Copy, Default)]
struct ConnRun {
    per_second: f64,
    /// CPU time of this process (client and accept threads, the softirq work they run) per
    /// connection: unlike the rate, barely moved by other load on the machine.
    cpu_us: f64,
    /// SYNs retransmitted by the client plus SYNs the server's listener dropped: non-zero means
    /// the run partly measured 1 s retransmission timers.
    syn_losses: u64,
}

/// TcpExt counters of the namespace (`nstat` names).
fn tcp_ext(ns: &Netns) -> BTreeMap<String, u64> {
    let text = ns.try_run("cat /proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let mut out = BTreeMap::new();
    if let [names, values] = lines[..] {
        for (n, v) in names
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
        {
            out.insert(n.to_string(), v.parse().unwrap_or(0));
        }
    }
    out
}

fn syn_losses(lab: &Lab) -> u64 {
    let (cli, srv) = (tcp_ext(&lab.cli), tcp_ext(&lab.srv));
    let get = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
    get(&cli, "TCPSynRetrans") + get(&srv, "ListenOverflows") + get(&srv, "ListenDrops")
}

/// CPU time (user + system) of this process so far, in microseconds.
fn process_cpu_us() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let mut r: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut r) };
    let us = |t: libc::timeval| t.tv_sec as f64 * 1e6 + t.tv_usec as f64;
    us(r.ru_utime) + us(r.ru_stime)
}

/// New TCP connections per second: connect, then close with RST (SO_LINGER 0) so no TIME_WAIT
/// piles up, from `CONNECTORS` threads in the client pod.
fn conn_rate(lab: &Lab, seconds: u64) -> Result<ConnRun> {
    // Every variant starts with an empty conntrack table: the previous loop's closed entries
    // would otherwise pile up (and a full table drops new connections).
    let _ = lab.node.try_run("conntrack -F 2>/dev/null");
    let losses = syn_losses(lab);
    let cli = lab.cli.path();
    let cpu = process_cpu_us();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(seconds);
    let counts: Vec<Result<u64>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..CONNECTORS)
            .map(|_| s.spawn(|| connect_loop(&cli, deadline)))
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .map_err(|_| anyhow::anyhow!("connect loop panicked"))?
            })
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = process_cpu_us() - cpu;
    let mut total = 0;
    for c in counts {
        total += c?;
    }
    Ok(ConnRun {
        per_second: total as f64 / elapsed,
        cpu_us: cpu / total.max(1) as f64,
        syn_losses: syn_losses(lab).saturating_sub(losses),
    })
}

/// One thread's connect/close loop in the namespace at `netns` until `deadline` (at least one
/// connection, even with no time left: that wakes the accept loop).
fn connect_loop(netns: &std::path::Path, deadline: Instant) -> Result<u64> {
    let f = File::open(netns)?;
    // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        bail!("setns {}", netns.display());
    }
    let addr = SocketAddr::new(IpAddr::V4(SRV_IP), PORT);
    let mut n = 0u64;
    let mut failures = 0u32;
    let mut first = true;
    while first || Instant::now() < deadline {
        first = false;
        // A lost SYN is retransmitted after 1 s: wait for it, and give up only on a persistent
        // failure (the run's `syn_losses` says it happened).
        let c = match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            Ok(c) => c,
            Err(e) => {
                failures += 1;
                if failures > 10 {
                    bail!("connections keep failing: {e}");
                }
                continue;
            }
        };
        crate::reset_on_close(&c);
        drop(c);
        n += 1;
    }
    Ok(n)
}

fn iperf(lab: &Lab, seconds: u64) -> Result<IperfRun> {
    // Every variant streams through an empty conntrack table, not the previous variant's
    // connection loop's closed entries.
    let _ = lab.node.try_run("conntrack -F 2>/dev/null");
    let args = iperf::client_args(&SRV_IP.to_string(), seconds);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = lab
        .cli
        .command(&args)
        .output()
        .context("run iperf3 (Debian package iperf3)")?;
    iperf::parse(&out.stdout, "client pod")
}

fn iptables_load(lab: &Lab, tool: &str, rules: &str) -> Result<()> {
    let mut child = lab
        .node
        .command(&[tool])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("run {tool}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("{tool}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // Make sure the linear chain really is in place, or the comparison means nothing.
    let save = tool.replace("-restore", "-save");
    let listed = lab.node.run(&save);
    let want = rules
        .lines()
        .filter(|l| l.starts_with("-A SEPAL-BENCH"))
        .count();
    let have = listed
        .lines()
        .filter(|l| l.starts_with("-A SEPAL-BENCH"))
        .count();
    if have != want {
        bail!("{tool}: {have} of {want} rules loaded");
    }
    Ok(())
}

fn iptables_flush(lab: &Lab, tool: &str) {
    let base = tool.trim_end_matches("-restore");
    let _ = lab.node.try_run(&format!(
        "{base} -F FORWARD; {base} -F SEPAL-BENCH; {base} -X SEPAL-BENCH"
    ));
}

/// Figures of one Sepal table against the references (medians of per-run ratios: each run
/// measures every variant back to back, so a ratio within one run cancels the machine's drift
/// between runs).
struct SepalFigures {
    /// Median steady throughput (bit/s) and CPU microseconds per MB moved.
    tput: f64,
    tput_cpu_us_per_mb: f64,
    /// Throughput over no policy: steady rate (see `iperf`) and whole-run means.
    tput_ratio: f64,
    tput_mean_ratio: f64,
    /// CPU per byte without policy over with Sepal's: the throughput ratio as the machine's
    /// load does not move it.
    tput_cpu_ratio: f64,
    /// Over conntrack alone: what the policy costs on a node that tracks connections anyway
    /// (kube-proxy's NAT makes every node do so).
    tput_ratio_ct: f64,
    rate_ratio_ct: f64,
    /// Conntrack alone's CPU per MB and per connection over Sepal's: the two ratios above as
    /// the machine's load barely moves them.
    tput_cpu_ratio_ct: f64,
    cpu_ratio_ct: f64,
    rate_ratio_nft: f64,
    rate_ratio_legacy: f64,
    /// Linear iptables' CPU per connection over Sepal's.
    cpu_ratio_nft: f64,
    cpu_ratio_legacy: f64,
}

struct DatapathFigures {
    /// Sepal's table with the NetworkPolicy alone, and with the Admin tier in front of it.
    np: SepalFigures,
    admin: SepalFigures,
    tput_none: f64,
    /// With connection tracking alone: what no ruleset that needs conntrack can go below.
    tput_conntrack: f64,
    /// CPU microseconds per MB moved: none, conntrack only.
    tput_cpu_us_per_mb: [f64; 2],
    /// Conntrack alone over no policy (throughput) and over linear iptables (connection rate):
    /// the best any policy that tracks connections can do on this machine.
    ct_tput_ratio: f64,
    ct_rate_ratio_nft: f64,
    /// Medians of each variant's connections per second, in `Variant::ALL` order.
    rate: [f64; VARIANTS],
    /// Medians of each variant's CPU microseconds per connection.
    cpu_us: [f64; VARIANTS],
    /// Runs in which some variant lost a SYN (its rate then partly measures 1 s timers).
    runs_with_syn_losses: usize,
    /// Packets the measured traffic sent through the Admin tier's Pass rule, and through the
    /// tier chain's return on the mark (summed over runs).
    passed: (u64, u64),
}

const VARIANTS: usize = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    NoPolicy,
    /// Sepal's table with the server's NetworkPolicy alone.
    Sepal,
    IptablesNft,
    IptablesLegacy,
    /// A table whose only rule is `ct state established,related accept`: the kernel tracks
    /// connections and nothing else happens. The floor for any conntrack-based policy.
    ConntrackOnly,
    /// Sepal's table with the NetworkPolicy and Admin-tier ClusterNetworkPolicies selecting
    /// the server (`cnp::datapath_policies`): a shared tier chain and the Pass mark on the
    /// measured connections' way.
    SepalAdmin,
}

impl Variant {
    const ALL: [Variant; VARIANTS] = [
        Variant::NoPolicy,
        Variant::Sepal,
        Variant::IptablesNft,
        Variant::IptablesLegacy,
        Variant::ConntrackOnly,
        Variant::SepalAdmin,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::NoPolicy => "none",
            Variant::Sepal => "sepal",
            Variant::IptablesNft => "iptables-nft linear",
            Variant::IptablesLegacy => "iptables-legacy linear",
            Variant::ConntrackOnly => "conntrack only",
            Variant::SepalAdmin => "sepal + admin tier",
        }
    }

    /// Does the variant also measure throughput (the linear iptables ones measure only the
    /// connection rate, where a linear ruleset's price shows)?
    fn streams(self) -> bool {
        !matches!(self, Variant::IptablesNft | Variant::IptablesLegacy)
    }
}

fn datapath(a: &Args) -> Result<DatapathFigures> {
    let lab = lab();
    // Accept loop in the server pod.
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = std::sync::mpsc::channel::<Result<()>>();
    let srv = lab.srv.path();
    let stop2 = stop.clone();
    let server = std::thread::spawn(move || {
        let listener = (|| -> Result<TcpListener> {
            let f = File::open(&srv)?;
            // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns server");
            }
            let l = TcpListener::bind(("0.0.0.0", PORT))?;
            // A second listen() only resizes the accept queue (std binds with 128).
            // SAFETY: a valid listening socket.
            if unsafe { libc::listen(l.as_raw_fd(), BACKLOG) } != 0 {
                bail!("listen backlog {BACKLOG}");
            }
            Ok(l)
        })();
        let listener = match listener {
            Ok(l) => {
                let _ = tx.send(Ok(()));
                l
            }
            Err(e) => {
                let _ = tx.send(Err(e));
                return;
            }
        };
        // Blocking accept; the connection made after `stop` is set wakes it for the last time.
        while !stop2.load(Ordering::Relaxed) {
            if let Ok((s, _)) = listener.accept() {
                drop(s);
            }
        }
    });
    rx.recv().context("server thread")??;
    let mut iperf_srv = lab
        .srv
        .command(&["iperf3", "-s", "-p", "5201"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .context("run iperf3 (Debian package iperf3)")?;
    std::thread::sleep(Duration::from_millis(300));

    let (mut cluster, sources) = datapath_cluster(a.peers)?;
    let rs = compile(&cluster);
    let elements: usize = rs.sets.values().map(|s| s.elements.len()).sum();
    println!(
        "datapath: server isolated by {} peers' worth of selectors and ipBlocks -> {} set elements, {} rules in its chain; linear iptables: {} rules",
        a.peers,
        elements,
        rs.chains.get("in-sepsrv").map(|c| c.rules.len()).unwrap_or(0),
        sources.len() + 1
    );
    cluster
        .cluster_policies
        .extend(cnp::datapath_policies(PORT, 5201)?);
    let rs_admin = compile(&cluster);
    cnp::check_no_problems(&rs_admin)?;
    println!(
        "  with the Admin tier: {} ClusterNetworkPolicies select the server ({}); its chain: {} rules",
        cluster.cluster_policies.len(),
        cnp::tier_shape(&rs_admin),
        rs_admin
            .chains
            .get("in-sepsrv")
            .map(|c| c.rules.len())
            .unwrap_or(0),
    );
    let mut dp = nft_in(&lab.node);
    let ipt = iptables_rules(&sources);

    let mut tputs: [Vec<IperfRun>; VARIANTS] = Default::default();
    let mut conns: [Vec<ConnRun>; VARIANTS] = Default::default();
    let mut runs_with_syn_losses = 0;
    let mut passed = (0, 0);
    for run in 0..a.runs {
        // Every variant once per run, in a rotating order, so neither drift in the machine's
        // speed nor position in the run favours one.
        for k in 0..VARIANTS {
            let i = (run + k) % VARIANTS;
            let v = Variant::ALL[i];
            // Set up the variant.
            match v {
                Variant::NoPolicy => {}
                Variant::Sepal => {
                    dp.resync(&rs)?;
                }
                Variant::SepalAdmin => {
                    dp.resync(&rs_admin)?;
                }
                Variant::IptablesNft => iptables_load(&lab, "iptables-restore", &ipt)?,
                Variant::IptablesLegacy => iptables_load(&lab, "iptables-legacy-restore", &ipt)?,
                Variant::ConntrackOnly => {
                    lab.node.run(
                        "nft 'add table inet bench-ct; add chain inet bench-ct f { type filter hook forward priority 0; }; add rule inet bench-ct f ct state established,related accept'",
                    );
                }
            }
            if v.streams() {
                tputs[i].push(iperf(&lab, a.seconds)?);
            }
            conns[i].push(conn_rate(&lab, a.seconds)?);
            // Tear it down.
            match v {
                Variant::NoPolicy => {}
                Variant::Sepal => dp.delete()?,
                Variant::SepalAdmin => {
                    // The Pass path must be what the measured traffic took.
                    let counters = dp.counters()?;
                    let sum = |what: &dyn Fn(&str) -> bool| -> u64 {
                        counters
                            .iter()
                            .filter(|((_, comment), _)| what(comment))
                            .map(|(_, c)| c.packets)
                            .sum()
                    };
                    let pass = sum(&|c| c.starts_with("Admin/bench-delegate ingress[0]"));
                    let ret = sum(&|c| c == "Admin/bench-delegate ingress passed");
                    if pass == 0 || ret == 0 {
                        bail!("the measured connections did not take the Admin tier's Pass path (Pass rule {pass} packets, tier return {ret}): {counters:?}");
                    }
                    passed.0 += pass;
                    passed.1 += ret;
                    dp.delete()?
                }
                Variant::IptablesNft => {
                    iptables_flush(&lab, "iptables-restore");
                    lab.node.try_run("nft delete table ip filter").ok();
                }
                Variant::IptablesLegacy => iptables_flush(&lab, "iptables-legacy-restore"),
                Variant::ConntrackOnly => {
                    lab.node.run("nft delete table inet bench-ct");
                }
            }
        }
        let line: Vec<String> = Variant::ALL
            .iter()
            .zip(&conns)
            .map(|(v, c)| {
                let c = c[run];
                let lost = if c.syn_losses > 0 {
                    format!(", {} SYNs lost", c.syn_losses)
                } else {
                    String::new()
                };
                format!(
                    "{} {:.0} ({:.0} us CPU{lost})",
                    v.label(),
                    c.per_second,
                    c.cpu_us
                )
            })
            .collect();
        if conns.iter().any(|c| c[run].syn_losses > 0) {
            runs_with_syn_losses += 1;
        }
        let streams: Vec<String> = Variant::ALL
            .iter()
            .zip(&tputs)
            .filter(|(v, _)| v.streams())
            .map(|(v, t)| {
                format!(
                    "{} {:.2} Gbit/s ({:.0} us CPU per MB)",
                    v.label(),
                    t[run].steady_bps / 1e9,
                    t[run].cpu_us_per_mb
                )
            })
            .collect();
        println!(
            "run {}: throughput {}; conn/s {}",
            run + 1,
            streams.join(", "),
            line.join(", ")
        );
    }
    stop.store(true, Ordering::Relaxed);
    let _ = conn_rate(&lab, 0);
    let _ = server.join();
    crate::netns::kill(&mut iperf_srv);
    let ratios = |num: &[f64], den: &[f64]| -> f64 {
        median(num.iter().zip(den).map(|(n, d)| n / d).collect())
    };
    let rates: Vec<Vec<f64>> = conns
        .iter()
        .map(|c| c.iter().map(|r| r.per_second).collect())
        .collect();
    let cpus: Vec<Vec<f64>> = conns
        .iter()
        .map(|c| c.iter().map(|r| r.cpu_us).collect())
        .collect();
    let index = |v: Variant| Variant::ALL.iter().position(|&x| x == v).unwrap_or(0);
    let (none, nft, legacy, ct) = (
        index(Variant::NoPolicy),
        index(Variant::IptablesNft),
        index(Variant::IptablesLegacy),
        index(Variant::ConntrackOnly),
    );
    let bps = |i: usize| -> Vec<f64> { tputs[i].iter().map(|r| r.steady_bps).collect() };
    let mean_bps = |i: usize| -> Vec<f64> { tputs[i].iter().map(|r| r.mean_bps).collect() };
    let cpu_per_mb = |i: usize| -> Vec<f64> { tputs[i].iter().map(|r| r.cpu_us_per_mb).collect() };
    let sepal = |v: Variant| {
        let s = index(v);
        SepalFigures {
            tput: median(bps(s)),
            tput_cpu_us_per_mb: median(cpu_per_mb(s)),
            tput_ratio: ratios(&bps(s), &bps(none)),
            tput_mean_ratio: ratios(&mean_bps(s), &mean_bps(none)),
            tput_cpu_ratio: ratios(&cpu_per_mb(none), &cpu_per_mb(s)),
            tput_ratio_ct: ratios(&bps(s), &bps(ct)),
            rate_ratio_ct: ratios(&rates[s], &rates[ct]),
            tput_cpu_ratio_ct: ratios(&cpu_per_mb(ct), &cpu_per_mb(s)),
            cpu_ratio_ct: ratios(&cpus[ct], &cpus[s]),
            rate_ratio_nft: ratios(&rates[s], &rates[nft]),
            rate_ratio_legacy: ratios(&rates[s], &rates[legacy]),
            cpu_ratio_nft: ratios(&cpus[nft], &cpus[s]),
            cpu_ratio_legacy: ratios(&cpus[legacy], &cpus[s]),
        }
    };
    Ok(DatapathFigures {
        np: sepal(Variant::Sepal),
        admin: sepal(Variant::SepalAdmin),
        tput_none: median(bps(none)),
        tput_conntrack: median(bps(ct)),
        tput_cpu_us_per_mb: [none, ct].map(|i| median(cpu_per_mb(i))),
        ct_tput_ratio: ratios(&bps(ct), &bps(none)),
        ct_rate_ratio_nft: ratios(&rates[ct], &rates[nft]),
        rate: std::array::from_fn(|i| median(rates[i].clone())),
        cpu_us: std::array::from_fn(|i| median(cpus[i].clone())),
        runs_with_syn_losses,
        passed,
    })
}

fn round(x: f64, places: i32) -> f64 {
    let k = 10f64.powi(places);
    (x * k).round() / k
}

pub fn run(args: &[String]) -> Result<()> {
    let a = parse(args)?;
    crate::require_root();
    let np = control_plane(&a, 0)?;
    let with_cnps = if a.cluster_policies > 0 {
        Some(control_plane(&a, a.cluster_policies)?)
    } else {
        None
    };
    // Ten times the pods and the NetworkPolicies (every pod still local: the worst case for a
    // node's table), one full apply: the figures issue 18 asks for at cluster scale.
    let scaled = if a.scale > 1 {
        let big = Args {
            pods: a.pods * a.scale,
            policies: a.policies * a.scale,
            runs: 1,
            ..a
        };
        Some(control_plane(&big, 0)?)
    } else {
        None
    };
    let d = datapath(&a)?;
    let [none, sepal, ipt, legacy, ct, admin] = d.rate;
    println!(
        "medians over {} runs (ratios: medians of each run's ratio): steady throughput none {:.2} Gbit/s, sepal {:.2} Gbit/s (ratio {:.3}; whole-run means {:.3}), sepal + admin tier {:.2} Gbit/s (ratio {:.3}); new connections/s none {none:.0}, sepal {sepal:.0}, sepal + admin tier {admin:.0}, linear iptables (nf_tables backend, Debian default) {ipt:.0} (ratio {:.2}; with the admin tier {:.2}), linear iptables-legacy {legacy:.0} (ratio {:.2}; {:.2})",
        a.runs,
        d.tput_none / 1e9,
        d.np.tput / 1e9,
        d.np.tput_ratio,
        d.np.tput_mean_ratio,
        d.admin.tput / 1e9,
        d.admin.tput_ratio,
        d.np.rate_ratio_nft,
        d.admin.rate_ratio_nft,
        d.np.rate_ratio_legacy,
        d.admin.rate_ratio_legacy,
    );
    println!(
        "conntrack alone (a one-rule table, what any node running kube-proxy has): {:.2} Gbit/s, {ct:.0} connections/s (throughput {:.3} of none, connection rate {:.2}x linear iptables); over it: sepal throughput {:.3}, connections/s {:.3}; sepal + admin tier throughput {:.3}, connections/s {:.3}",
        d.tput_conntrack / 1e9,
        d.ct_tput_ratio,
        d.ct_rate_ratio_nft,
        d.np.tput_ratio_ct,
        d.np.rate_ratio_ct,
        d.admin.tput_ratio_ct,
        d.admin.rate_ratio_ct
    );
    println!(
        "  steadier under load, conntrack alone's CPU over Sepal's: per MB {:.3}, per connection {:.3}; with the admin tier: per MB {:.3}, per connection {:.3} (the admin tier's own cost: {:.1} us CPU per connection)",
        d.np.tput_cpu_ratio_ct,
        d.np.cpu_ratio_ct,
        d.admin.tput_cpu_ratio_ct,
        d.admin.cpu_ratio_ct,
        d.cpu_us[5] - d.cpu_us[1]
    );
    println!(
        "admin tier's Pass path on the measured traffic: {} packets met the Pass rule, {} left the tier chain on the mark",
        d.passed.0, d.passed.1
    );
    println!(
        "CPU per MB through the node (iperf3 sender + receiver with their softirq work): none {:.0}, sepal {:.0}, sepal + admin tier {:.0}, conntrack only {:.0} us; none/sepal {:.3}, none/(sepal + admin tier) {:.3}",
        d.tput_cpu_us_per_mb[0],
        d.np.tput_cpu_us_per_mb,
        d.admin.tput_cpu_us_per_mb,
        d.tput_cpu_us_per_mb[1],
        d.np.tput_cpu_ratio,
        d.admin.tput_cpu_ratio
    );
    let [none, sepal, ipt, legacy, ct, admin] = d.cpu_us;
    println!(
        "CPU per connection (this process: client and accept threads with their softirq work; steady under load): none {none:.1}, conntrack only {ct:.1}, sepal {sepal:.1}, sepal + admin tier {admin:.1}, linear iptables {ipt:.1} (x{:.2} sepal, x{:.2} with the admin tier), linear iptables-legacy {legacy:.1} (x{:.2}, x{:.2}) us; runs with lost SYNs: {} of {}",
        d.np.cpu_ratio_nft,
        d.admin.cpu_ratio_nft,
        d.np.cpu_ratio_legacy,
        d.admin.cpu_ratio_legacy,
        d.runs_with_syn_losses,
        a.runs
    );
    // Unprefixed keys: Sepal as configured in full, NetworkPolicies and ClusterNetworkPolicies
    // (the control plane with `--cluster-policies`, the datapath with the Admin tier); `np_only_`
    // the same without ClusterNetworkPolicies (what the unprefixed keys measured before them);
    // `cnp_` repeats the with-ClusterNetworkPolicy control-plane figures under their own names.
    let cp = with_cnps.as_ref().unwrap_or(&np);
    let s = &d.admin;
    let mut json = serde_json::json!({
        "full_apply_ms": round(cp.full, 1),
        "incremental_ms": round(cp.incremental(), 1),
        "incremental_policy_ms": round(cp.policy, 1),
        "incremental_pod_ms": round(cp.pod, 1),
        "incremental_relabel_ms": round(cp.relabel, 1),
        "incremental_cpu_ms": round(cp.cpu, 1),
        "full_apply_compile_ms": round(cp.full_compile, 1),
        "full_apply_render_ms": round(cp.full_render, 1),
        "full_apply_nft_ms": round(cp.full_nft, 1),
        "np_only_full_apply_ms": round(np.full, 1),
        "np_only_incremental_ms": round(np.incremental(), 1),
        "np_only_incremental_cpu_ms": round(np.cpu, 1),
        "throughput_ratio_vs_none": round(s.tput_ratio, 3),
        "throughput_mean_ratio_vs_none": round(s.tput_mean_ratio, 3),
        "throughput_cpu_ratio_vs_none": round(s.tput_cpu_ratio, 3),
        "throughput_ratio_vs_conntrack_only": round(s.tput_ratio_ct, 3),
        "conn_rate_ratio_vs_conntrack_only": round(s.rate_ratio_ct, 3),
        "throughput_cpu_ratio_vs_conntrack_only": round(s.tput_cpu_ratio_ct, 3),
        "conn_cpu_ratio_vs_conntrack_only": round(s.cpu_ratio_ct, 3),
        "conntrack_only_throughput_ratio_vs_none": round(d.ct_tput_ratio, 3),
        "conntrack_only_conn_rate_ratio_vs_linear_iptables": round(d.ct_rate_ratio_nft, 2),
        "conn_rate_ratio_vs_linear_iptables": round(s.rate_ratio_nft, 2),
        "conn_rate_ratio_vs_linear_iptables_legacy": round(s.rate_ratio_legacy, 2),
        "conn_cpu_ratio_vs_linear_iptables": round(s.cpu_ratio_nft, 2),
        "conn_cpu_ratio_vs_linear_iptables_legacy": round(s.cpu_ratio_legacy, 2),
        "np_only_throughput_ratio_vs_none": round(d.np.tput_ratio, 3),
        "np_only_throughput_ratio_vs_conntrack_only": round(d.np.tput_ratio_ct, 3),
        "np_only_conn_rate_ratio_vs_conntrack_only": round(d.np.rate_ratio_ct, 3),
        "np_only_conn_cpu_ratio_vs_conntrack_only": round(d.np.cpu_ratio_ct, 3),
        "np_only_conn_rate_ratio_vs_linear_iptables": round(d.np.rate_ratio_nft, 2),
        "conn_runs_with_syn_losses": d.runs_with_syn_losses,
    });
    if let Some(c) = &scaled {
        json["full_apply_ms_10x"] = round(c.full, 1).into();
        json["incremental_ms_10x"] = round(c.incremental(), 1).into();
        json["scale"] = a.scale.into();
    }
    if let Some(c) = &with_cnps {
        json["cnp_full_apply_ms"] = round(c.full, 1).into();
        json["cnp_incremental_ms"] = round(c.incremental(), 1).into();
        if let Some(ms) = c.cluster_policy {
            json["incremental_cluster_policy_ms"] = round(ms, 1).into();
        }
    }
    println!("{json}");
    Ok(())
}
