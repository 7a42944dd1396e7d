//! The agents of a lab whose nodes it runs itself: started at `up`, and stopped or started one
//! at a time (`lab stop-agent`, `lab start-agent`) to see what an agent restart does.

use super::net;
use super::state::LabState;
use anyhow::{bail, Context, Result};
use std::time::{Duration, Instant};

/// Starts node `i`'s agent in its namespace, on the lab's datastore; its output goes to the
/// node's agent.log (appended to with `append`, as after a restart). The PID.
pub fn spawn(lab: &LabState, i: usize, append: bool) -> Result<u32> {
    let sepal = std::env::current_exe()?;
    let datastore = match &lab.kubeconfig {
        Some(api) => vec![
            "kubernetes".to_string(),
            "--kubeconfig".to_string(),
            api.agent_kubeconfig
                .to_str()
                .context("kubeconfig path")?
                .to_string(),
        ],
        None => vec![format!("dir:{}", lab.datastore().display())],
    };
    let node = &lab.nodes[i];
    let dir = lab.node_dir(&node.name);
    std::fs::create_dir_all(&dir)?;
    let (state_dir, socket) = (dir.join("state"), lab.socket(&node.name));
    let mut args = vec![
        sepal.to_str().context("sepal path")?,
        "node",
        "--node-name",
        &node.name,
        "--state-dir",
        state_dir.to_str().context("state path")?,
        "--socket",
        socket.to_str().context("socket path")?,
        "--datastore",
    ];
    args.extend(datastore.iter().map(String::as_str));
    let log = dir.join("agent.log");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(append)
        .write(true)
        .truncate(!append)
        .open(&log)
        .with_context(|| format!("open {}", log.display()))?;
    net::spawn_daemon_to(&node.netns, &args, file)
}

/// `lab stop-agent`: ends node `name`'s agent, gracefully or (`kill`) with SIGKILL, and waits
/// until it is gone, so a new one can bind its sockets.
pub fn stop(lab: &mut LabState, name: &str, kill: bool) -> Result<()> {
    let i = own_node(lab, name)?;
    let Some(pid) = lab.nodes[i].pid.filter(|&p| running(p)) else {
        bail!("the agent on {name} is not running");
    };
    if kill {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    } else {
        net::stop(pid);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while running(pid) {
        if Instant::now() > deadline {
            bail!("the agent on {name} (pid {pid}) did not exit");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    lab.nodes[i].pid = None;
    lab.save()
}

/// `lab start-agent`: starts node `name`'s agent again and waits until it is ready.
pub fn start(lab: &mut LabState, name: &str) -> Result<()> {
    let i = own_node(lab, name)?;
    if let Some(pid) = lab.nodes[i].pid.filter(|&p| running(p)) {
        bail!("the agent on {name} is already running (pid {pid}); `lab stop-agent` it first");
    }
    let pid = spawn(lab, i, true)?;
    lab.nodes[i].pid = Some(pid);
    lab.save()?;
    super::wait_agent_ready(lab, &lab.nodes[i])
}

/// The index of node `name`, whose agent the lab runs itself.
fn own_node(lab: &LabState, name: &str) -> Result<usize> {
    if lab.real_nodes() {
        bail!(
            "lab {}: its agents are Pods of the sepal DaemonSet; delete a node's Pod to restart it",
            lab.name
        );
    }
    lab.nodes
        .iter()
        .position(|n| n.name == name)
        .with_context(|| format!("no node {name:?} in lab {}", lab.name))
}

fn running(pid: u32) -> bool {
    net::alive(pid) && !net::is_zombie(pid)
}
