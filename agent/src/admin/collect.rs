//! Answers operator requests from the agent's state and the kernel: copies what it needs under
//! the agent's lock, then asks the BGP speaker and netlink without holding it.

use super::{
    AdminRequest, BfdReport, BgpOrigin, BgpReport, DatastoreReport, EndpointReport, IpamReport,
    PeerReport, RouteReport, StatusReport,
};
use crate::metrics::metrics;
use crate::node::Agent;
use ipnet::IpNet;
use ipnetwork::IpNetwork;
use sepal_bgp::{BestRoute, PeerStatus, Source, Speaker};
use sepal_felix::routes::{RouteReconciler, Target};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use tokio::sync::Mutex;

/// The request's report as JSON, or a message for the operator.
pub async fn answer(
    agent: &Arc<Mutex<Agent>>,
    req: AdminRequest,
) -> Result<serde_json::Value, String> {
    let value = match req {
        AdminRequest::Status => serde_json::to_value(status(agent).await),
        AdminRequest::Routes => serde_json::to_value(routes(agent).await?),
        AdminRequest::Endpoints => serde_json::to_value(endpoints(agent).await?),
        AdminRequest::Trace(t) => serde_json::to_value(super::trace::hop(agent, &t).await?),
        AdminRequest::PolicyExplain(t) => {
            serde_json::to_value(crate::policy_explain::answer(agent, &t).await?)
        }
        AdminRequest::Flows(r) => {
            let flows = agent.lock().await.flow_logs().clone();
            serde_json::to_value(flows.report(&r)?)
        }
    };
    value.map_err(|e| format!("encoding the report: {e}"))
}

/// Ready: the datastore synced, the node's blocks are known and routes are programmed.
pub fn ready(has_blocks: bool) -> bool {
    let health = &metrics().health;
    has_blocks && health.synced() && health.routes_programmed()
}

pub async fn status(agent: &Arc<Mutex<Agent>>) -> StatusReport {
    let (node, blocks, allocated, has_blocks, speaker, bfd, warnings) = {
        let a = agent.lock().await;
        (
            a.node_name().to_string(),
            a.pod_blocks(),
            a.allocations().len(),
            a.has_blocks(),
            a.routing().and_then(|r| r.speaker()),
            a.routing().and_then(|r| r.bfd()),
            a.routing().map(|r| r.warnings()).unwrap_or_default(),
        )
    };
    let peers = match &speaker {
        Some(s) => s.peers().await.unwrap_or_default(),
        None => Vec::new(),
    };
    let bfd = match &bfd {
        Some(b) => b.sessions().await.unwrap_or_default(),
        None => Vec::new(),
    };
    let health = &metrics().health;
    StatusReport {
        node,
        blocks: blocks.iter().map(|b| b.to_string()).collect(),
        datastore: DatastoreReport {
            source: health.datastore(),
            synced: health.synced(),
            objects: health.objects(),
            forbidden: health.forbidden().iter().map(|r| r.to_string()).collect(),
        },
        ready: ready(has_blocks),
        endpoints: allocated,
        ipam: IpamReport {
            allocated,
            capacity: blocks
                .iter()
                .map(|b| (b.to_string(), crate::ipam::capacity(*b)))
                .collect(),
        },
        bgp: BgpReport {
            running: speaker.is_some(),
            peers: peers.iter().map(peer_report).collect(),
            warnings,
            bfd: bfd.iter().map(bfd_report).collect(),
        },
    }
}

pub fn bfd_report(b: &sepal_bgp::bfd::PeerStatus) -> BfdReport {
    let s = &b.status;
    BfdReport {
        peer: b.peer,
        state: format!("{:?}", s.state),
        remote_state: format!("{:?}", s.remote_state),
        diag: format!("{:?}", s.diag),
        remote_diag: format!("{:?}", s.remote_diag),
        diag_code: s.diag.code(),
        tx_interval_ms: s.tx_interval_ms,
        detection_time_ms: s.detection_time_ms,
        since_change_secs: b.since_change_s,
        control_plane_independent: s.control_plane_independent,
        remote_control_plane_independent: s.remote_control_plane_independent,
    }
}

fn peer_report(p: &PeerStatus) -> PeerReport {
    PeerReport {
        address: p.address,
        remote_as: p.remote_as,
        state: format!("{:?}", p.state),
        uptime_secs: p.uptime.map(|u| u.as_secs()),
        prefixes_received: p.prefixes_received,
        prefixes_accepted: p.prefixes_accepted,
        prefixes_advertised: p.prefixes_advertised,
        updates_in: p.updates_in,
        updates_out: p.updates_out,
        last_error: p.last_error.clone(),
        last_notification_sent: p.last_notification_sent.as_ref().map(|n| n.to_string()),
        last_notification_received: p.last_notification_received.as_ref().map(|n| n.to_string()),
    }
}

/// The speaker's best routes, by prefix.
pub async fn best_routes(speaker: Option<&Speaker>) -> BTreeMap<IpNet, BestRoute> {
    match speaker {
        Some(s) => s.routes().await.unwrap_or_default().into_iter().collect(),
        None => BTreeMap::new(),
    }
}

pub fn origin(prefix: &IpNet, best: &BestRoute) -> BgpOrigin {
    let as_path = best
        .attrs
        .as_path
        .iter()
        .flat_map(|seg| match seg {
            sepal_bgp::wire::Segment::Sequence(v) | sepal_bgp::wire::Segment::Set(v) => {
                v.iter().copied()
            }
        })
        .collect();
    BgpOrigin {
        prefix: prefix.to_string(),
        peer: match best.source {
            Source::Peer(a) => Some(a),
            Source::Local => None,
        },
        as_path,
        next_hops: best.next_hops.clone(),
        local_pref: best.attrs.local_pref,
        med: best.attrs.med,
    }
}

fn to_ipnet(n: &IpNetwork) -> Option<IpNet> {
    IpNet::new(n.network(), n.prefix()).ok()
}

async fn routes(agent: &Arc<Mutex<Agent>>) -> Result<Vec<RouteReport>, String> {
    let (handle, speaker) = {
        let a = agent.lock().await;
        (a.netlink().clone(), a.routing().and_then(|r| r.speaker()))
    };
    let kernel = RouteReconciler::new(handle)
        .kernel_routes()
        .await
        .map_err(|e| format!("reading the kernel's routes: {e}"))?;
    let best = best_routes(speaker.as_ref()).await;
    let mut out: Vec<RouteReport> = kernel
        .into_iter()
        .map(|r| {
            let bgp = to_ipnet(&r.dst).and_then(|p| best.get(&p).map(|b| origin(&p, b)));
            let (kind, device, gateways) = match r.target {
                Target::Blackhole => ("blackhole", None, Vec::new()),
                Target::Dev(d) => ("pod", Some(d), Vec::new()),
                Target::Via(hops) => ("bgp", None, hops.iter().map(|h| h.gateway).collect()),
            };
            RouteReport {
                destination: r.dst.to_string(),
                kind: kind.to_string(),
                device,
                gateways,
                bgp,
            }
        })
        .collect();
    out.sort_by(|a, b| a.destination.cmp(&b.destination));
    Ok(out)
}

async fn endpoints(agent: &Arc<Mutex<Agent>>) -> Result<Vec<EndpointReport>, String> {
    let (handle, allocations) = {
        let a = agent.lock().await;
        (a.netlink().clone(), a.allocations().to_vec())
    };
    let links: HashSet<String> = sepal_felix::links::all_links(&handle)
        .await
        .map_err(|e| format!("listing links: {e}"))?
        .into_iter()
        .map(|l| l.name)
        .collect();
    let kernel = RouteReconciler::new(handle)
        .kernel_routes()
        .await
        .map_err(|e| format!("reading the kernel's routes: {e}"))?;
    let routed_to: BTreeMap<IpNetwork, Target> =
        kernel.into_iter().map(|r| (r.dst, r.target)).collect();
    Ok(allocations
        .into_iter()
        .map(|a| {
            let want = Target::Dev(a.host_veth.clone());
            let routed = links.contains(&a.host_veth)
                && a.ips
                    .iter()
                    .all(|ip| routed_to.get(&sepal_felix::routes::host_net(*ip)) == Some(&want));
            EndpointReport {
                namespace: a.pod_namespace,
                pod: a.pod_name,
                container_id: a.key.container_id,
                interface: a.key.ifname,
                ips: a.ips,
                host_veth: a.host_veth,
                routed,
            }
        })
        .collect())
}
