//! BGPPeer options through the real agent and a real peer, one node (n0, 10.0.0.2) on a link to a
//! router (10.0.0.1) running BIRD, FRR or GoBGP: GTSM with the node listening, the prefix limit's
//! teardown and 60 s retry, a 4-byte AS number with standard and large communities, and a TCP
//! MD5 key corrected in its Secret without an agent restart. The BGP library's own tests cover
//! the same options against the speaker alone; these check what the docs promise of the agent.

use sepal_tests::routing as common;

use common::{bgp_configuration, node_yaml, Cluster, TorKind};
use sepal_tests::bgpd::{wait_for, Bird, Frr, Gobgp};
use sepal_tests::netns::{veth, Netns};
use sepal_tests::node::Node;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

/// Node n0 (block 10.244.0.0/24, `annotations` on its Node) linked to a fresh router namespace;
/// its datastore holds `objects`. The agent is not started yet.
fn node_and_router(objects: &str, annotations: &str) -> (Cluster, Netns) {
    sepal_tests::require_root();
    let router = Netns::new("rt");
    let node = Node::new("n0", &["10.244.0.0/24"]);
    veth(&node.netns, "ul", &router, "n0");
    router.run("ip addr add 10.0.0.1/24 dev n0 && ip link set n0 up");
    node.netns
        .run("ip addr add 10.0.0.2/24 dev ul && ip link set ul up");
    let c = Cluster {
        fabric: Netns::new("unused"),
        nodes: vec![node],
    };
    c.write_all("node-n0.yaml", &node_yaml(0, "10.0.0.2", annotations));
    c.write_all("routing.yaml", objects);
    (c, router)
}

fn bgp_peer(asn: u32, extra: &str) -> String {
    format!(
        "---\napiVersion: sepal.dev/v1alpha1\nkind: BGPPeer\nmetadata:\n  name: router\nspec:\n  \
         peerIP: 10.0.0.1\n  asNumber: {asn}\n  keepaliveTime: 1s\n  holdTime: 3s\n{extra}"
    )
}

fn frr_conf(asn: u32, node_as: u32, neighbor_extra: &str) -> String {
    format!(
        "router bgp {asn}\n bgp router-id 10.0.0.1\n no bgp ebgp-requires-policy\n no bgp network import-check\n \
         neighbor 10.0.0.2 remote-as {node_as}\n neighbor 10.0.0.2 timers connect 1\n neighbor 10.0.0.2 timers 1 3\n\
         {neighbor_extra}\
         address-family ipv4 unicast\n  network 192.0.2.0/24\n exit-address-family\n"
    )
}

fn bird_conf(asn: u32, node_as: u32, routes: &str) -> String {
    format!(
        r#"router id 10.0.0.1;
protocol device {{ }}
protocol static st4 {{ ipv4; {routes} }}
protocol bgp n0 {{
  local 10.0.0.1 as {asn}; neighbor 10.0.0.2 as {node_as};
  connect delay time 1; connect retry time 1; error wait time 1, 2; hold time 3;
  ipv4 {{ import all; export where proto = "st4"; }};
}}
"#
    )
}

/// FRR's view of 10.244.0.0/24 (the node's block), as `show bgp` JSON text.
fn frr_block(frr: &Frr) -> Option<String> {
    let out = frr.vtysh("show bgp ipv4 unicast 10.244.0.0/24 json");
    out.contains("\"paths\"").then_some(out)
}

/// The ToR side of the issue's report: the node is passive with `ttlSecurity: 1`, FRR connects
/// with `ttl-security hops 1` (it drops every segment below TTL 255, the node's SYN-ACK too). The
/// session comes up and carries routes both ways. Without GTSM on FRR's side (eBGP with TTL 1)
/// the node drops FRR's packets and the session stays down.
#[test]
fn ttl_security_with_the_node_listening() {
    let objects =
        bgp_configuration(false, "") + &bgp_peer(65000, "  ttlSecurity: 1\n  passive: true\n");
    let (mut c, router) = node_and_router(&objects, "");
    let frr = Frr::start(
        &router,
        "10.0.0.1",
        &frr_conf(65000, 64512, " neighbor 10.0.0.2 ttl-security hops 1\n"),
    );
    c.start();
    wait_for(T, "FRR learns the node's block over GTSM", || {
        frr_block(&frr)
    });
    c.wait_route(0, "192.0.2.0/24", T, |r| r.contains("via 10.0.0.1"));
    // The node's segments to FRR leave with TTL 255, its SYN-ACK included (FRR would drop it
    // otherwise): the connection FRR opened is the one in use.
    let sessions = c.nodes[0]
        .netns
        .run("ss -Htn state established '( sport = :179 )'");
    assert!(
        sessions.contains("10.0.0.1"),
        "FRR did not connect in: {sessions}"
    );

    frr.configure(&[
        "router bgp 65000",
        "no neighbor 10.0.0.2 ttl-security hops 1",
    ]);
    std::thread::sleep(Duration::from_secs(6));
    assert_ne!(
        frr.neighbor_state("10.0.0.2"),
        "Established",
        "a session without GTSM on FRR's side came up"
    );
}

/// `maxPrefixes`: a peer that sends more is cut with a Cease (Maximum Number of Prefixes
/// Reached, RFC 4486) and retried 60 s later, as the peering guide says; once it sends few
/// enough, the retry brings the session back for good.
#[test]
fn max_prefixes_cuts_the_session_and_retries_after_60_s() {
    let objects = bgp_configuration(false, "") + &bgp_peer(65000, "  maxPrefixes: 2\n");
    let (mut c, router) = node_and_router(&objects, "");
    let three = "route 192.0.2.0/24 blackhole; route 198.51.100.0/24 blackhole; \
                 route 203.0.113.0/24 blackhole;";
    let bird = Bird::start(&router, &bird_conf(65000, 64512, three));
    c.start();
    wait_for(T, "the Cease for too many prefixes", || {
        let p = bird.birdc("show protocols all n0");
        p.contains("Maximum number of prefixes reached")
            .then_some(())
    });
    let cut = Instant::now();
    // BIRD keeps trying (connect retry 1 s); the node refuses until the 60 s are up. Meanwhile
    // BIRD drops to two prefixes.
    let two = "route 192.0.2.0/24 blackhole; route 198.51.100.0/24 blackhole;";
    bird.reconfigure(&bird_conf(65000, 64512, two));
    let up = wait_for(
        Duration::from_secs(90),
        "the session back after the retry",
        || bird.established("n0").then(|| cut.elapsed()),
    );
    eprintln!("session back {up:?} after the prefix limit cut it");
    assert!(
        up >= Duration::from_secs(50),
        "retried after {up:?}, before the documented 60 s"
    );
    c.wait_route(0, "198.51.100.0/24", T, |r| r.contains("via 10.0.0.1"));
    std::thread::sleep(Duration::from_secs(4));
    assert!(
        bird.established("n0"),
        "two prefixes within the limit: the session stays"
    );
}

/// A node with a 4-byte AS number (RFC 6793) peers with a router with one, for each of BIRD,
/// FRR and GoBGP. The router sees the node's block with AS path 4200000001 and with the
/// BGPConfiguration's communities: the standard 65000:100 and the large 4200000001:1:2 (RFC 8092,
/// the only way to put a 4-byte AS in a community). The node installs the router's route.
#[test]
fn four_byte_as_and_communities_with_bird_frr_and_gobgp() {
    let node_as = 4200000001u32;
    let tor_as = 4200000002u32;
    let objects = bgp_configuration(
        false,
        "  communities: [{cidr: 10.244.0.0/16, communities: [\"65000:100\", \"4200000001:1:2\"]}]\n",
    ) + &bgp_peer(tor_as, "");
    let annotations = format!("sepal.dev/as-number: \"{node_as}\"");

    // BIRD.
    {
        let (mut c, router) = node_and_router(&objects, &annotations);
        let bird = Bird::start(
            &router,
            &bird_conf(tor_as, node_as, "route 192.0.2.0/24 blackhole;"),
        );
        c.start();
        let r = wait_for(T, "BIRD learns the node's block", || {
            Some(bird.route("10.244.0.0/24")).filter(|r| !r.is_empty())
        });
        assert!(r.contains("BGP.as_path: 4200000001"), "{r}");
        assert!(r.contains("(65000,100)"), "standard community at BIRD: {r}");
        assert!(
            r.contains("(4200000001, 1, 2)"),
            "large community at BIRD: {r}"
        );
        c.wait_route(0, "192.0.2.0/24", T, |r| r.contains("via 10.0.0.1"));
    }
    // FRR.
    {
        let (mut c, router) = node_and_router(&objects, &annotations);
        let frr = Frr::start(&router, "10.0.0.1", &frr_conf(tor_as, node_as, ""));
        c.start();
        let r = wait_for(T, "FRR learns the node's block", || frr_block(&frr));
        let v: serde_json::Value = serde_json::from_str(&r).expect("FRR JSON");
        let path = &v["paths"][0];
        assert_eq!(path["aspath"]["string"], "4200000001", "{r}");
        assert_eq!(path["community"]["string"], "65000:100", "{r}");
        assert_eq!(path["largeCommunity"]["string"], "4200000001:1:2", "{r}");
        c.wait_route(0, "192.0.2.0/24", T, |r| r.contains("via 10.0.0.1"));
    }
    // GoBGP.
    {
        let (mut c, router) = node_and_router(&objects, &annotations);
        let g = Gobgp::start(
            &router,
            &format!(
                "[global.config]\n  as = {tor_as}\n  router-id = \"10.0.0.1\"\n\
                 [[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"10.0.0.2\"\n    peer-as = {node_as}\n\
                 [neighbors.timers.config]\n    connect-retry = 1\n    hold-time = 3\n    keepalive-interval = 1\n"
            ),
        );
        g.cli(&["global", "rib", "add", "192.0.2.0/24", "-a", "ipv4"]);
        c.start();
        let r = wait_for(T, "GoBGP learns the node's block", || {
            let rib = g.rib("ipv4");
            rib.get("10.244.0.0/24").map(|p| p.to_string())
        });
        // GoBGP's JSON: AS path segments with "asns", communities as 32-bit values, large
        // communities with their three parts.
        assert!(r.contains("\"asns\":[4200000001]"), "{r}");
        assert!(
            r.contains(&((65000u32 << 16) | 100).to_string()),
            "standard community: {r}"
        );
        assert!(
            r.contains("{\"ASN\":4200000001,\"LocalData1\":1,\"LocalData2\":2}"),
            "large community: {r}"
        );
        c.wait_route(0, "192.0.2.0/24", T, |r| r.contains("via 10.0.0.1"));
    }
}

/// TCP MD5 (RFC 2385) with the wrong key in the Secret: no session (the kernel drops the peer's
/// signed segments). The key corrected in the Secret brings the session up, with no agent restart.
#[test]
fn md5_key_corrected_in_the_secret_without_an_agent_restart() {
    let secret = |pw: &str| {
        format!(
            "apiVersion: v1\nkind: Secret\nmetadata:\n  name: router-md5\n  namespace: sepal-system\n\
             stringData:\n  password: {pw}\n"
        )
    };
    let objects = bgp_configuration(false, "")
        + &bgp_peer(
            65000,
            "  password: {secretKeyRef: {name: router-md5, key: password}}\n",
        );
    let (mut c, router) = node_and_router(&objects, "");
    c.write_all("secret.yaml", &secret("not-the-key"));
    let frr = Frr::start(
        &router,
        "10.0.0.1",
        &frr_conf(65000, 64512, " neighbor 10.0.0.2 password s3cret-key\n"),
    );
    c.start();
    std::thread::sleep(Duration::from_secs(8));
    assert_ne!(
        frr.neighbor_state("10.0.0.2"),
        "Established",
        "wrong key, yet up"
    );
    assert!(c.route(0, "192.0.2.0/24").is_empty());

    c.write_all("secret.yaml", &secret("s3cret-key"));
    wait_for(T, "the session with the corrected key", || {
        (frr.neighbor_state("10.0.0.2") == "Established").then_some(())
    });
    c.wait_route(0, "192.0.2.0/24", T, |r| r.contains("via 10.0.0.1"));
    wait_for(T, "FRR learns the node's block", || frr_block(&frr));
    let starts = c.nodes[0]
        .agent_log()
        .matches("starting sepal node")
        .count();
    assert_eq!(starts, 1, "the agent restarted");
}

/// A yes/no question to the router.
type Check = Box<dyn Fn() -> bool>;

/// BFD (`spec.bfd` on the BGPPeer) against a router whose BGP uses BFD too: FRR with
/// `neighbor ... bfd` (bgpd with bfdd), BIRD with `bfd on` and a `bfd` protocol. The BGP timers
/// are slow (hold 30 s) and graceful restart is on, yet when the node goes silent (every packet
/// in or out dropped, links up) each side drops the other's routes within a second: the
/// router's BFD and the node's. Once the path is back, so are the session and the routes.
fn bfd_takes_a_silent_path_down_within_a_second(kind: TorKind) {
    let objects = bgp_configuration(false, "")
        + "---\napiVersion: sepal.dev/v1alpha1\nkind: BGPPeer\nmetadata:\n  name: router\nspec:\n  \
           peerIP: 10.0.0.1\n  asNumber: 65000\n  keepaliveTime: 10s\n  holdTime: 30s\n  \
           bfd: {enabled: true, minRxInterval: 300ms, minTxInterval: 300ms, multiplier: 3}\n";
    let (mut c, router) = node_and_router(&objects, "");
    // The router's view: whether it has the node's block, and whether its BFD session is up.
    let (has_block, bfd_up): (Check, Check) = match kind {
        TorKind::Frr => {
            let frr = std::rc::Rc::new(Frr::start_with_bfd(
                &router,
                "10.0.0.1",
                "router bgp 65000\n bgp router-id 10.0.0.1\n no bgp ebgp-requires-policy\n no bgp network import-check\n \
                 neighbor 10.0.0.2 remote-as 64512\n neighbor 10.0.0.2 timers connect 1\n neighbor 10.0.0.2 timers 10 30\n \
                 neighbor 10.0.0.2 bfd\n \
                 address-family ipv4 unicast\n  network 192.0.2.0/24\n exit-address-family\n",
            ));
            let f2 = frr.clone();
            (
                Box::new(move || frr_block(&frr).is_some()),
                Box::new(move || {
                    f2.vtysh_daemon("bfdd", "show bfd peers json")
                        .contains("\"status\":\"up\"")
                }),
            )
        }
        TorKind::Bird => {
            let bird = std::rc::Rc::new(Bird::start(
                &router,
                r#"router id 10.0.0.1;
protocol device { }
protocol static st4 { ipv4; route 192.0.2.0/24 blackhole; }
protocol bfd { interface "n0" { min rx interval 300 ms; min tx interval 300 ms; multiplier 3; }; }
protocol bgp n0 {
  local 10.0.0.1 as 65000; neighbor 10.0.0.2 as 64512;
  connect delay time 1; connect retry time 1; error wait time 1, 2; hold time 30;
  bfd on;
  ipv4 { import all; export where proto = "st4"; };
}
"#,
            ));
            let b2 = bird.clone();
            (
                Box::new(move || !bird.route("10.244.0.0/24").is_empty()),
                Box::new(move || {
                    b2.birdc("show bfd sessions")
                        .lines()
                        .any(|l| l.starts_with("10.0.0.2") && l.contains(" Up "))
                }),
            )
        }
        TorKind::Gobgp => unreachable!("GoBGP has no BFD"),
    };
    c.start();
    c.wait_route(0, "192.0.2.0/24", T, |r| r.contains("via 10.0.0.1"));
    wait_for(T, "the router learns the node's block", || {
        has_block().then_some(())
    });
    wait_for(T, "the router's BFD session with the node up", || {
        bfd_up().then_some(())
    });
    // The node shows its BFD session Up with the intervals in force.
    let bfd = wait_for(T, "the node's BFD session Up in `sepal status`", || {
        let st = c.nodes[0].status_json();
        let b = st["bgp"]["bfd"].as_array()?.first()?.clone();
        (b["state"] == "Up").then_some(b)
    });
    assert_eq!(bfd["peer"], "10.0.0.1", "{bfd}");
    assert_eq!(bfd["tx_interval_ms"], 300, "{bfd}");
    assert_eq!(bfd["detection_time_ms"], 900, "{bfd}");
    let text = c.nodes[0].admin(&["status"]);
    assert!(
        text.contains("BFD PEER") && text.contains("10.0.0.1"),
        "{text}"
    );
    // Both ends' BFD must be up before the cut, or the node's would have nothing to lose.
    std::thread::sleep(Duration::from_secs(2));

    common::cut_off(&c.nodes[0].netns);
    let cut = Instant::now();
    // Both sides watched in one tight loop, so each time is off by one query at most.
    let (mut node_gone, mut router_gone) = (None, None);
    while (node_gone.is_none() || router_gone.is_none()) && cut.elapsed() < Duration::from_secs(10)
    {
        if node_gone.is_none() && c.route(0, "192.0.2.0/24").is_empty() {
            node_gone = Some(cut.elapsed());
        }
        if router_gone.is_none() && !has_block() {
            router_gone = Some(cut.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let node_gone = node_gone.expect("the node kept the router's route for 10 s");
    let router_gone = router_gone.expect("the router kept the node's block for 10 s");
    eprintln!(
        "{kind:?}, silent node: its block gone at the router after {router_gone:?}, the router's \
         route gone at the node after {node_gone:?}"
    );
    assert!(
        node_gone < Duration::from_millis(1500),
        "node: {node_gone:?}"
    );
    assert!(
        router_gone < Duration::from_millis(1500),
        "router: {router_gone:?}"
    );

    let st = c.nodes[0].status_json();
    let b = &st["bgp"]["bfd"][0];
    assert_eq!(b["state"], "Down", "{st}");
    assert_eq!(b["diag"], "ControlDetectionTimeExpired", "{st}");
    assert_eq!(b["diag_code"], 1, "{st}");

    c.nodes[0].netns.run("nft delete table inet cut");
    c.wait_route(0, "192.0.2.0/24", Duration::from_secs(60), |r| {
        r.contains("via 10.0.0.1")
    });
    wait_for(
        Duration::from_secs(60),
        "the router relearns the node's block",
        || has_block().then_some(()),
    );
}

#[test]
fn bfd_with_frr_takes_a_silent_path_down_within_a_second() {
    bfd_takes_a_silent_path_down_within_a_second(TorKind::Frr);
}

#[test]
fn bfd_with_bird_takes_a_silent_path_down_within_a_second() {
    bfd_takes_a_silent_path_down_within_a_second(TorKind::Bird);
}
