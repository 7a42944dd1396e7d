//! Upstream's ClusterNetworkPolicy conformance world (network-policy-api conformance/base/
//! manifests.yaml) on one Sepal node: four houses of two StatefulSet pods each, and the two
//! host-network centaur pods of forbidden-forrest, one on each node. All eight pods live on
//! node-0, as felix programs only its own node; node-1 is the netns at the other end of node-0's
//! uplink, so that a pod's traffic to "a node" crosses node-0's forward path (traffic between a
//! pod and its own node never does, whatever the policy: see felix's nft.rs).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use sepal_felix::policy::{NamedPort, Node, Pod, Protocol};
use sepal_tests::netns::Netns;
use sepal_tests::podnet::{PodNode, Servers};

pub const NS_PREFIX: &str = "network-policy-conformance-";
/// (house, StatefulSet) in upstream's order.
pub const HOUSES: [(&str, &str); 4] = [
    ("gryffindor", "harry-potter"),
    ("slytherin", "draco-malfoy"),
    ("hufflepuff", "cedric-diggory"),
    ("ravenclaw", "luna-lovegood"),
];
/// The house of the host-network StatefulSet `centaur`.
pub const FOREST: &str = "forbidden-forrest";
pub const POD_TCP: [u16; 2] = [80, 8080];
pub const POD_UDP: [u16; 2] = [53, 5353];
pub const POD_SCTP: [u16; 2] = [9003, 9005];
/// Upstream's default HostNetworkPortRangeStart; the suite uses 8 ports from it.
pub const HOST_PORT_BASE: u16 = 34345;
pub const NODE_IPS: [Ipv4Addr; 2] = [
    Ipv4Addr::new(10, 255, 255, 2),
    Ipv4Addr::new(10, 255, 255, 3),
];
const POD_CIDR: &str = "10.244.0.0/24";

/// Host port N of upstream's template (`{{ index .HostNetworkPorts N }}`).
pub fn host_port(n: u16) -> u16 {
    HOST_PORT_BASE + n
}

/// The centaur's serving ports: TCP 0 and 1, UDP 2 and 4 (3 and 5 are netexec's HTTP ports,
/// never probed), SCTP 6 and 7.
pub fn host_tcp() -> [u16; 2] {
    [host_port(0), host_port(1)]
}

pub fn host_udp() -> [u16; 2] {
    [host_port(2), host_port(4)]
}

pub fn host_sctp() -> [u16; 2] {
    [host_port(6), host_port(7)]
}

/// One pod of the world.
#[derive(Debug, Clone)]
pub struct PodDef {
    pub house: &'static str,
    pub name: String,
    pub index: usize,
    /// Host-network: it has its node's address and no netns of its own.
    pub host_network: bool,
    /// Index in `NODE_IPS` of the node it runs on.
    pub node: usize,
    pub ip: Ipv4Addr,
}

impl PodDef {
    pub fn namespace(&self) -> String {
        format!("{NS_PREFIX}{}", self.house)
    }

    /// Short tag for its netns and host veth (`hp0` for harry-potter-0).
    fn tag(&self) -> String {
        let initials: String = self
            .name
            .split('-')
            .filter_map(|w| w.chars().next())
            .collect();
        initials
            .trim_end_matches(|c: char| c.is_ascii_digit())
            .to_string()
            + &self.index.to_string()
    }

    pub fn host_iface(&self) -> String {
        format!("sep{}", self.tag())
    }

    /// The labels a StatefulSet gives its pods: the template's, the pod name and the pod index
    /// (controller-revision-hash too, which no policy can know and none selects: left out).
    pub fn labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("conformance-house".to_string(), self.house.to_string()),
            (
                "statefulset.kubernetes.io/pod-name".to_string(),
                self.name.clone(),
            ),
            (
                "apps.kubernetes.io/pod-index".to_string(),
                self.index.to_string(),
            ),
        ])
    }

    /// The named container ports of the manifests.
    pub fn named_ports(&self) -> Vec<NamedPort> {
        let port = |name: String, protocol, port| NamedPort {
            name: name.into(),
            protocol,
            port,
        };
        if self.host_network {
            let [t0, t1] = host_tcp();
            let [u0, u1] = host_udp();
            vec![
                port(format!("web-{t0}"), Protocol::Tcp, t0),
                port(format!("web-{t1}"), Protocol::Tcp, t1),
                port(format!("dns-{u0}"), Protocol::Udp, u0),
                port(format!("dns-{u1}"), Protocol::Udp, u1),
            ]
        } else {
            vec![
                port("web".into(), Protocol::Tcp, 80),
                port("dns".into(), Protocol::Udp, 53),
            ]
        }
    }

    /// The pod as felix's model has it, with these labels.
    pub fn model(&self, labels: BTreeMap<String, String>) -> Pod {
        Pod {
            namespace: self.namespace().into(),
            name: self.name.as_str().into(),
            labels: Arc::new(labels),
            ips: vec![IpAddr::V4(self.ip)],
            host_iface: (!self.host_network).then(|| self.host_iface()),
            ports: self.named_ports().into(),
            host_network: self.host_network,
        }
    }
}

/// Where upstream's scheduler put the centaurs (the suite probes centaur-1 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// centaur-N on node-N: centaur-1 on a node of its own, away from every client.
    Spread,
    /// centaur-1 on node-0, the clients' node (as on a one-node cluster), centaur-0 on node-1.
    OnClientsNode,
}

/// The eight house pods (10.244.0.10 up, on node-0), then centaur-0 and centaur-1.
pub fn pods(placement: Placement) -> Vec<PodDef> {
    let mut pods = Vec::new();
    for (house, set) in HOUSES {
        for index in 0..2 {
            pods.push(PodDef {
                house,
                name: format!("{set}-{index}"),
                index,
                host_network: false,
                node: 0,
                ip: Ipv4Addr::new(10, 244, 0, 10 + pods.len() as u8),
            });
        }
    }
    for index in 0..2 {
        let node = match placement {
            Placement::Spread => index,
            Placement::OnClientsNode => 1 - index,
        };
        pods.push(PodDef {
            house: FOREST,
            name: format!("centaur-{index}"),
            index,
            host_network: true,
            node,
            ip: NODE_IPS[node],
        });
    }
    pods
}

/// The five namespaces with the labels of the manifests (and the name label the API server adds).
pub fn namespaces() -> BTreeMap<String, BTreeMap<String, String>> {
    HOUSES
        .iter()
        .map(|(house, _)| *house)
        .chain([FOREST])
        .map(|house| {
            let name = format!("{NS_PREFIX}{house}");
            let labels = BTreeMap::from([
                ("conformance-house".to_string(), house.to_string()),
                (
                    sepal_felix::policy::NAMESPACE_NAME_LABEL.to_string(),
                    name.clone(),
                ),
            ]);
            (name, labels)
        })
        .collect()
}

/// node-0 and node-1 with the labels a kubelet gives a Linux node.
pub fn nodes() -> Vec<Arc<Node>> {
    NODE_IPS
        .iter()
        .enumerate()
        .map(|(i, ip)| {
            let name = format!("node-{i}");
            Arc::new(Node {
                labels: BTreeMap::from([
                    ("kubernetes.io/os".to_string(), "linux".to_string()),
                    (
                        "kubernetes.io/arch".to_string(),
                        std::env::consts::ARCH.to_string(),
                    ),
                    ("kubernetes.io/hostname".to_string(), name.clone()),
                ]),
                name,
                ips: vec![IpAddr::V4(*ip)],
            })
        })
        .collect()
}

/// The world's netns, with servers on every port the suite probes.
pub struct Lab {
    // Dropped first (declaration order): servers stop before their namespaces go.
    pub servers: Servers,
    /// By pod name; a centaur's is its node's netns.
    pub netns: BTreeMap<String, String>,
    _pods: Vec<Netns>,
    pub node: PodNode,
}

impl Lab {
    pub fn new(pods: &[PodDef]) -> Lab {
        let node = PodNode::new("cnode0", "cnode1", NODE_IPS[0]);
        // node-1: the uplink's end, routing the pod network back through node-0.
        node.uplink.run(&format!(
            "ip addr add {}/24 dev eth0 && ip route add {POD_CIDR} via {}",
            NODE_IPS[1], NODE_IPS[0]
        ));
        let node_netns = [node.node.name().to_string(), node.uplink.name().to_string()];
        let mut servers = Servers::new();
        let mut netns = BTreeMap::new();
        let mut owned = Vec::new();
        for p in pods {
            if p.host_network {
                netns.insert(p.name.clone(), node_netns[p.node].clone());
                continue;
            }
            let ns = node.attach_pod(&p.tag(), &p.host_iface(), p.ip);
            servers.start(ns.name(), &POD_TCP, &POD_UDP);
            netns.insert(p.name.clone(), ns.name().to_string());
            owned.push(ns);
        }
        for n in &node_netns {
            servers.start(n, &host_tcp(), &host_udp());
        }
        Lab {
            servers,
            netns,
            _pods: owned,
            node,
        }
    }
}
