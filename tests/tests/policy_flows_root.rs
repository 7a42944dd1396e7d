//! Flows between two pods of one node, needs root. Revocation: an established TCP flow keeps going
//! after a policy change denies it (conntrack accepts established packets before any policy rule),
//! until its conntrack entry is removed; then it stops. Explain: the verdict and deciding rule
//! agree with what the kernel's per-rule counters saw. Two pod namespaces behind one node
//! namespace, as the agent wires them.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use sepal_felix::conntrack::{Conntrack, Flow};
use sepal_felix::nft::{Applied, Dataplane, Options};
use sepal_felix::policy::{
    compile, explain, Cluster, DirectionVerdict, ExplainPeer, Pod, Protocol,
};
use sepal_tests::netns::{veth, Netns};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 10);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 244, 0, 20);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x20);
const PORT: u16 = 8080;

/// Runs `f` on a thread inside `ns` (sockets it creates live there).
fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> T {
    let path = ns.path();
    std::thread::scope(|s| {
        s.spawn(move || {
            let file = File::open(&path).expect("open netns");
            // SAFETY: setns on a valid namespace fd only changes this thread's namespace.
            assert_eq!(
                unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) },
                0,
                "setns"
            );
            f()
        })
        .join()
        .expect("netns thread")
    })
}

/// A node namespace forwarding both families, with an uplink (proxy ARP answers for the pods'
/// gateway only if the node routes it elsewhere) and no duplicate address detection delays.
fn node(tag: &str) -> Netns {
    let node = Netns::new(tag);
    node.run("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1 net.ipv6.conf.default.accept_dad=0 \
        && ip link add up0 type veth peer name up1 && ip link set up0 up && ip link set up1 up && ip route add default dev up0");
    node
}

/// A dual-stack pod namespace wired to `node` the way the CNI plugin does it: /32 and /128
/// addresses, host veth with proxy ARP and host routes; IPv6 default via the veth's link-local.
fn pod(node: &Netns, tag: &str, host: &str, ip: Ipv4Addr, ip6: Ipv6Addr) -> Netns {
    let p = Netns::new(tag);
    p.run("sysctl -qw net.ipv6.conf.default.accept_dad=0");
    veth(node, host, &p, "eth0");
    node.run(&format!(
        "sysctl -qw net.ipv4.conf.{host}.proxy_arp=1 net.ipv4.neigh.{host}.proxy_delay=0 && ip route add {ip}/32 dev {host} scope link && ip -6 route add {ip6}/128 dev {host}"
    ));
    let link_local = node
        .run(&format!("ip -6 -o addr show dev {host} scope link"))
        .split_whitespace()
        .skip_while(|w| *w != "inet6")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(str::to_string)
        .expect("host veth link-local address");
    p.run(&format!("ip addr add {ip}/32 dev eth0 && ip route add 169.254.1.1 dev eth0 scope link && ip route add default via 169.254.1.1 dev eth0 \
        && ip addr add {ip6}/128 dev eth0 nodad && ip -6 route add default via {link_local} dev eth0"));
    p
}

fn cluster(policies: &[&str]) -> Cluster {
    let pod = |name: &str, ip: Ipv4Addr, ip6: Ipv6Addr, iface: &str| Pod {
        namespace: "x".into(),
        name: name.into(),
        labels: BTreeMap::from([("app".to_string(), name.to_string())]).into(),
        ips: vec![ip.into(), ip6.into()],
        host_iface: Some(iface.into()),
        ports: Default::default(),
        host_network: false,
    };
    Cluster {
        pods: vec![
            pod("client", CLIENT, CLIENT6, "sepcli").into(),
            pod("server", SERVER, SERVER6, "sepsrv").into(),
        ],
        policies: policies
            .iter()
            .map(|p| std::sync::Arc::new(serde_norway::from_str(p).expect("policy")))
            .collect(),
        ..Cluster::default()
    }
}

const ALLOW_CLIENT: &str = "metadata: {name: web, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: server}}\n  ingress: [{from: [{podSelector: {matchLabels: {app: client}}}], ports: [{port: 8080}]}]\n";
const DENY_ALL: &str = "metadata: {name: deny, namespace: x}\nspec: {podSelector: {}}\n";

/// Does `text` arrive at the server within a second?
fn delivered(client: &mut TcpStream, server: &mut TcpStream, text: &str) -> bool {
    client.write_all(text.as_bytes()).expect("client write");
    let mut buf = vec![0u8; text.len()];
    server
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    server.read_exact(&mut buf).is_ok() && buf == text.as_bytes()
}

#[test]
fn a_denied_established_flow_stops_after_revocation_root() {
    sepal_tests::require_root();
    let node = node("rvnode");
    let cli = pod(&node, "rvcli", "sepcli", CLIENT, CLIENT6);
    let srv = pod(&node, "rvsrv", "sepsrv", SERVER, SERVER6);
    let mut dp = Dataplane::in_netns(node.path(), Options::default());
    let conntrack = Conntrack::in_netns(node.path());

    // The server is isolated and the client allowed: a long-lived connection.
    let allowed = cluster(&[ALLOW_CLIENT]);
    assert_eq!(dp.apply(&compile(&allowed)).unwrap(), Applied::Full);
    let listener = in_netns(&srv, || TcpListener::bind(("0.0.0.0", PORT)).expect("bind"));
    let mut client = in_netns(&cli, || {
        TcpStream::connect_timeout(&(SERVER, PORT).into(), Duration::from_secs(3)).expect("connect")
    });
    let (mut server, _) = listener.accept().expect("accept");
    assert!(delivered(&mut client, &mut server, "one"));
    assert!(
        conntrack.revoke(&allowed).unwrap().is_empty(),
        "an allowed flow must not be revoked"
    );
    assert!(delivered(&mut client, &mut server, "two"));

    // Policy changes to deny everything: the rules alone leave the established flow running.
    let denied = cluster(&[DENY_ALL]);
    let applied = dp.apply(&compile(&denied)).unwrap();
    assert!(
        matches!(applied, Applied::Incremental { narrowed: true, .. }),
        "{applied:?}"
    );
    assert!(delivered(&mut client, &mut server, "three"));

    // Revocation removes exactly that flow's entry, and the flow stops.
    let revoked = conntrack.revoke(&denied).unwrap();
    let client_port = client.local_addr().unwrap().port();
    assert_eq!(
        revoked,
        vec![Flow::direct(
            Protocol::Tcp,
            CLIENT.into(),
            SERVER.into(),
            client_port,
            PORT,
        )]
    );
    assert!(!delivered(&mut client, &mut server, "four"));

    // Allowed again: new connections work (nothing was left behind).
    assert!(dp.apply(&compile(&allowed)).is_ok());
    let mut again = in_netns(&cli, || {
        TcpStream::connect_timeout(&(SERVER, PORT).into(), Duration::from_secs(3))
            .expect("reconnect")
    });
    let (mut server2, _) = listener.accept().expect("accept");
    assert!(delivered(&mut again, &mut server2, "five"));
}

#[test]
fn explain_names_the_rule_whose_counter_saw_the_packets_root() {
    sepal_tests::require_root();
    let node = node("exnode");
    let cli = pod(&node, "excli", "sepcli", CLIENT, CLIENT6);
    let srv = pod(&node, "exsrv", "sepsrv", SERVER, SERVER6);
    let mut dp = Dataplane::in_netns(node.path(), Options::default());
    let c = cluster(&[ALLOW_CLIENT]);
    dp.apply(&compile(&c)).unwrap();
    let _listeners = in_netns(&srv, || {
        [PORT, PORT + 1].map(|p| TcpListener::bind(("0.0.0.0", p)).expect("bind"))
    });
    let attempt = |port: u16, wait: Duration| {
        in_netns(&cli, || {
            TcpStream::connect_timeout(&(SERVER, port).into(), wait).is_ok()
        })
    };
    assert!(attempt(PORT, Duration::from_secs(3)));
    assert!(!attempt(PORT + 1, Duration::from_millis(500)));

    let counters = dp.counters().unwrap();
    let (client, server) = (
        ExplainPeer::Pod {
            namespace: "x".into(),
            name: "client".into(),
        },
        ExplainPeer::Pod {
            namespace: "x".into(),
            name: "server".into(),
        },
    );
    let ok = explain(&c, &client, &server, Protocol::Tcp, PORT).unwrap();
    assert!(ok.allowed);
    assert_eq!(ok.egress, DirectionVerdict::NotIsolated);
    assert_eq!(
        ok.ingress,
        DirectionVerdict::Allowed {
            policy: "x/web".into(),
            rule: 0,
            comment: "x/web ingress[0]".into()
        }
    );
    let [eg, ing] = ok.counted(&counters);
    assert_eq!(eg, None);
    assert!(ing.is_some_and(|n| n >= 1), "{counters:?}");
    assert!(ok
        .report(&counters)
        .contains("rule \"x/web ingress[0]\" matched"));

    let denied = explain(&c, &client, &server, Protocol::Tcp, PORT + 1).unwrap();
    assert!(!denied.allowed);
    let [_, drops] = denied.counted(&counters);
    // The SYN and its retransmissions within the attempt.
    assert!(drops.is_some_and(|n| n >= 1), "{counters:?}");
    assert!(denied.report(&counters).contains("default deny dropped"));
}

#[test]
fn ipv6_flows_obey_policy_counters_and_revocation_root() {
    sepal_tests::require_root();
    let node = node("v6node");
    let cli = pod(&node, "v6cli", "sepcli", CLIENT, CLIENT6);
    let srv = pod(&node, "v6srv", "sepsrv", SERVER, SERVER6);
    let mut dp = Dataplane::in_netns(node.path(), Options::default());
    let conntrack = Conntrack::in_netns(node.path());
    let allowed = cluster(&[ALLOW_CLIENT]);
    dp.apply(&compile(&allowed)).unwrap();
    let listeners = in_netns(&srv, || {
        [PORT, PORT + 1].map(|p| TcpListener::bind(("::", p)).expect("bind"))
    });
    let connect = |port: u16, wait: Duration| {
        in_netns(&cli, || {
            TcpStream::connect_timeout(&(IpAddr::V6(SERVER6), port).into(), wait)
        })
    };
    assert!(connect(PORT + 1, Duration::from_millis(500)).is_err());
    let mut client = connect(PORT, Duration::from_secs(3)).expect("IPv6 connect");
    let (mut server, _) = listeners[0].accept().expect("accept");
    assert!(delivered(&mut client, &mut server, "one"));

    // Explain on the addresses agrees with the IPv6 rules' counters.
    let counters = dp.counters().unwrap();
    let (from, to) = (
        ExplainPeer::Ip(CLIENT6.into()),
        ExplainPeer::Ip(SERVER6.into()),
    );
    let ok = explain(&allowed, &from, &to, Protocol::Tcp, PORT).unwrap();
    assert!(ok.allowed);
    assert!(
        ok.counted(&counters)[1].is_some_and(|n| n >= 1),
        "{counters:?}"
    );
    let denied = explain(&allowed, &from, &to, Protocol::Tcp, PORT + 1).unwrap();
    assert!(!denied.allowed);
    assert!(
        denied.counted(&counters)[1].is_some_and(|n| n >= 1),
        "{counters:?}"
    );

    // Denied from now on: the established IPv6 flow is revoked and stops.
    let deny = cluster(&[DENY_ALL]);
    dp.apply(&compile(&deny)).unwrap();
    assert!(delivered(&mut client, &mut server, "two"));
    let revoked = conntrack.revoke(&deny).unwrap();
    assert_eq!(
        revoked,
        vec![Flow::direct(
            Protocol::Tcp,
            CLIENT6.into(),
            SERVER6.into(),
            client.local_addr().unwrap().port(),
            PORT,
        )]
    );
    assert!(!delivered(&mut client, &mut server, "three"));
}

/// Nothing isolated: table `inet sepal` has no `ct` expression, so the kernel tracks nothing in
/// the node (per-packet cost). The first isolation brings conntrack in, and replies still get
/// through to the isolated pod: those of a connection it made before (picked up mid-stream once
/// it sends again) and of one it makes afterwards; a new connection to it is dropped.
#[test]
fn conntrack_only_while_isolated_and_replies_survive_root() {
    sepal_tests::require_root();
    let node = node("ctnode");
    let cli = pod(&node, "ctcli", "sepcli", CLIENT, CLIENT6);
    let srv = pod(&node, "ctsrv", "sepsrv", SERVER, SERVER6);
    let mut dp = Dataplane::in_netns(node.path(), Options::default());
    let conntrack = Conntrack::in_netns(node.path());
    let table = || node.run("nft list table inet sepal");

    let open = cluster(&[]);
    assert_eq!(dp.apply(&compile(&open)).unwrap(), Applied::Full);
    assert!(!table().contains(" ct "), "{}", table());
    let listener = in_netns(&srv, || TcpListener::bind(("0.0.0.0", PORT)).expect("bind"));
    let connect = || {
        in_netns(&cli, || {
            TcpStream::connect_timeout(&(SERVER, PORT).into(), Duration::from_secs(3))
                .expect("connect")
        })
    };
    let mut before = connect();
    let (mut before_srv, _) = listener.accept().expect("accept");
    assert!(delivered(&mut before, &mut before_srv, "ping"));
    assert!(delivered(&mut before_srv, &mut before, "pong"));
    assert!(
        conntrack.list().unwrap().is_empty(),
        "nothing is isolated, yet the node tracks connections"
    );

    // The client pod becomes isolated for ingress, nothing allowed in.
    let isolated = cluster(&[
        "metadata: {name: client-in, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: client}}\n  policyTypes: [Ingress]\n",
    ]);
    assert!(matches!(
        dp.apply(&compile(&isolated)).unwrap(),
        Applied::Incremental { .. }
    ));
    assert!(table().contains("ct state established,related accept"));
    assert!(delivered(&mut before, &mut before_srv, "ping again"));
    assert!(delivered(&mut before_srv, &mut before, "pong again"));
    let mut after = connect();
    let (mut after_srv, _) = listener.accept().expect("accept");
    assert!(delivered(&mut after, &mut after_srv, "new ping"));
    assert!(delivered(&mut after_srv, &mut after, "new pong"));
    assert!(!conntrack.list().unwrap().is_empty());
    let _cli_listener = in_netns(&cli, || TcpListener::bind(("0.0.0.0", PORT)).expect("bind"));
    assert!(
        in_netns(&srv, || TcpStream::connect_timeout(
            &(CLIENT, PORT).into(),
            Duration::from_millis(500)
        ))
        .is_err(),
        "the isolated client accepted a new connection"
    );

    // Isolation gone: so is every `ct` expression.
    dp.apply(&compile(&open)).unwrap();
    assert!(!table().contains(" ct "), "{}", table());
    assert!(delivered(&mut after, &mut after_srv, "still"));
}
