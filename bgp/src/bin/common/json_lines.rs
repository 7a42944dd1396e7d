// The driver of Sepal's test processes (sepal-bgpd, sepal-bfdd): one JSON command per line on
// stdin, one JSON reply per line on stdout, all on one thread.

use std::io::BufRead;

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

/// Runs `handle` on every command line until stdin closes or a reply says `bye`; a command that
/// does not parse, or fails, gets `{"error": ...}`.
pub fn run<S, C, F>(name: &str, mut state: S, mut handle: F)
where
    C: DeserializeOwned,
    F: AsyncFnMut(&mut S, C) -> Result<Value, String>,
{
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name}: runtime: {e}");
            std::process::exit(1);
        }
    };
    rt.block_on(async {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        read_commands(tx);
        while let Some(line) = rx.recv().await {
            if line.trim().is_empty() {
                continue;
            }
            let reply = match serde_json::from_str::<C>(&line) {
                Err(e) => json!({ "error": format!("bad command: {e}") }),
                Ok(cmd) => handle(&mut state, cmd)
                    .await
                    .unwrap_or_else(|e| json!({ "error": e })),
            };
            println!("{reply}");
            if reply.get("bye").is_some() {
                return;
            }
        }
    });
}

/// Feeds stdin's lines into `tx`: on the runtime's own thread when stdin can be polled (a pipe),
/// so the process is one thread like the daemons it is compared with; else from a thread.
fn read_commands(tx: tokio::sync::mpsc::UnboundedSender<String>) {
    // SAFETY: fcntl on fd 0 only changes its file status flags.
    let nonblocking = unsafe {
        let fl = libc::fcntl(0, libc::F_GETFL);
        fl >= 0 && libc::fcntl(0, libc::F_SETFL, fl | libc::O_NONBLOCK) == 0
    };
    // SAFETY: fd 0 stays open, and is fd 0, for the life of the process.
    let polled = nonblocking
        .then(|| unsafe { tokio::io::unix::AsyncFd::register(std::io::stdin()) }.ok())
        .flatten();
    let Some(fd) = polled else {
        if nonblocking {
            // SAFETY: as above.
            unsafe {
                let fl = libc::fcntl(0, libc::F_GETFL);
                libc::fcntl(0, libc::F_SETFL, fl & !libc::O_NONBLOCK);
            }
        }
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        return;
    };
    tokio::spawn(async move {
        let mut pending = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let Ok(mut ready) = fd.readable().await else {
                return;
            };
            // SAFETY: reads into a buffer of the given length.
            let r = ready.try_io(|_| {
                let n = unsafe { libc::read(0, chunk.as_mut_ptr().cast(), chunk.len()) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match r {
                Err(_would_block) => continue,
                Ok(Ok(0)) | Ok(Err(_)) => return,
                Ok(Ok(n)) => pending.extend_from_slice(&chunk[..n]),
            }
            while let Some(i) = pending.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = pending.drain(..=i).collect();
                if tx
                    .send(String::from_utf8_lossy(&line[..i]).into_owned())
                    .is_err()
                {
                    return;
                }
            }
        }
    });
}
