// The pure heart of routing: from the cluster's facts to the desired speaker settings, peers
// (mesh, route reflection, BGPPeers), announcements and import/export filters; and the diff.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use ipnet::IpNet;

use super::inputs::{to_ipnet, NodeInfo, ServiceInfo};
use crate::crd::{BgpConfig, BgpPeer, Community, RoutePolicy, SecretKeyRef};

/// Everything `plan` reads.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    /// This node's name.
    pub local: String,
    pub nodes: Vec<NodeInfo>,
    /// The `default` BGPConfiguration, validated (or the defaults when there is none).
    pub config: BgpConfig,
    pub peers: Vec<BgpPeer>,
    /// Passwords of the BGPPeers' secret references; a reference missing here is an error.
    pub passwords: BTreeMap<SecretKeyRef, Result<String, String>>,
    pub services: Vec<ServiceInfo>,
    /// The cluster's pod ranges when the agent knows them (e.g. `--cluster-cidr`); the nodes' pod
    /// blocks always count too.
    pub cluster_cidrs: Vec<IpNet>,
    /// This node's pod blocks from IPAM when they differ from spec.podCIDRs.
    pub local_blocks: Option<Vec<IpNet>>,
    /// Link-local addresses of the routers heard on each interface (IPv6 router
    /// advertisements), for unnumbered BGPPeers without a `peerIP`.
    pub link_neighbors: BTreeMap<String, std::net::Ipv6Addr>,
}

/// Speaker-wide settings; a change needs a new speaker (every session restarts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeakerPlan {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    pub listen: Vec<std::net::SocketAddr>,
    pub cluster_id: Option<Ipv4Addr>,
    pub graceful_restart_time: Duration,
}

/// Why a peer exists.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum PeerKind {
    /// Node-to-node mesh (or automatic route-reflector peering when the mesh is off) with this node.
    Node(String),
    /// A BGPPeer object.
    Global(String),
}

/// Which learned prefixes a peer may give us.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImportFilter {
    /// Only prefixes inside these ranges (the cluster's pod and service ranges), never a default.
    Within(Vec<IpNet>),
    /// A BGPPeer's import policy.
    Policy(RoutePolicy),
}

/// Which of our routes a peer gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportFilter {
    /// Prefixes inside the cluster's ranges: a route reflector's reflected routes and our own.
    Within(Vec<IpNet>),
    /// Exactly this node's own announcements (an eBGP peer of a node that is not a reflector).
    Own(BTreeSet<IpNet>),
    /// Whatever RFC 4456 lets a route reflector send an iBGP BGPPeer: its clients' routes
    /// whatever their prefix (the speaker applies the reflection rules themselves).
    Reflect,
}

/// One desired session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerPlan {
    pub kind: PeerKind,
    pub address: IpAddr,
    pub port: u16,
    pub remote_as: u32,
    pub passive: bool,
    pub connect_retry: Duration,
    pub hold_time: u16,
    pub keepalive: Option<u16>,
    pub password: Option<String>,
    pub ttl_security: Option<u8>,
    pub rr_client: bool,
    pub max_prefixes: Option<u32>,
    pub source: Option<IpAddr>,
    pub import: ImportFilter,
    /// Prefixes that are never accepted whatever the policy: this node's own blocks.
    pub import_never: Vec<IpNet>,
    pub export: ExportFilter,
    /// The BGPPeer's own export policy, applied after `export`.
    pub export_policy: Option<RoutePolicy>,
    /// BFD on this session (RFC 5882: the session goes down with it).
    pub bfd: Option<sepal_bgp::bfd::Timers>,
    /// Unnumbered: the interface a link-local `address` is on.
    pub interface: Option<String>,
}

/// One of this node's announcements.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Announcement {
    /// RFC 1997 communities, (high << 16) | low.
    pub communities: Vec<u32>,
    /// RFC 8092 large communities.
    pub large_communities: Vec<(u32, u32, u32)>,
    /// The next hop peers must use; None: the session's own address. Set on IPv6 routes to the
    /// node's IPv6 address, because over an IPv4 session the session address would reach peers
    /// as an IPv4-mapped IPv6 address, which no kernel can route to.
    pub next_hop: Option<IpAddr>,
}

/// The desired state of this node's BGP control.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub speaker: SpeakerPlan,
    pub peers: BTreeMap<IpAddr, PeerPlan>,
    pub announcements: BTreeMap<IpNet, Announcement>,
    /// Inputs that were left out, with the reason (shown in status and logs).
    pub warnings: Vec<String>,
    /// Interfaces of this node's unnumbered BGPPeers: router advertisements go out on them
    /// and are listened for.
    pub link_interfaces: std::collections::BTreeSet<String>,
}

/// Hold time used when neither the BGPConfiguration nor the BGPPeer sets one.
pub const DEFAULT_HOLD: u16 = 90;

fn secs(d: Duration) -> u16 {
    d.as_secs().min(u16::MAX as u64) as u16
}

/// Hold time and keepalive in the speaker's units. A hold time of 1 or 2 s is not allowed by
/// RFC 4271, so it is rounded up to 3.
fn timers(keepalive: Option<Duration>, hold: Option<Duration>) -> (u16, Option<u16>, Duration) {
    let hold = hold.map(secs).unwrap_or(DEFAULT_HOLD);
    let hold = if hold == 1 || hold == 2 { 3 } else { hold };
    let keepalive = keepalive.map(|k| secs(k).max(1));
    // Fast timers ask for fast reconnects too; otherwise the speaker's usual retry.
    let retry = match keepalive {
        Some(k) => Duration::from_secs(u64::from(k.clamp(1, 5))),
        None if hold < 30 => Duration::from_secs(1),
        None => Duration::from_secs(5),
    };
    (hold, keepalive, retry)
}

/// A router ID for a node without IPv4: a stable hash of its name (never 0.0.0.0).
fn router_id_from_name(name: &str) -> Ipv4Addr {
    let mut h: u32 = 0x811c9dc5;
    for b in name.bytes() {
        h = (h ^ u32::from(b)).wrapping_mul(0x01000193);
    }
    Ipv4Addr::from(h.max(1))
}

fn inside(prefix: &IpNet, ranges: &[IpNet]) -> bool {
    ranges.iter().any(|r| r.contains(prefix))
}

/// The session address to use towards `peer`: same family as one of ours, IPv4 preferred. One
/// session carries both families (MP-BGP).
fn pair(local: &[IpAddr], peer: &[IpAddr]) -> Option<(IpAddr, IpAddr)> {
    for want_v4 in [true, false] {
        let l = local.iter().find(|a| a.is_ipv4() == want_v4);
        let p = peer.iter().find(|a| a.is_ipv4() == want_v4);
        if let (Some(l), Some(p)) = (l, p) {
            return Some((*l, *p));
        }
    }
    None
}

impl ImportFilter {
    /// Whether a learned prefix may be installed.
    pub fn allows(&self, prefix: &IpNet) -> bool {
        let default = prefix.prefix_len() == 0;
        match self {
            ImportFilter::Within(ranges) => !default && inside(prefix, ranges),
            ImportFilter::Policy(p) => p.allows(prefix),
        }
    }
}

impl RoutePolicy {
    /// Whether a prefix passes the policy (a default route only through an AllowList entry).
    pub fn allows(&self, prefix: &IpNet) -> bool {
        match self {
            RoutePolicy::Accept => prefix.prefix_len() != 0,
            RoutePolicy::Reject => false,
            RoutePolicy::Allow(list) => list.iter().any(|r| to_ipnet(*r).contains(prefix)),
        }
    }
}

impl PeerPlan {
    pub fn imports(&self, prefix: &IpNet) -> bool {
        !self.import_never.iter().any(|n| n.contains(prefix)) && self.import.allows(prefix)
    }
}

impl ExportFilter {
    pub fn allows(&self, prefix: &IpNet) -> bool {
        match self {
            ExportFilter::Within(ranges) => inside(prefix, ranges),
            ExportFilter::Own(set) => set.contains(prefix),
            ExportFilter::Reflect => true,
        }
    }
}

impl PeerPlan {
    /// Whether a route to `prefix` may be sent to this peer.
    pub fn exports(&self, prefix: &IpNet) -> bool {
        self.export.allows(prefix) && self.export_policy.as_ref().is_none_or(|p| p.allows(prefix))
    }
}

/// Computes the desired state. Never fails: inputs that cannot be used become warnings and are
/// left out, so one bad BGPPeer does not stop the mesh.
pub fn plan(inp: &Inputs) -> Result<Plan, String> {
    let me = inp
        .nodes
        .iter()
        .find(|n| n.name == inp.local)
        .ok_or_else(|| format!("this node ({}) is not in the model yet", inp.local))?;
    let cfg = &inp.config;
    let mut warnings = Vec::new();
    let mut link_interfaces = std::collections::BTreeSet::new();
    let local_as = me.as_number.unwrap_or(cfg.as_number);
    let router_id = me
        .addresses
        .iter()
        .find_map(|a| match a {
            IpAddr::V4(v4) => Some(*v4),
            IpAddr::V6(_) => None,
        })
        .unwrap_or_else(|| router_id_from_name(&me.name));
    if me.addresses.is_empty() {
        warnings.push(format!(
            "node {} has no InternalIP or sepal.dev/bgp-address: no sessions",
            me.name
        ));
    }
    let speaker = SpeakerPlan {
        local_as,
        router_id,
        listen: me
            .addresses
            .iter()
            .map(|a| std::net::SocketAddr::new(*a, cfg.listen_port))
            .collect(),
        cluster_id: me.rr_cluster_id,
        graceful_restart_time: cfg.graceful_restart_time,
    };

    // The cluster's ranges: every node's pod blocks, the configured pod ranges and the service ranges.
    let mut cluster: Vec<IpNet> = inp.cluster_cidrs.clone();
    cluster.extend(inp.nodes.iter().flat_map(|n| n.pod_cidrs.iter().copied()));
    let service_ranges: Vec<IpNet> = cfg
        .service_cluster_ips
        .iter()
        .chain(&cfg.service_external_ips)
        .chain(&cfg.service_load_balancer_ips)
        .map(|n| to_ipnet(*n))
        .collect();
    cluster.extend(service_ranges.iter().copied());
    let cluster = IpNet::aggregate(&cluster);

    // Announcements: own blocks aggregated, service ranges, external/LB /32s and /128s.
    let own_blocks = IpNet::aggregate(
        &inp.local_blocks
            .clone()
            .unwrap_or_else(|| me.pod_cidrs.clone()),
    );
    let mut prefixes: BTreeSet<IpNet> = own_blocks.iter().copied().collect();
    prefixes.extend(cfg.service_cluster_ips.iter().map(|n| to_ipnet(*n)));
    let ext: Vec<IpNet> = cfg
        .service_external_ips
        .iter()
        .map(|n| to_ipnet(*n))
        .collect();
    let lb: Vec<IpNet> = cfg
        .service_load_balancer_ips
        .iter()
        .map(|n| to_ipnet(*n))
        .collect();
    for svc in &inp.services {
        if svc.local_only && !svc.local_endpoint_ready {
            continue;
        }
        for (ips, ranges, what) in [
            (&svc.external_ips, &ext, "serviceExternalIPs"),
            (&svc.load_balancer_ips, &lb, "serviceLoadBalancerIPs"),
        ] {
            for ip in ips {
                let host = IpNet::from(*ip);
                if inside(&host, ranges) {
                    prefixes.insert(host);
                } else if !ranges.is_empty() {
                    warnings.push(format!(
                        "Service {}/{}: {ip} is outside the BGPConfiguration's {what}: not advertised",
                        svc.namespace, svc.name
                    ));
                }
            }
        }
    }
    let mut announcements = BTreeMap::new();
    for p in prefixes {
        let (mut communities, mut large_communities) = (Vec::new(), Vec::new());
        for (range, cs) in &cfg.communities {
            if to_ipnet(*range).contains(&p) {
                for c in cs {
                    match *c {
                        Community::Standard(a, b) => {
                            let v = (u32::from(a) << 16) | u32::from(b);
                            if !communities.contains(&v) {
                                communities.push(v);
                            }
                        }
                        Community::Large(g, l1, l2) => {
                            if !large_communities.contains(&(g, l1, l2)) {
                                large_communities.push((g, l1, l2));
                            }
                        }
                    }
                }
            }
        }
        let next_hop = match p {
            IpNet::V6(_) => me.addresses.iter().copied().find(IpAddr::is_ipv6),
            IpNet::V4(_) => None,
        };
        announcements.insert(
            p,
            Announcement {
                communities,
                large_communities,
                next_hop,
            },
        );
    }
    warnings.dedup();
    let own: BTreeSet<IpNet> = announcements.keys().copied().collect();
    let is_rr = me.rr_cluster_id.is_some();

    // Peers: the mesh (or automatic route reflection), then BGPPeers, which win on the same address.
    let (mesh_hold, mesh_keepalive, mesh_retry) = timers(cfg.keepalive_time, cfg.hold_time);
    let mut peers: BTreeMap<IpAddr, PeerPlan> = BTreeMap::new();
    for other in inp.nodes.iter().filter(|n| n.name != me.name) {
        let other_rr = other.rr_cluster_id.is_some();
        // Mesh on: everyone with everyone. Mesh off: reflectors with every node, and with each
        // other (as non-clients).
        let rr_client = if cfg.node_to_node_mesh {
            false
        } else if is_rr {
            !other_rr
        } else if other_rr {
            false
        } else {
            continue;
        };
        let Some((local_addr, addr)) = pair(&me.addresses, &other.addresses) else {
            if !other.addresses.is_empty() && !me.addresses.is_empty() {
                warnings.push(format!(
                    "node {}: no BGP address in a family this node has: no session",
                    other.name
                ));
            }
            continue;
        };
        peers.insert(
            addr,
            PeerPlan {
                kind: PeerKind::Node(other.name.clone()),
                address: addr,
                port: cfg.listen_port,
                remote_as: other.as_number.unwrap_or(cfg.as_number),
                // Only one side connects: the higher address, so no collisions and no GR aborts.
                passive: local_addr < addr,
                connect_retry: mesh_retry,
                hold_time: mesh_hold,
                keepalive: mesh_keepalive,
                password: None,
                ttl_security: None,
                rr_client,
                max_prefixes: None,
                source: Some(local_addr),
                import: ImportFilter::Within(cluster.clone()),
                import_never: own_blocks.clone(),
                export: ExportFilter::Within(cluster.clone()),
                export_policy: None,
                bfd: cfg.bfd,
                interface: None,
            },
        );
    }
    for p in &inp.peers {
        if !p.selects(&me.name, &me.labels) {
            continue;
        }
        if let Some(iface) = &p.interface {
            link_interfaces.insert(iface.clone());
        }
        let address = match (p.peer_ip, &p.interface) {
            (Some(a), _) => a,
            (None, Some(iface)) => match inp.link_neighbors.get(iface) {
                Some(a) => IpAddr::V6(*a),
                None => {
                    warnings.push(format!(
                        "BGPPeer {}: no IPv6 router advertisement heard on {iface} yet: no session",
                        p.name
                    ));
                    continue;
                }
            },
            (None, None) => continue, // refused by validation
        };
        if me.addresses.contains(&address) {
            continue; // a BGPPeer for every node that names this node itself
        }
        let password = match &p.password {
            None => None,
            Some(r) => match inp.passwords.get(r) {
                Some(Ok(pw)) => Some(pw.clone()),
                Some(Err(e)) => {
                    warnings.push(format!("BGPPeer {}: password: {e}: no session", p.name));
                    continue;
                }
                None => {
                    warnings.push(format!(
                        "BGPPeer {}: password Secret {}/{} not read yet: no session",
                        p.name,
                        r.namespace(),
                        r.name
                    ));
                    continue;
                }
            },
        };
        let (hold, keepalive, retry) = timers(
            p.keepalive_time.or(cfg.keepalive_time),
            p.hold_time.or(cfg.hold_time),
        );
        let ebgp = p.as_number != local_as;
        // The kernel picks the source towards a BGPPeer unless one is set: a ToR on another
        // link than the node's BGP address must see the address of that link.
        let source = p.source_address;
        peers.insert(
            address,
            PeerPlan {
                kind: PeerKind::Global(p.name.clone()),
                address,
                port: 179,
                remote_as: p.as_number,
                passive: p.passive,
                connect_retry: retry,
                hold_time: hold,
                keepalive,
                password,
                ttl_security: p.ttl_security,
                rr_client: p.route_reflector_client,
                max_prefixes: p.max_prefixes,
                source,
                import: ImportFilter::Policy(p.import_policy.clone()),
                import_never: own_blocks.clone(),
                // Another node's blocks go to an eBGP peer only from a route reflector, and
                // nothing from outside the cluster's ranges (the node is no transit between
                // its eBGP peers). A reflector's iBGP peers get what RFC 4456 reflects.
                export: match (ebgp, is_rr) {
                    (true, false) => ExportFilter::Own(own.clone()),
                    (true, true) => ExportFilter::Within(cluster.clone()),
                    (false, true) => ExportFilter::Reflect,
                    (false, false) => ExportFilter::Within(cluster.clone()),
                },
                export_policy: p.export_policy.clone(),
                bfd: p.bfd,
                interface: p.interface.clone(),
            },
        );
    }
    Ok(Plan {
        speaker,
        peers,
        link_interfaces,
        announcements,
        warnings,
    })
}

/// What to do to the running speaker to reach a plan.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Diff {
    /// Speaker-wide settings changed: stop it and start a new one with the whole plan.
    pub restart_speaker: bool,
    pub add: Vec<IpAddr>,
    /// Peers whose settings changed (the speaker resets only those whose session parameters did).
    pub update: Vec<IpAddr>,
    pub remove: Vec<IpAddr>,
    pub announce: Vec<IpNet>,
    pub withdraw: Vec<IpNet>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        *self == Diff::default()
    }
}

/// The changes from `running` (None: no speaker yet) to `desired`.
pub fn diff(running: Option<&Plan>, desired: &Plan) -> Diff {
    let Some(run) = running.filter(|r| r.speaker == desired.speaker) else {
        return Diff {
            restart_speaker: true,
            add: desired.peers.keys().copied().collect(),
            announce: desired.announcements.keys().copied().collect(),
            ..Diff::default()
        };
    };
    let mut d = Diff::default();
    for (addr, p) in &desired.peers {
        match run.peers.get(addr) {
            None => d.add.push(*addr),
            Some(old) if old != p => d.update.push(*addr),
            Some(_) => {}
        }
    }
    d.remove = run
        .peers
        .keys()
        .filter(|a| !desired.peers.contains_key(a))
        .copied()
        .collect();
    for (prefix, a) in &desired.announcements {
        if run.announcements.get(prefix) != Some(a) {
            d.announce.push(*prefix);
        }
    }
    d.withdraw = run
        .announcements
        .keys()
        .filter(|p| !desired.announcements.contains_key(p))
        .copied()
        .collect();
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::BGPPeerSpec;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }
    fn node(name: &str, addr: &str, block: &str) -> NodeInfo {
        NodeInfo {
            name: name.into(),
            labels: BTreeMap::from([("rack".to_string(), name.to_string())]),
            addresses: vec![ip(addr)],
            as_number: None,
            rr_cluster_id: None,
            pod_cidrs: vec![net(block)],
        }
    }
    fn three() -> Inputs {
        Inputs {
            local: "b".into(),
            nodes: vec![
                node("a", "192.168.0.1", "10.244.0.0/24"),
                node("b", "192.168.0.2", "10.244.1.0/24"),
                node("c", "192.168.0.3", "10.244.2.0/24"),
            ],
            ..Inputs::default()
        }
    }
    fn bgp_peer(json: serde_json::Value) -> BgpPeer {
        let spec: BGPPeerSpec = serde_json::from_value(json).unwrap();
        spec.validate("tor").unwrap()
    }

    #[test]
    fn an_unnumbered_peer_waits_for_a_router_advertisement_then_peers_on_its_interface() {
        let mut i = three();
        i.peers = vec![bgp_peer(
            serde_json::json!({"interface": "eth1", "asNumber": 65000}),
        )];
        let p = plan(&i).unwrap();
        assert!(p.peers.values().all(|p| p.interface.is_none()));
        assert!(
            p.link_interfaces.contains("eth1"),
            "advertised while waiting"
        );
        assert!(
            p.warnings.iter().any(|w| w.contains("eth1")),
            "{:?}",
            p.warnings
        );
        i.link_neighbors
            .insert("eth1".into(), "fe80::1".parse().unwrap());
        let p = plan(&i).unwrap();
        let tor = &p.peers[&ip("fe80::1")];
        assert_eq!(tor.interface.as_deref(), Some("eth1"));
        assert_eq!(tor.remote_as, 65000);
        assert!(p.warnings.is_empty(), "{:?}", p.warnings);
    }

    #[test]
    fn mesh_peers_every_other_node_and_only_one_side_connects() {
        let p = plan(&three()).unwrap();
        assert_eq!(p.speaker.local_as, 64512);
        assert_eq!(p.speaker.router_id, Ipv4Addr::new(192, 168, 0, 2));
        assert_eq!(p.peers.len(), 2);
        let a = &p.peers[&ip("192.168.0.1")];
        let c = &p.peers[&ip("192.168.0.3")];
        assert!(!a.passive, "we are higher than a: we connect");
        assert!(c.passive, "c is higher: it connects to us");
        assert_eq!(a.remote_as, 64512);
        assert_eq!(a.source, Some(ip("192.168.0.2")));
        // The other side sees the mirror image.
        let mut from_c = three();
        from_c.local = "c".into();
        assert!(!plan(&from_c).unwrap().peers[&ip("192.168.0.2")].passive);
        assert_eq!(
            p.announcements.keys().copied().collect::<Vec<_>>(),
            vec![net("10.244.1.0/24")]
        );
    }

    #[test]
    fn unknown_local_node_is_an_error() {
        let mut i = three();
        i.local = "zz".into();
        assert!(plan(&i).unwrap_err().contains("zz"));
    }

    #[test]
    fn mesh_import_only_cluster_ranges_and_never_default_or_own_blocks() {
        let mut i = three();
        i.config.service_cluster_ips = vec!["10.96.0.0/12".parse().unwrap()];
        let p = plan(&i).unwrap();
        let a = &p.peers[&ip("192.168.0.1")];
        assert!(a.imports(&net("10.244.0.0/24")));
        assert!(a.imports(&net("10.96.0.0/12")));
        assert!(a.imports(&net("10.244.2.0/26")));
        assert!(!a.imports(&net("10.244.1.0/24")), "our own block");
        assert!(!a.imports(&net("10.244.1.7/32")), "inside our own block");
        assert!(!a.imports(&net("0.0.0.0/0")));
        assert!(!a.imports(&net("8.8.8.0/24")));
        assert!(p.announcements.contains_key(&net("10.96.0.0/12")));
    }

    #[test]
    fn joining_node_adds_one_session_and_touches_no_other() {
        let before = plan(&three()).unwrap();
        let mut i = three();
        i.nodes.push(node("d", "192.168.0.4", "10.244.3.0/24"));
        let after = plan(&i).unwrap();
        let d = diff(Some(&before), &after);
        assert!(!d.restart_speaker);
        assert_eq!(d.add, vec![ip("192.168.0.4")]);
        // The filters of the existing mesh peers grew by the new block: an update, which the
        // speaker applies without a reset (filters are not session parameters).
        assert!(d.remove.is_empty() && d.announce.is_empty() && d.withdraw.is_empty());
        let back = diff(Some(&after), &before);
        assert_eq!(back.remove, vec![ip("192.168.0.4")]);
        assert!(diff(Some(&after), &after).is_empty());
        assert!(diff(None, &after).restart_speaker);
    }

    #[test]
    fn bgp_peer_timer_change_updates_only_that_peer() {
        let mut i = three();
        i.peers.push(bgp_peer(
            serde_json::json!({"peerIP":"10.0.0.1","asNumber":65000}),
        ));
        let before = plan(&i).unwrap();
        i.peers[0].hold_time = Some(Duration::from_secs(9));
        let after = plan(&i).unwrap();
        let d = diff(Some(&before), &after);
        assert_eq!(d.update, vec![ip("10.0.0.1")]);
        assert!(d.add.is_empty() && d.remove.is_empty() && !d.restart_speaker);
        // An AS change of this node restarts the speaker.
        i.nodes[1].as_number = Some(65010);
        assert!(diff(Some(&after), &plan(&i).unwrap()).restart_speaker);
    }

    #[test]
    fn mesh_off_uses_route_reflectors() {
        let mut i = three();
        i.config.node_to_node_mesh = false;
        i.peers.push(bgp_peer(
            serde_json::json!({"peerIP":"10.0.0.1","asNumber":65000}),
        ));
        // No reflector: only the BGPPeer.
        let p = plan(&i).unwrap();
        assert_eq!(
            p.peers.keys().copied().collect::<Vec<_>>(),
            vec![ip("10.0.0.1")]
        );
        // a is the reflector: b peers only with a; a has b and c as clients.
        i.nodes[0].rr_cluster_id = Some(Ipv4Addr::new(244, 0, 0, 1));
        let p = plan(&i).unwrap();
        assert_eq!(p.peers.len(), 2);
        assert!(!p.peers[&ip("192.168.0.1")].rr_client);
        i.local = "a".into();
        let p = plan(&i).unwrap();
        assert_eq!(p.speaker.cluster_id, Some(Ipv4Addr::new(244, 0, 0, 1)));
        assert!(p.peers[&ip("192.168.0.2")].rr_client);
        assert!(p.peers[&ip("192.168.0.3")].rr_client);
        // A reflector may give other nodes' blocks to its eBGP peer.
        assert!(p.peers[&ip("10.0.0.1")]
            .export
            .allows(&net("10.244.2.0/24")));
    }

    #[test]
    fn reflector_reflects_ibgp_peers_routes_whatever_the_prefix() {
        let mut i = three();
        i.local = "a".into();
        i.nodes[0].rr_cluster_id = Some(Ipv4Addr::new(244, 0, 0, 1));
        let asn = i.config.as_number;
        i.peers.push(bgp_peer(
            serde_json::json!({"peerIP":"10.0.0.5","asNumber":asn,
            "routeReflectorClient":true}),
        ));
        i.peers.push(bgp_peer(
            serde_json::json!({"peerIP":"10.0.0.6","asNumber":asn,
            "routeReflectorClient":true,
            "exportPolicy":{"action":"AllowList","cidrs":["192.0.2.0/24","10.244.0.0/16"]}}),
        ));
        i.peers.push(bgp_peer(
            serde_json::json!({"peerIP":"10.0.0.1","asNumber":65000}),
        ));
        let p = plan(&i).unwrap();
        let client = &p.peers[&ip("10.0.0.5")];
        assert_eq!(client.export, ExportFilter::Reflect);
        assert!(
            client.exports(&net("198.51.100.0/24")),
            "outside the cluster's ranges"
        );
        assert!(client.exports(&net("10.244.2.0/24")));
        // An export policy narrows what the peer gets.
        let narrowed = &p.peers[&ip("10.0.0.6")];
        assert!(narrowed.exports(&net("192.0.2.0/24")) && narrowed.exports(&net("10.244.2.0/24")));
        assert!(!narrowed.exports(&net("198.51.100.0/24")));
        // The reflector is no transit between its eBGP peers: nothing outside the cluster's ranges.
        let tor = &p.peers[&ip("10.0.0.1")];
        assert!(tor.exports(&net("10.244.2.0/24")));
        assert!(!tor.exports(&net("198.51.100.0/24")) && !tor.exports(&net("0.0.0.0/0")));
        // A node that is not a reflector keeps its iBGP peers to the cluster's ranges.
        i.nodes[0].rr_cluster_id = None;
        let p = plan(&i).unwrap();
        assert!(!p.peers[&ip("10.0.0.5")].exports(&net("198.51.100.0/24")));
    }

    #[test]
    fn export_policy_narrows_the_leak_guard_and_is_validated() {
        let mut i = three();
        i.peers.push(bgp_peer(
            serde_json::json!({"peerIP":"10.0.0.1","asNumber":65000,
            "exportPolicy":{"action":"Reject"}}),
        ));
        let tor = &plan(&i).unwrap().peers[&ip("10.0.0.1")];
        assert!(!tor.exports(&net("10.244.1.0/24")), "Reject sends nothing");
        let spec: BGPPeerSpec = serde_json::from_value(serde_json::json!({"peerIP":"10.0.0.1",
            "asNumber":65000,"exportPolicy":{"action":"AllowList","cidrs":["10.0.0.0/33"]}}))
        .unwrap();
        let e = spec.validate("tor").unwrap_err().to_string();
        assert!(e.contains("spec.exportPolicy.cidrs[0]"), "{e}");
    }

    #[test]
    fn ebgp_peer_gets_only_own_routes_and_policy_imports() {
        let mut i = three();
        i.peers.push(bgp_peer(
            serde_json::json!({"peerIP":"10.0.0.1","asNumber":65000,
            "keepaliveTime":"1s","holdTime":"3s"}),
        ));
        let p = plan(&i).unwrap();
        let tor = &p.peers[&ip("10.0.0.1")];
        assert!(tor.export.allows(&net("10.244.1.0/24")));
        assert!(
            !tor.export.allows(&net("10.244.2.0/24")),
            "c's block is not ours"
        );
        assert!(tor.imports(&net("172.16.0.0/16")));
        assert!(
            !tor.imports(&net("0.0.0.0/0")),
            "no default unless the policy allows it"
        );
        assert_eq!((tor.hold_time, tor.keepalive), (3, Some(1)));
        assert_eq!(tor.connect_retry, Duration::from_secs(1));
        i.peers[0] = bgp_peer(serde_json::json!({"peerIP":"10.0.0.1","asNumber":65000,
            "importPolicy":{"action":"AllowList","cidrs":["0.0.0.0/0"]}}));
        assert!(plan(&i).unwrap().peers[&ip("10.0.0.1")].imports(&net("0.0.0.0/0")));
        i.peers[0] = bgp_peer(serde_json::json!({"peerIP":"10.0.0.1","asNumber":65000,
            "importPolicy":{"action":"AllowList","cidrs":["172.16.0.0/12"]}}));
        let tor = plan(&i).unwrap().peers[&ip("10.0.0.1")].clone();
        assert!(tor.imports(&net("172.20.0.0/16")) && !tor.imports(&net("0.0.0.0/0")));
        i.peers[0] = bgp_peer(serde_json::json!({"peerIP":"10.0.0.1","asNumber":65000,
            "importPolicy":{"action":"Reject"}}));
        assert!(!plan(&i).unwrap().peers[&ip("10.0.0.1")].imports(&net("172.20.0.0/16")));
    }

    #[test]
    fn bgp_peer_selection_and_passwords() {
        let mut i = three();
        i.peers.push(bgp_peer(
            serde_json::json!({"peerIP":"10.0.0.1","asNumber":65000,"node":"a"}),
        ));
        i.peers.push(bgp_peer(
            serde_json::json!({"peerIP":"10.0.0.2","asNumber":65000,
            "nodeSelector":{"matchLabels":{"rack":"b"}},
            "password":{"secretKeyRef":{"name":"bgp","key":"pw"}}}),
        ));
        let p = plan(&i).unwrap();
        assert!(!p.peers.contains_key(&ip("10.0.0.1")), "for node a only");
        assert!(
            !p.peers.contains_key(&ip("10.0.0.2")),
            "password not read yet"
        );
        assert!(p.warnings.iter().any(|w| w.contains("not read yet")));
        let r = SecretKeyRef {
            name: "bgp".into(),
            namespace: None,
            key: "pw".into(),
        };
        i.passwords.insert(r.clone(), Ok("s3cret".into()));
        let p = plan(&i).unwrap();
        assert_eq!(p.peers[&ip("10.0.0.2")].password.as_deref(), Some("s3cret"));
        i.passwords
            .insert(r, Err("Secret sepal-system/bgp not found".into()));
        let p = plan(&i).unwrap();
        assert!(!p.peers.contains_key(&ip("10.0.0.2")));
        assert!(p.warnings.iter().any(|w| w.contains("not found")));
    }

    #[test]
    fn bgp_peer_on_a_mesh_address_replaces_the_mesh_session() {
        let mut i = three();
        i.peers.push(bgp_peer(
            serde_json::json!({"peerIP":"192.168.0.3","asNumber":64512,
            "routeReflectorClient":true}),
        ));
        let p = plan(&i).unwrap();
        assert_eq!(
            p.peers[&ip("192.168.0.3")].kind,
            PeerKind::Global("tor".into())
        );
        assert!(p.peers[&ip("192.168.0.3")].rr_client);
        // A BGPPeer naming our own address is skipped.
        i.local = "c".into();
        assert!(!plan(&i).unwrap().peers.contains_key(&ip("192.168.0.3")));
    }

    #[test]
    fn service_ips_local_policy_and_communities() {
        let mut i = three();
        i.config.service_cluster_ips = vec!["10.96.0.0/12".parse().unwrap()];
        i.config.service_external_ips = vec!["203.0.113.0/24".parse().unwrap()];
        i.config.service_load_balancer_ips = vec!["2001:db8::/64".parse().unwrap()];
        i.config.communities = vec![
            (
                "10.96.0.0/12".parse().unwrap(),
                vec![Community::Standard(65000, 100)],
            ),
            (
                "203.0.113.0/24".parse().unwrap(),
                vec![Community::Standard(65000, 200), Community::Large(1, 2, 3)],
            ),
        ];
        let svc = |name: &str, local: bool, ready: bool| ServiceInfo {
            namespace: "web".into(),
            name: name.into(),
            external_ips: vec![ip("203.0.113.5"), ip("198.51.100.1")],
            load_balancer_ips: vec![ip("2001:db8::7")],
            local_only: local,
            local_endpoint_ready: ready,
        };
        i.services = vec![svc("cluster", false, false)];
        let p = plan(&i).unwrap();
        assert!(p.announcements.contains_key(&net("203.0.113.5/32")));
        assert!(p.announcements.contains_key(&net("2001:db8::7/128")));
        assert!(
            !p.announcements.contains_key(&net("198.51.100.1/32")),
            "outside the ranges"
        );
        assert!(p.warnings.iter().any(|w| w.contains("198.51.100.1")));
        assert_eq!(
            p.announcements[&net("10.96.0.0/12")].communities,
            vec![(65000 << 16) | 100]
        );
        assert!(p.announcements[&net("10.96.0.0/12")]
            .large_communities
            .is_empty());
        assert_eq!(
            p.announcements[&net("203.0.113.5/32")].communities,
            vec![(65000 << 16) | 200]
        );
        assert_eq!(
            p.announcements[&net("203.0.113.5/32")].large_communities,
            vec![(1, 2, 3)]
        );
        i.services = vec![svc("local", true, false)];
        let without = plan(&i).unwrap();
        assert!(!without.announcements.contains_key(&net("203.0.113.5/32")));
        i.services = vec![svc("local", true, true)];
        let with = plan(&i).unwrap();
        assert!(with.announcements.contains_key(&net("203.0.113.5/32")));
        // The last local endpoint going away withdraws the /32 and /128.
        let d = diff(Some(&with), &without);
        assert_eq!(
            d.withdraw,
            vec![net("203.0.113.5/32"), net("2001:db8::7/128")]
        );
    }

    #[test]
    fn own_blocks_are_aggregated() {
        let mut i = three();
        i.local_blocks = Some(vec![
            net("10.244.1.0/26"),
            net("10.244.1.64/26"),
            net("10.244.1.128/25"),
            net("10.244.1.5/32"),
        ]);
        let p = plan(&i).unwrap();
        assert_eq!(
            p.announcements.keys().copied().collect::<Vec<_>>(),
            vec![net("10.244.1.0/24")]
        );
    }

    #[test]
    fn dual_stack_nodes_use_one_ipv4_session() {
        let mut i = three();
        for (n, v6) in i.nodes.iter_mut().zip(["fd00::1", "fd00::2", "fd00::3"]) {
            n.addresses.push(ip(v6));
            let v6block = format!("fd10:{}::/64", n.name.as_bytes()[0]);
            n.pod_cidrs.push(net(&v6block));
        }
        let p = plan(&i).unwrap();
        assert_eq!(p.peers.len(), 2);
        assert!(p.peers.keys().all(|a| a.is_ipv4()));
        assert_eq!(p.announcements.len(), 2);
        assert_eq!(p.speaker.listen.len(), 2);
        // The IPv6 block goes out with the node's IPv6 address as next hop, the IPv4 one with
        // the session's address.
        let hops: Vec<Option<IpAddr>> = p.announcements.values().map(|a| a.next_hop).collect();
        assert_eq!(hops, vec![None, Some(ip("fd00::2"))]);
        // IPv6-only nodes get a router ID from their name.
        let mut v6only = three();
        for n in &mut v6only.nodes {
            n.addresses = vec![ip(&format!("fd00::{}", n.name.as_bytes()[0]))];
        }
        let p = plan(&v6only).unwrap();
        assert_ne!(p.speaker.router_id, Ipv4Addr::UNSPECIFIED);
        assert!(p.peers.keys().all(|a| a.is_ipv6()));
    }

    #[test]
    fn fast_and_odd_timers() {
        assert_eq!(timers(None, None), (90, None, Duration::from_secs(5)));
        assert_eq!(timers(None, Some(Duration::from_secs(2))).0, 3);
        assert_eq!(
            timers(Some(Duration::from_secs(1)), Some(Duration::from_secs(3))),
            (3, Some(1), Duration::from_secs(1))
        );
        assert_eq!(
            timers(None, Some(Duration::from_secs(9))).2,
            Duration::from_secs(1)
        );
    }
}
