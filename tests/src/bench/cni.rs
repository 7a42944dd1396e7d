//! `sepal-bench cni --pods N [--parallel P]`: N ADDs then N DELs through `sepal-cni` (with the
//! real agent) and through Debian's `ptp` + `host-local`, in the same run and the same kind of
//! namespaces, one call at a time; with `--parallel`, again as a burst from P concurrent callers
//! (kubelet starting many pods at once), timed as a whole and per call.

use crate::netns::Netns;
use crate::node::{run_in_netns, CniCall, Node};
use anyhow::{bail, Context, Result};
use std::process::Command;
use std::time::{Duration, Instant};

const PTP: &str = "/usr/lib/cni/ptp";

/// What one plugin call is given: the command, the pod's index and its sandbox.
type Call<'a> = dyn Fn(&str, usize, &Netns) -> std::process::Output + Sync + 'a;

pub fn run(args: &[String]) -> Result<()> {
    let (pods, parallel) = parse_args(args)?;
    if !std::path::Path::new(PTP).exists() {
        bail!("{PTP} missing: install the Debian package containernetworking-plugins");
    }

    let mut node = Node::new("bsep", &["10.250.0.0/20"]);
    node.start_agent();
    let sepal_call = |cmd: &str, i: usize, sandbox: &Netns| {
        let call = CniCall::pod(
            &format!("bench{i}"),
            sandbox.path().as_path(),
            "bench",
            &format!("pod{i}"),
        );
        let mut plugin = Command::new(crate::bin_path("sepal-cni"));
        call.apply(&mut plugin, cmd);
        run_in_netns(plugin, &node.netns, &node.cni_config("1.1.0"))
    };
    let ptp_node = Netns::new("bptp");
    let ipam_dir = tempfile::tempdir()?;
    let ptp_config = format!(
        r#"{{"cniVersion":"1.0.0","name":"bench","type":"ptp","ipMasq":false,"mtu":1500,
            "ipam":{{"type":"host-local","ranges":[[{{"subnet":"10.251.0.0/20"}}]],
                    "routes":[{{"dst":"0.0.0.0/0"}}],"dataDir":"{}"}}}}"#,
        ipam_dir.path().display()
    );
    let ptp_call = |cmd: &str, i: usize, sandbox: &Netns| {
        let call = CniCall::pod(
            &format!("bench{i}"),
            sandbox.path().as_path(),
            "bench",
            &format!("pod{i}"),
        );
        let mut plugin = Command::new(PTP);
        call.apply(&mut plugin, cmd);
        run_in_netns(plugin, &ptp_node, &ptp_config)
    };
    let sepal = measure(pods, 1, "bs", &sepal_call)?;
    let ptp = measure(pods, 1, "bp", &ptp_call)?;

    let (sa, sd) = (p(&sepal.adds, 0.5), p(&sepal.dels, 0.5));
    let (pa, pd) = (p(&ptp.adds, 0.5), p(&ptp.dels, 0.5));
    println!("{pods} pods, plugin called inside the node namespace, process start included");
    println!(
        "{:<22}{:>10}{:>10}{:>10}{:>10}",
        "", "ADD p50", "ADD p95", "DEL p50", "DEL p95"
    );
    for (name, run) in [("sepal-cni + agent", &sepal), ("ptp + host-local", &ptp)] {
        println!(
            "{name:<22}{:>8.2}ms{:>8.2}ms{:>8.2}ms{:>8.2}ms",
            p(&run.adds, 0.5),
            p(&run.adds, 0.95),
            p(&run.dels, 0.5),
            p(&run.dels, 0.95)
        );
    }
    println!(
        "ratios (sepal / ptp): ADD {:.3}, DEL {:.3}",
        sa / pa,
        sd / pd
    );
    let mut json = serde_json::json!({
        "sepal_add_p50_ms": round(sa), "ptp_add_p50_ms": round(pa), "add_ratio": round(sa / pa),
        "sepal_del_p50_ms": round(sd), "ptp_del_p50_ms": round(pd), "del_ratio": round(sd / pd),
    });
    if let Some(parallel) = parallel {
        let sepal = measure(pods, parallel, "cs", &sepal_call)?;
        let ptp = measure(pods, parallel, "cp", &ptp_call)?;
        println!("burst: {pods} ADDs then {pods} DELs from {parallel} concurrent callers");
        println!(
            "{:<22}{:>11}{:>10}{:>10}{:>11}{:>10}",
            "", "ADD total", "ADD p50", "ADD p99", "DEL total", "DEL p99"
        );
        for (name, run) in [("sepal-cni + agent", &sepal), ("ptp + host-local", &ptp)] {
            println!(
                "{name:<22}{:>9.1}ms{:>8.2}ms{:>8.2}ms{:>9.1}ms{:>8.2}ms",
                run.add_total,
                p(&run.adds, 0.5),
                p(&run.adds, 0.99),
                run.del_total,
                p(&run.dels, 0.99)
            );
        }
        let burst = serde_json::json!({
            "burst_parallel": parallel,
            "burst_add_total_ms": round(sepal.add_total),
            "burst_ptp_add_total_ms": round(ptp.add_total),
            "burst_add_ratio": round(sepal.add_total / ptp.add_total),
            "burst_add_p50_ms": round(p(&sepal.adds, 0.5)),
            "burst_ptp_add_p50_ms": round(p(&ptp.adds, 0.5)),
            "burst_add_p99_ms": round(p(&sepal.adds, 0.99)),
            "burst_ptp_add_p99_ms": round(p(&ptp.adds, 0.99)),
            "burst_add_p99_ratio": round(p(&sepal.adds, 0.99) / p(&ptp.adds, 0.99)),
            "burst_del_total_ms": round(sepal.del_total),
            "burst_ptp_del_total_ms": round(ptp.del_total),
            "burst_del_ratio": round(sepal.del_total / ptp.del_total),
        });
        if let (Some(all), Some(more)) = (json.as_object_mut(), burst.as_object()) {
            all.extend(more.clone());
        }
    }
    println!("{json}");
    Ok(())
}

/// `--pods N` (default 100) and `--parallel P` (no burst run without it).
fn parse_args(args: &[String]) -> Result<(usize, Option<usize>)> {
    const USAGE: &str = "usage: sepal-bench cni [--pods N] [--parallel P]";
    let (mut pods, mut parallel) = (100, None);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().context(USAGE)?;
        match flag.as_str() {
            "--pods" => pods = value.parse().context("--pods takes a number")?,
            "--parallel" => {
                let p: usize = value.parse().context("--parallel takes a number")?;
                if p == 0 {
                    bail!("--parallel takes at least 1");
                }
                parallel = Some(p);
            }
            _ => bail!(USAGE),
        }
    }
    if pods == 0 {
        bail!("--pods takes at least 1");
    }
    Ok((pods, parallel))
}

/// Per-call times of one run (milliseconds), and the wall time of each phase.
struct Run {
    adds: Vec<f64>,
    dels: Vec<f64>,
    add_total: f64,
    del_total: f64,
}

/// Creates `pods` sandboxes, then times `pods` ADDs followed by `pods` DELs, from `callers`
/// threads taking the next pod as they finish one.
fn measure(pods: usize, callers: usize, tag: &str, call: &Call) -> Result<Run> {
    let sandboxes: Vec<Netns> = (0..pods).map(|_| Netns::new(tag)).collect();
    let timed = |cmd: &str| -> Result<(Vec<f64>, f64)> {
        let next = std::sync::atomic::AtomicUsize::new(0);
        let start = Instant::now();
        let per_caller: Vec<Result<Vec<f64>>> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..callers)
                .map(|_| {
                    s.spawn(|| {
                        let mut times = Vec::new();
                        loop {
                            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            let Some(sandbox) = sandboxes.get(i) else {
                                return Ok(times);
                            };
                            let started = Instant::now();
                            let out = call(cmd, i, sandbox);
                            times.push(ms(started.elapsed()));
                            if !out.status.success() {
                                bail!(
                                    "{cmd} {i} failed ({}): {} {}",
                                    out.status,
                                    String::from_utf8_lossy(&out.stdout),
                                    String::from_utf8_lossy(&out.stderr)
                                );
                            }
                        }
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap_or_else(|_| bail!("a caller panicked")))
                .collect()
        });
        let total = ms(start.elapsed());
        let mut times = Vec::with_capacity(pods);
        for t in per_caller {
            times.extend(t?);
        }
        Ok((times, total))
    };
    let (adds, add_total) = timed("ADD")?;
    let (dels, del_total) = timed("DEL")?;
    Ok(Run {
        adds,
        dels,
        add_total,
        del_total,
    })
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Nearest-rank percentile.
fn p(xs: &[f64], q: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
}

fn round(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}
