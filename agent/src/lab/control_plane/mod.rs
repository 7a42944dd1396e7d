//! A real Kubernetes control plane on this machine's loopback: etcd, kube-apiserver (RBAC,
//! ServiceAccount tokens, the default admission plugins), kube-controller-manager (node IPAM on)
//! and kube-scheduler, built by scripts/kube-build, with the ClusterNetworkPolicy CRD installed
//! (`crds`).
//!
//! `sepal lab control-plane --dir DIR` is its supervisor: one process that makes the credentials,
//! starts the components in order, waits for each to be ready, writes `DIR/control-plane.json`,
//! and on SIGTERM stops them in reverse order. The components die with it (PR_SET_PDEATHSIG), so
//! whoever owns the supervisor (a test's guard, `sepal lab down`) owns the whole control plane.
//! A component that fails to start, or dies later, takes the control plane down with an error
//! that names it and its log.

pub mod components;
pub mod crds;
pub(crate) mod pki;

use anyhow::{bail, Context, Result};
use components::{args, ClusterSettings, Component, Layout, Ports};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// How long one component may take to become ready before the start is given up.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

#[derive(Debug, clap::Args)]
pub struct ControlPlaneArgs {
    /// Directory for everything the control plane has: credentials, etcd's data, kubeconfigs,
    /// logs. Created if missing; must not hold another control plane.
    #[arg(long)]
    pub dir: PathBuf,
    /// Where etcd and the Kubernetes binaries are (default: scripts/kube-build's folder,
    /// target/kube/bin, found beside this binary).
    #[arg(long, env = "SEPAL_KUBE_BIN")]
    pub bin_dir: Option<PathBuf>,
    /// Remove the directory once the control plane has stopped (a test's throwaway cluster).
    #[arg(long)]
    pub remove_on_exit: bool,
    /// Do not install the ClusterNetworkPolicy CRD (scripts/kube-build's copy of
    /// network-policy-api's experimental channel), as on a cluster that lacks it.
    #[arg(long)]
    pub no_cnp_crd: bool,
    #[command(flatten)]
    pub cluster: ClusterSettings,
}

/// What a ready control plane offers its clients; `DIR/control-plane.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoints {
    /// The API server's URL (https, loopback).
    pub server: String,
    /// etcd's client URL (plain http, loopback): for compaction and inspection in tests.
    pub etcd: String,
    /// A kubeconfig of user `admin` in group system:masters.
    pub admin_kubeconfig: PathBuf,
    /// The CA every client trusts the API server by.
    pub ca_cert: PathBuf,
    /// The API server's audit log of the agents' requests (JSON lines).
    pub audit_log: PathBuf,
    pub kubernetes_version: String,
    pub ports: Ports,
    /// The supervisor's PID: stopping it stops everything.
    pub pid: u32,
    pub logs: BTreeMap<String, PathBuf>,
}

impl Endpoints {
    pub fn load(dir: &Path) -> Result<Endpoints> {
        let path = Layout { dir: dir.into() }.ready_file();
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parse {}", path.display()))
    }
}

/// The folder scripts/kube-build fills: `--bin-dir`/SEPAL_KUBE_BIN, else target/kube/bin next
/// to target/<profile>/sepal.
pub fn bin_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    let dir = match explicit {
        Some(d) => d.to_path_buf(),
        None => {
            let exe = std::env::current_exe()?;
            let target = exe
                .parent()
                .and_then(Path::parent)
                .context("locating target/ from this binary")?;
            target.join("kube").join("bin")
        }
    };
    for c in Component::ALL {
        if !dir.join(c.binary()).is_file() {
            bail!(
                "{} is not in {}: build the control plane with scripts/kube-build \
                 (or point --bin-dir / SEPAL_KUBE_BIN at its output)",
                c.binary(),
                dir.display()
            );
        }
    }
    Ok(dir)
}

/// Free loopback ports, held together while chosen so no two of them are the same.
fn free_ports() -> Result<Ports> {
    let listeners: Vec<std::net::TcpListener> = (0..5)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<_>>()?;
    let p: Vec<u16> = listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<_>>()?;
    Ok(Ports {
        etcd_client: p[0],
        etcd_peer: p[1],
        api_server: p[2],
        controller_manager: p[3],
        scheduler: p[4],
    })
}

/// The clients with a static token, in the token file and each with a kubeconfig.
fn write_credentials(l: &Layout, server: &str) -> Result<()> {
    let users = [
        pki::TokenUser {
            token: pki::token()?,
            user: "admin",
            groups: &["system:masters"],
        },
        pki::TokenUser {
            token: pki::token()?,
            user: "system:kube-controller-manager",
            groups: &[],
        },
        pki::TokenUser {
            token: pki::token()?,
            user: "system:kube-scheduler",
            groups: &[],
        },
    ];
    write_private(&l.token_file(), &pki::token_file(&users))?;
    let files = [
        "admin",
        Component::ControllerManager.binary(),
        Component::Scheduler.binary(),
    ];
    for (file, u) in files.iter().zip(&users) {
        let kc = pki::kubeconfig(server, &l.pki_file("ca.crt"), u.user, &u.token);
        write_private(&l.kubeconfig(file), &kc)?;
    }
    Ok(())
}

/// A file only root reads: it holds a credential.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("write {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

/// The last lines of a log, for an error message.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

struct Running {
    component: Component,
    child: Child,
}

fn spawn(
    c: Component,
    bin: &Path,
    l: &Layout,
    ports: &Ports,
    s: &ClusterSettings,
) -> Result<Child> {
    spawn_logged(&bin.join(c.binary()), &args(c, l, ports, s), &l.log(c))
}

/// Starts a supervised program (a control-plane component, a node's containerd or kubelet):
/// stdin closed, its output to `log`, killed when the supervisor dies (PR_SET_PDEATHSIG) or drops
/// its handle.
pub(crate) fn spawn_logged(program: &Path, args: &[String], log: &Path) -> Result<Child> {
    let file = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .kill_on_drop(true);
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.spawn()
        .with_context(|| format!("start {}", program.display()))
}

/// A plain HTTP GET on loopback (etcd's health endpoint): the status line's code and the body.
async fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes())
        .await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Ok((code, body))
}

/// GET `path` through a kube client; Ok(body) on a 2xx.
async fn api_get(client: &kube::Client, path: &str) -> Result<String> {
    let req = http::Request::get(path).body(Vec::new())?;
    Ok(client.request_text(req).await?)
}

/// A client for a component's own HTTPS health endpoint (a certificate it made itself).
fn health_client(port: u16) -> Result<kube::Client> {
    let mut cfg = kube::Config::new(format!("https://127.0.0.1:{port}").parse()?);
    cfg.accept_invalid_certs = true;
    Ok(kube::Client::try_from(cfg)?)
}

/// Whether component `c` serves; errors say why not yet.
async fn ready(c: Component, l: &Layout, ports: &Ports) -> Result<()> {
    match c {
        Component::Etcd => {
            let (code, body) = http_get(ports.etcd_client, "/health").await?;
            if code != 200 || !body.contains("true") {
                bail!("etcd /health: {code} {body}");
            }
        }
        Component::ApiServer => {
            let client = crate::datastore::kube::client(Some(&l.admin_kubeconfig())).await?;
            api_get(&client, "/readyz").await?;
        }
        Component::ControllerManager => {
            api_get(&health_client(ports.controller_manager)?, "/healthz").await?;
            // Its ServiceAccount controller has run: namespaces get their `default` account,
            // which the ServiceAccount admission plugin wants before it admits a Pod.
            let client = crate::datastore::kube::client(Some(&l.admin_kubeconfig())).await?;
            api_get(
                &client,
                "/api/v1/namespaces/default/serviceaccounts/default",
            )
            .await?;
        }
        Component::Scheduler => {
            api_get(&health_client(ports.scheduler)?, "/healthz").await?;
        }
    }
    Ok(())
}

/// Starts `c` and waits until it is ready; an exit or a timeout is an error naming its log.
async fn start_one(
    c: Component,
    bin: &Path,
    l: &Layout,
    ports: &Ports,
    s: &ClusterSettings,
) -> Result<Running> {
    let started = Instant::now();
    let mut child = spawn(c, bin, l, ports, s)?;
    let mut last_error;
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "{} exited ({status}) before it was ready; its log is {}:\n{}",
                c.binary(),
                l.log(c).display(),
                tail(&l.log(c), 15)
            );
        }
        match ready(c, l, ports).await {
            Ok(()) => break,
            Err(e) => last_error = format!("{e:#}"),
        }
        if started.elapsed() > READY_TIMEOUT {
            let _ = child.kill().await;
            bail!(
                "{} was not ready after {} s ({last_error}); its log is {}:\n{}",
                c.binary(),
                READY_TIMEOUT.as_secs(),
                l.log(c).display(),
                tail(&l.log(c), 15)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tracing::info!(
        component = c.binary(),
        ms = started.elapsed().as_millis() as u64,
        "ready"
    );
    Ok(Running {
        component: c,
        child,
    })
}

/// SIGTERM to each component, last started first, then SIGKILL after a grace period.
async fn stop_all(running: &mut Vec<Running>) {
    while let Some(mut r) = running.pop() {
        if let Some(pid) = r.child.id() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(10), r.child.wait())
            .await
            .is_err()
        {
            let _ = r.child.kill().await;
        }
        tracing::info!(component = r.component.binary(), "stopped");
    }
}

/// Waits until one component exits; returns its name and status.
async fn first_exit(
    running: &mut [Running],
) -> (Component, std::io::Result<std::process::ExitStatus>) {
    let waits = running
        .iter_mut()
        .map(|r| Box::pin(async move { (r.component, r.child.wait().await) }));
    futures::future::select_all(waits).await.0
}

fn version(bin: &Path) -> String {
    std::fs::read_to_string(bin.join("VERSION"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// `sepal lab control-plane`: runs the control plane in the foreground until SIGTERM or SIGINT.
pub fn run(a: ControlPlaneArgs) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // The health probes of self-signed endpoints would log a warning each.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube_client=off"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let bin = bin_dir(a.bin_dir.as_deref())?;
    let cnp_crd = if a.no_cnp_crd {
        None
    } else {
        Some(crds::cnp_crd(&bin)?)
    };
    let l = Layout {
        dir: std::path::absolute(&a.dir)?,
    };
    if l.ready_file().exists() {
        bail!("{} already holds a control plane", l.dir.display());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(supervise(&bin, &l, &a.cluster, cnp_crd.as_deref()));
    drop(rt);
    if a.remove_on_exit {
        let _ = std::fs::remove_dir_all(&l.dir);
    }
    result
}

async fn supervise(
    bin: &Path,
    l: &Layout,
    s: &ClusterSettings,
    cnp_crd: Option<&Path>,
) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let started = Instant::now();
    std::fs::create_dir_all(l.dir.join("logs"))?;
    pki::make(&l.pki(), &s.service_ip()?, s.advertise_address)?;
    let ports = free_ports()?;
    let server = format!("https://127.0.0.1:{}", ports.api_server);
    write_credentials(l, &server)?;
    std::fs::write(l.audit_policy(), components::AUDIT_POLICY)?;

    let mut running = Vec::new();
    // The CRD goes in while the controller manager and scheduler start (it needs only the API
    // server), so it costs a control plane no time.
    let mut crd_install = None;
    for c in Component::ALL {
        let step = tokio::select! {
            r = start_one(c, bin, l, &ports, s) => r,
            _ = term.recv() => Err(anyhow::anyhow!("stopped while starting")),
            _ = int.recv() => Err(anyhow::anyhow!("stopped while starting")),
        };
        match step {
            Ok(r) => running.push(r),
            Err(e) => {
                stop_all(&mut running).await;
                return Err(e.context("the control plane did not start"));
            }
        }
        if let (Component::ApiServer, Some(crd)) = (c, cnp_crd) {
            let (kubeconfig, crd) = (l.admin_kubeconfig(), crd.to_path_buf());
            crd_install = Some(tokio::spawn(async move {
                let client = crate::datastore::kube::client(Some(&kubeconfig)).await?;
                crds::install(&client, &crd).await
            }));
        }
    }
    if let Some(task) = crd_install {
        let step = tokio::select! {
            r = task => r.unwrap_or_else(|e| Err(anyhow::anyhow!("installing the CRDs: {e}"))),
            _ = term.recv() => Err(anyhow::anyhow!("stopped while starting")),
            _ = int.recv() => Err(anyhow::anyhow!("stopped while starting")),
        };
        if let Err(e) = step {
            stop_all(&mut running).await;
            return Err(e.context("the control plane did not start"));
        }
    }
    let endpoints = Endpoints {
        server,
        etcd: format!("http://127.0.0.1:{}", ports.etcd_client),
        admin_kubeconfig: l.admin_kubeconfig(),
        ca_cert: l.pki_file("ca.crt"),
        audit_log: l.audit_log(),
        kubernetes_version: version(bin),
        ports,
        pid: std::process::id(),
        logs: Component::ALL
            .iter()
            .map(|c| (c.binary().to_string(), l.log(*c)))
            .collect(),
    };
    let json = serde_json::to_string(&endpoints)?;
    let tmp = l.ready_file().with_extension("json.tmp");
    std::fs::write(&tmp, &json)?;
    std::fs::rename(&tmp, l.ready_file())?;
    println!("{json}");
    tracing::info!(
        ms = started.elapsed().as_millis() as u64,
        server = endpoints.server,
        "control plane ready"
    );

    let outcome = tokio::select! {
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
        (c, status) = first_exit(&mut running) => {
            let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
            Err(anyhow::anyhow!(
                "{} exited ({status}); its log is {}:\n{}",
                c.binary(), l.log(c).display(), tail(&l.log(c), 15)
            ))
        }
    };
    stop_all(&mut running).await;
    let _ = std::fs::remove_file(l.ready_file());
    outcome
}

/// Starts a supervisor detached (its own session, log in `dir/control-plane.log`) and waits for
/// it to be ready: `sepal lab up --kubernetes`. Stop it with [`stop`]. `spawned` is told the
/// supervisor's PID as soon as it runs, before it is ready: a caller that records it can stop a
/// control plane whose start it did not see through.
pub fn start_detached(
    dir: &Path,
    netns: Option<&Path>,
    cluster_args: &[String],
    spawned: impl FnOnce(u32) -> Result<()>,
) -> Result<Endpoints> {
    std::fs::create_dir_all(dir)?;
    let log = dir.join("control-plane.log");
    let file = std::fs::File::create(&log)?;
    let sepal = std::env::current_exe()?;
    let mut command = std::process::Command::new("setsid");
    if let Some(ns) = netns {
        command
            .arg("nsenter")
            .arg(format!("--net={}", ns.display()));
    }
    let mut child = command
        .arg(&sepal)
        .args(["lab", "control-plane", "--dir"])
        .arg(dir)
        .args(cluster_args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(file)
        .spawn()
        .context("start the control plane")?;
    if let Err(e) = spawned(child.id()) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(e);
    }
    let deadline = Instant::now() + READY_TIMEOUT * 4;
    loop {
        if let Ok(e) = Endpoints::load(dir) {
            return Ok(e);
        }
        if child.try_wait()?.is_some() || Instant::now() > deadline {
            let _ = child.kill();
            bail!("{}", tail(&log, 20).trim());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops a supervisor by PID and waits until it (and so every component) is gone.
pub fn stop(pid: u32) {
    let p = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGTERM);
    // The supervisor gives each of four components up to 10 s.
    let deadline = Instant::now() + Duration::from_secs(45);
    while super::net::alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = nix::sys::signal::kill(p, nix::sys::signal::Signal::SIGKILL);
}
