//! `sepal-bench fabric [--nodes N]`: a lab of N nodes on one switch, each with one pod, run
//! twice through `sepal lab`: the iBGP full mesh (N(N-1)/2 sessions), then two route reflectors
//! with the mesh off (2(N-2)+1 sessions). For each:
//!
//! - converged: from `lab up` until sampled pod pairs all ping (each pod to 3 others);
//! - new node: the last node's agent is stopped (a Cease: the others withdraw its block), then
//!   started; the time until every other node routes its block again, as a node that joins;
//! - restart: the same agent SIGKILLed and started at once; the time until its sessions are all
//!   Established again with every other block accepted (graceful restart keeps forwarding);
//! - the agents' CPU from start to converged, idle CPU over 10 s, and their RSS and VmHWM.
//!
//! Routes are polled every ~100 ms through `ip`, sessions through `sepal status`.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::bench::procstat::{cpu_ms, status_kib};
use crate::bin_path;
use crate::lab::Lab;

/// The longest any phase may take before the bench gives up.
const PHASE: Duration = Duration::from_secs(120);
/// Each pod pings the pods this many positions ahead of it.
const SAMPLE_OFFSETS: usize = 3;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Mesh,
    Rr,
}

impl Mode {
    fn key(self) -> &'static str {
        match self {
            Mode::Mesh => "mesh",
            Mode::Rr => "rr",
        }
    }
}

pub fn run(args: &[String]) -> Result<()> {
    let mut nodes = 50usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--nodes" => nodes = it.next().context("--nodes N")?.parse()?,
            other => bail!("unknown option {other:?} (usage: sepal-bench fabric [--nodes N])"),
        }
    }
    if !(4..=254).contains(&nodes) {
        bail!("--nodes {nodes}: between 4 (two reflectors and two clients) and 254");
    }
    crate::require_root();
    let mut result = Map::new();
    result.insert("nodes".into(), json!(nodes));
    for mode in [Mode::Mesh, Mode::Rr] {
        let figures = measure(mode, nodes)?;
        println!("{}: {}", mode.key(), Value::Object(figures.clone()));
        for (k, v) in figures {
            result.insert(format!("{}_{k}", mode.key()), v);
        }
    }
    result.insert("sampled_pairs".into(), json!(pairs(nodes).len()));
    println!("{}", Value::Object(result));
    Ok(())
}

/// One lab in one mode, brought up, measured and taken down.
fn measure(mode: Mode, n: usize) -> Result<Map<String, Value>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("fabric.yaml");
    std::fs::write(&path, topology(mode, n))?;
    let name = format!("f{}{}", mode.key(), std::process::id());
    let mut out = Map::new();

    let started = Instant::now();
    let lab = Lab::up(&name, Some(&path));
    out.insert("up_ms".into(), json!(ms(started.elapsed())));
    let pods = pods(&lab)?;
    let pending = pairs(n);
    reach_all(&pods, pending, started)?;
    out.insert("converged_ms".into(), json!(ms(started.elapsed())));

    let agents = agent_pids(&lab)?;
    let cpu = total_cpu(&agents);
    out.insert("cpu_ms_total".into(), json!(cpu.round() as u64));
    std::thread::sleep(Duration::from_secs(10));
    let idle = (total_cpu(&agents) - cpu) / 10.0;
    out.insert("idle_cpu_ms_per_s".into(), json!(idle.round() as u64));
    let kib = |field| {
        agents
            .iter()
            .filter_map(|&p| status_kib(p, field))
            .sum::<u64>()
    };
    out.insert("rss_mib_total".into(), json!(kib("VmRSS") / 1024));
    out.insert("hwm_mib_total".into(), json!(kib("VmHWM") / 1024));
    out.insert("sessions".into(), json!(sessions(&lab, n)?));

    let last = format!("n{n}");
    let block = format!("10.244.{n}.0/24");
    let others: Vec<String> = (1..n).map(|i| format!("{name}-n{i}")).collect();
    sepal(&["lab", "stop-agent", "--name", &name, &last])?;
    until("every node to withdraw the stopped node's block", || {
        !routed_anywhere(&others, &block)
    })?;
    let joined = Instant::now();
    sepal(&["lab", "start-agent", "--name", &name, &last])?;
    until("every node to learn the new node's block", || {
        routed_everywhere(&others, &block)
    })?;
    out.insert("new_node_ms".into(), json!(ms(joined.elapsed())));

    let restarted = Instant::now();
    sepal(&["lab", "stop-agent", "--kill", "--name", &name, &last])?;
    sepal(&["lab", "start-agent", "--name", &name, &last])?;
    let peers = match mode {
        Mode::Mesh => n - 1,
        Mode::Rr => 2,
    };
    until("the restarted agent's sessions and routes", || {
        reconverged(&name, &last, peers, n - 1)
    })?;
    out.insert("restart_ms".into(), json!(ms(restarted.elapsed())));
    lab.down();
    Ok(out)
}

/// The lab: nodes n1..nN on one switch, pod default/pI on node nI; with route reflectors, n1
/// and n2 reflect (one cluster ID) and the mesh is off.
fn topology(mode: Mode, n: usize) -> String {
    let mut text = String::from("routers: [{name: sw, kind: switch}]\nnodes:\n");
    for i in 1..=n {
        let rr = match mode == Mode::Rr && i <= 2 {
            true => ", routeReflectorClusterID: 244.0.0.1",
            false => "",
        };
        text.push_str(&format!("  - {{name: n{i}{rr}}}\n"));
    }
    text.push_str("pods:\n");
    for i in 1..=n {
        text.push_str(&format!(
            "  - {{namespace: default, name: p{i}, node: n{i}}}\n"
        ));
    }
    let mesh = mode == Mode::Mesh;
    text.push_str(&format!(
        "manifests:\n  - apiVersion: sepal.dev/v1alpha1\n    kind: BGPConfiguration\n    \
         metadata: {{name: default}}\n    spec: {{asNumber: 64512, nodeToNodeMesh: {mesh}, \
         keepaliveTime: 3s, holdTime: 9s}}\n"
    ));
    text
}

/// (from, to) pod positions: each pod to those 1, N/3 and N/2 ahead of it.
fn pairs(n: usize) -> Vec<(usize, usize)> {
    let mut offsets = vec![1, n / 3, n / 2];
    offsets.dedup();
    (0..n)
        .flat_map(|i| {
            offsets
                .iter()
                .take(SAMPLE_OFFSETS)
                .map(move |k| (i, (i + k) % n))
        })
        .collect()
}

/// (netns, IPv4 address) of each pod, in node order.
fn pods(lab: &Lab) -> Result<Vec<(String, String)>> {
    let status = lab.status();
    let mut pods: Vec<(usize, String, String)> = Vec::new();
    for p in status["pods"].as_array().context("status without pods")? {
        let node: usize = p["node"].as_str().unwrap_or("")[1..].parse()?;
        let ip = p["ips"][0].as_str().context("pod without address")?;
        let netns = p["netns"].as_str().context("pod without netns")?;
        pods.push((node, netns.to_string(), ip.to_string()));
    }
    pods.sort();
    Ok(pods.into_iter().map(|(_, ns, ip)| (ns, ip)).collect())
}

/// Pings every pending pair, 16 at a time, until each has answered once.
fn reach_all(
    pods: &[(String, String)],
    mut pending: Vec<(usize, usize)>,
    started: Instant,
) -> Result<()> {
    while !pending.is_empty() {
        if started.elapsed() > PHASE * 2 {
            bail!("{} sampled pod pairs still do not ping", pending.len());
        }
        let mut failed = Vec::new();
        for chunk in pending.chunks(16) {
            let ok: Vec<bool> = std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|&(a, b)| s.spawn(move || ping(&pods[a].0, &pods[b].1)))
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            failed.extend(chunk.iter().zip(ok).filter(|(_, ok)| !ok).map(|(p, _)| *p));
        }
        pending = failed;
    }
    Ok(())
}

fn ping(netns: &str, ip: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", netns, "ping", "-c1", "-W1", "-q", ip])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The agents' PIDs from the lab's state.
fn agent_pids(lab: &Lab) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(lab.dir().join("lab.json"))?;
    let state: Value = serde_json::from_str(&text)?;
    Ok(state["nodes"]
        .as_array()
        .context("lab state without nodes")?
        .iter()
        .filter_map(|n| n["pid"].as_u64())
        .map(|p| p as u32)
        .collect())
}

fn total_cpu(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|&p| cpu_ms(p)).sum()
}

/// Established BGP sessions in the lab, each counted once (both ends report it).
fn sessions(lab: &Lab, n: usize) -> Result<usize> {
    let mut ends = 0;
    for i in 1..=n {
        let status = lab.ask("status", &format!("n{i}"));
        ends += established(&status).len();
    }
    Ok(ends / 2)
}

/// The Established peers in a `sepal status --json`: their accepted prefix counts.
fn established(status: &Value) -> Vec<u64> {
    status["bgp"]["peers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["state"] == "Established")
        .map(|p| p["prefixes_accepted"].as_u64().unwrap_or(0))
        .collect()
}

/// Whether node `node` has `peers` sessions Established and each of the `blocks` other blocks
/// accepted from some peer (counted per session: a mesh peer sends one, a reflector all).
fn reconverged(lab: &str, node: &str, peers: usize, blocks: usize) -> bool {
    let out = Command::new(bin_path("sepal"))
        .args(["status", "--lab", lab, "--node", node, "--json"])
        .output();
    let Some(status) = out
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| serde_json::from_slice::<Value>(&o.stdout).ok())
    else {
        return false;
    };
    let up = established(&status);
    let want_each = if peers == blocks { 1 } else { blocks as u64 };
    up.len() == peers && up.iter().all(|&p| p >= want_each)
}

/// Whether any of the namespaces has a route to exactly `block`.
fn routed_anywhere(netns: &[String], block: &str) -> bool {
    routes(netns, block).into_iter().any(|r| r)
}

fn routed_everywhere(netns: &[String], block: &str) -> bool {
    routes(netns, block).into_iter().all(|r| r)
}

/// For each namespace, whether it routes `block`; eight `ip` at a time.
fn routes(netns: &[String], block: &str) -> Vec<bool> {
    netns
        .chunks(8)
        .flat_map(|chunk| {
            std::thread::scope(|s| {
                let handles: Vec<_> = chunk
                    .iter()
                    .map(|ns| {
                        s.spawn(move || {
                            Command::new("ip")
                                .args(["-n", ns, "route", "show", "exact", block])
                                .output()
                                .is_ok_and(|o| o.status.success() && !o.stdout.is_empty())
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect()
}

/// Polls `done` every ~100 ms until it holds, for at most [`PHASE`].
fn until(what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + PHASE;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn sepal(args: &[&str]) -> Result<()> {
    let out = Command::new(bin_path("sepal")).args(args).output()?;
    if !out.status.success() {
        bail!(
            "sepal {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_pod_is_sampled_as_source_and_destination() {
        let p = pairs(50);
        assert_eq!(p.len(), 150);
        for i in 0..50 {
            assert_eq!(p.iter().filter(|(a, _)| *a == i).count(), 3);
            assert_eq!(p.iter().filter(|(_, b)| *b == i).count(), 3);
        }
        assert!(p.iter().all(|(a, b)| a != b));
        let topo = topology(Mode::Rr, 50);
        assert_eq!(topo.matches("routeReflectorClusterID").count(), 2);
        assert!(topo.contains("nodeToNodeMesh: false"));
    }
}
