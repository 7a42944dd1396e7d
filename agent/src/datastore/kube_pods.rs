// The Pod watch, in protobuf (see `proto`): a cluster has far more Pods than anything else, and
// at 30,000 of them the JSON watch spent seconds in the API server's encoder alone.
//
// The initial state comes as a watch list (`sendInitialEvents=true`): the server streams every
// Pod from its watch cache as an ADDED event, then a bookmark marking the end of the initial
// events. Later watches resume from the last resourceVersion seen (bookmarks included). 410 Gone
// (the version was compacted away) starts a new watch list, and the model drops what it no longer
// returns. A server that refuses the watch list or protobuf falls back to the JSON watcher the
// other resources use, which lists in pages.

use super::kube::{report_watch_failure, run_watcher, SyncGate};
use super::proto::{self, PodEvent};
use crate::model::wire::PodWire;
use crate::model::{Event, KindKey, Object, PodInfo};
use http_body_util::BodyExt;
use kube::Client;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const WHAT: &str = "pods";
/// The server ends a watch after this long (the client's choice); the next resumes.
const WATCH_SECONDS: u64 = 290;
/// Silence longer than this means a dead connection: the server sends a bookmark every minute.
const IDLE: Duration = Duration::from_secs(WATCH_SECONDS + 30);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// How one watch request ended.
enum Outcome {
    /// The server closed it (its timeout): resume from the last version seen.
    Ended,
    /// 410 Gone: that version is compacted away; list again.
    Gone,
    /// The server does not serve this watch (no WatchList, no protobuf): use the JSON watcher.
    Unsupported(String),
    Failed {
        forbidden: bool,
        text: String,
    },
    /// The model's receiver went away: the agent is stopping.
    Closed,
}

/// What the watch has seen so far.
struct Progress {
    /// Where a resumed watch starts; `None` until a watch list has completed.
    resume: Option<String>,
    synced: bool,
}

pub(super) async fn run(client: Client, tx: mpsc::Sender<Event>, gate: Arc<SyncGate>) {
    let mut progress = Progress {
        resume: None,
        synced: false,
    };
    let mut failures = 0u32;
    loop {
        let outcome = watch_once(&client, &tx, &gate, &mut progress).await;
        match outcome {
            Outcome::Ended => failures = 0,
            Outcome::Gone => {
                tracing::info!(resource = WHAT, "watch expired (410 Gone): listing again");
                progress.resume = None;
            }
            Outcome::Unsupported(why) if !progress.synced => {
                tracing::info!(
                    resource = WHAT,
                    "the API server does not stream Pods in protobuf ({why}): watching in JSON"
                );
                let api = kube::Api::<PodWire>::all(client);
                let kind = pod_kind();
                let convert = |p| PodInfo::from_wire(p).map(|p| Object::Pod(Box::new(p)));
                return run_watcher(WHAT, kind, api, convert, tx, gate).await;
            }
            Outcome::Unsupported(text) => {
                failures += 1;
                report_watch_failure(WHAT, false, &text, progress.synced, failures);
            }
            Outcome::Failed { forbidden, text } => {
                failures += 1;
                report_watch_failure(WHAT, forbidden, &text, progress.synced, failures);
            }
            Outcome::Closed => return,
        }
        if failures > 0 {
            // 0.5 s doubling to 30 s, as the other watchers back off.
            let wait = Duration::from_millis(500).saturating_mul(1 << (failures - 1).min(6));
            tokio::time::sleep(wait.min(BACKOFF_MAX)).await;
        }
    }
}

fn pod_kind() -> KindKey {
    KindKey {
        api_version: "v1".into(),
        kind: "Pod".into(),
    }
}

fn path(resume: Option<&str>) -> String {
    let common = format!("watch=1&allowWatchBookmarks=true&timeoutSeconds={WATCH_SECONDS}");
    match resume {
        None => format!(
            "/api/v1/pods?{common}&sendInitialEvents=true&resourceVersionMatch=NotOlderThan"
        ),
        Some(rv) => format!("/api/v1/pods?{common}&resourceVersion={rv}"),
    }
}

async fn watch_once(
    client: &Client,
    tx: &mpsc::Sender<Event>,
    gate: &SyncGate,
    progress: &mut Progress,
) -> Outcome {
    let initial = progress.resume.is_none();
    let request = http::Request::get(path(progress.resume.as_deref()))
        .header(http::header::ACCEPT, proto::ACCEPT_WATCH)
        .body(kube::client::Body::from(Vec::new()));
    let request = match request {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let response = match client.send(request).await {
        Ok(r) => r,
        Err(e) => return failed(e),
    };
    let status = response.status();
    if !status.is_success() {
        return match status.as_u16() {
            410 => Outcome::Gone,
            // Invalid parameters (no WatchList) or a content type it will not send.
            400 | 406 | 415 | 422 => Outcome::Unsupported(format!("HTTP {status}")),
            403 => Outcome::Failed {
                forbidden: true,
                text: format!("watching pods: HTTP {status}"),
            },
            _ => Outcome::Failed {
                forbidden: false,
                text: format!("watching pods: HTTP {status}"),
            },
        };
    }
    if initial && tx.send(Event::ListStart(pod_kind())).await.is_err() {
        return Outcome::Closed;
    }
    // Served: whatever RBAC refused before is granted now.
    crate::metrics::metrics().health.set_forbidden(WHAT, false);
    let mut body = response.into_body();
    let mut framer = proto::Framer::default();
    // Events of this watch; during a watch list, the pods listed so far. The resume point is set
    // only once the initial events are complete: a cut watch list starts over.
    let mut events = 0usize;
    let mut listed = 0usize;
    loop {
        let chunk = match tokio::time::timeout(IDLE, body.frame()).await {
            Err(_) => return failed(format!("no event or bookmark for {IDLE:?}")),
            Ok(None) => {
                return if initial && !progress.synced && events == 0 {
                    // Closed before any event: a server that ignored sendInitialEvents.
                    Outcome::Unsupported("the watch list ended without events".into())
                } else {
                    Outcome::Ended
                };
            }
            Ok(Some(Err(e))) => return failed(e),
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(data) => data,
                Err(_) => continue,
            },
        };
        framer.push(&chunk);
        loop {
            let frame = match framer.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return failed(e),
            };
            let event = match proto::decode_pod_event(frame) {
                Ok(ev) => ev,
                Err(e) => return failed(format!("decoding a pod watch event: {e}")),
            };
            events += 1;
            let in_initial = initial && progress.resume.is_none();
            let model_event = match event {
                PodEvent::Added(p) | PodEvent::Modified(p) => {
                    if in_initial {
                        listed += 1;
                    } else {
                        resume_after(&p, progress);
                    }
                    PodInfo::from_wire(p).map(|p| Event::Upsert(Object::Pod(Box::new(p))))
                }
                PodEvent::Deleted(p) => {
                    if !in_initial {
                        resume_after(&p, progress);
                    }
                    PodInfo::from_wire(p).map(|p| Event::Delete(Object::Pod(Box::new(p)).key()))
                }
                PodEvent::Bookmark {
                    resource_version,
                    initial_end,
                } => {
                    if in_initial && initial_end {
                        progress.resume = Some(resource_version);
                        if tx.send(Event::ListEnd(pod_kind())).await.is_err() {
                            return Outcome::Closed;
                        }
                        if !progress.synced {
                            progress.synced = true;
                            tracing::info!(resource = WHAT, objects = listed, "initial list done");
                            if !gate.done(tx).await {
                                return Outcome::Closed;
                            }
                        }
                    } else if !in_initial {
                        progress.resume = Some(resource_version);
                    }
                    None
                }
                PodEvent::Error(s) if s.code == 410 => return Outcome::Gone,
                PodEvent::Error(s) => {
                    return Outcome::Failed {
                        forbidden: s.code == 403,
                        text: format!("watching pods: {} ({}): {}", s.code, s.reason, s.message),
                    }
                }
            };
            if let Some(ev) = model_event {
                if tx.send(ev).await.is_err() {
                    return Outcome::Closed;
                }
            }
        }
    }
}

/// After the watch list, each event's resourceVersion is where a new watch resumes.
fn resume_after(pod: &PodWire, progress: &mut Progress) {
    if let Some(rv) = &pod.metadata.resource_version {
        progress.resume = Some(rv.clone());
    }
}

fn failed(e: impl std::fmt::Display) -> Outcome {
    Outcome::Failed {
        forbidden: false,
        text: format!("watching pods: {e}"),
    }
}
