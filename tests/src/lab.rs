//! Driving `sepal lab` from end-to-end tests: a lab guard that goes down however the test ends,
//! the operator commands as JSON, and polling helpers.

use crate::bin_path;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub fn sepal(args: &[&str]) -> Output {
    Command::new(bin_path("sepal"))
        .args(args)
        .output()
        .expect("run sepal")
}

/// Runs sepal and returns stdout; panics with stderr on failure.
pub fn sepal_ok(args: &[&str]) -> String {
    let out = sepal(args);
    assert!(
        out.status.success(),
        "sepal {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn sepal_json(args: &[&str]) -> Value {
    let text = sepal_ok(args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("sepal {args:?}: {e}: {text}"))
}

/// A lab that goes down when the test ends, however it ends.
pub struct Lab {
    pub name: String,
}

impl Lab {
    pub fn up(name: &str, topology: Option<&Path>) -> Lab {
        Self::up_with(name, topology, &[])
    }

    /// `lab up` with more flags (e.g. `--datastore kubernetes --kubeconfig FILE`).
    pub fn up_with(name: &str, topology: Option<&Path>, flags: &[&str]) -> Lab {
        let mut args = vec!["lab", "up", "--name", name];
        let path;
        if let Some(t) = topology {
            path = t.display().to_string();
            args.push(&path);
        }
        args.extend(flags);
        // The guard first: a failed `up` removes its half-built lab, and `down` is idempotent.
        let lab = Lab {
            name: name.to_string(),
        };
        sepal_ok(&args);
        lab
    }

    pub fn status(&self) -> Value {
        sepal_json(&["lab", "status", "--name", &self.name, "--json"])
    }

    pub fn ask(&self, what: &str, node: &str) -> Value {
        sepal_json(&[what, "--lab", &self.name, "--node", node, "--json"])
    }

    fn trace_args<'a>(&'a self, from: &'a str, to: &'a str, port: &'a str) -> [&'a str; 10] {
        [
            "trace", "--lab", &self.name, "--from", from, "--to", to, "--port", port, "--json",
        ]
    }

    pub fn trace(&self, from: &str, to: &str, port: &str) -> Value {
        sepal_json(&self.trace_args(from, to, port))
    }

    /// Whether every node on the path answers the trace.
    pub fn try_trace(&self, from: &str, to: &str, port: &str) -> bool {
        sepal(&self.trace_args(from, to, port)).status.success()
    }

    pub fn apply(&self, file: &Path, delete: bool) {
        let verb = if delete { "delete" } else { "apply" };
        sepal_ok(&[
            "lab",
            verb,
            "--name",
            &self.name,
            "-f",
            file.to_str().unwrap(),
        ]);
    }

    /// The pod-to-pod matrix: (from, to) -> reached.
    pub fn ping(&self) -> std::collections::BTreeMap<(String, String), bool> {
        let m = sepal_json(&["lab", "ping", "--name", &self.name, "--json"]);
        m["results"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let s = |k: &str| r[k].as_str().unwrap().to_string();
                ((s("from"), s("to")), r["ok"] == true)
            })
            .collect()
    }

    /// `sepal lab kubectl -- ARGS` on this lab (kubectl as its admin).
    pub fn kubectl(&self, args: &[&str]) -> Output {
        let mut all = vec!["lab", "kubectl", "--name", &self.name, "--"];
        all.extend(args);
        sepal(&all)
    }

    /// `kubectl ARGS -o json` on this lab; panics with kubectl's error.
    pub fn kubectl_json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.kubectl(&all);
        assert!(
            out.status.success(),
            "kubectl {all:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("kubectl {all:?}: {e}"))
    }

    /// The lab's directory.
    pub fn dir(&self) -> PathBuf {
        Path::new("/run/sepal-lab").join(&self.name)
    }

    /// Every process the lab started (agents, routers, API relay, its own control plane's
    /// supervisor), from its saved state.
    pub fn pids(&self) -> Vec<u32> {
        let path = Path::new("/run/sepal-lab")
            .join(&self.name)
            .join("lab.json");
        let state: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mut pids: Vec<u32> = state["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|n| {
                [
                    n["pid"].as_u64(),
                    n["runtimePid"].as_u64().or(n["runtime_pid"].as_u64()),
                ]
            })
            .flatten()
            .map(|p| p as u32)
            .collect();
        for r in state["routers"].as_array().unwrap() {
            pids.extend(
                r["pids"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|p| p.as_u64().unwrap() as u32),
            );
        }
        pids.extend(state["relay_pid"].as_u64().map(|p| p as u32));
        pids.extend(
            state["kubeconfig"]["control_plane"]["pid"]
                .as_u64()
                .map(|p| p as u32),
        );
        pids
    }

    pub fn down(&self) {
        sepal_ok(&["lab", "down", "--name", &self.name]);
    }

    /// Downs the lab and checks it left no process, namespace or host link behind.
    pub fn down_cleanly(&self) {
        let pids = self.pids();
        self.down();
        for p in &pids {
            assert!(!alive(*p), "process {p} survived lab down");
        }
        let left: Vec<String> = netns_list()
            .into_iter()
            .filter(|n| n.starts_with(&self.name))
            .collect();
        assert!(left.is_empty(), "namespaces left: {left:?}");
        let links = String::from_utf8_lossy(
            &Command::new("ip")
                .args(["-o", "link"])
                .output()
                .unwrap()
                .stdout,
        )
        .into_owned();
        assert!(!links.contains(&self.name), "host links left: {links}");
        assert!(!self.dir().exists());
        let dir = format!("{}/", self.dir().display());
        let stray = processes_mentioning(&dir);
        assert!(stray.is_empty(), "processes still using {dir}: {stray:?}");
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = sepal(&["lab", "down", "--name", &self.name]);
    }
}

/// The lab tests' extra pod, `frontend/extra` on node2, with `labels` (YAML flow mapping body).
pub fn extra_pod(labels: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: extra, namespace: frontend, labels: {{{labels}}}}}\n\
         spec: {{nodeName: node2, containers: [{{name: main, image: lab}}]}}\n"
    )
}

pub fn netns_list() -> BTreeSet<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect()
}

/// Every process whose command line holds `text` (e.g. a lab's directory), with that line.
pub fn processes_mentioning(text: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !alive(pid) {
            continue;
        }
        let line = std::fs::read(entry.path().join("cmdline"))
            .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
            .unwrap_or_default();
        if line.contains(text) {
            found.push((pid, line));
        }
    }
    found
}

pub fn alive(pid: u32) -> bool {
    // A zombie is gone for our purposes: it holds no namespace or socket.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// Polls until `check` holds, with the last observed value in the failure message.
pub fn wait_for<T: std::fmt::Debug>(
    what: &str,
    mut probe: impl FnMut() -> T,
    check: impl Fn(&T) -> bool,
) -> T {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let v = probe();
        if check(&v) {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out waiting for {what}; last: {v:?}");
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Runs `sh -c CMD` in namespace `netns`; panics with its output if it fails.
pub fn in_netns(netns: &str, cmd: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "sh", "-c", cmd])
        .output()
        .unwrap();
    assert!(out.status.success(), "{netns}: {cmd}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x.as_str().map(str::to_string))
        .collect()
}

/// A file of the repository (docs/examples, deploy/), from a test.
pub fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

/// GET `path` from `ip:port` inside the network namespace at `netns` (`/run/netns/NAME`, or a
/// real Pod's `/proc/PID/ns/net`), HTTP/1.0 with a 2 s timeout; the body.
pub fn http_get_in(netns: &Path, ip: &str, port: u16, path: &str) -> Result<String, String> {
    use std::io::{Read, Write};
    let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().map_err(|e| format!("{e}"))?;
    sepal_felix::netns::on_thread_in(netns, || -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {ip}\r\n\r\n").as_bytes())?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text
            .split("\r\n\r\n")
            .nth(1)
            .unwrap_or_default()
            .to_string())
    })
    .map_err(|e| e.to_string())?
    .map_err(|e| e.to_string())
}

/// Node `name`'s entry in a `lab status --json`.
pub fn status_node<'a>(status: &'a Value, name: &str) -> &'a Value {
    status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["name"] == name)
        .unwrap_or_else(|| panic!("node {name} not in {status}"))
}

/// An HTTP/1.1 connection kept open across requests, opened inside a network namespace (the
/// socket stays in it): one TCP flow, and one conntrack entry, for as long as it lasts.
pub struct KeepAlive {
    stream: std::net::TcpStream,
}

impl KeepAlive {
    /// Connects to `ip:port` from inside the namespace at `netns`.
    pub fn open(netns: &Path, ip: &str, port: u16) -> Result<KeepAlive, String> {
        let addr: std::net::SocketAddr =
            format!("{ip}:{port}").parse().map_err(|e| format!("{e}"))?;
        let stream = sepal_felix::netns::on_thread_in(netns, || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        stream
            .set_read_timeout(Some(Duration::from_secs(1)))
            .map_err(|e| e.to_string())?;
        Ok(KeepAlive { stream })
    }

    /// GET `path` on this connection; the body (by Content-Length).
    pub fn get(&mut self, path: &str) -> Result<String, String> {
        use std::io::{Read, Write};
        self.stream
            .write_all(format!("GET {path} HTTP/1.1\r\nHost: sepal\r\n\r\n").as_bytes())
            .map_err(|e| e.to_string())?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match self.stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                Ok(_) => return Err("connection closed".into()),
                Err(e) => return Err(e.to_string()),
            }
        }
        let head = String::from_utf8_lossy(&head);
        let length: usize = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())?
            })
            .ok_or("no Content-Length")?;
        let mut body = vec![0u8; length];
        self.stream
            .read_exact(&mut body)
            .map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}
