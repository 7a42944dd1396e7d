//! Running the kernel's command-line tools (`nft`, `conntrack`), optionally inside another
//! network namespace.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("cannot run {0}: {1}")]
    Spawn(String, std::io::Error),
    #[error("{program} failed: {stderr}")]
    Failed { program: String, stderr: String },
}

/// Runs `command` (program and leading arguments) with `args`, feeding `stdin`, inside the
/// network namespace at `netns` (a /run/netns path) or the caller's; returns stdout.
pub fn run(
    command: &[String],
    netns: Option<&Path>,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, ExecError> {
    let (prog, pre) = command
        .split_first()
        .ok_or_else(|| ExecError::Spawn("(none)".into(), std::io::Error::other("empty command")))?;
    let Some(path) = netns else {
        return finish(prog, pre, args, stdin);
    };
    // The tool runs from a short-lived thread that entered the namespace: a child inherits its
    // creating thread's namespaces, and without a pre-exec hook std can spawn the cheap way
    // (no copy of a large agent's page tables).
    crate::netns::on_thread_in(path, || finish(prog, pre, args, stdin))
        .map_err(|e| ExecError::Spawn(format!("netns {}", path.display()), e))?
}

fn finish(
    prog: &str,
    pre: &[String],
    args: &[&str],
    stdin: Option<&str>,
) -> Result<String, ExecError> {
    let mut cmd = Command::new(prog);
    cmd.args(pre)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let spawn_err = |e| ExecError::Spawn(prog.to_string(), e);
    let mut child = cmd.spawn().map_err(spawn_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(ExecError::Failed {
            program: prog.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
