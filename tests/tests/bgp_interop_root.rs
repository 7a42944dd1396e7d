//! Interop of Sepal's BGP speaker (`sepal-bgpd`, the library in a small process) with BIRD 2,
//! FRR bgpd and GoBGP in network namespaces. Each test checks the peer's own RIB and Sepal's. Root.

use std::time::Duration;

use sepal_tests::bgpd::{wait_for, Bird, Frr, Gobgp, SepalBgpd};
use sepal_tests::netns::{veth, Netns};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

/// Two namespaces joined by a veth: Sepal side s0 (.2 / ::2), peer side p0 (.1 / ::1).
fn pair(tag: &str) -> (Netns, Netns) {
    sepal_tests::require_root();
    let s = Netns::new(&format!("{tag}s"));
    let p = Netns::new(&format!("{tag}p"));
    veth(&s, "s0", &p, "p0");
    s.run("ip addr add 10.213.0.2/24 dev s0; ip addr add fd00:213::2/64 dev s0 nodad");
    p.run("ip addr add 10.213.0.1/24 dev p0; ip addr add fd00:213::1/64 dev p0 nodad");
    (s, p)
}

fn sepal(ns: &Netns, asn: u32, listen: &[&str], extra: Value) -> SepalBgpd {
    let mut start =
        json!({"local_as": asn, "router_id": "10.213.0.2", "listen": listen, "ecmp": 4});
    if let (Some(o), Some(e)) = (start.as_object_mut(), extra.as_object()) {
        o.extend(e.clone());
    }
    SepalBgpd::start(ns, start)
}

fn established(d: &mut SepalBgpd, addr: &str) {
    wait_for(T, &format!("sepal session with {addr} Established"), || {
        (d.peer_state(addr) == "Established").then_some(())
    });
}

fn bird_conf(
    local: &str,
    local_as: u32,
    neighbor: &str,
    neighbor_as: u32,
    extra: &str,
    channels: &str,
) -> String {
    format!(
        r#"router id 10.213.0.1;
protocol device {{ }}
protocol static st4 {{ ipv4; route 10.244.1.0/24 blackhole; }}
protocol static st6 {{ ipv6; route fd00:244:1::/64 blackhole; }}
protocol bgp sepal {{
  local {local} as {local_as}; neighbor {neighbor} as {neighbor_as};
  connect delay time 1; connect retry time 1; error wait time 1, 2;
  {extra}
  {channels}
}}
"#
    )
}

/// eBGP with BIRD over an IPv6 session carrying IPv4 (RFC 8950 next hops) and IPv6; withdraw propagation.
#[test]
fn bgp_bird_ebgp_dual_stack_over_ipv6() {
    let (s, p) = pair("bd");
    let bird = Bird::start(
        &p,
        &bird_conf(
            "fd00:213::1",
            65001,
            "fd00:213::2",
            65002,
            "",
            r#"ipv4 { import all; export where proto = "st4"; extended next hop on; };
  ipv6 { import all; export where proto = "st6"; };"#,
        ),
    );
    let mut d = sepal(&s, 65002, &["[::]:179"], json!({}));
    d.peer(json!({"address": "fd00:213::1", "remote_as": 65001, "connect_retry_ms": 1000, "hold_time": 9, "extended_next_hop": true}));
    d.announce("10.244.2.0/24");
    d.announce("fd00:244:2::/64");
    established(&mut d, "fd00:213::1");

    // BIRD's RIB holds ours with AS path 65002 and our session address as next hop.
    let r4 = wait_for(T, "10.244.2.0/24 in BIRD", || {
        Some(bird.route("10.244.2.0/24")).filter(|r| !r.is_empty())
    });
    assert!(r4.contains("65002"), "{r4}");
    assert!(
        r4.contains("fd00:213::2"),
        "IPv4 route with an IPv6 next hop: {r4}"
    );
    let r6 = wait_for(T, "fd00:244:2::/64 in BIRD", || {
        Some(bird.route("fd00:244:2::/64")).filter(|r| !r.is_empty())
    });
    assert!(r6.contains("fd00:213::2"), "{r6}");

    // Sepal's Loc-RIB holds BIRD's, both families, next hop BIRD's global address.
    let b4 = wait_for(T, "10.244.1.0/24 in Sepal", || d.route("10.244.1.0/24"));
    assert_eq!(b4["next_hops"], json!(["fd00:213::1"]));
    assert_eq!(b4["attrs"]["as_path"], json!([{"Sequence": [65001]}]));
    let b6 = wait_for(T, "fd00:244:1::/64 in Sepal", || d.route("fd00:244:1::/64"));
    assert_eq!(b6["next_hops"], json!(["fd00:213::1"]));

    // Withdraw propagates.
    d.withdraw("10.244.2.0/24");
    wait_for(T, "withdrawal in BIRD", || {
        bird.route("10.244.2.0/24").is_empty().then_some(())
    });
    assert!(!bird.route("fd00:244:2::/64").is_empty());
}

/// TCP MD5: the right password establishes, a wrong one never does.
#[test]
fn bgp_bird_md5() {
    let (s, p) = pair("md");
    let bird = Bird::start(
        &p,
        &bird_conf(
            "10.213.0.1",
            65001,
            "10.213.0.2",
            65002,
            r#"password "s3cret";"#,
            r#"ipv4 { import all; export where proto = "st4"; };"#,
        ),
    );
    let mut d = sepal(&s, 65002, &["0.0.0.0:179"], json!({}));
    d.peer(json!({"address": "10.213.0.1", "remote_as": 65001, "connect_retry_ms": 1000, "hold_time": 9, "password": "s3cret", "families": ["ipv4"]}));
    d.announce("10.244.2.0/24");
    established(&mut d, "10.213.0.1");
    wait_for(T, "route in BIRD over MD5", || {
        (!bird.route("10.244.2.0/24").is_empty()).then_some(())
    });
    wait_for(T, "BIRD's route in Sepal", || d.route("10.244.1.0/24"));

    // Wrong password: the session goes down and stays down (SYNs are dropped by the kernel).
    d.peer(json!({"address": "10.213.0.1", "remote_as": 65001, "connect_retry_ms": 1000, "hold_time": 9, "password": "wrong", "families": ["ipv4"]}));
    wait_for(T, "session down after password change", || {
        (d.peer_state("10.213.0.1") != "Established").then_some(())
    });
    std::thread::sleep(Duration::from_secs(4));
    assert_ne!(d.peer_state("10.213.0.1"), "Established");
    assert!(
        !bird.established("sepal"),
        "{}",
        bird.birdc("show protocols all sepal")
    );
    assert!(d.route("10.244.1.0/24").is_none());
    let md5_failures = s.run("nstat -az TcpExtTCPMD5Failure TcpExtTCPMD5NotFound");
    assert!(md5_failures.contains("TcpExtTCPMD5"), "{md5_failures}");
}

/// eBGP with FRR: routes both ways, FRR's echo of our own prefix is dropped (AS loop), and a wrong
/// remote AS is answered with OPEN Message Error / Bad Peer AS.
#[test]
fn bgp_frr_ebgp_loop_and_wrong_as() {
    let (s, p) = pair("fr");
    let frr = Frr::start(
        &p,
        "10.213.0.1",
        "router bgp 65001\n bgp router-id 10.213.0.1\n no bgp ebgp-requires-policy\n no bgp network import-check\n \
         neighbor 10.213.0.2 remote-as 65002\n neighbor 10.213.0.2 timers connect 1\n neighbor 10.213.0.2 timers 3 9\n \
         address-family ipv4 unicast\n  network 10.244.1.0/24\n exit-address-family\n",
    );
    let mut d = sepal(&s, 65002, &["0.0.0.0:179"], json!({}));
    d.peer(json!({"address": "10.213.0.1", "remote_as": 65001, "connect_retry_ms": 1000, "hold_time": 9, "families": ["ipv4"]}));
    d.announce("10.244.2.0/24");
    established(&mut d, "10.213.0.1");
    wait_for(T, "our route in FRR", || {
        frr.routes("ipv4")
            .get("10.244.2.0/24")
            .is_some()
            .then_some(())
    });
    let got = wait_for(T, "FRR's route in Sepal", || d.route("10.244.1.0/24"));
    assert_eq!(got["next_hops"], json!(["10.213.0.1"]));
    // Our own prefix stays local: anything FRR sends back carries AS 65002 and is dropped.
    let own = d.route("10.244.2.0/24").expect("own route");
    assert_eq!(own["source"], json!("Local"));
    assert_eq!(d.routes().len(), 2);

    // Wrong AS: Sepal now expects 65009.
    d.peer(json!({"address": "10.213.0.1", "remote_as": 65009, "connect_retry_ms": 1000, "hold_time": 9, "families": ["ipv4"]}));
    let sent = wait_for(T, "Bad Peer AS NOTIFICATION", || {
        d.peers()
            .into_iter()
            .find_map(|p| Some(p["last_notification_sent"].clone()).filter(|n| n["code"] == 2))
    });
    assert_eq!(sent["subcode"], 2);
    wait_for(T, "FRR's route gone from Sepal", || {
        d.route("10.244.1.0/24").is_none().then_some(())
    });
    // FRR counts both NOTIFICATIONs (the Cease of the reconfiguration and the Bad Peer AS) and stays down.
    wait_for(T, "FRR received the NOTIFICATIONs", || {
        let v: Value =
            serde_json::from_str(&frr.vtysh("show bgp neighbors 10.213.0.2 json")).ok()?;
        (v["10.213.0.2"]["messageStats"]["notificationsRecv"].as_u64()? >= 2).then_some(())
    });
    assert_ne!(frr.neighbor_state("10.213.0.2"), "Established");
    assert!(frr.routes("ipv4").get("10.244.2.0/24").is_none());
}

/// eBGP with GoBGP: routes both ways, then a max-prefix trip (Cease / Maximum Number of Prefixes).
#[test]
fn bgp_gobgp_ebgp_and_max_prefix() {
    let (s, p) = pair("gb");
    let g = Gobgp::start(
        &p,
        r#"[global.config]
  as = 65001
  router-id = "10.213.0.1"
  local-address-list = ["10.213.0.1"]
[[neighbors]]
  [neighbors.config]
    neighbor-address = "10.213.0.2"
    peer-as = 65002
  [neighbors.timers.config]
    connect-retry = 1
    hold-time = 9
    keepalive-interval = 3
"#,
    );
    let mut d = sepal(&s, 65002, &["0.0.0.0:179"], json!({}));
    d.peer(json!({"address": "10.213.0.1", "remote_as": 65001, "connect_retry_ms": 1000, "hold_time": 9, "families": ["ipv4"], "max_prefixes": 3}));
    d.announce("10.244.2.0/24");
    established(&mut d, "10.213.0.1");
    for i in 1..=2 {
        g.cli(&[
            "global",
            "rib",
            "add",
            &format!("10.244.1{i}.0/24"),
            "-a",
            "ipv4",
        ]);
    }
    wait_for(T, "our route in GoBGP", || {
        g.rib("ipv4").get("10.244.2.0/24").is_some().then_some(())
    });
    let r = wait_for(T, "GoBGP's routes in Sepal", || d.route("10.244.12.0/24"));
    assert_eq!(r["next_hops"], json!(["10.213.0.1"]));

    // Two more: 4 > 3 trips the limit.
    for i in 3..=4 {
        g.cli(&[
            "global",
            "rib",
            "add",
            &format!("10.244.1{i}.0/24"),
            "-a",
            "ipv4",
        ]);
    }
    let sent = wait_for(T, "max-prefix Cease", || {
        d.peers()
            .into_iter()
            .find_map(|p| Some(p["last_notification_sent"].clone()).filter(|n| n["code"] == 6))
    });
    assert_eq!(sent["subcode"], 1);
    wait_for(T, "GoBGP's routes flushed from Sepal", || {
        d.route("10.244.12.0/24").is_none().then_some(())
    });
    wait_for(T, "GoBGP sees the session down", || {
        (g.neighbor_state("10.213.0.2") != "established").then_some(())
    });
    assert!(g.rib("ipv4").get("10.244.2.0/24").is_none());

    // A higher limit brings the held-down session back at once, not after its hold-down.
    let raised = std::time::Instant::now();
    d.peer(json!({"address": "10.213.0.1", "remote_as": 65001, "connect_retry_ms": 1000, "hold_time": 9, "families": ["ipv4"], "max_prefixes": 10}));
    established(&mut d, "10.213.0.1");
    wait_for(T, "GoBGP's four routes back", || d.route("10.244.14.0/24"));
    assert!(
        raised.elapsed() < std::time::Duration::from_secs(20),
        "back only after {:?}",
        raised.elapsed()
    );
}

/// iBGP with GoBGP over an IPv6 session: IPv6 routes both ways (LOCAL_PREF, next hop unchanged)
/// and a withdrawal from GoBGP propagating into Sepal's Loc-RIB.
#[test]
fn bgp_gobgp_ibgp_ipv6() {
    let (s, p) = pair("gi");
    let g = Gobgp::start(
        &p,
        r#"[global.config]
  as = 65002
  router-id = "10.213.0.1"
  local-address-list = ["fd00:213::1"]
[[neighbors]]
  [neighbors.config]
    neighbor-address = "fd00:213::2"
    peer-as = 65002
  [neighbors.timers.config]
    connect-retry = 1
    hold-time = 9
    keepalive-interval = 3
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv6-unicast"
"#,
    );
    let mut d = sepal(&s, 65002, &["[::]:179"], json!({}));
    d.peer(json!({"address": "fd00:213::1", "remote_as": 65002, "connect_retry_ms": 1000, "hold_time": 9, "families": ["ipv6"]}));
    d.announce("fd00:244:2::/64");
    established(&mut d, "fd00:213::1");
    g.cli(&["global", "rib", "add", "fd00:244:1::/64", "-a", "ipv6"]);
    let r = wait_for(T, "GoBGP's route in Sepal", || d.route("fd00:244:1::/64"));
    assert_eq!(r["next_hops"], json!(["fd00:213::1"]));
    assert_eq!(r["attrs"]["local_pref"], json!(100));
    assert_eq!(r["attrs"]["as_path"], json!([]));
    let ours = wait_for(T, "our route in GoBGP", || {
        g.rib("ipv6").get("fd00:244:2::/64").cloned()
    });
    assert!(ours.to_string().contains("fd00:213::2"), "{ours}");
    g.cli(&["global", "rib", "del", "fd00:244:1::/64", "-a", "ipv6"]);
    wait_for(T, "withdrawal in Sepal", || {
        d.route("fd00:244:1::/64").is_none().then_some(())
    });
}

/// iBGP with FRR: LOCAL_PREF carried both ways, no AS prepended, next hops unchanged, withdraw
/// propagation.
#[test]
fn bgp_frr_ibgp() {
    let (s, p) = pair("fi");
    let frr = Frr::start(
        &p,
        "10.213.0.1",
        "router bgp 65002\n bgp router-id 10.213.0.1\n no bgp ebgp-requires-policy\n no bgp network import-check\n \
         neighbor 10.213.0.2 remote-as 65002\n neighbor 10.213.0.2 timers connect 1\n neighbor 10.213.0.2 timers 3 9\n \
         address-family ipv4 unicast\n  network 10.244.1.0/24\n exit-address-family\n",
    );
    let mut d = sepal(&s, 65002, &["0.0.0.0:179"], json!({}));
    d.peer(json!({"address": "10.213.0.1", "remote_as": 65002, "connect_retry_ms": 1000, "hold_time": 9, "families": ["ipv4"]}));
    d.cmd(json!({"cmd": "announce", "prefix": "10.244.2.0/24", "local_pref": 200}));
    established(&mut d, "10.213.0.1");
    let ours = wait_for(T, "our route in FRR", || {
        frr.routes("ipv4").get("10.244.2.0/24").cloned()
    });
    let path = &ours[0];
    assert_eq!(path["locPrf"], 200, "{ours}");
    assert_eq!(path["path"], "", "{ours}");
    assert_eq!(path["nexthops"][0]["ip"], "10.213.0.2", "{ours}");
    let got = wait_for(T, "FRR's route in Sepal", || d.route("10.244.1.0/24"));
    assert_eq!(got["next_hops"], json!(["10.213.0.1"]));
    assert_eq!(got["attrs"]["local_pref"], 100, "{got}");
    assert_eq!(got["attrs"]["as_path"], json!([]), "{got}");

    d.withdraw("10.244.2.0/24");
    wait_for(T, "withdrawal in FRR", || {
        frr.routes("ipv4")
            .get("10.244.2.0/24")
            .is_none()
            .then_some(())
    });
}

/// GTSM (RFC 5082) against real peers: BIRD `ttl security on` and FRR `ttl-security hops 1`
/// establish with Sepal's `ttl_security: 1` (FRR also with Sepal passive, so through its
/// listener); a peer that sends TTL 1 (BIRD without GTSM, as
/// eBGP does by default) never gets a session.
#[test]
fn bgp_gtsm_bird_frr_and_a_peer_without_it() {
    let bird_ipv4 = r#"ipv4 { import all; export where proto = "st4"; };"#;
    let peer = json!({"address": "10.213.0.1", "remote_as": 65001, "connect_retry_ms": 1000, "hold_time": 9, "families": ["ipv4"], "ttl_security": 1});

    let (s1, p1) = pair("gb");
    let _bird = Bird::start(
        &p1,
        &bird_conf(
            "10.213.0.1",
            65001,
            "10.213.0.2",
            65002,
            "ttl security on;",
            bird_ipv4,
        ),
    );
    let mut d1 = sepal(&s1, 65002, &["0.0.0.0:179"], json!({}));
    d1.peer(peer.clone());
    established(&mut d1, "10.213.0.1");
    wait_for(T, "BIRD's route in Sepal over GTSM", || {
        d1.route("10.244.1.0/24")
    });

    // FRR with `ttl-security hops 1`, with Sepal connecting and then with Sepal passive (the
    // issue's case: FRR drops anything below TTL 255, so the session needs the listener to
    // answer with 255).
    let frr_gtsm = "router bgp 65001\n bgp router-id 10.213.0.1\n no bgp ebgp-requires-policy\n no bgp network import-check\n \
         neighbor 10.213.0.2 remote-as 65002\n neighbor 10.213.0.2 timers connect 1\n neighbor 10.213.0.2 timers 3 9\n \
         neighbor 10.213.0.2 ttl-security hops 1\n \
         address-family ipv4 unicast\n  network 10.244.1.0/24\n exit-address-family\n";
    for (tag, passive) in [("gf", false), ("gp", true)] {
        let (s, p) = pair(tag);
        let frr = Frr::start(&p, "10.213.0.1", frr_gtsm);
        let mut d = sepal(&s, 65002, &["0.0.0.0:179"], json!({}));
        let mut cfg = peer.clone();
        cfg["passive"] = json!(passive);
        d.peer(cfg);
        d.announce("10.244.2.0/24");
        established(&mut d, "10.213.0.1");
        wait_for(
            T,
            &format!("FRR's route in Sepal over GTSM, passive {passive}"),
            || d.route("10.244.1.0/24"),
        );
        wait_for(
            T,
            &format!("our route in FRR over GTSM, passive {passive}"),
            || frr.routes("ipv4").get("10.244.2.0/24").map(|_| ()),
        );
    }

    // BIRD without GTSM sends with TTL 1: the kernel drops its segments below IP_MINTTL 255.
    let (s3, p3) = pair("gn");
    let bird = Bird::start(
        &p3,
        &bird_conf("10.213.0.1", 65001, "10.213.0.2", 65002, "", bird_ipv4),
    );
    let mut d3 = sepal(&s3, 65002, &["0.0.0.0:179"], json!({}));
    d3.peer(peer);
    std::thread::sleep(Duration::from_secs(5));
    assert_ne!(d3.peer_state("10.213.0.1"), "Established");
    assert!(
        !bird.established("sepal"),
        "{}",
        bird.birdc("show protocols all sepal")
    );
    assert!(d3.route("10.244.1.0/24").is_none());
}
