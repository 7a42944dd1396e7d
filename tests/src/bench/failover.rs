//! `sepal-bench failover [--runs N]`: how fast a dead node leaves the fabric, and what an agent
//! restart costs, on two nodes peering with a ToR, FRR then BIRD (the peering guide's
//! configurations, hold time 3 s), through the real agents.
//!
//! - A node goes silent (every packet on its uplink dropped, links up): the time until its block
//!   is gone from the ToR's kernel and from the other node's, with BFD (300 ms × 3, in
//!   `sepal bfd`) and without (the hold timer). The later of the two is the figure.
//! - An agent is killed (SIGKILL) and started again 1.5 s later under a ping of 100 packets a
//!   second between pods on the two nodes: packets lost with BFD in `sepal bfd`, and, as the
//!   reference, with BFD inside the agent (where the peer takes the restart for a failure).

use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::json;

use crate::bgpd::wait_for;
use crate::routing::{
    routes_via_tor, silence_node0, tor_cluster_with, Cluster, TorDaemon, TorKind,
};

const T: Duration = Duration::from_secs(60);

/// How BFD runs in one setup.
#[derive(Clone, Copy, PartialEq)]
enum Bfd {
    Off,
    InAgent,
    Daemon,
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    let mut runs = 3usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--runs" => runs = it.next().context("--runs N")?.parse()?,
            other => bail!("unknown option {other:?} (usage: sepal-bench failover [--runs N])"),
        }
    }
    crate::require_root();
    let mut result = serde_json::Map::new();
    let (mut worst_bfd, mut worst_no_bfd, mut worst_loss) = (0, 0, 0);
    for kind in [TorKind::Frr, TorKind::Bird] {
        let name = format!("{kind:?}").to_lowercase();
        let (mut bfd_ms, mut no_bfd_ms, mut loss, mut loss_in_agent) =
            (vec![], vec![], vec![], vec![]);
        for run in 1..=runs {
            let (restart, silent) = scenario(kind, Bfd::Daemon);
            println!("{name} run {run}, BFD in sepal bfd: restart lost {restart} packets, silent node gone in {silent} ms");
            loss.push(restart);
            bfd_ms.push(silent);
            let (restart, _) = scenario(kind, Bfd::InAgent);
            println!("{name} run {run}, BFD in the agent: restart lost {restart} packets");
            loss_in_agent.push(restart);
            let (_, silent) = scenario(kind, Bfd::Off);
            println!("{name} run {run}, no BFD: silent node gone in {silent} ms (hold time 3 s)");
            no_bfd_ms.push(silent);
        }
        println!(
            "{name}: silent node withdrawn with BFD in {} ms (runs {}), without in {} ms (runs \
             {}); an agent restart lost {} packets with sepal bfd (runs {}), {} with BFD in the \
             agent (runs {})",
            median(&bfd_ms),
            spread(&bfd_ms),
            median(&no_bfd_ms),
            spread(&no_bfd_ms),
            median(&loss),
            spread(&loss),
            median(&loss_in_agent),
            spread(&loss_in_agent),
        );
        worst_bfd = worst_bfd.max(median(&bfd_ms));
        worst_no_bfd = worst_no_bfd.max(median(&no_bfd_ms));
        worst_loss = worst_loss.max(*loss.iter().max().unwrap_or(&0));
        result.insert(format!("{name}_bfd_ms"), json!(median(&bfd_ms)));
        result.insert(format!("{name}_no_bfd_ms"), json!(median(&no_bfd_ms)));
        result.insert(
            format!("{name}_agent_restart_loss_bfd_in_agent"),
            json!(median(&loss_in_agent)),
        );
    }
    // The headline figures are the worse ToR's.
    result.insert("bfd_ms".into(), json!(worst_bfd));
    result.insert("no_bfd_ms".into(), json!(worst_no_bfd));
    result.insert(
        "bfd_ratio".into(),
        json!(worst_bfd as f64 / worst_no_bfd.max(1) as f64),
    );
    result.insert("agent_restart_loss".into(), json!(worst_loss));
    result.insert("hold_time_s".into(), json!(crate::routing::HOLD.as_secs()));
    result.insert("runs".into(), json!(runs));
    println!("{}", serde_json::Value::Object(result));
    Ok(())
}

fn median(v: &[u64]) -> u64 {
    let mut v = v.to_vec();
    v.sort_unstable();
    v[v.len() / 2]
}

fn spread(v: &[u64]) -> String {
    format!(
        "{}-{}",
        v.iter().min().unwrap_or(&0),
        v.iter().max().unwrap_or(&0)
    )
}

/// One cluster: packets lost across an agent restart, then ms until a silent node is gone.
fn scenario(kind: TorKind, bfd: Bfd) -> (u64, u64) {
    let (mut c, tor, daemon) = tor_cluster_with(2, kind, "", bfd != Bfd::Off);
    if bfd == Bfd::Daemon {
        for n in &mut c.nodes {
            n.start_bfd_daemon();
        }
    }
    c.start();
    let p0 = c.pod(0, "p0");
    let p1 = c.pod(1, "p1");
    wait_for(T, "each node routes the other's block via the ToR", || {
        (routes_via_tor(&c, 0, 1) && routes_via_tor(&c, 1, 0)).then_some(())
    });
    if bfd != Bfd::Off {
        wait_for(T, "both BFD sessions Up", || bfd_up(&daemon).then_some(()));
    }
    let lost = restart_loss(&mut c, &p1.netns, &p0.ip);
    wait_for(T, "the ToR's session with n0 back", || {
        daemon.established(0).then_some(())
    });
    wait_for(T, "n1 routes n0's block again", || {
        routes_via_tor(&c, 1, 0).then_some(())
    });
    if bfd != Bfd::Off {
        wait_for(T, "both BFD sessions Up again", || {
            bfd_up(&daemon).then_some(())
        });
    }
    // Sessions settled, so the silence is the only event.
    std::thread::sleep(Duration::from_secs(2));
    let (tor_gone, n1_gone) = silence_node0(&c, &tor, Duration::from_secs(30));
    let gone = tor_gone
        .max(n1_gone)
        .expect("n0's block still routed 30 s after it went silent");
    (lost, gone.as_millis() as u64)
}

fn bfd_up(daemon: &TorDaemon) -> bool {
    daemon.bfd_sessions_up() == 2
}

/// Packets lost by a 100-a-second ping from `from` to `to` while node 0's agent is killed and,
/// 1.5 s later, started again.
fn restart_loss(c: &mut Cluster, from: &crate::netns::Netns, to: &str) -> u64 {
    let text = c.restart_agent_under_ping_every(0, from, to, "0.01", 600);
    // "600 packets transmitted, 598 received, ..."
    let summary = text
        .lines()
        .find(|l| l.contains("transmitted"))
        .unwrap_or_default();
    let field = |word: &str| -> u64 {
        summary
            .split(',')
            .find(|p| p.contains(word))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    field("transmitted").saturating_sub(field("received"))
}
