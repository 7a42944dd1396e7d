//! NetworkPolicy conformance, needs root: the upstream Kubernetes netpol e2e scenarios and
//! Sepal's own cases (tests/tests/policy/*.yaml), probed with real connections between pods.
//!
//! Lab: one node netns with 9 pod netns (namespaces x, y, z × pods a, b, c) attached exactly as
//! the CNI plugin does it (host veth `sep…`, /32 host route, proxy ARP for 169.254.1.1), every
//! pod serving TCP and UDP on ports 80 and 81 and receiving SCTP INITs on a raw socket (this
//! kernel has no SCTP sockets). Policy is compiled by felix's compiler and programmed by its
//! nftables dataplane; each expectation is also checked against `explain` on the same model.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use sepal_felix::nft::{Dataplane, Options};
use sepal_felix::policy::{
    compile, explain, Cluster, ExplainPeer, NamedPort, Namespace, NetworkPolicy, Pod, Protocol,
};
use sepal_tests::netns::Netns;
use sepal_tests::podnet::{probe_all, Outcome, PodNode, ProbeSpec, Servers};
use serde::Deserialize;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const PORTS: [u16; 2] = [80, 81];
const NODE_IP: &str = "10.255.255.2";
/// First probe timeout; a mismatch is probed again with the longer one (as upstream retries),
/// so a slow but allowed connection never fails a case.
const PROBE_TIMEOUT: Duration = Duration::from_millis(600);
const RETRY_TIMEOUT: Duration = Duration::from_millis(2000);

// ---------------------------------------------------------------------------------------------
// Case files

#[derive(Debug, Deserialize)]
struct Case {
    name: String,
    steps: Vec<Step>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Step {
    /// Policies to create or replace (by namespace/name).
    apply: Vec<serde_norway::Value>,
    /// Policies to delete, `ns/name`.
    delete: Vec<String>,
    delete_all: bool,
    /// Replace a pod's labels, `ns/pod: {labels}`.
    pod_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Add labels to a namespace.
    namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    probes: Vec<Probe>,
    /// The node reaches every pod and every pod reaches the node, whatever the policies say.
    node_access: bool,
    /// Rule comments whose counters must have counted packets after this step's probes.
    counted: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Probe {
    port: u16,
    protocol: String,
    /// `[from, to, allowed]` applied in order over an all-allowed matrix; `from`/`to` are
    /// `*`, a namespace (`x`) or a pod (`x/a`), like upstream's Reachability.ExpectPeer.
    #[serde(default)]
    expect: Vec<(String, String, bool)>,
}

fn pod_ip(ns: usize, pod: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, 0, (10 + ns * 3 + pod) as u8)
}

/// Case text with `${x/b}` replaced by x/b's IP and `${x/b/4}` by the /4 around it (upstream's
/// makeLargeCIDRForIP).
fn substitute(text: &str) -> String {
    let mut out = text.to_string();
    for (ni, ns) in NAMESPACES.iter().enumerate() {
        for (pi, pod) in PODS.iter().enumerate() {
            let ip = pod_ip(ni, pi);
            let o = ip.octets();
            let large = Ipv4Addr::new(o[0] & 0xf0, 0, 0, 0);
            out = out.replace(&format!("${{{ns}/{pod}/4}}"), &format!("{large}/4"));
            out = out.replace(&format!("${{{ns}/{pod}}}"), &ip.to_string());
        }
    }
    out
}

fn load_cases(file: &str) -> Vec<Case> {
    let path = format!("{}/tests/policy/{file}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_norway::from_str(&substitute(&text)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

// ---------------------------------------------------------------------------------------------
// Lab

struct Lab {
    // Dropped first (declaration order): servers stop before their namespaces go.
    servers: Servers,
    pods: Vec<Netns>,
    node: PodNode,
}

impl Lab {
    fn new() -> Lab {
        let node = PodNode::new("pnode", "pup", NODE_IP.parse().expect("node ip"));
        let mut pods = Vec::new();
        for (ni, ns) in NAMESPACES.iter().enumerate() {
            for (pi, pod) in PODS.iter().enumerate() {
                pods.push(node.attach_pod(
                    &format!("p{ns}{pod}"),
                    &format!("sep{ns}{pod}"),
                    pod_ip(ni, pi),
                ));
            }
        }
        let mut servers = Servers::new();
        for netns in pods.iter().chain([&node.node]) {
            servers.start(netns.name(), &PORTS, &PORTS);
        }
        Lab {
            servers,
            pods,
            node,
        }
    }

    fn dataplane(&self) -> Dataplane {
        Dataplane::in_netns(self.node.node.path(), Options::default())
    }
}

// ---------------------------------------------------------------------------------------------
// Model and runner

struct World {
    ns_labels: BTreeMap<String, BTreeMap<String, String>>,
    pod_labels: Vec<BTreeMap<String, String>>,
    policies: BTreeMap<(String, String), NetworkPolicy>,
}

impl World {
    fn new() -> World {
        World {
            ns_labels: BTreeMap::new(),
            pod_labels: (0..9)
                .map(|i| BTreeMap::from([("pod".to_string(), PODS[i % 3].to_string())]))
                .collect(),
            policies: BTreeMap::new(),
        }
    }

    fn cluster(&self) -> Cluster {
        let mut c = Cluster::default();
        for ns in NAMESPACES {
            c.namespaces.insert(
                ns.to_string(),
                Namespace {
                    name: ns.to_string(),
                    labels: self.ns_labels.get(ns).cloned().unwrap_or_default(),
                },
            );
        }
        for (ni, ns) in NAMESPACES.iter().enumerate() {
            for (pi, pod) in PODS.iter().enumerate() {
                let mut ports = Vec::new();
                for port in PORTS {
                    for proto in [Protocol::Tcp, Protocol::Udp, Protocol::Sctp] {
                        ports.push(NamedPort {
                            name: format!("serve-{port}-{}", proto.nft()).into(),
                            protocol: proto,
                            port,
                        });
                    }
                }
                c.pods.push(
                    Pod {
                        namespace: (*ns).into(),
                        name: (*pod).into(),
                        labels: self.pod_labels[ni * 3 + pi].clone().into(),
                        ips: vec![IpAddr::V4(pod_ip(ni, pi))],
                        host_iface: Some(format!("sep{ns}{pod}")),
                        ports: ports.into(),
                        host_network: false,
                    }
                    .into(),
                );
            }
        }
        c.policies = self.policies.values().cloned().map(Into::into).collect();
        c
    }
}

fn pod_index(s: &str) -> Option<usize> {
    let (ns, pod) = s.split_once('/')?;
    let ni = NAMESPACES.iter().position(|n| *n == ns)?;
    let pi = PODS.iter().position(|p| *p == pod)?;
    Some(ni * 3 + pi)
}

fn pod_name(i: usize) -> String {
    format!("{}/{}", NAMESPACES[i / 3], PODS[i % 3])
}

fn pattern_matches(pattern: &str, i: usize) -> bool {
    pattern == "*" || pattern == NAMESPACES[i / 3] || pattern == pod_name(i)
}

fn expected(probe: &Probe) -> [[bool; 9]; 9] {
    let mut m = [[true; 9]; 9];
    for (from, to, allow) in &probe.expect {
        for (f, row) in m.iter_mut().enumerate() {
            for (t, cell) in row.iter_mut().enumerate() {
                if pattern_matches(from, f) && pattern_matches(to, t) {
                    *cell = *allow;
                }
            }
        }
    }
    m
}

fn table(m: &[[Option<bool>; 9]; 9]) -> String {
    let mut s = String::from("       ");
    for t in 0..9 {
        s.push_str(&format!("{:>4}", pod_name(t)));
    }
    s.push('\n');
    for (f, row) in m.iter().enumerate() {
        s.push_str(&format!("{:>6} ", pod_name(f)));
        for cell in row {
            s.push_str(match cell {
                Some(true) => "   .",
                Some(false) => "   X",
                None => "   -",
            });
        }
        s.push('\n');
    }
    s
}

fn probe_matrix(
    lab: &Lab,
    pairs: &[(usize, usize)],
    protocol: Protocol,
    port: u16,
    timeout: Duration,
) -> Vec<bool> {
    let specs: Vec<ProbeSpec> = pairs
        .iter()
        .map(|&(f, t)| ProbeSpec {
            client_netns: lab.pods[f].name().to_string(),
            src: pod_ip(f / 3, f % 3),
            dst: pod_ip(t / 3, t % 3),
            protocol,
            port,
        })
        .collect();
    probe_all(&specs, timeout, lab.servers.sctp())
        .iter()
        .map(Outcome::connected)
        .collect()
}

fn run_cases(file: &str) {
    let cases = load_cases(file);
    let started = Instant::now();
    let lab = Lab::new();
    let mut dp = lab.dataplane();
    let mut failures = Vec::new();
    let mut probes_run = 0usize;
    for case in &cases {
        let mut world = World::new();
        for (si, step) in case.steps.iter().enumerate() {
            let at = format!("{file}: {:?} step {si}", case.name);
            if step.delete_all {
                world.policies.clear();
            }
            for d in &step.delete {
                let (ns, name) = d.split_once('/').expect("delete: ns/name");
                world.policies.remove(&(ns.to_string(), name.to_string()));
            }
            for v in &step.apply {
                let np: NetworkPolicy = serde_norway::from_value(v.clone())
                    .unwrap_or_else(|e| panic!("{at}: policy: {e}"));
                let key = (
                    np.metadata.namespace.clone().expect("policy namespace"),
                    np.metadata.name.clone().expect("policy name"),
                );
                world.policies.insert(key, np);
            }
            for (pod, labels) in &step.pod_labels {
                let i = pod_index(pod).unwrap_or_else(|| panic!("{at}: pod {pod}"));
                world.pod_labels[i] = labels.clone();
            }
            for (ns, labels) in &step.namespace_labels {
                world
                    .ns_labels
                    .entry(ns.clone())
                    .or_default()
                    .extend(labels.clone());
            }
            let cluster = world.cluster();
            let rs = compile(&cluster);
            for p in &rs.problems {
                eprintln!("{at}: {p}");
            }
            dp.apply(&rs).unwrap_or_else(|e| panic!("{at}: apply: {e}"));

            for probe in &step.probes {
                let proto = Protocol::from_api(&probe.protocol)
                    .unwrap_or_else(|| panic!("{at}: protocol {}", probe.protocol));
                let want = expected(probe);
                let pairs: Vec<(usize, usize)> = (0..9)
                    .flat_map(|f| (0..9).map(move |t| (f, t)))
                    .filter(|(f, t)| f != t) // loopback is ignored upstream too
                    .collect();
                // The compiled model must agree with the expectation before the kernel is asked.
                for &(f, t) in &pairs {
                    let (fp, tp) = (pod_name(f), pod_name(t));
                    let peer = |s: &str| {
                        let (namespace, name) = s.split_once('/').expect("pod");
                        ExplainPeer::Pod {
                            namespace: namespace.into(),
                            name: name.into(),
                        }
                    };
                    let e = explain(&cluster, &peer(&fp), &peer(&tp), proto, probe.port)
                        .expect("explain");
                    if e.allowed != want[f][t] {
                        failures.push(format!(
                            "{at}: explain says {} for {fp} -> {tp} {}/{proto}, expected {}:\n{e}",
                            e.allowed, probe.port, want[f][t]
                        ));
                    }
                }
                let mut got = probe_matrix(&lab, &pairs, proto, probe.port, PROBE_TIMEOUT);
                probes_run += pairs.len();
                let retry: Vec<usize> = (0..pairs.len())
                    .filter(|&i| got[i] != want[pairs[i].0][pairs[i].1])
                    .collect();
                if !retry.is_empty() {
                    let again: Vec<(usize, usize)> = retry.iter().map(|&i| pairs[i]).collect();
                    let res = probe_matrix(&lab, &again, proto, probe.port, RETRY_TIMEOUT);
                    for (k, &i) in retry.iter().enumerate() {
                        got[i] = res[k];
                    }
                }
                let mut got_m = [[None; 9]; 9];
                let mut want_m = [[None; 9]; 9];
                let mut wrong = 0;
                for (i, &(f, t)) in pairs.iter().enumerate() {
                    got_m[f][t] = Some(got[i]);
                    want_m[f][t] = Some(want[f][t]);
                    if got[i] != want[f][t] {
                        wrong += 1;
                    }
                }
                if wrong > 0 {
                    failures.push(format!(
                        "{at}: {wrong} wrong probes on {}/{proto}\nexpected:\n{}got:\n{}",
                        probe.port,
                        table(&want_m),
                        table(&got_m)
                    ));
                }
            }
            if step.node_access {
                check_node_access(&lab, &at, &mut failures);
            }
            if !step.counted.is_empty() {
                let counters = dp.counters().expect("counters");
                for comment in &step.counted {
                    let packets = sepal_felix::nft::packets_for(&counters, comment);
                    if packets == 0 {
                        failures.push(format!("{at}: no packets counted for rule {comment:?}"));
                    }
                }
            }
        }
    }
    dp.delete().expect("delete table");
    eprintln!(
        "{file}: {} cases, {probes_run} probes in {:.1} s, {} failures",
        cases.len(),
        started.elapsed().as_secs_f64(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn check_node_access(lab: &Lab, at: &str, failures: &mut Vec<String>) {
    let node_ip: Ipv4Addr = NODE_IP.parse().expect("ip");
    let tcp80 = |client: &Netns, src, dst| ProbeSpec {
        client_netns: client.name().to_string(),
        src,
        dst,
        protocol: Protocol::Tcp,
        port: 80,
    };
    let mut what = Vec::new();
    let mut specs = Vec::new();
    for (i, pod) in lab.pods.iter().enumerate() {
        let ip = pod_ip(i / 3, i % 3);
        what.push(format!("node -> {}", pod_name(i)));
        specs.push(tcp80(&lab.node.node, node_ip, ip));
        what.push(format!("{} -> node", pod_name(i)));
        specs.push(tcp80(pod, ip, node_ip));
    }
    for (what, o) in what
        .iter()
        .zip(probe_all(&specs, RETRY_TIMEOUT, lab.servers.sctp()))
    {
        if !o.connected() {
            failures.push(format!("{at}: {what} TCP/80 was blocked ({o})"));
        }
    }
}

#[test]
fn upstream_netpol_scenarios_root() {
    run_cases("upstream.yaml");
}

#[test]
fn sepal_policy_cases_root() {
    run_cases("sepal.yaml");
}
