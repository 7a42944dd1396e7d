//! The lab's topology file: nodes, routers, namespaces and pods, and the built-in default.
//! Parsed once, validated, then addresses are derived from positions so `up` is deterministic.

use anyhow::{bail, Context, Result};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, Ipv6Addr};

/// Name of the lab when neither the topology nor `--name` gives one.
pub const DEFAULT_LAB: &str = "sepal";

/// The most nodes a lab holds.
pub const MAX_NODES: usize = 254;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Topology {
    #[serde(default)]
    pub name: Option<String>,
    /// Cluster pod CIDR(s); per-node blocks are carved from the first IPv4 one, and from the
    /// first IPv6 one when there is one (a dual-stack lab), unless a node gives its own.
    #[serde(default = "default_pod_cidr", rename = "podCIDR")]
    pub pod_cidr: Vec<IpNetwork>,
    /// Prefix length of the per-node IPv4 blocks carved from `podCIDR`.
    #[serde(default = "default_block_size")]
    pub block_size: u8,
    /// Prefix length of the per-node IPv6 blocks (a /64 per node, as Kubernetes gives).
    #[serde(default = "default_block_size6", rename = "blockSize6")]
    pub block_size6: u8,
    pub nodes: Vec<NodeSpec>,
    #[serde(default)]
    pub routers: Vec<RouterSpec>,
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
    #[serde(default)]
    pub pods: Vec<PodSpec>,
    /// Kubernetes objects (policies, BGP resources, …) written into the datastore at `up`.
    #[serde(default)]
    pub manifests: Vec<serde_json::Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeSpec {
    pub name: String,
    #[serde(default)]
    pub as_number: Option<u32>,
    #[serde(default)]
    pub rack: Option<String>,
    /// Explicit blocks; carved from the cluster pod CIDR when empty.
    #[serde(default, rename = "podCIDRs")]
    pub pod_cidrs: Vec<IpNetwork>,
    /// Makes the node a route reflector with this cluster ID (its
    /// `sepal.dev/route-reflector-cluster-id` annotation); with the mesh off in the
    /// BGPConfiguration, the other nodes peer only with the reflectors.
    #[serde(default, rename = "routeReflectorClusterID")]
    pub route_reflector_cluster_id: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouterKind {
    Bird,
    Frr,
    Gobgp,
    /// A plain L3 switch with static routes to each node's blocks.
    None,
    /// One L2 segment (a Linux bridge) joining the nodes it serves, routing nothing: the nodes'
    /// own BGP carries the blocks, the iBGP node mesh by default or route reflectors.
    Switch,
}

impl RouterKind {
    /// Debian package that provides the daemon, for the error when it is missing.
    pub fn package(self) -> Option<(&'static str, &'static str)> {
        match self {
            RouterKind::Bird => Some(("bird", "bird2")),
            RouterKind::Frr => Some(("/usr/lib/frr/bgpd", "frr")),
            RouterKind::Gobgp => Some(("gobgpd", "gobgpd")),
            RouterKind::None | RouterKind::Switch => None,
        }
    }

    /// Whether the router speaks BGP with the nodes (a static router or a switch does not).
    pub fn speaks_bgp(self) -> bool {
        !matches!(self, RouterKind::None | RouterKind::Switch)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouterSpec {
    pub name: String,
    pub kind: RouterKind,
    #[serde(default = "default_router_as")]
    pub as_number: u32,
    /// BGP with each node over the link's IPv6 link-local addresses (BGPPeer `interface`, IPv4
    /// routes with IPv6 next hops); the links keep their IPv4 addresses for everything else.
    /// BIRD and FRR.
    #[serde(default)]
    pub unnumbered: bool,
    /// The rack whose nodes this router serves (a top-of-rack router); None: every node.
    #[serde(default)]
    pub rack: Option<String>,
    /// `tor` (the default) peers with nodes; `spine` peers with every rack's ToRs.
    #[serde(default)]
    pub role: RouterRole,
    /// BFD (RFC 5880, 300 ms and 3) on every session of this router, and on the nodes' BGPPeers
    /// towards it. BIRD and FRR; GoBGP has none.
    #[serde(default)]
    pub bfd: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouterRole {
    #[default]
    Tor,
    Spine,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NamespaceSpec {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodSpec {
    pub namespace: String,
    pub name: String,
    pub node: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub container_ports: Vec<ContainerPort>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: u16,
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

fn default_pod_cidr() -> Vec<IpNetwork> {
    vec!["10.244.0.0/16".parse().expect("literal")]
}
fn default_block_size() -> u8 {
    24
}
fn default_block_size6() -> u8 {
    64
}
fn default_router_as() -> u32 {
    65000
}
fn default_protocol() -> String {
    "TCP".into()
}

/// The built-in lab: 3 nodes under one BIRD ToR, 2 labelled namespaces, 2 pods per node.
pub const DEFAULT_TOPOLOGY: &str = r#"
name: sepal
podCIDR: [10.244.0.0/16]
nodes:
  - {name: node1, rack: r1}
  - {name: node2, rack: r1}
  - {name: node3, rack: r1}
routers:
  - {name: tor, kind: bird, asNumber: 65000}
namespaces:
  - {name: frontend, labels: {team: web}}
  - {name: backend, labels: {team: api}}
pods:
  - {namespace: frontend, name: web-1, node: node1, labels: {app: web}, containerPorts: [{name: http, containerPort: 80}]}
  - {namespace: backend, name: api-1, node: node1, labels: {app: api}, containerPorts: [{name: http, containerPort: 8080}]}
  - {namespace: frontend, name: web-2, node: node2, labels: {app: web}, containerPorts: [{name: http, containerPort: 80}]}
  - {namespace: backend, name: api-2, node: node2, labels: {app: api}, containerPorts: [{name: http, containerPort: 8080}]}
  - {namespace: frontend, name: web-3, node: node3, labels: {app: web}, containerPorts: [{name: http, containerPort: 80}]}
  - {namespace: backend, name: db-1, node: node3, labels: {app: db}, containerPorts: [{name: sql, containerPort: 5432}]}
"#;

impl Topology {
    pub fn parse(text: &str) -> Result<Topology> {
        let topo: Topology = serde_norway::from_str(text).context("topology YAML")?;
        topo.validate()?;
        Ok(topo)
    }

    pub fn default_lab() -> Topology {
        Topology::parse(DEFAULT_TOPOLOGY).expect("built-in topology is valid")
    }

    fn validate(&self) -> Result<()> {
        if self.nodes.is_empty() {
            bail!("a topology needs at least one node");
        }
        // Node n's link addresses are 10.<router>.<n+1>.2: one octet numbers the nodes.
        if self.nodes.len() > MAX_NODES {
            bail!(
                "{} nodes: a lab has at most {MAX_NODES} (its link addresses number nodes in one octet)",
                self.nodes.len()
            );
        }
        let mut names = BTreeSet::new();
        for name in self
            .nodes
            .iter()
            .map(|n| &n.name)
            .chain(self.routers.iter().map(|r| &r.name))
        {
            check_name(name)?;
            if !names.insert(name.as_str()) {
                bail!("node/router name {name:?} is used twice");
            }
        }
        if let Some(r) = self
            .routers
            .iter()
            .find(|r| r.unnumbered && !matches!(r.kind, RouterKind::Bird | RouterKind::Frr))
        {
            bail!("router {}: unnumbered needs kind bird or frr", r.name);
        }
        if self.routers.len() > 1 && self.routers.iter().any(|r| r.kind == RouterKind::None) {
            bail!("a static router (kind none) must be the only router");
        }
        if self.routers.len() > 1 && self.routers.iter().any(|r| r.kind == RouterKind::Switch) {
            bail!("a switch must be the only router: it is the lab's one L2 segment");
        }
        if let Some(r) = self
            .routers
            .iter()
            .find(|r| r.bfd && !matches!(r.kind, RouterKind::Bird | RouterKind::Frr))
        {
            bail!(
                "router {}: bfd needs kind bird or frr (GoBGP has no BFD)",
                r.name
            );
        }
        self.validate_fabric()?;
        let namespaces: BTreeSet<&str> = self.namespaces.iter().map(|n| n.name.as_str()).collect();
        let mut pods = BTreeSet::new();
        for pod in &self.pods {
            if !self.nodes.iter().any(|n| n.name == pod.node) {
                bail!(
                    "pod {}/{} is on unknown node {:?}",
                    pod.namespace,
                    pod.name,
                    pod.node
                );
            }
            if !namespaces.contains(pod.namespace.as_str()) && pod.namespace != "default" {
                bail!(
                    "pod {}/{} is in undeclared namespace {:?}",
                    pod.namespace,
                    pod.name,
                    pod.namespace
                );
            }
            if !pods.insert((&pod.namespace, &pod.name)) {
                bail!("pod {}/{} is declared twice", pod.namespace, pod.name);
            }
        }
        for (i, _) in self.nodes.iter().enumerate() {
            self.node_blocks(i)?;
        }
        Ok(())
    }

    /// Racks and spines: a spine has no rack, ToRs under spines each have one, every node is
    /// cabled to some router, and the fabric carries IPv4 only.
    fn validate_fabric(&self) -> Result<()> {
        if !self.routers.is_empty() {
            for (n, node) in self.nodes.iter().enumerate() {
                if !(0..self.routers.len()).any(|r| self.cabled(r, n)) {
                    bail!(
                        "node {} (rack {:?}) is cabled to no router: no ToR serves its rack",
                        node.name,
                        node.rack.as_deref().unwrap_or("")
                    );
                }
            }
        }
        if self.spines().next().is_none() {
            return Ok(());
        }
        for r in &self.routers {
            match r.role {
                RouterRole::Spine if r.rack.is_some() => {
                    bail!("spine {} cannot be in a rack", r.name)
                }
                RouterRole::Tor if r.rack.is_none() => {
                    bail!("router {}: under spines every ToR needs a rack", r.name)
                }
                _ if !r.kind.speaks_bgp() => {
                    bail!("router {}: a fabric with spines needs BGP routers", r.name)
                }
                _ => {}
            }
        }
        for spine in self.spines().map(|s| &self.routers[s]) {
            if spine.unnumbered {
                bail!("spine {}: unnumbered is for the links to nodes", spine.name);
            }
            if let Some(tor) = self
                .routers
                .iter()
                .find(|r| r.role == RouterRole::Tor && r.as_number == spine.as_number)
            {
                bail!(
                    "spine {} and ToR {} share AS {}: the fabric is eBGP (RFC 7938), give the \
                     spines an asNumber of their own",
                    spine.name,
                    tor.name,
                    spine.as_number
                );
            }
        }
        if self.spines().count() > 15 {
            bail!("at most 15 spines");
        }
        if self.pod_range6().is_some() {
            bail!("a fabric with spines carries IPv4 only: drop the IPv6 podCIDR");
        }
        Ok(())
    }

    /// Whether router `router` has a link to node `node`: a ToR without a rack serves every
    /// node, one with a rack only that rack's; spines serve none.
    pub fn cabled(&self, router: usize, node: usize) -> bool {
        let r = &self.routers[router];
        r.role == RouterRole::Tor && (r.rack.is_none() || r.rack == self.nodes[node].rack)
    }

    /// Indices of the spine routers, in topology order.
    pub fn spines(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.routers.len()).filter(|&r| self.routers[r].role == RouterRole::Spine)
    }

    /// Indices of the routers with a link to node `node`, in topology order.
    pub fn routers_of(&self, node: usize) -> Vec<usize> {
        (0..self.routers.len())
            .filter(|&r| self.cabled(r, node))
            .collect()
    }

    /// The pod blocks of node `index`: explicit ones, or the (index+1)-th block of the cluster's
    /// IPv4 CIDR, and of its IPv6 CIDR when it has one.
    pub fn node_blocks(&self, index: usize) -> Result<Vec<IpNetwork>> {
        let node = &self.nodes[index];
        if !node.pod_cidrs.is_empty() {
            return Ok(node.pod_cidrs.clone());
        }
        let Some(IpNetwork::V4(cluster)) = self.pod_cidr.iter().find(|c| c.is_ipv4()) else {
            bail!(
                "node {} has no podCIDRs and the cluster has no IPv4 podCIDR to carve from",
                node.name
            );
        };
        if self.block_size < cluster.prefix() || self.block_size > 30 {
            bail!("blockSize /{} does not fit in {cluster}", self.block_size);
        }
        let base = u32::from(cluster.network()) as u128;
        let v4 = carve(base, 32, cluster.prefix(), self.block_size, index).with_context(|| {
            format!(
                "{cluster} has no room for a /{} block for node {}",
                self.block_size, node.name
            )
        })?;
        let mut blocks = vec![IpNetwork::V4(Ipv4Network::new(
            Ipv4Addr::from(v4 as u32),
            self.block_size,
        )?)];
        if let Some(cluster6) = self.pod_range6() {
            if self.block_size6 < cluster6.prefix() || self.block_size6 > 120 {
                bail!(
                    "blockSize6 /{} does not fit in {cluster6}",
                    self.block_size6
                );
            }
            let base = u128::from(cluster6.network());
            let v6 = carve(base, 128, cluster6.prefix(), self.block_size6, index).with_context(
                || {
                    format!(
                        "{cluster6} has no room for a /{} block for node {}",
                        self.block_size6, node.name
                    )
                },
            )?;
            blocks.push(IpNetwork::V6(Ipv6Network::new(
                Ipv6Addr::from(v6),
                self.block_size6,
            )?));
        }
        Ok(blocks)
    }

    /// Whether the nodes share one L2 segment (a switch) and peer among themselves.
    pub fn switched(&self) -> bool {
        self.routers.iter().any(|r| r.kind == RouterKind::Switch)
    }

    /// The cluster's IPv6 pod CIDR: the lab is dual-stack when there is one.
    pub fn pod_range6(&self) -> Option<Ipv6Network> {
        self.pod_cidr.iter().find_map(|c| match c {
            IpNetwork::V6(n) => Some(*n),
            IpNetwork::V4(_) => None,
        })
    }
}

/// The network address of the (index+1)-th /`block` inside a /`outer` range starting at `base`
/// (addresses `bits` wide); block 0 stays free, as the lab's nodes count from 1. None: no room.
fn carve(base: u128, bits: u8, outer: u8, block: u8, index: usize) -> Option<u128> {
    let size = 1u128.checked_shl(u32::from(bits - block))?;
    let room = 1u128
        .checked_shl(u32::from(bits - outer))
        .unwrap_or(u128::MAX);
    let offset = size.checked_mul(index as u128 + 1)?;
    (offset.checked_add(size)? <= room).then(|| base + offset)
}

/// Names end up in namespace and file names: keep them DNS-label-like.
fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 20
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-');
    if !ok {
        bail!("name {name:?} must be 1-20 characters of a-z, 0-9 and '-'");
    }
    Ok(())
}

/// Lab names prefix every namespace and file the lab creates.
pub fn check_lab_name(name: &str) -> Result<()> {
    check_name(name).with_context(|| format!("lab name {name:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_topology_has_three_nodes_and_six_pods() {
        let topo = Topology::default_lab();
        assert_eq!(topo.nodes.len(), 3);
        assert_eq!(topo.pods.len(), 6);
        assert_eq!(
            topo.node_blocks(0).unwrap(),
            vec!["10.244.1.0/24".parse::<IpNetwork>().unwrap()]
        );
        assert_eq!(
            topo.node_blocks(2).unwrap(),
            vec!["10.244.3.0/24".parse::<IpNetwork>().unwrap()]
        );
    }

    #[test]
    fn rejects_pods_on_unknown_nodes_and_bad_names() {
        let bad = "nodes: [{name: n1}]\npods: [{namespace: default, name: p, node: n2}]\n";
        assert!(Topology::parse(bad)
            .unwrap_err()
            .to_string()
            .contains("unknown node"));
        assert!(Topology::parse("nodes: [{name: N1}]").is_err());
        assert!(Topology::parse("nodes: [{name: n1, color: red}]").is_err());
    }

    #[test]
    fn an_ipv6_pod_cidr_makes_every_node_dual_stack() {
        let topo = Topology::parse(
            "podCIDR: [10.246.0.0/16, 'fd10:246::/48']\nnodes: [{name: n1}, {name: n2}]\n",
        )
        .unwrap();
        let blocks = |i| -> Vec<String> {
            topo.node_blocks(i)
                .unwrap()
                .iter()
                .map(|b| b.to_string())
                .collect()
        };
        assert_eq!(blocks(0), ["10.246.1.0/24", "fd10:246:0:1::/64"]);
        assert_eq!(blocks(1), ["10.246.2.0/24", "fd10:246:0:2::/64"]);
        assert_eq!(topo.pod_range6().unwrap().to_string(), "fd10:246::/48");
        assert!(Topology::default_lab().pod_range6().is_none());
        let wide =
            "podCIDR: [10.246.0.0/16, 'fd10:246::/48']\nblockSize6: 40\nnodes: [{name: n1}]\n";
        let err = Topology::parse(wide).unwrap_err().to_string();
        assert!(err.contains("blockSize6"), "{err}");
        let full = "podCIDR: [10.246.0.0/16, 'fd10:246::/63']\nnodes: [{name: n1}, {name: n2}]\n";
        let err = format!("{:#}", Topology::parse(full).unwrap_err());
        assert!(err.contains("no room"), "{err}");
    }

    /// A switch lab of `n` nodes with a pod each, nodes 1 and 2 reflectors when `rr`.
    fn switch_lab(n: usize, rr: bool) -> String {
        let mut text = String::from("routers: [{name: sw, kind: switch}]\nnodes:\n");
        for i in 1..=n {
            let id = match rr && i <= 2 {
                true => ", routeReflectorClusterID: 244.0.0.1",
                false => "",
            };
            text.push_str(&format!("  - {{name: n{i}{id}}}\n"));
        }
        text.push_str("pods:\n");
        for i in 1..=n {
            text.push_str(&format!(
                "  - {{namespace: default, name: p{i}, node: n{i}}}\n"
            ));
        }
        text
    }

    #[test]
    fn fifty_switched_nodes_with_reflectors() {
        let topo = Topology::parse(&switch_lab(50, true)).unwrap();
        assert!(topo.switched());
        assert_eq!((topo.nodes.len(), topo.pods.len()), (50, 50));
        let reflectors: Vec<&str> = topo
            .nodes
            .iter()
            .filter(|n| n.route_reflector_cluster_id.is_some())
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(reflectors, ["n1", "n2"]);
        let blocks: BTreeSet<IpNetwork> =
            (0..50).flat_map(|i| topo.node_blocks(i).unwrap()).collect();
        assert_eq!(blocks.len(), 50);
        assert!(blocks.contains(&"10.244.50.0/24".parse().unwrap()));
        assert!((0..50).all(|n| topo.routers_of(n) == [0]));
    }

    #[test]
    fn rejects_too_many_nodes_a_second_switch_and_a_bad_cluster_id() {
        let err = Topology::parse(&switch_lab(255, false))
            .unwrap_err()
            .to_string();
        assert!(err.contains("at most 254"), "{err}");
        assert!(Topology::parse(&switch_lab(254, false)).is_ok());
        let two =
            "routers: [{name: sw, kind: switch}, {name: tor, kind: bird}]\nnodes: [{name: n1}]\n";
        let err = Topology::parse(two).unwrap_err().to_string();
        assert!(err.contains("only router"), "{err}");
        let bad = "nodes: [{name: n1, routeReflectorClusterID: 244.0.0}]\n";
        assert!(Topology::parse(bad).is_err());
    }

    #[test]
    fn explicit_blocks_win() {
        let topo =
            Topology::parse("nodes: [{name: n1, podCIDRs: [10.9.0.0/26, 'fd00::/120']}]").unwrap();
        assert_eq!(topo.node_blocks(0).unwrap().len(), 2);
    }
}
