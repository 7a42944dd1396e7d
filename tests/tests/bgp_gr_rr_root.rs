//! Graceful restart (Sepal restarting with BIRD as helper, and Sepal helping a restarting BIRD)
//! and route reflection (Sepal reflecting between two BIRD clients), in network namespaces. Root.

use std::time::Duration;

use sepal_tests::bgpd::{wait_for, Bird, SepalBgpd};
use sepal_tests::netns::{veth, Netns};
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(30);

fn pair(tag: &str) -> (Netns, Netns) {
    sepal_tests::require_root();
    let s = Netns::new(&format!("{tag}s"));
    let p = Netns::new(&format!("{tag}p"));
    veth(&s, "s0", &p, "p0");
    s.run("ip addr add 10.213.0.2/24 dev s0");
    p.run("ip addr add 10.213.0.1/24 dev p0");
    (s, p)
}

fn bird_conf(route: &str) -> String {
    format!(
        r#"router id 10.213.0.1;
protocol device {{ }}
protocol static st4 {{ ipv4; route {route} blackhole; }}
protocol bgp sepal {{
  local 10.213.0.1 as 65001; neighbor 10.213.0.2 as 65002;
  connect delay time 1; connect retry time 1; error wait time 1, 2;
  graceful restart on; graceful restart time 60;
  ipv4 {{ import all; export where proto = "st4"; }};
}}
"#
    )
}

fn start_sepal(ns: &Netns, restarting: bool) -> SepalBgpd {
    let mut d = SepalBgpd::start(
        ns,
        json!({"local_as": 65002, "router_id": "10.213.0.2", "listen": ["0.0.0.0:179"],
               "gr_restart_time": 60, "gr_restarting": restarting}),
    );
    d.peer(json!({"address": "10.213.0.1", "remote_as": 65001, "connect_retry_ms": 1000, "hold_time": 9, "families": ["ipv4"]}));
    d
}

fn established(d: &mut SepalBgpd, addr: &str) {
    wait_for(T, &format!("session with {addr}"), || {
        (d.peer_state(addr) == "Established").then_some(())
    });
}

/// kill -9 of Sepal: BIRD keeps our routes as stale through the restart window; the restarted
/// Sepal (R bit) re-syncs, sends End-of-RIB, and BIRD sweeps what was not re-announced.
#[test]
fn bgp_graceful_restart_sepal_restarts() {
    let (s, p) = pair("gr");
    let bird = Bird::start(&p, &bird_conf("10.244.1.0/24"));
    let mut d = start_sepal(&s, false);
    d.announce("10.244.2.0/24");
    d.announce("10.244.3.0/24");
    established(&mut d, "10.213.0.1");
    wait_for(T, "our routes in BIRD", || {
        (!bird.route("10.244.3.0/24").is_empty()).then_some(())
    });

    d.kill9();
    drop(d);
    wait_for(T, "BIRD notices the restart", || {
        bird.birdc("show protocols all sepal")
            .contains("graceful restart")
            .then_some(())
    });
    // Still there while the restart timer runs.
    assert!(
        !bird.route("10.244.2.0/24").is_empty(),
        "{}",
        bird.birdc("show protocols all sepal")
    );

    let mut d = start_sepal(&s, true);
    d.announce("10.244.3.0/24");
    established(&mut d, "10.213.0.1");
    wait_for(T, "stale 10.244.2.0/24 swept after our End-of-RIB", || {
        bird.route("10.244.2.0/24").is_empty().then_some(())
    });
    assert!(!bird.route("10.244.3.0/24").is_empty());
    wait_for(T, "BIRD's route in the restarted Sepal", || {
        d.route("10.244.1.0/24")
    });
}

/// kill -9 of BIRD: Sepal retains its routes as stale, then sweeps them after BIRD comes back.
#[test]
fn bgp_graceful_restart_sepal_helps() {
    let (s, p) = pair("gh");
    let mut bird = Bird::start(&p, &bird_conf("10.244.1.0/24"));
    let mut d = start_sepal(&s, false);
    established(&mut d, "10.213.0.1");
    wait_for(T, "BIRD's route in Sepal", || d.route("10.244.1.0/24"));

    bird.kill9();
    drop(bird);
    wait_for(T, "helper mode", || {
        d.peers()
            .into_iter()
            .find(|p| p["graceful_restart_active"] == json!(true))
            .map(|_| ())
    });
    assert!(d.route("10.244.1.0/24").is_some(), "stale route retained");

    let _bird = Bird::start(&p, &bird_conf("10.244.5.0/24"));
    wait_for(T, "new route after BIRD's restart", || {
        d.route("10.244.5.0/24")
    });
    wait_for(T, "stale route swept", || {
        d.route("10.244.1.0/24").is_none().then_some(())
    });
}

/// Sepal as route reflector (RFC 4456) for two iBGP BIRD clients.
#[test]
fn bgp_route_reflector_two_bird_clients() {
    sepal_tests::require_root();
    let s = Netns::new("rrs");
    let c1 = Netns::new("rr1");
    let c2 = Netns::new("rr2");
    veth(&s, "s1", &c1, "p0");
    veth(&s, "s2", &c2, "p0");
    s.run("ip addr add 10.213.1.2/24 dev s1; ip addr add 10.213.2.2/24 dev s2");
    c1.run("ip addr add 10.213.1.1/24 dev p0");
    c2.run("ip addr add 10.213.2.1/24 dev p0");
    let client = |i: u8| {
        let other = 3 - i;
        format!(
            r#"router id 10.213.{i}.1;
protocol device {{ }}
protocol static st4 {{ ipv4; route 10.244.{i}.0/24 blackhole; route 10.213.{other}.0/24 via 10.213.{i}.2; }}
protocol bgp refl {{
  local 10.213.{i}.1 as 65000; neighbor 10.213.{i}.2 as 65000;
  connect delay time 1; connect retry time 1; error wait time 1, 2;
  ipv4 {{ import all; export where proto = "st4" && net ~ [ 10.244.0.0/16+ ]; }};
}}
"#
        )
    };
    let b1 = Bird::start(&c1, &client(1));
    let b2 = Bird::start(&c2, &client(2));
    let mut d = SepalBgpd::start(
        &s,
        json!({"local_as": 65000, "router_id": "10.213.0.2", "listen": ["0.0.0.0:179"]}),
    );
    for i in 1..=2 {
        d.peer(
            json!({"address": format!("10.213.{i}.1"), "remote_as": 65000, "connect_retry_ms": 1000,
                      "hold_time": 9, "families": ["ipv4"], "rr_client": true}),
        );
    }
    d.announce("10.244.9.0/24");
    for i in 1..=2 {
        let a = format!("10.213.{i}.1");
        wait_for(T, "client sessions", || {
            (d.peer_state(&a) == "Established").then_some(())
        });
    }
    let r = wait_for(T, "client 1's route reflected to client 2", || {
        Some(b2.route("10.244.1.0/24")).filter(|r| !r.is_empty())
    });
    assert!(r.contains("originator_id: 10.213.1.1"), "{r}");
    assert!(r.contains("cluster_list: 10.213.0.2"), "{r}");
    let r = wait_for(T, "client 2's route reflected to client 1", || {
        Some(b1.route("10.244.2.0/24")).filter(|r| !r.is_empty())
    });
    assert!(r.contains("originator_id: 10.213.2.1"), "{r}");
    // Our own route reaches both with LOCAL_PREF 100 and no reflection attributes.
    let own = wait_for(T, "own route at client 1", || {
        Some(b1.route("10.244.9.0/24")).filter(|r| !r.is_empty())
    });
    assert!(own.contains("local_pref: 100"), "{own}");
    assert!(!own.contains("originator_id"), "{own}");
    // Sepal's Loc-RIB holds both clients' routes, next hops unchanged (iBGP).
    let got: Value = wait_for(T, "client routes in Sepal", || d.route("10.244.2.0/24"));
    assert_eq!(got["next_hops"], json!(["10.213.2.1"]));
    assert!(d.route("10.244.1.0/24").is_some());
}

/// Sepal as route-reflector client: two Sepal speakers behind an FRR reflector see each other's routes.
#[test]
fn bgp_sepal_clients_of_frr_reflector() {
    sepal_tests::require_root();
    let r = Netns::new("frr");
    let s1 = Netns::new("fc1");
    let s2 = Netns::new("fc2");
    veth(&s1, "s0", &r, "p1");
    veth(&s2, "s0", &r, "p2");
    r.run("ip addr add 10.213.1.1/24 dev p1; ip addr add 10.213.2.1/24 dev p2");
    s1.run("ip addr add 10.213.1.2/24 dev s0");
    s2.run("ip addr add 10.213.2.2/24 dev s0");
    let frr = sepal_tests::bgpd::Frr::start(
        &r,
        "0.0.0.0",
        "router bgp 65000\n bgp router-id 10.213.0.1\n no bgp ebgp-requires-policy\n no bgp network import-check\n \
         neighbor 10.213.1.2 remote-as 65000\n neighbor 10.213.1.2 timers connect 1\n \
         neighbor 10.213.2.2 remote-as 65000\n neighbor 10.213.2.2 timers connect 1\n \
         address-family ipv4 unicast\n  network 10.244.1.0/24\n  neighbor 10.213.1.2 route-reflector-client\n  \
         neighbor 10.213.2.2 route-reflector-client\n exit-address-family\n",
    );
    let mut clients: Vec<SepalBgpd> = [(&s1, 1), (&s2, 2)]
        .into_iter()
        .map(|(ns, i)| {
            let mut d = SepalBgpd::start(
                ns,
                json!({"local_as": 65000, "router_id": format!("10.213.{i}.2"), "listen": ["0.0.0.0:179"]}),
            );
            d.peer(json!({"address": format!("10.213.{i}.1"), "remote_as": 65000, "connect_retry_ms": 1000,
                          "hold_time": 9, "families": ["ipv4"]}));
            d.announce(&format!("10.244.1{i}.0/24"));
            d
        })
        .collect();
    let got = wait_for(T, "client 1's route at client 2 via FRR", || {
        clients[1].route("10.244.11.0/24")
    });
    assert_eq!(got["next_hops"], json!(["10.213.1.2"]));
    assert_eq!(got["attrs"]["originator_id"], json!("10.213.1.2"));
    assert_eq!(got["attrs"]["cluster_list"], json!(["10.213.0.1"]));
    assert_eq!(got["attrs"]["local_pref"], json!(100));
    wait_for(T, "client 2's route at client 1", || {
        clients[0].route("10.244.12.0/24")
    });
    wait_for(T, "FRR's own route at client 1", || {
        clients[0].route("10.244.1.0/24")
    });
    let routes = frr.routes("ipv4");
    assert!(
        routes.get("10.244.11.0/24").is_some() && routes.get("10.244.12.0/24").is_some(),
        "{routes}"
    );
    // Our own routes reflected back to us are dropped (ORIGINATOR_ID is our router ID).
    assert_eq!(
        clients[0].route("10.244.11.0/24").expect("own")["source"],
        json!("Local")
    );
}
