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
    let path = netns.path();
    std::thread::scope(|s| {
        s.spawn(|| {
            let ns = File::open(&path).expect("netns");
            // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            f()
        })
        .join()
        .expect("netns thread")
    })
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

    let listener = in_netns(&server_ns, || {
        std::net::TcpListener::bind(("0.0.0.0", 8080)).expect("bind")
    });
    let addr: std::net::SocketAddr = format!("{server_ip}:8080").parse().expect("addr");
    let mut client = in_netns(&client_ns, || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(3)).expect("connect")
    });
    let (mut server, _) = listener.accept().expect("accept");
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
