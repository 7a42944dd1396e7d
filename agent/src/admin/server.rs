//! Serves the operator socket: reads one request per connection, answers from `collect`. Runs
//! beside the plugin's socket server until the agent stops; bad requests get an error reply.

use super::{collect, AdminReply, AdminRequest};
use crate::node::Agent;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Mutex;

pub const MAX_REQUEST: u64 = 64 * 1024;
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The bound socket; removes its file when dropped (the agent stops).
pub struct AdminSocket {
    path: PathBuf,
    listener: UnixListener,
}

impl Drop for AdminSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds the operator socket: replaces a stale file, refuses to take over the socket of an agent
/// that still answers on it.
pub fn bind(path: &Path) -> Result<AdminSocket> {
    let listener = crate::server::bind(path, "--admin-socket")?;
    // Operators only: the socket reveals the node's pods and sessions.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("restricting {}", path.display()))?;
    Ok(AdminSocket {
        path: path.to_path_buf(),
        listener,
    })
}

/// Accepts connections forever; each is answered on its own task.
pub async fn serve(socket: AdminSocket, agent: Arc<Mutex<Agent>>) {
    tracing::info!(socket = %socket.path.display(), "operator socket serving");
    loop {
        match socket.listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(connection(stream, agent.clone()));
            }
            Err(e) => {
                tracing::warn!("operator socket accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn read_request(stream: &mut UnixStream) -> Result<AdminRequest, String> {
    let mut line = Vec::new();
    let mut reader = BufReader::new((&mut *stream).take(MAX_REQUEST));
    match tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Err(_) => return Err("request not received in time".into()),
        Ok(Err(e)) => return Err(format!("reading the request: {e}")),
        Ok(Ok(_)) => {}
    }
    decode_request(&line)
}

/// Decodes one request line as `read_request` receives it: at most `MAX_REQUEST` bytes, up to
/// and including the first newline.
pub fn decode_request(line: &[u8]) -> Result<AdminRequest, String> {
    serde_json::from_slice(line).map_err(|e| format!("bad request: {e}"))
}

async fn connection(mut stream: UnixStream, agent: Arc<Mutex<Agent>>) {
    let reply = match read_request(&mut stream).await {
        Ok(req) => {
            tracing::debug!(?req, "operator request");
            match collect::answer(&agent, req).await {
                Ok(data) => AdminReply::Ok { data },
                Err(msg) => AdminReply::error(&msg),
            }
        }
        Err(msg) => AdminReply::error(&msg),
    };
    let mut out = serde_json::to_vec(&reply).unwrap_or_else(|e| {
        format!(r#"{{"result":"error","msg":"encoding the reply: {e}"}}"#).into_bytes()
    });
    out.push(b'\n');
    if let Err(e) = stream.write_all(&out).await {
        tracing::debug!("sending an operator reply: {e}");
    }
    let _ = stream.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bind_replaces_a_stale_socket_but_not_a_live_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let live = bind(&path).expect("a stale socket file is replaced");
        let err = bind(&path)
            .err()
            .expect("a live socket is kept")
            .to_string();
        assert!(err.contains("already serving"), "{err}");
        drop(live);
        assert!(!path.exists(), "the socket file goes with the agent");
    }
}
