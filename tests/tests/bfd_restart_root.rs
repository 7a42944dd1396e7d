//! BFD and graceful restart together, through the real agent and `sepal bfd`: two nodes, each
//! with its own AS on a link to an FRR ToR (bgpd, bfdd, zebra; the peering guide's
//! configuration with `neighbor ... bfd`), BFD on every BGPPeer and run by `sepal bfd` beside
//! each agent. An agent killed with SIGKILL and started again costs no packet between pods on
//! the two nodes: BFD stays Up (the daemon lives on, and says so with the C bit), so FRR treats
//! the lost BGP session as a restart and keeps the node's routes. A node that goes silent
//! instead (every packet in or out dropped, links up) loses its BFD session, and its block is
//! gone from the ToR's kernel and from the other node's within a second.

use sepal_tests::routing as common;

use common::{cut_off, routes_via_tor, tor_cluster_with, TorDaemon, TorKind};
use sepal_tests::bgpd::wait_for;
use serde_json::Value;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);

/// FRR's bfdd view of its session with `peer`.
fn frr_bfd_peer(tor: &TorDaemon, peer: &str) -> Value {
    let TorDaemon::Frr(f) = tor else {
        unreachable!("FRR ToR")
    };
    let all: Value =
        serde_json::from_str(&f.vtysh_daemon("bfdd", "show bfd peers json")).unwrap_or_default();
    all.as_array()
        .and_then(|v| v.iter().find(|p| p["peer"] == peer).cloned())
        .unwrap_or_default()
}

#[test]
fn agent_restart_costs_no_packet_and_a_silent_node_goes_within_a_second() {
    let (mut c, tor, daemon) = tor_cluster_with(2, TorKind::Frr, "", true);
    for n in &mut c.nodes {
        n.start_bfd_daemon();
    }
    c.start();
    let p0 = c.pod(0, "p0");
    let p1 = c.pod(1, "p1");
    wait_for(T, "each node routes the other's block via the ToR", || {
        (routes_via_tor(&c, 0, 1) && routes_via_tor(&c, 1, 0)).then_some(())
    });
    for i in 0..2 {
        let addr = format!("10.0.{i}.2");
        wait_for(T, "FRR's BFD session with each node Up", || {
            (frr_bfd_peer(&daemon, &addr)["status"] == "up").then_some(())
        });
    }
    // The node's side: Up, and control-plane independent on its end.
    let st = wait_for(T, "n0's BFD session Up in `sepal status`", || {
        let st = c.nodes[0].status_json();
        (st["bgp"]["bfd"][0]["state"] == "Up").then_some(st)
    });
    let b = &st["bgp"]["bfd"][0];
    assert_eq!(b["control_plane_independent"], true, "{st}");
    assert_eq!(b["peer"], "10.0.0.1", "{st}");
    let text = c.nodes[0].admin(&["status"]);
    assert!(text.contains("C BIT") && text.contains("1/0"), "{text}");

    // Killed and restarted under a ping from a pod on the other node: BGP drops for 1.5 s,
    // longer than BFD's detection time (0.9 s), and no packet is lost.
    let before = frr_bfd_peer(&daemon, "10.0.0.2");
    let summary = c.restart_agent_under_ping(0, &p1.netns, &p0.ip);
    assert!(
        summary.contains(" 0% packet loss"),
        "agent restart under BFD lost packets: {summary}\nToR:\n{}\nn0:\n{}",
        daemon.log(),
        c.nodes[0].agent_log()
    );
    let after = frr_bfd_peer(&daemon, "10.0.0.2");
    assert_eq!(after["status"], "up", "{after}");
    // The same session all along: same discriminators, up longer than the restart took.
    assert_eq!(
        after["remote-id"],
        before["remote-id"],
        "{before} {after}\nsepal bfd:\n{}\nn0:\n{}",
        c.nodes[0].bfd_daemon_log(),
        c.nodes[0].agent_log()
    );
    assert!(
        after["uptime"].as_u64().unwrap_or(0) >= 8,
        "FRR's BFD session with n0 restarted: {before} -> {after}"
    );
    eprintln!("agent kill -9 and restart with BFD in sepal bfd: {summary}");
    wait_for(T, "n0's BGP session back", || {
        daemon.established(0).then_some(())
    });
    // The restarted agent sees the daemon's session too.
    wait_for(T, "n0's restarted agent shows BFD Up", || {
        (c.nodes[0].status_json()["bgp"]["bfd"][0]["state"] == "Up").then_some(())
    });

    // Silent: the ToR's BFD takes the session down, the ToR withdraws the block from its
    // kernel and from n1. Both watched in one loop, so each time is off by one query at most.
    cut_off(&c.nodes[0].netns);
    let cut = Instant::now();
    let (mut tor_gone, mut n1_gone) = (None, None);
    while (tor_gone.is_none() || n1_gone.is_none()) && cut.elapsed() < Duration::from_secs(10) {
        if tor_gone.is_none() && tor.run("ip route show 10.244.0.0/24").trim().is_empty() {
            tor_gone = Some(cut.elapsed());
        }
        if n1_gone.is_none() && c.route(1, "10.244.0.0/24").is_empty() {
            n1_gone = Some(cut.elapsed());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let tor_gone = tor_gone.expect("the ToR kept n0's block for 10 s");
    let n1_gone = n1_gone.expect("n1 kept n0's block for 10 s");
    eprintln!("silent node: its block gone from the ToR's kernel after {tor_gone:?}, from n1's after {n1_gone:?}");
    assert!(tor_gone < Duration::from_millis(1500), "ToR: {tor_gone:?}");
    assert!(n1_gone < Duration::from_millis(1500), "n1: {n1_gone:?}");
    let TorDaemon::Frr(f) = &daemon else {
        unreachable!()
    };
    let n: Value =
        serde_json::from_str(&f.vtysh("show bgp neighbors 10.0.0.2 json")).unwrap_or_default();
    // BFD, not the hold timer (3 s), took the session down.
    let reason = n["10.0.0.2"]["lastNotificationReason"]
        .as_str()
        .unwrap_or("");
    assert_eq!(reason, "Cease/BFD Down", "{n}");
}
