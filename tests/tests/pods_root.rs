//! Root integration tests for issue "pods get routable IPs": the real `sepal node` agent with a dir
//! datastore in a node namespace, and the real `sepal-cni` called exactly as a runtime calls it.

use sepal_cni::api::host_veth_name;
use sepal_tests::netns::Netns;
use sepal_tests::node::{CniCall, Node};
use serde_json::Value;
use std::process::Output;

/// A pod sandbox attached to a node through ADD.
struct Pod {
    netns: Netns,
    call: CniCall,
    result: Value,
}

impl Pod {
    fn ip(&self, family: &str) -> String {
        self.result["ips"]
            .as_array()
            .expect("ips")
            .iter()
            .map(|ip| ip["address"].as_str().expect("address"))
            .find(|a| (family == "6") == a.contains(':'))
            .unwrap_or_else(|| panic!("no IPv{family} address in {}", self.result))
            .split('/')
            .next()
            .expect("addr")
            .to_string()
    }
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "plugin printed no JSON ({e}): status {} stdout {:?} stderr {:?}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn ok(out: Output) -> Output {
    assert!(
        out.status.success(),
        "plugin failed: {} stdout {} stderr {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The CNI error code of a failed call (the spec's error object on stdout).
fn error_code(out: &Output) -> u64 {
    assert!(
        !out.status.success(),
        "expected failure, got {}",
        String::from_utf8_lossy(&out.stdout)
    );
    json(out)["code"].as_u64().expect("error object with code")
}

fn add_pod(node: &Node, tag: &str, name: &str) -> Pod {
    let netns = Netns::new(tag);
    let call = CniCall::pod(&format!("ctr-{name}"), &netns.path(), "default", name);
    let result = json(&ok(node.cni("ADD", &call)));
    Pod {
        netns,
        call,
        result,
    }
}

fn pings(from: &Netns, to: &str) -> bool {
    let ping = if to.contains(':') { "ping -6" } else { "ping" };
    from.try_run(&format!("{ping} -c1 -W2 {to}")).is_ok()
}

fn node_routes(node: &Node) -> String {
    node.netns
        .run("ip -4 route show proto 83; ip -6 route show proto 83")
}

#[test]
fn pods_on_one_node_reach_each_other_and_the_node() {
    let mut node = Node::new("n", &["10.244.1.0/24"]);
    node.start_agent();
    let a = add_pod(&node, "pa", "a");
    let b = add_pod(&node, "pb", "b");

    let (ip_a, ip_b) = (a.ip("4"), b.ip("4"));
    assert_ne!(ip_a, ip_b);
    assert!(
        ip_a.starts_with("10.244.1."),
        "{ip_a} outside the node block"
    );
    // The pod's own view of its address is the allocated one, as a /32.
    assert!(a
        .netns
        .run("ip -4 -o addr show dev eth0")
        .contains(&format!("{ip_a}/32")));
    let pod_routes = a.netns.run("ip -4 route");
    assert!(
        pod_routes.contains("default via 169.254.1.1 dev eth0"),
        "{pod_routes}"
    );
    // The host side: veth named from namespace/name, a /32 route to it, a blackhole for the block.
    let veth = host_veth_name("default", "a");
    let routes = node_routes(&node);
    assert!(routes.contains(&format!("{ip_a} dev {veth}")), "{routes}");
    assert!(routes.contains("blackhole 10.244.1.0/24"), "{routes}");
    assert!(node
        .netns
        .run(&format!("ip -o link show {veth}"))
        .contains("ee:ee:ee:ee:ee:ee"));

    assert!(pings(&a.netns, &ip_b), "pod a -> pod b");
    assert!(pings(&b.netns, &ip_a), "pod b -> pod a");
    assert!(pings(&node.netns, &ip_a), "node -> pod a");
}

#[test]
fn check_del_and_readd() {
    let mut node = Node::new("n", &["10.244.2.0/24"]);
    node.start_agent();
    let a = add_pod(&node, "pa", "a");
    let ip = a.ip("4");

    // ADD again for the same attachment returns the same address.
    let again = json(&ok(node.cni("ADD", &a.call)));
    assert_eq!(again["ips"], a.result["ips"]);

    // CHECK with the ADD result as prevResult passes.
    let mut conf: Value = serde_json::from_str(&node.cni_config("1.1.0")).unwrap();
    conf["prevResult"] = a.result.clone();
    ok(node.cni("CHECK", &a.call.clone().with_config(conf.to_string())));
    // CHECK fails once the pod's address is gone.
    a.netns.run(&format!("ip addr del {ip}/32 dev eth0"));
    assert!(!node
        .cni("CHECK", &a.call.clone().with_config(conf.to_string()))
        .status
        .success());

    // DEL removes the veth, the route and the allocation; DEL again still succeeds.
    ok(node.cni("DEL", &a.call));
    let veth = host_veth_name("default", "a");
    assert!(
        node.netns.try_run(&format!("ip link show {veth}")).is_err(),
        "veth left behind"
    );
    assert!(
        !node_routes(&node).contains(&format!("{ip} ")),
        "route left behind"
    );
    ok(node.cni("DEL", &a.call));
    // DEL after the sandbox is gone succeeds too.
    let b = add_pod(&node, "pb", "b");
    let Pod { netns, call, .. } = b;
    drop(netns);
    ok(node.cni("DEL", &call));
}

#[test]
fn agent_kill_and_restart_keeps_pods_and_allocations() {
    let mut node = Node::new("n", &["10.244.3.0/24"]);
    node.start_agent();
    let a = add_pod(&node, "pa", "a");
    let b = add_pod(&node, "pb", "b");
    node.kill_agent();
    // Pods keep working while the agent is down: nothing it programmed depends on the process.
    assert!(pings(&a.netns, &b.ip("4")));
    let before = node_routes(&node);
    node.start_agent();
    assert_eq!(
        node_routes(&node),
        before,
        "restart changed the kernel routes"
    );
    assert!(pings(&a.netns, &b.ip("4")));
    // Allocations survived: a new pod gets an address neither a nor b has, and a's ADD is unchanged.
    let c = add_pod(&node, "pc", "c");
    assert!(c.ip("4") != a.ip("4") && c.ip("4") != b.ip("4"));
    assert_eq!(json(&ok(node.cni("ADD", &a.call)))["ips"], a.result["ips"]);
}

#[test]
fn gc_releases_attachments_not_listed_as_valid() {
    let mut node = Node::new("n", &["10.244.4.0/24"]);
    node.start_agent();
    let keep = add_pod(&node, "pk", "keep");
    let gone = add_pod(&node, "pg", "gone");
    let mut conf: Value = serde_json::from_str(&node.cni_config("1.1.0")).unwrap();
    conf["cni.dev/valid-attachments"] =
        serde_json::json!([{"containerID": keep.call.container_id, "ifname": "eth0"}]);
    ok(node.cni("GC", &CniCall::status().with_config(conf.to_string())));
    let routes = node_routes(&node);
    assert!(routes.contains(&keep.ip("4")), "{routes}");
    assert!(!routes.contains(&format!("{} ", gone.ip("4"))), "{routes}");
    assert!(node
        .netns
        .try_run(&format!(
            "ip link show {}",
            host_veth_name("default", "gone")
        ))
        .is_err());
    assert!(pings(&node.netns, &keep.ip("4")));
}

#[test]
fn dual_stack_pods_get_one_address_of_each_family() {
    let mut node = Node::new("n", &["10.244.5.0/24", "fd00:244:5::/112"]);
    node.start_agent();
    let a = add_pod(&node, "pa", "a");
    let b = add_pod(&node, "pb", "b");
    assert!(a.ip("6").starts_with("fd00:244:5::"));
    assert!(a
        .netns
        .run("ip -6 -o addr show dev eth0")
        .contains(&format!("{}/128", a.ip("6"))));
    assert!(pings(&a.netns, &b.ip("6")), "pod a -> pod b over IPv6");
    assert!(pings(&a.netns, &b.ip("4")));
}

#[test]
fn old_cni_versions_get_results_in_their_own_format() {
    let mut node = Node::new("n", &["10.244.6.0/24"]);
    node.start_agent();
    let netns = Netns::new("pa");
    let call = CniCall::pod("ctr-old", &netns.path(), "default", "old")
        .with_config(node.cni_config("0.3.1"));
    let result = json(&ok(node.cni("ADD", &call)));
    assert_eq!(result["cniVersion"], "0.3.1");
    assert_eq!(result["ips"][0]["version"], "4", "{result}");
    ok(node.cni("DEL", &call));
}

#[test]
fn errors_use_cni_codes_and_leave_nothing_behind() {
    let mut node = Node::new("n", &["10.244.7.0/30"]);
    let sandbox = Netns::new("pa");
    let call = CniCall::pod("ctr-x", &sandbox.path(), "default", "x");

    // Agent not running: STATUS says 50, ADD says "try again later".
    assert_eq!(error_code(&node.cni("STATUS", &CniCall::status())), 50);
    assert_eq!(error_code(&node.cni("ADD", &call)), 11);
    assert!(
        node.netns
            .run("ip -o link")
            .lines()
            .all(|l| !l.contains(": sep")),
        "veth left after failed ADD"
    );

    node.start_agent();
    // Version the plugin does not speak, undecodable config, missing environment, bad netns.
    let bad_version = call.clone().with_config(node.cni_config("9.9.9"));
    assert_eq!(error_code(&node.cni("ADD", &bad_version)), 1);
    assert_eq!(
        error_code(&node.cni("ADD", &call.clone().with_config("{not json".into()))),
        6
    );
    let mut no_id = call.clone();
    no_id.container_id.clear();
    assert_eq!(error_code(&node.cni("ADD", &no_id)), 4);
    let mut no_netns = call.clone();
    no_netns.netns = "/run/netns/sepal-test-does-not-exist".into();
    assert!(!node.cni("ADD", &no_netns).status.success());

    // A /30 has two usable addresses: the third ADD is exhaustion, and leaves nothing behind.
    let one = add_pod(&node, "p1", "one");
    let two = add_pod(&node, "p2", "two");
    let three = Netns::new("p3");
    let third = CniCall::pod("ctr-three", &three.path(), "default", "three");
    assert_eq!(error_code(&node.cni("ADD", &third)), 100);
    let links = node.netns.run("ip -o link");
    assert_eq!(
        links.lines().filter(|l| l.contains(": sep")).count(),
        2,
        "{links}"
    );
    assert!(pings(&one.netns, &two.ip("4")));
}
