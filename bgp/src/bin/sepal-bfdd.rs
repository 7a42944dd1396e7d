// A BFD process driven by JSON lines on stdin, one JSON reply per line on stdout: runs the
// library's BFD inside a network namespace for interop tests. Commands:
//   {"cmd":"start","control_plane_independent":false}
//   {"cmd":"peer","address":"10.0.0.1","local":"10.0.0.2","min_tx_ms":300,"min_rx_ms":300,"multiplier":3}
//   {"cmd":"remove_peer","address":"10.0.0.1"}
//   {"cmd":"admin_down","address":"10.0.0.1","down":true}
//   {"cmd":"sessions"}   {"cmd":"changes"} (state changes since the last call)   {"cmd":"shutdown"}

use std::net::IpAddr;
use std::time::Duration;

use sepal_bgp::bfd::{Bfd, Change, PeerConfig, Timers};
use serde::Deserialize;
use serde_json::{json, Value};

#[path = "common/json_lines.rs"]
mod json_lines;

#[derive(Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum Cmd {
    Start {
        #[serde(default)]
        control_plane_independent: bool,
    },
    Peer {
        address: IpAddr,
        local: Option<IpAddr>,
        min_tx_ms: Option<u64>,
        min_rx_ms: Option<u64>,
        multiplier: Option<u8>,
    },
    RemovePeer {
        address: IpAddr,
    },
    AdminDown {
        address: IpAddr,
        down: bool,
    },
    Sessions,
    Changes,
    Shutdown,
}

fn main() {
    json_lines::run("sepal-bfdd", None, handle);
}

struct Running {
    bfd: Bfd,
    changes: tokio::sync::mpsc::UnboundedReceiver<Change>,
}

async fn handle(running: &mut Option<Running>, cmd: Cmd) -> Result<Value, String> {
    if let Cmd::Start {
        control_plane_independent,
    } = cmd
    {
        let (bfd, changes) = Bfd::start(control_plane_independent)
            .await
            .map_err(|e| e.to_string())?;
        *running = Some(Running { bfd, changes });
        return Ok(json!({ "ok": true }));
    }
    let r = running.as_mut().ok_or("send start first")?;
    let e = |e: sepal_bgp::bfd::runner::Error| e.to_string();
    Ok(match cmd {
        Cmd::Start { .. } => unreachable!("handled above"),
        Cmd::Peer {
            address,
            local,
            min_tx_ms,
            min_rx_ms,
            multiplier,
        } => {
            let d = Timers::default();
            r.bfd
                .set_peer(PeerConfig {
                    peer: address,
                    local,
                    scope_id: None,
                    timers: Timers {
                        min_tx: min_tx_ms.map_or(d.min_tx, Duration::from_millis),
                        min_rx: min_rx_ms.map_or(d.min_rx, Duration::from_millis),
                        multiplier: multiplier.unwrap_or(d.multiplier),
                    },
                })
                .map_err(e)?;
            json!({ "ok": true })
        }
        Cmd::RemovePeer { address } => {
            r.bfd.remove_peer(address).map_err(e)?;
            json!({ "ok": true })
        }
        Cmd::AdminDown { address, down } => {
            r.bfd.admin_down(address, down).map_err(e)?;
            json!({ "ok": true })
        }
        Cmd::Sessions => json!(r.bfd.sessions().await.map_err(e)?),
        Cmd::Changes => {
            let mut v = Vec::new();
            while let Ok(c) = r.changes.try_recv() {
                v.push(json!({"peer": c.peer, "from": c.from, "to": c.to, "diag": c.diag}));
            }
            json!(v)
        }
        Cmd::Shutdown => json!({ "bye": true }),
    })
}
