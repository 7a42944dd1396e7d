//! The agent's side of `sepal bfd`: one connection, made again whenever it drops, that sends
//! the sessions the BGP sessions want and passes the daemon's state changes on.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use sepal_bgp::bfd::{Change, PeerConfig, PeerStatus};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};

use super::wire::{line, Message, Request};

const RECONNECT: Duration = Duration::from_secs(1);

enum Cmd {
    SetPeers(Vec<PeerConfig>),
    Sessions(oneshot::Sender<Vec<PeerStatus>>),
}

/// Handle to the connection task; dropping every handle ends it (the daemon's sessions stay).
#[derive(Clone)]
pub struct DaemonClient {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl DaemonClient {
    /// Starts the task that connects to the daemon at `socket`.
    pub fn start(socket: PathBuf) -> (DaemonClient, mpsc::UnboundedReceiver<Change>) {
        let (tx, cmds) = mpsc::unbounded_channel();
        let (changes_tx, changes) = mpsc::unbounded_channel();
        tokio::spawn(run(socket, cmds, changes_tx));
        (DaemonClient { tx }, changes)
    }

    /// The whole set of sessions to run, sent now or on the next connection.
    pub fn set_peers(&self, peers: Vec<PeerConfig>) {
        let _ = self.tx.send(Cmd::SetPeers(peers));
    }

    pub async fn sessions(&self) -> Result<Vec<PeerStatus>, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Cmd::Sessions(tx))
            .map_err(|_| "the BFD client has stopped".to_string())?;
        rx.await
            .map_err(|_| "the BFD daemon is not connected".to_string())
    }
}

async fn run(
    socket: PathBuf,
    mut cmds: mpsc::UnboundedReceiver<Cmd>,
    changes: mpsc::UnboundedSender<Change>,
) {
    // Nothing is sent before the first set: an empty one would end the sessions that a
    // previous agent left running.
    let mut want: Option<Vec<PeerConfig>> = None;
    loop {
        let Some(stream) = connect(&socket, &mut cmds, &mut want).await else {
            return;
        };
        tracing::info!(socket = %socket.display(), "connected to the BFD daemon");
        if !session(stream, &mut cmds, &mut want, &changes).await {
            return;
        }
        tracing::warn!(socket = %socket.display(), "lost the BFD daemon; reconnecting");
    }
}

/// Connects, retrying every second; meanwhile new peer sets are kept for the connection and
/// status requests fail at once. `None` once every handle is gone.
async fn connect(
    socket: &Path,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    want: &mut Option<Vec<PeerConfig>>,
) -> Option<UnixStream> {
    let mut warned = false;
    loop {
        match UnixStream::connect(socket).await {
            Ok(s) => return Some(s),
            Err(e) if !warned => {
                tracing::warn!(socket = %socket.display(), "no BFD daemon ({e}); retrying every second");
                warned = true;
            }
            Err(_) => {}
        }
        let retry = tokio::time::sleep(RECONNECT);
        tokio::pin!(retry);
        loop {
            tokio::select! {
                _ = &mut retry => break,
                c = cmds.recv() => match c? {
                    Cmd::SetPeers(p) => *want = Some(p),
                    Cmd::Sessions(_) => {}
                },
            }
        }
    }
}

/// Runs one connection until it drops (`true`) or every handle is gone (`false`).
async fn session(
    stream: UnixStream,
    cmds: &mut mpsc::UnboundedReceiver<Cmd>,
    want: &mut Option<Vec<PeerConfig>>,
    changes: &mpsc::UnboundedSender<Change>,
) -> bool {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    // One entry per request sent, in order: who waits for its reply, if anyone.
    let mut pending: VecDeque<Option<oneshot::Sender<Vec<PeerStatus>>>> = VecDeque::new();
    if let Some(peers) = want.clone() {
        if send(&mut write, &Request::Sync { peers }).await.is_err() {
            return true;
        }
        pending.push_back(None);
    }
    loop {
        tokio::select! {
            c = cmds.recv() => {
                let (req, waiter) = match c {
                    None => return false,
                    Some(Cmd::SetPeers(p)) => {
                        *want = Some(p.clone());
                        (Request::Sync { peers: p }, None)
                    }
                    Some(Cmd::Sessions(tx)) => (Request::Sessions, Some(tx)),
                };
                if send(&mut write, &req).await.is_err() {
                    return true;
                }
                pending.push_back(waiter);
            }
            l = lines.next_line() => {
                let Ok(Some(l)) = l else {
                    return true;
                };
                match serde_json::from_str::<Message>(&l) {
                    Ok(Message::Change(c)) => {
                        let _ = changes.send(c);
                    }
                    Ok(reply) => match (pending.pop_front().flatten(), reply) {
                        (Some(tx), Message::Sessions(s)) => {
                            let _ = tx.send(s);
                        }
                        (_, Message::Error(e)) => tracing::warn!("BFD daemon: {e}"),
                        _ => {}
                    },
                    Err(e) => tracing::warn!("unreadable message from the BFD daemon: {e}"),
                }
            }
        }
    }
}

async fn send(write: &mut OwnedWriteHalf, req: &Request) -> std::io::Result<()> {
    write.write_all(line(req).as_bytes()).await
}
