//! One node's containerd: its config (its own root, state, socket, CNI directories, the pause
//! image pinned as the sandbox image), and the image imports into the `k8s.io` namespace the
//! CRI plugin serves kubelet from.

use super::NodeLayout;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::process::Command;

/// The containerd config (format version 3, containerd 2.x). Every path is under the node's
/// directory, except the shims' sockets: containerd puts those in /run/containerd/s under a
/// hash of its own socket's path, so nodes never share one.
pub fn config(l: &NodeLayout, pause_image: &str) -> String {
    let p = |p: &Path| p.display().to_string();
    format!(
        r#"version = 3
root = "{root}"
state = "{state}"
# Not needed in the lab: NRI's socket and the optional snapshotters would live outside the node.
disabled_plugins = [
  "io.containerd.nri.v1.nri",
  "io.containerd.snapshotter.v1.erofs",
  "io.containerd.snapshotter.v1.blockfile",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.btrfs",
]

[grpc]
  address = "{sock}"

[ttrpc]
  address = "{sock}.ttrpc"

[debug]
  level = "info"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.cri.v1.images"]
  snapshotter = "overlayfs"
  # Pinned: kubelet's image garbage collection never removes the sandbox image.
  [plugins."io.containerd.cri.v1.images".pinned_images]
    sandbox = "{pause_image}"

[plugins."io.containerd.cri.v1.runtime"]
  # Without CAP_SYS_RESOURCE (the lab machines have none) no process may lower its
  # oom_score_adj, and runc fails the pause container's -998 ("can't get final child's PID from
  # pipe"); restricted, no container gets a score below containerd's own.
  restrict_oom_score_adj = true
  # Pod network namespaces in /run/netns, which the node's mount namespace binds to its own
  # directory (mount_ns.rs): the agent's container sees them there, as on a real node.
  netns_mounts_under_state_dir = false
  [plugins."io.containerd.cri.v1.runtime".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.cri.v1.runtime".containerd.runtimes.runc.options]
        BinaryName = "{runc}"
        # runc's own state, by default in the host's /run/containerd/runc.
        Root = "{runc_root}"
        SystemdCgroup = false
  [plugins."io.containerd.cri.v1.runtime".cni]
    bin_dirs = ["{cni_bin}"]
    conf_dir = "{cni_conf}"
    max_conf_num = 1
    # Loopback up by containerd itself: a node where only the network's own plugin is
    # installed (Sepal's install-cni puts sepal-cni alone in /opt/cni/bin) has no loopback plugin.
    use_internal_loopback = true

[plugins."io.containerd.grpc.v1.cri"]
  # kubectl exec/attach/port-forward streams, on the node's loopback.
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
"#,
        root = p(&l.containerd_root()),
        state = p(&l.containerd_state()),
        sock = p(&l.containerd_socket()),
        opt = p(&l.dir.join("containerd").join("opt")),
        runc = super::RUNC,
        runc_root = p(&l.containerd_state().join("runc")),
        cni_bin = p(&l.cni_bin()),
        cni_conf = p(&l.cni_conf()),
    )
}

/// `ctr` against this node's containerd.
pub fn ctr(bin: &Path, l: &NodeLayout, args: &[&str]) -> Result<String> {
    let out = Command::new(bin.join("ctr"))
        .arg("--address")
        .arg(l.containerd_socket())
        .args(args)
        .output()
        .context("run ctr")?;
    if !out.status.success() {
        bail!(
            "ctr {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Imports an OCI archive into the namespace CRI serves (`k8s.io`), unpacked for the node's
/// snapshotter so the first Pod does not wait for it.
pub fn import(bin: &Path, l: &NodeLayout, archive: &Path) -> Result<()> {
    let archive = archive.display().to_string();
    ctr(
        bin,
        l,
        &[
            "-n",
            "k8s.io",
            "images",
            "import",
            "--snapshotter",
            "overlayfs",
            "--local",
            &archive,
        ],
    )
    .map(|_| ())
    .with_context(|| format!("import {archive}"))
}

/// Whether containerd answers on its socket with its CRI plugin loaded (`ok`; an `error` there
/// is in containerd's log, and kubelet would never see a runtime).
pub fn cri_ready(bin: &Path, l: &NodeLayout) -> Result<()> {
    let plugins = ctr(bin, l, &["plugins", "ls"])?;
    let cri = plugins
        .lines()
        .find(|l| {
            l.starts_with("io.containerd.grpc.v1") && l.split_whitespace().nth(1) == Some("cri")
        })
        .context("no CRI plugin listed")?;
    if !cri.trim_end().ends_with("ok") {
        bail!("the CRI plugin is not ok: {cri}");
    }
    Ok(())
}
