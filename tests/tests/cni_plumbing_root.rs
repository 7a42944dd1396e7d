//! Root tests of `sepal-cni`'s namespace plumbing: the real plugin binary, called exactly as a
//! runtime calls it, inside a node namespace, against a stub agent speaking `sepal_cni::api`.

use sepal_cni::api::{
    codes, host_veth_name, tombstone_name, AddReply, AttachmentKey, ErrorReply, Request, Response,
};
use sepal_tests::netns::Netns;
use sepal_tests::node::{run_in_netns, CniCall};
use serde_json::Value;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

/// How the stub agent answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Normal,
    /// ADD is refused with IPAM exhaustion (code 100); STATUS reports no pod block.
    Failing,
}

#[derive(Default)]
struct StubState {
    requests: Vec<Request>,
    allocations: HashMap<AttachmentKey, Vec<IpAddr>>,
    next: u32,
}

/// A stub agent on a Unix socket in a temp dir: hands out 10.77.0.N (and fd77::N when dual
/// stack), idempotent per attachment key, and records every request.
struct StubAgent {
    socket: PathBuf,
    state: Arc<Mutex<StubState>>,
    mode: Arc<Mutex<Mode>>,
    _dir: tempfile::TempDir,
}

impl StubAgent {
    fn start(dual_stack: bool) -> StubAgent {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("sepal.sock");
        let listener = UnixListener::bind(&socket).expect("bind stub socket");
        let state = Arc::new(Mutex::new(StubState::default()));
        let mode = Arc::new(Mutex::new(Mode::Normal));
        let (st, md) = (state.clone(), mode.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut line = String::new();
                if BufReader::new(&conn).read_line(&mut line).is_err() {
                    continue;
                }
                let Ok(req) = serde_json::from_str::<Request>(&line) else {
                    continue;
                };
                let mode = *md.lock().unwrap();
                let mut s = st.lock().unwrap();
                s.requests.push(req.clone());
                let resp = match req {
                    Request::Add(_) if mode == Mode::Failing => Response::Error(ErrorReply {
                        code: codes::IPAM_EXHAUSTED,
                        msg: "no free address".into(),
                        details: String::new(),
                    }),
                    Request::Add(add) => {
                        let ips = match s.allocations.get(&add.key) {
                            Some(ips) => ips.clone(),
                            None => {
                                s.next += 1;
                                let n = s.next;
                                let mut ips = vec![format!("10.77.0.{n}").parse().unwrap()];
                                if dual_stack {
                                    ips.push(format!("fd77::{n:x}").parse().unwrap());
                                }
                                s.allocations.insert(add.key.clone(), ips.clone());
                                ips
                            }
                        };
                        Response::Added(AddReply { ips, mtu: 1400 })
                    }
                    Request::Del(del) => {
                        s.allocations.remove(&del.key);
                        Response::Ok
                    }
                    Request::Check(check) => {
                        if s.allocations.get(&check.key) == Some(&check.ips) {
                            Response::Ok
                        } else {
                            Response::Error(ErrorReply {
                                code: codes::CHECK_FAILED,
                                msg: "unknown attachment".into(),
                                details: String::new(),
                            })
                        }
                    }
                    Request::Status if mode == Mode::Failing => Response::Error(ErrorReply {
                        code: codes::NO_POD_BLOCK,
                        msg: "node has no pod block".into(),
                        details: String::new(),
                    }),
                    Request::Status => Response::Ok,
                    Request::Gc(gc) => {
                        let before = s.allocations.len();
                        s.allocations.retain(|k, _| gc.valid.contains(k));
                        Response::Collected {
                            released: before - s.allocations.len(),
                        }
                    }
                };
                drop(s);
                let mut text = serde_json::to_string(&resp).unwrap();
                text.push('\n');
                let _ = conn.write_all(text.as_bytes());
            }
        });
        StubAgent {
            socket,
            state,
            mode,
            _dir: dir,
        }
    }

    fn config(&self, version: &str) -> String {
        format!(
            r#"{{"cniVersion":"{version}","name":"sepal","type":"sepal-cni","socket":"{}"}}"#,
            self.socket.display()
        )
    }

    fn set_mode(&self, mode: Mode) {
        *self.mode.lock().unwrap() = mode;
    }

    fn requests(&self) -> Vec<Request> {
        self.state.lock().unwrap().requests.clone()
    }

    fn allocations(&self) -> usize {
        self.state.lock().unwrap().allocations.len()
    }
}

/// A node namespace with an uplink and a default route (proxy ARP needs a route to the pods'
/// gateway out another interface), as every real node has.
fn node() -> Netns {
    let node = Netns::new("cn");
    node.run(
        "ip link add eth0 type veth peer name uplink0 && ip link set uplink0 up && ip link set eth0 up \
         && ip addr add 10.255.255.2/24 dev eth0 && ip route add default dev eth0",
    );
    node
}

fn cni(node: &Netns, command: &str, call: &CniCall, config: &str) -> Output {
    let mut cmd = Command::new(sepal_tests::bin_path("sepal-cni"));
    call.apply(&mut cmd, command);
    run_in_netns(cmd, node, config)
}

fn ok_json(out: &Output) -> Value {
    assert!(
        out.status.success(),
        "plugin failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("result is JSON")
}

fn ok_empty(out: &Output) {
    assert!(
        out.status.success(),
        "plugin failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.stdout.is_empty(),
        "unexpected output: {}",
        String::from_utf8_lossy(&out.stdout)
    );
}

fn error(out: &Output) -> (u64, Value) {
    assert!(
        !out.status.success(),
        "plugin succeeded unexpectedly: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "error is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    });
    (v["code"].as_u64().expect("code"), v)
}

fn links(ns: &Netns) -> String {
    ns.run("ip -br link")
}

fn pod_call(id: &str, pod: &Netns, name: &str) -> CniCall {
    CniCall::pod(id, &pod.path(), "default", name)
}

fn with_prev(config: &str, prev: &Value) -> String {
    let mut v: Value = serde_json::from_str(config).unwrap();
    v["prevResult"] = prev.clone();
    v.to_string()
}

#[test]
fn add_plumbs_both_sides_and_del_removes_them() {
    let agent = StubAgent::start(false);
    let node = node();
    let pod = Netns::new("cp");
    let call = pod_call("c-add", &pod, "web-0");
    let veth = host_veth_name("default", "web-0");
    let result = ok_json(&cni(&node, "ADD", &call, &agent.config("1.1.0")));

    assert_eq!(result["cniVersion"], "1.1.0");
    assert_eq!(result["interfaces"][0]["name"], veth.as_str());
    assert_eq!(result["interfaces"][0]["mac"], "ee:ee:ee:ee:ee:ee");
    assert_eq!(result["interfaces"][1]["name"], "eth0");
    assert_eq!(
        result["interfaces"][1]["sandbox"],
        pod.path().to_str().unwrap()
    );
    assert_eq!(result["interfaces"][1]["mtu"], 1400);
    assert_eq!(result["ips"][0]["address"], "10.77.0.1/32");
    assert_eq!(result["ips"][0]["gateway"], "169.254.1.1");
    assert_eq!(result["ips"][0]["interface"], 1);
    assert_eq!(result["ips"][0].get("version"), None);
    assert_eq!(result["routes"][0]["dst"], "0.0.0.0/0");

    // Host side.
    let link = node.run(&format!("ip -d link show {veth}"));
    assert!(link.contains("link/ether ee:ee:ee:ee:ee:ee"), "{link}");
    assert!(link.contains("mtu 1400"), "{link}");
    assert!(link.contains("veth"), "{link}");
    assert!(
        link.contains(",UP,") || link.contains("<UP") || link.contains(",UP>"),
        "{link}"
    );
    for (path, want) in [
        (format!("/proc/sys/net/ipv4/conf/{veth}/proxy_arp"), "1"),
        (format!("/proc/sys/net/ipv4/neigh/{veth}/proxy_delay"), "0"),
        (format!("/proc/sys/net/ipv4/conf/{veth}/forwarding"), "1"),
        (format!("/proc/sys/net/ipv6/conf/{veth}/forwarding"), "1"),
    ] {
        assert_eq!(node.run(&format!("cat {path}")).trim(), want, "{path}");
    }
    assert_eq!(
        node.run(&format!("cat /proc/sys/net/ipv6/conf/{veth}/addr_gen_mode"))
            .trim(),
        "0"
    );

    // Pod side.
    let addr = pod.run("ip -4 addr show dev eth0");
    assert!(addr.contains("inet 10.77.0.1/32"), "{addr}");
    assert!(addr.contains("mtu 1400"), "{addr}");
    assert!(
        addr.contains(result["interfaces"][1]["mac"].as_str().unwrap())
            || pod
                .run("ip link show eth0")
                .contains(result["interfaces"][1]["mac"].as_str().unwrap())
    );
    let routes = pod.run("ip -4 route show");
    assert!(
        routes.contains("default via 169.254.1.1 dev eth0"),
        "{routes}"
    );
    assert!(
        routes.contains("169.254.1.1 dev eth0") && routes.contains("scope link"),
        "{routes}"
    );

    // Traffic: the agent would install the host route; do it by hand here.
    node.run(&format!("ip route add 10.77.0.1/32 dev {veth} scope link"));
    node.run("ping -c1 -W2 10.77.0.1");
    pod.run("ping -c1 -W2 10.255.255.2");
    let neigh = pod.run("ip neigh show 169.254.1.1");
    assert!(
        neigh.contains("ee:ee:ee:ee:ee:ee"),
        "proxy ARP answered for the gateway: {neigh}"
    );

    // DEL takes the veth out of service at once (down, renamed to its tombstone: the pod loses
    // carrier) and releases the allocation; it is idempotent.
    ok_empty(&cni(&node, "DEL", &call, &agent.config("1.1.0")));
    assert!(
        !links(&node).contains(&format!("{veth} ")),
        "{}",
        links(&node)
    );
    assert!(node.try_run(&format!("ip link show {veth}")).is_err());
    let tomb = tombstone_name(&veth);
    let tomb_link = node.run(&format!("ip link show {tomb}"));
    assert!(tomb_link.contains("state DOWN"), "{tomb_link}");
    let pod_link = pod.run("ip link show eth0");
    assert!(pod_link.contains("NO-CARRIER"), "{pod_link}");
    assert!(
        !node.run("ip route").contains("10.77.0.1"),
        "host route left behind"
    );
    assert_eq!(agent.allocations(), 0);
    ok_empty(&cni(&node, "DEL", &call, &agent.config("1.1.0")));
    // A new ADD on the same sandbox replaces the retired pair.
    ok_json(&cni(&node, "ADD", &call, &agent.config("1.1.0")));
    assert!(node.try_run(&format!("ip link show {tomb}")).is_err());
    assert!(pod.run("ip link show eth0").contains("LOWER_UP"));
    ok_empty(&cni(&node, "DEL", &call, &agent.config("1.1.0")));
    // The pair dies with the sandbox; DEL still succeeds afterwards.
    drop(pod);
    let mut gone = false;
    for _ in 0..100 {
        if !links(&node).contains(&tomb) {
            gone = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(gone, "tombstone outlived the sandbox: {}", links(&node));
    ok_empty(&cni(&node, "DEL", &call, &agent.config("1.1.0")));
    let dels = agent
        .requests()
        .iter()
        .filter(|r| matches!(r, Request::Del(_)))
        .count();
    assert_eq!(dels, 4);
}

#[test]
fn dual_stack_pod_gets_a_128_and_a_v6_default_via_the_host_link_local() {
    let agent = StubAgent::start(true);
    let node = node();
    let pod = Netns::new("cp");
    let call = pod_call("c-dual", &pod, "dual-0");
    let veth = host_veth_name("default", "dual-0");
    // Node defaults that would cost the host veth its EUI-64 link-local: the plugin overrides.
    node.run(
        "echo 1 > /proc/sys/net/ipv6/conf/default/addr_gen_mode; \
         echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6",
    );
    let result = ok_json(&cni(&node, "ADD", &call, &agent.config("1.0.0")));
    assert_eq!(result["cniVersion"], "1.0.0");
    assert_eq!(
        result["interfaces"][1].get("mtu"),
        None,
        "1.0.0 has no interface mtu"
    );
    assert_eq!(result["ips"][1]["address"], "fd77::1/128");
    assert_eq!(result["ips"][1]["gateway"], "fe80::ecee:eeff:feee:eeee");
    assert_eq!(result["routes"][1]["dst"], "::/0");

    let addr = pod.run("ip -6 addr show dev eth0 scope global");
    assert!(addr.contains("inet6 fd77::1/128"), "{addr}");
    assert!(!addr.contains("tentative"), "{addr}");
    let routes = pod.run("ip -6 route show default");
    assert!(
        routes.contains("default via fe80::ecee:eeff:feee:eeee dev eth0"),
        "{routes}"
    );

    // The host veth's link-local (eui64 from ee:ee:ee:ee:ee:ee) is the pod's v6 gateway; the
    // kernel adds it once the pair has carrier, so wait for it.
    let mut host_ll = String::new();
    for _ in 0..50 {
        host_ll = node.run(&format!("ip -6 addr show dev {veth} scope link"));
        if host_ll.contains("fe80::ecee:eeff:feee:eeee") && !host_ll.contains("tentative") {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        host_ll.contains("fe80::ecee:eeff:feee:eeee/64"),
        "{host_ll}"
    );
    node.run(&format!("ip -6 route add fd77::1/128 dev {veth}"));
    node.run("ping -6 -c1 -W3 fd77::1");
    ok_empty(&cni(&node, "DEL", &call, &agent.config("1.0.0")));
    assert!(!links(&node).contains(&veth));
}

#[test]
fn add_is_idempotent_and_old_versions_render_ip_version() {
    let agent = StubAgent::start(false);
    let node = node();
    let pod = Netns::new("cp");
    let call = pod_call("c-idem", &pod, "idem-0");
    for version in ["0.3.0", "0.3.1", "0.4.0"] {
        let first = ok_json(&cni(&node, "ADD", &call, &agent.config(version)));
        let veth = host_veth_name("default", "idem-0");
        let link_before = node.run(&format!("ip -o link show {veth}"));
        let again = ok_json(&cni(&node, "ADD", &call, &agent.config(version)));
        assert_eq!(first, again, "a repeated ADD returns the same result");
        // ... on the same pair: the pod keeps its link (same ifindex).
        let link_after = node.run(&format!("ip -o link show {veth}"));
        assert_eq!(
            link_before.split(':').next(),
            link_after.split(':').next(),
            "{link_before} / {link_after}"
        );
        assert_eq!(first["cniVersion"], version);
        assert_eq!(first["ips"][0]["version"], "4");
        assert_eq!(first["ips"][0]["interface"], 1);
        assert_eq!(agent.allocations(), 1);
        let count = links(&pod)
            .lines()
            .filter(|l| l.starts_with("eth0"))
            .count();
        assert_eq!(count, 1);
    }
    // A second Sepal interface in the same sandbox is refused and leaves the first one alone.
    let mut net1 = call.clone();
    net1.ifname = "net1".into();
    let (code, err) = error(&cni(&node, "ADD", &net1, &agent.config("1.1.0")));
    assert_eq!(code, u64::from(codes::IO_FAILURE), "{err}");
    assert!(pod.run("ip link show eth0").contains("LOWER_UP"));
    // A new sandbox of the same pod (new container ID) replaces the dead one's pair.
    let pod2 = Netns::new("cp");
    let call2 = pod_call("c-idem2", &pod2, "idem-0");
    ok_json(&cni(&node, "ADD", &call2, &agent.config("1.1.0")));
    assert!(!links(&pod).contains("eth0"), "{}", links(&pod));
    assert!(links(&pod2).contains("eth0"), "{}", links(&pod2));
    // The runtime repeats DEL for the dead sandbox after the new one took the veth's name (kubelet
    // does, seconds later): the new sandbox keeps its pair.
    ok_empty(&cni(&node, "DEL", &call, &agent.config("1.1.0")));
    assert!(links(&pod2).contains("eth0"), "{}", links(&pod2));
    let veth = host_veth_name("default", "idem-0");
    assert!(node
        .run(&format!("ip -o link show {veth}"))
        .contains("alias c-idem2"));
    ok_empty(&cni(&node, "DEL", &call2, &agent.config("1.1.0")));
    assert!(!links(&node).contains(&veth), "{}", links(&node));
    ok_empty(&cni(&node, "DEL", &call, &agent.config("0.4.0")));
}

#[test]
fn a_failed_add_leaves_nothing_behind() {
    let agent = StubAgent::start(false);
    let node = node();
    let pod = Netns::new("cp");
    let call = pod_call("c-fail", &pod, "fail-0");
    agent.set_mode(Mode::Failing);
    let (code, err) = error(&cni(&node, "ADD", &call, &agent.config("1.1.0")));
    assert_eq!(code, u64::from(codes::IPAM_EXHAUSTED), "{err}");
    assert_eq!(err["msg"], "no free address");
    assert_eq!(err["cniVersion"], "1.1.0");
    assert!(!links(&node).contains("sep"), "{}", links(&node));
    assert!(!links(&pod).contains("eth0"), "{}", links(&pod));
    let reqs = agent.requests();
    assert!(
        matches!(reqs.as_slice(), [Request::Add(_), Request::Del(_)]),
        "rollback releases: {reqs:?}"
    );

    // The pod's interface name is taken by something else: the veth cannot be created.
    agent.set_mode(Mode::Normal);
    pod.run("ip link add eth0 type veth peer name other0");
    let (code, err) = error(&cni(&node, "ADD", &call, &agent.config("1.1.0")));
    assert_eq!(code, u64::from(codes::IO_FAILURE), "{err}");
    assert!(!links(&node).contains("sep"), "{}", links(&node));
}

#[test]
fn agent_unreachable_is_try_again_later() {
    let agent = StubAgent::start(false);
    let node = node();
    let pod = Netns::new("cp");
    let call = pod_call("c-unr", &pod, "unr-0");
    let missing = r#"{"cniVersion":"1.1.0","name":"sepal","type":"sepal-cni","socket":"/nonexistent/sepal.sock"}"#;

    let (code, _) = error(&cni(&node, "ADD", &call, missing));
    assert_eq!(code, u64::from(codes::TRY_AGAIN_LATER));
    assert!(!links(&node).contains("sep"), "{}", links(&node));
    assert!(!links(&pod).contains("eth0"), "{}", links(&pod));

    // DEL without the agent still removes the veth, but asks the runtime to retry (the
    // allocation could not be released).
    ok_json(&cni(&node, "ADD", &call, &agent.config("1.1.0")));
    let (code, _) = error(&cni(&node, "DEL", &call, missing));
    assert_eq!(code, u64::from(codes::TRY_AGAIN_LATER));
    let veth = host_veth_name("default", "unr-0");
    assert!(node.try_run(&format!("ip link show {veth}")).is_err());
    assert!(pod.run("ip link show eth0").contains("NO-CARRIER"));
    ok_empty(&cni(&node, "DEL", &call, &agent.config("1.1.0")));

    let (code, _) = error(&cni(&node, "STATUS", &CniCall::status(), missing));
    assert_eq!(code, u64::from(codes::PLUGIN_NOT_AVAILABLE));
}

#[test]
fn check_verifies_pod_host_and_agent() {
    let agent = StubAgent::start(true);
    let node = node();
    let pod = Netns::new("cp");
    let call = pod_call("c-check", &pod, "check-0");
    let config = agent.config("1.1.0");
    let result = ok_json(&cni(&node, "ADD", &call, &config));
    let check_config = with_prev(&config, &result);
    ok_empty(&cni(&node, "CHECK", &call, &check_config));
    assert!(agent
        .requests()
        .iter()
        .any(|r| matches!(r, Request::Check(c) if c.ips.len() == 2)));

    // CHECK needs prevResult, and 0.4.0 or later.
    let (code, _) = error(&cni(&node, "CHECK", &call, &config));
    assert_eq!(code, u64::from(codes::INVALID_CONFIG));
    let (code, _) = error(&cni(
        &node,
        "CHECK",
        &call,
        &with_prev(&agent.config("0.3.1"), &result),
    ));
    assert_eq!(code, u64::from(codes::INCOMPATIBLE_VERSION));

    // A missing route, a wrong address, proxy ARP off: each is found.
    pod.run("ip -6 route del default");
    let (code, err) = error(&cni(&node, "CHECK", &call, &check_config));
    assert_eq!(code, u64::from(codes::CHECK_FAILED), "{err}");
    assert!(err["msg"].as_str().unwrap().contains("::/0"), "{err}");
    pod.run("ip -6 route add default via fe80::ecee:eeff:feee:eeee dev eth0");
    ok_empty(&cni(&node, "CHECK", &call, &check_config));

    let veth = host_veth_name("default", "check-0");
    node.run(&format!(
        "echo 0 > /proc/sys/net/ipv4/conf/{veth}/proxy_arp"
    ));
    let (code, err) = error(&cni(&node, "CHECK", &call, &check_config));
    assert_eq!(code, u64::from(codes::CHECK_FAILED), "{err}");
    node.run(&format!(
        "echo 1 > /proc/sys/net/ipv4/conf/{veth}/proxy_arp"
    ));

    let mut wrong = result.clone();
    wrong["ips"][0]["address"] = Value::from("10.77.0.99/32");
    let (code, err) = error(&cni(&node, "CHECK", &call, &with_prev(&config, &wrong)));
    assert_eq!(code, u64::from(codes::CHECK_FAILED), "{err}");

    // The sandbox is gone: container unknown.
    ok_empty(&cni(&node, "DEL", &call, &config));
    let (code, _) = error(&cni(&node, "CHECK", &call, &check_config));
    assert_eq!(code, u64::from(codes::CHECK_FAILED));
    drop(pod);
    let (code, _) = error(&cni(&node, "CHECK", &call, &check_config));
    assert_eq!(code, u64::from(codes::CONTAINER_UNKNOWN));
}

#[test]
fn version_status_and_gc() {
    let agent = StubAgent::start(false);
    let node = node();

    let out = cni(
        &node,
        "VERSION",
        &CniCall::status(),
        r#"{"cniVersion":"1.0.0"}"#,
    );
    let v = ok_json(&out);
    assert_eq!(v["cniVersion"], "1.0.0");
    assert_eq!(
        v["supportedVersions"],
        serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
    );

    ok_empty(&cni(
        &node,
        "STATUS",
        &CniCall::status(),
        &agent.config("1.1.0"),
    ));
    agent.set_mode(Mode::Failing);
    let (code, err) = error(&cni(
        &node,
        "STATUS",
        &CniCall::status(),
        &agent.config("1.1.0"),
    ));
    assert_eq!(code, u64::from(codes::PLUGIN_NOT_AVAILABLE), "{err}");
    agent.set_mode(Mode::Normal);
    let (code, _) = error(&cni(
        &node,
        "STATUS",
        &CniCall::status(),
        &agent.config("1.0.0"),
    ));
    assert_eq!(code, u64::from(codes::INCOMPATIBLE_VERSION));

    // GC keeps only the listed attachments.
    let pods: Vec<Netns> = (0..2).map(|_| Netns::new("cp")).collect();
    for (i, pod) in pods.iter().enumerate() {
        ok_json(&cni(
            &node,
            "ADD",
            &pod_call(&format!("c-gc{i}"), pod, &format!("gc-{i}")),
            &agent.config("1.1.0"),
        ));
    }
    // A third pod was deleted but its sandbox kept: GC also removes its retired veth.
    let kept = Netns::new("cp");
    let kept_call = pod_call("c-gc-kept", &kept, "gc-kept");
    ok_json(&cni(&node, "ADD", &kept_call, &agent.config("1.1.0")));
    ok_empty(&cni(&node, "DEL", &kept_call, &agent.config("1.1.0")));
    let tomb = tombstone_name(&host_veth_name("default", "gc-kept"));
    assert!(links(&node).contains(&tomb));
    let mut gc: Value = serde_json::from_str(&agent.config("1.1.0")).unwrap();
    gc["cni.dev/valid-attachments"] =
        serde_json::json!([{"containerID": "c-gc0", "ifname": "eth0"}]);
    ok_empty(&cni(&node, "GC", &CniCall::status(), &gc.to_string()));
    let last = agent.requests().pop().unwrap();
    match last {
        Request::Gc(req) => assert_eq!(
            req.valid,
            vec![AttachmentKey {
                container_id: "c-gc0".into(),
                ifname: "eth0".into()
            }]
        ),
        other => panic!("expected GC, got {other:?}"),
    }
    assert_eq!(agent.allocations(), 1);
    assert!(!links(&node).contains(&tomb), "{}", links(&node));
    assert!(!links(&kept).contains("eth0"), "{}", links(&kept));
}

#[test]
fn runtime_errors_use_the_spec_codes() {
    let agent = StubAgent::start(false);
    let node = node();
    let pod = Netns::new("cp");
    let config = agent.config("1.1.0");
    let call = pod_call("c-err", &pod, "err-0");

    // 4: a required variable is missing.
    let mut no_netns = call.clone();
    no_netns.netns.clear();
    let (code, _) = error(&cni(&node, "ADD", &no_netns, &config));
    assert_eq!(code, u64::from(codes::INVALID_ENV));
    let mut bad_args = call.clone();
    bad_args.args = "K8S_POD_NAME=x;SOMETHING=y".into();
    let (code, _) = error(&cni(&node, "ADD", &bad_args, &config));
    assert_eq!(code, u64::from(codes::INVALID_ENV));
    let (code, _) = error(&cni(&node, "FROB", &call, &config));
    assert_eq!(code, u64::from(codes::INVALID_ENV));
    // ... or names the node's own namespace.
    let mut own = call.clone();
    own.netns = node.path().display().to_string();
    let (code, _) = error(&cni(&node, "ADD", &own, &config));
    assert_eq!(code, u64::from(codes::INVALID_ENV));
    // 3: the sandbox does not exist.
    let mut gone = call.clone();
    gone.netns = "/run/netns/sepal-test-does-not-exist".into();
    let (code, _) = error(&cni(&node, "ADD", &gone, &config));
    assert_eq!(code, u64::from(codes::CONTAINER_UNKNOWN));
    // 6, 7, 1, 2: bad configs.
    let (code, _) = error(&cni(&node, "ADD", &call, "{not json"));
    assert_eq!(code, u64::from(codes::DECODE_FAILURE));
    let (code, _) = error(&cni(
        &node,
        "ADD",
        &call,
        r#"{"cniVersion":"1.1.0","name":"n","mtu":"x"}"#,
    ));
    assert_eq!(code, u64::from(codes::INVALID_CONFIG));
    let (code, v) = error(&cni(
        &node,
        "ADD",
        &call,
        r#"{"cniVersion":"0.2.0","name":"n"}"#,
    ));
    assert_eq!(code, u64::from(codes::INCOMPATIBLE_VERSION), "{v}");
    let (code, _) = error(&cni(
        &node,
        "ADD",
        &call,
        r#"{"cniVersion":"1.1.0","name":"n","ipam":{"type":"host-local"}}"#,
    ));
    assert_eq!(code, u64::from(codes::UNSUPPORTED_FIELD));
    assert!(!links(&node).contains("sep"));
    assert!(
        agent.requests().is_empty(),
        "no agent call for a rejected invocation"
    );
}

/// Not a timing assertion: prints the plugin's own latency (process start included) against the
/// stub agent, next to Debian's ptp + host-local in the same run, for the report. Run with
/// `--ignored --nocapture` on a release build.
#[test]
#[ignore]
fn latency_report() {
    let agent = StubAgent::start(false);
    let n = 100;
    let sepal_config = agent.config("1.1.0");
    let ipam_dir = tempfile::tempdir().expect("tempdir");
    let ptp_config = format!(
        r#"{{"cniVersion":"1.0.0","name":"bench","type":"ptp","ipMasq":false,"mtu":1500,
            "ipam":{{"type":"host-local","ranges":[[{{"subnet":"10.78.0.0/20"}}]],
                    "routes":[{{"dst":"0.0.0.0/0"}}],"dataDir":"{}"}}}}"#,
        ipam_dir.path().display()
    );
    let q = |xs: &mut Vec<f64>, p: f64| {
        xs.sort_by(|a, b| a.total_cmp(b));
        xs[((xs.len() - 1) as f64 * p).round() as usize]
    };
    let mut p50 = Vec::new();
    for (label, plugin, config) in [
        (
            "sepal-cni + stub agent",
            sepal_tests::bin_path("sepal-cni"),
            &sepal_config,
        ),
        (
            "ptp + host-local",
            PathBuf::from("/usr/lib/cni/ptp"),
            &ptp_config,
        ),
    ] {
        let node = node();
        let pods: Vec<Netns> = (0..n).map(|_| Netns::new("lp")).collect();
        let run = |command: &str, i: usize, pod: &Netns| {
            let call = pod_call(&format!("lat{i}"), pod, &format!("lat-{i}"));
            let mut cmd = Command::new(&plugin);
            call.apply(&mut cmd, command);
            let t = std::time::Instant::now();
            let out = run_in_netns(cmd, &node, config);
            let ms = t.elapsed().as_secs_f64() * 1000.0;
            assert!(
                out.status.success(),
                "{label} {command}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            ms
        };
        let mut adds: Vec<f64> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| run("ADD", i, p))
            .collect();
        let mut dels: Vec<f64> = pods
            .iter()
            .enumerate()
            .map(|(i, p)| run("DEL", i, p))
            .collect();
        let (a50, d50) = (q(&mut adds, 0.5), q(&mut dels, 0.5));
        println!(
            "{label:<24} {n} pods: ADD p50 {a50:.2} ms p95 {:.2} ms; DEL p50 {d50:.2} ms p95 {:.2} ms",
            q(&mut adds, 0.95),
            q(&mut dels, 0.95)
        );
        p50.push((a50, d50));
    }
    println!(
        "ratios sepal/ptp: ADD {:.3}, DEL {:.3}",
        p50[0].0 / p50[1].0,
        p50[0].1 / p50[1].1
    );
}

#[test]
fn kernel_errors_reach_the_error_object_with_the_kernels_explanation() {
    // A sandbox with IPv6 turned off cannot take the /128: the kernel says why (extended ack),
    // the error object carries it, and the ADD rolls back.
    let agent = StubAgent::start(true);
    let node = node();
    let pod = Netns::new("cp");
    pod.run("echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6");
    let call = pod_call("c-kerr", &pod, "kerr-0");
    let (code, err) = error(&cni(&node, "ADD", &call, &agent.config("1.1.0")));
    assert_eq!(code, u64::from(codes::IO_FAILURE), "{err}");
    let details = err["details"].as_str().unwrap_or_default();
    assert!(
        details.contains("IPv6 is disabled"),
        "no kernel explanation in {err}"
    );
    assert!(!links(&node).contains("sep"), "{}", links(&node));
    assert!(!links(&pod).contains("eth0"), "{}", links(&pod));

    // An MTU below IPv6's minimum for a dual-stack pod is a configuration error.
    let pod2 = Netns::new("cp");
    let mut config: Value = serde_json::from_str(&agent.config("1.1.0")).unwrap();
    config["mtu"] = Value::from(1000);
    let call2 = pod_call("c-kerr2", &pod2, "kerr-2");
    let (code, err) = error(&cni(&node, "ADD", &call2, &config.to_string()));
    assert_eq!(code, u64::from(codes::INVALID_CONFIG), "{err}");
    assert!(!links(&node).contains("sep"), "{}", links(&node));
}
