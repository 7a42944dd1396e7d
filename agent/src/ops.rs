//! The operator commands: `sepal status`, `routes`, `endpoints` and `trace`. They ask a running
//! agent over its operator socket (`crate::admin`) — on this node, or on a node of a `sepal lab`.

use crate::admin::{
    self, AdminRequest, EndpointReport, RouteReport, StatusReport, TraceHop, TraceRequest,
};
use crate::lab::state::LabState;
use crate::lab::topology::DEFAULT_LAB;
use anyhow::{bail, Context, Result};
use clap::Args;
use ipnetwork::IpNetwork;
use serde::{de::DeserializeOwned, Serialize};
use std::net::IpAddr;
use std::path::PathBuf;

/// Which agent to ask.
#[derive(Debug, Clone, Args)]
pub struct AgentTarget {
    /// The agent's operator socket [default: /run/sepal/admin.sock].
    #[arg(long, env = "SEPAL_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// Ask the agent of this node of a `sepal lab` (the lab named by --lab).
    #[arg(long, conflicts_with = "admin_socket")]
    pub node: Option<String>,
    /// The lab whose agents to ask [default: the default lab when --node is given].
    #[arg(long, conflicts_with = "admin_socket")]
    pub lab: Option<String>,
}

impl AgentTarget {
    fn lab(&self) -> Result<Option<LabState>> {
        match (&self.lab, &self.node) {
            (Some(name), _) => Ok(Some(LabState::load(name)?)),
            (None, Some(_)) => Ok(Some(LabState::load(DEFAULT_LAB)?)),
            (None, None) => Ok(None),
        }
    }

    /// The socket of the one agent to ask.
    pub fn socket(&self) -> Result<PathBuf> {
        if let Some(path) = &self.admin_socket {
            return Ok(path.clone());
        }
        match (self.lab()?, &self.node) {
            (Some(lab), Some(node)) => lab_socket(&lab, node),
            (Some(lab), None) => bail!(
                "lab {} has nodes {}: name one with --node",
                lab.name,
                node_names(&lab)
            ),
            (None, _) => Ok(PathBuf::from(admin::DEFAULT_ADMIN_SOCKET)),
        }
    }

    /// The agents a node-scoped report comes from: one, or every node of a lab given without
    /// --node (with the node's name).
    pub(crate) fn agents(&self) -> Result<Vec<(Option<String>, PathBuf)>> {
        if self.admin_socket.is_none() && self.node.is_none() {
            if let Some(lab) = self.lab()? {
                return lab
                    .nodes
                    .iter()
                    .map(|n| Ok((Some(n.name.clone()), lab_socket(&lab, &n.name)?)))
                    .collect();
            }
        }
        Ok(vec![(None, self.socket()?)])
    }
}

/// Asks every target agent and prints each report (JSON: the report, or one per node by name).
fn report<T: DeserializeOwned + Serialize>(
    target: &AgentTarget,
    request: AdminRequest,
    json: bool,
    print: impl Fn(&T),
) -> Result<()> {
    let mut reports = Vec::new();
    for (node, socket) in target.agents()? {
        let r: T = admin::call(&socket, &request).with_context(|| match &node {
            Some(n) => format!("asking node {n}'s agent"),
            None => "asking the agent".to_string(),
        })?;
        reports.push((node, r));
    }
    if json {
        return match reports.as_slice() {
            [(None, r)] => print_json(r),
            _ => print_json(
                &reports
                    .iter()
                    .map(|(n, r)| (n.clone().unwrap_or_default(), r))
                    .collect::<std::collections::BTreeMap<_, _>>(),
            ),
        };
    }
    for (i, (node, r)) in reports.iter().enumerate() {
        if let Some(n) = node {
            println!("{}== node {n}", if i > 0 { "\n" } else { "" });
        }
        print(r);
    }
    Ok(())
}

fn node_names(lab: &LabState) -> String {
    lab.nodes
        .iter()
        .map(|n| n.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn lab_socket(lab: &LabState, node: &str) -> Result<PathBuf> {
    if lab.node(node).is_none() {
        bail!(
            "lab {} has no node {node:?} (nodes: {})",
            lab.name,
            node_names(lab)
        );
    }
    Ok(admin::admin_socket_beside(&lab.socket(node)))
}

fn print_json(value: &impl Serialize) -> Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

fn duration(secs: u64) -> String {
    format!(
        "{:02}:{:02}:{:02}",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

pub fn status(target: &AgentTarget, json: bool) -> Result<()> {
    report(target, AdminRequest::Status, json, print_status)
}

/// A block's room in addresses, readable for an IPv6 /64 too (`~2^64`, not twenty digits).
fn room(n: u128) -> String {
    if n >= 1 << 32 {
        format!("~2^{}", 127 - n.saturating_add(1).leading_zeros())
    } else {
        n.to_string()
    }
}

fn print_status(s: &StatusReport) {
    let capacity: Vec<String> = s
        .ipam
        .capacity
        .iter()
        .map(|(block, n)| format!("{} in {block}", room(*n)))
        .collect();
    println!(
        "node {}   {}",
        s.node,
        if s.ready { "ready" } else { "NOT READY" }
    );
    println!(
        "datastore {} ({}, {} objects)",
        s.datastore.source,
        if s.datastore.synced {
            "synced"
        } else {
            "not synced"
        },
        s.datastore.objects
    );
    if !s.datastore.forbidden.is_empty() {
        println!(
            "  forbidden by the API server (RBAC): {}",
            s.datastore.forbidden.join(", ")
        );
    }
    println!(
        "blocks {}   endpoints {}   IPAM {} allocated (room: {})",
        if s.blocks.is_empty() {
            "none".to_string()
        } else {
            s.blocks.join(", ")
        },
        s.endpoints,
        s.ipam.allocated,
        if capacity.is_empty() {
            "none".to_string()
        } else {
            capacity.join(", ")
        }
    );
    println!();
    if !s.bgp.running {
        println!("BGP: not running (no BGP configuration for this node)");
    } else if s.bgp.peers.is_empty() {
        println!("BGP: running, no peers");
    } else {
        println!(
            "{:<26} {:<10} {:<12} {:<9} {:>8} {:>8} {:>6} {:>11}  LAST ERROR",
            "PEER", "AS", "STATE", "UPTIME", "RECEIVED", "ACCEPTED", "SENT", "UPDATES I/O"
        );
        for p in &s.bgp.peers {
            let last = p
                .last_notification_received
                .as_ref()
                .map(|n| format!("received {n}"))
                .or(p
                    .last_notification_sent
                    .as_ref()
                    .map(|n| format!("sent {n}")))
                .or(p.last_error.clone())
                .unwrap_or_default();
            println!(
                "{:<26} {:<10} {:<12} {:<9} {:>8} {:>8} {:>6} {:>11}  {}",
                p.address,
                p.remote_as,
                p.state,
                p.uptime_secs.map(duration).unwrap_or_else(|| "-".into()),
                p.prefixes_received,
                p.prefixes_accepted,
                p.prefixes_advertised,
                format!("{}/{}", p.updates_in, p.updates_out),
                last
            );
        }
    }
    if !s.bgp.bfd.is_empty() {
        println!();
        println!(
            "{:<26} {:<10} {:<10} {:>8} {:>8} {:>9} {:>6}  LAST DIAGNOSTIC",
            "BFD PEER", "STATE", "REMOTE", "TX ms", "DETECT", "SINCE", "C BIT"
        );
        let bit = |b: bool| if b { '1' } else { '0' };
        for b in &s.bgp.bfd {
            println!(
                "{:<26} {:<10} {:<10} {:>8} {:>8} {:>9} {:>6}  {} ({})",
                b.peer,
                b.state,
                b.remote_state,
                b.tx_interval_ms,
                b.detection_time_ms,
                duration(b.since_change_secs),
                format!(
                    "{}/{}",
                    bit(b.control_plane_independent),
                    bit(b.remote_control_plane_independent)
                ),
                b.diag,
                b.diag_code,
            );
        }
        println!("(C BIT: this node's / the peer's; 1 = BFD runs apart from BGP and survives its restarts)");
    }
    for w in &s.bgp.warnings {
        println!("BGP warning: {w}");
    }
}

pub fn routes(target: &AgentTarget, json: bool) -> Result<()> {
    report(
        target,
        AdminRequest::Routes,
        json,
        |r: &Vec<RouteReport>| print_routes(r),
    )
}

fn print_routes(routes: &[RouteReport]) {
    println!(
        "{:<22} {:<10} {:<28} BGP ORIGIN",
        "DESTINATION", "KIND", "VIA"
    );
    for r in routes {
        let via = match (&r.device, r.gateways.is_empty()) {
            (Some(d), _) => format!("dev {d}"),
            (None, false) => r
                .gateways
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            (None, true) => String::new(),
        };
        let origin = r.bgp.as_ref().map(|b| {
            let path: Vec<String> = b.as_path.iter().map(|a| a.to_string()).collect();
            format!(
                "{} from {}, AS path [{}]",
                b.prefix,
                b.peer.map(|p| p.to_string()).unwrap_or("local".into()),
                path.join(" ")
            )
        });
        println!(
            "{:<22} {:<10} {:<28} {}",
            r.destination,
            r.kind,
            via,
            origin.unwrap_or_default()
        );
    }
}

pub fn endpoints(target: &AgentTarget, json: bool) -> Result<()> {
    report(
        target,
        AdminRequest::Endpoints,
        json,
        |e: &Vec<EndpointReport>| print_endpoints(e),
    )
}

fn print_endpoints(eps: &[EndpointReport]) {
    println!(
        "{:<30} {:<28} {:<16} {:<6} {:<14} ROUTED",
        "POD", "IPS", "HOST VETH", "IFACE", "CONTAINER"
    );
    for e in eps {
        let ips: Vec<String> = e.ips.iter().map(|i| i.to_string()).collect();
        println!(
            "{:<30} {:<28} {:<16} {:<6} {:<14} {}",
            format!("{}/{}", e.namespace, e.pod),
            ips.join(","),
            e.host_veth,
            e.interface,
            e.container_id.chars().take(12).collect::<String>(),
            if e.routed { "yes" } else { "NO" }
        );
    }
}

/// One flow to look at, for `sepal trace` and `sepal policy explain`.
#[derive(Debug, Clone, Args)]
pub struct FlowArgs {
    /// The source: NAMESPACE/POD or an IP address.
    #[arg(long)]
    pub from: String,
    /// The destination: NAMESPACE/POD or an IP address.
    #[arg(long)]
    pub to: String,
    /// PORT[/PROTOCOL] (TCP, UDP, SCTP) [default: 80/TCP].
    #[arg(long)]
    pub port: Option<String>,
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: AgentTarget,
}

impl FlowArgs {
    pub fn request(&self) -> TraceRequest {
        TraceRequest {
            from: self.from.clone(),
            to: self.to.clone(),
            port: self.port.clone(),
        }
    }
}

/// The whole path: one hop per node asked, and the overall verdict.
#[derive(Debug, Serialize)]
pub struct Trace {
    pub hops: Vec<TraceHop>,
    pub allowed: bool,
    /// In a lab: the router the first node hands the packet to.
    pub router: Option<String>,
    /// Set when the path could not be followed to the destination pod.
    pub note: Option<String>,
}

/// The lab node whose pod block holds `ip`.
fn node_owning(lab: &LabState, ip: IpAddr) -> Option<String> {
    lab.nodes
        .iter()
        .find(|n| {
            n.pod_cidrs
                .iter()
                .filter_map(|c| c.parse::<IpNetwork>().ok())
                .any(|c| c.contains(ip))
        })
        .map(|n| n.name.clone())
}

/// The lab node a trace starts on: the source pod's.
fn source_node(lab: &LabState, from: &str) -> Result<String> {
    if let Ok(ip) = from.parse::<IpAddr>() {
        return lab
            .pods
            .iter()
            .find(|p| p.ips.iter().any(|i| i.parse() == Ok(ip)))
            .map(|p| p.node.clone())
            .or_else(|| node_owning(lab, ip))
            .with_context(|| format!("no pod of lab {} has the address {ip}", lab.name));
    }
    let (ns, pod) = from
        .split_once('/')
        .with_context(|| format!("{from:?}: expected NAMESPACE/POD or an IP address"))?;
    Ok(lab
        .pod(ns, pod)
        .with_context(|| format!("no pod {from} in lab {}", lab.name))?
        .node
        .clone())
}

fn trace_lab(lab: &LabState, req: &TraceRequest) -> Result<Trace> {
    let first = source_node(lab, &req.from)?;
    let request = AdminRequest::Trace(req.clone());
    let hop: TraceHop = admin::call(&lab_socket(lab, &first)?, &request)
        .with_context(|| format!("asking node {first}'s agent"))?;
    let router = hop
        .lookup
        .gateway
        .and_then(|g| crate::lab::router_with_address(lab, g));
    let mut trace = Trace {
        allowed: hop.allowed,
        router,
        note: None,
        hops: vec![hop],
    };
    let last = &trace.hops[0];
    if last.destination.is_some() {
        return Ok(trace);
    }
    match node_owning(lab, last.dst_ip) {
        Some(node) if node != first => {
            let hop: TraceHop = admin::call(&lab_socket(lab, &node)?, &request)
                .with_context(|| format!("asking node {node}'s agent"))?;
            if hop.destination.is_none() {
                trace.note = Some(format!(
                    "node {node} owns {} but has no pod with it",
                    hop.dst_ip
                ));
            }
            trace.allowed = hop.allowed;
            trace.hops.push(hop);
        }
        Some(node) => {
            trace.note = Some(format!(
                "{} is in node {node}'s block but no pod has it",
                last.dst_ip
            ))
        }
        None => {
            trace.note = Some(format!(
                "{} is outside the lab's pod blocks: the packet leaves the cluster",
                last.dst_ip
            ))
        }
    }
    Ok(trace)
}

pub fn trace(args: &FlowArgs) -> Result<()> {
    let req = args.request();
    let t = match args.target.lab()? {
        Some(lab) if args.target.admin_socket.is_none() => trace_lab(&lab, &req)?,
        _ => {
            let hop: TraceHop =
                admin::call(&args.target.socket()?, &AdminRequest::Trace(req.clone()))?;
            let note = hop.destination.is_none().then(|| {
                format!(
                    "{} is not on this node: run `sepal trace` on the node that owns it for its side",
                    hop.dst_ip
                )
            });
            Trace {
                allowed: hop.allowed,
                router: None,
                note,
                hops: vec![hop],
            }
        }
    };
    if args.json {
        return print_json(&t);
    }
    print_trace(&req, &t);
    Ok(())
}

fn print_trace(req: &TraceRequest, t: &Trace) {
    if let Some(first) = t.hops.first() {
        println!(
            "{} ({}) -> {} ({}) port {}",
            req.from,
            first.src_ip,
            req.to,
            first.dst_ip,
            req.port.as_deref().unwrap_or("80/TCP")
        );
    }
    for (i, h) in t.hops.iter().enumerate() {
        println!("\n{}. node {}", i + 1, h.node);
        if let Some(s) = &h.source {
            println!(
                "   from pod {} {} ({}) into host veth {}",
                s.pod, s.interface, s.ip, s.host_veth
            );
            println!("   egress policy: {}", h.egress);
        }
        let l = &h.lookup;
        match &l.error {
            Some(e) => println!("   route lookup {}: {e}", h.dst_ip),
            None => println!(
                "   route lookup {}: {}{}{}",
                h.dst_ip,
                l.kind,
                l.gateway.map(|g| format!(" via {g}")).unwrap_or_default(),
                l.device
                    .as_ref()
                    .map(|d| format!(" dev {d}"))
                    .unwrap_or_default()
            ),
        }
        if h.bgp.is_none() && h.lookup.gateway.is_some() {
            println!("   (no BGP route covers it: the node's own routing, e.g. its default route)");
        }
        if let Some(b) = &h.bgp {
            let path: Vec<String> = b.as_path.iter().map(|a| a.to_string()).collect();
            let hops: Vec<String> = b.next_hops.iter().map(|a| a.to_string()).collect();
            println!(
                "   BGP route {} learned from {}, AS path [{}], next hops {}",
                b.prefix,
                b.peer.map(|p| p.to_string()).unwrap_or("local".into()),
                path.join(" "),
                hops.join(", ")
            );
        }
        if let (0, Some(r), Some(g)) = (i, &t.router, h.lookup.gateway) {
            println!("   -> router {r} ({g})");
        }
        if let Some(d) = &h.destination {
            println!(
                "   out host veth {} to pod {} {} ({})",
                d.host_veth, d.pod, d.interface, d.ip
            );
            println!("   ingress policy: {}", h.ingress);
        }
    }
    if let Some(note) = &t.note {
        println!("\nnote: {note}");
    }
    if let Some(h) = t.hops.last() {
        if h.destination.is_none() {
            println!("ingress policy (predicted): {}", h.ingress);
        }
    }
    let verdict = if t.allowed { "ALLOW" } else { "DENY" };
    match t.hops.iter().find(|h| h.lookup.error.is_some()) {
        Some(h) => println!(
            "\npolicy verdict: {verdict}, but routing drops the packet on node {}",
            h.node
        ),
        None => println!("\nverdict: {verdict}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipam_room_reads_well_for_ipv6_blocks() {
        assert_eq!(room(254), "254");
        assert_eq!(room((1 << 64) - 1), "~2^64");
        assert_eq!(room(1 << 64), "~2^64");
        assert_eq!(room((1 << 32) - 1), "4294967295");
    }
    use crate::lab::state::{NodeState, PodState};
    use crate::lab::topology::Topology;

    fn lab() -> LabState {
        let node = |name: &str, block: &str| NodeState {
            name: name.into(),
            netns: format!("t-{name}"),
            as_number: 64512,
            uplinks: Vec::new(),
            uplinks6: Vec::new(),
            pod_cidrs: vec![block.into()],
            pid: None,
            runtime_pid: None,
        };
        LabState {
            name: "t".into(),
            topology: Topology::default_lab(),
            nodes: vec![node("a", "10.1.1.0/24"), node("b", "10.1.2.0/24")],
            routers: Vec::new(),
            pods: vec![PodState {
                namespace: "ns".into(),
                name: "p".into(),
                node: "b".into(),
                netns: "t-pod-ns-p".into(),
                container_id: "c".into(),
                ips: vec!["10.1.2.7".into()],
                labels: Default::default(),
            }],
            kubeconfig: None,
            relay_pid: None,
            proxy_mode: None,
        }
    }

    #[test]
    fn traces_start_on_the_source_pods_node_and_end_on_the_blocks_owner() {
        let lab = lab();
        assert_eq!(source_node(&lab, "ns/p").unwrap(), "b");
        assert_eq!(source_node(&lab, "10.1.2.7").unwrap(), "b");
        assert!(source_node(&lab, "ns/missing").is_err());
        assert!(source_node(&lab, "nonsense").is_err());
        assert_eq!(
            node_owning(&lab, "10.1.1.9".parse().unwrap()).as_deref(),
            Some("a")
        );
        assert_eq!(node_owning(&lab, "192.0.2.1".parse().unwrap()), None);
    }
}
