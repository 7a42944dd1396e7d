//! `sepal bfd`: BFD as a process of its own. It runs the sessions the agent asks for over a
//! unix socket and keeps them running while no agent is connected, so that an agent crash or
//! restart is, to the peers, a BGP restart only: BFD stays Up, graceful restart keeps the
//! routes. It sends the C bit, since its sessions no longer share the agent's fate.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use sepal_bgp::bfd::{Bfd, Change, PeerConfig};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{broadcast, Mutex};

use super::wire::{line, Message, Request};
use crate::config::LogFormat;

#[derive(Debug, clap::Args)]
pub struct BfdArgs {
    /// Unix socket the agent's `--bfd-socket` names [default: /run/sepal/bfd.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Log format on stderr [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

pub fn run(args: BfdArgs) -> Result<()> {
    crate::init_logging(args.log_format.unwrap_or(LogFormat::Text));
    let socket = args
        .socket
        .unwrap_or_else(|| PathBuf::from(super::DEFAULT_SOCKET));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(&socket))
}

/// The sessions the last `sync` asked for.
type Desired = Arc<Mutex<BTreeMap<IpAddr, PeerConfig>>>;

async fn serve(socket: &Path) -> Result<()> {
    let (bfd, mut changes) = Bfd::start(true).await.context("starting BFD")?;
    let listener = bind(socket)?;
    // Every connected agent hears every change; one that lags behind this many misses some.
    let (events, _) = broadcast::channel::<Change>(1024);
    let forward = events.clone();
    tokio::spawn(async move {
        while let Some(c) = changes.recv().await {
            let _ = forward.send(c);
        }
    });
    let desired: Desired = Arc::default();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tracing::info!(socket = %socket.display(), "BFD daemon listening (control-plane independent)");
    loop {
        tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    tokio::spawn(connection(stream, bfd.clone(), desired.clone(), events.subscribe()));
                }
                Err(e) => tracing::warn!("BFD daemon socket: {e}"),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    // Ending each session sends AdminDown: a peer that follows RFC 5882 §3.2 keeps its BGP
    // session, where silence would read as a failure of the path.
    let have = desired.lock().await.clone();
    let _ = super::apply(&bfd, &have, &BTreeMap::new());
    // The task handles commands in order: once it answers, the AdminDowns are sent.
    let _ = bfd.sessions().await;
    let _ = std::fs::remove_file(socket);
    tracing::info!("BFD daemon stopped");
    Ok(())
}

/// Binds the socket, replacing a stale file but never a daemon that still answers on it.
fn bind(socket: &Path) -> Result<UnixListener> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    if socket.exists() {
        if std::os::unix::net::UnixStream::connect(socket).is_ok() {
            bail!("another BFD daemon is listening on {}", socket.display());
        }
        std::fs::remove_file(socket)
            .with_context(|| format!("removing the stale {}", socket.display()))?;
    }
    let listener =
        UnixListener::bind(socket).with_context(|| format!("binding {}", socket.display()))?;
    // The socket decides which peers get BFD: root's only.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// One agent's connection: its requests answered in order, every change sent as it happens.
async fn connection(
    stream: UnixStream,
    bfd: Bfd,
    desired: Desired,
    mut events: broadcast::Receiver<Change>,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    loop {
        let msg = tokio::select! {
            l = lines.next_line() => match l {
                Ok(Some(l)) => request(&l, &bfd, &desired).await,
                _ => return,
            },
            e = events.recv() => match e {
                Ok(c) => Message::Change(c),
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "an agent fell behind on BFD changes");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if write.write_all(line(&msg).as_bytes()).await.is_err() {
            return;
        }
    }
}

async fn request(text: &str, bfd: &Bfd, desired: &Desired) -> Message {
    match serde_json::from_str::<Request>(text) {
        Ok(Request::Sync { peers }) => {
            let want: BTreeMap<IpAddr, PeerConfig> =
                peers.into_iter().map(|p| (p.peer, p)).collect();
            let mut have = desired.lock().await;
            if let Err(e) = super::apply(bfd, &have, &want) {
                return Message::Error(e.to_string());
            }
            tracing::info!(sessions = ?want.values().collect::<Vec<_>>(), "BFD sessions synced");
            *have = want;
            Message::Synced
        }
        Ok(Request::Sessions) => match bfd.sessions().await {
            Ok(s) => Message::Sessions(s),
            Err(e) => Message::Error(e.to_string()),
        },
        Err(e) => Message::Error(format!("unreadable request: {e}")),
    }
}
