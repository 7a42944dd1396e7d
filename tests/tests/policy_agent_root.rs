//! `sepal policy explain` against the real agent, needs root: a node running `sepal node` with a
//! dir datastore holding two pods and a NetworkPolicy; the CLI asks the agent over its operator
//! socket and reports the verdict, the deciding rule, and the packets the kernel counted for it.
//! Also the agent's own paths: default-deny drops logged to nflog, a remote pod's address reaching
//! this node's sets, and revocation of an established flow a policy change denies.

use sepal_tests::netns::Netns;
use sepal_tests::node::{CniCall, Node};
use serde_json::Value;
use std::fs::File;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

fn write(node: &Node, file: &str, yaml: &str) {
    std::fs::write(node.datastore.join(file), yaml).expect("write datastore object");
}

fn pod_yaml(name: &str, node: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}\nspec: {{nodeName: {node}, containers: [{{name: c, image: x}}]}}\n"
    )
}

/// Attaches a pod through the real CNI plugin; returns its namespace and IPv4 address.
fn add_pod(node: &Node, tag: &str, name: &str) -> (Netns, String) {
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
        .expect("address")
        .split('/')
        .next()
        .expect("ip")
        .to_string();
    (netns, ip)
}

/// A TCP connection attempt from inside `netns`; true when it was answered (accepted or refused).
fn answered(netns: &Netns, ip: &str, port: u16, wait: Duration) -> bool {
    let path = netns.path();
    let addr = format!("{ip}:{port}").parse().expect("addr");
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = File::open(&path).expect("netns");
            // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            match TcpStream::connect_timeout(&addr, wait) {
                Ok(_) => true,
                Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
            }
        })
        .join()
        .expect("connect thread")
    })
}

/// `tcpdump` on an nflog group in the node's namespace, started and listening.
struct NflogReader {
    child: std::process::Child,
    _stderr: std::io::BufReader<std::process::ChildStderr>,
}

impl NflogReader {
    fn start(node: &Node, group: u16) -> NflogReader {
        use std::io::BufRead;
        let mut child = node
            .netns
            .command(&[
                "tcpdump",
                "-n",
                "-l",
                "-c",
                "1",
                "-i",
                &format!("nflog:{group}"),
            ])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("start tcpdump");
        // It says so on stderr once it is bound to the group.
        let mut stderr = std::io::BufReader::new(child.stderr.take().expect("stderr"));
        let mut said = String::new();
        while !said.contains("listening on") {
            let mut line = String::new();
            if stderr.read_line(&mut line).expect("tcpdump stderr") == 0 {
                panic!("tcpdump ended: {said}");
            }
            said.push_str(&line);
        }
        NflogReader {
            child,
            _stderr: stderr,
        }
    }

    /// The first logged packet as tcpdump prints it ("" if none came in time).
    fn first_packet(mut self, wait: Duration) -> String {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if self.child.try_wait().expect("tcpdump").is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let out = self.child.wait_with_output().expect("tcpdump output");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

fn explain(node: &Node, port: &str) -> Value {
    let admin = node.socket.with_file_name("admin.sock");
    let out = Command::new(sepal_tests::bin_path("sepal"))
        .args([
            "policy",
            "explain",
            "--admin-socket",
            admin.to_str().expect("utf-8"),
            "--from",
            "default/client",
            "--to",
            "default/server",
            "--port",
            port,
            "--json",
        ])
        .output()
        .expect("run sepal policy explain");
    assert!(
        out.status.success(),
        "sepal policy explain: {}; agent log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.agent_log()
    );
    serde_json::from_slice(&out.stdout).expect("explain JSON")
}

#[test]
fn explain_asks_the_agent_and_cross_checks_the_counters_root() {
    let mut node = Node::new("pxn", &["10.244.9.0/24"]);
    write(&node, "pod-server.yaml", &pod_yaml("server", "pxn"));
    write(&node, "pod-client.yaml", &pod_yaml("client", "pxn"));
    write(
        &node,
        "np-web.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}]}]\n",
    );
    node.agent_args = vec!["--policy-log-drops=7".into()];
    node.start_agent();
    // The server's namespace lives as long as the test (dropping it would remove the pod).
    let (_server, server_ip) = add_pod(&node, "pxs", "server");
    let (client, _) = add_pod(&node, "pxc", "client");
    let table = node.netns.run("nft list table inet sepal");
    assert!(
        table.contains(r#"log prefix "sepal default/server ingress default deny: " group 7 drop"#),
        "{table}"
    );

    // Port 8080 is allowed (refused: nothing listens); port 81 is dropped by the policy, and the
    // drop is logged to nflog group 7.
    assert!(answered(&client, &server_ip, 8080, Duration::from_secs(3)));
    let nflog = NflogReader::start(&node, 7);
    assert!(!answered(
        &client,
        &server_ip,
        81,
        Duration::from_millis(700)
    ));
    let logged = nflog.first_packet(Duration::from_secs(5));
    assert!(
        logged.contains(&format!("{server_ip}.81:")),
        "nflog group 7 saw: {logged:?}"
    );

    let ok = explain(&node, "8080/TCP");
    assert_eq!(ok["allowed"], true, "{ok}");
    let text = ok["text"].as_str().expect("text");
    assert!(text.contains("allowed by default/web ingress[0]"), "{text}");
    assert!(
        ok["ingress_packets"].as_u64().is_some_and(|n| n >= 1),
        "{ok}"
    );

    let denied = explain(&node, "81/TCP");
    assert_eq!(denied["allowed"], false, "{denied}");
    let text = denied["text"].as_str().expect("text");
    assert!(text.contains("isolated by default/web"), "{text}");
    assert!(text.contains("default deny dropped"), "{text}");
    assert!(
        denied["ingress_packets"].as_u64().is_some_and(|n| n >= 1),
        "{denied}"
    );
    assert_eq!(denied["egress_packets"], Value::Null, "{denied}");
}

/// Another node's pod gets its address (Pod `status.podIPs` in the datastore): this node adds it to
/// the sets of the policies that select it. Prints how long that took (the dir datastore waits
/// for a quiet time of 10 ms after a change before reading it).
#[test]
fn a_remote_pods_new_address_reaches_this_nodes_sets_root() {
    let mut node = Node::new("prn", &["10.244.10.0/24"]);
    write(&node, "pod-server.yaml", &pod_yaml("server", "prn"));
    write(
        &node,
        "np-web.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]\n",
    );
    node.start_agent();
    let (_server, _) = add_pod(&node, "prs", "server");
    let table = || node.netns.run("nft list table inet sepal");
    assert!(!table().contains("10.244.50.7"));

    let started = Instant::now();
    write(
        &node,
        "pod-client.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: client, namespace: default, labels: {app: client}}\nspec: {nodeName: elsewhere, containers: [{name: c, image: x}]}\nstatus: {phase: Running, podIP: 10.244.50.7, podIPs: [{ip: 10.244.50.7}]}\n",
    );
    let deadline = started + Duration::from_secs(10);
    while !table().contains("10.244.50.7") {
        assert!(
            Instant::now() < deadline,
            "the remote pod's address never reached the sets; agent log:\n{}",
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    eprintln!(
        "remote pod address in this node's sets after {} ms",
        started.elapsed().as_millis()
    );
}

/// Runs `f` on a thread inside `netns`.
fn in_netns<T: Send>(netns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    sepal_felix::netns::on_thread_in(&netns.path(), f).expect("enter netns")
}

/// A TCP connection from `client` to a listener on `server_ip:port` in `server`: both ends.
fn connected(client: &Netns, server: &Netns, server_ip: &str, port: u16) -> (TcpStream, TcpStream) {
    let listener = in_netns(server, || {
        std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind")
    });
    let addr: std::net::SocketAddr = format!("{server_ip}:{port}").parse().expect("addr");
    let client = in_netns(client, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect")
    });
    let (server, _) = listener.accept().expect("accept");
    (client, server)
}

/// Runs `f` on a thread of its own inside the namespace at `netns`, in the background.
fn spawn_in_netns<T: Send + 'static>(
    netns: std::path::PathBuf,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    std::thread::spawn(move || sepal_felix::netns::on_thread_in(&netns, f).expect("enter netns"))
}

/// Does `text` arrive at the server within `wait`?
fn delivered(client: &mut TcpStream, server: &mut TcpStream, text: &str, wait: Duration) -> bool {
    use std::io::{Read, Write};
    client.write_all(text.as_bytes()).expect("client write");
    let mut buf = vec![0u8; text.len()];
    server.set_read_timeout(Some(wait)).expect("timeout");
    server.read_exact(&mut buf).is_ok() && buf == text.as_bytes()
}

/// The agent revokes: a policy change that denies an established connection between two of its
/// pods removes the flow's conntrack entry, and the connection stops.
#[test]
fn the_agent_revokes_an_established_flow_a_change_denies_root() {
    let mut node = Node::new("pvn", &["10.244.11.0/24"]);
    write(&node, "pod-server.yaml", &pod_yaml("server", "pvn"));
    write(&node, "pod-client.yaml", &pod_yaml("client", "pvn"));
    let web = |port: u16| {
        format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: web, namespace: default}}\nspec:\n  podSelector: {{matchLabels: {{app: server}}}}\n  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: client}}}}}}], ports: [{{port: {port}}}]}}]\n")
    };
    write(&node, "np-web.yaml", &web(8080));
    node.start_agent();
    let (server_ns, server_ip) = add_pod(&node, "pvs", "server");
    let (client_ns, _) = add_pod(&node, "pvc", "client");

    let (mut client, mut server) = connected(&client_ns, &server_ns, &server_ip, 8080);
    assert!(delivered(
        &mut client,
        &mut server,
        "one",
        Duration::from_secs(2)
    ));

    // Only port 9999 from now on: the established connection to 8080 must stop.
    write(&node, "np-web.yaml", &web(9999));
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 0;
    while delivered(
        &mut client,
        &mut server,
        &format!("m{n:03}"),
        Duration::from_millis(300),
    ) {
        assert!(
            Instant::now() < deadline,
            "the denied connection still delivers; agent log:\n{}",
            node.agent_log()
        );
        n += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let log = node.agent_log();
    assert!(
        log.contains("NetworkPolicy revoked established flows"),
        "{log}"
    );
}

/// TCP retransmissions counted by the kernel of `netns` (`RetransSegs` of /proc/net/snmp).
fn tcp_retransmits(netns: &Netns) -> u64 {
    let snmp = netns.run("cat /proc/net/snmp");
    let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
    let (names, values) = (tcp.next().unwrap_or(""), tcp.next().unwrap_or(""));
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RetransSegs")
        .and_then(|(_, v)| v.parse().ok())
        .expect("RetransSegs in /proc/net/snmp")
}

/// `ping` from `from` to `to`: 400 echoes 10 ms apart (4 s); returns how many were answered.
fn spawn_ping(from: &Netns, to: &str) -> std::process::Child {
    from.command(&["ping", "-q", "-n", "-i", "0.01", "-c", "400", "-W", "1", to])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("ping")
}

fn received(ping: std::process::Child) -> (u32, u32) {
    let out = ping.wait_with_output().expect("ping output");
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("ping summary: {text}"));
    let n = |what: &str| -> u32 {
        line.split(',')
            .find(|p| p.contains(what))
            .and_then(|p| p.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    (n("transmitted"), n("received"))
}

/// kill -9 and restart of the agent while policy is in force: the isolated server keeps its
/// allowed flows (a 100 Hz ping and a TCP stream from the client lose nothing: every echo is
/// answered, no segment is retransmitted) and its denied ones (the intruder's pings and
/// connection attempts, the client's pings to the intruder, which its egress policy forbids)
/// never pass, during the restart or after. The table `inet sepal` is there throughout: the new
/// agent adopts it and replaces it atomically, and says so.
#[test]
fn policy_holds_across_an_agent_kill_and_restart_root() {
    let mut node = Node::new("prs", &["10.244.12.0/24"]);
    for name in ["server", "client", "intruder"] {
        write(&node, &format!("pod-{name}.yaml"), &pod_yaml(name, "prs"));
    }
    write(
        &node,
        "np-server.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: server, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  policyTypes: [Ingress]\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}]}]\n",
    );
    write(
        &node,
        "np-client.yaml",
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: client, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Egress]\n  egress: [{to: [{podSelector: {matchLabels: {app: server}}}]}]\n",
    );
    node.start_agent();
    let (server_ns, server_ip) = add_pod(&node, "prv", "server");
    let (client_ns, _) = add_pod(&node, "prc", "client");
    let (intruder_ns, intruder_ip) = add_pod(&node, "pri", "intruder");

    // The stream: the client sends a counter every 5 ms until told to stop; the server checks
    // that every value arrives, in order.
    let (mut client, mut server) = connected(&client_ns, &server_ns, &server_ip, 8080);
    let retransmits_before = tcp_retransmits(&client_ns) + tcp_retransmits(&server_ns);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sender = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut n: u64 = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                client.write_all(&n.to_be_bytes()).expect("stream write");
                n += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            n
        })
    };
    let receiver = std::thread::spawn(move || {
        use std::io::Read;
        server
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let (mut expect, mut buf) = (0u64, [0u8; 8]);
        while server.read_exact(&mut buf).is_ok() {
            assert_eq!(u64::from_be_bytes(buf), expect, "stream out of order");
            expect += 1;
        }
        expect
    });
    // Denied probes: the intruder's connection attempts, one every 50 ms.
    let probes = {
        let (stop, intruder_path) = (stop.clone(), intruder_ns.path());
        let to: std::net::SocketAddr = format!("{server_ip}:8080").parse().expect("addr");
        spawn_in_netns(intruder_path, move || {
            let (mut tried, mut answered) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                tried += 1;
                match TcpStream::connect_timeout(&to, Duration::from_millis(50)) {
                    Ok(_) => answered += 1,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => answered += 1,
                    Err(_) => {}
                }
            }
            (tried, answered)
        })
    };
    // The table, looked at every 10 ms: it must never be missing.
    let watcher = {
        let (stop, netns_path) = (stop.clone(), node.netns.path());
        spawn_in_netns(netns_path, move || {
            let (mut looks, mut missing) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                looks += 1;
                let ok = Command::new("nft")
                    .args(["list", "tables", "inet"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).contains("table inet sepal\n"))
                    .unwrap_or(false);
                if !ok {
                    missing += 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (looks, missing)
        })
    };
    let allowed = spawn_ping(&client_ns, &server_ip);
    let denied_in = spawn_ping(&intruder_ns, &server_ip);
    let denied_out = spawn_ping(&client_ns, &intruder_ip);

    std::thread::sleep(Duration::from_millis(800));
    node.kill_agent();
    std::thread::sleep(Duration::from_millis(300));
    node.start_agent();
    let (sent, got) = received(allowed);
    let (sent_in, got_in) = received(denied_in);
    let (sent_out, got_out) = received(denied_out);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let written = sender.join().expect("sender");
    let read = receiver.join().expect("receiver");
    let (tried, answered) = probes.join().expect("probes");
    let (looks, missing) = watcher.join().expect("watcher");
    let retransmits =
        tcp_retransmits(&client_ns) + tcp_retransmits(&server_ns) - retransmits_before;
    eprintln!(
        "across the restart: allowed ping {got}/{sent}, stream {read}/{written} values with {retransmits} \
         retransmissions; denied: intruder ping {got_in}/{sent_in}, client->intruder ping {got_out}/{sent_out}, \
         intruder connects answered {answered}/{tried}; table missing {missing}/{looks} looks"
    );
    let log = node.agent_log();
    assert_eq!(got, sent, "allowed echoes lost across the restart\n{log}");
    assert_eq!(read, written, "stream values lost\n{log}");
    assert_eq!(
        retransmits, 0,
        "allowed TCP segments were lost (retransmitted)"
    );
    assert_eq!(got_in, 0, "intruder pings passed");
    assert_eq!(got_out, 0, "the client's denied egress passed");
    assert_eq!(answered, 0, "intruder connections passed");
    assert_eq!(
        missing, 0,
        "table inet sepal was missing during the restart"
    );
    assert!(
        log.contains("adopted the previous run's policy table"),
        "the agent does not say it adopted the table:\n{log}"
    );
}
