//! `sepal-bench policy`: (1) compile + apply time of a 1000-pod / 500-policy cluster, full and
//! after one change; (2) datapath cost between two pods behind 10,000 peers' worth of selectors
//! and ipBlocks: throughput vs no policy, new-connection rate vs a linear iptables ruleset, each
//! also as CPU per byte and per connection (steady on a loaded machine), and next to a table
//! that only turns conntrack on (the floor for any conntrack-based policy).

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
use sepal_felix::nft::{Dataplane, Options};
use sepal_felix::policy::{
    compile, Cluster, Compiler, NamedPort, Namespace, NetworkPolicy, Pod, Protocol,
};

use super::iperf::{self, IperfRun};
use crate::netns::{veth, Netns};

struct Args {
    pods: usize,
    policies: usize,
    peers: usize,
    seconds: u64,
    runs: usize,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut a = Args {
        pods: 1000,
        policies: 500,
        peers: 10_000,
        seconds: 2,
        runs: 5,
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
            "--peers" => a.peers = value,
            "--seconds" => a.seconds = value as u64,
            "--runs" => a.runs = value.max(1),
            other => {
                bail!("unknown option {other}; options: --pods --policies --peers --seconds --runs")
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

fn control_plane(a: &Args) -> Result<(f64, f64, f64, f64)> {
    let ns = Netns::new("bpol");
    let mut cluster = big_cluster(a.pods, a.policies)?;
    let mut dp = nft_in(&ns);
    let mut fulls = Vec::new();
    for _ in 0..a.runs {
        dp.delete().ok();
        let t = Instant::now();
        let rs = compile(&cluster);
        dp.resync(&rs)?;
        fulls.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let t = Instant::now();
    let rs = compile(&cluster);
    let compile_ms = t.elapsed().as_secs_f64() * 1000.0;
    if let Ok(path) = std::env::var("SEPAL_BENCH_DUMP") {
        std::fs::write(
            path,
            sepal_felix::nft::render_full(&rs, &Options::default()),
        )?;
    }
    println!(
        "control plane (compile alone {compile_ms:.1} ms): {} pods (all local), {} policies -> {} sets, {} chains, {} rules",
        a.pods,
        a.policies,
        rs.sets.len(),
        rs.chains.len(),
        rs.chains.values().map(|c| c.rules.len()).sum::<usize>()
    );
    // One policy change, then one new pod, each from model change to kernel ack, as the agent
    // does it: a long-lived compiler (it remembers validated policies) and the dataplane.
    let mut compiler = Compiler::default();
    let (rs, touched) = compiler.update(&cluster);
    dp.apply_update(rs, touched)?;
    let (mut pol_ms, mut pod_ms, mut compile_ms) = (Vec::new(), Vec::new(), Vec::new());
    let mut cpu_ms = Vec::new();
    let mut timed = |dp: &mut Dataplane, cluster: &Cluster| -> Result<f64> {
        let cpu = cpu_time_ms();
        let t = Instant::now();
        let (rs, touched) = compiler.update(cluster);
        compile_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        dp.apply_update(rs, touched)?;
        let wall = t.elapsed().as_secs_f64() * 1000.0;
        cpu_ms.push(cpu_time_ms() - cpu);
        Ok(wall)
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
        pol_ms.push(timed(&mut dp, &cluster)?);

        cluster.pods.push(pod(
            "ns3",
            format!("new{i}"),
            &[("app", format!("app{}", i % 50)), ("role", "r1".into())],
            Ipv4Addr::new(10, 245, 0, i as u8 + 1),
            true,
        ));
        pod_ms.push(timed(&mut dp, &cluster)?);
    }
    let compile_inc = median(compile_ms);
    let cpu_inc = median(cpu_ms);
    let full = median(fulls);
    let (pol, newpod) = (median(pol_ms), median(pod_ms));
    println!(
        "full compile + apply (atomic replace): {full:.1} ms (median of {})",
        a.runs
    );
    println!("one policy changed -> in the kernel: {pol:.1} ms; one new pod: {newpod:.1} ms (medians of 10; compile {compile_inc:.1} ms of it, the rest is diff + one nft transaction)");
    println!("CPU per incremental change (this process and nft, user + system): {cpu_inc:.1} ms (median of 20); wall time above includes waiting for a CPU on a busy machine");
    Ok((full, pol, newpod, cpu_inc))
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

struct DatapathFigures {
    tput_none: f64,
    tput_sepal: f64,
    /// With connection tracking alone: what no ruleset that needs conntrack can go below.
    tput_conntrack: f64,
    /// CPU microseconds per MB moved: none, sepal, conntrack only.
    tput_cpu_us_per_mb: [f64; 3],
    /// CPU per byte without policy over with Sepal's (per-run ratios, median): the throughput
    /// ratio as the machine's load does not move it.
    tput_cpu_ratio: f64,
    /// Sepal over conntrack alone (per-run ratios, median): what the policy costs on a node
    /// that tracks connections anyway (kube-proxy's NAT makes every node do so).
    tput_ratio_ct: f64,
    rate_ratio_ct: f64,
    /// Conntrack alone over no policy (throughput) and over linear iptables (connection rate):
    /// the best any policy that tracks connections can do on this machine.
    ct_tput_ratio: f64,
    ct_rate_ratio_nft: f64,
    /// Medians of each variant's connections per second, in `Variant::ALL` order.
    rate: [f64; 5],
    /// Medians of each variant's CPU microseconds per connection.
    cpu_us: [f64; 5],
    /// Medians of the per-run ratios: each run measures every variant back to back, so a
    /// ratio within one run cancels the machine's drift between runs. Throughput is the steady
    /// rate (see `iperf`); `tput_mean_ratio` the same from whole-run means.
    tput_ratio: f64,
    tput_mean_ratio: f64,
    rate_ratio_nft: f64,
    rate_ratio_legacy: f64,
    /// Linear iptables' CPU per connection over Sepal's (per-run ratios, median).
    cpu_ratio_nft: f64,
    cpu_ratio_legacy: f64,
    /// Runs in which some variant lost a SYN (its rate then partly measures 1 s timers).
    runs_with_syn_losses: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    NoPolicy,
    Sepal,
    IptablesNft,
    IptablesLegacy,
    /// A table whose only rule is `ct state established,related accept`: the kernel tracks
    /// connections and nothing else happens. The floor for any conntrack-based policy.
    ConntrackOnly,
}

impl Variant {
    const ALL: [Variant; 5] = [
        Variant::NoPolicy,
        Variant::Sepal,
        Variant::IptablesNft,
        Variant::IptablesLegacy,
        Variant::ConntrackOnly,
    ];

    fn label(self) -> &'static str {
        match self {
            Variant::NoPolicy => "none",
            Variant::Sepal => "sepal",
            Variant::IptablesNft => "iptables-nft linear",
            Variant::IptablesLegacy => "iptables-legacy linear",
            Variant::ConntrackOnly => "conntrack only",
        }
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

    let (cluster, sources) = datapath_cluster(a.peers)?;
    let rs = compile(&cluster);
    let elements: usize = rs.sets.values().map(|s| s.elements.len()).sum();
    println!(
        "datapath: server isolated by {} peers' worth of selectors and ipBlocks -> {} set elements, {} rules in its chain; linear iptables: {} rules",
        a.peers,
        elements,
        rs.chains.get("in-sepsrv").map(|c| c.rules.len()).unwrap_or(0),
        sources.len() + 1
    );
    let mut dp = nft_in(&lab.node);
    let ipt = iptables_rules(&sources);

    let (mut t_none, mut t_sepal, mut t_ct) = (Vec::new(), Vec::new(), Vec::new());
    let mut conns: [Vec<ConnRun>; 5] = Default::default();
    let mut runs_with_syn_losses = 0;
    for run in 0..a.runs {
        // Every variant once per run, in a rotating order, so neither drift in the machine's
        // speed nor position in the run favours one.
        for k in 0..Variant::ALL.len() {
            let i = (run + k) % Variant::ALL.len();
            let conn = match Variant::ALL[i] {
                Variant::NoPolicy => {
                    t_none.push(iperf(&lab, a.seconds)?);
                    conn_rate(&lab, a.seconds)?
                }
                Variant::Sepal => {
                    dp.resync(&rs)?;
                    t_sepal.push(iperf(&lab, a.seconds)?);
                    let conn = conn_rate(&lab, a.seconds)?;
                    dp.delete()?;
                    conn
                }
                Variant::IptablesNft => {
                    iptables_load(&lab, "iptables-restore", &ipt)?;
                    let conn = conn_rate(&lab, a.seconds)?;
                    iptables_flush(&lab, "iptables-restore");
                    lab.node.try_run("nft delete table ip filter").ok();
                    conn
                }
                Variant::IptablesLegacy => {
                    iptables_load(&lab, "iptables-legacy-restore", &ipt)?;
                    let conn = conn_rate(&lab, a.seconds)?;
                    iptables_flush(&lab, "iptables-legacy-restore");
                    conn
                }
                Variant::ConntrackOnly => {
                    lab.node.run(
                        "nft 'add table inet bench-ct; add chain inet bench-ct f { type filter hook forward priority 0; }; add rule inet bench-ct f ct state established,related accept'",
                    );
                    t_ct.push(iperf(&lab, a.seconds)?);
                    let conn = conn_rate(&lab, a.seconds)?;
                    lab.node.run("nft delete table inet bench-ct");
                    conn
                }
            };
            conns[i].push(conn);
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
        println!(
            "run {}: throughput none {:.2} / sepal {:.2} / conntrack only {:.2} Gbit/s (CPU {:.0} / {:.0} / {:.0} us per MB); conn/s {}",
            run + 1,
            t_none[run].steady_bps / 1e9,
            t_sepal[run].steady_bps / 1e9,
            t_ct[run].steady_bps / 1e9,
            t_none[run].cpu_us_per_mb,
            t_sepal[run].cpu_us_per_mb,
            t_ct[run].cpu_us_per_mb,
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
    let (sepal, nft, legacy) = (1, 2, 3);
    let bps = |runs: &[IperfRun]| -> Vec<f64> { runs.iter().map(|r| r.steady_bps).collect() };
    let mean_bps = |runs: &[IperfRun]| -> Vec<f64> { runs.iter().map(|r| r.mean_bps).collect() };
    let cpu_per_mb =
        |runs: &[IperfRun]| -> Vec<f64> { runs.iter().map(|r| r.cpu_us_per_mb).collect() };
    Ok(DatapathFigures {
        tput_ratio: ratios(&bps(&t_sepal), &bps(&t_none)),
        tput_mean_ratio: ratios(&mean_bps(&t_sepal), &mean_bps(&t_none)),
        tput_cpu_ratio: ratios(&cpu_per_mb(&t_none), &cpu_per_mb(&t_sepal)),
        rate_ratio_nft: ratios(&rates[sepal], &rates[nft]),
        tput_ratio_ct: ratios(&bps(&t_sepal), &bps(&t_ct)),
        rate_ratio_ct: ratios(&rates[sepal], &rates[4]),
        ct_tput_ratio: ratios(&bps(&t_ct), &bps(&t_none)),
        ct_rate_ratio_nft: ratios(&rates[4], &rates[nft]),
        rate_ratio_legacy: ratios(&rates[sepal], &rates[legacy]),
        cpu_ratio_nft: ratios(&cpus[nft], &cpus[sepal]),
        cpu_ratio_legacy: ratios(&cpus[legacy], &cpus[sepal]),
        tput_none: median(bps(&t_none)),
        tput_sepal: median(bps(&t_sepal)),
        tput_conntrack: median(bps(&t_ct)),
        tput_cpu_us_per_mb: [&t_none, &t_sepal, &t_ct].map(|t| median(cpu_per_mb(t))),
        rate: [0, 1, 2, 3, 4].map(|i| median(rates[i].clone())),
        cpu_us: [0, 1, 2, 3, 4].map(|i| median(cpus[i].clone())),
        runs_with_syn_losses,
    })
}

pub fn run(args: &[String]) -> Result<()> {
    let a = parse(args)?;
    crate::require_root();
    let (full, pol, newpod, cpu_inc) = control_plane(&a)?;
    let d = datapath(&a)?;
    let (tput_ratio, rate_ratio, legacy_ratio) =
        (d.tput_ratio, d.rate_ratio_nft, d.rate_ratio_legacy);
    println!(
        "medians over {} runs (ratios: medians of each run's ratio): steady throughput none {:.2} Gbit/s, sepal {:.2} Gbit/s (ratio {tput_ratio:.3}; whole-run means {:.3}); new connections/s none {:.0}, sepal {:.0}, linear iptables (nf_tables backend, Debian default) {:.0} (ratio {rate_ratio:.2}), linear iptables-legacy {:.0} (ratio {legacy_ratio:.2})",
        a.runs,
        d.tput_none / 1e9,
        d.tput_sepal / 1e9,
        d.tput_mean_ratio,
        d.rate[0],
        d.rate[1],
        d.rate[2],
        d.rate[3]
    );
    println!(
        "conntrack alone (a one-rule table, what any node running kube-proxy has): {:.2} Gbit/s, {:.0} connections/s (throughput {:.3} of none, connection rate {:.2}x linear iptables); sepal over it: throughput {:.3}, connections/s {:.3}",
        d.tput_conntrack / 1e9,
        d.rate[4],
        d.ct_tput_ratio,
        d.ct_rate_ratio_nft,
        d.tput_ratio_ct,
        d.rate_ratio_ct
    );
    println!(
        "CPU per MB through the node (iperf3 sender + receiver with their softirq work): none {:.0}, sepal {:.0}, conntrack only {:.0} us; none/sepal {:.3}",
        d.tput_cpu_us_per_mb[0], d.tput_cpu_us_per_mb[1], d.tput_cpu_us_per_mb[2], d.tput_cpu_ratio
    );
    println!(
        "CPU per connection (this process: client and accept threads with their softirq work; steady under load): none {:.1}, conntrack only {:.1}, sepal {:.1}, linear iptables {:.1} (x{:.2} sepal), linear iptables-legacy {:.1} (x{:.2}) us; runs with lost SYNs: {} of {}",
        d.cpu_us[0],
        d.cpu_us[4],
        d.cpu_us[1],
        d.cpu_us[2],
        d.cpu_ratio_nft,
        d.cpu_us[3],
        d.cpu_ratio_legacy,
        d.runs_with_syn_losses,
        a.runs
    );
    println!(
        "{}",
        serde_json::json!({
            "full_apply_ms": (full * 10.0).round() / 10.0,
            "incremental_ms": (pol.max(newpod) * 10.0).round() / 10.0,
            "incremental_policy_ms": (pol * 10.0).round() / 10.0,
            "incremental_pod_ms": (newpod * 10.0).round() / 10.0,
            "incremental_cpu_ms": (cpu_inc * 10.0).round() / 10.0,
            "throughput_ratio_vs_none": (tput_ratio * 1000.0).round() / 1000.0,
            "throughput_mean_ratio_vs_none": (d.tput_mean_ratio * 1000.0).round() / 1000.0,
            "throughput_cpu_ratio_vs_none": (d.tput_cpu_ratio * 1000.0).round() / 1000.0,
            "throughput_ratio_vs_conntrack_only": (d.tput_ratio_ct * 1000.0).round() / 1000.0,
            "conn_rate_ratio_vs_conntrack_only": (d.rate_ratio_ct * 1000.0).round() / 1000.0,
            "conntrack_only_throughput_ratio_vs_none": (d.ct_tput_ratio * 1000.0).round() / 1000.0,
            "conntrack_only_conn_rate_ratio_vs_linear_iptables": (d.ct_rate_ratio_nft * 100.0).round() / 100.0,
            "conn_rate_ratio_vs_linear_iptables": (rate_ratio * 100.0).round() / 100.0,
            "conn_rate_ratio_vs_linear_iptables_legacy": (legacy_ratio * 100.0).round() / 100.0,
            "conn_cpu_ratio_vs_linear_iptables": (d.cpu_ratio_nft * 100.0).round() / 100.0,
            "conn_cpu_ratio_vs_linear_iptables_legacy": (d.cpu_ratio_legacy * 100.0).round() / 100.0,
            "conn_runs_with_syn_losses": d.runs_with_syn_losses,
        })
    );
    Ok(())
}
