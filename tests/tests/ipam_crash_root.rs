//! IPAM under crashes: 1,000 CNI ADD and DEL calls from 8 concurrent callers, the real plugin and
//! the real agent, with the agent killed (SIGKILL) at random moments, ADDs in flight included.
//! Half of the failed ADDs are followed by a DEL, as kubelet does; the other half are abandoned,
//! as a runtime that never cleans up would. Then one more crash and restart, the agent's own
//! sweep, and the runtime's GC with the live attachments. Afterwards: no leaked or duplicate
//! address, no orphan veth or route, and every live pod answers.

use sepal_tests::netns::{self, Netns};
use sepal_tests::node::{CniCall, Node};
use sepal_tests::Rng;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const CALLERS: usize = 8;
const SLOTS: usize = 3;
const OPS: usize = 1000;

/// The agent process the test runs itself (the callers share the node meanwhile).
struct Agent(Option<Child>);

impl Agent {
    fn start(node: &Node) -> Agent {
        Agent(Some(
            node.agent_command().spawn().expect("start sepal node"),
        ))
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.0.take() {
            netns::kill(&mut child);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One pod sandbox a caller reuses: its namespace and what the runtime believes it holds.
struct Slot {
    netns: Netns,
    pod: String,
    state: SlotState,
}

#[derive(Clone, PartialEq)]
enum SlotState {
    Empty,
    /// ADD succeeded: the container ID and the addresses of the result.
    Live(String, Vec<String>),
    /// A DEL for this container ID must still succeed (the runtime retries it).
    Deleting(String),
}

#[derive(Default)]
struct Counts {
    adds_ok: AtomicUsize,
    adds_failed: AtomicUsize,
    adds_abandoned: AtomicUsize,
    dels_ok: AtomicUsize,
    dels_failed: AtomicUsize,
    /// Plugin processes running an ADD right now (for "killed during an ADD").
    adds_in_flight: AtomicUsize,
}

fn ips_of(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip["address"].as_str())
                .map(|a| a.split('/').next().unwrap_or(a).to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// A runtime waits before it tries a failed call again (kubelet backs off per pod).
fn backoff(rng: &mut Rng) {
    std::thread::sleep(Duration::from_millis(20 + rng.below(60) as u64));
}

/// One caller's share of the operations on its own slots.
fn caller(node: &Node, id: usize, ops: usize, seed: u64, counts: &Counts) -> Vec<Slot> {
    let mut rng = Rng(seed ^ (id as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut slots: Vec<Slot> = (0..SLOTS)
        .map(|s| Slot {
            netns: Netns::new(&format!("c{id}{s}")),
            pod: format!("p{id}-{s}"),
            state: SlotState::Empty,
        })
        .collect();
    let mut next_container = 0;
    for _ in 0..ops {
        let slot = &mut slots[rng.below(SLOTS)];
        match slot.state.clone() {
            SlotState::Empty => {
                next_container += 1;
                let cid = format!("ctr-{id}-{next_container}");
                let call = CniCall::pod(&cid, &slot.netns.path(), "default", &slot.pod);
                counts.adds_in_flight.fetch_add(1, Ordering::SeqCst);
                let out = node.cni("ADD", &call);
                counts.adds_in_flight.fetch_sub(1, Ordering::SeqCst);
                if out.status.success() {
                    let result: Value = serde_json::from_slice(&out.stdout).expect("ADD result");
                    counts.adds_ok.fetch_add(1, Ordering::Relaxed);
                    slot.state = SlotState::Live(cid, ips_of(&result));
                } else {
                    counts.adds_failed.fetch_add(1, Ordering::Relaxed);
                    backoff(&mut rng);
                    if rng.below(2) == 0 {
                        slot.state = SlotState::Deleting(cid);
                    } else {
                        counts.adds_abandoned.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            SlotState::Live(cid, _) | SlotState::Deleting(cid) => {
                let call = CniCall::pod(&cid, &slot.netns.path(), "default", &slot.pod);
                if node.cni("DEL", &call).status.success() {
                    counts.dels_ok.fetch_add(1, Ordering::Relaxed);
                    slot.state = SlotState::Empty;
                } else {
                    counts.dels_failed.fetch_add(1, Ordering::Relaxed);
                    slot.state = SlotState::Deleting(cid);
                    backoff(&mut rng);
                }
            }
        }
    }
    // A runtime retries a DEL until it succeeds.
    for slot in &mut slots {
        if let SlotState::Deleting(cid) = slot.state.clone() {
            let call = CniCall::pod(&cid, &slot.netns.path(), "default", &slot.pod);
            let deadline = Instant::now() + Duration::from_secs(30);
            while !node.cni("DEL", &call).status.success() {
                assert!(Instant::now() < deadline, "DEL of {cid} never succeeded");
                std::thread::sleep(Duration::from_millis(100));
            }
            counts.dels_ok.fetch_add(1, Ordering::Relaxed);
            slot.state = SlotState::Empty;
        }
    }
    slots
}

fn wait_ready(node: &Node) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !node.cni("STATUS", &CniCall::status()).status.success() {
        assert!(
            Instant::now() < deadline,
            "agent not ready in 20 s:\n{}",
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What the node holds, against the attachments the runtime believes are live.
#[derive(Debug, Default, PartialEq)]
struct Audit {
    leaked: Vec<String>,
    missing: Vec<String>,
    duplicates: Vec<String>,
    orphan_veths: Vec<String>,
    orphan_routes: Vec<String>,
    missing_routes: Vec<String>,
    unreachable: Vec<String>,
}

impl Audit {
    fn clean(&self) -> bool {
        *self == Audit::default()
    }
}

fn audit(node: &Node, live: &BTreeMap<String, Vec<String>>) -> Audit {
    let mut a = Audit::default();
    let state: Value = serde_json::from_slice(
        &std::fs::read(node.state_dir.join("ipam.json")).expect("ipam.json"),
    )
    .expect("ipam.json is JSON");
    let allocations = state["allocations"].as_array().cloned().unwrap_or_default();
    let mut held = BTreeSet::new();
    let mut seen_ips = HashSet::new();
    let mut veths = BTreeSet::new();
    for alloc in &allocations {
        let cid = alloc["key"]["container_id"]
            .as_str()
            .unwrap_or("")
            .to_string();
        if !live.contains_key(&cid) {
            a.leaked.push(format!("{cid} {}", alloc["ips"]));
        }
        for ip in alloc["ips"].as_array().into_iter().flatten() {
            let ip = ip.as_str().unwrap_or("").to_string();
            if !seen_ips.insert(ip.clone()) {
                a.duplicates.push(ip);
            }
        }
        veths.insert(alloc["host_veth"].as_str().unwrap_or("").to_string());
        held.insert(cid);
    }
    a.missing = live
        .keys()
        .filter(|c| !held.contains(*c))
        .cloned()
        .collect();
    let links = node.netns.run("ip -o link show");
    for line in links.lines() {
        let name = line.split(':').nth(1).unwrap_or("").trim();
        let name = name.split('@').next().unwrap_or(name);
        if name.starts_with("sep") && !veths.contains(name) {
            a.orphan_veths.push(name.to_string());
        }
    }
    let live_ips: BTreeSet<&String> = live.values().flatten().collect();
    let routes = node
        .netns
        .run("ip -4 route show proto 83; ip -6 route show proto 83");
    let mut routed = BTreeSet::new();
    for line in routes.lines().filter(|l| l.contains(" dev sep")) {
        let dst = line.split_whitespace().next().unwrap_or("");
        let dst = dst.split('/').next().unwrap_or(dst).to_string();
        if !live_ips.contains(&dst) {
            a.orphan_routes.push(line.to_string());
        }
        routed.insert(dst);
    }
    a.missing_routes = live_ips
        .iter()
        .filter(|ip| !routed.contains(**ip))
        .map(|ip| ip.to_string())
        .collect();
    for ip in &live_ips {
        if node
            .netns
            .try_run(&format!("ping -c1 -W2 -q {ip}"))
            .is_err()
        {
            a.unreachable.push(ip.to_string());
        }
    }
    a
}

/// The agent's log without its terminal colours, so its `key=value` fields can be read.
fn strip_ansi(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            chars.by_ref().find(|c| c.is_ascii_alphabetic());
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn ipam_survives_agent_crashes_under_concurrent_cni_calls() {
    let node = Arc::new(Node::new("n", &["10.244.7.0/24", "fd00:244:7::/112"]));
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1)
        | 1;
    eprintln!("seed {seed}");
    let agent = Arc::new(Mutex::new(Agent::start(&node)));
    wait_ready(&node);
    let counts = Arc::new(Counts::default());
    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();

    // The killer: SIGKILL every 100 to 600 ms, a restart 0 to 200 ms later.
    let killer = {
        let (node, agent, counts, done) =
            (node.clone(), agent.clone(), counts.clone(), done.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(seed.rotate_left(17) | 1);
            let (mut kills, mut during_add) = (0, 0);
            while !done.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(100 + rng.below(500) as u64));
                if done.load(Ordering::SeqCst) {
                    break;
                }
                let mut a = agent.lock().unwrap();
                // Every other kill lands just after the agent has written an allocation, while
                // the ADD that made it is still in flight: the window a random kill rarely hits.
                if rng.below(2) == 0 {
                    let file = node.state_dir.join("ipam.json");
                    let written =
                        |f: &std::path::Path| std::fs::metadata(f).and_then(|m| m.modified()).ok();
                    let before = written(&file);
                    let until = Instant::now() + Duration::from_millis(300);
                    while Instant::now() < until
                        && !(written(&file) != before
                            && counts.adds_in_flight.load(Ordering::SeqCst) > 0)
                    {
                        std::thread::sleep(Duration::from_micros(200));
                    }
                }
                if counts.adds_in_flight.load(Ordering::SeqCst) > 0 {
                    during_add += 1;
                }
                a.kill();
                kills += 1;
                std::thread::sleep(Duration::from_millis(rng.below(200) as u64));
                *a = Agent::start(&node);
            }
            (kills, during_add)
        })
    };
    let callers: Vec<_> = (0..CALLERS)
        .map(|id| {
            let (node, counts) = (node.clone(), counts.clone());
            std::thread::spawn(move || caller(&node, id, OPS / CALLERS, seed, &counts))
        })
        .collect();
    let slots: Vec<Slot> = callers
        .into_iter()
        .flat_map(|c| c.join().expect("caller"))
        .collect();
    done.store(true, Ordering::SeqCst);
    let (kills, during_add) = killer.join().expect("killer");
    let churn = started.elapsed();

    // One more crash, then a restart: the agent's own sweep runs once its datastore syncs.
    let mut agent = Arc::try_unwrap(agent)
        .ok()
        .expect("agent shared")
        .into_inner()
        .unwrap();
    agent.kill();
    let mut agent = Agent::start(&node);
    wait_ready(&node);
    let live: BTreeMap<String, Vec<String>> = slots
        .iter()
        .filter_map(|s| match &s.state {
            SlotState::Live(cid, ips) => Some((cid.clone(), ips.clone())),
            _ => None,
        })
        .collect();
    // Retired veths go a second after the last DEL, or at start.
    std::thread::sleep(Duration::from_millis(1500));
    let before_gc = audit(&node, &live);
    let log = strip_ansi(&node.agent_log());
    let swept: usize = log
        .lines()
        .filter(|l| l.contains("released allocations whose host veth and Pod are both gone"))
        .filter_map(|l| l.split("released=").nth(1))
        .filter_map(|v| v.split_whitespace().next()?.parse::<usize>().ok())
        .sum();
    let superseded = log
        .lines()
        .filter(|l| l.contains("a new sandbox of its pod replaced its veth"))
        .count();

    // The runtime's GC with every live attachment valid releases nothing and breaks nothing.
    let mut conf: Value = serde_json::from_str(&node.cni_config("1.1.0")).unwrap();
    conf["cni.dev/valid-attachments"] = live
        .keys()
        .map(|cid| serde_json::json!({"containerID": cid, "ifname": "eth0"}))
        .collect();
    let gc = node.cni("GC", &CniCall::status().with_config(conf.to_string()));
    assert!(
        gc.status.success(),
        "GC failed: {}",
        String::from_utf8_lossy(&gc.stdout)
    );
    let after_gc = audit(&node, &live);
    let c = &counts;
    eprintln!(
        "ops {OPS} from {CALLERS} callers in {:.1} s: ADD ok {} failed {} (abandoned without DEL {}), \
         DEL ok {} failed {}; kills {kills} ({during_add} with an ADD in flight); live pods {}; \
         released by the agent's sweep {swept}, superseded by a new sandbox {superseded}; \
         before GC: leaked {} duplicates {} orphan veths {} orphan routes {} unreachable {}; \
         after GC: leaked {} duplicates {} orphan veths {} orphan routes {} unreachable {}",
        churn.as_secs_f64(),
        c.adds_ok.load(Ordering::Relaxed),
        c.adds_failed.load(Ordering::Relaxed),
        c.adds_abandoned.load(Ordering::Relaxed),
        c.dels_ok.load(Ordering::Relaxed),
        c.dels_failed.load(Ordering::Relaxed),
        live.len(),
        before_gc.leaked.len(),
        before_gc.duplicates.len(),
        before_gc.orphan_veths.len(),
        before_gc.orphan_routes.len(),
        before_gc.unreachable.len(),
        after_gc.leaked.len(),
        after_gc.duplicates.len(),
        after_gc.orphan_veths.len(),
        after_gc.orphan_routes.len(),
        after_gc.unreachable.len(),
    );
    assert!(kills > 0 && during_add > 0, "no crash hit an ADD in flight");
    assert!(
        c.adds_abandoned.load(Ordering::Relaxed) > 0,
        "no ADD failed (the crashes missed every call)"
    );
    assert!(
        before_gc.clean(),
        "without GC (the agent's own sweep only): {before_gc:#?}\n{}",
        node.agent_log()
    );
    assert!(after_gc.clean(), "after GC: {after_gc:#?}");
    agent.kill();
}

/// The agent's sweep releases an allocation only when its host veth is gone and its Pod is not
/// in the datastore: a Pod that still exists keeps it (kubelet may still call DEL), and deleting
/// the Pod releases it without any CNI call.
#[test]
fn an_allocation_without_a_veth_is_kept_while_its_pod_exists() {
    let mut node = Node::new("n", &["10.244.8.0/24"]);
    node.start_agent();
    let pod_file = node.datastore.join("pod-kept.yaml");
    std::fs::write(
        &pod_file,
        "apiVersion: v1\nkind: Pod\nmetadata: {name: kept, namespace: default}\nspec: {nodeName: n, containers: [{name: c, image: x}]}\n",
    )
    .unwrap();
    let sandbox = Netns::new("pk");
    let call = CniCall::pod("ctr-kept", &sandbox.path(), "default", "kept");
    let out = node.cni("ADD", &call);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let ip = ips_of(&serde_json::from_slice(&out.stdout).unwrap()).remove(0);
    let held = |node: &Node| {
        std::fs::read_to_string(node.state_dir.join("ipam.json"))
            .unwrap()
            .contains("ctr-kept")
    };
    // The sandbox's veth disappears behind everyone's back; the Pod is still there.
    sandbox.run("ip link del eth0");
    // Another datastore change makes the agent look.
    std::fs::write(
        node.datastore.join("ns-other.yaml"),
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: other}\n",
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        held(&node),
        "released while its Pod exists:\n{}",
        node.agent_log()
    );
    // The Pod goes: the allocation and its route follow, with no DEL.
    std::fs::remove_file(&pod_file).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while held(&node) {
        assert!(
            Instant::now() < deadline,
            "not released after its Pod went:\n{}",
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let routes = node.netns.run("ip route show proto 83");
    assert!(!routes.contains(&format!("{ip} dev")), "{routes}");
}
