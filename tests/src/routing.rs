//! Shared topology for the routing end-to-end tests and the failover bench: nodes running the
//! real `sepal node` on an underlay (one L2 segment, or links to top-of-rack routers), pods
//! attached through `sepal-cni`.

/// The ToR configurations of the peering guide (the agent's lab uses the same file).
#[path = "../../agent/src/lab/peering.rs"]
pub mod peering;

use crate::netns::{veth, Netns};
use crate::node::{CniCall, Node};
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
    /// The pod's IPv6 address on a dual-stack node.
    pub ip6: Option<String>,
}

impl Cluster {
    /// `n` nodes named n0.. with blocks 10.244.<i>.0/24 and underlay addresses
    /// 192.168.100.<i+1>/24 on one bridged segment in `fabric`. Every node's datastore holds
    /// every Node object plus `objects`.
    pub fn segment(n: usize, objects: &str) -> Cluster {
        Cluster::on_segment(n, false, objects)
    }

    /// As [`Cluster::segment`], dual-stack: IPv6 blocks fd10:244:<i>::/64 next to the IPv4 ones
    /// and underlay addresses fd00:100::<i+1>/64 as second InternalIPs. One IPv4 session per
    /// pair of nodes carries both families.
    pub fn dual_stack_segment(n: usize, objects: &str) -> Cluster {
        Cluster::on_segment(n, true, objects)
    }

    fn on_segment(n: usize, dual_stack: bool, objects: &str) -> Cluster {
        crate::require_root();
        let fabric = Netns::new("fab");
        fabric.run("ip link add br0 type bridge && ip link set br0 up");
        let mut nodes = Vec::new();
        for i in 0..n {
            let node = Node::new(&format!("n{i}"), &[&format!("10.244.{i}.0/24")]);
            settled_link_local(&node.netns);
            veth(&node.netns, "ul", &fabric, &format!("p{i}"));
            fabric.run(&format!(
                "ip link set p{i} master br0 && ip link set p{i} up"
            ));
            node.netns.run(&format!(
                "ip addr add 192.168.100.{}/24 dev ul && ip link set ul up",
                i + 1
            ));
            if dual_stack {
                node.netns
                    .run(&format!("ip addr add fd00:100::{}/64 dev ul nodad", i + 1));
            }
            nodes.push(node);
        }
        let c = Cluster { fabric, nodes };
        for i in 0..n {
            let yaml = if dual_stack {
                dual_stack_node_yaml(
                    i,
                    &format!("192.168.100.{}", i + 1),
                    &format!("fd00:100::{}", i + 1),
                    "",
                )
            } else {
                node_yaml(i, &format!("192.168.100.{}", i + 1), "")
            };
            c.write_all(&format!("node-n{i}.yaml"), &yaml);
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
        let ips: Vec<String> = result["ips"]
            .as_array()
            .expect("CNI result ips")
            .iter()
            .filter_map(|i| i["address"].as_str())
            .filter_map(|a| a.split('/').next())
            .map(str::to_string)
            .collect();
        Pod {
            netns,
            ip: ips[0].clone(),
            ip6: ips.iter().find(|a| a.contains(':')).cloned(),
        }
    }

    /// Kills node `i`'s agent (SIGKILL) and starts it again under a continuous ping (20 a second
    /// for 8 s) from `from` to `to`; returns ping's summary.
    pub fn restart_agent_under_ping(&mut self, i: usize, from: &Netns, to: &str) -> String {
        self.restart_agent_under_ping_every(i, from, to, "0.05", 160)
    }

    /// [`Cluster::restart_agent_under_ping`] with `count` pings `interval` seconds apart: the
    /// agent is killed 1 s in and started 1.5 s later.
    pub fn restart_agent_under_ping_every(
        &mut self,
        i: usize,
        from: &Netns,
        to: &str,
        interval: &str,
        count: u32,
    ) -> String {
        let ping = from
            .command(&[
                "ping",
                "-q",
                "-i",
                interval,
                "-c",
                &count.to_string(),
                "-W",
                "1",
                to,
            ])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("ping");
        std::thread::sleep(Duration::from_millis(1000));
        self.nodes[i].kill_agent();
        std::thread::sleep(Duration::from_millis(1500));
        self.nodes[i].start_agent();
        let out = ping.wait_with_output().expect("ping output");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Node `i`'s protocol-83 route to `prefix` (empty when there is none).
    pub fn route(&self, i: usize, prefix: &str) -> String {
        let family = if prefix.contains(':') { "-6" } else { "-4" };
        self.nodes[i]
            .netns
            .run(&format!("ip {family} route show proto 83 {prefix}"))
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

/// A Node object named `name` with one InternalIP and one pod block, for a datastore.
pub fn node_yaml_named(name: &str, address: &str, block: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: {name}\nspec:\n  podCIDR: {block}\n  podCIDRs: [{block}]\n\
         status:\n  addresses:\n  - {{type: InternalIP, address: {address}}}\n"
    )
}

pub fn node_yaml(i: usize, address: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: n{i}\n  labels: {{rack: r1}}\n  annotations: {{{annotations}}}\n\
         spec:\n  podCIDR: 10.244.{i}.0/24\n  podCIDRs: [10.244.{i}.0/24]\n\
         status:\n  addresses: [{{type: InternalIP, address: \"{address}\"}}]\n"
    )
}

/// Links created in `ns` from now on skip duplicate address detection, as an underlay that has
/// been up for more than a second has: while a link's link-local address is tentative (DAD, 1 s
/// after the link comes up) the kernel sends no IPv6 neighbour solicitation on it, so the first
/// IPv6 packet across a brand-new underlay would wait a full retransmit (1 s) per hop.
pub fn settled_link_local(ns: &Netns) {
    ns.run("sysctl -qw net.ipv6.conf.default.accept_dad=0");
}

/// Cuts a node off the network without touching its links or processes: every packet in or out
/// of its namespace is dropped, so its peers hear nothing and must notice by their hold timer.
pub fn cut_off(ns: &Netns) {
    ns.run(
        "nft add table inet cut && \
         nft add chain inet cut in '{ type filter hook input priority -500; policy drop; }' && \
         nft add chain inet cut out '{ type filter hook output priority -500; policy drop; }'",
    );
}

/// Cuts node 0 off (see [`cut_off`]) and watches, in one loop, its block 10.244.0.0/24 leave
/// the ToR's kernel and node 1's: how long each took, `None` for one still there after `limit`.
pub fn silence_node0(
    c: &Cluster,
    tor: &Netns,
    limit: Duration,
) -> (Option<Duration>, Option<Duration>) {
    cut_off(&c.nodes[0].netns);
    let cut = Instant::now();
    let (mut tor_gone, mut n1_gone) = (None, None);
    while (tor_gone.is_none() || n1_gone.is_none()) && cut.elapsed() < limit {
        if tor_gone.is_none() && tor.run("ip route show 10.244.0.0/24").trim().is_empty() {
            tor_gone = Some(cut.elapsed());
        }
        if n1_gone.is_none() && c.route(1, "10.244.0.0/24").is_empty() {
            n1_gone = Some(cut.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    (tor_gone, n1_gone)
}

/// What tcpdump on `iface` in `ns` sees of ICMP from pod `from` to `to` while `from` pings it
/// (one line per packet, the first one only).
pub fn underlay_sees(ns: &Netns, iface: &str, from: &Pod, to: &str) -> String {
    let filter = format!("icmp and src host {} and dst host {to}", from.ip);
    let dump = ns
        .command(&[
            "timeout", "10", "tcpdump", "-l", "-n", "-c", "1", "-i", iface, &filter,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("tcpdump");
    std::thread::sleep(Duration::from_millis(1000));
    let _ = from.netns.try_run(&format!("ping -c3 -i0.2 -W1 {to}"));
    let out = dump.wait_with_output().expect("tcpdump output");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Waits until `f` holds, polling every 50 ms; returns how long it took, or None after `timeout`.
pub fn within(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Some(start.elapsed());
        }
        if start.elapsed() > timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Hold time of every session in these tests (BGPConfiguration, BGPPeers, ToR configs).
pub const HOLD: Duration = Duration::from_secs(3);

pub fn dual_stack_node_yaml(i: usize, v4: &str, v6: &str, annotations: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: n{i}\n  labels: {{rack: r1}}\n  annotations: {{{annotations}}}\n\
         spec:\n  podCIDR: 10.244.{i}.0/24\n  podCIDRs: [10.244.{i}.0/24, \"fd10:244:{i}::/64\"]\n\
         status:\n  addresses: [{{type: InternalIP, address: \"{v4}\"}}, {{type: InternalIP, address: \"{v6}\"}}]\n"
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
    Bird(crate::bgpd::Bird),
    Frr(crate::bgpd::Frr),
    /// gobgpd and the loop that copies its best paths into the ToR's kernel.
    Gobgp(crate::bgpd::Gobgp, KillOnDrop),
}

/// A helper process of the test, killed when dropped.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        crate::netns::kill(&mut self.0);
    }
}

impl TorDaemon {
    /// The IPv4 and IPv6 prefixes the ToR has learned from BGP (its own static default left out).
    pub fn learned(&self) -> Vec<String> {
        let keys = |v: Value| -> Vec<String> {
            v.as_object()
                .map(|o| {
                    o.keys()
                        .filter(|k| k.as_str() != "0.0.0.0/0")
                        .cloned()
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut out: Vec<String> = match self {
            TorDaemon::Bird(b) => b
                .birdc("show route")
                .lines()
                .filter(|l| l.contains("BGP") || l.contains("[n"))
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .filter(|p| p.contains('/') && p != "0.0.0.0/0")
                .collect(),
            TorDaemon::Frr(f) => [keys(f.routes("ipv4")), keys(f.routes("ipv6"))].concat(),
            TorDaemon::Gobgp(g, _) => [keys(g.rib("ipv4")), keys(g.rib("ipv6"))].concat(),
        };
        out.sort();
        out.dedup();
        out
    }

    /// Whether the ToR's session with node `i` (at 10.0.<i>.2) is established.
    pub fn established(&self, i: usize) -> bool {
        let addr = format!("10.0.{i}.2");
        match self {
            TorDaemon::Bird(b) => b.established(&format!("n{i}")),
            TorDaemon::Frr(f) => f.neighbor_state(&addr) == "Established",
            TorDaemon::Gobgp(g, _) => g.neighbor_state(&addr) == "established",
        }
    }

    /// How many of the ToR's BFD sessions are Up.
    pub fn bfd_sessions_up(&self) -> usize {
        match self {
            TorDaemon::Bird(b) => b
                .birdc("show bfd sessions")
                .lines()
                .filter(|l| l.split_whitespace().nth(2) == Some("Up"))
                .count(),
            TorDaemon::Frr(f) => {
                let peers: Value =
                    serde_json::from_str(&f.vtysh_daemon("bfdd", "show bfd peers json"))
                        .unwrap_or_default();
                peers
                    .as_array()
                    .map_or(0, |v| v.iter().filter(|p| p["status"] == "up").count())
            }
            TorDaemon::Gobgp(..) => 0,
        }
    }

    /// Kills the ToR's routing daemon(s) with SIGKILL, as a crash: the routes they installed
    /// stay in the ToR's kernel. Not for GoBGP.
    pub fn kill9(&mut self) {
        match self {
            TorDaemon::Bird(b) => b.kill9(),
            TorDaemon::Frr(f) => f.kill9(),
            TorDaemon::Gobgp(..) => unimplemented!("GoBGP ToR restart"),
        }
    }

    /// Starts the ToR's routing daemon(s) again with the same configuration. Not for GoBGP.
    pub fn restart(&mut self) {
        match self {
            TorDaemon::Bird(b) => b.restart(),
            TorDaemon::Frr(f) => f.restart(),
            TorDaemon::Gobgp(..) => unimplemented!("GoBGP ToR restart"),
        }
    }

    /// The daemon's log and its view of sessions and routes, for failure messages.
    pub fn log(&self) -> String {
        match self {
            TorDaemon::Bird(b) => format!(
                "{}\n{}\n{}",
                b.log(),
                b.birdc("show protocols"),
                b.birdc("show route all")
            ),
            TorDaemon::Frr(f) => format!(
                "{}\n{}\n{}",
                f.log(),
                f.vtysh("show bgp ipv4 unicast"),
                f.vtysh("show bgp ipv6 unicast")
            ),
            TorDaemon::Gobgp(g, _) => [
                g.log(),
                g.cli(&["neighbor"]),
                g.cli(&["global", "rib", "-a", "ipv4"]),
                g.cli(&["global", "rib", "-a", "ipv6"]),
            ]
            .join("\n"),
        }
    }
}

/// The cluster's routing objects for [`tor_cluster`]: the BGPConfiguration (mesh off, fast
/// timers, `extra`), the MD5 Secret and one BGPPeer per node naming the ToR on its link.
pub fn tor_objects(n: usize, extra: &str) -> String {
    tor_objects_with(n, extra, "")
}

/// [`tor_objects`] with `peer_extra` in every BGPPeer's spec.
pub fn tor_objects_with(n: usize, extra: &str, peer_extra: &str) -> String {
    let mut objects = bgp_configuration(false, extra);
    objects.push_str(&format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: tor-md5\n  namespace: sepal-system\nstringData:\n  password: {MD5}\n"
    ));
    for i in 0..n {
        objects.push_str(&format!(
            "---\napiVersion: sepal.dev/v1alpha1\nkind: BGPPeer\nmetadata:\n  name: tor-n{i}\nspec:\n  \
             peerIP: 10.0.{i}.1\n  asNumber: {TOR_AS}\n  node: n{i}\n  keepaliveTime: 1s\n  holdTime: 3s\n  \
             password: {{secretKeyRef: {{name: tor-md5, key: password}}}}\n{peer_extra}"
        ));
    }
    objects
}

/// `n` dual-stack nodes (AS 64601+i, blocks 10.244.<i>.0/24 and fd10:244:<i>::/64), each on its
/// own link 10.0.<i>.0/24 + fd00:10:<i>::/64 to one ToR running `kind`, peering with it over one
/// eBGP session (IPv4, both families) with TCP MD5 through BGPPeers; the mesh is off, and the ToR
/// also announces a default route (which the nodes must refuse). `extra` goes into the
/// BGPConfiguration.
pub fn tor_cluster(n: usize, kind: TorKind, extra: &str) -> (Cluster, Netns, TorDaemon) {
    tor_cluster_with(n, kind, extra, false)
}

/// [`tor_cluster`], with `bfd`: BFD (default timers: 300 ms, 3) on every BGPPeer and on the
/// ToR: FRR's bfdd with `neighbor ... bfd` for each node, or BIRD's `bfd` protocol with
/// `bfd on` in the sessions (not GoBGP, which has no BFD).
pub fn tor_cluster_with(
    n: usize,
    kind: TorKind,
    extra: &str,
    bfd: bool,
) -> (Cluster, Netns, TorDaemon) {
    crate::require_root();
    assert!(!bfd || kind != TorKind::Gobgp, "GoBGP has no BFD");
    let tor = Netns::new("tor");
    tor.run("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1");
    settled_link_local(&tor);
    let mut nodes = Vec::new();
    for i in 0..n {
        let node = Node::new(
            &format!("n{i}"),
            &[&format!("10.244.{i}.0/24"), &format!("fd10:244:{i}::/64")],
        );
        settled_link_local(&node.netns);
        veth(&node.netns, "ul", &tor, &format!("n{i}"));
        tor.run(&format!(
            "ip addr add 10.0.{i}.1/24 dev n{i} && ip addr add fd00:10:{i}::1/64 dev n{i} nodad && ip link set n{i} up"
        ));
        node.netns.run(&format!(
            "ip addr add 10.0.{i}.2/24 dev ul && ip addr add fd00:10:{i}::2/64 dev ul nodad && ip link set ul up && \
             ip route replace default via 10.0.{i}.1 dev ul"
        ));
        nodes.push(node);
    }
    let c = Cluster {
        fabric: Netns::new("unused"),
        nodes,
    };
    for i in 0..n {
        c.write_all(
            &format!("node-n{i}.yaml"),
            &dual_stack_node_yaml(
                i,
                &format!("10.0.{i}.2"),
                &format!("fd00:10:{i}::2"),
                &format!("sepal.dev/as-number: \"{}\"", 64601 + i),
            ),
        );
    }
    let peer_extra = if bfd { "  bfd: {enabled: true}\n" } else { "" };
    let objects = tor_objects_with(n, extra, peer_extra);
    c.write_all("routing.yaml", &objects);
    // The ToR runs the configuration of the peering guide (docs/peering/), filled in here.
    let global = peering::values([
        ("ROUTER_ID", Some("10.0.0.1".into())),
        ("TOR_AS", Some(TOR_AS.to_string())),
        ("HOLD", Some(HOLD.as_secs().to_string())),
        ("KEEPALIVE", Some("1".into())),
        ("PASSWORD", Some(MD5.into())),
        ("DEFAULT_ROUTE", Some("0.0.0.0/0".into())),
        ("POD_RANGE", Some("10.244.0.0/16".into())),
        ("POD_RANGE_LEN", Some("16".into())),
        ("POD_RANGE6", Some("fd10:244::/32".into())),
        ("POD_RANGE6_LEN", Some("32".into())),
        ("SERVICE_RANGE", Some("10.96.0.0/12".into())),
        ("SERVICE_RANGE_LEN", Some("12".into())),
    ]);
    let per_node: Vec<peering::Values> = (0..n)
        .map(|i| {
            peering::values([
                ("NAME", Some(format!("n{i}"))),
                ("TOR_ADDR", Some(format!("10.0.{i}.1"))),
                ("NODE_ADDR", Some(format!("10.0.{i}.2"))),
                ("NODE_AS", Some((64601 + i).to_string())),
                ("TOR_ADDR6", Some(format!("fd00:10:{i}::1"))),
            ])
        })
        .collect();
    let conf = |template| peering::render(template, &global, &per_node).expect("peering template");
    let daemon = match kind {
        TorKind::Bird if bfd => {
            // The guide's configuration, then a `bfd` protocol and `bfd on` in every session.
            let text = conf(peering::BIRD)
                .replace(
                    "protocol device { }\n",
                    "protocol device { }\nprotocol bfd { interface \"n*\" { min rx interval 300 ms; \
                     min tx interval 300 ms; multiplier 3; }; }\n",
                )
                .replace("  graceful restart on;\n", "  graceful restart on;\n  bfd on;\n");
            TorDaemon::Bird(crate::bgpd::Bird::start(&tor, &text))
        }
        TorKind::Bird => TorDaemon::Bird(crate::bgpd::Bird::start(&tor, &conf(peering::BIRD))),
        TorKind::Frr if bfd => {
            // The guide's configuration, then BFD on each node's session (bfdd's defaults).
            let mut text = conf(peering::FRR);
            text.push_str(&format!("router bgp {TOR_AS}\n"));
            for i in 0..n {
                text.push_str(&format!(" neighbor 10.0.{i}.2 bfd\n"));
            }
            TorDaemon::Frr(crate::bgpd::Frr::start_with_bfd(&tor, "0.0.0.0", &text))
        }
        TorKind::Frr => TorDaemon::Frr(crate::bgpd::Frr::start_with_zebra(
            &tor,
            "0.0.0.0",
            &conf(peering::FRR),
        )),
        TorKind::Gobgp => {
            let g = crate::bgpd::Gobgp::start(&tor, &conf(peering::GOBGP));
            g.cli(&["global", "rib", "add", "0.0.0.0/0", "-a", "ipv4"]);
            let fib = tor
                .command(&["sh", "-c", peering::GOBGP_FIB])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("start the GoBGP kernel sync");
            TorDaemon::Gobgp(g, KillOnDrop(fib))
        }
    };
    (c, tor, daemon)
}

/// An IPv6 address written the way the kernel and the daemons print it.
pub fn v6(addr: &str) -> String {
    addr.parse::<std::net::Ipv6Addr>()
        .expect("IPv6 address")
        .to_string()
}

/// Node `i`'s pod blocks (IPv4, IPv6) as the kernel and the daemons print them.
pub fn blocks(i: usize) -> Vec<String> {
    vec![
        format!("10.244.{i}.0/24"),
        v6(&format!("fd10:244:{i}::")) + "/64",
    ]
}

/// Node `i` routes node `j`'s blocks via the ToR (over IPv4 and IPv6).
pub fn routes_via_tor(c: &Cluster, i: usize, j: usize) -> bool {
    let [b4, b6] = [&blocks(j)[0], &blocks(j)[1]];
    c.route(i, b4).contains(&format!("via 10.0.{i}.1"))
        && c.route(i, b6)
            .contains(&format!("via {}", v6(&format!("fd00:10:{i}::1"))))
}

/// Each pod reaches the other over IPv4 and IPv6.
pub fn assert_reach(a: &Pod, b: &Pod, what: &str) {
    for (from, to) in [(a, b), (b, a)] {
        let to6 = to.ip6.clone().expect("dual-stack pod");
        assert!(
            pings(&from.netns, &to.ip),
            "{what}: {} -> {}",
            from.ip,
            to.ip
        );
        assert!(pings(&from.netns, &to6), "{what}: {} -> {to6}", from.ip);
    }
}
