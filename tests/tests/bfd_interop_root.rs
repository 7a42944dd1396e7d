//! Sepal's BFD (RFC 5880 asynchronous mode, RFC 5881 single hop) against BIRD's `bfd` protocol
//! and FRR's bfdd, over IPv4 and IPv6, in network namespaces: sessions come up, a path that goes
//! silent is detected within the detection time (3 x 300 ms), the session comes back when the
//! path does, and an administrative down on either side is signalled and followed. Root.

use std::time::{Duration, Instant};

use sepal_tests::bgpd::{wait_for, Bird, FrrBfdd, SepalBfdd};
use sepal_tests::netns::{veth, Netns};

const T: Duration = Duration::from_secs(20);

/// Sepal's namespace (10.213.0.2, fd00:213::2) and the peer's (10.213.0.1, fd00:213::1).
fn pair(tag: &str) -> (Netns, Netns) {
    sepal_tests::require_root();
    let s = Netns::new(&format!("{tag}s"));
    let p = Netns::new(&format!("{tag}p"));
    veth(&s, "s0", &p, "p0");
    s.run("ip addr add 10.213.0.2/24 dev s0 && ip addr add fd00:213::2/64 dev s0 nodad && ip link set s0 up");
    p.run("ip addr add 10.213.0.1/24 dev p0 && ip addr add fd00:213::1/64 dev p0 nodad && ip link set p0 up");
    (s, p)
}

/// Drops (or stops dropping) every BFD packet arriving in `ns`: the path goes silent while the
/// link stays up.
fn silence(ns: &Netns, on: bool) {
    if on {
        ns.run(
            "nft add table inet bfdcut && \
             nft add chain inet bfdcut in '{ type filter hook input priority 0; }' && \
             nft add rule inet bfdcut in udp dport 3784 drop",
        );
    } else {
        ns.run("nft delete table inet bfdcut");
    }
}

/// The checks every peer daemon goes through, for one family. `peer_up` says whether the
/// daemon reports its session with Sepal Up.
fn exercise(d: &mut SepalBfdd, s: &Netns, peer: &str, what: &str, peer_up: &dyn Fn() -> bool) {
    wait_for(T, &format!("{what}: Sepal's session Up"), || {
        (d.state(peer) == "Up").then_some(())
    });
    wait_for(T, &format!("{what}: the peer's session Up"), || {
        peer_up().then_some(())
    });
    let st = d.session(peer).unwrap();
    assert_eq!(st["tx_interval_ms"], 300, "{what}: {st}");
    assert_eq!(st["detection_time_ms"], 900, "{what}: {st}");

    // The path goes silent: detected within the detection time (plus scheduling slack).
    silence(s, true);
    let cut = Instant::now();
    let took = wait_for(T, &format!("{what}: Sepal detects the silence"), || {
        (d.state(peer) == "Down").then(|| cut.elapsed())
    });
    eprintln!("{what}: silence detected after {took:?}");
    assert!(took < Duration::from_millis(1500), "{what}: took {took:?}");
    let st = d.session(peer).unwrap();
    assert_eq!(st["diag"], "ControlDetectionTimeExpired", "{what}: {st}");
    // The peer hears Sepal say Down and follows.
    wait_for(T, &format!("{what}: the peer follows Down"), || {
        (!peer_up()).then_some(())
    });
    silence(s, false);
    wait_for(T, &format!("{what}: back Up with the path"), || {
        (d.state(peer) == "Up" && peer_up()).then_some(())
    });

    // Administratively down on Sepal's side: the peer goes down (neighbor signaled down).
    d.admin_down(peer, true);
    wait_for(T, &format!("{what}: the peer sees AdminDown"), || {
        (!peer_up()).then_some(())
    });
    d.admin_down(peer, false);
    wait_for(T, &format!("{what}: back Up after AdminDown"), || {
        (d.state(peer) == "Up" && peer_up()).then_some(())
    });
}

fn bird_session_up(b: &Bird, addr: &str) -> bool {
    b.birdc("show bfd sessions")
        .lines()
        .any(|l| l.split_whitespace().next() == Some(addr) && l.contains(" Up "))
}

/// BIRD 2's `bfd` protocol with static neighbors (its documentation's `neighbor` option).
#[test]
fn bfd_with_bird_ipv4_and_ipv6() {
    let (s, p) = pair("bb");
    let bird = Bird::start(
        &p,
        r#"router id 10.213.0.1;
protocol device { }
protocol bfd {
  interface "p0" { min rx interval 300 ms; min tx interval 300 ms; multiplier 3; };
  neighbor 10.213.0.2;
  neighbor fd00:213::2;
}
"#,
    );
    let mut d = SepalBfdd::start(&s, false);
    d.peer(serde_json::json!({"address": "10.213.0.1", "local": "10.213.0.2"}));
    d.peer(serde_json::json!({"address": "fd00:213::1", "local": "fd00:213::2"}));
    exercise(&mut d, &s, "10.213.0.1", "BIRD IPv4", &|| {
        bird_session_up(&bird, "10.213.0.2")
    });
    exercise(&mut d, &s, "fd00:213::1", "BIRD IPv6", &|| {
        bird_session_up(&bird, "fd00:213::2")
    });
}

/// FRR's bfdd with the peers of its documentation (`peer ADDR local-address ADDR` with
/// receive and transmit intervals).
#[test]
fn bfd_with_frr_bfdd_ipv4_and_ipv6() {
    let (s, p) = pair("bf");
    let frr = FrrBfdd::start(
        &p,
        "bfd\n peer 10.213.0.2 local-address 10.213.0.1\n  receive-interval 300\n  transmit-interval 300\n  detect-multiplier 3\n !\n \
         peer fd00:213::2 local-address fd00:213::1\n  receive-interval 300\n  transmit-interval 300\n !\n!\n",
    );
    let mut d = SepalBfdd::start(&s, true);
    d.peer(serde_json::json!({"address": "10.213.0.1", "local": "10.213.0.2"}));
    d.peer(serde_json::json!({"address": "fd00:213::1", "local": "fd00:213::2"}));
    let up = |addr: &str| frr.peer(addr)["status"] == "up";
    exercise(&mut d, &s, "10.213.0.1", "FRR IPv4", &|| up("10.213.0.2"));
    // FRR learned Sepal's discriminator.
    let seen = frr.peer("10.213.0.2");
    assert_eq!(
        seen["remote-id"],
        d.session("10.213.0.1").unwrap()["local_discriminator"],
        "{seen}"
    );
    exercise(&mut d, &s, "fd00:213::1", "FRR IPv6", &|| up("fd00:213::2"));
    // FRR's own administrative down reaches Sepal as the peer's AdminDown. The IPv6 checks
    // silenced IPv4's session too: it must be back Up first.
    wait_for(T, "the IPv4 session Up again", || {
        (d.state("10.213.0.1") == "Up" && up("10.213.0.2")).then_some(())
    });
    let peer_cfg = ["bfd", "peer 10.213.0.2 local-address 10.213.0.1"];
    frr.configure(&[peer_cfg[0], peer_cfg[1], "shutdown"]);
    wait_for(T, "Sepal follows FRR's shutdown", || {
        (d.state("10.213.0.1") == "Down").then_some(())
    });
    let st = d.session("10.213.0.1").unwrap();
    assert_eq!(st["remote_state"], "AdminDown", "{st}");
    assert_eq!(st["diag"], "NeighborSignaledDown", "{st}");
    frr.configure(&[peer_cfg[0], peer_cfg[1], "no shutdown"]);
    wait_for(T, "back Up after FRR's no shutdown", || {
        (d.state("10.213.0.1") == "Up" && up("10.213.0.2")).then_some(())
    });
}
