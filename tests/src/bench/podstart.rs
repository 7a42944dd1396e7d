//! `sepal-bench podstart [--pods N] [--rounds N] [--name LAB] [--keep]`: a Deployment of agnhost
//! scaled from 0 to N pods over the 3 kubelet nodes of a real lab (`sepal lab up --kubernetes`),
//! timed from a watch on the bench's clock: each Pod from first seen to first seen Ready with an
//! IP (p50, p99), and the scale command to the last Ready (total). Twice per round on the same
//! kubelets: with Debian's `ptp` + `host-local` (a conflist that sorts before Sepal's) and with
//! Sepal; a warm-up with Sepal first, then ptp and Sepal alternate.

use crate::lab::Lab;
use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::time::{Duration, Instant};

const NODES: [&str; 3] = ["node1", "node2", "node3"];
const TOPOLOGY: &str = "podCIDR: [10.244.0.0/16]\n\
    nodes: [{name: node1}, {name: node2}, {name: node3}]\n\
    routers: [{name: tor, kind: bird, asNumber: 65000}]\n";
const PTP_CONF: &str = "00-ptp.conflist";

#[derive(Clone, Copy, PartialEq)]
enum Net {
    Sepal,
    Ptp,
}

impl Net {
    fn name(self) -> &'static str {
        match self {
            Net::Sepal => "sepal",
            Net::Ptp => "ptp",
        }
    }
    /// Whether `ip` is from this network's IPAM (Sepal: the lab's 10.244/16; ptp: 10.250.N/24).
    fn owns(self, ip: &str) -> bool {
        ip.starts_with(match self {
            Net::Sepal => "10.244.",
            Net::Ptp => "10.250.",
        })
    }
}

struct Opts {
    pods: usize,
    rounds: usize,
    name: String,
    keep: bool,
}

fn parse(args: &[String]) -> Result<Opts> {
    let mut o = Opts {
        pods: 100,
        rounds: 1,
        name: "podstart".into(),
        keep: false,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--pods" => o.pods = value()?.parse().context("--pods takes a number")?,
            "--rounds" => o.rounds = value()?.parse().context("--rounds takes a number")?,
            "--name" => o.name = value()?.clone(),
            "--keep" => o.keep = true,
            other => {
                bail!("unknown option {other}; options: --pods N --rounds N --name LAB --keep")
            }
        }
    }
    ensure!(
        o.pods > 0 && o.rounds > 0,
        "--pods and --rounds must be at least 1"
    );
    Ok(o)
}

/// One scale-up: milliseconds from first seen to Ready per pod, and from the scale to the last.
struct Run {
    total: f64,
    p50: f64,
    p99: f64,
    sched_p50: f64,
}

pub fn run(args: &[String]) -> Result<()> {
    let o = parse(args)?;
    for plugin in ["ptp", "host-local", "loopback"] {
        ensure!(
            std::path::Path::new("/usr/lib/cni").join(plugin).exists(),
            "/usr/lib/cni/{plugin} missing: install the Debian package containernetworking-plugins"
        );
    }
    let work = tempfile::tempdir()?;
    let topology = work.path().join("topology.yaml");
    std::fs::write(&topology, TOPOLOGY)?;
    let lab = Lab::up_with(&o.name, Some(&topology), &["--kubernetes"]);
    let result = bench(&lab, &o, work.path());
    if o.keep {
        std::mem::forget(lab);
    }
    result
}

fn bench(lab: &Lab, o: &Opts, work: &std::path::Path) -> Result<()> {
    let agnhost = std::fs::read_to_string(kube_bin().join("IMAGES"))?
        .lines()
        .find_map(|l| l.strip_prefix("agnhost ").map(str::to_string))
        .context("no agnhost line in IMAGES")?;
    let pod_spec = format!(
        "{{terminationGracePeriodSeconds: 0, containers: [{{name: pause, image: \"{agnhost}\", \
         args: [pause], imagePullPolicy: Never}}]}}"
    );
    let deploy = work.join("deploy.yaml");
    std::fs::write(
        &deploy,
        format!(
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {{name: podstart, namespace: default}}\n\
             spec: {{replicas: 0, selector: {{matchLabels: {{app: podstart}}}},\n  \
             template: {{metadata: {{labels: {{app: podstart}}}}, spec: {pod_spec}}}}}\n"
        ),
    )?;
    kubectl(lab, &["apply", "-f", deploy.to_str().unwrap()])?;
    let probes = work.join("probes.yaml");
    let probe_docs: Vec<String> = NODES
        .iter()
        .map(|n| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: probe-{n}, namespace: default, \
                 labels: {{app: podstart-probe}}}}\nspec: {{nodeName: {n}, {}\n",
                &pod_spec[1..]
            )
        })
        .collect();
    std::fs::write(&probes, probe_docs.join("---\n"))?;
    let probes = probes.to_str().unwrap();

    // Warm-up: images into the page cache, the agents' first pods.
    let base = veths(lab)?;
    scale(lab, Net::Sepal, 9.min(o.pods), probes, &base)?;
    let mut rounds = Vec::new();
    for round in 1..=o.rounds {
        let mut pair = Vec::new();
        for net in [Net::Ptp, Net::Sepal] {
            let _ptp = PtpConf::install(lab, net == Net::Ptp)?;
            let r = scale(lab, net, o.pods, probes, &base)?;
            println!(
                "round {round} {:<6} {} pods: total {:>7.0} ms, p50 {:>6.0} ms, p99 {:>6.0} ms \
                 (scheduled p50 {:.0} ms)",
                net.name(),
                o.pods,
                r.total,
                r.p50,
                r.p99,
                r.sched_p50
            );
            pair.push(r);
        }
        rounds.push(pair);
    }
    let med = |i: usize, f: fn(&Run) -> f64| median(rounds.iter().map(|p| f(&p[i])).collect());
    let (pt, st) = (med(0, |r| r.total), med(1, |r| r.total));
    println!(
        "{}",
        json!({
            "sepal_total_ms": st.round(), "ptp_total_ms": pt.round(),
            "ratio": (st / pt * 1000.0).round() / 1000.0,
            "sepal_p50_ms": med(1, |r| r.p50).round(), "sepal_p99_ms": med(1, |r| r.p99).round(),
            "ptp_p50_ms": med(0, |r| r.p50).round(), "ptp_p99_ms": med(0, |r| r.p99).round(),
            "pods": o.pods, "nodes": NODES.len(), "rounds": o.rounds,
        })
    );
    Ok(())
}

/// Checks with one pinned Pod per node that `net` plumbs new Pods (containerd reloads its CNI
/// directory asynchronously), then scales the Deployment to `pods` and back to 0 under a watch.
fn scale(lab: &Lab, net: Net, pods: usize, probes: &str, base: &[usize]) -> Result<Run> {
    let mut tries = 0;
    loop {
        kubectl(lab, &["apply", "-f", probes])?;
        kubectl(
            lab,
            &[
                "wait",
                "--for=condition=Ready",
                "pod",
                "-l",
                "app=podstart-probe",
                "--timeout=120s",
            ],
        )?;
        let ips = kubectl(
            lab,
            &[
                "get",
                "pod",
                "-l",
                "app=podstart-probe",
                "-o",
                "jsonpath={.items[*].status.podIP}",
            ],
        )?;
        kubectl(
            lab,
            &["delete", "pod", "-l", "app=podstart-probe", "--wait=true"],
        )?;
        settle(lab, base)?;
        if ips.split_whitespace().count() == NODES.len()
            && ips.split_whitespace().all(|ip| net.owns(ip))
        {
            break;
        }
        tries += 1;
        ensure!(
            tries < 10,
            "containerd did not switch to {}: probe IPs {ips}",
            net.name()
        );
        std::thread::sleep(Duration::from_secs(1));
    }

    let watch = Watch::start(&lab.name)?;
    let (mut seen, mut scheduled, mut ready) = (HashMap::new(), HashMap::new(), HashMap::new());
    // The watch covers every namespace, so the agents' Pods say when its list is done.
    watch
        .rx
        .recv_timeout(Duration::from_secs(30))
        .context("the pod watch printed nothing")?;
    let start = Instant::now();
    kubectl(
        lab,
        &[
            "scale",
            "deployment/podstart",
            &format!("--replicas={pods}"),
        ],
    )?;
    let deadline = start + Duration::from_secs(600);
    while ready.len() < pods {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(ev) = watch.rx.recv_timeout(left) else {
            bail!(
                "{}: {} of {pods} pods Ready after 600 s",
                net.name(),
                ready.len()
            );
        };
        if ev.app != "podstart" {
            continue;
        }
        seen.entry(ev.name.clone()).or_insert(ev.at);
        if ev.node {
            scheduled.entry(ev.name.clone()).or_insert(ev.at);
        }
        if let Some(ip) = ev.ready_ip {
            ensure!(net.owns(&ip), "{}: pod {} got {ip}", net.name(), ev.name);
            ready.entry(ev.name).or_insert(ev.at);
        }
    }
    drop(watch);
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let last = *ready.values().max().unwrap();
    let per_pod: Vec<f64> = ready.iter().map(|(n, t)| ms(*t - seen[n])).collect();
    let sched: Vec<f64> = scheduled.iter().map(|(n, t)| ms(*t - seen[n])).collect();
    let run = Run {
        total: ms(last - start),
        p50: pct(&per_pod, 0.5),
        p99: pct(&per_pod, 0.99),
        sched_p50: if sched.is_empty() {
            0.0
        } else {
            pct(&sched, 0.5)
        },
    };

    // Back to 0, until the Pods and their sandboxes are gone.
    kubectl(lab, &["scale", "deployment/podstart", "--replicas=0"])?;
    let deadline = Instant::now() + Duration::from_secs(300);
    while !kubectl(lab, &["get", "pod", "-l", "app=podstart", "-o", "name"])?
        .trim()
        .is_empty()
    {
        ensure!(
            Instant::now() < deadline,
            "{}: pods not gone after 300 s",
            net.name()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    settle(lab, base)?;
    Ok(run)
}

/// Host veths in each node's namespace: its uplink, plus one per plumbed Pod.
fn veths(lab: &Lab) -> Result<Vec<usize>> {
    NODES
        .iter()
        .map(|n| {
            let ns = format!("{}-{n}", lab.name);
            let out = Command::new("ip")
                .args(["-n", &ns, "-o", "link", "show", "type", "veth"])
                .output()?;
            ensure!(out.status.success(), "ip -n {ns} link failed");
            Ok(out.stdout.iter().filter(|b| **b == b'\n').count())
        })
        .collect()
}

/// Waits until every node is back to `base` veths: a Pod object is gone before kubelet has
/// stopped its sandbox, and a DEL must reach the plugin that did the ADD.
fn settle(lab: &Lab, base: &[usize]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let now = veths(lab)?;
        if now == base {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "sandboxes left after 300 s: veths {now:?}, base {base:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// `00-ptp.conflist` (sorts before Sepal's `10-sepal.conflist`) and Debian's plugins in every
/// node's CNI directories while it lives; host-local ranges 10.250.N.0/24, clear of Sepal's.
struct PtpConf(Vec<PathBuf>);

impl PtpConf {
    fn install(lab: &Lab, on: bool) -> Result<PtpConf> {
        let mut conf = PtpConf(Vec::new());
        for (i, node) in NODES.iter().enumerate().filter(|_| on) {
            let cni = lab.dir().join("nodes").join(node).join("cni");
            for plugin in ["ptp", "host-local", "loopback"] {
                std::fs::copy(
                    format!("/usr/lib/cni/{plugin}"),
                    cni.join("bin").join(plugin),
                )?;
            }
            let subnet = format!("10.250.{}.0/24", i + 1);
            let file = cni.join("net.d").join(PTP_CONF);
            let ipam = cni.join("ptp-ipam");
            std::fs::write(&file, crate::kubelet::ptp_conflist(&subnet, &ipam))?;
            conf.0.push(file);
        }
        Ok(conf)
    }
}

impl Drop for PtpConf {
    fn drop(&mut self) {
        for f in &self.0 {
            let _ = std::fs::remove_file(f);
        }
    }
}

struct Event {
    at: Instant,
    name: String,
    app: String,
    node: bool,
    ready_ip: Option<String>,
}

/// `kubectl get pods -A --watch --output-watch-events -o json`, each event stamped on arrival.
struct Watch {
    child: Child,
    rx: Receiver<Event>,
}

impl Watch {
    fn start(lab: &str) -> Result<Watch> {
        let mut child = Command::new(crate::bin_path("sepal"))
            .args(["lab", "kubectl", "--name", lab, "--"])
            .args([
                "get",
                "pods",
                "-A",
                "--watch",
                "--output-watch-events",
                "-o",
                "json",
            ])
            .stdout(Stdio::piped())
            .spawn()?;
        let out = child.stdout.take().unwrap();
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for v in serde_json::Deserializer::from_reader(std::io::BufReader::new(out))
                .into_iter::<Value>()
            {
                let Ok(v) = v else { return };
                let (o, s) = (&v["object"], &v["object"]["status"]);
                let ready = s["conditions"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|c| c["type"] == "Ready" && c["status"] == "True");
                let ip = s["podIP"]
                    .as_str()
                    .filter(|ip| ready && !ip.is_empty() && v["type"] != "DELETED");
                let event = Event {
                    at: Instant::now(),
                    name: o["metadata"]["name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    app: o["metadata"]["labels"]["app"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string(),
                    node: o["spec"]["nodeName"].is_string(),
                    ready_ip: ip.map(str::to_string),
                };
                if tx.send(event).is_err() {
                    return;
                }
            }
        });
        Ok(Watch { child, rx })
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        crate::netns::kill(&mut self.child);
    }
}

fn kubectl(lab: &Lab, args: &[&str]) -> Result<String> {
    let out = lab.kubectl(args);
    ensure!(
        out.status.success(),
        "kubectl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// scripts/kube-build's output, beside the workspace's target/<profile>.
fn kube_bin() -> PathBuf {
    crate::bin_path("sepal")
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("kube/bin")
}

/// Nearest-rank percentile.
fn pct(xs: &[f64], q: f64) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)]
}

fn median(xs: Vec<f64>) -> f64 {
    pct(&xs, 0.5)
}
