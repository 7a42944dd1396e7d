//! The node's own view of the host paths a cluster's DaemonSets use. A real node has one
//! /etc/cni/net.d, one /opt/cni/bin, one /run/sepal; lab nodes share a host, so each node's
//! supervisor runs (with its containerd, shims, containers and kubelet) in a mount namespace of its
//! own where those paths are bind mounts of the node's directories. A hostPath volume then means
//! the node's directory, as `kubectl apply -f deploy/` expects, and nothing is written to the
//! host's own /etc/cni or /opt/cni.
//!
//! Propagation: the namespace is a slave of the host's (the host's later mounts, e.g. another
//! lab's namespaces, still show up) and none of its mounts reach the host. Its /run/netns is
//! shared within the namespace, so the Pod network namespaces containerd mounts there reach the
//! agent's container, which mounts it with HostToContainer propagation. When the last process in
//! it exits, the namespace and every mount in it are gone.

use anyhow::{Context, Result};
use nix::mount::{mount, MsFlags};
use std::path::Path;

/// (host path, the node's directory under its own folder) for every path bound.
pub const HOST_PATHS: &[(&str, &str)] = &[
    ("/etc/cni/net.d", "cni/net.d"),
    ("/opt/cni/bin", "cni/bin"),
    ("/run/netns", "netns"),
    ("/run/sepal", "run/sepal"),
    ("/var/lib/sepal", "var/lib/sepal"),
    ("/var/log/containers", "log/containers"),
];

/// Gives the node a UTS namespace of its own with the node's name as its host name: a real node's
/// hostname is its node name, which hostNetwork Pods see (and upstream's e2e tests compare).
pub fn set_hostname(name: &str) -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUTS)
        .context("unshare a UTS namespace for the node")?;
    nix::unistd::sethostname(name).with_context(|| format!("set the host name {name}"))
}

/// Moves this process into a new mount namespace with the node's directories bound over
/// [`HOST_PATHS`]. Must run before any thread is started (unshare of a mount namespace needs a
/// process whose filesystem context no other thread shares).
///
/// A host path that does not exist is created as an empty mount point: the bind needs one. Its
/// content on the host is never read or written.
pub fn enter(node_dir: &Path) -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
        .context("unshare a mount namespace for the node")?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .context("make the node's mount namespace a slave of the host's")?;
    for (host, own) in HOST_PATHS {
        let source = node_dir.join(own);
        std::fs::create_dir_all(&source).with_context(|| format!("create {}", source.display()))?;
        std::fs::create_dir_all(host).with_context(|| format!("create mount point {host}"))?;
        mount(
            Some(&source),
            *host,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .with_context(|| format!("bind {} on {host}", source.display()))?;
    }
    mount(
        None::<&str>,
        "/run/netns",
        None::<&str>,
        MsFlags::MS_SHARED,
        None::<&str>,
    )
    .context("make the node's /run/netns shared")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_host_path_is_a_directory_of_the_node() {
        for (host, own) in HOST_PATHS {
            assert!(
                host.starts_with('/') && !own.starts_with('/'),
                "{host} {own}"
            );
        }
    }
}
