//! Root tests of felix's route reconciler in a test network namespace: it adopts correct
//! protocol-83 routes, applies only the difference, and never touches another protocol's route.

use ipnetwork::IpNetwork;
use sepal_felix::routes::{Desired, NextHop, RouteReconciler, Target};
use sepal_tests::netns::Netns;
use std::os::fd::AsRawFd;

/// Runs `f` on a thread that has entered the namespace, with its own current-thread runtime,
/// so every netlink socket it opens lives in that namespace.
fn in_netns<T: Send + 'static>(ns: &Netns, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = ns.path();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread panicked")
}

/// Runs `f` to completion on a current-thread runtime of the calling (namespaced) thread.
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

fn net(s: &str) -> IpNetwork {
    s.parse().expect("network")
}

fn hop(gw: &str, onlink: bool) -> NextHop {
    NextHop {
        gateway: gw.parse().expect("ip"),
        dev: Some("va".into()),
        onlink,
    }
}

fn desired() -> Desired {
    Desired::from([
        (net("10.1.0.0/24"), Target::Blackhole),
        (net("10.1.0.5/32"), Target::Dev("va".into())),
        (net("10.1.0.7/32"), Target::Dev("va".into())),
        (net("10.1.0.8/32"), Target::Dev("va".into())),
        (net("fd00:1::5/128"), Target::Dev("va".into())),
        (net("fd00:1::/112"), Target::Blackhole),
        (
            net("10.2.0.0/24"),
            Target::Via(vec![hop("198.51.100.9", true)]),
        ),
        (
            net("10.3.0.0/24"),
            Target::Via(vec![hop("192.0.2.2", false), hop("192.0.2.3", false)]),
        ),
    ])
}

/// A test namespace with a veth pair va/vb, both up, 192.0.2.1/24 on va.
fn veth_in(name: &str) -> Netns {
    sepal_tests::require_root();
    let ns = Netns::new(name);
    ns.run(
        "ip link add va type veth peer name vb && ip link set va up && ip link set vb up \
         && ip addr add 192.0.2.1/24 dev va",
    );
    ns
}

fn foreign(ns: &Netns) -> String {
    ns.run("ip -o -4 route show table all | grep -v 'proto 83' | sort; ip -o -6 route show table all | grep -v 'proto 83' | sort")
}

#[test]
fn reconciler_adopts_diffs_and_leaves_foreign_routes_alone() {
    let ns = veth_in("routes");
    ns.run("ip -6 addr add fd00:9::1/64 dev va nodad");
    // Foreign routes, one to a destination Sepal also wants (other metric), one in another table.
    ns.run(
        "ip route add 10.9.0.0/24 dev va proto static \
         && ip route add 10.1.0.7/32 dev vb proto boot metric 100 \
         && ip route add 10.1.0.0/24 dev vb table 100 \
         && ip -6 route add fd00:1::5/128 dev vb proto static metric 50",
    );
    // What a previous run left: one right, one stale, one with the wrong interface.
    ns.run(
        "ip route add 10.1.0.5/32 dev va proto 83 scope link \
         && ip route add 10.1.0.6/32 dev va proto 83 scope link \
         && ip route add 10.1.0.8/32 dev vb proto 83 scope link",
    );
    let foreign_before = foreign(&ns);

    let (first, second) = in_netns(&ns, || {
        block_on(async {
            let handle = sepal_felix::links::connect().expect("netlink");
            let mut rec = RouteReconciler::new(handle);
            let first = rec.reconcile(&desired()).await.expect("reconcile");
            assert_eq!(
                rec.installed(),
                &desired(),
                "what reconcile wrote is remembered"
            );
            let second = rec.reconcile(&desired()).await.expect("reconcile again");
            (first, second)
        })
    });
    assert!(first.errors.is_empty(), "{:?}", first.errors);
    assert_eq!(first.adopted, 1, "{first:?}");
    assert_eq!(first.removed, 1, "{first:?}");
    assert_eq!(first.replaced, 1, "{first:?}");
    assert_eq!(first.added, 6, "{first:?}");
    assert_eq!(second.adopted, 8, "second run changes nothing: {second:?}");
    assert_eq!(
        (second.added, second.replaced, second.removed),
        (0, 0, 0),
        "{second:?}"
    );

    let ours = ns.run("ip -4 route show proto 83; ip -6 route show proto 83");
    for want in [
        "blackhole 10.1.0.0/24",
        "10.1.0.5 dev va scope link",
        "10.1.0.7 dev va scope link",
        "10.1.0.8 dev va scope link",
        "10.2.0.0/24 via 198.51.100.9 dev va onlink",
        "nexthop via 192.0.2.2 dev va",
        "nexthop via 192.0.2.3 dev va",
        "fd00:1::5 dev va",
        "blackhole fd00:1::/112",
    ] {
        assert!(ours.contains(want), "missing {want:?} in\n{ours}");
    }
    assert!(!ours.contains("10.1.0.6"), "stale route kept:\n{ours}");
    assert_eq!(foreign(&ns), foreign_before, "a foreign route changed");

    // Incremental update: only the difference, still no foreign route touched; a route whose
    // interface is missing is reported and the rest goes ahead.
    let report = in_netns(&ns, || {
        block_on(async {
            let handle = sepal_felix::links::connect().expect("netlink");
            let mut rec = RouteReconciler::new(handle);
            rec.reconcile(&desired()).await.expect("adopt");
            let mut next = desired();
            next.remove(&net("10.1.0.0/24"));
            next.remove(&net("10.3.0.0/24"));
            next.insert(net("10.1.0.9/32"), Target::Dev("va".into()));
            next.insert(net("10.1.0.10/32"), Target::Dev("nosuchdev".into()));
            let report = rec.update(&next).await.expect("update");
            rec.withdraw(net("10.1.0.7/32")).await.expect("withdraw");
            rec.withdraw(net("10.1.0.7/32"))
                .await
                .expect("withdraw is idempotent");
            report
        })
    });
    assert_eq!(report.removed, 2, "{report:?}");
    assert_eq!(report.added, 1, "{report:?}");
    assert_eq!(report.errors.len(), 1, "{report:?}");
    assert!(report.errors[0].contains("nosuchdev"), "{report:?}");
    let ours = ns.run("ip -4 route show proto 83");
    assert!(ours.contains("10.1.0.9 dev va"), "{ours}");
    assert!(!ours.contains("blackhole 10.1.0.0/24"), "{ours}");
    assert!(!ours.contains("10.3.0.0/24"), "{ours}");
    assert!(!ours.contains("10.1.0.7 "), "{ours}");
    assert_eq!(foreign(&ns), foreign_before, "a foreign route changed");
}

/// BGP-sized changes go to the kernel in batches of many messages to one sendmsg: more than one
/// batch's worth lands whole, a route whose destination another protocol holds is reported
/// (the kernel's EEXIST, checked one at a time) without failing the rest, a replace and a
/// withdrawal of everything follow, and the foreign route is never touched.
#[test]
fn changes_in_batches_land_whole_and_leave_foreign_routes_alone() {
    let ns = veth_in("routesb");
    ns.run("ip route add 10.50.1.0/24 via 192.0.2.7 dev va proto static");
    let foreign_before = foreign(&ns);
    const N: u32 = 1000;
    let dsts: Vec<IpNetwork> = (0..N)
        .map(|i| net(&format!("10.{}.{}.0/24", 50 + i / 256, i % 256)))
        .collect();
    let (added, replaced, removed) = in_netns(&ns, move || {
        block_on(async move {
            let handle = sepal_felix::links::connect().expect("netlink");
            let mut rec = RouteReconciler::new(handle);
            let via = |gw: &str| Target::Via(vec![hop(gw, true)]);
            let (a, b) = (via("192.0.2.2"), via("192.0.2.3"));
            let add: Vec<_> = dsts.iter().map(|d| (*d, Some(&a))).collect();
            let added = rec.apply_changes(&add).await.expect("add");
            // Half move to another next hop.
            let moved: Vec<_> = dsts.iter().step_by(2).map(|d| (*d, Some(&b))).collect();
            let replaced = rec.apply_changes(&moved).await.expect("replace");
            let gone: Vec<_> = dsts.iter().map(|d| (*d, None)).collect();
            let removed = rec.apply_changes(&gone).await.expect("remove");
            (added, replaced, removed)
        })
    });
    assert_eq!(added.added, N as usize - 1, "{added:?}");
    assert_eq!(added.errors.len(), 1, "{added:?}");
    assert!(added.errors[0].contains("10.50.1.0/24"), "{added:?}");
    // Every even index (10.50.1.0/24, the foreign one, is odd).
    assert_eq!(replaced.replaced, N as usize / 2, "{replaced:?}");
    assert!(replaced.errors.is_empty(), "{replaced:?}");
    assert_eq!(removed.removed, N as usize - 1, "{removed:?}");
    assert_eq!(
        ns.run("ip -4 route show proto 83"),
        "",
        "routes left behind"
    );
    assert_eq!(foreign(&ns), foreign_before, "a foreign route changed");
}

/// A pod's veth made again under the same name (a sandbox recreated with the same container ID)
/// has a new interface index: a route installed to it must not use the index an earlier batch
/// looked up for the old one.
#[test]
fn install_looks_up_a_recreated_interface_again() {
    let ns = veth_in("routesr");
    let err = in_netns(&ns, || {
        block_on(async {
            let handle = sepal_felix::links::connect().expect("netlink");
            let mut rec = RouteReconciler::new(handle);
            let first = Desired::from([(net("10.1.0.5/32"), Target::Dev("va".into()))]);
            rec.update(&first).await.expect("update");
            let sh = |c: &str| {
                std::process::Command::new("sh")
                    .args(["-c", c])
                    .status()
                    .unwrap()
            };
            assert!(sh("ip link del va && ip link add va type veth peer name vb && ip link set va up && ip link set vb up").success());
            rec.install(net("10.1.0.6/32"), Target::Dev("va".into()))
                .await
                .err()
                .map(|e| e.to_string())
        })
    });
    assert_eq!(err, None, "install to the recreated va");
    assert!(ns
        .run("ip -4 route show proto 83")
        .contains("10.1.0.6 dev va"));
}
