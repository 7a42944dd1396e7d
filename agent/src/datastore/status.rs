// The node's state back to the cluster (Kubernetes datastore only): the Node condition
// NetworkUnavailable=False once the node's routes are programmed, a SepalNodeStatus with the BGP
// sessions, and Events for BGP sessions that fail and for NetworkPolicy content that is rejected.
// Only changes are written; a failed write is retried on the next round.

use super::kube::StatusWriter;
use crate::crd::{BgpSessionStatus, NodeStatusReport};
use crate::model::ObjectKey;
use sepal_bgp::speaker::PeerStatus;
use sepal_felix::policy::Problem;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// How often sessions and policy problems are looked at.
const ROUND: Duration = Duration::from_secs(2);

/// Now as a Kubernetes `Time` (RFC 3339, whole seconds).
pub fn now_time() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

/// Now as a Kubernetes `MicroTime` (an Event's `eventTime`: exactly six fractional digits).
pub fn now_micro_time() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// The report for these sessions.
pub fn report_of(peers: &[PeerStatus], routes_programmed: bool) -> NodeStatusReport {
    let sessions: Vec<BgpSessionStatus> = peers
        .iter()
        .map(|p| BgpSessionStatus {
            peer_ip: p.address.to_string(),
            peer_as: p.remote_as,
            // The speaker does not know which BGPPeer (or the mesh) configured the session.
            source: String::new(),
            state: format!("{:?}", p.state),
            since: None,
            prefixes_received: u32::try_from(p.prefixes_received).unwrap_or(u32::MAX),
            prefixes_advertised: u32::try_from(p.prefixes_advertised).unwrap_or(u32::MAX),
            last_error: p.last_error.clone(),
        })
        .collect();
    NodeStatusReport {
        routes_programmed,
        established_sessions: sessions.iter().filter(|s| s.state == "Established").count() as u32,
        total_sessions: sessions.len() as u32,
        last_updated: None,
        sessions,
    }
}

/// Warning events for sessions that were Established and are not any more: (reason, note).
pub fn session_failures(
    before: &[BgpSessionStatus],
    now: &[BgpSessionStatus],
) -> Vec<(String, String)> {
    let was_up: BTreeSet<(&str, u32)> = before
        .iter()
        .filter(|s| s.state == "Established")
        .map(|s| (s.peer_ip.as_str(), s.peer_as))
        .collect();
    now.iter()
        .filter(|s| s.state != "Established" && was_up.contains(&(s.peer_ip.as_str(), s.peer_as)))
        .map(|s| {
            let why = s.last_error.as_deref().unwrap_or("no error recorded");
            (
                "BGPSessionDown".to_string(),
                format!(
                    "BGP session with {} (AS {}) left Established, now {}: {why}",
                    s.peer_ip, s.peer_as, s.state
                ),
            )
        })
        .collect()
}

/// The NetworkPolicy a problem is about (`namespace/name`).
pub fn policy_key(problem: &Problem) -> ObjectKey {
    let (namespace, name) = problem
        .policy
        .split_once('/')
        .unwrap_or(("default", problem.policy.as_str()));
    ObjectKey {
        api_version: "networking.k8s.io/v1".into(),
        kind: "NetworkPolicy".into(),
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// What was last written, so that only changes are.
#[derive(Default)]
struct Written {
    network_available: bool,
    report: Option<NodeStatusReport>,
    /// Problems already sent as Events (their text).
    problems: BTreeSet<String>,
}

/// Reports until the process ends. Starts once the node's routes are programmed.
pub async fn run(kubeconfig: Option<PathBuf>, node: String, agent: Arc<Mutex<crate::node::Agent>>) {
    let writer = loop {
        match super::kube::client(kubeconfig.as_deref()).await {
            Ok(c) => break StatusWriter::new(c, node.clone()),
            Err(e) => {
                tracing::warn!("status to the cluster: {e:#}; retrying");
                tokio::time::sleep(ROUND * 5).await;
            }
        }
    };
    let mut written = Written::default();
    loop {
        round(&writer, &agent, &mut written).await;
        tokio::time::sleep(ROUND).await;
    }
}

async fn round(
    writer: &StatusWriter,
    agent: &Arc<Mutex<crate::node::Agent>>,
    written: &mut Written,
) {
    if !written.network_available {
        match writer.network_available(&now_time()).await {
            Ok(()) => {
                tracing::info!("node condition NetworkUnavailable=False (SepalIsUp) set");
                written.network_available = true;
            }
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
    let (speaker, problems, node_key) = {
        let a = agent.lock().await;
        let node_key = ObjectKey {
            api_version: "v1".into(),
            kind: "Node".into(),
            namespace: String::new(),
            name: a.node_name().to_string(),
        };
        (
            a.routing().and_then(|r| r.speaker()),
            a.policy_problems().to_vec(),
            node_key,
        )
    };
    let peers = match speaker {
        Some(s) => s.peers().await.unwrap_or_default(),
        None => Vec::new(),
    };
    let report = report_of(&peers, true);
    if written.report.as_ref() != Some(&report) {
        let before = written.report.as_ref().map_or(&[][..], |r| &r.sessions[..]);
        for (reason, note) in session_failures(before, &report.sessions) {
            if let Err(e) = writer
                .event(&node_key, true, &reason, &note, &now_micro_time())
                .await
            {
                tracing::warn!("{e:#}");
            }
        }
        let stamped = NodeStatusReport {
            last_updated: Some(now_time()),
            ..report.clone()
        };
        match writer.report(&stamped).await {
            Ok(()) => written.report = Some(report),
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
    for p in &problems {
        let text = p.to_string();
        if written.problems.contains(&text) {
            continue;
        }
        match writer
            .event(
                &policy_key(p),
                true,
                "PolicyRejected",
                &text,
                &now_micro_time(),
            )
            .await
        {
            Ok(()) => {
                written.problems.insert(text);
            }
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
    // A fixed policy may break the same way again later: report it again then.
    let current: BTreeSet<String> = problems.iter().map(ToString::to_string).collect();
    written.problems.retain(|t| current.contains(t));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(ip: &str, state: &str) -> BgpSessionStatus {
        BgpSessionStatus {
            peer_ip: ip.into(),
            peer_as: 65000,
            state: state.into(),
            last_error: Some("hold timer expired".into()),
            ..Default::default()
        }
    }

    #[test]
    fn a_session_leaving_established_is_a_failure() {
        let before = [
            session("10.0.0.1", "Established"),
            session("10.0.0.2", "Active"),
        ];
        let now = [session("10.0.0.1", "Idle"), session("10.0.0.2", "Idle")];
        let ev = session_failures(&before, &now);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert!(ev[0].1.contains("10.0.0.1") && ev[0].1.contains("hold timer expired"));
        assert!(session_failures(&now, &before).is_empty());
        assert!(session_failures(&[], &now).is_empty());
    }

    #[test]
    fn times_are_kubernetes_times() {
        let t = now_time();
        assert_eq!(t.len(), "2026-01-01T00:00:00Z".len(), "{t}");
        assert!(t.ends_with('Z'));
        let m = now_micro_time();
        assert_eq!(m.len(), "2026-01-01T00:00:00.000000Z".len(), "{m}");
    }
}
