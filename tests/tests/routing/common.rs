// Shared topology for the routing end-to-end tests: nodes running the real `sepal node` on an
// underlay (one L2 segment, or links to top-of-rack routers), pods attached through `sepal-cni`.
#![allow(dead_code)]

use sepal_tests::netns::{veth, Netns};
use sepal_tests::node::{CniCall, Node};
use serde_json::Value;
use std::time::{Duration, Instant};

/// BGPConfiguration with fast timers so sessions come up and fail over in seconds.
pub fn bgp_configuration(mesh: bool, extra: &str) -> String {
    format!(
        "apiVersion: sepal.dev/v1alpha1\nkind: BGPConfiguration\nmetadata:\n  name: default\nspec:\n  \
         nodeToNodeMesh: {mesh}\n  keepaliveTime: 1s\n  holdTime: 3s\n{extra}"
    )
}

pub struct Cluster {
    pub fabric: Netns,
    pub nodes: Vec<Node>,
}

/// One attached pod.
pub struct Pod {
    pub netns: Netns,
    pub ip: String,
}

impl Cluster {
    /// `n` nodes named n0.. with blocks 10.244.<i>.0/24 and underlay addresses
    /// 192.168.100.<i+1>/24 on one bridged segment in `fabric`. Every node's datastore holds
    /// every Node object plus `objects`.
    pub fn segment(n: usize, objects: &str) -> Cluster {
        sepal_tests::require_root();
        let fabric = Netns::new("fab");
        fabric.run("ip link add br0 type bridge && ip link set br0 up");
        let mut nodes = Vec::new();
        for i in 0..n {
            let node = Node::new(&format!("n{i}"), &[&format!("10.244.{i}.0/24")]);
            veth(&node.netns, "ul", &fabric, &format!("p{i}"));
            fabric.run(&format!(
                "ip link set p{i} master br0 && ip link set p{i} up"
            ));
            node.netns.run(&format!(
                "ip addr add 192.168.100.{}/24 dev ul && ip link set ul up",
                i + 1
            ));
            nodes.push(node);
        }
        let c = Cluster { fabric, nodes };
        for i in 0..n {
            c.write_all(
                &format!("node-n{i}.yaml"),
                &node_yaml(i, &format!("192.168.100.{}", i + 1), ""),
            );
        }
        c.write_all("routing.yaml", objects);
        c
    }

    /// Writes one object file into every node's datastore.
    pub fn write_all(&self, file: &str, yaml: &str) {
        for n in &self.nodes {
            std::fs::write(n.datastore.join(file), yaml).expect("write object");
        }
    }

    pub fn start(&mut self) {
        for n in &mut self.nodes {
            n.start_agent();
        }
    }

    pub fn pod(&self, node: usize, name: &str) -> Pod {
        let netns = Netns::new(name);
        let call = CniCall::pod(&format!("ctr-{name}"), &netns.path(), "default", name);
        let out = self.nodes[node].cni("ADD", &call);
        assert!(
            out.status.success(),
            "ADD {name}: {} {}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let result: Value = serde_json::from_slice(&out.stdout).expect("CNI result");
        let ip = result["ips"][0]["address"]
            .as_str()
            .expect("pod address")
            .split('/')
            .next()
            .expect("addr")
            .to_string();
        Pod { netns, ip }
    }

    /// Node `i`'s protocol-83 route to `prefix` (empty when there is none).
    pub fn route(&self, i: usize, prefix: &str) -> String {
        self.nodes[i]
            .netns
            .run(&format!("ip route show proto 83 {prefix}"))
            .trim()
            .to_string()
    }

    /// Waits until node `i` has a route to `prefix` matching `pred`, with the agents' logs on timeout.
    pub fn wait_route(
        &self,
        i: usize,
        prefix: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.route(i, prefix);
            if pred(&r) {
                return r;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = self
                    .nodes
                    .iter()
                    .map(|n| format!("--- {}:\n{}", n.name, n.agent_log()))
                    .collect();
                panic!(
                    "node {i}: route to {prefix} is {r:?} after {timeout:?}\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

pub fn node_yaml(i: usize, address: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: n{i}\n  labels: {{rack: r1}}\n  annotations: {{{annotations}}}\n\
         spec:\n  podCIDR: 10.244.{i}.0/24\n  podCIDRs: [10.244.{i}.0/24]\n\
         status:\n  addresses: [{{type: InternalIP, address: \"{address}\"}}]\n"
    )
}

pub fn pings(from: &Netns, to: &str) -> bool {
    from.try_run(&format!("ping -c1 -W2 {to}")).is_ok()
}

/// The BGP daemon a top-of-rack router runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TorKind {
    Bird,
    Frr,
    Gobgp,
}

pub const TOR_AS: u32 = 65000;
pub const MD5: &str = "s3cret-md5";

/// A running ToR daemon (stopped on drop).
pub enum TorDaemon {
    Bird(sepal_tests::bgpd::Bird),
    Frr(sepal_tests::bgpd::Frr),
    Gobgp(sepal_tests::bgpd::Gobgp),
}

impl TorDaemon {
    /// The IPv4 prefixes the ToR has learned from BGP (its own static default left out).
    pub fn learned(&self) -> Vec<String> {
        let mut out: Vec<String> = match self {
            TorDaemon::Bird(b) => b
                .birdc("show route")
                .lines()
                .filter(|l| l.contains("BGP") || l.contains("[n"))
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .filter(|p| p.contains('/') && p != "0.0.0.0/0")
                .collect(),
            TorDaemon::Frr(f) => f
                .routes("ipv4")
                .as_object()
                .map(|o| {
                    o.keys()
                        .filter(|k| k.as_str() != "0.0.0.0/0")
                        .cloned()
                        .collect()
                })
                .unwrap_or_default(),
            TorDaemon::Gobgp(g) => g
                .rib("ipv4")
                .as_object()
                .map(|o| {
                    o.keys()
                        .filter(|k| k.as_str() != "0.0.0.0/0")
                        .cloned()
                        .collect()
                })
                .unwrap_or_default(),
        };
        out.sort();
        out.dedup();
        out
    }

    pub fn log(&self) -> String {
        match self {
            TorDaemon::Bird(b) => b.log(),
            TorDaemon::Frr(f) => f.log(),
            TorDaemon::Gobgp(_) => String::new(),
        }
    }
}

/// `n` nodes (AS 64601+i, blocks 10.244.<i>.0/24), each on its own link 10.0.<i>.0/24 to one
/// ToR running `kind`, peering with it over eBGP with TCP MD5 through BGPPeers; the mesh is off,
/// and the ToR also announces a default route (which the nodes must refuse).
pub fn tor_cluster(n: usize, kind: TorKind) -> (Cluster, Netns, TorDaemon) {
    sepal_tests::require_root();
    let tor = Netns::new("tor");
    tor.run("sysctl -qw net.ipv4.ip_forward=1");
    let mut nodes = Vec::new();
    for i in 0..n {
        let node = Node::new(&format!("n{i}"), &[&format!("10.244.{i}.0/24")]);
        veth(&node.netns, "ul", &tor, &format!("n{i}"));
        tor.run(&format!(
            "ip addr add 10.0.{i}.1/24 dev n{i} && ip link set n{i} up"
        ));
        node.netns.run(&format!(
            "ip addr add 10.0.{i}.2/24 dev ul && ip link set ul up && ip route replace default via 10.0.{i}.1 dev ul"
        ));
        nodes.push(node);
    }
    let c = Cluster {
        fabric: Netns::new("unused"),
        nodes,
    };
    let mut objects = bgp_configuration(false, "");
    objects.push_str(&format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: tor-md5\n  namespace: sepal-system\nstringData:\n  password: {MD5}\n"
    ));
    for i in 0..n {
        c.write_all(
            &format!("node-n{i}.yaml"),
            &node_yaml(
                i,
                &format!("10.0.{i}.2"),
                &format!("sepal.dev/as-number: \"{}\"", 64601 + i),
            ),
        );
        objects.push_str(&format!(
            "---\napiVersion: sepal.dev/v1alpha1\nkind: BGPPeer\nmetadata:\n  name: tor-n{i}\nspec:\n  \
             peerIP: 10.0.{i}.1\n  asNumber: {TOR_AS}\n  node: n{i}\n  keepaliveTime: 1s\n  holdTime: 3s\n  \
             password: {{secretKeyRef: {{name: tor-md5, key: password}}}}\n"
        ));
    }
    c.write_all("routing.yaml", &objects);
    let daemon = match kind {
        TorKind::Bird => {
            let mut conf = format!(
                "router id 10.0.0.1;\nprotocol device {{ }}\n\
                 protocol kernel {{ merge paths on; ipv4 {{ import none; export where source = RTS_BGP; }}; }}\n\
                 protocol static {{ ipv4; route 0.0.0.0/0 blackhole; }}\n\
                 template bgp nodes {{ local as {TOR_AS}; hold time 3; keepalive time 1; connect retry time 1; \
                 connect delay time 1; error wait time 1, 5; graceful restart on; password \"{MD5}\"; \
                 ipv4 {{ import all; export all; }}; }}\n"
            );
            for i in 0..n {
                conf.push_str(&format!(
                    "protocol bgp n{i} from nodes {{ local 10.0.{i}.1 as {TOR_AS}; neighbor 10.0.{i}.2 as {}; }}\n",
                    64601 + i
                ));
            }
            TorDaemon::Bird(sepal_tests::bgpd::Bird::start(&tor, &conf))
        }
        TorKind::Frr => {
            let mut conf = format!(
                "frr defaults datacenter\nip route 0.0.0.0/0 blackhole\nrouter bgp {TOR_AS}\n bgp router-id 10.0.0.1\n \
                 no bgp ebgp-requires-policy\n no bgp network import-check\n bgp graceful-restart\n"
            );
            for i in 0..n {
                conf.push_str(&format!(
                    " neighbor 10.0.{i}.2 remote-as {}\n neighbor 10.0.{i}.2 timers 1 3\n neighbor 10.0.{i}.2 timers connect 1\n \
                     neighbor 10.0.{i}.2 password {MD5}\n",
                    64601 + i
                ));
            }
            conf.push_str(" address-family ipv4 unicast\n  network 0.0.0.0/0\n  maximum-paths 8\n exit-address-family\n");
            TorDaemon::Frr(sepal_tests::bgpd::Frr::start(&tor, "0.0.0.0", &conf))
        }
        TorKind::Gobgp => {
            let mut conf = format!(
                "[global.config]\n  as = {TOR_AS}\n  router-id = \"10.0.0.1\"\n  port = 179\n"
            );
            for i in 0..n {
                conf.push_str(&format!(
                    "\n[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"10.0.{i}.2\"\n    peer-as = {}\n    \
                     auth-password = \"{MD5}\"\n  [neighbors.timers.config]\n    connect-retry = 1\n    hold-time = 3\n    \
                     keepalive-interval = 1\n",
                    64601 + i
                ));
            }
            let g = sepal_tests::bgpd::Gobgp::start(&tor, &conf);
            g.cli(&["global", "rib", "add", "0.0.0.0/0", "-a", "ipv4"]);
            TorDaemon::Gobgp(g)
        }
    };
    (c, tor, daemon)
}
