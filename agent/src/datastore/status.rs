// The node's state back to the cluster (Kubernetes datastore only): the Node condition
// NetworkUnavailable=False once the node's routes are programmed, a SepalNodeStatus with the BGP
// sessions, and Events for BGP sessions that fail (on the BGPPeer that makes the session, or the
// Node for mesh sessions) and for policy content that is rejected, and each ClusterNetworkPolicy's
// Accepted condition (cnp_status); a repeated Event updates the first one's series. Only changes
// are written; a failed write is retried on the next round.

use super::kube::StatusWriter;
use crate::crd::{BgpSessionStatus, NodeStatusReport};
use crate::model::ObjectKey;
use sepal_bgp::speaker::PeerStatus;
use sepal_felix::policy::Problem;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Mutex;

/// How often sessions and policy problems are looked at.
const ROUND: Duration = Duration::from_secs(2);
/// The longest pause between rounds while the API server refuses writes: every node backs off,
/// so a recovering API server is not met by all of them at once.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

/// The pause after a round: ROUND after success, doubling after each failed round up to
/// MAX_BACKOFF, spread by `jitter` (0..1) over its upper half.
pub fn next_pause(previous: Duration, ok: bool, jitter: f64) -> (Duration, Duration) {
    let base = if ok {
        ROUND
    } else {
        (previous * 2).min(MAX_BACKOFF)
    };
    (base, base.mul_f64(0.5 + jitter.clamp(0.0, 1.0) / 2.0))
}

use k8s_openapi::jiff::Timestamp;

/// A Kubernetes `Time` (RFC 3339, whole seconds).
fn time(t: Timestamp) -> String {
    t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

/// Now as a Kubernetes `Time`.
pub fn now_time() -> String {
    time(Timestamp::now())
}

/// Now as a Kubernetes `MicroTime` (an Event's `eventTime`: exactly six fractional digits).
pub fn now_micro_time() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%S%.6fZ")
        .to_string()
}

/// The report for these sessions. `sources` names the configuration of each session (`mesh` or
/// a BGPPeer); `since` is kept from `previous` while a session stays in its state, else it is
/// now (for a session already Established when first seen: when it came up).
pub fn report_of(
    peers: &[PeerStatus],
    bfd: &[sepal_bgp::bfd::PeerStatus],
    sources: &BTreeMap<IpAddr, String>,
    previous: Option<&NodeStatusReport>,
    now: Timestamp,
    routes_programmed: bool,
) -> NodeStatusReport {
    let sessions: Vec<BgpSessionStatus> = peers
        .iter()
        .map(|p| {
            let peer_ip = p.address.to_string();
            let state = format!("{:?}", p.state);
            let kept = previous
                .into_iter()
                .flat_map(|r| &r.sessions)
                .find(|s| s.peer_ip == peer_ip && s.state == state)
                .and_then(|s| s.since.clone());
            let up_at = p
                .uptime
                .and_then(|u| k8s_openapi::jiff::SignedDuration::try_from(u).ok())
                .and_then(|u| now.checked_sub(u).ok());
            let since = kept.unwrap_or_else(|| time(up_at.unwrap_or(now)));
            let bfd = bfd
                .iter()
                .find(|b| b.peer == p.address)
                .map(|b| bfd_status(b, previous_bfd(previous, &peer_ip), now));
            BgpSessionStatus {
                peer_ip,
                peer_as: p.remote_as,
                source: sources.get(&p.address).cloned().unwrap_or_default(),
                state,
                since: Some(since),
                prefixes_received: u32::try_from(p.prefixes_received).unwrap_or(u32::MAX),
                prefixes_advertised: u32::try_from(p.prefixes_advertised).unwrap_or(u32::MAX),
                last_error: p.last_error.clone(),
                bfd,
            }
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

/// The BFD status last reported for the session with `peer_ip`.
fn previous_bfd<'a>(
    previous: Option<&'a NodeStatusReport>,
    peer_ip: &str,
) -> Option<&'a crate::crd::BfdSessionStatus> {
    previous?
        .sessions
        .iter()
        .find(|s| s.peer_ip == peer_ip)?
        .bfd
        .as_ref()
}

/// A BFD session as SepalNodeStatus shows it. `lastChange` is kept from `previous` while the
/// state holds, so a report rewritten every few seconds does not drift by a rounding second.
fn bfd_status(
    b: &sepal_bgp::bfd::PeerStatus,
    previous: Option<&crate::crd::BfdSessionStatus>,
    now: Timestamp,
) -> crate::crd::BfdSessionStatus {
    let state = format!("{:?}", b.status.state);
    let kept = previous
        .filter(|p| p.state == state)
        .and_then(|p| p.last_change.clone());
    let changed_at =
        k8s_openapi::jiff::SignedDuration::try_from(Duration::from_secs(b.since_change_s))
            .ok()
            .and_then(|d| now.checked_sub(d).ok())
            .unwrap_or(now);
    crate::crd::BfdSessionStatus {
        state,
        diagnostic: b.status.diag.code(),
        tx_interval_ms: u32::try_from(b.status.tx_interval_ms).unwrap_or(u32::MAX),
        detection_time_ms: u32::try_from(b.status.detection_time_ms).unwrap_or(u32::MAX),
        last_change: Some(kept.unwrap_or_else(|| time(changed_at))),
        control_plane_independent: b.status.control_plane_independent,
        remote_control_plane_independent: b.status.remote_control_plane_independent,
    }
}

/// The object a session's Events are about: the BGPPeer that makes it, or the Node for the mesh.
fn node_key(node: &str) -> ObjectKey {
    ObjectKey {
        api_version: "v1".into(),
        kind: "Node".into(),
        namespace: String::new(),
        name: node.into(),
    }
}

/// The Warning Event's note for a resource the API server forbids the agent.
pub fn forbidden_note(resource: &str) -> String {
    format!(
        "the API server forbids this agent's ServiceAccount to list/watch {resource}: the \
         agent works from a partial view of the cluster until its RBAC (deploy/10-rbac.yaml) \
         grants it"
    )
}

fn session_object(s: &BgpSessionStatus, node: &str) -> ObjectKey {
    match s.source.as_str() {
        "" | "mesh" => node_key(node),
        peer => ObjectKey {
            api_version: crate::crd::API_VERSION.into(),
            kind: "BGPPeer".into(),
            namespace: String::new(),
            name: peer.into(),
        },
    }
}

/// Warning events for session failures: (about, reason, note). A session that was Established and
/// is not any more, and one not Established with a new error (a refused OPEN, a NOTIFICATION).
pub fn session_failures(
    node: &str,
    before: &[BgpSessionStatus],
    now: &[BgpSessionStatus],
) -> Vec<(ObjectKey, String, String)> {
    let mut out = Vec::new();
    for s in now.iter().filter(|s| s.state != "Established") {
        let was = before
            .iter()
            .find(|b| b.peer_ip == s.peer_ip && b.peer_as == s.peer_as);
        let why = s.last_error.as_deref().unwrap_or("no error recorded");
        let (reason, note) = if was.is_some_and(|b| b.state == "Established") {
            (
                "BGPSessionDown",
                format!(
                    "BGP session with {} (AS {}) left Established, now {}: {why}",
                    s.peer_ip, s.peer_as, s.state
                ),
            )
        } else if s.last_error.is_some() && was.is_none_or(|b| b.last_error != s.last_error) {
            (
                "BGPSessionFailed",
                format!(
                    "BGP session with {} (AS {}) is not established ({}): {why}",
                    s.peer_ip, s.peer_as, s.state
                ),
            )
        } else {
            continue;
        };
        out.push((session_object(s, node), reason.to_string(), note));
    }
    out
}

/// The policy a problem is about: a NetworkPolicy (`namespace/name`) or a ClusterNetworkPolicy.
pub fn policy_key(problem: &Problem) -> ObjectKey {
    if problem.kind == sepal_felix::policy::cnp_api::CNP_KIND {
        return ObjectKey {
            api_version: crate::model::CNP_API_VERSION.into(),
            kind: problem.kind.into(),
            namespace: String::new(),
            name: problem.policy.clone(),
        };
    }
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
    /// Resources the API server forbids the agent, already sent as Events.
    forbidden: BTreeSet<&'static str>,
    events: Recorded,
    cluster_policies: super::cnp_status::Written,
}

/// Events recorded so far, by (object, reason, note): a repeat updates the first Event's series.
#[derive(Default)]
struct Recorded(BTreeMap<(ObjectKey, String, String), RecordedEvent>);

struct RecordedEvent {
    namespace: String,
    name: String,
    count: u32,
}

/// Events remembered for deduplication; the oldest are forgotten beyond this.
const RECORDED_MAX: usize = 256;

impl Recorded {
    /// Records a Warning Event, or counts a repeat of one already recorded; false when the API
    /// server did not take it.
    async fn warn(
        &mut self,
        writer: &StatusWriter,
        about: &ObjectKey,
        reason: &str,
        note: &str,
    ) -> bool {
        let key = (about.clone(), reason.to_string(), note.to_string());
        if let Some(e) = self.0.get_mut(&key) {
            match writer
                .event_repeated(&e.namespace, &e.name, e.count + 1, &now_micro_time())
                .await
            {
                Ok(()) => {
                    e.count += 1;
                    return true;
                }
                // Gone (expired, deleted): record it anew.
                Err(err) => tracing::debug!("{err:#}"),
            }
        }
        match writer
            .event(about, true, reason, note, &now_micro_time())
            .await
        {
            Ok((namespace, name)) => {
                if self.0.len() >= RECORDED_MAX {
                    self.0.pop_first();
                }
                self.0.insert(
                    key,
                    RecordedEvent {
                        namespace,
                        name,
                        count: 1,
                    },
                );
                true
            }
            Err(e) => {
                tracing::warn!("{e:#}");
                false
            }
        }
    }
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
    let mut base = ROUND;
    loop {
        let ok = round(&writer, &agent, &mut written).await;
        let jitter = f64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .subsec_nanos()
                % 1000,
        ) / 1000.0;
        let (next_base, pause) = next_pause(base, ok, jitter);
        base = next_base;
        tokio::time::sleep(pause).await;
    }
}

/// One round of writes; false when the API server refused or missed any of them.
async fn round(
    writer: &StatusWriter,
    agent: &Arc<Mutex<crate::node::Agent>>,
    written: &mut Written,
) -> bool {
    let mut ok = true;
    // An agent that started serving without its initial sync (a forbidden resource, an outage)
    // programmed routes from a partial view: the node is not declared up until the sync is done.
    if !written.network_available && crate::metrics::metrics().health.synced() {
        match writer.network_available(&now_time()).await {
            Ok(()) => {
                tracing::info!("node condition NetworkUnavailable=False (SepalIsUp) set");
                written.network_available = true;
            }
            Err(e) => {
                tracing::warn!("{e:#}");
                ok = false;
            }
        }
    }
    let (speaker, bfd, sources, problems, node, cluster_policies) = {
        let a = agent.lock().await;
        (
            a.routing().and_then(|r| r.speaker()),
            a.routing().and_then(|r| r.bfd()),
            a.routing().map(|r| r.peer_sources()).unwrap_or_default(),
            a.policy_problems().to_vec(),
            a.node_name().to_string(),
            a.cluster_network_policies().to_vec(),
        )
    };
    let peers = match speaker {
        Some(s) => s.peers().await.unwrap_or_default(),
        None => Vec::new(),
    };
    let bfd = match bfd {
        Some(b) => b.sessions().await.unwrap_or_default(),
        None => Vec::new(),
    };
    let report = report_of(
        &peers,
        &bfd,
        &sources,
        written.report.as_ref(),
        Timestamp::now(),
        true,
    );
    if written.report.as_ref() != Some(&report) {
        let before = written.report.as_ref().map_or(&[][..], |r| &r.sessions[..]);
        for (about, reason, note) in session_failures(&node, before, &report.sessions) {
            ok &= written.events.warn(writer, &about, &reason, &note).await;
        }
        let stamped = NodeStatusReport {
            last_updated: Some(now_time()),
            ..report.clone()
        };
        match writer.report(&stamped).await {
            Ok(()) => written.report = Some(report),
            Err(e) => {
                tracing::warn!("{e:#}");
                ok = false;
            }
        }
    }
    for p in &problems {
        let text = p.to_string();
        if written.problems.contains(&text) {
            continue;
        }
        if !written
            .events
            .warn(writer, &policy_key(p), "PolicyRejected", &text)
            .await
        {
            // The rest wait for the next round rather than pile onto a failing server.
            ok = false;
            break;
        }
        written.problems.insert(text);
    }
    // A missing RBAC rule: the agent runs, on a partial view; say so on its Node, once per
    // resource while it lasts (the Event's series counts nothing more: it is one condition).
    let forbidden = crate::metrics::metrics().health.forbidden();
    for r in &forbidden {
        if !written.forbidden.contains(r) {
            tracing::error!("{}", forbidden_note(r));
            if written
                .events
                .warn(writer, &node_key(&node), "Forbidden", &forbidden_note(r))
                .await
            {
                written.forbidden.insert(r);
            } else {
                ok = false;
            }
        }
    }
    written.forbidden.retain(|r| forbidden.contains(r));
    // A fixed policy may break the same way again later: report it again then.
    let current: BTreeSet<String> = problems.iter().map(ToString::to_string).collect();
    written.problems.retain(|t| current.contains(t));
    ok &= super::cnp_status::round(
        writer,
        &cluster_policies,
        &mut written.cluster_policies,
        &now_time(),
    )
    .await;
    ok
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
    fn session_failures_go_to_the_object_that_made_the_session() {
        let mut peer = session("10.0.0.1", "Established");
        peer.source = "tor-1".into();
        let mut mesh = session("10.0.0.2", "Active");
        mesh.source = "mesh".into();
        mesh.last_error = None;
        let before = [peer.clone(), mesh.clone()];
        let mut peer_down = peer.clone();
        peer_down.state = "Idle".into();
        let mut mesh_refused = mesh.clone();
        mesh_refused.last_error = Some("OPEN: bad peer AS".into());
        let ev = session_failures("n1", &before, &[peer_down.clone(), mesh_refused.clone()]);
        assert_eq!(ev.len(), 2, "{ev:?}");
        assert_eq!(
            (ev[0].0.kind.as_str(), ev[0].0.name.as_str()),
            ("BGPPeer", "tor-1")
        );
        assert_eq!(ev[0].1, "BGPSessionDown");
        assert!(ev[0].2.contains("10.0.0.1") && ev[0].2.contains("hold timer expired"));
        assert_eq!(
            (ev[1].0.kind.as_str(), ev[1].0.name.as_str()),
            ("Node", "n1")
        );
        assert_eq!(ev[1].1, "BGPSessionFailed");
        assert!(ev[1].2.contains("bad peer AS"), "{}", ev[1].2);
        // Nothing new: nothing to report; coming up is no failure.
        let now = [peer_down, mesh_refused];
        assert!(session_failures("n1", &now, &now).is_empty());
        assert!(session_failures("n1", &now, &before[..1]).is_empty());
    }

    #[test]
    fn sessions_carry_their_source_and_the_time_of_their_last_change() {
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let later: Timestamp = "2026-01-01T00:05:00Z".parse().unwrap();
        let peer = |state, uptime: Option<u64>| PeerStatus {
            address: "10.0.0.1".parse().unwrap(),
            remote_as: 65000,
            state,
            uptime: uptime.map(Duration::from_secs),
            messages_in: 0,
            messages_out: 0,
            updates_in: 0,
            updates_out: 0,
            prefixes_received: 0,
            prefixes_accepted: 0,
            prefixes_advertised: 0,
            last_error: None,
            last_notification_sent: None,
            last_notification_received: None,
            negotiated: None,
            graceful_restart_active: false,
        };
        let sources = BTreeMap::from([("10.0.0.1".parse().unwrap(), "tor".to_string())]);
        use sepal_bgp::fsm::State;
        // Already up when first seen: since it came up.
        let r1 = report_of(
            &[peer(State::Established, Some(60))],
            &[],
            &sources,
            None,
            t0,
            true,
        );
        assert_eq!(r1.sessions[0].source, "tor");
        assert_eq!(
            r1.sessions[0].since.as_deref(),
            Some("2025-12-31T23:59:00Z")
        );
        // Same state later: the same time, so the report is unchanged and not rewritten.
        let r2 = report_of(
            &[peer(State::Established, Some(360))],
            &[],
            &sources,
            Some(&r1),
            later,
            true,
        );
        assert_eq!(r2, r1);
        // A change of state: now.
        let r3 = report_of(
            &[peer(State::Active, None)],
            &[],
            &sources,
            Some(&r2),
            later,
            true,
        );
        assert_eq!(
            r3.sessions[0].since.as_deref(),
            Some("2026-01-01T00:05:00Z")
        );
        assert_eq!(r3.established_sessions, 0);
    }

    #[test]
    fn bfd_shows_intervals_c_bits_and_a_stable_last_change() {
        use sepal_bgp::bfd::{Diag, PeerStatus as BfdPeer, State, Status};
        let t0: Timestamp = "2026-01-01T00:00:00Z".parse().unwrap();
        let later: Timestamp = "2026-01-01T00:05:00Z".parse().unwrap();
        let bfd = |state, since_change_s| BfdPeer {
            peer: "10.0.0.1".parse().unwrap(),
            status: Status {
                state,
                remote_state: state,
                diag: Diag::None,
                remote_diag: Diag::None,
                local_discriminator: 1,
                remote_discriminator: 2,
                tx_interval_ms: 300,
                detection_time_ms: 900,
                control_plane_independent: true,
                remote_control_plane_independent: false,
            },
            since_change_s,
        };
        let r1 = bfd_status(&bfd(State::Up, 30), None, t0);
        assert_eq!(r1.state, "Up");
        assert_eq!((r1.tx_interval_ms, r1.detection_time_ms), (300, 900));
        assert!(r1.control_plane_independent && !r1.remote_control_plane_independent);
        assert_eq!(r1.last_change.as_deref(), Some("2025-12-31T23:59:30Z"));
        // Same state five minutes on (since_change_s rounds): the time first reported stays.
        let r2 = bfd_status(&bfd(State::Up, 331), Some(&r1), later);
        assert_eq!(r2, r1);
        // Down: the time of the change.
        let r3 = bfd_status(&bfd(State::Down, 0), Some(&r2), later);
        assert_eq!(r3.last_change.as_deref(), Some("2026-01-01T00:05:00Z"));
    }

    /// Against a real API server, as the agent's ServiceAccount under the shipped RBAC.
    #[tokio::test]
    async fn a_repeated_event_updates_its_series() {
        let c = sepal_tests::kube::Cluster::start();
        c.install_sepal();
        let kc = c.agent_kubeconfig(None);
        let w = StatusWriter::new(super::super::kube::client(Some(&kc)).await.unwrap(), "n1");
        let mut s = session("10.0.0.1", "Idle");
        s.source = "tor-1".into();
        let peer = session_object(&s, "n1");
        let mut recorded = Recorded::default();
        for _ in 0..3 {
            assert!(recorded.warn(&w, &peer, "BGPSessionDown", "down").await);
        }
        assert!(recorded.warn(&w, &peer, "BGPSessionDown", "other").await);
        let events = c.list("events.events.k8s.io", &["-n", "default"]);
        assert_eq!(events.len(), 2, "{events:?}");
        let first = events.iter().find(|e| e["note"] == "down").unwrap();
        assert_eq!(first["series"]["count"], 3);
        assert_eq!(first["regarding"]["kind"], "BGPPeer");
        assert_eq!(first["metadata"]["namespace"], "default");
        // An Event that went away (expired) is recorded anew.
        let name = first["metadata"]["name"].as_str().unwrap();
        c.delete("events.events.k8s.io", "default", name);
        assert!(recorded.warn(&w, &peer, "BGPSessionDown", "down").await);
        assert_eq!(c.list("events.events.k8s.io", &["-n", "default"]).len(), 2);
    }

    #[test]
    fn problems_are_reported_on_their_policy() {
        let problem = |kind, policy: &str| Problem {
            kind,
            policy: policy.into(),
            field: "spec.tier".into(),
            message: "m".into(),
            scope: sepal_felix::policy::ProblemScope::Policy,
        };
        let np = policy_key(&problem("NetworkPolicy", "web/deny"));
        assert_eq!(np.to_string(), "NetworkPolicy web/deny");
        // Cluster-scoped: its Events go to `default`, as kubectl looks for them.
        let cnp = policy_key(&problem("ClusterNetworkPolicy", "deny-all"));
        assert_eq!(cnp.to_string(), "ClusterNetworkPolicy deny-all");
        assert_eq!(cnp.api_version, crate::model::CNP_API_VERSION);
    }

    #[test]
    fn failed_rounds_back_off_with_jitter_and_success_resets() {
        let (mut base, mut pause) = (ROUND, ROUND);
        for _ in 0..10 {
            (base, pause) = next_pause(base, false, 1.0);
        }
        assert_eq!((base, pause), (MAX_BACKOFF, MAX_BACKOFF));
        assert_eq!(next_pause(base, false, 0.0).1, MAX_BACKOFF / 2);
        assert_eq!(next_pause(ROUND, false, 1.0).0, ROUND * 2);
        assert_eq!(next_pause(base, true, 1.0), (ROUND, ROUND));
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
