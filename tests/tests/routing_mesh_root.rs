//! Routing end to end over the node-to-node mesh: 3 nodes running the real agent on one L2
//! underlay, pods through sepal-cni, learned routes in the kernel, no encapsulation, graceful
//! restart under a continuous ping, withdrawal when a node stops.

use sepal_tests::routing as common;

use common::{bgp_configuration, cut_off, pings, within, Cluster, HOLD};
use sepal_tests::bgpd::{wait_for, Bird};
use sepal_tests::netns::{veth, Netns};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

#[test]
fn mesh_routes_pods_across_nodes_and_survives_agent_restart() {
    let mut c = Cluster::segment(3, &bgp_configuration(true, ""));
    c.start();
    let p0 = c.pod(0, "p0");
    let p2 = c.pod(2, "p2");

    // Learned routes: protocol 83, the peer node as next hop on the underlay, onlink.
    let r = c.wait_route(0, "10.244.2.0/24", Duration::from_secs(20), |r| {
        !r.is_empty()
    });
    assert!(
        r.contains("via 192.168.100.3") && r.contains("dev ul") && r.contains("onlink"),
        "{r}"
    );
    c.wait_route(2, "10.244.0.0/24", Duration::from_secs(20), |r| {
        r.contains("via 192.168.100.1")
    });
    c.wait_route(1, "10.244.2.0/24", Duration::from_secs(20), |r| {
        r.contains("via 192.168.100.3")
    });
    // A node never learns its own block back.
    assert!(!c.route(0, "10.244.0.0/24").contains("via"));

    assert!(pings(&p0.netns, &p2.ip), "pod n0 -> pod n2");
    assert!(pings(&p2.netns, &p0.ip), "pod n2 -> pod n0");
    assert!(pings(&c.nodes[1].netns, &p2.ip), "node n1 -> pod n2");

    // No encapsulation: on the underlay the packets carry the pods' own addresses.
    let seen = common::underlay_sees(&c.fabric, "br0", &p0, &p2.ip);
    assert!(
        seen.contains(&format!("{} > {}: ICMP echo request", p0.ip, p2.ip)),
        "underlay saw: {seen:?}"
    );

    // kill -9 and restart of n2's agent under a continuous ping: no packet lost.
    let summary = c.restart_agent_under_ping(2, &p0.netns, &p2.ip);
    assert!(
        summary.contains(" 0% packet loss"),
        "ping across the restart: {summary}\n{}",
        c.nodes[2].agent_log()
    );
    assert!(
        c.nodes[2]
            .agent_log()
            .contains("keeping the previous agent's BGP routes"),
        "the restarted agent did not adopt its routes:\n{}",
        c.nodes[2].agent_log()
    );
    // After the restart the routes are learned again (stale ones swept) and still right.
    c.wait_route(2, "10.244.0.0/24", Duration::from_secs(20), |r| {
        r.contains("via 192.168.100.1")
    });
    assert!(pings(&p2.netns, &p0.ip));

    // A node stopped on purpose (Cease, no graceful restart) is withdrawn within the hold time.
    c.nodes[1].stop_agent();
    let t = Instant::now();
    c.wait_route(0, "10.244.1.0/24", Duration::from_secs(6), |r| r.is_empty());
    eprintln!("n1 withdrawn from n0 after {:?}", t.elapsed());
    assert!(pings(&p0.netns, &p2.ip), "the others still route");

    // A node cut off hard (no NOTIFICATION, no TCP reset, links up) is withdrawn when the hold
    // timer expires: graceful restart keeps routes only for a lost connection, not a dead peer.
    cut_off(&c.nodes[2].netns);
    let took = within(HOLD + Duration::from_secs(2), || {
        c.route(0, "10.244.2.0/24").is_empty()
    });
    assert!(
        took.is_some(),
        "n2 still routed from n0 {:?} after it was cut off: {}\n{}",
        HOLD + Duration::from_secs(2),
        c.route(0, "10.244.2.0/24"),
        c.nodes[0].agent_log()
    );
    eprintln!("n2 (cut off) withdrawn from n0 after {:?}", took.unwrap());
}

#[test]
fn route_reflector_carries_routes_with_the_mesh_off() {
    let mut c = Cluster::segment(3, &bgp_configuration(false, ""));
    // n0 is the route reflector; n1 and n2 peer only with it.
    c.write_all(
        "node-n0.yaml",
        &common::node_yaml(
            0,
            "192.168.100.1",
            "sepal.dev/route-reflector-cluster-id: \"244.0.0.1\"",
        ),
    );
    c.start();
    let p1 = c.pod(1, "p1");
    let p2 = c.pod(2, "p2");
    // Reflected routes keep the originator's next hop: n1 reaches n2 directly, not through n0.
    c.wait_route(1, "10.244.2.0/24", Duration::from_secs(20), |r| {
        r.contains("via 192.168.100.3")
    });
    c.wait_route(2, "10.244.1.0/24", Duration::from_secs(20), |r| {
        r.contains("via 192.168.100.2")
    });
    c.wait_route(0, "10.244.1.0/24", Duration::from_secs(20), |r| {
        r.contains("via 192.168.100.2")
    });
    assert!(
        pings(&p1.netns, &p2.ip),
        "pod n1 -> pod n2 via reflected routes"
    );
    // No session between the two clients.
    let sessions = c.nodes[1]
        .netns
        .run("ss -tn state established '( dport = :179 or sport = :179 )'");
    assert!(
        !sessions.contains("192.168.100.3"),
        "n1 and n2 peer directly: {sessions}"
    );
}

#[test]
fn ipv6_pods_across_nodes_over_one_ipv4_session() {
    let mut c = Cluster::dual_stack_segment(2, &bgp_configuration(true, ""));
    c.start();
    let p0 = c.pod(0, "p0");
    let p1 = c.pod(1, "p1");
    let (v6_0, v6_1) = (
        p0.ip6.clone().expect("p0 IPv6"),
        p1.ip6.clone().expect("p1 IPv6"),
    );
    // The IPv6 block arrives over the IPv4 session with the node's IPv6 address as next hop
    // (not an IPv4-mapped one), directly connected on the underlay.
    let r = c.wait_route(0, "fd10:244:1::/64", Duration::from_secs(20), |r| {
        !r.is_empty()
    });
    assert!(r.contains("via fd00:100::2") && r.contains("dev ul"), "{r}");
    c.wait_route(1, "fd10:244:0::/64", Duration::from_secs(20), |r| {
        r.contains("via fd00:100::1")
    });
    c.wait_route(0, "10.244.1.0/24", Duration::from_secs(20), |r| {
        r.contains("via 192.168.100.2")
    });
    // The first packet gets through: the underlay's link-locals are settled (see
    // common::settled_link_local), and the pods' side needs no wait (their gateway is the host
    // veth's link-local, which skips DAD; the pods solicit from their own global address).
    if !pings(&p0.netns, &v6_1) {
        let dump = |ns: &sepal_tests::netns::Netns| ns.run("ip -6 addr; ip -6 route; ip -6 neigh");
        panic!(
            "pod n0 -> pod n1 over IPv6\n--- p0\n{}\n--- n0\n{}\n--- n1\n{}\n--- p1\n{}",
            dump(&p0.netns),
            dump(&c.nodes[0].netns),
            dump(&c.nodes[1].netns),
            dump(&p1.netns)
        );
    }
    assert!(pings(&p1.netns, &v6_0), "pod n1 -> pod n0 over IPv6");
    assert!(pings(&p0.netns, &p1.ip), "pod n0 -> pod n1 over IPv4");
    // One session, over IPv4.
    let sessions = c.nodes[0]
        .netns
        .run("ss -Htn state established '( dport = :179 or sport = :179 )'");
    assert_eq!(sessions.lines().count(), 1, "{sessions}");
    assert!(sessions.contains("192.168.100.2"), "{sessions}");
}

/// BIRD on the underlay as an iBGP route-reflector client of node n0 (AS 64512): `i` picks its
/// address 192.168.100.1<i>; it announces `routes` (BIRD static route lines).
fn bird_client(c: &Cluster, i: usize, routes: &str) -> (Netns, Bird) {
    let ns = Netns::new(&format!("rc{i}"));
    veth(&ns, "e0", &c.fabric, &format!("pb{i}"));
    c.fabric.run(&format!(
        "ip link set pb{i} master br0 && ip link set pb{i} up"
    ));
    ns.run(&format!(
        "ip addr add 192.168.100.1{i}/24 dev e0 && ip link set e0 up"
    ));
    let conf = format!(
        r#"router id 192.168.100.1{i};
protocol device {{ }}
protocol direct {{ ipv4; interface "e0"; }}
protocol static st4 {{ ipv4; {routes} }}
protocol bgp refl {{
  local 192.168.100.1{i} as 64512; neighbor 192.168.100.1 as 64512;
  connect delay time 1; connect retry time 1; error wait time 1, 2;
  ipv4 {{ import all; export where proto = "st4"; }};
}}
"#
    );
    let bird = Bird::start(&ns, &conf);
    (ns, bird)
}

/// A node as route reflector (RFC 4456) for two BIRD clients given as BGPPeers: what one client
/// sends reaches the other whatever the prefix (not only the cluster's ranges), with
/// ORIGINATOR_ID, CLUSTER_LIST, its large and extended communities as sent; an `exportPolicy`
/// narrows what a client gets; and the node's own block reaches the clients with the standard
/// and large communities of the BGPConfiguration.
#[test]
fn route_reflector_reflects_what_its_bird_clients_send() {
    let peer = |i: usize, extra: &str| {
        format!(
            "---\napiVersion: sepal.dev/v1alpha1\nkind: BGPPeer\nmetadata:\n  name: client{i}\nspec:\n  \
             peerIP: 192.168.100.1{i}\n  asNumber: 64512\n  routeReflectorClient: true\n  \
             keepaliveTime: 1s\n  holdTime: 3s\n{extra}"
        )
    };
    let objects = bgp_configuration(
        false,
        "  communities: [{cidr: 10.244.0.0/16, communities: [\"64512:100\", \"64512:1:2\"]}]\n",
    ) + &peer(1, "")
        + &peer(
            2,
            "  exportPolicy: {action: AllowList, cidrs: [192.0.2.0/24, 10.244.0.0/16]}\n",
        );
    let mut c = Cluster::segment(1, &objects);
    c.write_all(
        "node-n0.yaml",
        &common::node_yaml(
            0,
            "192.168.100.1",
            "sepal.dev/route-reflector-cluster-id: \"244.0.0.1\"",
        ),
    );
    let (_n1, b1) = bird_client(
        &c,
        1,
        "route 192.0.2.0/24 blackhole { bgp_large_community.add((64512, 7, 8)); \
         bgp_ext_community.add((rt, 64512, 100)); }; route 198.51.100.0/24 blackhole;",
    );
    let (_n2, b2) = bird_client(&c, 2, "route 203.0.113.0/24 blackhole;");
    c.start();

    // The node installs both clients' routes (as before) ...
    c.wait_route(0, "192.0.2.0/24", Duration::from_secs(20), |r| {
        r.contains("via 192.168.100.11")
    });
    c.wait_route(0, "203.0.113.0/24", Duration::from_secs(20), |r| {
        r.contains("via 192.168.100.12")
    });
    // ... and reflects them, though they are outside every cluster range.
    let r = wait_for(T, "client 1's route at client 2", || {
        Some(b2.route("192.0.2.0/24")).filter(|r| !r.is_empty())
    });
    assert!(r.contains("BGP.originator_id: 192.168.100.11"), "{r}");
    assert!(r.contains("BGP.cluster_list: 244.0.0.1"), "{r}");
    assert!(r.contains("(64512, 7, 8)"), "large community carried: {r}");
    assert!(
        r.contains("(rt, 64512, 100)"),
        "extended community carried: {r}"
    );
    let r = wait_for(T, "client 2's route at client 1", || {
        Some(b1.route("203.0.113.0/24")).filter(|r| !r.is_empty())
    });
    assert!(r.contains("BGP.originator_id: 192.168.100.12"), "{r}");
    // The node's own block, with the configured communities.
    let own = wait_for(T, "the node's block at client 1", || {
        Some(b1.route("10.244.0.0/24")).filter(|r| !r.is_empty())
    });
    assert!(own.contains("(64512,100)"), "standard community: {own}");
    assert!(own.contains("(64512, 1, 2)"), "large community: {own}");
    assert!(!own.contains("originator_id"), "{own}");
    // Client 2's exportPolicy lets 192.0.2.0/24 and the cluster through, not 198.51.100.0/24
    // (which client 1's session shows the node has had all along).
    wait_for(T, "the node's block at client 2", || {
        Some(b2.route("10.244.0.0/24")).filter(|r| !r.is_empty())
    });
    c.wait_route(0, "198.51.100.0/24", Duration::from_secs(5), |r| {
        !r.is_empty()
    });
    std::thread::sleep(Duration::from_secs(2));
    let r = b2.route("198.51.100.0/24");
    assert!(r.is_empty(), "exportPolicy let through: {r}");
}

/// BFD on the mesh (`spec.bfd` of the BGPConfiguration): a node that goes silent is withdrawn
/// from the others within the BFD detection time (3 x 300 ms), well before the 3 s hold timer.
#[test]
fn bfd_on_the_mesh_withdraws_a_silent_node_within_a_second() {
    let mut c = Cluster::segment(3, &bgp_configuration(true, "  bfd: {enabled: true}\n"));
    c.start();
    for (i, j) in [(0, 1), (0, 2), (2, 1)] {
        c.wait_route(i, &format!("10.244.{j}.0/24"), T, |r| !r.is_empty());
    }
    // The BFD sessions of the nodes that must notice the cut are Up, each with the other two.
    for i in [0, 2] {
        wait_for(T, &format!("n{i}'s BFD sessions Up"), || {
            let st = c.nodes[i].status_json();
            let bfd = st["bgp"]["bfd"].as_array()?.clone();
            (bfd.len() == 2 && bfd.iter().all(|b| b["state"] == "Up")).then_some(())
        });
    }
    std::thread::sleep(Duration::from_secs(2));
    cut_off(&c.nodes[1].netns);
    let cut = Instant::now();
    let took = within(Duration::from_secs(5), || {
        c.route(0, "10.244.1.0/24").is_empty() && c.route(2, "10.244.1.0/24").is_empty()
    });
    eprintln!("silent n1 withdrawn from n0 and n2 after {took:?}");
    let took = took.unwrap_or_else(|| cut.elapsed());
    assert!(
        took < Duration::from_millis(1500),
        "withdrawn after {took:?}"
    );
    // The others still route each other.
    assert!(!c.route(0, "10.244.2.0/24").is_empty());
}
