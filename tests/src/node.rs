//! A Sepal node for tests and benchmarks: a namespace running the real `sepal node` agent with a
//! dir datastore, and the real `sepal-cni` plugin called in it exactly as a container runtime does.

use crate::netns::Netns;
use std::fs;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// One node: its namespace, its agent process and the directories the agent uses.
pub struct Node {
    pub name: String,
    pub netns: Netns,
    pub datastore: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    /// Extra `sepal node` flags for the next start.
    pub agent_args: Vec<String>,
    agent: Option<Child>,
    /// `sepal bfd`, when [`Node::start_bfd_daemon`] started one.
    bfd_daemon: Option<Child>,
    _dir: tempfile::TempDir,
}

impl Node {
    /// Creates the node namespace and writes a Node object with `spec.podCIDRs` into a fresh dir
    /// datastore. The agent is not started yet (see [`Node::start_agent`]).
    pub fn new(name: &str, pod_cidrs: &[&str]) -> Node {
        let netns = Netns::new(name);
        // A node always has an uplink with a default route; proxy ARP for the pods' gateway
        // (169.254.1.1) only answers when the node has a route to it out another interface.
        netns.run(
            "ip link add eth0 type veth peer name uplink0 && ip link set uplink0 up && ip link set eth0 up \
             && ip addr add 10.255.255.2/24 dev eth0 && ip route add default dev eth0",
        );
        let dir = tempfile::Builder::new()
            .prefix("sepal-test-")
            .tempdir()
            .expect("tempdir");
        let datastore = dir.path().join("datastore");
        let state_dir = dir.path().join("state");
        fs::create_dir_all(&datastore).expect("mkdir datastore");
        let cidrs: Vec<String> = pod_cidrs.iter().map(|c| format!("\"{c}\"")).collect();
        fs::write(
            datastore.join(format!("node-{name}.yaml")),
            format!(
                "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec:\n  podCIDR: {first}\n  podCIDRs: [{all}]\n",
                first = cidrs[0],
                all = cidrs.join(", ")
            ),
        )
        .expect("write node");
        let socket = dir.path().join("sepal.sock");
        Node {
            name: name.to_string(),
            netns,
            datastore,
            state_dir,
            socket,
            agent_args: Vec::new(),
            agent: None,
            bfd_daemon: None,
            _dir: dir,
        }
    }

    /// Starts `sepal node` in the namespace and waits until it answers STATUS through the plugin.
    pub fn start_agent(&mut self) {
        self.spawn_agent();
        self.wait_agent_ready();
    }

    /// Starts `sepal node` in the namespace without waiting for it (several nodes start at once).
    pub fn spawn_agent(&mut self) {
        assert!(self.agent.is_none(), "agent already running");
        fs::File::create(self.log_path()).expect("agent log");
        let child = self.agent_command().spawn().expect("start sepal node");
        self.agent = Some(child);
    }

    /// The `sepal node` command of this node, its output appended to the agent log, for a test
    /// that runs (and kills) agent processes itself while other threads call the plugin.
    pub fn agent_command(&self) -> Command {
        self.agent_command_with(&format!("dir:{}", self.datastore.display()))
    }

    /// [`Node::agent_command`] with another `--datastore` (e.g. `kubernetes`).
    pub fn agent_command_with(&self, datastore: &str) -> Command {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("agent log");
        let mut cmd = self.netns.command(&[
            crate::bin_path("sepal").to_str().expect("utf-8 path"),
            "node",
            "--node-name",
            &self.name,
            "--datastore",
            datastore,
            "--state-dir",
            self.state_dir.to_str().expect("utf-8 path"),
            "--socket",
            self.socket.to_str().expect("utf-8 path"),
        ]);
        cmd.args(&self.agent_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log);
        cmd
    }

    /// Where the agents this node starts write their output.
    pub fn log_path(&self) -> PathBuf {
        self.state_dir.with_extension("log")
    }

    /// Waits until the agent answers STATUS through the plugin; panics with its log if it exits.
    pub fn wait_agent_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.cni("STATUS", &CniCall::status()).status.success() {
                return;
            }
            if let Some(status) = self
                .agent
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "sepal node exited with {status}; log:\n{}",
                    self.agent_log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready in 20 s; log:\n{}",
                self.agent_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts `sepal bfd` in the namespace (its log beside the agent's) and points the agent's
    /// next starts at it with `--bfd-socket`; returns once the daemon listens.
    pub fn start_bfd_daemon(&mut self) {
        assert!(self.bfd_daemon.is_none(), "BFD daemon already running");
        let socket = self.socket.with_file_name("bfd.sock");
        let log = fs::File::create(self.state_dir.with_extension("bfd.log")).expect("bfd log");
        let child = self
            .netns
            .command(&[
                crate::bin_path("sepal").to_str().expect("utf-8 path"),
                "bfd",
                "--socket",
                socket.to_str().expect("utf-8 path"),
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("start sepal bfd");
        self.bfd_daemon = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "sepal bfd not listening in 10 s; log:\n{}",
                self.bfd_daemon_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.agent_args.push("--bfd-socket".into());
        self.agent_args
            .push(socket.to_str().expect("utf-8 path").into());
    }

    pub fn bfd_daemon_log(&self) -> String {
        fs::read_to_string(self.state_dir.with_extension("bfd.log")).unwrap_or_default()
    }

    /// The running agent's process id.
    pub fn agent_pid(&self) -> Option<u32> {
        self.agent.as_ref().map(Child::id)
    }

    /// Kills the agent with SIGKILL (no cleanup on its side), as a crash would.
    pub fn kill_agent(&mut self) {
        if let Some(mut child) = self.agent.take() {
            crate::netns::kill(&mut child);
        }
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn stop_agent(&mut self) -> std::process::ExitStatus {
        let mut child = self.agent.take().expect("agent running");
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        child.wait().expect("wait agent")
    }

    pub fn agent_log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// `sepal ARGS` against the agent's operator socket: its stdout; panics if it fails.
    pub fn admin(&self, args: &[&str]) -> String {
        let sock = self.socket.with_file_name("admin.sock");
        let out = Command::new(crate::bin_path("sepal"))
            .args(args)
            .arg("--admin-socket")
            .arg(&sock)
            .output()
            .expect("run sepal");
        assert!(
            out.status.success(),
            "sepal {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `sepal status --json`.
    pub fn status_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.admin(&["status", "--json"])).expect("status JSON")
    }

    /// The network config the runtime would pass for Sepal.
    pub fn cni_config(&self, cni_version: &str) -> String {
        format!(
            r#"{{"cniVersion":"{cni_version}","name":"sepal","type":"sepal-cni","socket":"{}"}}"#,
            self.socket.display()
        )
    }

    /// Calls `sepal-cni` inside the node namespace with the given command and config.
    pub fn cni(&self, command: &str, call: &CniCall) -> Output {
        let mut cmd = Command::new(crate::bin_path("sepal-cni"));
        call.apply(&mut cmd, command);
        run_in_netns(
            cmd,
            &self.netns,
            call.stdin.as_deref().unwrap_or(&self.cni_config("1.1.0")),
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill_agent();
        if let Some(mut d) = self.bfd_daemon.take() {
            crate::netns::kill(&mut d);
        }
    }
}

/// The CNI_* environment of one plugin call.
#[derive(Debug, Clone, Default)]
pub struct CniCall {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub args: String,
    /// Config on stdin; the node's default config when `None`.
    pub stdin: Option<String>,
}

impl CniCall {
    /// A call for pod `namespace/name` in the sandbox `netns`, interface eth0.
    pub fn pod(container_id: &str, netns: &Path, namespace: &str, name: &str) -> CniCall {
        CniCall {
            container_id: container_id.to_string(),
            netns: netns.display().to_string(),
            ifname: "eth0".to_string(),
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"),
            stdin: None,
        }
    }

    pub fn status() -> CniCall {
        CniCall::default()
    }

    pub fn with_config(mut self, config: String) -> CniCall {
        self.stdin = Some(config);
        self
    }

    /// Sets the CNI_* environment (and nothing else but PATH) on `cmd` for `command`.
    pub fn apply(&self, cmd: &mut Command, command: &str) {
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CNI_COMMAND", command)
            .env("CNI_PATH", "/usr/lib/cni");
        for (key, value) in [
            ("CNI_CONTAINERID", &self.container_id),
            ("CNI_NETNS", &self.netns),
            ("CNI_IFNAME", &self.ifname),
            ("CNI_ARGS", &self.args),
        ] {
            if !value.is_empty() {
                cmd.env(key, value);
            }
        }
    }
}

/// Runs `cmd` with `stdin` as input inside `netns`, entering it between fork and exec so the call
/// costs what it costs a runtime already in that namespace (no `ip netns exec` in the way).
pub fn run_in_netns(mut cmd: Command, netns: &Netns, stdin: &str) -> Output {
    let ns_file = fs::File::open(netns.path()).expect("open netns");
    let fd = ns_file.as_raw_fd();
    // SAFETY: setns is async-signal-safe; the fd stays open in the parent until the child execs.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(fd, libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn plugin");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait plugin");
    drop(ns_file);
    out
}
