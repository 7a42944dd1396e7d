//! ToR and peer faults, end to end (root): dual-stack nodes with their own AS peering over eBGP
//! with TCP MD5 with one top-of-rack router running the configuration of docs/peering/ (see
//! routing_tor_root.rs for the healthy case).
//! - The ToR's routing daemon crashes (kill -9) and comes back with the same configuration while
//!   a node disappears for good: the survivors relearn each other's blocks and keep no stale
//!   route to the vanished node (BIRD and FRR).
//! - One node's session flaps 10 times in under a minute while another node goes for good: every
//!   node ends with exactly the live nodes' blocks, and so does the ToR (BIRD and FRR).
//! - A node re-advertises neither another node's block nor the ToR's routes: an independent
//!   listener, a second BGP peer of one node, receives exactly that node's blocks.
//! - The ToR's default route is installed only where a BGPPeer's import policy allows it, and
//!   goes from the kernel when the policy is changed back, without a restart.

use sepal_tests::routing as common;

use common::{
    assert_reach, blocks, cut_off, pings, routes_via_tor, tor_cluster, tor_objects, within,
    Cluster, TorDaemon, TorKind,
};
use sepal_tests::netns::Netns;
use std::time::{Duration, Instant};

/// The blocks of the nodes `of`, sorted.
fn blocks_of(of: &[usize]) -> Vec<String> {
    let mut all: Vec<String> = of.iter().flat_map(|i| blocks(*i)).collect();
    all.sort();
    all
}

/// Destinations of the gateway routes of protocol 83 on node `i` (what BGP installed: the
/// agent's own pod and blackhole routes have no gateway), IPv4 then IPv6, in kernel order and
/// with repeats kept.
fn bgp_routes(c: &Cluster, i: usize) -> Vec<String> {
    let out = c.nodes[i]
        .netns
        .run("ip -4 route show proto 83; ip -6 route show proto 83");
    gateway_routes(&out)
}

/// The destinations of the routes with a gateway (one line, or a multipath route's `nexthop`
/// lines) in `ip route show` output.
fn gateway_routes(out: &str) -> Vec<String> {
    let mut routes: Vec<(String, bool)> = Vec::new();
    for line in out.lines() {
        if line.starts_with(char::is_whitespace) {
            if let Some(last) = routes.last_mut() {
                last.1 |= line.contains("via ");
            }
        } else if let Some(dst) = line.split_whitespace().next() {
            let dst = if dst == "default" && line.contains(':') {
                "::/0"
            } else if dst == "default" {
                "0.0.0.0/0"
            } else {
                dst
            };
            routes.push((dst.to_string(), line.contains(" via ")));
        }
    }
    routes
        .into_iter()
        .filter(|(_, via)| *via)
        .map(|(d, _)| d)
        .collect()
}

/// The ToR's kernel routes inside the pod ranges (whoever installed them), sorted.
fn tor_kernel(tor: &Netns) -> Vec<String> {
    let out = tor.run("ip -4 route show root 10.244.0.0/16; ip -6 route show root fd10:244::/32");
    let mut r: Vec<String> = out
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    r.sort();
    r
}

/// Whether node `i`'s BGP routes are exactly the blocks of the nodes `of`, each once.
fn has_exactly(c: &Cluster, i: usize, of: &[usize]) -> bool {
    routes_are(c, i, &blocks_of(of))
}

/// Whether node `i`'s BGP routes are exactly `want` (sorted), each once.
fn routes_are(c: &Cluster, i: usize, want: &[String]) -> bool {
    let mut got = bgp_routes(c, i);
    got.sort();
    got == want
}

/// Node `i` has no route at all to node `j`'s blocks.
fn no_route(c: &Cluster, i: usize, j: usize) -> bool {
    blocks(j).iter().all(|b| c.route(i, b).is_empty())
}

/// Everything in the agents' and the ToR's logs, for failure messages.
fn logs(c: &Cluster, daemon: &TorDaemon) -> String {
    let mut s: Vec<String> = c
        .nodes
        .iter()
        .map(|n| format!("--- {}:\n{}", n.name, n.agent_log()))
        .collect();
    s.push(format!("--- ToR:\n{}", daemon.log()));
    s.join("\n")
}

/// Waits until the ToR and the nodes `live` have converged on the blocks of `live`: the ToR has
/// learned exactly them and has them in its kernel, and each node has exactly the others' blocks
/// via the ToR. Returns how long it took; panics with the logs after `timeout`.
fn wait_converged(
    c: &Cluster,
    tor: &Netns,
    daemon: &TorDaemon,
    live: &[usize],
    timeout: Duration,
) -> Duration {
    let want = blocks_of(live);
    let done = within(timeout, || {
        daemon.learned() == want
            && tor_kernel(tor) == want
            && live.iter().all(|&i| {
                let others: Vec<usize> = live.iter().copied().filter(|&j| j != i).collect();
                has_exactly(c, i, &others) && others.iter().all(|&j| routes_via_tor(c, i, j))
            })
    });
    done.unwrap_or_else(|| {
        let nodes: Vec<String> = live
            .iter()
            .map(|&i| format!("n{i}: {:?}", bgp_routes(c, i)))
            .collect();
        panic!(
            "not converged on {want:?} after {timeout:?}: ToR learned {:?}, ToR kernel {:?}, {}\n{}",
            daemon.learned(),
            tor_kernel(tor),
            nodes.join(", "),
            logs(c, daemon)
        )
    })
}

/// Polls every 50 ms until each condition has held once, or `timeout` passes; returns when each
/// first held, measured from the call, or the names of those that never did.
fn first_held(
    timeout: Duration,
    conds: &mut [(&str, &mut dyn FnMut() -> bool)],
) -> Result<Vec<Duration>, Vec<String>> {
    let start = Instant::now();
    let mut when = vec![None; conds.len()];
    loop {
        for (w, (_, f)) in when.iter_mut().zip(conds.iter_mut()) {
            if w.is_none() && f() {
                *w = Some(start.elapsed());
            }
        }
        if when.iter().all(Option::is_some) {
            return Ok(when.into_iter().flatten().collect());
        }
        if start.elapsed() > timeout {
            return Err(conds
                .iter()
                .zip(&when)
                .filter(|(_, w)| w.is_none())
                .map(|((name, _), _)| name.to_string())
                .collect());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long a helper keeps a restarting peer's routes at most: the restart time the ToRs of
/// docs/peering/ announce (BIRD's and FRR's default).
const TOR_RESTART_TIME: Duration = Duration::from_secs(120);

/// The ToR's routing daemon crashes (kill -9 of BIRD, or of FRR's bgpd and zebra) and is started
/// again with the same configuration; while it is down, n1 disappears for good. Meanwhile n0 and
/// n2 keep the ToR's routes (graceful-restart helpers) and their pods reach each other; once the
/// ToR is back they route each other through it again, have no route left to n1's blocks, the
/// ToR has learned and installed exactly their blocks, and pods reach each other (IPv4, IPv6).
fn tor_restart(kind: TorKind) {
    let (mut c, tor, mut daemon) = tor_cluster(3, kind, "");
    c.start();
    let p0 = c.pod(0, "p0");
    let p2 = c.pod(2, "p2");
    let t = wait_converged(&c, &tor, &daemon, &[0, 1, 2], Duration::from_secs(30));
    eprintln!("{kind:?}: converged after {t:?}");
    assert_reach(&p0, &p2, &format!("{kind:?}, before the crash"));

    daemon.kill9();
    let crashed = Instant::now();
    // n1 goes for good: cut off first, so that not even the close of its sockets gets out,
    // then its agent killed.
    cut_off(&c.nodes[1].netns);
    c.nodes[1].kill_agent();
    // The survivors are graceful-restart helpers of the ToR: they keep its routes (stale), n1's
    // blocks among them, and the ToR's kernel keeps forwarding meanwhile.
    for (i, j) in [(0, 1), (0, 2), (2, 0), (2, 1)] {
        assert!(
            routes_via_tor(&c, i, j),
            "{kind:?}: n{i} dropped n{j}'s blocks while the ToR was down: {:?}\n{}",
            bgp_routes(&c, i),
            logs(&c, &daemon)
        );
    }
    assert!(
        pings(&p0.netns, &p2.ip),
        "{kind:?}: pod n0 -> pod n2 while the ToR's daemon was down"
    );
    std::thread::sleep(Duration::from_millis(500));
    daemon.restart();
    let down = crashed.elapsed();

    let (c_ref, d_ref) = (&c, &daemon);
    let n1_gone = || no_route(c_ref, 0, 1) && no_route(c_ref, 2, 1);
    let when = first_held(
        Duration::from_secs(60),
        &mut [
            ("n0's session up", &mut || d_ref.established(0)),
            ("n2's session up", &mut || d_ref.established(2)),
            ("n1's blocks gone from n0 and n2", &mut || n1_gone()),
            (
                "n0 and n2 route each other via the ToR (and n1's blocks gone)",
                &mut || n1_gone() && routes_via_tor(c_ref, 0, 2) && routes_via_tor(c_ref, 2, 0),
            ),
            ("the ToR learned exactly n0's and n2's blocks", &mut || {
                d_ref.learned() == blocks_of(&[0, 2])
            }),
            ("the ToR's kernel has exactly n0's and n2's blocks", &mut || {
                tor_kernel(&tor) == blocks_of(&[0, 2])
            }),
        ],
    )
    .map(|mut when| {
        // Polled in turn: the fourth condition holding means the third did.
        when[2] = when[2].min(when[3]);
        when
    })
    .unwrap_or_else(|missing| {
        panic!(
            "{kind:?} restarted: not within 60 s: {missing:?}: n0 {:?}, n2 {:?}, ToR learned {:?}, ToR kernel {:?}\n{}",
            bgp_routes(&c, 0),
            bgp_routes(&c, 2),
            daemon.learned(),
            tor_kernel(&tor),
            logs(&c, &daemon)
        )
    });
    eprintln!(
        "{kind:?} ToR down {down:?} (pods reached each other meanwhile); after its restart (polled): \
         sessions up {:?} / {:?}, n1's stale blocks gone {:?}, survivors routed again {:?}, ToR learned \
         {:?}, ToR kernel clean {:?}",
        when[0],
        when[1],
        when[2],
        when[3],
        when[4],
        when[5]
    );
    // The restarted ToR does not claim to have preserved its forwarding state (the Forwarding
    // State bits of its graceful-restart capability are clear: BIRD without -R, FRR without
    // preserve-fw-state; FRR sets the Restart bit), so RFC 4724 §4.2 has the helpers drop its
    // stale routes as soon as the session is back: not at its End-of-RIB, and long before the
    // restart time would end.
    let (gone, up) = (when[2], when[0].max(when[1]));
    assert!(
        gone < TOR_RESTART_TIME / 4 && gone <= up + Duration::from_secs(5),
        "{kind:?}: n1's stale blocks went {gone:?} after the restart, the sessions were up after {up:?}"
    );
    // And nothing else: the final state, all at once.
    assert!(has_exactly(&c, 0, &[2]), "n0: {:?}", bgp_routes(&c, 0));
    assert!(has_exactly(&c, 2, &[0]), "n2: {:?}", bgp_routes(&c, 2));
    assert_eq!(daemon.learned(), blocks_of(&[0, 2]));
    assert_eq!(tor_kernel(&tor), blocks_of(&[0, 2]));
    assert_reach(&p0, &p2, &format!("{kind:?}, after its restart"));
}

#[test]
fn tor_restart_bird() {
    tor_restart(TorKind::Bird);
}

#[test]
fn tor_restart_frr() {
    tor_restart(TorKind::Frr);
}

/// Takes the ToR's session with node `i` down (administratively: the ToR sends a Cease) or
/// brings it back.
fn set_session(daemon: &TorDaemon, i: usize, up: bool) {
    let out = match daemon {
        TorDaemon::Bird(b) => b.birdc(&format!("{} n{i}", if up { "enable" } else { "disable" })),
        TorDaemon::Frr(f) => f.configure(&[
            &format!("router bgp {}", common::TOR_AS),
            &format!(
                "{}neighbor 10.0.{i}.2 shutdown",
                if up { "no " } else { "" }
            ),
        ]),
        TorDaemon::Gobgp(..) => unimplemented!("flaps through GoBGP"),
    };
    assert!(
        !out.contains("rror") && !out.contains("Unknown"),
        "session with n{i} {}: {out}",
        if up { "up" } else { "down" }
    );
}

/// Which incarnation of the ToR's session with node `i` is up: changes with every new session.
fn session_id(daemon: &TorDaemon, i: usize) -> String {
    match daemon {
        // `n1  BGP  ---  up  16:16:06.142  Established`: the time it came up.
        TorDaemon::Bird(b) => b
            .birdc(&format!("show protocols n{i}"))
            .lines()
            .find(|l| l.starts_with(&format!("n{i} ")))
            .unwrap_or_default()
            .to_string(),
        TorDaemon::Frr(f) => {
            let addr = format!("10.0.{i}.2");
            let v: serde_json::Value =
                serde_json::from_str(&f.vtysh(&format!("show bgp neighbors {addr} json")))
                    .unwrap_or_default();
            v[&addr]["connectionsEstablished"].to_string()
        }
        TorDaemon::Gobgp(..) => unimplemented!("flaps through GoBGP"),
    }
}

/// n1's session with the ToR flaps 10 times in under a minute, one flap in two an
/// administrative shutdown by the ToR (a Cease: n1 drops the ToR's routes) and the other a reset
/// of the TCP connection (no NOTIFICATION: both sides keep the other's routes as stale, as
/// graceful-restart helpers, until the session is back). Half-way, while n1's session is down
/// after a reset, n2's agent stops for good: the ToR withdraws n2's blocks from everyone but n1,
/// which must drop them, stale, when its session comes back.
fn flaps(kind: TorKind) {
    let (mut c, tor, daemon) = tor_cluster(3, kind, "");
    c.start();
    let p0 = c.pod(0, "p0");
    let p1 = c.pod(1, "p1");
    wait_converged(&c, &tor, &daemon, &[0, 1, 2], Duration::from_secs(30));
    const FLAPS: usize = 10;
    let start = Instant::now();
    let mut cycle = Vec::new();
    let mut n2_stopped_while_down = None;
    for k in 0..FLAPS {
        let t = Instant::now();
        let before = session_id(&daemon, 1);
        if k % 2 == 0 {
            set_session(&daemon, 1, false);
            let down = within(Duration::from_secs(10), || !daemon.established(1));
            assert!(down.is_some(), "{kind:?}: flap {k}: session still up");
            set_session(&daemon, 1, true);
        } else {
            let killed = tor.run("ss -K -t -n dst 10.0.1.2");
            assert!(
                killed.contains("10.0.1.2"),
                "{kind:?}: flap {k}: no connection to reset: {killed:?}"
            );
            if k == FLAPS / 2 {
                c.nodes[2].stop_agent();
                n2_stopped_while_down = Some(!daemon.established(1));
            }
        }
        let up = within(Duration::from_secs(20), || {
            daemon.established(1) && session_id(&daemon, 1) != before
        });
        assert!(
            up.is_some(),
            "{kind:?}: flap {k}: session not back\n{}",
            logs(&c, &daemon)
        );
        cycle.push(t.elapsed());
    }
    let flapping = start.elapsed();
    assert!(
        flapping < Duration::from_secs(60),
        "{kind:?}: {FLAPS} flaps took {flapping:?}"
    );
    let settled = wait_converged(&c, &tor, &daemon, &[0, 1], Duration::from_secs(30));
    eprintln!(
        "{kind:?}: {FLAPS} flaps of n1's session in {flapping:?} (each {:?} to {:?}); n2 stopped while \
         n1's session was down: {}; settled {settled:?} after the last flap",
        cycle.iter().min().copied().unwrap_or_default(),
        cycle.iter().max().copied().unwrap_or_default(),
        n2_stopped_while_down.unwrap_or_default()
    );
    // Settled for good: a second later still exactly the live blocks, each once.
    std::thread::sleep(Duration::from_secs(1));
    for (i, other) in [(0, 1), (1, 0)] {
        assert!(
            has_exactly(&c, i, &[other]),
            "{kind:?}: n{i}'s BGP routes after the flaps: {:?}",
            bgp_routes(&c, i)
        );
    }
    assert_eq!(daemon.learned(), blocks_of(&[0, 1]));
    assert_eq!(tor_kernel(&tor), blocks_of(&[0, 1]));
    assert_reach(&p0, &p1, &format!("{kind:?}, after the flaps"));
}

#[test]
fn session_flaps_bird() {
    flaps(TorKind::Bird);
}

#[test]
fn session_flaps_frr() {
    flaps(TorKind::Frr);
}

/// The routing objects of [`tor_cluster`] with n0's BGPPeer allowing everything in, the ToR's
/// default route included (and the IPv6 pod range, which 0.0.0.0/0 does not cover).
fn n0_allows_default(n: usize) -> String {
    let objects = tor_objects(n, "");
    let allowing = objects.replacen(
        "  peerIP: 10.0.0.1\n",
        "  peerIP: 10.0.0.1\n  importPolicy: {action: AllowList, cidrs: [0.0.0.0/0, \"fd10:244::/32\"]}\n",
        1,
    );
    assert_ne!(allowing, objects, "n0's BGPPeer not found");
    allowing
}

/// The prefixes in a BIRD's master tables (`show route`), sorted.
fn bird_routes(b: &sepal_tests::bgpd::Bird, args: &str) -> Vec<String> {
    let mut r: Vec<String> = b
        .birdc(&format!("show route {args}"))
        .lines()
        .filter(|l| !l.starts_with(char::is_whitespace))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|p| p.contains('/'))
        .map(str::to_string)
        .collect();
    r.sort();
    r.dedup();
    r
}

/// BIRD's import counters of a BGP protocol, per channel: (channel, updates received, withdraws
/// received), from the `Route change stats` of `show protocols all`.
fn bird_imports(b: &sepal_tests::bgpd::Bird, proto: &str) -> Vec<(String, u64, u64)> {
    let mut out = Vec::new();
    let mut channel = String::new();
    let mut updates = None;
    for line in b.birdc(&format!("show protocols all {proto}")).lines() {
        let l = line.trim();
        let count = || {
            l.split_whitespace()
                .nth(2)
                .and_then(|n| n.parse::<u64>().ok())
        };
        if let Some(c) = l.strip_prefix("Channel ") {
            channel = c.trim().to_string();
        } else if l.starts_with("Import updates:") {
            updates = count();
        } else if l.starts_with("Import withdraws:") {
            out.push((channel.clone(), updates.unwrap_or(0), count().unwrap_or(0)));
        }
    }
    out
}

/// The listener: a BGP speaker of its own (AS 65099) on its own link to n0, a second BGPPeer of
/// n0 only, accepting everything and announcing nothing.
const LISTENER: &str = "router id 10.1.0.1;\nprotocol device { }\n\
protocol bgp n0 {\n  local 10.1.0.1 as 65099; neighbor 10.1.0.2 as 64601;\n  \
hold time 3; keepalive time 1; connect delay time 1; connect retry time 1; error wait time 1, 5;\n  \
ipv4 { import all; export none; };\n  ipv6 { import all; export none; };\n}\n";

/// A node never re-advertises another node's block or the ToR's routes to an eBGP peer. The ToR
/// would hide such a leak (its own AS in the path), so an independent listener peered with n0
/// checks; n0 also takes the ToR's default route in (its import policy allows it), so that it
/// holds one that could leak. And n2's agent stops and starts again, so that n0's table changes
/// while the listener is up.
#[test]
fn nodes_re_advertise_nothing_learned() {
    let (mut c, _tor, daemon) = tor_cluster(3, TorKind::Bird, "");
    c.write_all("routing.yaml", &n0_allows_default(3));
    // n0's only default route is to be the one it learns.
    c.nodes[0]
        .netns
        .run("ip -4 route flush default; ip -6 route flush default");
    let lis = Netns::new("lis");
    sepal_tests::netns::veth(&c.nodes[0].netns, "lis", &lis, "n0");
    lis.run("ip addr add 10.1.0.1/24 dev n0 && ip addr add fd00:99::1/64 dev n0 nodad");
    c.nodes[0]
        .netns
        .run("ip addr add 10.1.0.2/24 dev lis && ip addr add fd00:99::2/64 dev lis nodad");
    let listener = sepal_tests::bgpd::Bird::start(&lis, LISTENER);
    c.write_all(
        "listener.yaml",
        "apiVersion: sepal.dev/v1alpha1\nkind: BGPPeer\nmetadata:\n  name: listener\nspec:\n  \
         peerIP: 10.1.0.1\n  asNumber: 65099\n  node: n0\n  keepaliveTime: 1s\n  holdTime: 3s\n",
    );
    c.start();
    let mut n0_want = blocks_of(&[1, 2]);
    n0_want.push("0.0.0.0/0".into());
    n0_want.sort();
    let converged = |c: &Cluster| {
        let live = [0, 1, 2];
        daemon.learned() == blocks_of(&live)
            && routes_are(c, 0, &n0_want)
            && has_exactly(c, 1, &[0, 2])
            && has_exactly(c, 2, &[0, 1])
            && listener.established("n0")
    };
    let t = within(Duration::from_secs(30), || converged(&c));
    assert!(
        t.is_some(),
        "not converged: n0 {:?}, listener {:?}\n{}\n{}",
        bgp_routes(&c, 0),
        bird_routes(&listener, ""),
        listener.log(),
        logs(&c, &daemon)
    );
    assert!(
        c.route(0, "default").contains("via 10.0.0.1"),
        "n0 did not take the ToR's default route"
    );
    // n2 away and back: n0 withdraws nothing and announces nothing new to the listener.
    c.nodes[2].stop_agent();
    let gone = within(Duration::from_secs(10), || no_route(&c, 0, 2));
    assert!(gone.is_some(), "n0 kept n2's blocks after n2 stopped");
    c.nodes[2].start_agent();
    let back = within(Duration::from_secs(30), || converged(&c));
    assert!(back.is_some(), "n2 not back: n0 {:?}", bgp_routes(&c, 0));
    // Anything in flight has arrived by the next keepalive.
    std::thread::sleep(Duration::from_secs(1));

    // The listener has exactly n0's blocks, and has never been sent anything else: one update
    // per family, no withdrawal.
    let heard = bird_routes(&listener, "");
    let stats = bird_imports(&listener, "n0");
    eprintln!("listener: routes {heard:?}, imports (channel, updates, withdraws) {stats:?}");
    assert_eq!(heard, blocks_of(&[0]), "what n0 sent the listener");
    assert_eq!(
        stats,
        vec![("ipv4".to_string(), 1, 0), ("ipv6".to_string(), 1, 0)],
        "n0's updates to the listener"
    );
    // And what the ToR takes from each node is exactly that node's blocks.
    let TorDaemon::Bird(bird) = &daemon else {
        unreachable!("a BIRD ToR")
    };
    for i in 0..3 {
        let from = bird_routes(bird, &format!("protocol n{i}"));
        let imports = bird_imports(bird, &format!("n{i}"));
        eprintln!("ToR from n{i}: routes {from:?}, imports {imports:?}");
        let mut want = blocks(i);
        want.sort();
        assert_eq!(from, want, "what the ToR has from n{i}");
        // A leak the ToR refuses (its own AS in the path) would still count as a withdrawal
        // received: BIRD takes a looped route as one.
        assert_eq!(
            imports,
            vec![("ipv4".to_string(), 1, 0), ("ipv6".to_string(), 1, 0)],
            "n{i}'s updates to the ToR (this session)"
        );
    }
}

/// The ToR's default route is installed on n0 only, whose BGPPeer's import policy allows it, and
/// not on n1 (the default policy); changing n0's BGPPeer back to the default policy removes it
/// from n0's kernel at once, without a restart (of the agent or the session), and n0 keeps its
/// other routes throughout.
fn default_route_policy(kind: TorKind, route_refresh: bool) {
    let (mut c, _tor, daemon) = tor_cluster(2, kind, "");
    if !route_refresh {
        // A ToR that cannot send its routes again on request: what the stricter policy refuses
        // must go from what n0 already has.
        let TorDaemon::Bird(b) = &daemon else {
            unimplemented!("route refresh off on {kind:?}")
        };
        let conf = b.config().replacen(
            "  graceful restart on;\n",
            "  graceful restart on;\n  enable route refresh off;\n",
            1,
        );
        assert!(conf.contains("route refresh off"), "{conf}");
        let out = b.reconfigure(&conf);
        assert!(out.contains("Reconfigur"), "birdc configure: {out}");
    }
    c.write_all("routing.yaml", &n0_allows_default(2));
    c.nodes[0]
        .netns
        .run("ip -4 route flush default; ip -6 route flush default");
    c.start();
    let p0 = c.pod(0, "p0");
    let p1 = c.pod(1, "p1");
    let mut n0_want = blocks_of(&[1]);
    n0_want.push("0.0.0.0/0".into());
    n0_want.sort();
    let t = within(Duration::from_secs(30), || {
        routes_are(&c, 0, &n0_want) && has_exactly(&c, 1, &[0]) && routes_via_tor(&c, 0, 1)
    });
    assert!(
        t.is_some(),
        "n0 {:?}, n1 {:?}\n{}",
        bgp_routes(&c, 0),
        bgp_routes(&c, 1),
        logs(&c, &daemon)
    );
    let installed = c.route(0, "default");
    assert!(installed.contains("via 10.0.0.1 dev ul"), "n0: {installed}");
    // n1 is offered the same default route and refuses it.
    let offered = match &daemon {
        TorDaemon::Bird(b) => b.birdc("show route export n1"),
        TorDaemon::Frr(f) => f.vtysh("show bgp ipv4 unicast neighbors 10.0.1.2 advertised-routes"),
        TorDaemon::Gobgp(..) => unimplemented!("GoBGP"),
    };
    assert!(offered.contains("0.0.0.0/0"), "{kind:?} to n1: {offered}");
    assert_eq!(
        c.route(1, "default"),
        "",
        "n1 installed the ToR's default route"
    );
    assert_reach(&p0, &p1, "with n0's default route");

    if let TorDaemon::Bird(b) = &daemon {
        let all = b.birdc("show protocols all n0");
        let ours = all
            .split("Local capabilities")
            .nth(1)
            .and_then(|s| s.split("Neighbor capabilities").next())
            .unwrap_or_default();
        assert_eq!(
            ours.contains("Route refresh"),
            route_refresh,
            "the ToR's capabilities: {ours}"
        );
    }
    let session = session_id(&daemon, 0);
    c.write_all("routing.yaml", &tor_objects(2, ""));
    let mut kept = true;
    let gone = within(Duration::from_secs(15), || {
        kept &= routes_via_tor(&c, 0, 1);
        c.route(0, "default").is_empty()
    });
    eprintln!(
        "{kind:?} (route refresh {}): n0's default route gone {gone:?} after its BGPPeer went back to the \
         default import policy",
        if route_refresh { "on" } else { "off" }
    );
    assert!(
        gone.is_some(),
        "n0 still has the default route: {:?}\n{}",
        c.route(0, "default"),
        logs(&c, &daemon)
    );
    assert!(kept, "n0 lost n1's blocks meanwhile");
    assert!(
        routes_are(&c, 0, &blocks_of(&[1])),
        "n0: {:?}",
        bgp_routes(&c, 0)
    );
    assert_eq!(
        session_id(&daemon, 0),
        session,
        "n0's session was reset by the policy change"
    );
    // And the default stays away (no later re-announcement brings it back).
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.route(0, "default"), "", "the default route came back");
    assert_reach(&p0, &p1, "after the policy change");
}

#[test]
fn default_route_policy_bird() {
    default_route_policy(TorKind::Bird, true);
}

#[test]
fn default_route_policy_frr() {
    default_route_policy(TorKind::Frr, true);
}

/// The ToR does not offer route refresh: n0 cannot ask for its routes again, and the stricter
/// policy must still remove the default route it already has.
#[test]
fn default_route_policy_without_route_refresh() {
    default_route_policy(TorKind::Bird, false);
}
