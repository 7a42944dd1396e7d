//! Network namespaces for tests: each one is named after the test process and removed when its
//! guard drops, so a failing test leaves nothing behind and parallel runs never collide.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

static SEQ: AtomicUsize = AtomicUsize::new(0);

/// A network namespace owned by the test; deleted (with everything in it) on drop.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates `s<pid>-<tag>` (a sequence number is added when the tag is reused) with `lo` up.
    /// Names stay within the 15 characters an interface or short netns name wants.
    pub fn new(tag: &str) -> Netns {
        crate::require_root();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = format!("s{}-{}{}", std::process::id(), tag, seq);
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let ns = Netns { name };
        ns.run("ip link set lo up");
        ns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The bind-mount path runtimes pass as CNI_NETNS.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `sh -c CMD` inside the namespace and returns stdout; panics with stderr on failure.
    pub fn run(&self, cmd: &str) -> String {
        match self.try_run(cmd) {
            Ok(out) => out,
            Err(err) => panic!("in netns {}: `{cmd}` failed: {err}", self.name),
        }
    }

    /// Runs `sh -c CMD` inside the namespace: stdout on success, stderr (and stdout) on failure.
    pub fn try_run(&self, cmd: &str) -> Result<String, String> {
        let out = self.output(&["sh", "-c", cmd]);
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!(
                "{} {}",
                String::from_utf8_lossy(&out.stderr).trim(),
                stdout.trim()
            ))
        }
    }

    /// Runs a program inside the namespace and returns its whole output.
    pub fn output(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("run ip netns exec")
    }

    /// Starts a program inside the namespace (stdin closed; stdout and stderr inherited).
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn ip netns exec")
    }

    /// `ip netns exec NAME args…`, to add environment or redirect output before running.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name]).args(args);
        cmd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A veth pair from `a_if` in `a` to `b_if` in `b`, both ends up.
pub fn veth(a: &Netns, a_if: &str, b: &Netns, b_if: &str) {
    let out = Command::new("ip")
        .args([
            "link",
            "add",
            a_if,
            "netns",
            a.name(),
            "type",
            "veth",
            "peer",
            "name",
            b_if,
            "netns",
            b.name(),
        ])
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "veth {a_if}@{} <-> {b_if}@{}: {}",
        a.name(),
        b.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    a.run(&format!("ip link set {a_if} up"));
    b.run(&format!("ip link set {b_if} up"));
}

/// Kills a child started by a test and reaps it; ignores one that already exited.
pub fn kill(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// A plain HTTP/1.0 GET of `path` from `addr` as seen inside the namespace at `netns` (a path
/// under /run/netns): the status code and the body. Only this call's thread enters it.
pub fn http_get(netns: &std::path::Path, addr: &str, path: &str) -> (u16, String) {
    try_http_get(netns, addr, path).unwrap_or_else(|e| panic!("GET {path} from {addr}: {e}"))
}

/// [`http_get`], with a failed connection or read as an error.
pub fn try_http_get(
    netns: &std::path::Path,
    addr: &str,
    path: &str,
) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let get = || -> std::io::Result<(u16, String)> {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((code, body.to_string()))
    };
    sepal_felix::netns::on_thread_in(netns, get)
        .and_then(|r| r)
        .map_err(|e| e.to_string())
}
