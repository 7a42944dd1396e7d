//! What the agent and `sepal bfd` say to each other: one JSON object per line each way.
//! The agent sends the whole set of sessions it wants (again after each reconnect), so a new
//! agent never inherits sessions that no BGP session asks for any more.

use sepal_bgp::bfd::{Change, PeerConfig, PeerStatus};
use serde::{Deserialize, Serialize};

/// Agent to daemon.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    /// Run exactly these sessions: new ones start, changed ones take their new timers, and
    /// those left out end with AdminDown, so their peers do not take the end for a failure.
    Sync { peers: Vec<PeerConfig> },
    /// Reply with every session's status.
    Sessions,
}

/// Daemon to agent: replies in the order of the requests, and state changes as they happen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Message {
    Synced,
    Sessions(Vec<PeerStatus>),
    Change(Change),
    /// A request the daemon could not read; the connection stays open.
    Error(String),
}

/// One line of JSON, newline included.
pub fn line<T: Serialize>(v: &T) -> String {
    let mut s = serde_json::to_string(v).expect("wire types serialize");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use sepal_bgp::bfd::{Diag, State, Timers};
    use std::time::Duration;

    #[test]
    fn requests_and_messages_round_trip() {
        let sync = Request::Sync {
            peers: vec![PeerConfig {
                peer: "10.0.0.1".parse().unwrap(),
                local: None,
                scope_id: None,
                timers: Timers {
                    min_tx: Duration::from_millis(100),
                    ..Timers::default()
                },
            }],
        };
        let text = line(&sync);
        assert!(text.ends_with('\n') && !text.trim_end().contains('\n'));
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), sync);
        let change = Message::Change(Change {
            peer: "fd00::1".parse().unwrap(),
            from: State::Up,
            to: State::Down,
            diag: Diag::ControlDetectionTimeExpired,
            peer_admin_down: false,
        });
        assert_eq!(
            serde_json::from_str::<Message>(&line(&change)).unwrap(),
            change
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"reboot"}"#).is_err());
    }
}
