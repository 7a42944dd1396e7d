//! `sepal lab kubectl -- ARGS…`: kubectl against the lab's API server with the lab's admin
//! kubeconfig and a discovery cache in the lab's directory, so none of this machine's own
//! kubeconfigs or caches is read or written.

use super::control_plane;
use super::state::LabState;
use anyhow::{Context, Result};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;

/// Replaces this process with kubectl: its output and exit code are the command's.
pub fn exec(lab: &LabState, args: &[String]) -> Result<()> {
    let mut cmd = command(lab)?;
    let err = cmd.args(args).exec();
    Err(err).with_context(|| {
        format!(
            "run {} (scripts/kube-build builds it)",
            cmd.get_program().to_string_lossy()
        )
    })
}

/// kubectl with the lab's admin kubeconfig and discovery cache, to add arguments to.
pub fn command(lab: &LabState) -> Result<std::process::Command> {
    let api = lab.kubeconfig.as_ref().with_context(|| {
        format!(
            "lab {} keeps its objects in a directory: there is no API server for kubectl \
             (`sepal lab up --kubernetes` runs one)",
            lab.name
        )
    })?;
    let kubectl = match &api.control_plane {
        // The one built with the control plane, so client and server match.
        Some(cp) => cp.bin_dir.join("kubectl"),
        None => beside_the_control_plane().unwrap_or_else(|| "kubectl".into()),
    };
    let mut cmd = std::process::Command::new(kubectl);
    cmd.arg("--kubeconfig")
        .arg(&api.admin_kubeconfig)
        .arg("--cache-dir")
        .arg(lab.dir().join("kubectl-cache"));
    Ok(cmd)
}

/// scripts/kube-build's kubectl, when it has run (for a lab on someone else's API server).
fn beside_the_control_plane() -> Option<PathBuf> {
    let env = std::env::var_os("SEPAL_KUBE_BIN").map(PathBuf::from);
    let kubectl = control_plane::bin_dir(env.as_deref()).ok()?.join("kubectl");
    kubectl.is_file().then_some(kubectl)
}
