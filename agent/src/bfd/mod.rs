//! BFD for the agent's BGP sessions, run either inside the agent or by `sepal bfd`, a small
//! daemon of its own that outlives agent restarts. In the daemon its sessions are
//! control-plane independent (the C bit, RFC 5880 §4.1): a restarting agent leaves them Up, so
//! peers treat the restart as one (graceful restart keeps the node's routes), while a node that
//! goes silent still loses its sessions, and its routes, within the detection time.

pub mod client;
pub mod daemon;
pub mod wire;

use std::collections::BTreeMap;
use std::net::IpAddr;

use sepal_bgp::bfd::{Bfd, PeerConfig, PeerStatus};

/// Where `sepal bfd` listens, and where the agent's `--bfd-socket` usually points.
pub const DEFAULT_SOCKET: &str = "/run/sepal/bfd.sock";

/// The BFD the routing task drives.
#[derive(Clone)]
pub enum Backend {
    /// In the agent's own process: its sessions die with it (C bit clear).
    InProcess(Bfd),
    /// In `sepal bfd`, reached over its socket.
    Daemon(client::DaemonClient),
}

impl Backend {
    pub async fn sessions(&self) -> Result<Vec<PeerStatus>, String> {
        match self {
            Backend::InProcess(b) => b.sessions().await.map_err(|e| e.to_string()),
            Backend::Daemon(d) => d.sessions().await,
        }
    }
}

/// Brings `bfd`'s sessions from `have` to `want`: starts new ones, gives changed ones their new
/// settings, ends those left out (AdminDown, RFC 5880 §6.8.16).
pub fn apply(
    bfd: &Bfd,
    have: &BTreeMap<IpAddr, PeerConfig>,
    want: &BTreeMap<IpAddr, PeerConfig>,
) -> Result<(), sepal_bgp::bfd::runner::Error> {
    for a in have.keys().filter(|a| !want.contains_key(a)) {
        bfd.remove_peer(*a)?;
    }
    for (a, p) in want {
        if have.get(a) != Some(p) {
            bfd.set_peer(p.clone())?;
        }
    }
    Ok(())
}
