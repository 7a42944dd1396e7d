//! The plugin's side of the agent socket: one request, one response per connection (framing in
//! `api`), with "agent unreachable" kept apart from "agent said no" so callers can map it to code 11.

use crate::api::{Request, Response};
use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// How long one agent call may take. ADD waits for the agent to program the host side, which
/// is quick; a hung agent must not hang the runtime forever.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// Nobody answered: no socket, refused, or the connection broke before a response.
    /// `sent` tells whether the request may have reached the agent (it was connected).
    #[error("sepal agent unreachable at {socket}: {source}")]
    Unreachable {
        socket: String,
        source: std::io::Error,
        sent: bool,
    },
    /// The agent answered something that is not a `Response`.
    #[error("sepal agent sent an invalid response: {0}")]
    BadResponse(String),
}

/// Sends `request` to the agent listening on `socket` and returns its response.
pub fn call(socket: &Path, request: &Request) -> Result<Response, CallError> {
    let failed = |sent: bool| {
        move |source| CallError::Unreachable {
            socket: socket.display().to_string(),
            source,
            sent,
        }
    };
    let mut stream = UnixStream::connect(socket).map_err(failed(false))?;
    let unreachable = failed(true);
    stream
        .set_read_timeout(Some(CALL_TIMEOUT))
        .map_err(unreachable)?;
    stream
        .set_write_timeout(Some(CALL_TIMEOUT))
        .map_err(unreachable)?;
    let mut line = serde_json::to_vec(request)
        .map_err(|e| CallError::BadResponse(format!("cannot encode request: {e}")))?;
    line.push(b'\n');
    stream.write_all(&line).map_err(unreachable)?;
    // Half-close so an agent reading to end-of-stream sees the whole request.
    let _ = stream.shutdown(Shutdown::Write);
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(unreachable)?;
    if reply.trim().is_empty() {
        return Err(unreachable(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed without a response",
        )));
    }
    serde_json::from_str(reply.trim()).map_err(|e| CallError::BadResponse(format!("{e}: {reply}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AddReply, ErrorReply};
    use std::io::Read;
    use std::os::unix::net::UnixListener;

    fn serve_once(
        reply: &'static str,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        std::thread::JoinHandle<String>,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let handle = std::thread::spawn(move || {
            let (mut conn, _) = listener.accept().unwrap();
            let mut req = String::new();
            conn.read_to_string(&mut req).unwrap();
            conn.write_all(reply.as_bytes()).unwrap();
            req
        });
        (dir, path, handle)
    }

    #[test]
    fn round_trip_reads_to_eof_and_one_line() {
        let (_dir, path, handle) =
            serve_once("{\"result\":\"added\",\"ips\":[\"10.0.0.2\"],\"mtu\":1500}\n");
        let resp = call(&path, &Request::Status).unwrap();
        assert_eq!(
            resp,
            Response::Added(AddReply {
                ips: vec!["10.0.0.2".parse().unwrap()],
                mtu: 1500
            })
        );
        assert_eq!(handle.join().unwrap(), "{\"op\":\"status\"}\n");
    }

    #[test]
    fn agent_errors_are_responses() {
        let (_dir, path, _h) =
            serve_once("{\"result\":\"error\",\"code\":101,\"msg\":\"no pod block\"}");
        let resp = call(&path, &Request::Status).unwrap();
        assert_eq!(
            resp,
            Response::Error(ErrorReply {
                code: 101,
                msg: "no pod block".into(),
                details: String::new()
            })
        );
    }

    #[test]
    fn missing_socket_and_silent_close_are_unreachable() {
        let dir = tempfile::tempdir().unwrap();
        let err = call(&dir.path().join("none.sock"), &Request::Status).unwrap_err();
        assert!(
            matches!(err, CallError::Unreachable { sent: false, .. }),
            "{err}"
        );
        let (_dir, path, _h) = serve_once("");
        let err = call(&path, &Request::Status).unwrap_err();
        assert!(
            matches!(err, CallError::Unreachable { sent: true, .. }),
            "{err}"
        );
    }

    #[test]
    fn garbage_is_a_bad_response() {
        let (_dir, path, _h) = serve_once("hello\n");
        let err = call(&path, &Request::Status).unwrap_err();
        assert!(matches!(err, CallError::BadResponse(_)), "{err}");
    }
}
