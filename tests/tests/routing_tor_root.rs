//! Routing end to end through a top-of-rack router that runs BIRD 2, FRR or GoBGP: 3 dual-stack
//! nodes with their own AS peer with it over eBGP with TCP MD5 (the mesh off), one IPv4 session
//! each carrying both families; the ToR learns exactly the node blocks, pods reach each other
//! through it over IPv4 and IPv6 (unencapsulated), its default route is refused, a node that drops off the network
//! without graceful restart is withdrawn within the hold time, and an agent killed and restarted
//! costs no packet (GoBGP: on a cluster of its own, see tor_gobgp_agent_restart).

use sepal_tests::routing as common;

use common::{
    assert_reach, cut_off, pings, routes_via_tor, tor_cluster, v6, within, TorDaemon, TorKind, HOLD,
};
use std::time::{Duration, Instant};

fn scenario(kind: TorKind) {
    // GoBGP as a graceful-restart helper treats an expired hold timer like a restart and keeps
    // the node's routes (as stale) for its restart time (seen with GoBGP 3.10); BIRD and FRR
    // withdraw them. With GoBGP the cluster starts without graceful restart (gracefulRestartTime
    // 0s: the agents do not offer it), so the node cut off below is one without GR.
    let no_gr = "  gracefulRestartTime: 0s\n";
    let (mut c, tor, daemon) =
        tor_cluster(3, kind, if kind == TorKind::Gobgp { no_gr } else { "" });
    c.start();
    let p0 = c.pod(0, "p0");
    let p2 = c.pod(2, "p2");

    // The ToR learns exactly the node blocks (no pod /32s, nothing else), of both families, and
    // its own kernel has them via the node, put there by its routing stack (BIRD's kernel
    // protocol, FRR's zebra, the GoBGP sync loop), not by the test.
    let blocks: Vec<(String, String)> = (0..3)
        .flat_map(|i| {
            [
                (format!("10.244.{i}.0/24"), format!("10.0.{i}.2")),
                // Written as the daemons and the kernel print them (fd10:244:0:: is fd10:244::).
                (
                    v6(&format!("fd10:244:{i}::")) + "/64",
                    v6(&format!("fd00:10:{i}::2")),
                ),
            ]
        })
        .collect();
    let mut want: Vec<String> = blocks.iter().map(|(p, _)| p.clone()).collect();
    want.sort();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = daemon.learned();
        if got == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{kind:?} learned {got:?}\n{}\n{}",
            daemon.log(),
            c.nodes[0].agent_log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for (prefix, node) in &blocks {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let family = if prefix.contains(':') { "-6" } else { "-4" };
            let r = tor.run(&format!("ip {family} route show {prefix}"));
            if r.contains(&format!("via {node}")) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{kind:?}: ToR kernel route to {prefix}: {r:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Nodes install the other blocks via the ToR (proto 83, onlink on the uplink).
    let r = c.wait_route(0, "10.244.2.0/24", Duration::from_secs(20), |r| {
        r.contains("via 10.0.0.1")
    });
    assert!(r.contains("dev ul"), "{r}");
    c.wait_route(2, "10.244.0.0/24", Duration::from_secs(20), |r| {
        r.contains("via 10.0.2.1")
    });
    assert!(
        pings(&p0.netns, &p2.ip),
        "pod n0 -> pod n2 through {kind:?}"
    );
    assert!(
        pings(&p2.netns, &p0.ip),
        "pod n2 -> pod n0 through {kind:?}"
    );
    assert!(pings(&c.nodes[1].netns, &p0.ip), "node n1 -> pod n0");
    // No encapsulation: on the ToR's link to n2 the packets carry the pods' own addresses.
    let seen = common::underlay_sees(&tor, "n2", &p0, &p2.ip);
    assert!(
        seen.contains(&format!("{} > {}: ICMP echo request", p0.ip, p2.ip)),
        "the ToR's link to n2 saw: {seen:?}"
    );
    // IPv6 over the same sessions: each node's IPv6 block with the ToR's IPv6 address on the
    // node's link as next hop (not an IPv4-mapped one), and pods reach each other.
    let r = c.wait_route(0, "fd10:244:2::/64", Duration::from_secs(20), |r| {
        !r.is_empty()
    });
    assert!(r.contains("via fd00:10::1") && r.contains("dev ul"), "{r}");
    c.wait_route(2, "fd10:244::/64", Duration::from_secs(20), |r| {
        r.contains("via fd00:10:2::1")
    });
    let (v6_0, v6_2) = (
        p0.ip6.clone().expect("p0 IPv6"),
        p2.ip6.clone().expect("p2 IPv6"),
    );
    assert!(
        pings(&p0.netns, &v6_2),
        "pod n0 -> pod n2 over IPv6 through {kind:?}"
    );
    assert!(
        pings(&p2.netns, &v6_0),
        "pod n2 -> pod n0 over IPv6 through {kind:?}"
    );
    // The ToR's default route is refused by default: no protocol-83 default anywhere.
    for i in 0..3 {
        assert_eq!(
            c.route(i, "default"),
            "",
            "node n{i} installed the ToR's default route"
        );
    }

    // n1 cut off hard (links up, nothing sent): the ToR drops its blocks when the hold timer
    // expires, and the other nodes lose the routes through the ToR.
    cut_off(&c.nodes[1].netns);
    let gone = within(HOLD + Duration::from_secs(2), || {
        !daemon
            .learned()
            .iter()
            .any(|p| p == "10.244.1.0/24" || p == "fd10:244:1::/64")
            && c.route(0, "10.244.1.0/24").is_empty()
            && c.route(0, "fd10:244:1::/64").is_empty()
    });
    assert!(
        gone.is_some(),
        "{kind:?} still has n1's block after the hold time: ToR {:?}, n0 {:?}\n{}",
        daemon.learned(),
        c.route(0, "10.244.1.0/24"),
        daemon.log()
    );
    eprintln!("{kind:?}: n1 (cut off) withdrawn after {:?}", gone.unwrap());

    // GoBGP runs this cluster without graceful restart, so an agent restart costs packets by
    // design: tor_gobgp_agent_restart runs that part on a cluster of its own, with it on.
    if kind == TorKind::Gobgp {
        return;
    }
    // kill -9 and restart of n2's agent under a continuous ping: the ToR, a graceful-restart
    // helper, keeps n2's blocks meanwhile, and n2 its routes: no packet lost.
    let summary = c.restart_agent_under_ping(2, &p0.netns, &p2.ip);
    assert!(
        summary.contains(" 0% packet loss"),
        "{kind:?}: ping across n2's agent restart: {summary}\n{}\n{}",
        daemon.log(),
        c.nodes[2].agent_log()
    );
}

#[test]
fn tor_bird() {
    scenario(TorKind::Bird);
}

#[test]
fn tor_frr() {
    scenario(TorKind::Frr);
}

#[test]
fn tor_gobgp() {
    scenario(TorKind::Gobgp);
}

/// GoBGP's half of the agent restart: a cluster with graceful restart on (the agents' default),
/// kill -9 and restart of n1's agent under a continuous ping: GoBGP keeps n1's blocks as stale,
/// its kernel sync keeps them in the ToR's kernel, and no packet is lost.
#[test]
fn tor_gobgp_agent_restart() {
    let (mut c, tor, daemon) = tor_cluster(2, TorKind::Gobgp, "");
    c.start();
    let p0 = c.pod(0, "p0");
    let p1 = c.pod(1, "p1");
    c.wait_route(0, "10.244.1.0/24", Duration::from_secs(30), |r| {
        r.contains("via 10.0.0.1")
    });
    c.wait_route(1, "10.244.0.0/24", Duration::from_secs(20), |r| {
        r.contains("via 10.0.1.1")
    });
    // The sync loop has put both blocks into the ToR's kernel.
    for i in 0..2 {
        let put = within(Duration::from_secs(10), || {
            tor.run(&format!("ip route show 10.244.{i}.0/24"))
                .contains(&format!("via 10.0.{i}.2"))
        });
        assert!(put.is_some(), "ToR kernel has no route to n{i}'s block");
    }
    assert!(pings(&p0.netns, &p1.ip), "pod n0 -> pod n1 through GoBGP");
    // What happens to the ToR's kernel routes meanwhile, for the failure message.
    let mut monitor = tor
        .command(&["ip", "-ts", "monitor", "route"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("ip monitor");
    let summary = c.restart_agent_under_ping(1, &p0.netns, &p1.ip);
    sepal_tests::netns::kill(&mut monitor);
    let mut changes = String::new();
    if let Some(mut out) = monitor.stdout.take() {
        use std::io::Read;
        let _ = out.read_to_string(&mut changes);
    }
    assert!(
        summary.contains(" 0% packet loss"),
        "GoBGP: ping across n1's agent restart: {summary}\nToR kernel route changes:\n{changes}\n{}\n{}",
        daemon.log(),
        c.nodes[1].agent_log()
    );
    // And the restart did happen: n1's new session is established.
    let TorDaemon::Gobgp(gobgp, _) = &daemon else {
        unreachable!("a GoBGP ToR")
    };
    let up = within(Duration::from_secs(20), || {
        gobgp.neighbor_state("10.0.1.2") == "established"
    });
    assert!(up.is_some(), "n1's session is not back\n{}", daemon.log());
}

#[test]
fn ecmp_when_two_tors_announce_the_same_prefix() {
    sepal_tests::require_root();
    let mut node = sepal_tests::node::Node::new("n0", &["10.244.0.0/24"]);
    let mut daemons = Vec::new();
    let mut tors = Vec::new();
    let mut objects = common::bgp_configuration(false, "");
    for t in 0..2 {
        let tor = sepal_tests::netns::Netns::new(&format!("tor{t}"));
        sepal_tests::netns::veth(&node.netns, &format!("ul{t}"), &tor, "n0");
        tor.run(&format!(
            "ip addr add 10.{t}.0.1/24 dev n0 && ip link set n0 up"
        ));
        node.netns.run(&format!(
            "ip addr add 10.{t}.0.2/24 dev ul{t} && ip link set ul{t} up"
        ));
        let conf = format!(
            "router id 10.{t}.0.1;\nprotocol device {{ }}\n\
             protocol static {{ ipv4; route 203.0.113.0/24 blackhole; }}\n\
             protocol bgp n0 {{ local 10.{t}.0.1 as 65000; neighbor 10.{t}.0.2 as 64601; hold time 3; \
             keepalive time 1; connect retry time 1; connect delay time 1; ipv4 {{ import all; export all; }}; }}\n"
        );
        daemons.push(sepal_tests::bgpd::Bird::start(&tor, &conf));
        objects.push_str(&format!(
            "---\napiVersion: sepal.dev/v1alpha1\nkind: BGPPeer\nmetadata:\n  name: tor{t}\nspec:\n  \
             peerIP: 10.{t}.0.1\n  asNumber: 65000\n  keepaliveTime: 1s\n  holdTime: 3s\n"
        ));
        tors.push(tor);
    }
    std::fs::write(
        node.datastore.join("node-n0.yaml"),
        common::node_yaml(0, "10.0.0.2", "sepal.dev/as-number: \"64601\""),
    )
    .expect("write node");
    std::fs::write(node.datastore.join("routing.yaml"), objects).expect("write objects");
    node.start_agent();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = node.netns.run("ip route show proto 83 203.0.113.0/24");
        if r.contains("nexthop via 10.0.0.1") && r.contains("nexthop via 10.1.0.1") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no ECMP route: {r:?}\n{}",
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // One ToR withdrawing leaves a single-path route.
    drop(daemons.remove(0));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = node.netns.run("ip route show proto 83 203.0.113.0/24");
        if r.contains("via 10.1.0.1") && !r.contains("10.0.0.1") {
            break;
        }
        assert!(Instant::now() < deadline, "after tor0 stopped: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Nodes with no default route at all (every route they have comes from BGP, and the ToR's
/// default is refused by the import policy): pods still reach pods on the other node, their own
/// node and the ToR, over both families. A pod's gateway must not depend on the node's routing
/// table: the plugin writes it as a permanent neighbour entry, so no proxy ARP (which needs a
/// node route to 169.254.1.1) is involved.
#[test]
fn pods_need_no_default_route_on_their_node() {
    let (mut c, tor, daemon) = tor_cluster(2, TorKind::Frr, "");
    for node in &c.nodes {
        node.netns
            .run("ip -4 route flush default; ip -6 route flush default");
    }
    c.start();
    let p0 = c.pod(0, "p0");
    let p1 = c.pod(1, "p1");
    let routed = within(Duration::from_secs(30), || {
        routes_via_tor(&c, 0, 1) && routes_via_tor(&c, 1, 0)
    });
    assert!(
        routed.is_some(),
        "the nodes do not route each other via the ToR: {:?} {:?}\n{}",
        c.route(0, "10.244.1.0/24"),
        c.route(1, "10.244.0.0/24"),
        daemon.log()
    );
    for (i, node) in c.nodes.iter().enumerate() {
        let defaults = node
            .netns
            .run("ip -4 route show default; ip -6 route show default");
        assert_eq!(defaults.trim(), "", "node n{i} has a default route");
    }
    for pod in [&p0, &p1] {
        let neigh = pod.netns.run("ip neigh show 169.254.1.1; ip -6 neigh show");
        assert!(
            neigh.contains("169.254.1.1 dev eth0 lladdr ee:ee:ee:ee:ee:ee PERMANENT")
                && neigh.contains(
                    "fe80::ecee:eeff:feee:eeee dev eth0 lladdr ee:ee:ee:ee:ee:ee PERMANENT"
                ),
            "pod gateway entries: {neigh}"
        );
    }
    assert_reach(&p0, &p1, "pods on nodes without a default route");
    let targets = [
        ("its own node", "10.0.0.2"),
        ("its own node (IPv6)", "fd00:10::2"),
        ("the ToR", "10.0.0.1"),
        ("the ToR (IPv6)", "fd00:10::1"),
    ];
    for (what, addr) in targets {
        assert!(
            pings(&p0.netns, addr),
            "pod n0 -> {what} ({addr}) on a node without a default route\n{}",
            daemon.log()
        );
    }
    assert!(pings(&tor, &p1.ip), "ToR -> pod n1");
}
