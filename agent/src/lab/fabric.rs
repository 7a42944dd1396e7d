//! The lab's leaf-spine fabric (RFC 7938 style): spines cabled to every rack's ToRs, an eBGP
//! session on each of those links, and static routes so that the underlay's own addresses (the
//! nodes' link addresses, the control plane's) are reachable across racks as they would be in a
//! data centre. The ToR ↔ node half is router.rs's; this module adds what sits above it.

use super::net;
use super::router::{self, PodRanges, HOLD, KEEPALIVE};
use super::state::LabState;
use super::topology::{RouterKind, Topology};
use anyhow::Result;
use std::path::Path;

/// A cable between spine `spine` and ToR `tor` (router indices); `ord` is the spine's position
/// among the spines, which numbers its links' subnets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Uplink {
    pub spine: usize,
    pub tor: usize,
    pub ord: usize,
}

/// Every spine–ToR cable, spine by spine.
pub fn uplinks(topo: &Topology) -> Vec<Uplink> {
    let tors: Vec<usize> = (0..topo.routers.len())
        .filter(|&r| topo.routers[r].role == super::topology::RouterRole::Tor)
        .collect();
    topo.spines()
        .enumerate()
        .flat_map(|(ord, spine)| tors.iter().map(move |&tor| Uplink { spine, tor, ord }))
        .collect()
}

impl Uplink {
    /// The spine's address on this cable (a /24 per cable in 172.16.0.0/12).
    pub fn spine_addr(&self) -> String {
        format!("172.{}.{}.1", 16 + self.ord, self.tor)
    }
    pub fn tor_addr(&self) -> String {
        format!("172.{}.{}.2", 16 + self.ord, self.tor)
    }
    /// The spine's interface: named after the ToR's router index, as a ToR's are after nodes.
    pub fn spine_if(&self) -> String {
        format!("r{}", self.tor)
    }
    pub fn tor_if(&self) -> String {
        format!("r{}", self.spine)
    }
    fn subnet(&self) -> String {
        format!("172.{}.{}.0/24", 16 + self.ord, self.tor)
    }
}

/// Creates the spine–ToR cables and their addresses (the routers' namespaces exist).
pub fn cable(lab: &LabState) -> Result<()> {
    for link in uplinks(&lab.topology) {
        let (spine, tor) = (&lab.routers[link.spine], &lab.routers[link.tor]);
        net::veth(&spine.netns, &link.spine_if(), &tor.netns, &link.tor_if())?;
        net::sh(
            &spine.netns,
            &format!(
                "ip addr add {}/24 dev {}",
                link.spine_addr(),
                link.spine_if()
            ),
        )?;
        net::sh(
            &tor.netns,
            &format!("ip addr add {}/24 dev {}", link.tor_addr(), link.tor_if()),
        )?;
    }
    Ok(())
}

/// Makes `subnet`, on a link of router `owner`, reachable from every other router of the
/// fabric with static routes: ToRs reach it through every spine (ECMP) or the spine that holds
/// it, spines through the ToR that holds it (or the first ToR, for another spine's). Nothing to
/// do without spines: there every router has its own links only, as before.
pub fn route_subnet(lab: &LabState, subnet: &str, owner: usize) -> Result<()> {
    route_subnet_except(lab, subnet, owner, owner)
}

/// [`route_subnet`], leaving out router `also_on` as well, the other end of a cable between
/// two routers.
fn route_subnet_except(lab: &LabState, subnet: &str, owner: usize, also_on: usize) -> Result<()> {
    let links = uplinks(&lab.topology);
    if links.is_empty() {
        return Ok(());
    }
    let is_spine = |r: usize| links.iter().any(|l| l.spine == r);
    for (r, router) in lab.routers.iter().enumerate() {
        if r == owner || r == also_on {
            continue;
        }
        let hops: Vec<String> = match (is_spine(r), is_spine(owner)) {
            (false, false) => links
                .iter()
                .filter(|l| l.tor == r)
                .map(Uplink::spine_addr)
                .collect(),
            (false, true) => links
                .iter()
                .filter(|l| l.tor == r && l.spine == owner)
                .map(Uplink::spine_addr)
                .collect(),
            (true, false) => links
                .iter()
                .filter(|l| l.spine == r && l.tor == owner)
                .map(Uplink::tor_addr)
                .collect(),
            (true, true) => links
                .iter()
                .filter(|l| l.spine == r)
                .take(1)
                .map(Uplink::tor_addr)
                .collect(),
        };
        let hops: Vec<String> = hops.iter().map(|h| format!("nexthop via {h}")).collect();
        net::sh(
            &router.netns,
            &format!("ip route replace {subnet} {}", hops.join(" ")),
        )?;
    }
    Ok(())
}

/// Makes every cable's subnet reachable fabric-wide (the spines' and ToRs' own addresses).
pub fn route_uplinks(lab: &LabState) -> Result<()> {
    for link in uplinks(&lab.topology) {
        route_subnet_except(lab, &link.subnet(), link.spine, link.tor)?;
    }
    Ok(())
}

/// What a ToR's configuration gains for its spines: one eBGP session per spine, taking the
/// cluster's pod and Service ranges in (the guide's filter) and sending everything out, with BFD
/// where both ends run it. Empty without spines.
pub fn tor_uplinks(lab: &LabState, tor: usize, kind: RouterKind) -> String {
    let me = &lab.topology.routers[tor];
    let mut out = String::new();
    for link in uplinks(&lab.topology).iter().filter(|l| l.tor == tor) {
        let spine = &lab.topology.routers[link.spine];
        let bfd = me.bfd && spine.bfd;
        let session = Session {
            name: spine.name.replace('-', "_"),
            local: link.tor_addr(),
            peer: link.spine_addr(),
            local_as: me.as_number,
            peer_as: spine.as_number,
            bfd,
        };
        out.push_str(&session.render(kind, "sepal-pods", "sepal_pods"));
    }
    if !out.is_empty() && kind == RouterKind::Frr {
        out = format!("router bgp {}\n{out}", me.as_number);
    }
    out
}

/// One eBGP session of the fabric, as a daemon's configuration says it.
struct Session {
    name: String,
    local: String,
    peer: String,
    local_as: u32,
    peer_as: u32,
    bfd: bool,
}

impl Session {
    /// The session in `kind`'s syntax; `prefix_list` (FRR, GoBGP's global policy) and
    /// `filter` (BIRD) name the import filter the surrounding configuration defines. FRR's
    /// lines go inside a `router bgp` block the caller opens.
    fn render(&self, kind: RouterKind, prefix_list: &str, filter: &str) -> String {
        let Session {
            name,
            local,
            peer,
            local_as,
            peer_as,
            bfd,
        } = self;
        match kind {
            RouterKind::Bird => format!(
                "protocol bgp f_{name} {{\n  local {local} as {local_as}; neighbor {peer} as {peer_as};\n  \
                 hold time {HOLD}; keepalive time {KEEPALIVE};\n  \
                 connect delay time 1; connect retry time 1; error wait time 1, 5;\n{}  \
                 ipv4 {{ import filter {filter}; export all; }};\n}}\n",
                if *bfd { "  bfd on;\n" } else { "" }
            ),
            RouterKind::Frr => format!(
                " neighbor {peer} remote-as {peer_as}\n neighbor {peer} timers {KEEPALIVE} {HOLD}\n \
                 neighbor {peer} timers connect 1\n{} address-family ipv4 unicast\n  \
                 neighbor {peer} prefix-list {prefix_list} in\n exit-address-family\n",
                if *bfd {
                    format!(" neighbor {peer} bfd\n")
                } else {
                    String::new()
                }
            ),
            RouterKind::Gobgp => format!(
                "\n[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{peer}\"\n    \
                 peer-as = {peer_as}\n  [neighbors.transport.config]\n    local-address = \"{local}\"\n  \
                 [neighbors.timers.config]\n    connect-retry = 1\n    hold-time = {HOLD}\n    \
                 keepalive-interval = {KEEPALIVE}\n  [[neighbors.afi-safis]]\n    \
                 [neighbors.afi-safis.config]\n      afi-safi-name = \"ipv4-unicast\"\n"
            ),
            RouterKind::None | RouterKind::Switch => String::new(),
        }
    }
}

/// A spine: eBGP with every ToR, the cluster's ranges in, everything out, learned routes into
/// its kernel with ECMP across the ToRs of a rack.
pub fn start_spine(
    lab: &LabState,
    index: usize,
    ranges: &PodRanges,
    dir: &Path,
) -> Result<Vec<u32>> {
    let me = &lab.topology.routers[index];
    let links: Vec<Uplink> = uplinks(&lab.topology)
        .into_iter()
        .filter(|l| l.spine == index)
        .collect();
    let router_id = links
        .first()
        .map(Uplink::spine_addr)
        .unwrap_or_else(|| "172.16.255.1".into());
    let sessions: Vec<Session> = links
        .iter()
        .map(|l| {
            let tor = &lab.topology.routers[l.tor];
            Session {
                name: tor.name.replace('-', "_"),
                local: l.spine_addr(),
                peer: l.tor_addr(),
                local_as: me.as_number,
                peer_as: tor.as_number,
                bfd: me.bfd && tor.bfd,
            }
        })
        .collect();
    let render = |kind| {
        sessions
            .iter()
            .map(|s| s.render(kind, "sepal-pods", "sepal_pods"))
            .collect::<String>()
    };
    let state = &lab.routers[index];
    let (pods, services) = (ranges.v4, ranges.services);
    match me.kind {
        RouterKind::Bird => {
            let mut text = format!(
                "router id {router_id};\nprotocol device {{ }}\n\
                 protocol kernel {{ merge paths on; ipv4 {{ import none; export where source = RTS_BGP; }}; }}\n\
                 filter sepal_pods {{\n  if net ~ [ {pods}+ ] then accept;\n{}  reject;\n}}\n",
                services
                    .map(|s| format!("  if net ~ [ {s}+ ] then accept;\n"))
                    .unwrap_or_default()
            );
            if me.bfd {
                text.push_str(
                    "protocol bfd { interface \"*\" { min rx interval 300 ms; \
                     min tx interval 300 ms; multiplier 3; }; }\n",
                );
            }
            text.push_str(&render(RouterKind::Bird));
            router::spawn_bird(state, &text, dir)
        }
        RouterKind::Frr => {
            let mut text = format!(
                "frr defaults datacenter\nip prefix-list sepal-pods seq 10 permit {pods} le 32\n{}\
                 router bgp {}\n bgp router-id {router_id}\n no bgp ebgp-requires-policy\n \
                 bgp bestpath as-path multipath-relax\n address-family ipv4 unicast\n  maximum-paths 8\n \
                 exit-address-family\n",
                services
                    .map(|s| format!("ip prefix-list sepal-pods seq 20 permit {s} le 32\n"))
                    .unwrap_or_default(),
                me.as_number
            );
            text.push_str(&render(RouterKind::Frr));
            router::spawn_frr(state, &text, me.bfd, dir)
        }
        RouterKind::Gobgp => {
            let mut prefixes = format!(
                "    {{ ip-prefix = \"{pods}\", masklength-range = \"{}..32\" }},\n",
                pods.prefix()
            );
            if let Some(s) = services {
                prefixes.push_str(&format!(
                    "    {{ ip-prefix = \"{s}\", masklength-range = \"{}..32\" }},\n",
                    s.prefix()
                ));
            }
            let mut text = format!(
                "[global.config]\n  as = {}\n  router-id = \"{router_id}\"\n\n\
                 [global.apply-policy.config]\n  import-policy-list = [\"sepal-pods\"]\n  \
                 default-import-policy = \"reject-route\"\n\n[[defined-sets.prefix-sets]]\n  \
                 prefix-set-name = \"sepal-pods\"\n  prefix-list = [\n{prefixes}  ]\n\n\
                 [[policy-definitions]]\n  name = \"sepal-pods\"\n  [[policy-definitions.statements]]\n    \
                 name = \"pod-blocks\"\n    [policy-definitions.statements.conditions.match-prefix-set]\n      \
                 prefix-set = \"sepal-pods\"\n    [policy-definitions.statements.actions]\n      \
                 route-disposition = \"accept-route\"\n",
                me.as_number
            );
            text.push_str(&render(RouterKind::Gobgp));
            router::spawn_gobgp(state, &text, dir)
        }
        RouterKind::None | RouterKind::Switch => Ok(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEAF_SPINE: &str = include_str!("../../../docs/examples/leaf-spine-lab.yaml");

    #[test]
    fn every_spine_is_cabled_to_every_tor_and_nodes_to_their_racks_tors() {
        let topo = Topology::parse(LEAF_SPINE).unwrap();
        let links = uplinks(&topo);
        let tors = topo.routers.len() - topo.spines().count();
        assert_eq!(links.len(), tors * topo.spines().count());
        assert!(links.iter().all(|l| topo.spines().any(|s| s == l.spine)));
        // Every node is dual-homed: two routers, both its rack's ToRs.
        for (n, node) in topo.nodes.iter().enumerate() {
            let routers = topo.routers_of(n);
            assert_eq!(routers.len(), 2, "{}", node.name);
            assert!(routers.iter().all(|&r| topo.routers[r].rack == node.rack));
        }
        // Cable subnets are distinct.
        let subnets: std::collections::BTreeSet<String> =
            links.iter().map(Uplink::subnet).collect();
        assert_eq!(subnets.len(), links.len());
    }

    #[test]
    fn fabric_mistakes_are_named() {
        let err = |t: &str| format!("{:#}", Topology::parse(t).unwrap_err());
        let base = "nodes: [{name: n1, rack: r1}]\nrouters:\n";
        let spine = "  - {name: s1, kind: frr, role: spine, asNumber: 65100}\n";
        assert!(err(&format!(
            "{base}  - {{name: t1, kind: frr, asNumber: 65001}}\n{spine}"
        ))
        .contains("needs a rack"));
        assert!(err(&format!(
            "{base}  - {{name: t1, kind: frr, rack: r2, asNumber: 65001}}\n{spine}"
        ))
        .contains("cabled to no router"));
        assert!(err(&format!(
            "{base}  - {{name: t1, kind: frr, rack: r1}}\n  - {{name: s1, kind: frr, role: spine}}\n"
        ))
        .contains("share AS"));
        assert!(err(&format!(
            "{base}  - {{name: t1, kind: gobgp, rack: r1, bfd: true}}\n"
        ))
        .contains("no BFD"));
    }

    #[test]
    fn sessions_render_for_each_daemon() {
        let s = Session {
            name: "s1".into(),
            local: "172.16.0.2".into(),
            peer: "172.16.0.1".into(),
            local_as: 65001,
            peer_as: 65100,
            bfd: true,
        };
        let bird = s.render(RouterKind::Bird, "sepal-pods", "sepal_pods");
        assert!(bird.contains("neighbor 172.16.0.1 as 65100") && bird.contains("bfd on"));
        let frr = s.render(RouterKind::Frr, "sepal-pods", "sepal_pods");
        assert!(frr.contains(" neighbor 172.16.0.1 bfd\n"), "{frr}");
        let gobgp = s.render(RouterKind::Gobgp, "sepal-pods", "sepal_pods");
        assert!(gobgp.contains("peer-as = 65100") && !gobgp.contains("bfd"));
    }
}
