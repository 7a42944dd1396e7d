//! Flow logs and per-rule metrics on a real node, needs root: `sepal node` with a dir datastore,
//! pods attached through the real CNI plugin, real nftables and nflog in the node's namespace.
//! `sepal flows` names a denied flow's pods and the rule that denied it (a default deny, and a
//! ClusterNetworkPolicy's named Deny rule with its tier; with `--flow-logs all`, also the rule
//! that allowed another flow), `--follow` streams a new one, and
//! `/metrics` counts packets per rule. A flood of denied SYNs with a new source port each is
//! bounded by the kernel's limit: the figures it prints are the ones docs/policy.md quotes.

use sepal_felix::policy::Protocol;
use sepal_tests::netns::{http_get, Netns};
use sepal_tests::node::{CniCall, Node};
use sepal_tests::podnet::{probe, Outcome, ProbeSpec, SctpSeen};
use serde_json::Value;
use std::io::BufRead;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn write(node: &Node, file: &str, yaml: &str) {
    std::fs::write(node.datastore.join(file), yaml).expect("write datastore object");
}

fn pod_yaml(name: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}\nspec: {{nodeName: {node}, containers: [{{name: c, image: x}}]}}\n"
    )
}

/// The server accepts the client on 8080 only: everything else to it meets its default deny.
const WEB: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}]}]\n";

/// An Admin-tier Deny rule with a name: the client's UDP to 5353 on the server.
const GUARDRAILS: &str = "apiVersion: policy.networking.k8s.io/v1alpha2\nkind: ClusterNetworkPolicy\nmetadata: {name: guardrails}\nspec:\n  tier: Admin\n  priority: 10\n  subject: {pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: server}}}}\n  ingress:\n  - name: no-mdns\n    action: Deny\n    from: [{pods: {namespaceSelector: {}, podSelector: {matchLabels: {app: client}}}}]\n    protocols: [{udp: {destinationPort: {number: 5353}}}]\n";

/// Attaches a pod through the real CNI plugin; returns its namespace and IPv4 address.
fn add_pod(node: &Node, tag: &str, name: &str) -> (Netns, Ipv4Addr) {
    let netns = Netns::new(tag);
    let call = CniCall::pod(&format!("ctr-{name}"), &netns.path(), "default", name);
    let out = node.cni("ADD", &call);
    assert!(
        out.status.success(),
        "ADD {name}: {}; agent log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        node.agent_log()
    );
    let result: Value = serde_json::from_slice(&out.stdout).expect("ADD result");
    let ip = result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .expect("an IPv4 address");
    (netns, ip)
}

/// Two pods of one node, the server isolated by `WEB`.
struct World {
    node: Node,
    _server: Netns,
    client: Netns,
    server_ip: Ipv4Addr,
    client_ip: Ipv4Addr,
}

fn world(tag: &str, block: &str, agent_args: &[&str]) -> World {
    let mut node = Node::new(tag, &[block]);
    write(&node, "pod-server.yaml", &pod_yaml("server", tag));
    write(&node, "pod-client.yaml", &pod_yaml("client", tag));
    write(&node, "np-web.yaml", WEB);
    node.agent_args = agent_args.iter().map(|a| a.to_string()).collect();
    node.start_agent();
    let (server, server_ip) = add_pod(&node, &format!("{tag}s"), "server");
    let (client, client_ip) = add_pod(&node, &format!("{tag}c"), "client");
    World {
        node,
        _server: server,
        client,
        server_ip,
        client_ip,
    }
}

impl World {
    fn probe(&self, protocol: Protocol, port: u16) -> Outcome {
        let spec = ProbeSpec {
            client_netns: self.client.name().to_string(),
            src: self.client_ip,
            dst: self.server_ip,
            protocol,
            port,
        };
        // The probe moves its thread into the client's netns: a thread of its own.
        std::thread::spawn(move || probe(&spec, Duration::from_millis(700), &SctpSeen::default()))
            .join()
            .expect("probe thread")
    }

    fn sepal(&self, args: &[&str]) -> Command {
        let admin = self.node.socket.with_file_name("admin.sock");
        let mut cmd = Command::new(sepal_tests::bin_path("sepal"));
        cmd.args(args)
            .args(["--admin-socket", admin.to_str().expect("utf-8")]);
        cmd
    }

    /// `sepal flows ARGS`: stdout, or a panic with stderr and the agent's log.
    fn flows(&self, args: &[&str]) -> String {
        let mut all = vec!["flows"];
        all.extend(args);
        let out = self.sepal(&all).output().expect("run sepal flows");
        assert!(
            out.status.success(),
            "sepal flows: {}; agent log:\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.node.agent_log()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The JSON records once `want` holds for them (within 5 s).
    fn records_until(&self, args: &[&str], want: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let mut all = vec!["--json"];
        all.extend(args);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let records: Vec<Value> = self
                .flows(&all)
                .lines()
                .map(|l| serde_json::from_str(l).expect("one JSON record per line"))
                .collect();
            if want(&records) {
                return records;
            }
            assert!(
                Instant::now() < deadline,
                "flow records never matched: {records:#?}; agent log:\n{}",
                self.node.agent_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn metrics(&self) -> String {
        let (code, body) = http_get(&self.node.netns.path(), "127.0.0.1:9099", "/metrics");
        assert_eq!(code, 200, "{body}");
        body
    }
}

/// The value of the series `name{labels}` in a text exposition (0 when absent).
fn series(metrics: &str, name_and_labels: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0)
}

fn is(record: &Value, key: &str, value: &str) -> bool {
    record[key].as_str() == Some(value)
}

#[test]
fn flows_name_the_rule_that_denied_and_the_one_that_allowed_root() {
    let w = world("flw", "10.244.12.0/24", &["--flow-logs", "all"]);
    write(&w.node, "cnp-guardrails.yaml", GUARDRAILS);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !w
        .node
        .netns
        .run("nft list table inet sepal")
        .contains("Admin/guardrails ingress[0] no-mdns")
    {
        assert!(Instant::now() < deadline, "{}", w.node.agent_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let table = w.node.netns.run("nft list table inet sepal");
    assert!(
        table.contains(r#"limit name "flow-log-denied" log prefix "drop default/server ingress default deny" group 83"#),
        "{table}"
    );
    assert!(
        table.contains(
            r#"limit name "flow-log-allowed" log prefix "accept default/web ingress[0]""#
        ),
        "{table}"
    );

    // Port 81 is dropped by the server's default deny; 8080 is allowed (and refused: nothing
    // listens), so its SYN met the accept rule.
    assert_eq!(w.probe(Protocol::Tcp, 81), Outcome::Timeout);
    assert!(matches!(w.probe(Protocol::Tcp, 8080), Outcome::Failed(_)));
    let (server, client) = (w.server_ip.to_string(), w.client_ip.to_string());
    let records = w.records_until(&[], |r| {
        r.iter().any(|r| is(r, "verdict", "denied"))
            && r.iter().any(|r| is(r, "verdict", "allowed"))
    });
    let denied = records
        .iter()
        .find(|r| is(r, "verdict", "denied"))
        .expect("denied record");
    for (key, value) in [
        ("node", "flw"),
        ("protocol", "TCP"),
        ("src_ip", client.as_str()),
        ("src_pod", "default/client"),
        ("dst_ip", server.as_str()),
        ("dst_pod", "default/server"),
        ("tier", "NetworkPolicy"),
        ("direction", "ingress"),
        ("rule", "ingress default deny"),
        ("comment", "default/server ingress default deny"),
    ] {
        assert!(
            is(denied, key, value),
            "{key} should be {value}: {denied:#}"
        );
    }
    assert_eq!(denied["dst_port"], 81, "{denied:#}");
    assert_eq!(denied["policy"], Value::Null, "{denied:#}");
    assert!(
        denied["src_port"].as_u64().is_some() && denied["packets"].as_u64() >= Some(1),
        "{denied:#}"
    );
    let allowed = records
        .iter()
        .find(|r| is(r, "verdict", "allowed"))
        .expect("allowed record");
    for (key, value) in [
        ("tier", "NetworkPolicy"),
        ("policy", "default/web"),
        ("rule", "ingress[0]"),
        ("src_pod", "default/client"),
    ] {
        assert!(
            is(allowed, key, value),
            "{key} should be {value}: {allowed:#}"
        );
    }
    assert_eq!(allowed["dst_port"], 8080, "{allowed:#}");

    // A ClusterNetworkPolicy's Deny rule: its tier, its policy and its rule's name.
    assert_eq!(w.probe(Protocol::Udp, 5353), Outcome::Timeout);
    let records = w.records_until(&["--denied"], |r| r.iter().any(|r| r["dst_port"] == 5353));
    let cnp = records
        .iter()
        .find(|r| r["dst_port"] == 5353)
        .expect("the Deny record");
    for (key, value) in [
        ("verdict", "denied"),
        ("protocol", "UDP"),
        ("tier", "Admin"),
        ("policy", "guardrails"),
        ("direction", "ingress"),
        ("rule", "ingress[0] no-mdns"),
        ("comment", "Admin/guardrails ingress[0] no-mdns"),
        ("src_pod", "default/client"),
        ("dst_pod", "default/server"),
    ] {
        assert!(is(cnp, key, value), "{key} should be {value}: {cnp:#}");
    }

    // The text form: one line per record, the pods beside their addresses, the deciding rule.
    let text = w.flows(&["--denied"]);
    let line = text
        .lines()
        .find(|l| l.contains(":81 "))
        .unwrap_or_else(|| panic!("{text}"));
    for part in [
        " denied ".to_string(),
        format!(" TCP   {client}:"),
        " (default/client) -> ".to_string(),
        format!(
            " {server}:81 (default/server)  NetworkPolicy: default/server ingress default deny"
        ),
    ] {
        assert!(line.contains(&part), "{part:?} missing from {line:?}");
    }
    assert!(!text.contains(" allowed "), "--denied only: {text}");

    // --follow prints what is held, then each new record as it comes.
    let mut follow = w
        .sepal(&["flows", "--follow", "--json", "--denied"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("sepal flows --follow");
    let stdout = follow.stdout.take().expect("stdout");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first = lines
        .recv_timeout(Duration::from_secs(5))
        .expect("the held record");
    assert!(first.contains("\"dst_port\":81"), "{first}");
    assert_eq!(w.probe(Protocol::Udp, 9999), Outcome::Timeout);
    let deadline = Instant::now() + Duration::from_secs(5);
    let udp = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .expect("the new UDP record, streamed");
        if line.contains("\"dst_port\":9999") {
            break line;
        }
    };
    sepal_tests::netns::kill(&mut follow);
    let udp: Value = serde_json::from_str(&udp).expect("JSON");
    assert_eq!(udp["dst_port"], 9999, "{udp:#}");
    assert!(is(&udp, "dst_pod", "default/server"), "{udp:#}");

    // Prometheus: the kernel's counts per rule, labelled by tier, policy, rule and verdict.
    let m = w.metrics();
    let deny = series(
        &m,
        r#"sepal_policy_rule_packets_total{tier="NetworkPolicy",policy="",rule="default/server ingress default deny",verdict="denied"}"#,
    );
    let allow = series(
        &m,
        r#"sepal_policy_rule_packets_total{tier="NetworkPolicy",policy="default/web",rule="default/web ingress[0]",verdict="allowed"}"#,
    );
    let admin = series(
        &m,
        r#"sepal_policy_rule_packets_total{tier="Admin",policy="guardrails",rule="Admin/guardrails ingress[0] no-mdns",verdict="denied"}"#,
    );
    assert!(
        deny >= 2 && allow >= 1 && admin >= 1,
        "deny {deny}, allow {allow}, admin {admin}:\n{m}"
    );
    assert!(
        series(&m, r#"sepal_flow_log_packets_total{verdict="denied"}"#) >= 2,
        "{m}"
    );
    assert_eq!(series(&m, "sepal_policy_rule_overflow_rules"), 0, "{m}");
}

/// CPU ticks (user + system) the process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // After the command name's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime")
}

/// The agent's pid: the `sepal` process in the node's namespace.
fn agent_pid(node: &Node) -> u32 {
    let pids = Command::new("ip")
        .args(["netns", "pids", node.netns.name()])
        .output()
        .expect("ip netns pids");
    String::from_utf8_lossy(&pids.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse::<u32>().ok())
        .find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "sepal")
        })
        .expect("the agent's process")
}

/// The Internet checksum of `data` with `sum` folded in.
fn checksum(data: &[u8], mut sum: u32) -> u16 {
    for pair in data.chunks(2) {
        sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A TCP SYN from `src:sport` to `dst:dport` (the header only; the kernel adds the IP header).
fn syn(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0..2].copy_from_slice(&sport.to_be_bytes());
    h[2..4].copy_from_slice(&dport.to_be_bytes());
    h[4..8].copy_from_slice(&u32::from(sport).wrapping_mul(2654435761).to_be_bytes());
    h[12] = 5 << 4;
    h[13] = 0x02;
    h[14..16].copy_from_slice(&64240u16.to_be_bytes());
    let pseudo: u32 = [src.octets(), dst.octets()]
        .iter()
        .flat_map(|o| {
            [
                u16::from_be_bytes([o[0], o[1]]),
                u16::from_be_bytes([o[2], o[3]]),
            ]
        })
        .map(u32::from)
        .sum::<u32>()
        + 6
        + 20;
    let sum = checksum(&h, pseudo);
    h[16..18].copy_from_slice(&sum.to_be_bytes());
    h
}

/// Sends SYNs from the client to `dst:dport` for `how_long`, a new source port each (every one
/// a new flow for conntrack and the log); returns how many were sent.
fn syn_flood(client: &Netns, src: Ipv4Addr, dst: Ipv4Addr, dport: u16, how_long: Duration) -> u64 {
    sepal_felix::netns::on_thread_in(&client.path(), move || {
        // SAFETY: a raw TCP socket, sendto with a valid sockaddr_in and buffer; closed below.
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_TCP);
            assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let sa = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(dst).to_be(),
                },
                sin_zero: [0; 8],
            };
            let end = Instant::now() + how_long;
            let mut sent = 0u64;
            while Instant::now() < end {
                for _ in 0..256 {
                    let sport = 1024 + (sent % 64000) as u16;
                    let pkt = syn(src, dst, sport, dport);
                    let n = libc::sendto(
                        fd,
                        pkt.as_ptr().cast(),
                        pkt.len(),
                        0,
                        (&sa as *const libc::sockaddr_in).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    );
                    if n == pkt.len() as isize {
                        sent += 1;
                    }
                }
            }
            libc::close(fd);
            sent
        }
    })
    .expect("enter the client's netns")
}

/// Packets the server's default deny dropped (its rule's kernel counter).
fn default_deny_drops(node: &Node) -> u64 {
    let table = node.netns.run("nft list table inet sepal");
    table
        .lines()
        .filter(|l| l.contains(r#"comment "default/server ingress default deny""#))
        .filter_map(|l| {
            let at = l.find("counter packets ")? + "counter packets ".len();
            l[at..].split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// One flood against a fresh node running with `agent_args`: SYNs sent and dropped per second,
/// flow-log packets read per second, the agent's CPU share of one core.
fn flood(tag: &str, block: &str, agent_args: &[&str], seconds: u64) -> Flood {
    let w = world(tag, block, agent_args);
    // The reader is bound once the first denied packet comes back as a record.
    if !agent_args.contains(&"off") {
        assert_eq!(w.probe(Protocol::Tcp, 81), Outcome::Timeout);
        w.records_until(&[], |r| !r.is_empty());
    }
    let pid = agent_pid(&w.node);
    let hz = 100.0; // USER_HZ on Linux.
                    // What the agent costs at rest over as long, for comparison.
    let idle0 = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(seconds));
    let idle = (cpu_ticks(pid) - idle0) as f64 / hz / seconds as f64;
    let (logged0, drops0, cpu0) = (
        series(
            &w.metrics(),
            r#"sepal_flow_log_packets_total{verdict="denied"}"#,
        ),
        default_deny_drops(&w.node),
        cpu_ticks(pid),
    );
    let started = Instant::now();
    let sent = syn_flood(
        &w.client,
        w.client_ip,
        w.server_ip,
        81,
        Duration::from_secs(seconds),
    );
    let took = started.elapsed().as_secs_f64();
    // The last batch reaches the reader within 0.1 s.
    std::thread::sleep(Duration::from_millis(300));
    let cpu = (cpu_ticks(pid) - cpu0) as f64 / hz / took;
    let logged = series(
        &w.metrics(),
        r#"sepal_flow_log_packets_total{verdict="denied"}"#,
    ) - logged0;
    let drops = default_deny_drops(&w.node) - drops0;
    // The agent still answers, and an allowed connection still gets through.
    let status = w
        .sepal(&["status", "--json"])
        .output()
        .expect("sepal status");
    assert!(status.status.success(), "the agent stopped answering");
    assert!(matches!(w.probe(Protocol::Tcp, 8080), Outcome::Failed(_)));
    Flood {
        sent: sent as f64 / took,
        dropped: drops as f64 / took,
        logged: logged as f64 / took,
        cpu,
        idle,
    }
}

/// A flood's figures, per second of it.
struct Flood {
    sent: f64,
    dropped: f64,
    logged: f64,
    /// The agent's CPU share of one core during the flood, and at rest before it.
    cpu: f64,
    idle: f64,
}

/// A denied SYN flood: the kernel logs at most the rate (100/s by default, plus its burst of as
/// many), the agent reads that much and no more, and its CPU stays small while every SYN is
/// still dropped and counted.
#[test]
fn a_denied_syn_flood_is_bounded_in_the_kernel_root() {
    let seconds = 3;
    let on = flood("flf", "10.244.13.0/24", &[], seconds);
    let off = flood("flo", "10.244.14.0/24", &["--flow-logs", "off"], seconds);
    for (what, f) in [("on", &on), ("off", &off)] {
        eprintln!(
            "flow logs {what}: {:.0} SYNs/s sent, {:.0}/s dropped by the default deny, {:.0} records/s read, agent CPU {:.1}% of a core ({:.1}% at rest)",
            f.sent,
            f.dropped,
            f.logged,
            f.cpu * 100.0,
            f.idle * 100.0
        );
    }
    assert!(
        on.dropped > 1000.0,
        "the flood did not reach the rule: {}/s",
        on.dropped
    );
    // 100/s for the flood's seconds plus one burst of 100, over the flood's time.
    let bound = 100.0 + 100.0 / seconds as f64;
    assert!(
        on.logged <= bound * 1.1 && on.logged >= 50.0,
        "{} records/s read, bound {bound}",
        on.logged
    );
    assert_eq!(off.logged, 0.0);
    // Reading the bounded log costs the agent next to nothing beyond its cost at rest.
    assert!(
        on.cpu < on.idle + 0.10,
        "the agent used {:.1}% of a core ({:.1}% at rest)",
        on.cpu * 100.0,
        on.idle * 100.0
    );
}
