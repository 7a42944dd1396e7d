//! What a node has on the host besides its directory: its cgroup in every hierarchy (made before
//! kubelet starts, which wants it there), and the teardown of everything else it leaves: the
//! Pods' processes (found in the node's cgroups), containerd's shims (their PIDs in containerd's
//! state), the mounts containerd and kubelet made under the node's directory, the cgroups, and
//! kubelet's links in /var/log/containers.

use super::NodeLayout;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The mount points in this mount namespace, decoded (`\040` and friends), with their types.
fn mounts() -> Vec<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            let point = unescape(fields.get(4)?);
            let fstype = fields.get(dash + 1)?.to_string();
            Some((PathBuf::from(point), fstype))
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The node's cgroup in each mounted hierarchy (v1 controllers, the named systemd one, v2).
fn cgroup_dirs(cgroup: &str) -> Vec<PathBuf> {
    let rel = cgroup.trim_start_matches('/');
    mounts()
        .into_iter()
        .filter(|(_, t)| t == "cgroup" || t == "cgroup2")
        .map(|(p, _)| p.join(rel))
        .filter(|p| p.is_dir())
        .collect()
}

/// Makes the node's cgroup, and its parents, in every mounted hierarchy: kubelet refuses a
/// `cgroupRoot` missing in any of them. A new cpuset cgroup starts with no CPUs and no memory
/// nodes (cgroup v1), so each level gets its parent's.
pub fn create_cgroups(cgroup: &str) -> anyhow::Result<()> {
    use anyhow::Context;
    for (mount, fstype) in mounts() {
        if fstype != "cgroup" && fstype != "cgroup2" {
            continue;
        }
        let mut dir = mount.clone();
        for part in cgroup.trim_start_matches('/').split('/') {
            let parent = dir.clone();
            dir = dir.join(part);
            // A lab's nodes start together and share the lab's level: another may make it
            // first, and may not have given it its cpuset yet, so an empty one is filled in here.
            match std::fs::create_dir(&dir) {
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                other => other.with_context(|| format!("create cgroup {}", dir.display()))?,
            }
            for f in ["cpuset.cpus", "cpuset.mems"] {
                let own = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
                if let (Ok(v), true) = (
                    std::fs::read_to_string(parent.join(f)),
                    own.trim().is_empty(),
                ) {
                    std::fs::write(dir.join(f), v.trim())
                        .with_context(|| format!("write {}", dir.join(f).display()))?;
                }
            }
        }
    }
    Ok(())
}

/// Every directory under `dir` (itself included), deepest first.
fn tree(dir: &Path) -> Vec<PathBuf> {
    let mut all = vec![dir.to_path_buf()];
    let mut i = 0;
    while i < all.len() {
        if let Ok(rd) = std::fs::read_dir(&all[i]) {
            for e in rd.flatten() {
                if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                    all.push(e.path());
                }
            }
        }
        i += 1;
    }
    all.reverse();
    all
}

fn pids_in(dirs: &[PathBuf]) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut pids: Vec<i32> = dirs
        .iter()
        .flat_map(|d| tree(d))
        .filter_map(|d| std::fs::read_to_string(d.join("cgroup.procs")).ok())
        .flat_map(|t| {
            t.lines()
                .filter_map(|l| l.trim().parse().ok())
                .collect::<Vec<i32>>()
        })
        .filter(|p| *p != me)
        .collect();
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// SIGKILLs every process in the node's cgroups (the Pods' containers) until none is left.
pub async fn kill_cgroup_processes(cgroup: &str) {
    let dirs = cgroup_dirs(cgroup);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pids = pids_in(&dirs);
        if pids.is_empty() || Instant::now() > deadline {
            if !pids.is_empty() {
                tracing::warn!(?pids, cgroup, "processes survived SIGKILL");
            }
            return;
        }
        for p in pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(p),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// containerd's shims outlive containerd by design (a restarted containerd adopts them), and a
/// shim whose tasks are gone may still be waiting for containerd's word to exit. They are found
/// by their command line, which names this node's containerd socket, and SIGKILLed; each one's
/// socket, which containerd puts in the host's /run/containerd/s (named by a hash of containerd's
/// socket, the namespace and the shim's ID), is removed.
pub async fn kill_shims(l: &NodeLayout) {
    let address = l.containerd_socket().display().to_string();
    let mut killed = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let arg = |flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .and_then(|i| args.get(i + 1))
                .cloned()
        };
        let is_shim = args
            .first()
            .is_some_and(|a| a.ends_with("containerd-shim-runc-v2"));
        if !is_shim || arg("-address").as_deref() != Some(address.as_str()) {
            continue;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
        killed.push(pid);
        if let (Some(ns), Some(id)) = (arg("-namespace"), arg("-id")) {
            let _ = std::fs::remove_file(shim_socket(&address, &ns, &id));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while killed
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}")).exists())
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Empty once no node's shim runs (rmdir fails otherwise, as it should).
    let _ = std::fs::remove_dir("/run/containerd/s");
    let _ = std::fs::remove_dir("/run/containerd");
}

/// Where containerd 2 puts a shim's socket: /run/containerd/s/hex(sha256(ADDRESS/NS/ID)).
fn shim_socket(address: &str, namespace: &str, id: &str) -> PathBuf {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("{address}/{namespace}/{id}").as_bytes());
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    Path::new("/run/containerd/s").join(hex)
}

/// Unmounts (lazily) every mount under `dir`, deepest first: containers' root filesystems and
/// shm, Pod network namespaces, kubelet's volume tmpfs.
pub fn unmount_under(dir: &Path) {
    for _ in 0..5 {
        let mut under: Vec<PathBuf> = mounts()
            .into_iter()
            .map(|(p, _)| p)
            .filter(|p| p.starts_with(dir))
            .collect();
        if under.is_empty() {
            return;
        }
        under.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        for p in under {
            if let Err(e) = nix::mount::umount2(&p, nix::mount::MntFlags::MNT_DETACH) {
                tracing::debug!(path = %p.display(), %e, "umount");
            }
        }
    }
}

/// Removes the node's cgroup tree in every hierarchy (retrying while the last processes exit),
/// then its parents when they are empty.
pub async fn remove_cgroups(cgroup: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<PathBuf> = cgroup_dirs(cgroup)
            .iter()
            .flat_map(|d| tree(d))
            .filter(|d| std::fs::remove_dir(d).is_err())
            .collect();
        if left.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            tracing::warn!(?left, "cgroups not removed");
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // /sepal/LAB and /sepal, if no other node is in them.
    let mut parent = Path::new(cgroup).parent();
    while let Some(p) = parent {
        if p == Path::new("/") {
            break;
        }
        for d in cgroup_dirs(&p.display().to_string()) {
            let _ = std::fs::remove_dir(d);
        }
        parent = p.parent();
    }
}

/// kubelet links every container's log into /var/log/containers (a fixed path); remove the
/// links that point into this node's Pod log directory.
pub fn remove_log_links(pod_logs: &Path) {
    for e in std::fs::read_dir("/var/log/containers")
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(target) = std::fs::read_link(e.path()) {
            if target.starts_with(pod_logs) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    // kubelet made the folder; gone once no node (nor the host's own kubelet) has a link there.
    let _ = std::fs::remove_dir("/var/log/containers");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shim_sockets_are_named_as_containerd_names_them() {
        // Read off a running containerd 2.3 shim and the socket it made.
        assert_eq!(
            shim_socket(
                "/tmp/np/node1/containerd/containerd.sock",
                "k8s.io",
                "c464972291f11e28315a901ce1f03000bd766524225c43e754d67861f8a755fd"
            ),
            Path::new(
                "/run/containerd/s/61b970698938cfc1b38aec95d1dd36169ef648763ca19e20f5a1f9436b6924e7"
            )
        );
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape(r"/tmp/a\040b"), "/tmp/a b");
        assert_eq!(unescape("/plain"), "/plain");
    }

    #[test]
    fn trees_list_children_before_parents() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("a/b")).unwrap();
        let t = tree(d.path());
        assert_eq!(t.last().unwrap(), d.path());
        let ia = t.iter().position(|p| p.ends_with("a")).unwrap();
        let ib = t.iter().position(|p| p.ends_with("b")).unwrap();
        assert!(ib < ia);
    }
}
