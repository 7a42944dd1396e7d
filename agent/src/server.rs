//! The agent's Unix socket: one JSON request per connection from `sepal-cni` (see
//! `sepal_cni::api`), answered by the agent one at a time; SIGTERM/SIGINT stop it cleanly.

use crate::node::Agent;
use anyhow::{bail, Context, Result};
use sepal_cni::api::{codes, ErrorReply, Request, Response};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Mutex;

/// A request larger than this is not from our plugin.
const MAX_REQUEST: u64 = 1 << 20;
/// A client that does not finish its request in this time is dropped.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds a Unix socket: creates its directory, replaces a stale socket file, refuses to steal the
/// socket of an agent that still answers (`flag` names the option that picks another path).
pub fn bind(path: &Path, flag: &str) -> Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
    }
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            bail!(
                "another agent is already serving {}; stop it first or pass another {flag}",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale socket {}", path.display()))?;
    }
    UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

async fn read_request(stream: &mut UnixStream) -> Result<Request, Response> {
    let mut line = Vec::new();
    let mut reader = BufReader::new((&mut *stream).take(MAX_REQUEST));
    let read = tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await;
    let decode_error = |msg: String| {
        Response::Error(ErrorReply {
            code: codes::DECODE_FAILURE,
            msg,
            details: String::new(),
        })
    };
    match read {
        Err(_) => return Err(decode_error("request not received in time".into())),
        Ok(Err(e)) => return Err(decode_error(format!("reading the request: {e}"))),
        Ok(Ok(_)) => {}
    }
    serde_json::from_slice(&line).map_err(|e| decode_error(format!("bad request: {e}")))
}

async fn connection(mut stream: UnixStream, agent: Arc<Mutex<Agent>>) {
    let response = match read_request(&mut stream).await {
        Ok(req) => {
            tracing::debug!(?req, "request");
            let op = match &req {
                Request::Add(_) => "add",
                Request::Del(_) => "del",
                Request::Check(_) => "check",
                Request::Status => "status",
                Request::Gc(_) => "gc",
            };
            let started = std::time::Instant::now();
            let response = agent.lock().await.handle(req).await;
            let ok = !matches!(response, Response::Error(_));
            crate::metrics::metrics().observe_cni(op, ok, started.elapsed());
            response
        }
        Err(resp) => resp,
    };
    if let Response::Error(e) = &response {
        tracing::warn!(code = e.code, "request failed: {}", e.msg);
    }
    let mut out = match serde_json::to_vec(&response) {
        Ok(v) => v,
        Err(e) => {
            tracing::error!("encoding a response: {e}");
            return;
        }
    };
    out.push(b'\n');
    if let Err(e) = stream.write_all(&out).await {
        tracing::warn!("sending a response: {e}");
    }
    let _ = stream.shutdown().await;
}

/// Serves until SIGTERM or SIGINT, then waits for the request in progress and removes the socket.
pub async fn serve(path: &Path, agent: Arc<Mutex<Agent>>) -> Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let listener = bind(path, "--socket")?;
    tracing::info!(socket = %path.display(), "serving");
    let result = loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(connection(stream, agent.clone()));
                }
                Err(e) => {
                    tracing::warn!("accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = term.recv() => break Ok(()),
            _ = int.recv() => break Ok(()),
        }
    };
    tracing::info!("stopping");
    drop(listener);
    let _ = std::fs::remove_file(path);
    // A request being handled holds the lock: let it finish so its state is consistent.
    let _guard = agent.lock().await;
    result
}
