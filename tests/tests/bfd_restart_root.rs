//! BFD and graceful restart together, through the real agent and `sepal bfd`: two nodes, each
//! with its own AS on a link to a ToR (the peering guide's configuration plus BFD: FRR's bgpd,
//! bfdd and zebra with `neighbor ... bfd`, or BIRD with a `bfd` protocol and `bfd on`), BFD on
//! every BGPPeer and run by `sepal bfd` beside each agent. An agent killed with SIGKILL and started again costs no packet between pods on
//! the two nodes: BFD stays Up (the daemon lives on, and says so with the C bit), so the ToR
//! treats the lost BGP session as a restart and keeps the node's routes. A node that goes silent
//! instead (every packet in or out dropped, links up) loses its BFD session, and its block is
//! gone from the ToR's kernel and from the other node's within a second.

use sepal_tests::routing as common;

use common::{routes_via_tor, tor_cluster_with, TorDaemon, TorKind};
use sepal_tests::bgpd::wait_for;
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

/// The ToR's BFD session with `peer`, as FRR's bfdd (JSON) or BIRD (its table line) shows it.
fn tor_bfd_session(tor: &TorDaemon, peer: &str) -> Value {
    match tor {
        TorDaemon::Frr(f) => {
            let all: Value = serde_json::from_str(&f.vtysh_daemon("bfdd", "show bfd peers json"))
                .unwrap_or_default();
            all.as_array()
                .and_then(|v| v.iter().find(|p| p["peer"] == peer).cloned())
                .unwrap_or_default()
        }
        TorDaemon::Bird(b) => b
            .birdc("show bfd sessions")
            .lines()
            .find(|l| l.split_whitespace().next() == Some(peer))
            .map(|l| Value::String(l.to_string()))
            .unwrap_or_default(),
        TorDaemon::Gobgp(..) => unreachable!("GoBGP has no BFD"),
    }
}

/// Whether the ToR's BFD session is the same one after as before, and Up.
fn same_session_up(before: &Value, after: &Value) -> bool {
    match (before, after) {
        // FRR: the node's discriminator unchanged, up since before the restart (8 s of ping).
        (Value::Object(_), Value::Object(_)) => {
            after["status"] == "up"
                && after["remote-id"] == before["remote-id"]
                && after["uptime"].as_u64().unwrap_or(0) >= 8
        }
        // BIRD: `IP  Interface  State  Since ...`: Up, and Since unchanged.
        (Value::String(b), Value::String(a)) => {
            let f = |l: &str| {
                l.split_whitespace()
                    .skip(2)
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            a.split_whitespace().nth(2) == Some("Up") && f(a) == f(b)
        }
        _ => false,
    }
}

/// The ToR's BFD sessions and log, for failure messages.
fn tor_bfd_log(tor: &TorDaemon) -> String {
    match tor {
        TorDaemon::Frr(f) => f.vtysh_daemon("bfdd", "show bfd peers"),
        TorDaemon::Bird(b) => format!(
            "{}\n{}\n{}",
            b.birdc("show bfd sessions"),
            b.birdc("show protocols all n0"),
            b.log()
        ),
        TorDaemon::Gobgp(..) => unreachable!("GoBGP has no BFD"),
    }
}

/// Why the ToR last took its session with n0 down.
fn tor_reset_reason(tor: &TorDaemon) -> String {
    match tor {
        TorDaemon::Frr(f) => {
            let n: Value = serde_json::from_str(&f.vtysh("show bgp neighbors 10.0.0.2 json"))
                .unwrap_or_default();
            n["10.0.0.2"]["lastNotificationReason"]
                .as_str()
                .unwrap_or("")
                .to_string()
        }
        TorDaemon::Bird(b) => b.birdc("show protocols all n0"),
        TorDaemon::Gobgp(..) => unreachable!("GoBGP has no BFD"),
    }
}

fn scenario(kind: TorKind) {
    let (mut c, tor, daemon) = tor_cluster_with(2, kind, "", true);
    for n in &mut c.nodes {
        n.start_bfd_daemon();
    }
    c.start();
    let p0 = c.pod(0, "p0");
    let p1 = c.pod(1, "p1");
    wait_for(T, "each node routes the other's block via the ToR", || {
        (routes_via_tor(&c, 0, 1) && routes_via_tor(&c, 1, 0)).then_some(())
    });
    if common::within(T, || daemon.bfd_sessions_up() == 2).is_none() {
        panic!(
            "the ToR's BFD sessions with both nodes not Up in {T:?}:\n{}\nsepal bfd on n0:\n{}",
            tor_bfd_log(&daemon),
            c.nodes[0].bfd_daemon_log()
        );
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
    let before = tor_bfd_session(&daemon, "10.0.0.2");
    let summary = c.restart_agent_under_ping(0, &p1.netns, &p0.ip);
    assert!(
        summary.contains(" 0% packet loss"),
        "agent restart under BFD lost packets: {summary}\nToR:\n{}\nn0:\n{}",
        daemon.log(),
        c.nodes[0].agent_log()
    );
    let after = tor_bfd_session(&daemon, "10.0.0.2");
    assert!(
        same_session_up(&before, &after),
        "the ToR's BFD session with n0 went down: {before} -> {after}\nsepal bfd:\n{}",
        c.nodes[0].bfd_daemon_log()
    );
    eprintln!("{kind:?}: agent kill -9 and restart with BFD in sepal bfd: {summary}");
    wait_for(T, "n0's BGP session back", || {
        daemon.established(0).then_some(())
    });
    // The restarted agent sees the daemon's session too.
    wait_for(T, "n0's restarted agent shows BFD Up", || {
        (c.nodes[0].status_json()["bgp"]["bfd"][0]["state"] == "Up").then_some(())
    });

    // Silent: the ToR's BFD takes the session down, the ToR withdraws the block from its
    // kernel and from n1. Both watched in one loop, so each time is off by one query at most.
    let (tor_gone, n1_gone) = common::silence_node0(&c, &tor, Duration::from_secs(10));
    let tor_gone = tor_gone.expect("the ToR kept n0's block for 10 s");
    let n1_gone = n1_gone.expect("n1 kept n0's block for 10 s");
    eprintln!("{kind:?}, silent node: its block gone from the ToR's kernel after {tor_gone:?}, from n1's after {n1_gone:?}");
    assert!(tor_gone < Duration::from_millis(1500), "ToR: {tor_gone:?}");
    assert!(n1_gone < Duration::from_millis(1500), "n1: {n1_gone:?}");
    // BFD, not the hold timer (3 s), took the session down.
    let reason = tor_reset_reason(&daemon);
    assert!(
        reason == "Cease/BFD Down" || reason.contains("BFD session down"),
        "{reason}"
    );

    // BFD turned off while n1's agent is down: the agent that starts tells `sepal bfd` so,
    // though it wants no BFD session at all, and the daemon ends the one the previous agent
    // asked for (AdminDown) instead of keeping it Up at the ToR.
    assert!(
        tor_bfd_up(&tor_bfd_session(&daemon, "10.0.1.2")),
        "{}",
        tor_bfd_log(&daemon)
    );
    c.nodes[1].kill_agent();
    std::fs::write(
        c.nodes[1].datastore.join("routing.yaml"),
        common::tor_objects_with(2, "", ""),
    )
    .unwrap();
    c.nodes[1].start_agent();
    if common::within(T, || !tor_bfd_up(&tor_bfd_session(&daemon, "10.0.1.2"))).is_none() {
        panic!(
            "the ToR's BFD session with n1 still Up after its agent restarted without BFD:\n{}\nsepal bfd on n1:\n{}",
            tor_bfd_log(&daemon),
            c.nodes[1].bfd_daemon_log()
        );
    }
}

/// Whether the ToR shows its BFD session Up.
fn tor_bfd_up(session: &Value) -> bool {
    match session {
        Value::Object(_) => session["status"] == "up",
        Value::String(l) => l.split_whitespace().nth(2) == Some("Up"),
        _ => false,
    }
}

#[test]
fn with_frr_an_agent_restart_costs_no_packet_and_a_silent_node_goes_within_a_second() {
    scenario(TorKind::Frr);
}

#[test]
fn with_bird_an_agent_restart_costs_no_packet_and_a_silent_node_goes_within_a_second() {
    scenario(TorKind::Bird);
}
