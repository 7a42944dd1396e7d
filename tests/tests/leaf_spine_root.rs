//! The leaf-spine lab of the docs (docs/examples/leaf-spine-lab.yaml), brought up as a user
//! would (root): two racks of two nodes, two ToRs per rack (FRR and BIRD, BIRD and GoBGP), two
//! spines (FRR, BIRD), BFD wherever both ends have it. Checked: `lab status` shows the cabling
//! and every session Established, pods reach each other across racks, each node routes the
//! other blocks over both its ToRs (ECMP), a ToR gone silent is routed around and a node gone
//! silent is withdrawn everywhere within BFD's detection time, with no more loss than that.

use sepal_tests::lab::{in_netns, repo_file, sepal_json, sepal_ok, wait_for, Lab};
use sepal_tests::require_root;
use serde_json::Value;
use std::process::Command;
use std::time::{Duration, Instant};

/// BFD's detection time in the lab (300 ms × 3) plus what it takes to reprogram the kernels
/// along the way, on a loaded 2-core machine.
const WITHIN: Duration = Duration::from_millis(1500);

/// The gateways of `prefix` in `netns`'s kernel, through FRR's nexthop objects where zebra
/// installed the route with one (`nhid N`) instead of inline next hops.
fn gateways(netns: &str, prefix: &str) -> Vec<String> {
    let route = in_netns(netns, &format!("ip -4 route show {prefix}"));
    let mut text = route.clone();
    if let Some(id) = word_after(&route, "nhid") {
        let nh = in_netns(netns, &format!("ip nexthop show id {id}"));
        text = match word_after(&nh, "group") {
            Some(group) => group
                .split('/')
                .map(|m| m.split(',').next().unwrap_or(m))
                .map(|m| in_netns(netns, &format!("ip nexthop show id {m}")))
                .collect(),
            None => nh,
        };
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "via")
        .map(|w| w[1].to_string())
        .collect()
}

fn word_after(text: &str, key: &str) -> Option<String> {
    let words: Vec<&str> = text.split_whitespace().collect();
    words
        .windows(2)
        .find(|w| w[0] == key)
        .map(|w| w[1].to_string())
}

/// Drops every packet into, through and out of `netns` (links and processes untouched): its
/// neighbours hear nothing and only BFD or the hold timer tells them.
fn silence(netns: &str) {
    in_netns(
        netns,
        "nft add table inet silent && \
         nft add chain inet silent in '{ type filter hook prerouting priority -500; policy drop; }' && \
         nft add chain inet silent out '{ type filter hook output priority -500; policy drop; }'",
    );
}

fn unsilence(netns: &str) {
    in_netns(netns, "nft delete table inet silent");
}

/// Polls `gone` every 5 ms until it holds: how long that took, None past 5 s.
fn time_until(mut gone: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if gone() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

fn netns_of<'a>(status: &'a Value, kind: &str, name: &str) -> &'a str {
    status[kind]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == name)
        .and_then(|x| x["netns"].as_str())
        .unwrap_or_else(|| panic!("no {name} among {kind}"))
}

/// Every router's sessions, all Established, and as many as it has cables.
fn all_sessions_up(status: &Value) -> bool {
    status["routers"].as_array().unwrap().iter().all(|r| {
        let sessions = r["sessions"].as_array().cloned().unwrap_or_default();
        sessions.len() == 4 && sessions.iter().all(|s| s["state"] == "Established")
    })
}

#[test]
fn leaf_spine_lab_routes_across_racks_and_around_failures() {
    require_root();
    let name = format!("ls{}", std::process::id());
    let lab = Lab::up(&name, Some(&repo_file("docs/examples/leaf-spine-lab.yaml")));

    // The cabling: 8 node links (each node to both its rack's ToRs), 8 ToR-spine links; every
    // router with its 4 sessions Established.
    let status = wait_for(
        "every session Established",
        || lab.status(),
        all_sessions_up,
    );
    let links = status["links"].as_array().unwrap();
    assert_eq!(links.len(), 16, "{links:?}");
    let cabled = |a: &str, b: &str| {
        links
            .iter()
            .any(|l| l["a"]["name"] == a && l["b"]["name"] == b)
    };
    assert!(cabled("n1", "r1-frr") && cabled("n1", "r1-bird") && !cabled("n1", "r2-bird"));
    assert!(cabled("r2-gobgp", "spine1") && cabled("r1-frr", "spine2"));
    let text = sepal_ok(&["lab", "status", "--name", &name]);
    assert!(
        text.contains("CABLED TO") && text.contains("spine1"),
        "{text}"
    );

    // Pods reach each other across the racks.
    wait_for(
        "every pod reaching every other",
        || sepal_json(&["lab", "ping", "--name", &name, "--json"]),
        |m| {
            m["results"]
                .as_array()
                .is_some_and(|r| r.len() == 12 && r.iter().all(|r| r["ok"] == true))
        },
    );

    // ECMP on the nodes: the other rack's blocks over both ToRs.
    let (n1, n3) = (
        netns_of(&status, "nodes", "n1"),
        netns_of(&status, "nodes", "n3"),
    );
    let tor_addr = |router: &str, node: &str| -> String {
        links
            .iter()
            .find(|l| l["a"]["name"] == node && l["b"]["name"] == router)
            .and_then(|l| l["b"]["address"].as_str())
            .unwrap()
            .to_string()
    };
    let rack1 = [tor_addr("r1-frr", "n1"), tor_addr("r1-bird", "n1")];
    wait_for(
        "n1's route to n3's block over both ToRs",
        || gateways(n1, "10.244.3.0/24"),
        |hops| rack1.iter().all(|a| hops.contains(a)),
    );
    let rack2 = [tor_addr("r2-bird", "n3"), tor_addr("r2-gobgp", "n3")];
    wait_for(
        "n3's route to n1's block over both ToRs",
        || gateways(n3, "10.244.1.0/24"),
        |hops| rack2.iter().all(|a| hops.contains(a)),
    );

    // A ToR goes silent: the one pod a's packets to pod c leave n1 through.
    let (a, c) = ("10.244.1.1", "10.244.3.1");
    let pod_a = netns_of(&status, "pods", "a").to_string();
    let a_dev = word_after(&in_netns(n1, &format!("ip route get {a}")), "dev").unwrap();
    let hop = word_after(
        &in_netns(n1, &format!("ip route get {c} from {a} iif {a_dev}")),
        "via",
    )
    .unwrap();
    let tor = if hop == rack1[0] { "r1-frr" } else { "r1-bird" };
    let tor_ns = netns_of(&status, "routers", tor).to_string();
    // The silent ToR's addresses on the spines' links, which the spines route rack 1 through.
    let tor_uplinks: Vec<String> = links
        .iter()
        .filter(|l| l["a"]["name"] == tor)
        .filter_map(|l| l["a"]["address"].as_str().map(String::from))
        .filter(|a| a.starts_with("172."))
        .collect();
    let spines = [
        netns_of(&status, "routers", "spine1").to_string(),
        netns_of(&status, "routers", "spine2").to_string(),
    ];
    let interval = 0.01;
    let ping = Command::new("ip")
        .args([
            "netns", "exec", &pod_a, "ping", "-q", "-i", "0.01", "-c", "400",
        ])
        .args(["-W", "1", c])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    silence(&tor_ns);
    // Both measured from the moment it went silent.
    let cut = Instant::now();
    let (mut n1_rerouted, mut spines_rerouted) = (None, None);
    while (n1_rerouted.is_none() || spines_rerouted.is_none())
        && cut.elapsed() < Duration::from_secs(5)
    {
        if n1_rerouted.is_none() && !gateways(n1, "10.244.3.0/24").contains(&hop) {
            n1_rerouted = Some(cut.elapsed());
        }
        let spines_done = spines.iter().all(|s| {
            let hops = gateways(s, "10.244.1.0/24");
            !hops.is_empty() && !hops.iter().any(|h| tor_uplinks.contains(h))
        });
        if spines_rerouted.is_none() && spines_done {
            spines_rerouted = Some(cut.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = ping.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout).into_owned();
    let (sent, received) = ping_counts(&summary);
    let outage = Duration::from_secs_f64((sent - received) as f64 * interval);
    eprintln!(
        "ToR {tor} silent: n1 rerouted in {n1_rerouted:?}, the spines in {spines_rerouted:?}; \
         ping a->c lost {} of {sent} ({outage:?})",
        sent - received
    );
    assert!(
        n1_rerouted.is_some_and(|t| t < WITHIN),
        "n1: {n1_rerouted:?}"
    );
    assert!(
        spines_rerouted.is_some_and(|t| t < WITHIN),
        "spines: {spines_rerouted:?}"
    );
    assert!(outage < WITHIN, "{summary}");
    // Back again: its sessions re-establish and n1 has both ToRs again.
    unsilence(&tor_ns);
    wait_for(
        "every session Established again",
        || lab.status(),
        all_sessions_up,
    );
    wait_for(
        "n1 back on both ToRs",
        || gateways(n1, "10.244.3.0/24"),
        |hops| rack1.iter().all(|a| hops.contains(a)),
    );

    // A node goes silent: its block leaves every other node's kernel and the spines'.
    let n2 = netns_of(&status, "nodes", "n2").to_string();
    let watchers: Vec<String> = ["n1", "n3", "n4"]
        .iter()
        .map(|n| netns_of(&status, "nodes", n).to_string())
        .chain(spines.iter().cloned())
        .collect();
    silence(&n2);
    let withdrawn = time_until(|| {
        watchers.iter().all(|w| {
            in_netns(w, "ip -4 route show 10.244.2.0/24")
                .trim()
                .is_empty()
        })
    });
    eprintln!("node n2 silent: its block withdrawn everywhere in {withdrawn:?}");
    // Three hops from the ToRs that detect it (spines, the other rack's ToRs, its nodes).
    assert!(
        withdrawn.is_some_and(|t| t < WITHIN + Duration::from_millis(500)),
        "{withdrawn:?}"
    );
    unsilence(&n2);
    lab.down_cleanly();
}

/// (transmitted, received) from ping's summary line.
fn ping_counts(summary: &str) -> (u64, u64) {
    let line = summary
        .lines()
        .find(|l| l.contains("transmitted"))
        .unwrap_or_else(|| panic!("no ping summary: {summary}"));
    let num = |key: &str| -> u64 {
        let words: Vec<&str> = line.split([' ', ',']).filter(|w| !w.is_empty()).collect();
        let i = words.iter().position(|w| *w == key).unwrap();
        words[i - 1].parse().unwrap()
    };
    (num("packets"), num("received"))
}
