//! Routing end to end through a top-of-rack router that runs BIRD 2, FRR or GoBGP: 3 nodes with
//! their own AS peer with it over eBGP with TCP MD5 (the mesh off); the ToR learns exactly the
//! node blocks, pods reach each other through it, and its default route is refused.

#[path = "routing/common.rs"]
mod common;

use common::{pings, tor_cluster, TorKind};
use std::time::{Duration, Instant};

fn scenario(kind: TorKind) {
    let (mut c, tor, daemon) = tor_cluster(3, kind);
    c.start();
    let p0 = c.pod(0, "p0");
    let p2 = c.pod(2, "p2");

    // The ToR learns exactly the node blocks (no pod /32s, nothing else).
    let want = vec!["10.244.0.0/24", "10.244.1.0/24", "10.244.2.0/24"];
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
    if kind != TorKind::Bird {
        // bgpd runs without zebra and GoBGP has no FIB: the ToR's kernel gets what it learned by hand.
        for (i, prefix) in want.iter().enumerate() {
            tor.run(&format!("ip route replace {prefix} via 10.0.{i}.2"));
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
    // The ToR's default route is refused by default: no protocol-83 default anywhere.
    for i in 0..3 {
        assert_eq!(
            c.route(i, "default"),
            "",
            "node n{i} installed the ToR's default route"
        );
    }
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
