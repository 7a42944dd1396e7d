//! The lab's namespace plumbing, done with iproute2 as an operator would by hand: namespaces,
//! veth links between them, addresses and routes, and commands run inside a namespace.

use anyhow::{bail, Context, Result};
use std::process::{Command, Output, Stdio};

/// Runs `ip ARGS…` in the host namespace.
pub fn ip(args: &[&str]) -> Result<String> {
    checked(
        Command::new("ip").args(args).output(),
        &format!("ip {}", args.join(" ")),
    )
}

/// Runs `sh -c CMD` inside namespace `ns`.
pub fn sh(ns: &str, cmd: &str) -> Result<String> {
    checked(
        command_in(ns, &["sh", "-c", cmd]).output(),
        &format!("in {ns}: {cmd}"),
    )
}

fn checked(out: std::io::Result<Output>, what: &str) -> Result<String> {
    let out = out.with_context(|| format!("{what}: cannot run"))?;
    if !out.status.success() {
        bail!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn netns_exists(ns: &str) -> bool {
    std::path::Path::new("/run/netns").join(ns).exists()
}

/// Creates namespace `ns` with loopback up and forwarding on (a node or a router). Links made
/// in it skip IPv6 duplicate address detection: a lab link's addresses are unique by
/// construction, and a tentative link-local address would lose the first IPv6 packets.
pub fn add_netns(ns: &str, forwarding: bool) -> Result<()> {
    ip(&["netns", "add", ns])?;
    sh(
        ns,
        "ip link set lo up && sysctl -qw net.ipv6.conf.default.accept_dad=0 net.ipv6.conf.all.accept_dad=0",
    )?;
    if forwarding {
        sh(
            ns,
            "sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1",
        )?;
    }
    Ok(())
}

/// Deletes namespace `ns` if it exists; everything inside (veths, routes, tables) goes with it.
pub fn del_netns(ns: &str) {
    if netns_exists(ns) {
        let _ = ip(&["netns", "del", ns]);
    }
}

/// A veth pair between two namespaces, created directly in them (never in the host namespace).
pub fn veth(a_ns: &str, a_if: &str, b_ns: &str, b_if: &str) -> Result<()> {
    ip(&[
        "link", "add", a_if, "netns", a_ns, "type", "veth", "peer", "name", b_if, "netns", b_ns,
    ])?;
    sh(a_ns, &format!("ip link set {a_if} up"))?;
    sh(b_ns, &format!("ip link set {b_if} up"))?;
    Ok(())
}

/// `ip netns exec NS ARGS…` as a command to adjust before running. A namespace given as a path
/// (a real Pod's, /proc/PID/ns/net) is entered with nsenter instead.
pub fn command_in(ns: &str, args: &[&str]) -> Command {
    if ns.starts_with('/') {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={ns}")).arg("--").args(args);
        return cmd;
    }
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).args(args);
    cmd
}

/// Starts a long-running program detached in `ns` (own session, output to `log`), returns its PID.
pub fn spawn_daemon(ns: &str, args: &[&str], log: &std::path::Path) -> Result<u32> {
    let file = std::fs::File::create(log).with_context(|| format!("create {}", log.display()))?;
    spawn_daemon_to(ns, args, file)
}

/// [`spawn_daemon`] with its output to an open file.
pub fn spawn_daemon_to(ns: &str, args: &[&str], file: std::fs::File) -> Result<u32> {
    let mut cmd = command_in(ns, &["setsid"]);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file);
    let child = cmd
        .spawn()
        .with_context(|| format!("start {}", args.join(" ")))?;
    Ok(child.id())
}

/// Global addresses (`addr/len`) on the namespace's interfaces matching `keep`.
pub fn addresses(ns: &str, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let Ok(text) = sh(ns, "ip -j addr show") else {
        return Vec::new();
    };
    let Ok(links) = serde_json::from_str::<Vec<serde_json::Value>>(&text) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for link in links {
        let name = link["ifname"].as_str().unwrap_or_default();
        if !keep(name) {
            continue;
        }
        for addr in link["addr_info"].as_array().into_iter().flatten() {
            if addr["scope"] == "global" {
                if let (Some(a), Some(len)) = (addr["local"].as_str(), addr["prefixlen"].as_u64()) {
                    out.push(format!("{a}/{len}"));
                }
            }
        }
    }
    out
}

/// Whether a process we started is still alive.
pub fn alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// SIGTERM, then SIGKILL after a grace period, to a process the lab started.
pub fn stop(pid: u32) {
    let pid_t = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(pid_t, nix::sys::signal::Signal::SIGTERM);
    for _ in 0..40 {
        if !alive(pid) || is_zombie(pid) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = nix::sys::signal::kill(pid_t, nix::sys::signal::Signal::SIGKILL);
}

/// Whether the process has exited but not been reaped (or is gone).
pub fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// Makes room for `more` neighbour (ARP and NDP) entries on top of those in use: the kernel
/// keeps every namespace's entries in one table per family, limited by the initial namespace's
/// `gc_thresh3` (1024 by default), and drops packets to a neighbour it cannot add. Raises the
/// thresholds, never lowers them, and says so.
pub fn ensure_neighbour_room(more: usize) -> Result<()> {
    for (family, stat) in [("ipv4", "arp_cache"), ("ipv6", "ndisc_cache")] {
        let in_use = std::fs::read_to_string(format!("/proc/net/stat/{stat}"))
            .ok()
            .and_then(|t| {
                let line = t.lines().nth(1)?.split_whitespace().next()?.to_string();
                usize::from_str_radix(&line, 16).ok()
            })
            .unwrap_or(0);
        let need = in_use + more;
        let key = |n: u8| format!("/proc/sys/net/{family}/neigh/default/gc_thresh{n}");
        let read = |n: u8| -> Result<usize> {
            let path = key(n);
            let text = std::fs::read_to_string(&path).with_context(|| format!("read {path}"))?;
            Ok(text.trim().parse()?)
        };
        let hard = read(3)?;
        if hard >= need * 2 {
            continue;
        }
        // Past gc_thresh2 the kernel collects entries within seconds; keep the lab below it.
        let (soft, hard_new) = (read(2)?.max(need * 2), need * 4);
        eprintln!(
            "lab: raising net.{family}.neigh.default.gc_thresh2/3 to {soft}/{hard_new} (from \
             {}/{hard}): the lab needs about {more} neighbour entries, and every namespace's \
             count against the host's one limit",
            read(2)?
        );
        std::fs::write(key(2), soft.to_string()).with_context(|| format!("write {}", key(2)))?;
        std::fs::write(key(3), hard_new.to_string())
            .with_context(|| format!("write {}", key(3)))?;
    }
    Ok(())
}
