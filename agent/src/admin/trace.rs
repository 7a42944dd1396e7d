//! One node's part of `sepal trace`: which local pod the packet leaves or reaches, the kernel's
//! route lookup, the BGP route behind it, and what NetworkPolicy decides (felix's `explain`).

use super::collect::{best_routes, origin};
use super::lookup::{route_get, Ingress};
use super::{Flow, TraceEndpoint, TraceHop, TraceRequest};
use crate::node::Agent;
use ipnet::IpNet;
use sepal_bgp::Source;
use sepal_felix::policy::Cluster;
use sepal_felix::policy::{explain, DirectionVerdict, ExplainPeer as Peer};
use std::net::IpAddr;
use std::sync::Arc;
use tokio::sync::Mutex;

/// The address an end of the packet uses: a pod's address of the wanted family, or the IP given.
fn address_of(cluster: &Cluster, peer: &Peer, v4: Option<bool>) -> Result<IpAddr, String> {
    match peer {
        Peer::Ip(ip) => Ok(*ip),
        Peer::Pod { namespace, name } => cluster
            .pod(namespace, name)
            .ok_or_else(|| format!("pod {peer} is not known to this node's agent"))?
            .ips
            .iter()
            .find(|ip| v4.is_none_or(|v4| ip.is_ipv4() == v4))
            .copied()
            .ok_or_else(|| match v4 {
                Some(true) => format!("pod {peer} has no IPv4 address"),
                Some(false) => format!("pod {peer} has no IPv6 address"),
                None => format!("pod {peer} has no address yet"),
            }),
    }
}

pub fn verdict_text(v: &DirectionVerdict) -> String {
    match v {
        DirectionVerdict::NotAPod => "not a pod: no policy applies".into(),
        DirectionVerdict::NotIsolated => "allowed: no policy selects the pod".into(),
        DirectionVerdict::Allowed { comment, .. } => format!("allowed by {comment}"),
        DirectionVerdict::Denied { isolated_by } => format!(
            "DENIED: isolated by {} and no rule matches",
            isolated_by.join(", ")
        ),
        DirectionVerdict::Cluster(rule) if v.allows() => format!("accepted by {rule}"),
        DirectionVerdict::Cluster(rule) => format!("DENIED by {rule}"),
    }
}

/// The addresses the packet uses: the ends' own, or the pods' of the same family.
pub fn addresses(cluster: &Cluster, flow: &Flow) -> Result<(IpAddr, IpAddr), String> {
    match &flow.to {
        Peer::Ip(ip) => Ok((address_of(cluster, &flow.from, Some(ip.is_ipv4()))?, *ip)),
        Peer::Pod { .. } => {
            let src = address_of(cluster, &flow.from, None)?;
            Ok((src, address_of(cluster, &flow.to, Some(src.is_ipv4()))?))
        }
    }
}

pub async fn hop(agent: &Arc<Mutex<Agent>>, req: &TraceRequest) -> Result<TraceHop, String> {
    let flow = req.flow()?;
    let (node, cluster, allocations, handle, speaker) = {
        let a = agent.lock().await;
        (
            a.node_name().to_string(),
            a.policy_cluster(),
            a.allocations().to_vec(),
            a.netlink().clone(),
            a.routing().and_then(|r| r.speaker()),
        )
    };
    let (src_ip, dst_ip) = addresses(&cluster, &flow)?;
    let verdict = explain(&cluster, &flow.from, &flow.to, flow.protocol, flow.port)
        .map_err(|e| e.to_string())?;
    let local = |ip: IpAddr| {
        allocations
            .iter()
            .find(|a| a.ips.contains(&ip))
            .map(|a| TraceEndpoint {
                pod: format!("{}/{}", a.pod_namespace, a.pod_name),
                ip,
                interface: a.key.ifname.clone(),
                host_veth: a.host_veth.clone(),
            })
    };
    let source = local(src_ip);
    let destination = local(dst_ip);
    let ingress = match &source {
        Some(s) => sepal_felix::links::link_by_name(&handle, &s.host_veth)
            .await
            .ok()
            .flatten()
            .map(|l| Ingress {
                src: src_ip,
                ifindex: l.index,
            }),
        None => None,
    };
    let lookup = route_get(&handle, dst_ip, ingress).await;
    // The BGP route the kernel's lookup follows: the longest learned prefix holding the address.
    let best = best_routes(speaker.as_ref()).await;
    let bgp = best
        .iter()
        .filter(|(p, b)| p.contains(&dst_ip) && matches!(b.source, Source::Peer(_)))
        .max_by_key(|(p, _)| p.prefix_len())
        .map(|(p, b): (&IpNet, _)| origin(p, b));
    Ok(TraceHop {
        node,
        src_ip,
        dst_ip,
        source,
        destination,
        lookup,
        bgp,
        egress: verdict_text(&verdict.egress),
        ingress: verdict_text(&verdict.ingress),
        allowed: verdict.allowed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sepal_felix::policy::Pod;

    fn cluster() -> Cluster {
        Cluster {
            pods: vec![Pod {
                namespace: "ns".into(),
                name: "dual".into(),
                ips: vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
                ..Pod::default()
            }
            .into()],
            ..Cluster::default()
        }
    }

    #[test]
    fn ends_resolve_to_an_address_of_the_wanted_family() {
        let c = cluster();
        let pod: Peer = "ns/dual".parse().unwrap();
        assert_eq!(
            address_of(&c, &pod, None).unwrap(),
            "10.0.0.5".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            address_of(&c, &pod, Some(false)).unwrap(),
            "fd00::5".parse::<IpAddr>().unwrap()
        );
        let ip: Peer = "192.0.2.1".parse().unwrap();
        assert_eq!(
            address_of(&c, &ip, Some(false)).unwrap(),
            "192.0.2.1".parse::<IpAddr>().unwrap()
        );
        let unknown: Peer = "ns/gone".parse().unwrap();
        assert!(address_of(&c, &unknown, None)
            .unwrap_err()
            .contains("not known"));
    }

    #[test]
    fn verdicts_read_as_sentences() {
        let denied = DirectionVerdict::Denied {
            isolated_by: vec!["ns/a".into(), "ns/b".into()],
        };
        assert_eq!(
            verdict_text(&denied),
            "DENIED: isolated by ns/a, ns/b and no rule matches"
        );
        assert!(verdict_text(&DirectionVerdict::NotIsolated).starts_with("allowed"));
    }
}
