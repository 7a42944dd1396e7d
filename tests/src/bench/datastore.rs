// `sepal-bench datastore`: the real agent (`sepal node --datastore kubernetes`, as ServiceAccount
// sepal-system/sepal-node) against the real API server of `sepal lab control-plane`, loaded with a
// large cluster (1,000 Nodes, 30,000 Pods, 1,000 NetworkPolicies, 2,000 Services by default, and
// the EndpointSlices the controller makes for them).
//
// The control plane and the agent share one network namespace (the agent reaches the API server
// on its loopback, and its routes and nftables table stay out of the host). The load is created
// once; then the agent starts `--runs` times from a fresh state directory as Node node-0, and
// each run reports its time from exec to /readyz 200, its CPU time then, its peak RSS
// (VmHWM) up to the end of its first status round, and its API requests: the API server's
// apiserver_request_total over the agent's life minus that of an idle window as long, checked
// against the audit log's count of the agent's own requests.

mod agent;
mod churn;
mod fanout;
mod load;
mod objects;
mod requests;
mod timeline;

use crate::kube::{Cluster, Options};
use crate::netns::Netns;
use anyhow::{bail, Context, Result};
use objects::Sizes;
use serde_json::json;
use std::time::{Duration, Instant};

/// Cilium's published agent memory, the average at 1,000 nodes and 50,000 pods (its scalability
/// report), the reference our peak RSS is put beside.
const CILIUM_RSS_MIB: f64 = 438.0;
const TARGET_RSS_MIB: f64 = 64.0;
const TARGET_READY_MS: f64 = 5000.0;
/// Issue 18's targets at Kubernetes' limits (5,000 Nodes, 150,000 Pods), for clusters past the
/// default size.
const TARGET_RSS_MIB_LIMITS: f64 = 128.0;
const TARGET_READY_MS_LIMITS: f64 = 10_000.0;

/// The targets a cluster of this size is held to: the default size's, or the limits' beyond it.
fn targets(s: &Sizes) -> (f64, f64) {
    if s.nodes > 1000 || s.pods > 30_000 {
        (TARGET_RSS_MIB_LIMITS, TARGET_READY_MS_LIMITS)
    } else {
        (TARGET_RSS_MIB, TARGET_READY_MS)
    }
}

struct Args {
    sizes: Sizes,
    runs: usize,
    /// Keep the loaded cluster after the runs and run the agent again for every line read on
    /// stdin (for profiling a rebuilt agent without loading the cluster again).
    hold: bool,
    /// Agent-equivalent watcher counts to measure the API server's fan-out at (none: skip).
    watchers: Vec<usize>,
}

fn parse(args: &[String]) -> Result<Args> {
    let mut a = Args {
        sizes: Sizes {
            nodes: 1000,
            pods: 30_000,
            policies: 1000,
            services: 2000,
        },
        runs: 3,
        hold: false,
        watchers: vec![50, 200],
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--hold" {
            a.hold = true;
            continue;
        }
        if flag == "--watchers" {
            let v = it.next().context("--watchers needs N,N,… or none")?;
            a.watchers = match v.as_str() {
                "none" | "0" => Vec::new(),
                list => list
                    .split(',')
                    .map(|n| n.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .with_context(|| format!("--watchers {list}: N,N,… expected"))?,
            };
            continue;
        }
        let v: usize = it
            .next()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{flag} needs a number"))?;
        match flag.as_str() {
            "--nodes" => a.sizes.nodes = v,
            "--pods" => a.sizes.pods = v,
            "--policies" => a.sizes.policies = v,
            "--services" => a.sizes.services = v,
            "--runs" => a.runs = v,
            other => {
                bail!("unknown option {other}; use --nodes/--pods/--policies/--services/--runs N, --watchers N,N|none, --hold")
            }
        }
    }
    let s = &a.sizes;
    if s.nodes == 0 || s.nodes > objects::MAX_NODES {
        bail!("--nodes must be 1..={}", objects::MAX_NODES);
    }
    if s.pods == 0 || s.pods.div_ceil(s.nodes) > objects::MAX_PODS_PER_NODE {
        bail!(
            "--pods must be 1..={} per node (a /26 each)",
            objects::MAX_PODS_PER_NODE
        );
    }
    if s.pods.saturating_sub(s.pods.div_ceil(s.nodes))
        < churn::CHANGES / 2 * (a.runs + 1 + a.watchers.len())
    {
        bail!(
            "too few pods for the churn rounds (each replaces {})",
            churn::CHANGES / 2
        );
    }
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    Ok(a)
}

/// One run's figures, the agent's and the API server's.
struct Measured {
    run: agent::Run,
    /// The server's count over the agent's life less that of the idle window after it.
    api_requests: requests::ByVerb,
    /// The idle window's count (the control plane's own background: leases, controllers).
    idle: i64,
    audited: requests::ByVerb,
    churn: churn::Figures,
}

/// Runs the agent once, with churn round `round` once it is ready, counting the API server's
/// requests over its life (less the churn's span, whose writes are the bench's and the
/// controllers') and over an idle window as long right after it.
fn measure(
    cluster: &Cluster,
    netns: &Netns,
    kubeconfig: &std::path::Path,
    s: &Sizes,
    round: usize,
) -> Result<Measured> {
    let audit_before = cluster.agent_requests().len();
    let window = Instant::now();
    let before = requests::served(cluster);
    let admin = cluster.admin_kubeconfig();
    let (run, (churn, churned, churn_span)) = agent::run(
        cluster,
        netns,
        kubeconfig,
        objects::AGENT_NODE,
        |pid, socket| {
            let (at, started) = (requests::served(cluster), Instant::now());
            let f = churn::measure(&netns.path(), &admin, s, round, pid, socket)?;
            // The controllers' answers to the churn (EndpointSlices) trail it a little.
            std::thread::sleep(Duration::from_secs(1));
            let served = requests::difference(&requests::served(cluster), &at);
            Ok((f, served, started.elapsed()))
        },
    )?;
    // The server counts a watch when it ends: give the closed connections a moment.
    std::thread::sleep(Duration::from_secs(1));
    let after = requests::served(cluster);
    std::thread::sleep(window.elapsed().saturating_sub(churn_span));
    let idle = requests::difference(&requests::served(cluster), &after);
    let during = requests::difference(&requests::difference(&after, &before), &churned);
    Ok(Measured {
        run,
        api_requests: requests::difference(&during, &idle),
        idle: requests::total(&idle),
        audited: requests::audited(cluster, audit_before),
        churn,
    })
}

fn report(i: usize, m: &Measured) {
    let r = &m.run;
    println!(
        "run {i}: ready in {:.0} ms (CPU {:.0} ms, RSS {:.1} MiB); first status round at {}; \
         peak RSS {:.1} MiB (at the end {:.1} MiB anonymous, {:.1} MiB file), CPU {:.0} ms; \
         API requests {} by the metrics {:?} (less {} of the idle window), {} audited {:?}",
        r.ready_ms,
        r.cpu_ready_ms,
        mib(r.rss_ready_kib),
        r.status_ms.map_or("-".into(), |t| format!("{t:.0} ms")),
        mib(r.hwm_kib),
        mib(r.anon_kib),
        mib(r.file_kib),
        r.cpu_total_ms,
        requests::total(&m.api_requests),
        m.api_requests,
        m.idle,
        requests::total(&m.audited),
        m.audited,
    );
    println!("  ms after exec: {}", timeline::describe(&r.milestones));
    let c = &m.churn;
    println!(
        "  churn: {} pod changes absorbed in {:.0} ms (the writes {:.0} ms), agent CPU {:.0} ms",
        churn::CHANGES,
        c.absorbed_ms,
        c.writes_ms,
        c.cpu_ms
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    // The middle one, or the mean of the middle two (the same index twice when odd).
    let n = v.len();
    (v[(n - 1) / 2] + v[n / 2]) / 2.0
}

fn mib(kib: u64) -> f64 {
    (kib as f64 / 1024.0 * 10.0).round() / 10.0
}

pub fn run(args: &[String]) -> Result<()> {
    let a = parse(args)?;
    let s = a.sizes;
    crate::require_root();
    // Declared first, dropped last: the control plane stops before its namespace goes.
    let netns = Netns::new("dsb");
    // A node has an uplink with a default route; the agent takes the pods' MTU from it.
    netns.run(
        "ip link add eth0 type veth peer name uplink0 && ip link set uplink0 up && ip link set eth0 up \
         && ip addr add 10.255.255.2/24 dev eth0 && ip route add default dev eth0",
    );
    let cluster = Cluster::start_with(Options {
        netns: Some(netns.path()),
        cluster_cidr: Some((objects::CLUSTER_CIDR.into(), objects::NODE_MASK)),
        ..Default::default()
    });
    cluster.install_sepal();
    println!(
        "control plane {}; loading {} nodes, {} pods, {} network policies, {} services, {} namespaces ({} objects)",
        cluster.version(), s.nodes, s.pods, s.policies, s.services, objects::NAMESPACES, s.objects()
    );
    let load = load::create(&cluster, &netns.path(), &s)?;
    load::check(&cluster, &s)?;
    for (step, took) in &load.steps {
        println!("  {step}: {:.1} s", took.as_secs_f64());
    }
    let load_s = load.total().as_secs_f64();
    println!(
        "load created in {load_s:.1} s ({:.0} objects/s, {} requests retried)",
        s.objects() as f64 / load_s,
        load.retried
    );

    if let Ok(w) = std::env::var(agent::WRAPPER) {
        println!("the agent runs under `{w}`: its CPU and memory figures are the wrapper's");
    }
    let kubeconfig = cluster.agent_kubeconfig(None);
    let mut runs = Vec::new();
    for i in 1..=a.runs {
        let m = measure(&cluster, &netns, &kubeconfig, &s, i - 1)?;
        report(i, &m);
        runs.push(m);
    }

    // The fan-out: N = 0 (the control plane alone) first, then each N asked for.
    let mut fanouts = Vec::new();
    if !a.watchers.is_empty() {
        let apiserver = fanout::apiserver_pid(cluster.dir())?;
        for n in std::iter::once(0).chain(a.watchers.iter().copied()) {
            let round = runs.len() + fanouts.len();
            let f = fanout::measure(
                &netns.path(),
                apiserver,
                &kubeconfig,
                &cluster.admin_kubeconfig(),
                &s,
                round,
                n,
            )?;
            println!(
                "fan-out {n} watchers: {} pod changes cost the API server {:.0} ms CPU over {:.0} ms \
                 (writes {:.0} ms), {:.1} MiB sent to the watchers; its RSS {:.1} MiB ({:+.1} MiB; \
                 {:.0} ms to open the watches)",
                churn::CHANGES,
                f.apiserver_cpu_ms,
                f.window_ms,
                f.writes_ms,
                f.bytes_sent_mib,
                f.apiserver_rss_mib,
                f.apiserver_rss_delta_mib,
                f.connect_ms
            );
            fanouts.push(f);
        }
    }

    if a.hold {
        println!(
            "holding the cluster: a line on stdin runs the agent again, the end of stdin finishes"
        );
        let mut line = String::new();
        let mut i = runs.len();
        while std::io::stdin().read_line(&mut line)? > 0 {
            line.clear();
            i += 1;
            let m = measure(&cluster, &netns, &kubeconfig, &s, i - 1 + fanouts.len())?;
            report(i, &m);
            runs.push(m);
        }
    }

    let ready: Vec<f64> = runs.iter().map(|m| m.run.ready_ms.round()).collect();
    let rss: Vec<f64> = runs.iter().map(|m| mib(m.run.hwm_kib)).collect();
    let cpu: Vec<f64> = runs.iter().map(|m| m.run.cpu_ready_ms.round()).collect();
    let requests: Vec<f64> = runs
        .iter()
        .map(|m| requests::total(&m.api_requests) as f64)
        .collect();
    let audited: Vec<f64> = runs
        .iter()
        .map(|m| requests::total(&m.audited) as f64)
        .collect();
    let churn_ms: Vec<f64> = runs.iter().map(|m| m.churn.absorbed_ms.round()).collect();
    let churn_cpu: Vec<f64> = runs.iter().map(|m| m.churn.cpu_ms.round()).collect();
    let churn_writes: Vec<f64> = runs.iter().map(|m| m.churn.writes_ms.round()).collect();
    // Median for time and requests; the largest peak RSS (memory is a ceiling, not an average).
    let rss_mib = rss.iter().copied().fold(0.0, f64::max);
    let ready_ms = median(ready.clone());
    let (target_rss, target_ready) = targets(&s);
    println!(
        "peak RSS {rss_mib:.1} MiB (target < {target_rss}; Cilium's agent {CILIUM_RSS_MIB} MiB at 1,000 nodes \
         and 50,000 pods: {:.2}x), ready in {ready_ms:.0} ms (target < {target_ready}); {} pod changes \
         absorbed in {:.0} ms, CPU {:.0} ms",
        rss_mib / CILIUM_RSS_MIB,
        churn::CHANGES,
        median(churn_ms.clone()),
        median(churn_cpu.clone()),
    );
    let mut out = json!({"nodes": s.nodes, "pods": s.pods, "policies": s.policies, "services": s.services,
               "objects": s.objects(), "load_s": (load_s * 10.0).round() / 10.0,
               "ready_ms": ready_ms, "rss_mib": rss_mib, "cpu_ms": median(cpu.clone()),
               "api_requests": median(requests.clone()), "api_requests_audited": median(audited.clone()),
               "ready_ms_runs": ready, "rss_mib_runs": rss, "cpu_ms_runs": cpu,
               "api_requests_runs": requests, "api_requests_audited_runs": audited,
               "target_rss_mib": target_rss, "target_ready_ms": target_ready,
               "cilium_rss_mib": CILIUM_RSS_MIB, "rss_vs_cilium": (rss_mib / CILIUM_RSS_MIB * 1000.0).round() / 1000.0,
               "churn_changes": churn::CHANGES, "churn_ms": median(churn_ms.clone()),
               "churn_cpu_ms": median(churn_cpu.clone()), "churn_writes_ms": median(churn_writes.clone()),
               "churn_ms_runs": churn_ms, "churn_cpu_ms_runs": churn_cpu, "churn_writes_ms_runs": churn_writes});
    for f in &fanouts {
        let n = f.watchers;
        let fields = [
            ("apiserver_cpu_ms", f.apiserver_cpu_ms),
            ("apiserver_rss_mib", f.apiserver_rss_mib),
            ("apiserver_rss_delta_mib", f.apiserver_rss_delta_mib),
            ("bytes_sent_mib", f.bytes_sent_mib),
            ("window_ms", f.window_ms),
            ("writes_ms", f.writes_ms),
            ("connect_ms", f.connect_ms),
        ];
        for (key, v) in fields {
            out[format!("fanout_{n}_{key}")] = json!(v);
        }
    }
    println!("{out}");
    Ok(())
}
