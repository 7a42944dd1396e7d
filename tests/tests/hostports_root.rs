//! Root integration tests for hostPorts: the real agent and `sepal-cni` given the runtime's
//! `portMappings`, with real servers in the pods and real clients on the node and in pods.
//! The mappings are those of the upstream Conformance test "HostPort validates that there is no
//! conflict between pods with same hostPort but different hostIP and protocol".

use sepal_tests::netns::{kill, Netns};
use sepal_tests::node::{CniCall, Node};
use serde_json::{json, Value};
use std::process::{Child, Output, Stdio};

const NODE_IP: &str = "10.255.255.2";
const PORT: u16 = 54323;

/// Answers every TCP connection and every UDP datagram on port 8080 with the pod's name and the
/// client's address as the pod sees it.
const SERVER: &str = r#"
import socket, sys, threading
name = sys.argv[1]
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
t.bind(("0.0.0.0", 8080)); t.listen(16)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.bind(("0.0.0.0", 8080))
def udp():
    while True:
        _, peer = u.recvfrom(512); u.sendto(f"{name} {peer[0]}".encode(), peer)
threading.Thread(target=udp, daemon=True).start()
print("ready", flush=True)
while True:
    c, peer = t.accept(); c.recv(4096)
    c.sendall(f"HTTP/1.0 200 OK\r\n\r\n{name} {peer[0]}".encode()); c.close()
"#;

struct Pod {
    netns: Netns,
    call: CniCall,
    ip: String,
    server: Option<Child>,
}

impl Drop for Pod {
    fn drop(&mut self) {
        if let Some(s) = self.server.as_mut() {
            kill(s);
        }
    }
}

fn config(node: &Node, mappings: Value) -> String {
    let mut conf: Value = serde_json::from_str(&node.cni_config("1.1.0")).unwrap();
    conf["runtimeConfig"] = json!({ "portMappings": mappings });
    conf.to_string()
}

fn describe(out: &Output) -> String {
    format!(
        "status {} stdout {} stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn add(node: &Node, name: &str, mappings: Value) -> Pod {
    let netns = Netns::new(&format!("hp{name}"));
    let call = CniCall::pod(&format!("ctr-{name}"), &netns.path(), "default", name)
        .with_config(config(node, mappings));
    let out = node.cni("ADD", &call);
    assert!(out.status.success(), "ADD {name}: {}", describe(&out));
    let result: Value = serde_json::from_slice(&out.stdout).unwrap();
    let ip = result["ips"][0]["address"]
        .as_str()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut server = netns
        .command(&["python3", "-u", "-c", SERVER, name])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the pod's server");
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.as_mut().expect("server stdout")),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "ready", "server in pod {name}");
    Pod {
        netns,
        call,
        ip,
        server: Some(server),
    }
}

/// One mapping as the CNI conventions spell it.
fn mapping(protocol: &str, host_ip: &str) -> Value {
    json!([{ "hostPort": PORT, "containerPort": 8080, "protocol": protocol, "hostIP": host_ip }])
}

/// One mapping as containerd sends it: its Go struct's field names.
fn containerd_mapping(protocol: &str, host_ip: &str) -> Value {
    json!([{ "HostPort": PORT, "ContainerPort": 8080, "Protocol": protocol, "HostIP": host_ip }])
}

/// `curl` from `from` (extra flags first); the server's answer: "pod client-address".
fn http(from: &Netns, flags: &str, host: &str) -> Result<String, String> {
    from.try_run(&format!(
        "curl -sS -g --max-time 5 {flags} http://{host}:{PORT}/hostname"
    ))
}

fn udp(from: &Netns, host: &str) -> Result<String, String> {
    from.try_run(&format!("echo hostname | nc -u -w 2 {host} {PORT}"))
}

#[test]
fn hostports_reach_their_pods_on_each_address_and_protocol() {
    sepal_tests::require_root();
    let mut node = Node::new("hpn", &["10.244.7.0/24"]);
    node.start_agent();
    let pod1 = add(&node, "pod1", mapping("tcp", "127.0.0.1"));
    let pod2 = add(&node, "pod2", mapping("tcp", NODE_IP));
    let pod3 = add(&node, "pod3", containerd_mapping("udp", NODE_IP));
    let client = add(&node, "client", json!([]));

    // The upstream test's three commands, from the node itself.
    let via_localhost = http(&node.netns, &format!("--interface {NODE_IP}"), "127.0.0.1");
    assert!(
        via_localhost
            .as_deref()
            .is_ok_and(|r| r.starts_with("pod1 ")),
        "{via_localhost:?}\n{}",
        node.netns.run("nft list table inet sepal-hostports")
    );
    let via_node_ip = http(&node.netns, "", NODE_IP).unwrap();
    assert!(via_node_ip.starts_with("pod2 "), "{via_node_ip}");
    let over_udp = udp(&node.netns, NODE_IP).unwrap();
    assert!(over_udp.starts_with("pod3 "), "{over_udp}");
    // Plain localhost (loopback source) works too: masqueraded, since the reply cannot be
    // addressed to 127.0.0.1 from the pod.
    let plain = http(&node.netns, "", "127.0.0.1").unwrap();
    assert!(plain.starts_with("pod1 "), "{plain}");

    // From another pod the node's address maps too, and the pod sees the client's own address.
    let from_pod = http(&client.netns, "", NODE_IP).unwrap();
    assert_eq!(from_pod, format!("pod2 {}", client.ip));
    // A pod reaching its own hostPort (hairpin) is answered.
    let hairpin = http(&pod2.netns, "", NODE_IP).unwrap();
    assert!(hairpin.starts_with("pod2 "), "{hairpin}");
    // 127.0.0.1 inside a pod is the pod's own loopback, never the node's mapping.
    assert!(http(&client.netns, "", "127.0.0.1").is_err());

    // A mapping on every node address overlaps pod2's: refused, with nothing left behind.
    let netns = Netns::new("hpdup");
    let call = CniCall::pod("ctr-dup", &netns.path(), "default", "dup")
        .with_config(config(&node, mapping("tcp", "")));
    let out = node.cni("ADD", &call);
    assert!(!out.status.success(), "{}", describe(&out));
    let err: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(err["code"], 104, "{err}");
    assert!(
        err["msg"].as_str().unwrap().contains("default/pod"),
        "{err}"
    );
    let links = node.netns.run("ip -o link");
    assert!(
        !links.contains(&sepal_cni::api::host_veth_name("default", "dup")),
        "{links}"
    );

    // A restart keeps the table; one deleted behind the agent's back comes back from the
    // allocations it persisted.
    let before = node.netns.run("nft list table inet sepal-hostports");
    node.kill_agent();
    assert!(
        http(&node.netns, "", NODE_IP).is_ok(),
        "maps while the agent is down"
    );
    node.netns.run("nft delete table inet sepal-hostports");
    node.start_agent();
    let after = node.netns.run("nft list table inet sepal-hostports");
    let rules = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| l.contains("dnat") || l.contains("masquerade"))
            .map(|l| l.split(" counter").next().unwrap().trim().to_string())
            .collect()
    };
    assert_eq!(rules(&before), rules(&after), "{after}");
    assert!(http(&node.netns, "", NODE_IP).unwrap().starts_with("pod2 "));

    // DEL takes the pod's mapping away; the last DEL takes the table away.
    let out = node.cni("DEL", &pod2.call);
    assert!(out.status.success(), "{}", describe(&out));
    let table = node.netns.run("nft list table inet sepal-hostports");
    assert!(!table.contains(&pod2.ip), "{table}");
    assert!(table.contains(&pod1.ip), "{table}");
    for pod in [&pod1, &pod3, &client] {
        let out = node.cni("DEL", &pod.call);
        assert!(out.status.success(), "{}", describe(&out));
    }
    assert!(node
        .netns
        .try_run("nft list table inet sepal-hostports")
        .is_err());
}
