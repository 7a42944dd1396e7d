//! NetworkPolicy conformance, needs root: the upstream Kubernetes netpol e2e scenarios and
//! Sepal's own cases (tests/tests/policy/*.yaml), probed with real connections between pods.
//!
//! Lab: one node netns with 9 pod netns (namespaces x, y, z × pods a, b, c) attached exactly as
//! the CNI plugin does it (host veth `sep…`, /32 host route, proxy ARP for 169.254.1.1), every
//! pod serving TCP and UDP on ports 80 and 81 and receiving SCTP INITs on a raw socket (this
//! kernel has no SCTP sockets). Policy is compiled by felix's compiler and programmed by its
//! nftables dataplane; each expectation is also checked against `explain` on the same model.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sepal_felix::nft::{Dataplane, Options};
use sepal_felix::policy::{
    compile, explain, Cluster, ExplainPeer, NamedPort, Namespace, NetworkPolicy, Pod, Protocol,
};
use sepal_tests::netns::{veth, Netns};
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

fn enter_netns(name: &str) {
    let f = File::open(format!("/run/netns/{name}")).expect("open netns");
    // SAFETY: setns on a valid namespace fd only changes this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {name}: {}", std::io::Error::last_os_error());
}

/// SCTP INITs seen by the pods' raw sockets: (source, destination port, initiate tag).
type SctpSeen = Arc<Mutex<HashSet<(Ipv4Addr, u16, u32)>>>;

struct Lab {
    // Dropped last (declaration order): servers stop before their namespaces go.
    servers: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    sctp: SctpSeen,
    pods: Vec<Netns>,
    node: Netns,
    _uplink: Netns,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
    }
}

impl Lab {
    fn new() -> Lab {
        sepal_tests::require_root();
        let node = Netns::new("pnode");
        let uplink = Netns::new("pup");
        // A node always has an uplink with a default route; proxy ARP needs one.
        veth(&node, "eth0", &uplink, "eth0");
        node.run(&format!(
            "ip addr add {NODE_IP}/24 dev eth0 && ip route add default dev eth0 && sysctl -qw net.ipv4.ip_forward=1"
        ));
        let mut pods = Vec::new();
        for (ni, ns) in NAMESPACES.iter().enumerate() {
            for (pi, pod) in PODS.iter().enumerate() {
                let p = Netns::new(&format!("p{ns}{pod}"));
                let host = format!("sep{ns}{pod}");
                let ip = pod_ip(ni, pi);
                veth(&node, &host, &p, "eth0");
                node.run(&format!(
                    "ip link set {host} address ee:ee:ee:ee:ee:ee && \
                     sysctl -qw net.ipv4.conf.{host}.proxy_arp=1 net.ipv4.neigh.{host}.proxy_delay=0 && \
                     ip route add {ip}/32 dev {host} scope link"
                ));
                p.run(&format!(
                    "ip addr add {ip}/32 dev eth0 && ip route add 169.254.1.1 dev eth0 scope link && \
                     ip route add default via 169.254.1.1 dev eth0"
                ));
                pods.push(p);
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sctp: SctpSeen = Arc::default();
        let mut servers = Vec::new();
        for name in pods
            .iter()
            .map(|p| p.name().to_string())
            .chain([node.name().to_string()])
        {
            let (stop, sctp) = (stop.clone(), sctp.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            servers.push(std::thread::spawn(move || serve(&name, stop, sctp, tx)));
            rx.recv().expect("server started");
        }
        Lab {
            servers,
            stop,
            sctp,
            pods,
            node,
            _uplink: uplink,
        }
    }

    fn dataplane(&self) -> Dataplane {
        Dataplane::in_netns(self.node.path(), Options::default())
    }
}

/// Serves TCP and UDP (echo) on 80 and 81 and records SCTP INITs, until `stop`.
fn serve(netns: &str, stop: Arc<AtomicBool>, sctp: SctpSeen, ready: std::sync::mpsc::Sender<()>) {
    enter_netns(netns);
    let tcp: Vec<TcpListener> = PORTS
        .iter()
        .map(|p| TcpListener::bind(("0.0.0.0", *p)).expect("bind tcp"))
        .collect();
    let udp: Vec<UdpSocket> = PORTS
        .iter()
        .map(|p| UdpSocket::bind(("0.0.0.0", *p)).expect("bind udp"))
        .collect();
    for l in &tcp {
        l.set_nonblocking(true).expect("nonblocking");
    }
    for u in &udp {
        u.set_nonblocking(true).expect("nonblocking");
    }
    // SAFETY: plain socket(2); the fd is closed below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, 132) };
    assert!(
        raw >= 0,
        "raw sctp socket: {}",
        std::io::Error::last_os_error()
    );
    let _ = ready.send(());
    let mut fds: Vec<RawFd> = tcp.iter().map(|l| l.as_raw_fd()).collect();
    fds.extend(udp.iter().map(|u| u.as_raw_fd()));
    fds.push(raw);
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let mut pfds: Vec<libc::pollfd> = fds
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: pfds is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) };
        if n <= 0 {
            continue;
        }
        for l in &tcp {
            while let Ok((s, _)) = l.accept() {
                drop(s);
            }
        }
        for u in &udp {
            while let Ok((len, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(&buf[..len], from);
            }
        }
        loop {
            // SAFETY: buf is valid for buf.len() bytes.
            let len = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if len <= 0 {
                break;
            }
            let b = &buf[..len as usize];
            let ihl = ((b.first().copied().unwrap_or(0) & 0x0f) as usize) * 4;
            if b.len() < ihl + 32 || b[ihl + 12] != 1 {
                continue; // not an INIT
            }
            let src = Ipv4Addr::new(b[12], b[13], b[14], b[15]);
            let dport = u16::from_be_bytes([b[ihl + 2], b[ihl + 3]]);
            let tag = u32::from_be_bytes([b[ihl + 16], b[ihl + 17], b[ihl + 18], b[ihl + 19]]);
            sctp.lock().expect("lock").insert((src, dport, tag));
        }
    }
    // SAFETY: raw is our own open fd.
    unsafe { libc::close(raw) };
}

// ---------------------------------------------------------------------------------------------
// Probes

static NEXT_PORT: AtomicU16 = AtomicU16::new(20000);

/// A source port no earlier probe of this process used, so an old conntrack entry of an allowed
/// flow can never make a new probe look established.
fn fresh_port() -> u16 {
    let p = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    20000 + p % 40000
}

fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn sctp_init(sport: u16, dport: u16, tag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&0u32.to_be_bytes()); // verification tag 0 in an INIT
    p.extend_from_slice(&0u32.to_be_bytes()); // checksum, filled below
    p.extend_from_slice(&[1, 0]); // chunk INIT, flags
    p.extend_from_slice(&20u16.to_be_bytes());
    p.extend_from_slice(&tag.to_be_bytes()); // initiate tag
    p.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&10u16.to_be_bytes()); // outbound streams
    p.extend_from_slice(&10u16.to_be_bytes()); // inbound streams
    p.extend_from_slice(&tag.to_be_bytes()); // initial TSN
    let crc = crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}

fn probe_one(
    client_netns: &str,
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: Protocol,
    port: u16,
    timeout: Duration,
    sctp: &SctpSeen,
) -> bool {
    enter_netns(client_netns);
    let addr = SocketAddr::new(IpAddr::V4(dst), port);
    match proto {
        Protocol::Tcp => TcpStream::connect_timeout(&addr, timeout).is_ok(),
        Protocol::Udp => {
            let sock = loop {
                match UdpSocket::bind(("0.0.0.0", fresh_port())) {
                    Ok(s) => break s,
                    Err(e) if e.kind() == ErrorKind::AddrInUse => continue,
                    Err(e) => panic!("udp bind: {e}"),
                }
            };
            let nonce = fresh_port().to_be_bytes();
            if sock.connect(addr).is_err() || sock.send(&nonce).is_err() {
                return false;
            }
            sock.set_read_timeout(Some(timeout)).expect("timeout");
            let mut buf = [0u8; 16];
            matches!(sock.recv(&mut buf), Ok(2) if buf[..2] == nonce)
        }
        Protocol::Sctp => {
            let sport = fresh_port();
            let tag = 0x5e9a_0000 | sport as u32;
            let pkt = sctp_init(sport, port, tag);
            // SAFETY: plain socket(2) and sendto(2) with a valid sockaddr_in; fd closed below.
            let ok = unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, 132);
                assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
                let sa = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: 0,
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(dst).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                let n = libc::sendto(
                    fd,
                    pkt.as_ptr().cast(),
                    pkt.len(),
                    0,
                    (&sa as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                );
                libc::close(fd);
                n == pkt.len() as isize
            };
            if !ok {
                return false;
            }
            let deadline = Instant::now() + timeout;
            while Instant::now() < deadline {
                if sctp.lock().expect("lock").contains(&(src, port, tag)) {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            false
        }
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
    proto: Protocol,
    port: u16,
    timeout: Duration,
) -> Vec<bool> {
    std::thread::scope(|s| {
        let handles: Vec<_> = pairs
            .iter()
            .map(|&(f, t)| {
                let client = lab.pods[f].name().to_string();
                let sctp = lab.sctp.clone();
                s.spawn(move || {
                    probe_one(
                        &client,
                        pod_ip(f / 3, f % 3),
                        pod_ip(t / 3, t % 3),
                        proto,
                        port,
                        timeout,
                        &sctp,
                    )
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("probe thread"))
            .collect()
    })
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
    let node = lab.node.name().to_string();
    let node_ip: Ipv4Addr = NODE_IP.parse().expect("ip");
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for i in 0..9 {
            let (node, pod) = (node.clone(), lab.pods[i].name().to_string());
            let sctp = lab.sctp.clone();
            handles.push((
                format!("node -> {}", pod_name(i)),
                s.spawn(move || {
                    probe_one(
                        &node,
                        node_ip,
                        pod_ip(i / 3, i % 3),
                        Protocol::Tcp,
                        80,
                        RETRY_TIMEOUT,
                        &sctp,
                    )
                }),
            ));
            let sctp = lab.sctp.clone();
            handles.push((
                format!("{} -> node", pod_name(i)),
                s.spawn(move || {
                    probe_one(
                        &pod,
                        pod_ip(i / 3, i % 3),
                        node_ip,
                        Protocol::Tcp,
                        80,
                        RETRY_TIMEOUT,
                        &sctp,
                    )
                }),
            ));
        }
        for (what, h) in handles {
            if !h.join().expect("probe thread") {
                failures.push(format!("{at}: {what} TCP/80 was blocked"));
            }
        }
    });
}

#[test]
fn upstream_netpol_scenarios_root() {
    run_cases("upstream.yaml");
}

#[test]
fn sepal_policy_cases_root() {
    run_cases("sepal.yaml");
}
