//! A real Kubernetes control plane for a test: etcd, kube-apiserver, kube-controller-manager and
//! kube-scheduler (built by scripts/kube-build) under `sepal lab control-plane`, in a temporary
//! directory, on loopback ports chosen at run time, so tests run in parallel. Dropping the
//! [`Cluster`] (a panicking test too) stops every process and removes every file; if the test
//! process itself dies, the supervisor gets SIGTERM from the kernel and does the same.
//!
//! Objects are written with the real kubectl (server-side apply, status through the status
//! subresource, as kubelet and controllers write it), and the agent gets a kubeconfig of the
//! ServiceAccount `deploy/10-rbac.yaml` binds, never admin credentials.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository's deploy/ folder.
pub fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The folder scripts/kube-build writes: SEPAL_KUBE_BIN, else target/kube/bin.
pub fn kube_bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("SEPAL_KUBE_BIN") {
        return d.into();
    }
    let sepal = crate::bin_path("sepal");
    let target = sepal
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/sepal");
    target.join("kube").join("bin")
}

/// scripts/kube-build's copy of network-policy-api's ClusterNetworkPolicy CRD (experimental
/// channel), which every control plane installs unless told not to.
pub fn cnp_crd_file() -> PathBuf {
    kube_bin_dir().join("crds/experimental/policy.networking.k8s.io_clusternetworkpolicies.yaml")
}

/// How a test wants its control plane.
#[derive(Debug, Default, Clone)]
pub struct Options {
    /// Run the control plane inside this network namespace (its loopback), so an agent in that
    /// namespace reaches it; kubectl then runs there too.
    pub netns: Option<PathBuf>,
    /// More kube-apiserver flags, e.g. `--watch-cache=false`.
    pub apiserver_args: Vec<String>,
    /// Run kube-controller-manager's node lifecycle controller: with real kubelets, it is what
    /// lifts the `node.kubernetes.io/not-ready` taint a new Node is registered with.
    pub node_lifecycle: bool,
    /// Leave out the ClusterNetworkPolicy CRD the control plane otherwise installs (a cluster
    /// without it).
    pub without_cnp_crd: bool,
    /// Node IPAM's pod range and each node's share of it (mask length), instead of the control
    /// plane's default 10.244.0.0/16 in /24s.
    pub cluster_cidr: Option<(String, u8)>,
}

/// A running control plane, owned by the test.
pub struct Cluster {
    supervisor: Child,
    dir: Option<tempfile::TempDir>,
    netns: Option<PathBuf>,
    /// `control-plane.json`: server, etcd, kubeconfig, ports, logs.
    pub endpoints: Value,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        stop_supervisor(&mut self.supervisor, Duration::from_secs(45));
        drop(self.dir.take());
    }
}

/// Starts a supervisor (`sepal lab control-plane`, `sepal lab node-runtime`), its log to
/// `log_path`, and returns it with the first line it prints (its endpoints once it is up; empty
/// when it failed and exited).
pub(crate) fn start_supervisor(mut cmd: Command, log_path: &Path) -> (Child, String) {
    let log = std::fs::File::create(log_path).expect("log");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log);
    // SAFETY: prctl only, between fork and exec. SIGTERM (not KILL): the supervisor then
    // stops its components and removes nothing the test's own guard would not.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut supervisor = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("start {:?}: {e}", cmd.get_args().collect::<Vec<_>>()));
    let stdout = supervisor.stdout.take().expect("stdout");
    let mut line = String::new();
    let _ = BufReader::new(stdout).read_line(&mut line);
    (supervisor, line)
}

/// Stops a supervisor (`sepal lab control-plane`, `sepal lab node-runtime`) as its users would:
/// SIGTERM, so it stops its components and cleans up, then SIGKILL once `grace` is over.
pub(crate) fn stop_supervisor(supervisor: &mut Child, grace: Duration) {
    // SAFETY: kill(2) on our own child's PID.
    unsafe {
        libc::kill(supervisor.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = supervisor.try_wait() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = supervisor.kill();
    let _ = supervisor.wait();
}

impl Cluster {
    pub fn start() -> Cluster {
        Cluster::start_with(Options::default())
    }

    pub fn start_with(o: Options) -> Cluster {
        let dir = tempfile::Builder::new()
            .prefix("sepal-kube-")
            .tempdir()
            .expect("tempdir");
        let sepal = crate::bin_path("sepal");
        let mut cmd = match &o.netns {
            Some(ns) => {
                let mut c = Command::new("nsenter");
                c.arg(format!("--net={}", ns.display())).arg(&sepal);
                c
            }
            None => Command::new(&sepal),
        };
        cmd.args(["lab", "control-plane", "--dir"])
            .arg(dir.path())
            .arg("--bin-dir")
            .arg(kube_bin_dir());
        for a in &o.apiserver_args {
            cmd.arg(format!("--apiserver-arg={a}"));
        }
        if o.node_lifecycle {
            cmd.arg("--node-lifecycle");
        }
        if o.without_cnp_crd {
            cmd.arg("--no-cnp-crd");
        }
        if let Some((cidr, mask)) = &o.cluster_cidr {
            cmd.arg(format!("--cluster-cidr={cidr}"))
                .arg(format!("--node-cidr-mask-size={mask}"));
        }
        let log_path = dir.path().join("supervisor.log");
        let (supervisor, line) = start_supervisor(cmd, &log_path);
        let mut cluster = Cluster {
            supervisor,
            dir: Some(dir),
            netns: o.netns,
            endpoints: Value::Null,
        };
        match serde_json::from_str::<Value>(&line) {
            Ok(v) => cluster.endpoints = v,
            Err(_) => panic!(
                "the control plane did not start:\n{}",
                std::fs::read_to_string(&log_path).unwrap_or_default()
            ),
        }
        cluster
    }

    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("dir").path()
    }

    pub fn server(&self) -> String {
        self.endpoints["server"]
            .as_str()
            .expect("server")
            .to_string()
    }

    pub fn admin_kubeconfig(&self) -> PathBuf {
        PathBuf::from(
            self.endpoints["adminKubeconfig"]
                .as_str()
                .expect("kubeconfig"),
        )
    }

    pub fn version(&self) -> String {
        self.endpoints["kubernetesVersion"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// A component's log, for a failing test's message.
    pub fn log(&self, component: &str) -> String {
        let path = self.endpoints["logs"][component]
            .as_str()
            .unwrap_or_default();
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// kubectl as `kubeconfig`'s user; Ok(stdout) or Err(stderr).
    pub fn kubectl_as(
        &self,
        kubeconfig: &Path,
        args: &[&str],
        stdin: Option<&str>,
    ) -> Result<String, String> {
        let kubectl = [
            kube_bin_dir().join("kubectl").display().to_string(),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--cache-dir={}", self.dir().join("kubectl-cache").display()),
        ];
        sepal_felix::exec::run(&kubectl, self.netns.as_deref(), args, stdin)
            .map_err(|e| e.to_string())
    }

    /// kubectl as admin; Ok(stdout) or Err(stderr).
    pub fn try_kubectl(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        self.kubectl_as(&self.admin_kubeconfig(), args, stdin)
    }

    /// kubectl as admin; panics with its error.
    pub fn kubectl(&self, args: &[&str]) -> String {
        self.try_kubectl(args, None)
            .unwrap_or_else(|e| panic!("kubectl {}: {e}", args.join(" ")))
    }

    /// Server-side applies the objects (in order, as one list), then writes the `status` of those
    /// that have one through the status subresource. Retries while a new namespace's `default`
    /// ServiceAccount, which Pod admission wants, is still being made by the controller.
    pub fn apply(&self, objects: &[Value]) {
        if objects.is_empty() {
            return;
        }
        let list = json!({"apiVersion": "v1", "kind": "List", "items": objects});
        self.apply_retrying(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            &list,
        );
        let with_status: Vec<Value> = objects
            .iter()
            .filter(|o| o.get("status").is_some_and(|s| !s.is_null()))
            .map(|o| {
                json!({"apiVersion": o["apiVersion"], "kind": o["kind"],
                       "metadata": {"name": o["metadata"]["name"], "namespace": o["metadata"]["namespace"]},
                       "status": o["status"]})
            })
            .collect();
        if !with_status.is_empty() {
            let list = json!({"apiVersion": "v1", "kind": "List", "items": with_status});
            self.apply_retrying(
                &[
                    "apply",
                    "--server-side",
                    "--force-conflicts",
                    "--subresource=status",
                    "--field-manager=test-status",
                    "-f",
                    "-",
                ],
                &list,
            );
        }
    }

    fn apply_retrying(&self, args: &[&str], list: &Value) {
        let text = list.to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.try_kubectl(args, Some(&text)) {
                Ok(_) => return,
                Err(e) if e.contains("serviceaccount") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("kubectl {}: {e}", args.join(" ")),
            }
        }
    }

    /// Deletes an object (resource as kubectl names it, e.g. `pod`, `bgppeer`); absent is fine.
    /// A Pod goes at once, as when its kubelet has confirmed the containers stopped: with no
    /// kubelet here, a graceful delete would leave it terminating forever.
    pub fn delete(&self, resource: &str, namespace: &str, name: &str) {
        let mut args = vec![
            "delete",
            resource,
            name,
            "--ignore-not-found",
            "--wait=false",
        ];
        if resource == "pod" || resource == "pods" {
            args.extend(["--grace-period=0", "--force"]);
        }
        if !namespace.is_empty() {
            args.extend(["-n", namespace]);
        }
        self.kubectl(&args);
    }

    /// One object as the server holds it.
    pub fn get(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let mut args = vec!["get", resource, name, "-o", "json"];
        if !namespace.is_empty() {
            args.extend(["-n", namespace]);
        }
        let text = self.try_kubectl(&args, None).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Every object of a resource (all namespaces, or `-n NS` among `extra`).
    pub fn list(&self, resource: &str, extra: &[&str]) -> Vec<Value> {
        let mut args = vec!["get", resource, "-o", "json"];
        if !extra.contains(&"-n") {
            args.push("-A");
        }
        args.extend(extra);
        let v: Value = serde_json::from_str(&self.kubectl(&args)).expect("kubectl get json");
        v["items"].as_array().cloned().unwrap_or_default()
    }

    /// Sepal's CRDs from deploy/crds, established.
    pub fn install_crds(&self) {
        let crds = deploy_dir().join("crds");
        self.kubectl(&[
            "apply",
            "--server-side",
            "-f",
            crds.to_str().expect("utf-8"),
        ]);
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd",
            "--all",
            "--timeout=60s",
        ]);
    }

    /// The ClusterNetworkPolicy CRD, established (for a control plane started without it).
    pub fn install_cnp_crd(&self) {
        let crd = cnp_crd_file();
        self.kubectl(&["apply", "--server-side", "-f", crd.to_str().expect("utf-8")]);
        self.kubectl(&[
            "wait",
            "--for=condition=Established",
            "crd/clusternetworkpolicies.policy.networking.k8s.io",
            "--timeout=60s",
        ]);
    }

    /// The CRDs, the namespace, the RBAC and the config of deploy/ (not the DaemonSet: no
    /// kubelet runs its pods here), as a user installs them.
    pub fn install_sepal(&self) {
        self.install_crds();
        let d = deploy_dir();
        for f in ["00-namespace.yaml", "10-rbac.yaml", "20-config.yaml"] {
            self.kubectl(&[
                "apply",
                "--server-side",
                "-f",
                d.join(f).to_str().expect("utf-8"),
            ]);
        }
    }

    /// The shipped ClusterRole `sepal-node` without its rules for `resource`: the API server
    /// answers the agent 403 for it from now on.
    pub fn remove_rbac_rule(&self, resource: &str) {
        let role = self
            .get("clusterrole", "", "sepal-node")
            .expect("ClusterRole");
        let mut cut = role.clone();
        cut["rules"] = json!(role["rules"]
            .as_array()
            .expect("rules")
            .iter()
            .filter(|r| !r["resources"].to_string().contains(resource))
            .collect::<Vec<_>>());
        self.try_kubectl(&["replace", "-f", "-"], Some(&cut.to_string()))
            .unwrap_or_else(|e| panic!("replace ClusterRole sepal-node: {e}"));
    }

    /// deploy/10-rbac.yaml applied again, as shipped.
    pub fn restore_rbac(&self) {
        let d = deploy_dir().join("10-rbac.yaml");
        self.kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            d.to_str().expect("utf-8"),
        ]);
    }

    /// A kubeconfig of ServiceAccount `sepal-system/sepal-node` (the agent's identity in
    /// deploy/10-rbac.yaml), with a token from the TokenRequest API; `server` overrides the
    /// API server's URL (a relay in front of it).
    pub fn agent_kubeconfig(&self, server: Option<&str>) -> PathBuf {
        let token = self
            .kubectl(&[
                "create",
                "token",
                "sepal-node",
                "-n",
                "sepal-system",
                "--duration=24h",
            ])
            .trim()
            .to_string();
        let server = server.map(str::to_string).unwrap_or_else(|| self.server());
        let ca = self.endpoints["caCert"].as_str().expect("caCert");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n    \
             certificate-authority: {ca}\ncontexts:\n- name: c\n  context:\n    cluster: c\n    user: sepal-node\n\
             current-context: c\nusers:\n- name: sepal-node\n  user:\n    token: {token}\n"
        );
        let path = self.dir().join(format!(
            "agent-{}.kubeconfig",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        ));
        std::fs::write(&path, text).expect("write agent kubeconfig");
        path
    }

    /// The agent's requests the API server audited, one JSON object each (verb, objectRef,
    /// requestURI, responseStatus.code).
    pub fn agent_requests(&self) -> Vec<Value> {
        let path = self.endpoints["auditLog"].as_str().expect("auditLog");
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// A request to etcd's JSON gateway (plain HTTP on loopback): POST `path` with `body`.
    fn etcd_post(&self, path: &str, body: &Value) -> Value {
        let port = self.endpoints["ports"]["etcdClient"]
            .as_u64()
            .expect("etcd port") as u16;
        let body = body.to_string();
        let request = format!(
            "POST {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let talk = move || -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.write_all(request.as_bytes())?;
            let mut text = String::new();
            s.read_to_string(&mut text)?;
            Ok(text)
        };
        let text = match &self.netns {
            Some(ns) => sepal_felix::netns::on_thread_in(ns, talk).and_then(|r| r),
            None => talk(),
        }
        .expect("etcd request");
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        serde_json::from_str(body).unwrap_or_else(|_| panic!("etcd {path}: {text}"))
    }

    /// etcd's current revision (the newest resourceVersion the API server can hand out).
    pub fn etcd_revision(&self) -> u64 {
        // A range over a key nobody writes; the header carries the store's revision.
        let v = self.etcd_post("/v3/kv/range", &json!({"key": "AA=="}));
        v["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse().ok())
            .unwrap_or_else(|| panic!("etcd revision: {v}"))
    }

    /// Compacts etcd's history up to now: a watch resuming from an older resourceVersion gets
    /// 410 Gone (where no watch cache answers it from memory).
    pub fn compact_etcd(&self) -> u64 {
        let rev = self.etcd_revision();
        self.etcd_post(
            "/v3/kv/compaction",
            &json!({"revision": rev.to_string(), "physical": true}),
        );
        rev
    }

    /// The agent's audited requests on `resource` with `verb` (list or watch), one per request.
    pub fn agent_calls(&self, verb: &str, resource: &str) -> Vec<String> {
        let mut seen = std::collections::BTreeSet::new();
        self.agent_requests()
            .into_iter()
            .filter(|e| e["verb"] == verb && e["objectRef"]["resource"] == resource)
            .filter(|e| seen.insert(e["auditID"].as_str().unwrap_or_default().to_string()))
            .map(|e| e["requestURI"].as_str().unwrap_or_default().to_string())
            .collect()
    }

    /// Requests that loaded a resource's whole state: lists, and watches with
    /// `sendInitialEvents` (a watch list, how the agent loads Pods and, where the server allows,
    /// everything else).
    pub fn agent_loads(&self, resource: &str) -> Vec<String> {
        let mut loads = self.agent_calls("list", resource);
        loads.extend(
            self.agent_calls("watch", resource)
                .into_iter()
                .filter(|u| u.contains("sendInitialEvents=true")),
        );
        loads
    }

    /// The API server's address, for a relay in front of it.
    pub fn api_addr(&self) -> std::net::SocketAddr {
        self.server()
            .trim_start_matches("https://")
            .parse()
            .expect("server address")
    }

    /// The API server's Prometheus metrics (as admin).
    pub fn metrics(&self) -> String {
        self.kubectl(&["get", "--raw", "/metrics"])
    }
}

/// Whether a Node carries Sepal's condition: NetworkUnavailable=False, reason SepalIsUp.
pub fn sepal_is_up(node: &Value) -> bool {
    node["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| {
            c["type"] == "NetworkUnavailable"
                && c["status"] == "False"
                && c["reason"] == "SepalIsUp"
        })
}

/// Sum of `apiserver_request_total` samples whose labels contain every `label="value"` given.
pub fn request_count(metrics: &str, labels: &[(&str, &str)]) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// A TCP relay in front of the API server that a test can cut: every open connection is
/// closed at once, as a dropped network path or a restarted load balancer would. TLS passes
/// through untouched, so clients talk to the real server through it.
pub struct Cutter {
    pub addr: std::net::SocketAddr,
    conns: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// While set, new connections are closed as soon as they are accepted (an outage).
    held: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Connections closed that way: how hard clients retry during an outage.
    refused: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Cutter {
    /// Listens on 127.0.0.1 (inside `netns`, if given) and relays to `target` there.
    pub fn start(target: std::net::SocketAddr, netns: Option<&Path>) -> Cutter {
        let bind = || std::net::TcpListener::bind("127.0.0.1:0");
        let listener = match netns {
            Some(ns) => sepal_felix::netns::on_thread_in(ns, bind).and_then(|r| r),
            None => bind(),
        }
        .expect("bind relay");
        let addr = listener.local_addr().expect("addr");
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let held = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let refused = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let netns = netns.map(Path::to_path_buf);
        let (c, s, h, r) = (conns.clone(), stop.clone(), held.clone(), refused.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                if h.load(std::sync::atomic::Ordering::Relaxed) {
                    r.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let _ = client.shutdown(std::net::Shutdown::Both);
                    continue;
                }
                let connect = || TcpStream::connect(target);
                let server = match &netns {
                    Some(ns) => sepal_felix::netns::on_thread_in(ns, connect).and_then(|r| r),
                    None => connect(),
                };
                let Ok(server) = server else { continue };
                for (from, to) in [(&client, &server), (&server, &client)] {
                    let (mut r, mut w) =
                        (from.try_clone().expect("dup"), to.try_clone().expect("dup"));
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut r, &mut w);
                        let _ = w.shutdown(std::net::Shutdown::Both);
                    });
                }
                let mut open = c.lock().expect("lock");
                open.push(client);
                open.push(server);
            }
        });
        Cutter {
            addr,
            conns,
            stop,
            held,
            refused,
        }
    }

    /// How many connections were refused while held, so far.
    pub fn refused(&self) -> usize {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Refuses (`true`) or relays again (`false`) new connections.
    pub fn hold(&self, held: bool) {
        self.held.store(held, std::sync::atomic::Ordering::Relaxed);
    }

    /// Resets every connection relayed so far (an abortive close, as a dropped path or a
    /// restarted load balancer gives: a client's idle pooled connections fail at once instead of
    /// looking usable); new ones are relayed again.
    pub fn cut(&self) {
        for s in self.conns.lock().expect("lock").drain(..) {
            crate::reset_on_close(&s);
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Cutter {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.cut();
        let _ = TcpStream::connect(self.addr);
    }
}
