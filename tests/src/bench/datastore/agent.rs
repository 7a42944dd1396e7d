// One run of the real agent (`sepal node --datastore kubernetes`) as ServiceAccount
// sepal-system/sepal-node, in the control plane's network namespace: time from exec to its
// /readyz answering 200, then until its first status round reached the API server (the
// SepalNodeStatus status in the audit log), and what /proc says of its CPU and memory.

use crate::bench::procstat::{cpu_ms, status_kib};
use crate::kube::Cluster;
use crate::netns::Netns;
use anyhow::{bail, Context, Result};
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const READY_TIMEOUT: Duration = Duration::from_secs(60);
const STATUS_TIMEOUT: Duration = Duration::from_secs(20);
/// Environment variable: a command line the agent runs under.
pub const WRAPPER: &str = "SEPAL_BENCH_AGENT_WRAPPER";

/// What one run measured.
pub struct Run {
    pub ready_ms: f64,
    /// CPU (user + system) from exec to ready.
    pub cpu_ready_ms: f64,
    /// From exec to the first status round written (None: not seen in time).
    pub status_ms: Option<f64>,
    pub cpu_total_ms: f64,
    /// Peak RSS over the whole run, churn included (VmHWM), and RSS when ready.
    pub hwm_kib: u64,
    pub rss_ready_kib: u64,
    /// At the end: anonymous memory (heap, stacks) and file pages (the binary's code and data).
    pub anon_kib: u64,
    pub file_kib: u64,
    /// From the agent's log: (ms after exec, what).
    pub milestones: Vec<(f64, String)>,
}

/// The agent process; killed and reaped however the run ends.
struct Agent {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

impl Agent {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// Signals the agent's process group: the agent, and a wrapper's children with it.
    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on the process group our own child leads.
        unsafe { libc::kill(-(self.child.id() as i32), sig) };
    }

    /// SIGTERM, as kubelet stops a pod, then SIGKILL if it lingers.
    fn stop(&mut self) {
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Runs the agent once as `node`, in a fresh state directory, until its first status round, then
/// calls `during` with its PID and operator socket (the churn), then stops it.
pub fn run<T>(
    cluster: &Cluster,
    netns: &Netns,
    kubeconfig: &Path,
    node: &str,
    during: impl FnOnce(u32, &Path) -> Result<T>,
) -> Result<(Run, T)> {
    let dir = tempfile::Builder::new()
        .prefix("sepal-bench-agent-")
        .tempdir()?;
    let port = sepal_felix::netns::on_thread_in(&netns.path(), || {
        std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()
    })??
    .port();
    let audited_before = cluster.agent_requests().len();
    let log = dir.path().join("agent.log");
    let file = std::fs::File::create(&log)?;
    let sepal = crate::bin_path("sepal");
    let (state, socket) = (dir.path().join("state"), dir.path().join("sepal.sock"));
    let metrics_addr = format!("127.0.0.1:{port}");
    // A profiler in front of the agent (e.g. `heaptrack -o FILE`, `perf record -g -o FILE --`):
    // the agent's figures are then the wrapper's, only its profile counts.
    let wrapper = std::env::var(WRAPPER).unwrap_or_default();
    let mut argv: Vec<&str> = wrapper.split_whitespace().collect();
    argv.extend([sepal.to_str().context("utf-8 path")?, "node"]);
    let (started, started_at) = (Instant::now(), std::time::SystemTime::now());
    let child = netns
        .command(&argv)
        .args([
            "--node-name",
            node,
            "--datastore",
            "kubernetes",
            "--kubeconfig",
        ])
        .arg(kubeconfig)
        .arg("--state-dir")
        .arg(&state)
        .arg("--socket")
        .arg(&socket)
        .args(["--metrics-addr", &metrics_addr, "--log-format", "json"])
        // Its own process group, so a wrapper's children are stopped with it.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .context("starting sepal node")?;
    let mut agent = Agent { child, log };
    let pid = agent.child.id();

    let ready = sepal_felix::netns::on_thread_in(&netns.path(), || {
        wait_ready(port, &mut agent.child, started)
    })?
    .with_context(|| format!("agent log:\n{}", agent.log_tail()))?;
    let cpu_ready_ms = cpu_ms(pid).context("the agent's CPU time")?;
    let rss_ready_kib = status_kib(pid, "VmRSS").context("the agent's RSS")?;

    let status_ms = wait_status_round(cluster, audited_before)
        .then(|| started.elapsed().as_secs_f64() * 1000.0);
    if status_ms.is_none() {
        eprintln!("the agent's first status round was not audited within {STATUS_TIMEOUT:?}");
    }
    let cpu_total_ms = cpu_ms(pid).context("the agent's CPU time")?;
    let hwm_kib = status_kib(pid, "VmHWM").context("the agent's peak RSS")?;
    let anon_kib = status_kib(pid, "RssAnon").unwrap_or_default();
    let file_kib = status_kib(pid, "RssFile").unwrap_or_default();
    let admin_socket = dir.path().join("admin.sock");
    let during =
        during(pid, &admin_socket).with_context(|| format!("agent log:\n{}", agent.log_tail()))?;
    // The churn may have raised the peak.
    let hwm_kib = status_kib(pid, "VmHWM").unwrap_or(hwm_kib);
    agent.stop();
    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    Ok((
        Run {
            milestones: super::timeline::milestones(&log, started_at),
            ready_ms: ready.as_secs_f64() * 1000.0,
            cpu_ready_ms,
            status_ms,
            cpu_total_ms,
            hwm_kib,
            rss_ready_kib,
            anon_kib,
            file_kib,
        },
        during,
    ))
}

/// Polls /readyz (in the agent's namespace) until it answers 200; the agent exiting or the
/// timeout is an error.
fn wait_ready(port: u16, child: &mut Child, started: Instant) -> Result<Duration> {
    loop {
        if readyz(port) == Some(200) {
            return Ok(started.elapsed());
        }
        if let Some(status) = child.try_wait()? {
            bail!("sepal node exited ({status}) before it was ready");
        }
        if started.elapsed() > READY_TIMEOUT {
            bail!("sepal node not ready after {READY_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The status code of GET /readyz; None while nothing listens.
fn readyz(port: u16) -> Option<u16> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.write_all(b"GET /readyz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.split_whitespace().nth(1)?.parse().ok()
}

/// Waits until the audit log has the agent's write of its SepalNodeStatus status (the last
/// write of its first status round), past the first `skip` audit events.
fn wait_status_round(cluster: &Cluster, skip: usize) -> bool {
    let deadline = Instant::now() + STATUS_TIMEOUT;
    while Instant::now() < deadline {
        let written = cluster.agent_requests().iter().skip(skip).any(|e| {
            e["stage"] == "ResponseComplete"
                && e["objectRef"]["resource"] == "sepalnodestatuses"
                && e["objectRef"]["subresource"] == "status"
        });
        if written {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
