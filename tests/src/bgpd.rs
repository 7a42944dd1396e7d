//! BGP daemons for tests, each inside a test's network namespace: BIRD 2, FRR bgpd, GoBGP and
//! Sepal's own `sepal-bgpd`. Start with a config, query routes and session state; stopped by PID on drop.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::netns::Netns;

/// Polls `f` every 100 ms until it returns Some or `timeout` passes; panics with `what` then.
pub fn wait_for<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A private directory for a daemon's config, sockets and logs (removed on drop).
fn workdir(tag: &str) -> tempfile::TempDir {
    let d = tempfile::Builder::new()
        .prefix(&format!("sepal-{tag}-"))
        .tempdir()
        .expect("tempdir");
    // FRR drops to user frr and must traverse and write the directory.
    let _ = std::fs::set_permissions(
        d.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    );
    d
}

fn kill_pid(pid: i32) {
    if pid > 0 {
        // SAFETY: plain kill(2) on a PID this helper started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// BIRD 2 with its own control socket.
pub struct Bird {
    ns: String,
    dir: tempfile::TempDir,
    child: Child,
}

impl Bird {
    /// Starts `bird -f` in `ns` with `config` (a full bird.conf).
    pub fn start(ns: &Netns, config: &str) -> Bird {
        let dir = workdir("bird");
        std::fs::write(dir.path().join("bird.conf"), config).expect("write bird.conf");
        let conf = dir.path().join("bird.conf");
        let ctl = dir.path().join("bird.ctl");
        let log = std::fs::File::create(dir.path().join("bird.log")).expect("log");
        let child = ns
            .command(&["bird", "-f", "-c", &s(&conf), "-s", &s(&ctl)])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn bird");
        let b = Bird {
            ns: ns.name().to_string(),
            dir,
            child,
        };
        wait_for(Duration::from_secs(10), "bird control socket", || {
            ctl.exists().then_some(())
        });
        b
    }

    /// Runs a `birdc` command and returns its output.
    pub fn birdc(&self, cmd: &str) -> String {
        let ctl = self.dir.path().join("bird.ctl");
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, "birdc", "-s", &s(&ctl)])
            .args(cmd.split_whitespace())
            .output()
            .expect("birdc");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Whether protocol `name` is Established.
    pub fn established(&self, name: &str) -> bool {
        self.birdc(&format!("show protocols {name}"))
            .contains("Established")
    }

    /// `show route all` for one prefix (empty when absent).
    pub fn route(&self, prefix: &str) -> String {
        let out = self.birdc(&format!("show route for {prefix} all"));
        if out.contains("Network not found") {
            String::new()
        } else {
            out
        }
    }

    /// Number of routes in the master tables.
    pub fn route_count(&self, table: &str) -> usize {
        let out = self.birdc(&format!("show route count table {table}"));
        out.lines()
            .find_map(|l| {
                let l = l.trim();
                l.split_whitespace()
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|_| l.contains("of"))
            })
            .unwrap_or(0)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// BIRD's control socket (unix sockets are not bound to a network namespace).
    pub fn ctl_path(&self) -> PathBuf {
        self.dir.path().join("bird.ctl")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bird.log")).unwrap_or_default()
    }

    /// Kills with SIGKILL (a crash) and reaps.
    pub fn kill9(&mut self) {
        crate::netns::kill(&mut self.child);
    }

    /// The configuration BIRD runs (as last written).
    pub fn config(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bird.conf")).unwrap_or_default()
    }

    /// Replaces the configuration and has BIRD load it (`birdc configure`; protocols whose
    /// settings changed restart); returns birdc's answer.
    pub fn reconfigure(&self, config: &str) -> String {
        std::fs::write(self.dir.path().join("bird.conf"), config).expect("write bird.conf");
        self.birdc("configure")
    }

    /// Starts BIRD again in the same namespace with the same configuration, control socket and
    /// log (appended to), as a router does after a crash ([`Bird::kill9`]); a running BIRD is
    /// killed first. Returns once the new BIRD answers on its control socket.
    pub fn restart(&mut self) {
        crate::netns::kill(&mut self.child);
        let (conf, ctl) = (self.dir.path().join("bird.conf"), self.ctl_path());
        // The dead BIRD's socket file is still there: wait for the new one, not for that.
        let _ = std::fs::remove_file(&ctl);
        let log = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("bird.log"))
            .expect("log");
        self.child = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                "bird",
                "-f",
                "-c",
                &s(&conf),
                "-s",
            ])
            .arg(&ctl)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn bird");
        wait_for(Duration::from_secs(10), "restarted bird", || {
            (ctl.exists() && self.birdc("show status").contains("Daemon is up")).then_some(())
        });
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        crate::netns::kill(&mut self.child);
    }
}

/// FRR bgpd, alone (`-Z`: routes stay in bgpd's RIB, enough for a peer or reflector) or with
/// zebra, which installs bgpd's best routes in the namespace's kernel.
pub struct Frr {
    dir: tempfile::TempDir,
    ns: String,
    /// How it was started, for [`Frr::restart`].
    listen: String,
    zebra: bool,
    /// bfdd runs too (with zebra, through which bgpd asks it for sessions).
    bfd: bool,
}

impl Frr {
    /// Starts bgpd in `ns` listening on `listen` with `config` (bgpd.conf; include
    /// `no bgp ebgp-requires-policy` and `no bgp network import-check`).
    pub fn start(ns: &Netns, listen: &str, config: &str) -> Frr {
        Frr::launch(ns, listen, config, false, false)
    }

    /// As [`Frr::start`], with zebra: learned routes go into the kernel as a router's would.
    pub fn start_with_zebra(ns: &Netns, listen: &str, config: &str) -> Frr {
        Frr::launch(ns, listen, config, true, false)
    }

    /// As [`Frr::start_with_zebra`], with bfdd: `neighbor ... bfd` lines in `config` work.
    pub fn start_with_bfd(ns: &Netns, listen: &str, config: &str) -> Frr {
        Frr::launch(ns, listen, config, true, true)
    }

    fn launch(ns: &Netns, listen: &str, config: &str, zebra: bool, bfd: bool) -> Frr {
        let dir = workdir("frr");
        let conf = dir.path().join("bgpd.conf");
        std::fs::write(&conf, config).expect("write bgpd.conf");
        let chown = std::process::Command::new("chown")
            .args(["-R", "frr:frr", &s(dir.path())])
            .status();
        assert!(chown.is_ok_and(|s| s.success()), "chown frr dir");
        let f = Frr {
            dir,
            ns: ns.name().to_string(),
            listen: listen.to_string(),
            zebra,
            bfd,
        };
        f.spawn_daemons();
        f
    }

    /// Starts zebra (if this FRR has it) and bgpd with the files in the work directory.
    fn spawn_daemons(&self) {
        let (ns, listen, zebra, d) = (&self.ns, self.listen.as_str(), self.zebra, self.dir.path());
        let conf = d.join("bgpd.conf");
        let in_ns = |args: &[&str]| {
            std::process::Command::new("ip")
                .args(["netns", "exec", ns])
                .args(args)
                .output()
                .expect("run ip netns exec")
        };
        if zebra {
            let out = in_ns(&[
                "/usr/lib/frr/zebra",
                "-d",
                "-P",
                "0",
                "-f",
                "/dev/null",
                "-i",
                &s(&d.join("zebra.pid")),
                "-z",
                &s(&d.join("zserv.api")),
                "--vty_socket",
                &s(d),
                "--log",
                &format!("file:{}", s(&d.join("zebra.log"))),
            ]);
            assert!(
                out.status.success(),
                "zebra: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            wait_for(Duration::from_secs(10), "zebra API socket", || {
                d.join("zserv.api").exists().then_some(())
            });
        }
        if self.bfd {
            spawn_bfdd(ns, d, None);
        }
        let (pid, zserv, vty, log) = (
            s(&d.join("bgpd.pid")),
            s(&d.join("zserv.api")),
            s(d),
            format!("file:{}", s(&d.join("bgpd.log"))),
        );
        let mut args = vec!["/usr/lib/frr/bgpd", "-d", "-S", "-P", "0", "-l", listen];
        if !zebra {
            args.push("-Z");
        }
        let conf = s(&conf);
        args.extend([
            "-f",
            &conf,
            "-i",
            &pid,
            "-z",
            &zserv,
            "--vty_socket",
            &vty,
            "--log",
            &log,
        ]);
        let out = in_ns(&args);
        assert!(
            out.status.success(),
            "bgpd: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wait_for(Duration::from_secs(10), "bgpd vty socket", || {
            d.join("bgpd.vty").exists().then_some(())
        });
    }

    /// Kills bgpd and zebra with SIGKILL, as a crash of the router's routing stack: what zebra
    /// installed stays in the kernel. Returns once both are gone (their PID files removed).
    pub fn kill9(&self) {
        let pids: Vec<i32> = ["bgpd.pid", "zebra.pid", "bfdd.pid"]
            .iter()
            .filter_map(|f| read_pid(&self.dir.path().join(f)))
            .collect();
        for pid in &pids {
            kill_pid(*pid);
        }
        // The daemons are not our children (they daemonized): wait until they are no more
        // (or only a zombie, for whoever reaps them).
        wait_for(Duration::from_secs(10), "FRR daemons to die", || {
            pids.iter()
                .all(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/stat"))
                        .map(|st| {
                            st.rsplit_once(')')
                                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
                        })
                        .unwrap_or(true)
                })
                .then_some(())
        });
        // So that nothing (drop included) kills by these PIDs again once they are reused.
        for f in ["bgpd.pid", "zebra.pid", "bfdd.pid"] {
            let _ = std::fs::remove_file(self.dir.path().join(f));
        }
    }

    /// Starts FRR again in the same namespace with the same configuration and directories (logs
    /// appended to), as a router does after a crash ([`Frr::kill9`]); running daemons are
    /// killed first. Returns once bgpd answers on its vty socket.
    pub fn restart(&self) {
        self.kill9();
        // The dead daemons' sockets and PID files are still there: wait for the new ones.
        for f in ["bgpd.vty", "zebra.vty", "bfdd.vty", "zserv.api"] {
            let _ = std::fs::remove_file(self.dir.path().join(f));
        }
        self.spawn_daemons();
    }

    /// Runs configuration commands (`configure terminal`, then `lines` in order), e.g.
    /// `["router bgp 65000", "neighbor 10.0.1.2 shutdown"]`; returns vtysh's output.
    pub fn configure(&self, lines: &[&str]) -> String {
        let out = vtysh(
            &self.ns,
            self.dir.path(),
            "bgpd",
            &configure_terminal(lines),
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    pub fn vtysh(&self, cmd: &str) -> String {
        self.vtysh_daemon("bgpd", cmd)
    }

    /// A vtysh command for one of the daemons (`bgpd`, `zebra`, `bfdd`).
    pub fn vtysh_daemon(&self, daemon: &str, cmd: &str) -> String {
        let out = vtysh(&self.ns, self.dir.path(), daemon, &[cmd]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `show bgp <afi> unicast json` routes object.
    pub fn routes(&self, afi: &str) -> Value {
        let v: Value = serde_json::from_str(&self.vtysh(&format!("show bgp {afi} unicast json")))
            .unwrap_or(Value::Null);
        v.get("routes").cloned().unwrap_or(Value::Null)
    }

    /// BGP state of neighbor `addr` (e.g. "Established").
    pub fn neighbor_state(&self, addr: &str) -> String {
        let v: Value =
            serde_json::from_str(&self.vtysh(&format!("show bgp neighbors {addr} json")))
                .unwrap_or(Value::Null);
        v.get(addr)
            .and_then(|n| n.get("bgpState"))
            .and_then(|s| s.as_str())
            .unwrap_or("")
            .to_string()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bgpd.log")).unwrap_or_default()
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        for daemon in ["bgpd.pid", "zebra.pid", "bfdd.pid"] {
            if let Some(pid) = read_pid(&self.dir.path().join(daemon)) {
                kill_pid(pid);
            }
        }
    }
}

/// Runs vtysh in `ns` against the daemon `daemon` whose sockets are in `dir`, one `-c` per
/// command, in order.
fn vtysh(ns: &str, dir: &Path, daemon: &str, commands: &[&str]) -> std::process::Output {
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", ns, "vtysh", "--vty_socket"])
        .arg(dir)
        .args(["-d", daemon]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    cmd.output().expect("vtysh")
}

/// `configure terminal` followed by `lines`.
fn configure_terminal<'a>(lines: &[&'a str]) -> Vec<&'a str> {
    std::iter::once("configure terminal")
        .chain(lines.iter().copied())
        .collect()
}

/// Starts bfdd in `ns` with its files in `d` (bfdd.conf from `config`, or empty), talking to
/// the zebra of the same directory if there is one; returns once its vty socket is up.
fn spawn_bfdd(ns: &str, d: &Path, config: Option<&str>) {
    let conf = d.join("bfdd.conf");
    if let Some(c) = config {
        std::fs::write(&conf, c).expect("write bfdd.conf");
    } else if !conf.exists() {
        std::fs::write(&conf, "").expect("write bfdd.conf");
    }
    let chown = std::process::Command::new("chown")
        .args(["-R", "frr:frr", &s(d)])
        .status();
    assert!(chown.is_ok_and(|s| s.success()), "chown frr dir");
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", ns, "/usr/lib/frr/bfdd", "-d", "-P", "0"])
        .args(["-f", &s(&conf)])
        .args(["-i", &s(&d.join("bfdd.pid"))])
        .args(["-z", &s(&d.join("zserv.api"))])
        .args(["--bfdctl", &s(&d.join("bfdd.sock"))])
        .args(["--vty_socket", &s(d)])
        .args(["--log", &format!("file:{}", s(&d.join("bfdd.log")))])
        .output()
        .expect("run bfdd");
    assert!(
        out.status.success(),
        "bfdd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(Duration::from_secs(10), "bfdd vty socket", || {
        d.join("bfdd.vty").exists().then_some(())
    });
}

/// FRR's bfdd on its own (no zebra: its peers name their local address), queried with vtysh.
pub struct FrrBfdd {
    dir: tempfile::TempDir,
    ns: String,
}

impl FrrBfdd {
    /// Starts bfdd in `ns` with `config` (bfdd.conf, a `bfd` block with `peer` entries).
    pub fn start(ns: &Netns, config: &str) -> FrrBfdd {
        let dir = workdir("bfdd");
        spawn_bfdd(ns.name(), dir.path(), Some(config));
        FrrBfdd {
            dir,
            ns: ns.name().to_string(),
        }
    }

    pub fn vtysh(&self, cmd: &str) -> String {
        let out = vtysh(&self.ns, self.dir.path(), "bfdd", &[cmd]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs configuration commands (`configure terminal`, then `lines` in order).
    pub fn configure(&self, lines: &[&str]) -> String {
        let out = vtysh(
            &self.ns,
            self.dir.path(),
            "bfdd",
            &configure_terminal(lines),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The `show bfd peers json` entry for `peer`.
    pub fn peer(&self, peer: &str) -> Value {
        let all: Value =
            serde_json::from_str(&self.vtysh("show bfd peers json")).unwrap_or_default();
        all.as_array()
            .and_then(|v| v.iter().find(|p| p["peer"] == peer).cloned())
            .unwrap_or_default()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("bfdd.log")).unwrap_or_default()
    }
}

impl Drop for FrrBfdd {
    fn drop(&mut self) {
        if let Some(pid) = read_pid(&self.dir.path().join("bfdd.pid")) {
            kill_pid(pid);
        }
    }
}

/// GoBGP; its gRPC API listens on the namespace's own 127.0.0.1:50051.
pub struct Gobgp {
    ns: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Gobgp {
    pub fn start(ns: &Netns, toml: &str) -> Gobgp {
        let dir = workdir("gobgp");
        let conf = dir.path().join("gobgpd.toml");
        std::fs::write(&conf, toml).expect("write gobgpd.toml");
        let log = std::fs::File::create(dir.path().join("gobgpd.log")).expect("log");
        let child = ns
            .command(&[
                "gobgpd",
                "-f",
                &s(&conf),
                "--pprof-disable",
                "-p",
                "--api-hosts",
                "127.0.0.1:50051",
            ])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn gobgpd");
        let g = Gobgp {
            ns: ns.name().to_string(),
            child,
            _dir: dir,
        };
        wait_for(Duration::from_secs(10), "gobgpd API", || {
            g.try_cli(&["global"]).ok()
        });
        g
    }

    fn try_cli(&self, args: &[&str]) -> Result<String, String> {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &self.ns, "gobgp"])
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// gobgpd's own log (session changes and their reasons).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("gobgpd.log")).unwrap_or_default()
    }

    /// Runs the `gobgp` CLI; panics on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        self.try_cli(args)
            .unwrap_or_else(|e| panic!("gobgp {args:?}: {e}"))
    }

    /// `gobgp -j global rib -a <family>` as JSON (object keyed by prefix).
    pub fn rib(&self, family: &str) -> Value {
        serde_json::from_str(&self.cli(&["-j", "global", "rib", "-a", family]))
            .unwrap_or(Value::Null)
    }

    /// Session state of a neighbor ("established", "active", ...).
    pub fn neighbor_state(&self, addr: &str) -> String {
        let v: Value =
            serde_json::from_str(&self.try_cli(&["-j", "neighbor", addr]).unwrap_or_default())
                .unwrap_or(Value::Null);
        let st = &v["state"]["session_state"];
        match st.as_u64() {
            Some(6) => "established".into(),
            Some(n) => format!("state{n}"),
            None => st.as_str().unwrap_or("").to_string(),
        }
    }
}

impl Drop for Gobgp {
    fn drop(&mut self) {
        crate::netns::kill(&mut self.child);
    }
}

/// One of Sepal's test processes (`sepal-bgpd`, `sepal-bfdd`) in a namespace, driven by JSON
/// lines: one command per line on stdin, one reply per line on stdout. Killed on drop.
struct JsonLines {
    name: &'static str,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl JsonLines {
    fn spawn(ns: &Netns, name: &'static str) -> JsonLines {
        let bin = crate::bin_path(name);
        let mut child = ns
            .command(&[&s(&bin)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        JsonLines {
            name,
            child,
            stdin,
            stdout,
        }
    }

    /// Sends one command object and returns the reply; panics on an error reply.
    fn cmd(&mut self, cmd: Value) -> Value {
        let name = self.name;
        writeln!(self.stdin, "{cmd}").unwrap_or_else(|e| panic!("write to {name}: {e}"));
        self.stdin.flush().expect("flush");
        let mut line = String::new();
        self.stdout
            .read_line(&mut line)
            .unwrap_or_else(|e| panic!("read from {name}: {e}"));
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("{name} reply {line:?}: {e}"));
        if let Some(e) = v.get("error") {
            panic!("{name}: {cmd}: {e}");
        }
        v
    }
}

impl Drop for JsonLines {
    fn drop(&mut self) {
        crate::netns::kill(&mut self.child);
    }
}

/// Sepal's speaker (`sepal-bgpd`) driven over stdin/stdout JSON lines.
pub struct SepalBgpd {
    proc: JsonLines,
}

impl SepalBgpd {
    /// Starts the process in `ns` and sends `start` (fields of the `start` command).
    pub fn start(ns: &Netns, start: Value) -> SepalBgpd {
        let mut d = SepalBgpd {
            proc: JsonLines::spawn(ns, "sepal-bgpd"),
        };
        let mut cmd = start;
        cmd["cmd"] = "start".into();
        d.cmd(cmd);
        d
    }

    /// Sends one command object and returns the reply; panics on an error reply.
    pub fn cmd(&mut self, cmd: Value) -> Value {
        self.proc.cmd(cmd)
    }

    pub fn peer(&mut self, mut p: Value) {
        p["cmd"] = "peer".into();
        self.cmd(p);
    }

    pub fn announce(&mut self, prefix: &str) {
        self.cmd(serde_json::json!({"cmd": "announce", "prefix": prefix}));
    }

    pub fn withdraw(&mut self, prefix: &str) {
        self.cmd(serde_json::json!({"cmd": "withdraw", "prefix": prefix}));
    }

    /// Loc-RIB: list of {prefix, next_hops, source, attrs}.
    pub fn routes(&mut self) -> Vec<Value> {
        self.cmd(serde_json::json!({"cmd": "routes"}))["routes"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn route(&mut self, prefix: &str) -> Option<Value> {
        self.routes().into_iter().find(|r| r["prefix"] == prefix)
    }

    pub fn count(&mut self) -> usize {
        self.cmd(serde_json::json!({"cmd": "count"}))["count"]
            .as_u64()
            .unwrap_or(0) as usize
    }

    /// Per-peer status objects (state, counters, last NOTIFICATION...).
    pub fn peers(&mut self) -> Vec<Value> {
        self.cmd(serde_json::json!({"cmd": "peers"}))["peers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn peer_state(&mut self, addr: &str) -> String {
        self.peers()
            .into_iter()
            .find(|p| p["address"] == addr)
            .and_then(|p| p["state"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.proc.child.id()
    }

    /// SIGKILL, as a crash (graceful restart tests).
    pub fn kill9(&mut self) {
        crate::netns::kill(&mut self.proc.child);
    }
}

/// Sepal's BFD (`sepal-bfdd`) driven over stdin/stdout JSON lines.
pub struct SepalBfdd {
    proc: JsonLines,
}

impl SepalBfdd {
    /// Starts the process in `ns`; `control_plane_independent` is its C bit.
    pub fn start(ns: &Netns, control_plane_independent: bool) -> SepalBfdd {
        let mut d = SepalBfdd {
            proc: JsonLines::spawn(ns, "sepal-bfdd"),
        };
        d.proc.cmd(serde_json::json!({"cmd": "start",
            "control_plane_independent": control_plane_independent}));
        d
    }

    /// Adds a session (fields of the `peer` command: address, local, min_tx_ms, ...).
    pub fn peer(&mut self, mut p: Value) {
        p["cmd"] = "peer".into();
        self.proc.cmd(p);
    }

    pub fn admin_down(&mut self, addr: &str, down: bool) {
        self.proc
            .cmd(serde_json::json!({"cmd": "admin_down", "address": addr, "down": down}));
    }

    /// The session with `addr`, as the library's status object (state, diag, intervals...).
    pub fn session(&mut self, addr: &str) -> Option<Value> {
        let all = self.proc.cmd(serde_json::json!({"cmd": "sessions"}));
        all.as_array()?.iter().find(|s| s["peer"] == addr).cloned()
    }

    pub fn state(&mut self, addr: &str) -> String {
        self.session(addr)
            .and_then(|s| s["state"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    /// SIGKILL, as a crash.
    pub fn kill9(&mut self) {
        crate::netns::kill(&mut self.proc.child);
    }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}
