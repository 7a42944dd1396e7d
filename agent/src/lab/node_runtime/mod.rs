//! A real Kubernetes node in a lab namespace: containerd (with runc) and kubelet, built by
//! scripts/kube-build, started in the node's network namespace with every file under the node's
//! own directory, registered with the lab's API server under the node's name.
//!
//! `sepal lab node-runtime --dir DIR --name NODE --control-plane CPDIR` is its supervisor, in the
//! shape of `sepal lab control-plane`: it makes the node's credentials and configs, starts
//! containerd, imports the lab's images, starts kubelet, waits for the Node (Ready when a CNI
//! config is given), writes `DIR/node.json`, and on SIGTERM tears down everything it started:
//! kubelet, the Pods' processes, containerd and its shims, the mounts under DIR, the node's
//! cgroups. A component that fails names itself and its log.

pub mod containerd;
pub mod host;
pub mod images;
pub mod kube_proxy;
pub mod kubelet;
pub mod mount_ns;
pub mod sepal_image;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::process::Child;

/// Debian's runc (package runc); crun refuses the lab machines' hybrid cgroup layout.
pub const RUNC: &str = "/usr/sbin/runc";

/// How long containerd, then kubelet's Node, may take before the start is given up.
const READY_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, clap::Args)]
pub struct NodeRuntimeArgs {
    /// The node's directory: containerd's root and state, kubelet's root, CNI dirs, logs.
    #[arg(long)]
    pub dir: PathBuf,
    /// The node's name (its Node object, kubelet's --hostname-override).
    #[arg(long)]
    pub name: String,
    /// The lab the node belongs to: names its cgroup (/sepal/LAB/NODE).
    #[arg(long, default_value = "lab")]
    pub lab: String,
    /// The control plane's directory (`sepal lab control-plane --dir`): its CA signs the
    /// node's certificates, its control-plane.json names the server.
    #[arg(long)]
    pub control_plane: PathBuf,
    /// The API server's URL as the node's namespace reaches it (default: the control plane's).
    #[arg(long)]
    pub server: Option<String>,
    /// The network namespace to run in (a path such as /run/netns/NAME; default: this one).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// The node's InternalIP (kubelet --node-ip).
    #[arg(long)]
    pub node_ip: Option<std::net::IpAddr>,
    /// Also run kube-proxy, in this mode (Services in the node's namespace).
    #[arg(long, value_enum)]
    pub kube_proxy: Option<kube_proxy::ProxyMode>,
    /// One more kubelet flag (repeatable), e.g. `--kubelet-arg=--v=4`.
    #[arg(long = "kubelet-arg", allow_hyphen_values = true)]
    pub kubelet_args: Vec<String>,
    /// A CNI conflist to install in the node's conf dir (without one the Node stays NotReady
    /// until something, e.g. Sepal's install-cni, writes one).
    #[arg(long, requires = "cni_plugins")]
    pub cni_config: Option<PathBuf>,
    /// A folder of CNI plugins, copied into the node's bin dir (e.g. /usr/lib/cni).
    #[arg(long)]
    pub cni_plugins: Option<PathBuf>,
    /// Where to write the image archives (default: the node's own images/); a lab's nodes share
    /// one folder, so they are written once.
    #[arg(long)]
    pub image_cache: Option<PathBuf>,
    /// Where scripts/kube-build put the binaries (default: target/kube/bin beside this one).
    #[arg(long, env = "SEPAL_KUBE_BIN")]
    pub bin_dir: Option<PathBuf>,
    /// Also import the Sepal image (`sepal lab image`), made from the binaries beside this one.
    #[arg(long)]
    pub sepal_image: bool,
    /// Remove the directory once the node is torn down.
    #[arg(long)]
    pub remove_on_exit: bool,
}

/// One node to run, resolved from the arguments.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    pub lab: String,
    pub name: String,
    pub bin: PathBuf,
    pub server: String,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub node_ip: Option<String>,
    pub cluster_dns: String,
    pub max_pods: u32,
    pub labels: Vec<(String, String)>,
    /// More kubelet flags, after the node's own.
    pub kubelet_args: Vec<String>,
    /// kube-proxy's mode, when the node runs one.
    pub kube_proxy: Option<kube_proxy::ProxyMode>,
    /// (plugin folder, conflist) to install.
    pub cni: Option<(PathBuf, PathBuf)>,
    /// Where the image archives are written (shared by a lab's nodes).
    pub image_cache: PathBuf,
    /// The directory of Sepal's binaries, when the node imports the Sepal image too.
    pub sepal_image: Option<PathBuf>,
}

/// Where each file of a node is, under its directory.
#[derive(Debug, Clone)]
pub struct NodeLayout {
    pub dir: PathBuf,
}

impl NodeLayout {
    pub fn containerd_root(&self) -> PathBuf {
        self.dir.join("containerd").join("root")
    }
    pub fn containerd_state(&self) -> PathBuf {
        self.dir.join("containerd").join("state")
    }
    pub fn containerd_socket(&self) -> PathBuf {
        self.dir.join("containerd").join("containerd.sock")
    }
    pub fn containerd_config(&self) -> PathBuf {
        self.dir.join("containerd").join("config.toml")
    }
    pub fn cni_bin(&self) -> PathBuf {
        self.dir.join("cni").join("bin")
    }
    pub fn cni_conf(&self) -> PathBuf {
        self.dir.join("cni").join("net.d")
    }
    pub fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }
    pub fn kubelet_root(&self) -> PathBuf {
        self.dir.join("kubelet")
    }
    pub fn kubelet_config(&self) -> PathBuf {
        self.dir.join("kubelet-config.yaml")
    }
    pub fn kubelet_kubeconfig(&self) -> PathBuf {
        self.dir.join("kubelet.kubeconfig")
    }
    pub fn pod_logs(&self) -> PathBuf {
        self.dir.join("pod-logs")
    }
    pub fn images(&self) -> PathBuf {
        self.dir.join("images")
    }
    pub fn log(&self, component: &str) -> PathBuf {
        self.dir.join("logs").join(format!("{component}.log"))
    }
    pub fn ready_file(&self) -> PathBuf {
        self.dir.join("node.json")
    }
}

/// What a started node reports: `DIR/node.json`, and the supervisor's one line of stdout.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeInfo {
    pub name: String,
    /// The supervisor's PID: stopping it stops the node.
    pub pid: u32,
    pub pids: BTreeMap<String, u32>,
    pub logs: BTreeMap<String, PathBuf>,
    pub containerd_socket: PathBuf,
    pub cgroup: String,
    pub images: Vec<String>,
    pub ready: bool,
}

/// The last lines of a log, for an error message.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn spawn(program: &Path, args: &[String], log: &Path) -> Result<Child> {
    super::control_plane::spawn_logged(program, args, log)
}

/// A started component: its name (for errors), log and process.
struct Running {
    name: &'static str,
    log: PathBuf,
    child: Child,
}

impl Running {
    fn exited(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!(
                "{} exited ({status}); its log is {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 20)
            );
        }
        Ok(())
    }

    fn not_ready(&self, why: &str) -> anyhow::Error {
        anyhow::anyhow!(
            "{} was not ready after {} s ({why}); its log is {}:\n{}",
            self.name,
            READY_TIMEOUT.as_secs(),
            self.log.display(),
            tail(&self.log, 20)
        )
    }

    async fn stop(&mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            signal(pid, nix::sys::signal::Signal::SIGTERM);
        }
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

fn signal(pid: u32, sig: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), sig);
}

/// The node being brought up or running: what teardown has to undo.
pub struct Node {
    pub spec: NodeSpec,
    pub layout: NodeLayout,
    containerd: Option<Running>,
    kubelet: Option<Running>,
    kube_proxy: Option<Running>,
    images: Vec<String>,
}

impl Node {
    /// A node not started yet: `bring_up` starts it, `teardown` undoes whatever that did.
    pub fn new(spec: NodeSpec, layout: NodeLayout) -> Node {
        Node {
            spec,
            layout,
            containerd: None,
            kubelet: None,
            kube_proxy: None,
            images: Vec::new(),
        }
    }

    fn prepare(&self) -> Result<()> {
        let l = &self.layout;
        for d in [
            l.containerd_root(),
            l.containerd_state(),
            l.cni_bin(),
            l.cni_conf(),
            l.pki(),
            l.kubelet_root(),
            l.pod_logs(),
            l.images(),
            self.spec.image_cache.clone(),
            l.dir.join("logs"),
        ] {
            std::fs::create_dir_all(&d).with_context(|| format!("create {}", d.display()))?;
        }
        let s = &self.spec;
        host::create_cgroups(&kubelet::cgroup_root(s))?;
        kubelet::client_certificate(l, &s.name, &s.ca_cert, &s.ca_key)?;
        kubelet::serving_certificate(l, &s.name, s.node_ip.as_deref(), &s.ca_cert, &s.ca_key)?;
        super::control_plane::write_private(
            &l.kubelet_kubeconfig(),
            &kubelet::kubeconfig(l, &s.server, &s.ca_cert, &s.name),
        )?;
        std::fs::write(l.kubelet_config(), kubelet::config(s, l, &s.ca_cert))?;
        if let Some(mode) = s.kube_proxy {
            kubelet::sign_client(
                l,
                "kube-proxy",
                "/CN=system:kube-proxy",
                &s.ca_cert,
                &s.ca_key,
            )?;
            super::control_plane::write_private(
                &l.dir.join("kube-proxy.kubeconfig"),
                &kube_proxy::kubeconfig(l, &s.server, &s.ca_cert),
            )?;
            std::fs::write(
                l.dir.join("kube-proxy.yaml"),
                kube_proxy::config(s, l, mode),
            )?;
        }
        if let Some((plugins, conflist)) = &s.cni {
            for entry in std::fs::read_dir(plugins)
                .with_context(|| format!("read CNI plugins in {}", plugins.display()))?
            {
                let entry = entry?;
                std::fs::copy(entry.path(), l.cni_bin().join(entry.file_name()))?;
            }
            let name = conflist.file_name().context("CNI config file name")?;
            std::fs::copy(conflist, l.cni_conf().join(name))
                .with_context(|| format!("copy {}", conflist.display()))?;
        }
        Ok(())
    }

    pub async fn bring_up(&mut self) -> Result<()> {
        let started = Instant::now();
        self.prepare()?;
        let names = images::ImageNames::load(&self.spec.bin)?;
        std::fs::write(
            self.layout.containerd_config(),
            containerd::config(&self.layout, &names.pause),
        )?;

        // containerd, until its socket answers and the CRI plugin is up.
        let log = self.layout.log("containerd");
        let args = vec![
            "--config".to_string(),
            self.layout.containerd_config().display().to_string(),
        ];
        let child = spawn(&self.spec.bin.join("containerd"), &args, &log)?;
        self.containerd = Some(Running {
            name: "containerd",
            log,
            child,
        });
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let c = self.containerd.as_mut().expect("containerd");
            c.exited()?;
            match containerd::cri_ready(&self.spec.bin, &self.layout) {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => return Err(c.not_ready(&format!("{e:#}"))),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        tracing::info!(
            node = self.spec.name,
            ms = started.elapsed().as_millis() as u64,
            "containerd ready"
        );

        // The lab's images, written once (into the image cache nodes may share) and imported
        // where CRI finds them.
        let mut wanted = vec![
            images::pause(&names, &self.spec.bin),
            images::agnhost(&names, &self.spec.bin)?,
        ];
        if let Some(dir) = &self.spec.sepal_image {
            wanted.push(sepal_image::image(dir)?);
        }
        for image in wanted {
            let t = Instant::now();
            let file = self
                .spec
                .image_cache
                .join(sepal_image::archive_name(&image.name));
            images::ensure_archive(&image, &file)?;
            let written = t.elapsed();
            containerd::import(&self.spec.bin, &self.layout, &file)
                .with_context(|| format!("node {}: containerd", self.spec.name))?;
            tracing::info!(
                node = self.spec.name,
                image = image.name,
                write_ms = written.as_millis() as u64,
                import_ms = (t.elapsed() - written).as_millis() as u64,
                "image imported"
            );
            self.images.push(image.name.clone());
        }
        // kubelet, until its Node is registered (and Ready, when the node has a CNI config).
        let log = self.layout.log("kubelet");
        let args = kubelet::args(&self.spec, &self.layout);
        let child = spawn(&self.spec.bin.join("kubelet"), &args, &log)?;
        self.kubelet = Some(Running {
            name: "kubelet",
            log,
            child,
        });
        let want_ready = self.spec.cni.is_some();
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let k = self.kubelet.as_mut().expect("kubelet");
            k.exited()?;
            self.containerd.as_mut().expect("containerd").exited()?;
            let why = match self.node_ready() {
                Ok(ready) if ready || !want_ready => break,
                Ok(_) => "the Node is registered but not Ready".to_string(),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                return Err(self.kubelet.as_ref().expect("kubelet").not_ready(&why));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        tracing::info!(
            node = self.spec.name,
            ms = started.elapsed().as_millis() as u64,
            "kubelet ready"
        );

        // kube-proxy, until its health endpoint answers (it has synced Services once).
        if self.spec.kube_proxy.is_some() {
            let log = self.layout.log("kube-proxy");
            let child = spawn(
                &self.spec.bin.join("kube-proxy"),
                &kube_proxy::args(&self.layout),
                &log,
            )?;
            self.kube_proxy = Some(Running {
                name: "kube-proxy",
                log,
                child,
            });
            let deadline = Instant::now() + READY_TIMEOUT;
            loop {
                let p = self.kube_proxy.as_mut().expect("kube-proxy");
                p.exited()?;
                let why = match healthz(10256).await {
                    Ok(()) => break,
                    Err(e) => format!("{e:#}"),
                };
                if Instant::now() > deadline {
                    return Err(p.not_ready(&why));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            tracing::info!(
                node = self.spec.name,
                ms = started.elapsed().as_millis() as u64,
                "kube-proxy ready"
            );
        }
        Ok(())
    }

    /// The Node's Ready condition, read with the node's own credentials; Err while the Node is
    /// not registered.
    pub fn node_ready(&self) -> Result<bool> {
        let out = std::process::Command::new(self.spec.bin.join("kubectl"))
            .arg(format!(
                "--kubeconfig={}",
                self.layout.kubelet_kubeconfig().display()
            ))
            .args([
                "get",
                "node",
                &self.spec.name,
                "-o",
                "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
            ])
            .output()
            .context("run kubectl")?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim() == "True")
    }

    pub fn info(&self) -> NodeInfo {
        let mut pids = BTreeMap::new();
        let mut logs = BTreeMap::new();
        for r in [&self.containerd, &self.kubelet, &self.kube_proxy]
            .into_iter()
            .flatten()
        {
            if let Some(pid) = r.child.id() {
                pids.insert(r.name.to_string(), pid);
            }
            logs.insert(r.name.to_string(), r.log.clone());
        }
        NodeInfo {
            name: self.spec.name.clone(),
            pid: std::process::id(),
            pids,
            logs,
            containerd_socket: self.layout.containerd_socket(),
            cgroup: kubelet::cgroup_root(&self.spec),
            images: self.images.clone(),
            ready: self.node_ready().unwrap_or(false),
        }
    }

    /// Waits until containerd or kubelet exits: an error naming it and its log.
    pub async fn watch(&mut self) -> anyhow::Error {
        loop {
            for r in [
                &mut self.containerd,
                &mut self.kubelet,
                &mut self.kube_proxy,
            ]
            .into_iter()
            .flatten()
            {
                if let Err(e) = r.exited() {
                    return e.context(format!("node {}", self.spec.name));
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// Undoes everything `start` did, whatever state it got to: kubelet first (so it restarts
    /// nothing), then the Pods' processes, containerd, its shims, the mounts, the cgroups.
    pub async fn teardown(&mut self) {
        // kube-proxy's rules live in the node's namespace and go with it.
        if let Some(mut p) = self.kube_proxy.take() {
            p.stop(Duration::from_secs(5)).await;
        }
        if let Some(mut k) = self.kubelet.take() {
            k.stop(Duration::from_secs(10)).await;
        }
        let cgroup = kubelet::cgroup_root(&self.spec);
        host::kill_cgroup_processes(&cgroup).await;
        if let Some(mut c) = self.containerd.take() {
            c.stop(Duration::from_secs(10)).await;
        }
        host::kill_shims(&self.layout).await;
        host::kill_cgroup_processes(&cgroup).await;
        host::unmount_under(&self.layout.dir);
        host::remove_cgroups(&cgroup).await;
        host::remove_log_links(&self.layout.pod_logs());
    }
}

fn resolve(a: &NodeRuntimeArgs) -> Result<(NodeSpec, NodeLayout)> {
    let bin = super::control_plane::bin_dir(a.bin_dir.as_deref())?;
    for b in [
        "containerd",
        "containerd-shim-runc-v2",
        "ctr",
        "kubelet",
        "pause",
        "agnhost",
    ] {
        if !bin.join(b).is_file() {
            bail!(
                "{b} is not in {}: build the node components with scripts/kube-build",
                bin.display()
            );
        }
    }
    if a.kube_proxy.is_some() && !bin.join("kube-proxy").is_file() {
        bail!(
            "kube-proxy is not in {}: build the node components with scripts/kube-build",
            bin.display()
        );
    }
    if !Path::new(RUNC).is_file() {
        bail!("{RUNC} is missing: apt-get install runc");
    }
    let cp = std::path::absolute(&a.control_plane)?;
    let endpoints = super::control_plane::Endpoints::load(&cp)?;
    let ca_key = endpoints.ca_cert.with_file_name("ca.key");
    let cni = match (&a.cni_plugins, &a.cni_config) {
        (Some(p), Some(c)) => Some((std::path::absolute(p)?, std::path::absolute(c)?)),
        _ => None,
    };
    let layout = NodeLayout {
        dir: std::path::absolute(&a.dir)?,
    };
    let image_cache = match &a.image_cache {
        Some(d) => std::path::absolute(d)?,
        None => layout.images(),
    };
    let sepal_image = match a.sepal_image {
        true => {
            let exe = std::env::current_exe().context("the running sepal's path")?;
            Some(exe.parent().context("sepal's directory")?.to_path_buf())
        }
        false => None,
    };
    let spec = NodeSpec {
        image_cache,
        sepal_image,
        lab: a.lab.clone(),
        name: a.name.clone(),
        bin,
        server: a.server.clone().unwrap_or(endpoints.server),
        ca_cert: endpoints.ca_cert,
        ca_key,
        node_ip: a.node_ip.map(|ip| ip.to_string()),
        kubelet_args: a.kubelet_args.clone(),
        kube_proxy: a.kube_proxy,
        cluster_dns: "10.96.0.10".into(),
        max_pods: 110,
        labels: vec![("sepal.dev/lab".into(), a.lab.clone())],
        cni,
    };
    Ok((spec, layout))
}

/// A plain HTTP GET of `/healthz` on the node's loopback: Ok on a 200.
async fn healthz(port: u16) -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
        .await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    match text.split_whitespace().nth(1) {
        Some("200") => Ok(()),
        _ => bail!("/healthz: {}", text.lines().next().unwrap_or_default()),
    }
}

/// Enters `netns` on this (the only) thread, before any runtime thread exists, so containerd,
/// kubelet and every probe run in it.
fn enter(netns: &Path) -> Result<()> {
    let f = std::fs::File::open(netns).with_context(|| format!("open {}", netns.display()))?;
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET)
        .with_context(|| format!("enter {}", netns.display()))
}

/// `sepal lab node-runtime`: runs one node in the foreground until SIGTERM or SIGINT.
pub fn run(a: NodeRuntimeArgs) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let (spec, layout) = resolve(&a)?;
    if layout.ready_file().exists() {
        bail!("{} already holds a node", layout.dir.display());
    }
    if let Some(ns) = &a.netns {
        enter(ns)?;
    }
    let dir = std::path::absolute(&layout.dir)?;
    mount_ns::enter(&dir).with_context(|| format!("node {}", spec.name))?;
    mount_ns::set_hostname(&spec.name).with_context(|| format!("node {}", spec.name))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = rt.block_on(supervise(spec, layout.clone()));
    drop(rt);
    if a.remove_on_exit {
        let _ = std::fs::remove_dir_all(&layout.dir);
    }
    result
}

async fn supervise(spec: NodeSpec, layout: NodeLayout) -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut node = Node::new(spec, layout.clone());
    let up = tokio::select! {
        r = node.bring_up() => r,
        _ = term.recv() => Err(anyhow::anyhow!("stopped while starting")),
        _ = int.recv() => Err(anyhow::anyhow!("stopped while starting")),
    };
    if let Err(e) = up {
        node.teardown().await;
        return Err(e.context(format!("node {} did not start", node.spec.name)));
    }
    let info = node.info();
    let json = serde_json::to_string(&info)?;
    let tmp = layout.ready_file().with_extension("json.tmp");
    std::fs::write(&tmp, &json)?;
    std::fs::rename(&tmp, layout.ready_file())?;
    println!("{json}");
    let outcome = tokio::select! {
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
        e = node.watch() => Err(e),
    };
    node.teardown().await;
    let _ = std::fs::remove_file(layout.ready_file());
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> (NodeSpec, NodeLayout) {
        let spec = NodeSpec {
            lab: "lab1".into(),
            name: "node1".into(),
            bin: "/bin-dir".into(),
            server: "https://127.0.0.1:6443".into(),
            ca_cert: "/cp/pki/ca.crt".into(),
            ca_key: "/cp/pki/ca.key".into(),
            node_ip: Some("10.0.1.2".into()),
            cluster_dns: "10.96.0.10".into(),
            max_pods: 110,
            labels: vec![],
            kubelet_args: vec![],
            kube_proxy: Some(kube_proxy::ProxyMode::Nftables),
            cni: None,
            image_cache: "/node/images".into(),
            sepal_image: None,
        };
        (
            spec,
            NodeLayout {
                dir: "/node".into(),
            },
        )
    }

    /// Every absolute path in `text` (a config; comments aside) is under one of `dirs`.
    fn paths_under(text: &str, dirs: &[&str]) {
        let settings = text
            .lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n");
        for word in settings.split(|c: char| c.is_whitespace() || c == '"' || c == '=') {
            let word = word.trim_start_matches("unix://");
            if word.starts_with('/') && !word.starts_with("/sepal/") {
                assert!(
                    dirs.iter().any(|d| word.starts_with(d)),
                    "{word} is outside {dirs:?}"
                );
            }
        }
    }

    #[test]
    fn every_file_of_the_node_is_under_its_directory() {
        let (s, l) = spec();
        let containerd = containerd::config(&l, "registry.k8s.io/pause:3.10.2");
        paths_under(&containerd, &["/node/", RUNC]);
        paths_under(&kubelet::config(&s, &l, &s.ca_cert), &["/node/", "/cp/"]);
        paths_under(
            &kube_proxy::config(&s, &l, kube_proxy::ProxyMode::Nftables),
            &["/node/"],
        );
        for a in kubelet::args(&s, &l) {
            if let Some((_, v)) = a.split_once('=') {
                paths_under(v, &["/node/"]);
            }
        }
    }

    #[test]
    fn the_settings_this_host_needs_are_there() {
        let (s, l) = spec();
        let k = kubelet::config(&s, &l, &s.ca_cert);
        for line in [
            "failCgroupV1: false",
            "cgroupDriver: cgroupfs",
            "cgroupRoot: /sepal/lab1/node1",
            "oomScoreAdj: 0",
            "imageGCHighThresholdPercent: 100",
        ] {
            assert!(k.contains(line), "{line}");
        }
        let c = containerd::config(&l, "registry.k8s.io/pause:3.10.2");
        for line in [
            "restrict_oom_score_adj = true",
            "netns_mounts_under_state_dir = false",
            "use_internal_loopback = true",
            "sandbox = \"registry.k8s.io/pause:3.10.2\"",
            "SystemdCgroup = false",
        ] {
            assert!(c.contains(line), "{line}");
        }
        let a = kubelet::args(&s, &l);
        assert!(a.contains(&"--hostname-override=node1".to_string()));
        assert!(a.contains(&"--node-ip=10.0.1.2".to_string()));
    }
}
