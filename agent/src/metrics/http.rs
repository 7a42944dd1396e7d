//! The HTTP endpoint kubelet and Prometheus use: `/metrics` (text exposition), `/healthz` (the
//! agent's event loop runs and its lock is not stuck), `/readyz` (synced and routes programmed).

use super::{metrics, Metrics};
use crate::admin::{collect, StatusReport};
use crate::node::Agent;
use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Mutex;

/// An agent whose lock is held longer than this, or whose event loop has not run for this long,
/// is stuck: `/healthz` fails and kubelet restarts it.
const LIVENESS_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the agent's event loop proves it runs (see [`heartbeat`]).
const HEARTBEAT: Duration = Duration::from_millis(500);

/// Runs on the agent's event loop: a loop blocked in a system call (a hung disk under the state
/// directory, an nft that never returns) stops beating, whether or not it holds the lock.
pub async fn heartbeat() {
    loop {
        metrics().health.beat();
        tokio::time::sleep(HEARTBEAT).await;
    }
}

/// Binds `addr` and serves it on a thread of its own, with a runtime of its own. The agent's
/// event loop is single-threaded: served there, the probes meant to notice that loop being
/// stuck would be stuck with it and time out instead of failing with a reason.
pub fn spawn(addr: SocketAddr, agent: Arc<Mutex<Agent>>) -> Result<()> {
    let listener = std::net::TcpListener::bind(addr)
        .with_context(|| format!("binding the metrics address {addr}"))?;
    listener.set_nonblocking(true)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("sepal-metrics".into())
        .spawn(move || {
            runtime.block_on(async move {
                match TcpListener::from_std(listener) {
                    Ok(l) => serve(l, agent).await,
                    Err(e) => tracing::error!("metrics listener: {e}"),
                }
            })
        })?;
    Ok(())
}

/// Serves until the process stops.
pub async fn serve(listener: TcpListener, agent: Arc<Mutex<Agent>>) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics and health serving");
    }
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!("metrics accept: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let agent = agent.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(req, &agent).await) }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await
            {
                tracing::debug!("metrics connection: {e}");
            }
        });
    }
}

fn text(status: StatusCode, body: String, content_type: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = content_type.parse() {
        resp.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    resp
}

async fn respond<B>(req: Request<B>, agent: &Arc<Mutex<Agent>>) -> Response<Full<Bytes>> {
    const PLAIN: &str = "text/plain; charset=utf-8";
    match req.uri().path() {
        "/metrics" => {
            let status = collect::status(agent).await;
            let learned = {
                let a = agent.lock().await;
                a.routing().map(|r| r.route_count()).unwrap_or(0)
            };
            // The policy table's counters come from an nft process: off this thread's loop.
            let rules = tokio::task::spawn_blocking(super::rules::read_kernel).await;
            match rules {
                Ok(Ok(rules)) => metrics().policy_rules.observe(&rules),
                Ok(Err(e)) => tracing::debug!("per-rule policy counters not read: {e}"),
                Err(e) => tracing::debug!("per-rule policy counters not read: {e}"),
            }
            let body = metrics().render(|m| refresh(m, &status, learned));
            text(
                StatusCode::OK,
                body,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
        }
        "/healthz" => {
            if let Some(age) = metrics()
                .health
                .since_beat()
                .filter(|age| *age > LIVENESS_TIMEOUT)
            {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the agent's event loop has not run for {age:.1?}\n"),
                    PLAIN,
                );
            }
            match tokio::time::timeout(LIVENESS_TIMEOUT, agent.lock()).await {
                Ok(_) => text(StatusCode::OK, "ok\n".into(), PLAIN),
                Err(_) => text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("the agent has been busy for over {LIVENESS_TIMEOUT:?}\n"),
                    PLAIN,
                ),
            }
        }
        "/readyz" => {
            let Ok(agent) = tokio::time::timeout(LIVENESS_TIMEOUT, agent.lock()).await else {
                return text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: the agent has been busy for over {LIVENESS_TIMEOUT:?}\n"),
                    PLAIN,
                );
            };
            let has_blocks = agent.has_blocks();
            drop(agent);
            let health = &metrics().health;
            if collect::ready(has_blocks) {
                text(StatusCode::OK, "ok\n".into(), PLAIN)
            } else {
                let forbidden = health.forbidden();
                let forbidden = (!forbidden.is_empty()).then(|| {
                    format!(
                        "the API server forbids this agent {} (RBAC)",
                        forbidden.join(", ")
                    )
                });
                let missing: Vec<&str> = [
                    (!health.synced()).then_some("datastore not synced"),
                    forbidden.as_deref(),
                    (!has_blocks).then_some("no pod block for this node"),
                    (!health.routes_programmed()).then_some("routes not programmed"),
                ]
                .into_iter()
                .flatten()
                .collect();
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!("not ready: {}\n", missing.join(", ")),
                    PLAIN,
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /metrics, /healthz, /readyz\n".into(),
            PLAIN,
        ),
    }
}

/// Scrape-time series from the agent's status: peers that went away disappear.
fn refresh(m: &Metrics, status: &StatusReport, bgp_routes: usize) {
    m.ready.set(status.ready as i64);
    m.datastore_synced.set(status.datastore.synced as i64);
    m.endpoints.set(status.endpoints as i64);
    m.ipam_allocated.set(status.ipam.allocated as i64);
    m.bgp_routes_installed.set(bgp_routes as i64);
    m.ipam_capacity.clear();
    for (block, n) in &status.ipam.capacity {
        m.ipam_capacity
            .get_or_create(&vec![("block", block.clone())])
            .set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
    for family in [
        &m.bgp_session_up,
        &m.bgp_session_state,
        &m.bgp_session_uptime,
        &m.bgp_prefixes_received,
        &m.bgp_prefixes_accepted,
        &m.bgp_prefixes_advertised,
    ] {
        family.clear();
    }
    m.bgp_updates_received.clear();
    m.bgp_updates_sent.clear();
    for family in [
        &m.bfd_session_up,
        &m.bfd_detection_time,
        &m.bfd_last_diagnostic,
    ] {
        family.clear();
    }
    for b in &status.bgp.bfd {
        let peer = vec![("peer", b.peer.to_string())];
        m.bfd_session_up
            .get_or_create(&peer)
            .set((b.state == "Up") as i64);
        m.bfd_detection_time
            .get_or_create(&peer)
            .set(b.detection_time_ms as i64);
        m.bfd_last_diagnostic
            .get_or_create(&peer)
            .set(i64::from(b.diag_code));
    }
    for p in &status.bgp.peers {
        let peer = vec![
            ("peer", p.address.to_string()),
            ("remote_as", p.remote_as.to_string()),
        ];
        m.bgp_session_up
            .get_or_create(&peer)
            .set((p.state == "Established") as i64);
        m.bgp_session_uptime
            .get_or_create(&peer)
            .set(p.uptime_secs.unwrap_or(0) as i64);
        let mut with_state = peer.clone();
        with_state.push(("state", p.state.clone()));
        m.bgp_session_state.get_or_create(&with_state).set(1);
        m.bgp_prefixes_received
            .get_or_create(&peer)
            .set(p.prefixes_received as i64);
        m.bgp_prefixes_accepted
            .get_or_create(&peer)
            .set(p.prefixes_accepted as i64);
        m.bgp_prefixes_advertised
            .get_or_create(&peer)
            .set(p.prefixes_advertised as i64);
        m.bgp_updates_received
            .get_or_create(&peer)
            .inc_by(p.updates_in);
        m.bgp_updates_sent
            .get_or_create(&peer)
            .inc_by(p.updates_out);
    }
}
