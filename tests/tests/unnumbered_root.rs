//! Unnumbered peering through the real agent: a BGPPeer that names `interface` instead of
//! `peerIP`. The node (n0) and a router share a link with no IPv4 address on it, only IPv6
//! link-local ones; the session runs between those, IPv4 routes travel with IPv6 next hops
//! (RFC 8950 extended next hop) and land in both kernels as IPv4 routes via an IPv6 next hop.
//! FRR (`neighbor n0 interface remote-as external`) finds the node by its router
//! advertisements and the node finds FRR by FRR's; BIRD is given the node's address and the
//! node BIRD's (`peerIP` with `interface`); GoBGP (`neighbor-interface`) finds the node in its
//! kernel's neighbor table.

use sepal_tests::bgpd::{wait_for, Bird, Frr};
use sepal_tests::netns::{veth, Netns};
use sepal_tests::node::Node;
use sepal_tests::routing::{bgp_configuration, node_yaml, Cluster};
use std::time::Duration;

const T: Duration = Duration::from_secs(45);

/// n0 (block 10.244.0.0/24, its address 10.0.0.2 on lo) linked to a router namespace by `ul`
/// (node side) and `n0` (router side), both with link-local addresses only; the router has
/// 192.0.2.1 on lo. Returns the cluster (agent not started), the router and both link-local
/// addresses (node's, router's).
fn link_local_pair() -> (Cluster, Netns, String, String) {
    sepal_tests::require_root();
    let router = Netns::new("rt");
    let node = Node::new("n0", &["10.244.0.0/24"]);
    for ns in [&router, &node.netns] {
        sepal_tests::routing::settled_link_local(ns);
    }
    veth(&node.netns, "ul", &router, "n0");
    router.run(
        "ip link set n0 up && ip addr add 192.0.2.1/32 dev lo && sysctl -qw net.ipv4.ip_forward=1",
    );
    node.netns
        .run("ip link set ul up && ip addr add 10.0.0.2/32 dev lo");
    let ll = |ns: &Netns, dev: &str| -> String {
        wait_for(T, "a link-local address", || {
            let out = ns.run(&format!("ip -6 -o addr show dev {dev} scope link"));
            let a = out
                .split_whitespace()
                .nth(3)?
                .split('/')
                .next()?
                .to_string();
            (!out.contains("tentative")).then_some(a)
        })
    };
    let (node_ll, router_ll) = (ll(&node.netns, "ul"), ll(&router, "n0"));
    let c = Cluster {
        fabric: Netns::new("unused"),
        nodes: vec![node],
    };
    c.write_all("node-n0.yaml", &node_yaml(0, "10.0.0.2", ""));
    c.write_all("routing.yaml", &routing(""));
    (c, router, node_ll, router_ll)
}

/// The BGPConfiguration and the unnumbered BGPPeer on `ul`, with `extra` in its spec.
fn routing(extra: &str) -> String {
    bgp_configuration(false, "")
        + &format!(
            "---\napiVersion: sepal.dev/v1alpha1\nkind: BGPPeer\nmetadata:\n  name: router\nspec:\n  \
             interface: ul\n{extra}  asNumber: 65000\n  keepaliveTime: 1s\n  holdTime: 3s\n"
        )
}

/// Both ends' kernels route IPv4 via the other's link-local address, and a pod on the node
/// and the router's 192.0.2.1 reach each other across the link without an IPv4 address.
fn routes_and_reach(c: &Cluster, router: &Netns, router_ll: &str) {
    let r = c.wait_route(0, "192.0.2.0/24", T, |r| r.contains("via inet6"));
    assert!(r.contains(&format!("via inet6 {router_ll} dev ul")), "{r}");
    let tor = wait_for(T, "the router's kernel route to the node's block", || {
        let r = router.run("ip route show 10.244.0.0/24");
        r.contains("via inet6").then_some(r)
    });
    assert!(tor.contains("dev n0"), "{tor}");
    let pod = c.pod(0, "p0");
    wait_for(T, "the router reaches the pod", || {
        router
            .try_run(&format!("ping -c 1 -W 1 -I 192.0.2.1 {}", pod.ip))
            .ok()
    });
}

#[test]
fn unnumbered_with_frr_found_by_router_advertisements() {
    let (mut c, router, node_ll, router_ll) = link_local_pair();
    c.write_all("routing.yaml", &routing("  bfd: {enabled: true}\n"));
    // FRR's own unnumbered configuration: the interface as the neighbor, its RAs every 3 s;
    // BFD on the session too.
    let frr = Frr::start_with_bfd(
        &router,
        "::",
        "interface n0\n ipv6 nd ra-interval 3\n no ipv6 nd suppress-ra\nexit\n\
         router bgp 65000\n bgp router-id 10.0.0.1\n no bgp ebgp-requires-policy\n no bgp network import-check\n \
         neighbor n0 interface remote-as external\n neighbor n0 timers connect 1\n neighbor n0 timers 1 3\n \
         neighbor n0 bfd\n \
         address-family ipv4 unicast\n  network 192.0.2.0/24\n exit-address-family\n",
    );
    c.start();
    wait_for(
        T,
        "FRR's unnumbered session with the node established",
        || {
            let out = frr.vtysh("show bgp neighbors n0 json");
            out.contains("\"bgpState\":\"Established\"").then_some(())
        },
    );
    let n = frr.vtysh("show bgp neighbors n0 json");
    // RFC 8950 negotiated both ways.
    assert!(n.contains("extendedNexthop"), "{n}");
    routes_and_reach(&c, &router, &router_ll);
    let st = c.nodes[0].status_json();
    assert_eq!(st["bgp"]["peers"][0]["state"], "Established", "{st}");
    assert_eq!(st["bgp"]["peers"][0]["address"], router_ll.as_str(), "{st}");
    // BFD between the link-local addresses, Up on both ends.
    wait_for(T, "BFD Up on the node", || {
        (c.nodes[0].status_json()["bgp"]["bfd"][0]["state"] == "Up").then_some(())
    });
    wait_for(T, "BFD Up at FRR", || {
        let peers = frr.vtysh_daemon("bfdd", "show bfd peers json");
        (peers.contains(&format!("\"peer\":\"{node_ll}\"")) && peers.contains("\"status\":\"up\""))
            .then_some(())
    });
}

#[test]
fn unnumbered_with_bird_given_the_link_local_address() {
    let (mut c, router, node_ll, router_ll) = link_local_pair();
    // The node is given BIRD's address instead of waiting for router advertisements.
    c.write_all(
        "routing.yaml",
        &routing(&format!("  peerIP: {router_ll}\n")),
    );
    let bird = Bird::start(
        &router,
        &format!(
            r#"router id 10.0.0.1;
protocol device {{ }}
protocol kernel {{ ipv4 {{ import none; export where source = RTS_BGP; }}; }}
protocol static st4 {{ ipv4; route 192.0.2.0/24 blackhole; }}
protocol bgp n0 {{
  local as 65000; neighbor {node_ll} as 64512; interface "n0";
  connect delay time 1; connect retry time 1; error wait time 1, 2; hold time 3;
  ipv4 {{ import all; export where proto = "st4"; extended next hop on; }};
}}
"#
        ),
    );
    c.start();
    wait_for(T, "BIRD's session with the node established", || {
        bird.established("n0").then_some(())
    });
    routes_and_reach(&c, &router, &router_ll);
}

/// Sends one router advertisement on `dev` in `ns` from `src` with IPv6 hop limit `hops` (the
/// kernel fills in the ICMPv6 checksum of raw sockets).
fn send_advertisement(ns: &Netns, dev: &str, src: &str, hops: u8) {
    ns.run(&format!(
        "python3 -c 'import socket; i = socket.if_nametoindex(\"{dev}\"); \
         s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6); \
         s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, {hops}); \
         s.bind((\"{src}\", 0, 0, i)); \
         s.sendto(bytes([134, 0, 0, 0, 64] + [0] * 11), (\"ff02::1\", 0, 0, i))'"
    ));
}

/// RFC 4861 §6.1.2: an advertisement with a hop limit below 255 may have been routed from off the
/// link, so the node must not take its sender for the peer; the same advertisement at 255 is.
#[test]
fn router_advertisements_routed_from_off_link_are_ignored() {
    let (mut c, router, _node_ll, _router_ll) = link_local_pair();
    router.run("ip addr add fe80::bad/64 dev n0 nodad");
    c.start();
    let peers_at = |c: &Cluster| c.nodes[0].status_json()["bgp"]["peers"].to_string();
    for _ in 0..5 {
        send_advertisement(&router, "n0", "fe80::bad", 64);
        std::thread::sleep(Duration::from_millis(400));
    }
    assert!(
        !peers_at(&c).contains("fe80::bad"),
        "an advertisement with hop limit 64 was taken: {}",
        peers_at(&c)
    );
    let peers = wait_for(T, "the on-link advertisement taken", || {
        send_advertisement(&router, "n0", "fe80::bad", 255);
        let p = peers_at(&c);
        p.contains("fe80::bad").then_some(p)
    });
    assert!(peers.contains("fe80::bad"), "{peers}");
}

/// GoBGP's own unnumbered form (`neighbor-interface`): it takes the peer's address from the
/// kernel's neighbor table and offers extended next hop for IPv4. GoBGP programs no kernel
/// routes, so its side is checked in its RIB; the node's kernel routes IPv4 via GoBGP's
/// link-local address.
#[test]
fn unnumbered_with_gobgp_neighbor_interface() {
    let (mut c, router, node_ll, router_ll) = link_local_pair();
    c.write_all(
        "routing.yaml",
        &routing(&format!("  peerIP: {router_ll}\n")),
    );
    // GoBGP wants exactly one link-local neighbor on the interface: the node, once pinged.
    router.run(&format!("ping -6 -c 1 -W 2 {node_ll}%n0 >/dev/null"));
    let g = sepal_tests::bgpd::Gobgp::start(
        &router,
        "[global.config]\n  as = 65000\n  router-id = \"10.0.0.1\"\n\
         [[neighbors]]\n  [neighbors.config]\n    neighbor-interface = \"n0\"\n    peer-as = 64512\n\
         [neighbors.timers.config]\n    connect-retry = 1\n    hold-time = 3\n    keepalive-interval = 1\n\
         [[neighbors.afi-safis]]\n  [neighbors.afi-safis.config]\n    afi-safi-name = \"ipv4-unicast\"\n\
         [[neighbors.afi-safis]]\n  [neighbors.afi-safis.config]\n    afi-safi-name = \"ipv6-unicast\"\n",
    );
    g.cli(&["global", "rib", "add", "192.0.2.0/24", "-a", "ipv4"]);
    c.start();
    let r = wait_for(T, "GoBGP learns the node's block", || {
        g.rib("ipv4").get("10.244.0.0/24").map(|p| p.to_string())
    });
    assert!(
        r.contains(&node_ll),
        "IPv4 route via the node's link-local address: {r}"
    );
    let r = c.wait_route(0, "192.0.2.0/24", T, |r| r.contains("via inet6"));
    assert!(r.contains(&format!("via inet6 {router_ll} dev ul")), "{r}");
}
