//! `sepal-bench cni --pods N`: N ADDs then N DELs through `sepal-cni` (with the real agent) and
//! through Debian's `ptp` + `host-local`, in the same run and the same kind of namespaces.

use crate::netns::Netns;
use crate::node::{run_in_netns, CniCall, Node};
use anyhow::{bail, Context, Result};
use std::process::Command;
use std::time::{Duration, Instant};

const PTP: &str = "/usr/lib/cni/ptp";

pub fn run(args: &[String]) -> Result<()> {
    let pods = parse_pods(args)?;
    if !std::path::Path::new(PTP).exists() {
        bail!("{PTP} missing: install the Debian package containernetworking-plugins");
    }

    let mut node = Node::new("bsep", &["10.250.0.0/20"]);
    node.start_agent();
    let sepal = measure(pods, "bs", |cmd, i, sandbox| {
        let call = CniCall::pod(
            &format!("bench{i}"),
            sandbox.path().as_path(),
            "bench",
            &format!("pod{i}"),
        );
        let mut plugin = Command::new(crate::bin_path("sepal-cni"));
        call.apply(&mut plugin, cmd);
        run_in_netns(plugin, &node.netns, &node.cni_config("1.1.0"))
    })?;

    let ptp_node = Netns::new("bptp");
    let ipam_dir = tempfile::tempdir()?;
    let ptp_config = format!(
        r#"{{"cniVersion":"1.0.0","name":"bench","type":"ptp","ipMasq":false,"mtu":1500,
            "ipam":{{"type":"host-local","ranges":[[{{"subnet":"10.251.0.0/20"}}]],
                    "routes":[{{"dst":"0.0.0.0/0"}}],"dataDir":"{}"}}}}"#,
        ipam_dir.path().display()
    );
    let ptp = measure(pods, "bp", |cmd, i, sandbox| {
        let call = CniCall::pod(
            &format!("bench{i}"),
            sandbox.path().as_path(),
            "bench",
            &format!("pod{i}"),
        );
        let mut plugin = Command::new(PTP);
        call.apply(&mut plugin, cmd);
        run_in_netns(plugin, &ptp_node, &ptp_config)
    })?;

    let (sa, sd) = (p(&sepal.0, 0.5), p(&sepal.1, 0.5));
    let (pa, pd) = (p(&ptp.0, 0.5), p(&ptp.1, 0.5));
    println!("{pods} pods, plugin called inside the node namespace, process start included");
    println!(
        "{:<22}{:>10}{:>10}{:>10}{:>10}",
        "", "ADD p50", "ADD p95", "DEL p50", "DEL p95"
    );
    for (name, (adds, dels)) in [("sepal-cni + agent", &sepal), ("ptp + host-local", &ptp)] {
        println!(
            "{name:<22}{:>8.2}ms{:>8.2}ms{:>8.2}ms{:>8.2}ms",
            p(adds, 0.5),
            p(adds, 0.95),
            p(dels, 0.5),
            p(dels, 0.95)
        );
    }
    println!(
        "ratios (sepal / ptp): ADD {:.3}, DEL {:.3}",
        sa / pa,
        sd / pd
    );
    println!(
        "{}",
        serde_json::json!({
            "sepal_add_p50_ms": round(sa), "ptp_add_p50_ms": round(pa), "add_ratio": round(sa / pa),
            "sepal_del_p50_ms": round(sd), "ptp_del_p50_ms": round(pd), "del_ratio": round(sd / pd),
        })
    );
    Ok(())
}

fn parse_pods(args: &[String]) -> Result<usize> {
    match args {
        [] => Ok(100),
        [flag, n] if flag == "--pods" => n.parse().context("--pods takes a number"),
        _ => bail!("usage: sepal-bench cni [--pods N]"),
    }
}

/// Creates `pods` sandboxes, then times `pods` ADDs followed by `pods` DELs (milliseconds).
fn measure(
    pods: usize,
    tag: &str,
    call: impl Fn(&str, usize, &Netns) -> std::process::Output,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let sandboxes: Vec<Netns> = (0..pods).map(|_| Netns::new(tag)).collect();
    let timed = |cmd: &str| -> Result<Vec<f64>> {
        let mut times = Vec::with_capacity(pods);
        for (i, sandbox) in sandboxes.iter().enumerate() {
            let start = Instant::now();
            let out = call(cmd, i, sandbox);
            times.push(ms(start.elapsed()));
            if !out.status.success() {
                bail!(
                    "{cmd} {i} failed ({}): {} {}",
                    out.status,
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        Ok(times)
    };
    let adds = timed("ADD")?;
    let dels = timed("DEL")?;
    Ok((adds, dels))
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
