//! `sepal lab` and the operator tools, end to end (root): one default lab (3 nodes, a BIRD ToR)
//! checked with `lab status --json`, `sepal status|routes|endpoints|trace`, the metrics and health
//! endpoints, apply/delete of pods and labels, a second lab beside it, and a clean `down`.

use sepal_tests::lab::{alive, in_netns, netns_list, repo_file, sepal_json, strs, wait_for, Lab};
use sepal_tests::require_root;
use serde_json::Value;
use std::collections::BTreeSet;

/// GET `path` on 127.0.0.1:9099 inside `netns`: (status code, body).
fn http_get(netns: &str, path: &str) -> (u16, String) {
    sepal_tests::netns::http_get(
        std::path::Path::new(&format!("/run/netns/{netns}")),
        "127.0.0.1:9099",
        path,
    )
}

fn without_prefix_len(addr: &str) -> &str {
    addr.split('/').next().unwrap()
}

#[test]
fn lab_and_operator_tools_end_to_end() {
    require_root();
    let name = format!("lt{}", std::process::id());
    let lab = Lab::up(&name, None);
    let dir = tempfile::tempdir().unwrap();

    // `lab status --json` matches the kernel: every namespace exists and holds its addresses.
    let status = lab.status();
    assert_eq!(status["name"], name.as_str());
    let netns = netns_list();
    for node in status["nodes"].as_array().unwrap() {
        let ns = node["netns"].as_str().unwrap();
        assert!(netns.contains(ns), "node netns {ns} missing");
        let have = in_netns(ns, "ip -o addr show");
        for a in strs(&node["addresses"]) {
            assert!(have.contains(&a), "{ns} lacks {a}: {have}");
        }
    }
    for pod in status["pods"].as_array().unwrap() {
        let ns = pod["netns"].as_str().unwrap();
        assert!(netns.contains(ns), "pod netns {ns} missing");
        let have = in_netns(ns, "ip -o addr show dev eth0");
        for ip in strs(&pod["ips"]) {
            assert!(have.contains(&format!("{ip}/")), "{ns} lacks {ip}: {have}");
        }
    }
    let tor: Vec<String> = strs(&status["routers"][0]["addresses"])
        .iter()
        .map(|a| without_prefix_len(a).to_string())
        .collect();
    let block_of = |node: &str| -> String {
        sepal_tests::lab::status_node(&status, node)["podCIDRs"][0]
            .as_str()
            .unwrap()
            .to_string()
    };

    // `sepal status`: ready, the ToR session up, both other blocks learned.
    let node1 = wait_for(
        "node1's session and routes",
        || lab.ask("status", "node1"),
        |s| {
            s["ready"] == true
                && s["bgp"]["peers"][0]["state"] == "Established"
                && s["bgp"]["peers"][0]["prefixes_accepted"] == 2
        },
    );
    let peer = node1["bgp"]["peers"][0]["address"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        tor.contains(&peer),
        "node1 peers with {peer}, not the ToR {tor:?}"
    );
    assert_eq!(node1["bgp"]["peers"][0]["remote_as"], 65000);
    assert_eq!(strs(&node1["blocks"]), vec![block_of("node1")]);
    assert_eq!(node1["endpoints"], 2);
    assert_eq!(node1["datastore"]["synced"], true);

    // `--lab` without `--node` asks every node.
    let all = sepal_json(&["status", "--lab", &name, "--json"]);
    let nodes: Vec<&String> = all.as_object().unwrap().keys().collect();
    assert_eq!(nodes, ["node1", "node2", "node3"]);

    // `sepal routes`: pod routes to veths, the node's blackhole, the other blocks via the ToR.
    let routes = lab.ask("routes", "node1");
    let route = |dst: &str| {
        routes
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["destination"] == dst)
            .unwrap_or_else(|| panic!("no route to {dst} in {routes:#}"))
            .clone()
    };
    assert_eq!(route(&block_of("node1"))["kind"], "blackhole");
    for other in ["node2", "node3"] {
        let r = route(&block_of(other));
        assert_eq!(r["kind"], "bgp", "{r}");
        assert_eq!(strs(&r["gateways"]), vec![peer.clone()]);
        assert_eq!(r["bgp"]["peer"], peer.as_str());
        assert_eq!(r["bgp"]["as_path"][0], 65000, "{r}");
    }

    // `sepal endpoints`: node1's two pods, routed to their veths.
    let endpoints = lab.ask("endpoints", "node1");
    let pods: BTreeSet<String> = endpoints
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["namespace"].as_str().unwrap(),
                e["pod"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        pods,
        BTreeSet::from(["frontend/web-1".to_string(), "backend/api-1".to_string()])
    );
    for e in endpoints.as_array().unwrap() {
        assert_eq!(e["routed"], true, "{e}");
        assert_eq!(
            route(&format!("{}/32", e["ips"][0].as_str().unwrap()))["device"],
            e["host_veth"]
        );
    }

    // Metrics and health on the node's 127.0.0.1:9099.
    let node1_ns = format!("{name}-node1");
    assert_eq!(http_get(&node1_ns, "/healthz").0, 200);
    assert_eq!(http_get(&node1_ns, "/readyz").0, 200);
    assert_eq!(http_get(&node1_ns, "/nothing").0, 404);
    let (code, metrics) = http_get(&node1_ns, "/metrics");
    assert_eq!(code, 200);
    for series in [
        format!("sepal_bgp_session_up{{peer=\"{peer}\",remote_as=\"65000\"}} 1"),
        format!("sepal_bgp_prefixes_accepted{{peer=\"{peer}\",remote_as=\"65000\"}} 2"),
        format!("sepal_bgp_session_uptime_seconds{{peer=\"{peer}\",remote_as=\"65000\"}}"),
        "sepal_endpoints 2".to_string(),
        "sepal_ready 1".to_string(),
        "sepal_ipam_allocated_addresses 2".to_string(),
        "sepal_cni_request_duration_seconds_count{op=\"add\",result=\"ok\"} 2".to_string(),
        "sepal_policy_apply_duration_seconds_count".to_string(),
        format!("sepal_bgp_updates_received_total{{peer=\"{peer}\""),
    ] {
        assert!(
            metrics.contains(&series),
            "{series} missing from:\n{metrics}"
        );
    }

    // `sepal trace` across nodes: out of web-1's veth, via the ToR, into db-1's veth on node3.
    let node3_eps = lab.ask("endpoints", "node3");
    let db_veth = node3_eps
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["pod"] == "db-1")
        .unwrap()["host_veth"]
        .clone();
    // Other nodes learn a pod from its Pod status, written after its CNI ADD; `lab up` returns
    // only once every agent knows every pod, so a trace right after it works.
    let t = lab.trace("frontend/web-1", "backend/db-1", "5432/TCP");
    assert_eq!(t["allowed"], true, "{t:#}");
    let (first, last) = (&t["hops"][0], &t["hops"][1]);
    assert_eq!(first["node"], "node1");
    assert_eq!(first["source"]["pod"], "frontend/web-1");
    assert_eq!(first["lookup"]["gateway"], peer.as_str(), "{t:#}");
    assert_eq!(first["bgp"]["prefix"], block_of("node3").as_str());
    assert_eq!(last["node"], "node3");
    assert_eq!(last["destination"]["host_veth"], db_veth);
    assert_eq!(last["lookup"]["device"], db_veth);
    assert_eq!(t["router"], "tor");
    assert!(
        last["ingress"]
            .as_str()
            .unwrap()
            .contains("no policy selects"),
        "{t:#}"
    );

    // An address of node3's block that no pod holds ends in node3's blackhole.
    let unused = lab.trace("frontend/web-1", "10.244.3.200", "80/TCP");
    assert_eq!(unused["hops"][1]["node"], "node3", "{unused:#}");
    assert_eq!(
        unused["hops"][1]["lookup"]["kind"], "blackhole",
        "{unused:#}"
    );

    // A policy: frontend may reach the backend, the backend itself may not; trace names it.
    let policy = repo_file("docs/examples/backend-allow-frontend.yaml");
    lab.apply(&policy, false);
    let denied = wait_for(
        "the policy to reach node3",
        || lab.trace("backend/api-1", "backend/db-1", "5432/TCP"),
        |t| t["allowed"] == false,
    );
    let ingress = denied["hops"][1]["ingress"].as_str().unwrap();
    assert!(
        ingress.contains("DENIED") && ingress.contains("backend/allow-frontend"),
        "{ingress}"
    );
    let allowed = lab.trace("frontend/web-1", "backend/db-1", "5432/TCP");
    assert_eq!(allowed["allowed"], true);
    assert!(
        allowed["hops"][1]["ingress"]
            .as_str()
            .unwrap()
            .contains("allow-frontend"),
        "{allowed:#}"
    );

    // Pods through apply/delete: created by CNI ADD, relabelled, removed by CNI DEL.
    let pod_file = dir.path().join("pod.yaml");
    std::fs::write(&pod_file, sepal_tests::lab::extra_pod("app: one")).unwrap();
    lab.apply(&pod_file, false);
    let find_extra = |s: &Value| {
        s["pods"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "extra")
            .cloned()
    };
    let extra = find_extra(&lab.status()).expect("the new pod in lab status");
    assert_eq!(extra["labels"]["app"], "one");
    let extra_ip = extra["ips"][0].as_str().unwrap().to_string();
    let node2_eps = lab.ask("endpoints", "node2");
    assert!(node2_eps.to_string().contains(&extra_ip), "{node2_eps}");
    std::fs::write(&pod_file, sepal_tests::lab::extra_pod("app: two")).unwrap();
    lab.apply(&pod_file, false);
    assert_eq!(find_extra(&lab.status()).unwrap()["labels"]["app"], "two");
    lab.apply(&pod_file, true);
    assert!(find_extra(&lab.status()).is_none());
    assert!(!netns_list().contains(extra["netns"].as_str().unwrap()));
    assert!(!lab
        .ask("endpoints", "node2")
        .to_string()
        .contains(&extra_ip));

    // A second lab beside the first: its own namespaces, the first one untouched by its down.
    let small = dir.path().join("small.yaml");
    std::fs::write(
        &small,
        "nodes: [{name: solo}]\nnamespaces: [{name: demo}]\n\
         pods: [{namespace: demo, name: p1, node: solo}]\n",
    )
    .unwrap();
    let second = Lab::up(&format!("{name}b"), Some(&small));
    let s2 = second.status();
    assert_eq!(s2["pods"][0]["node"], "solo");
    let solo = wait_for(
        "the second lab's agent",
        || second.ask("status", "solo"),
        |s| s["ready"] == true,
    );
    assert_eq!(solo["endpoints"], 1);
    let second_pids = second.pids();
    second.down();
    for p in second_pids {
        assert!(!alive(p), "process {p} of the second lab survived its down");
    }
    assert_eq!(lab.ask("status", "node1")["ready"], true);

    // Down leaves no namespace, link or process behind.
    lab.down_cleanly();
    // Down again is harmless.
    lab.down();
}

/// A lab whose podCIDR has an IPv6 range is dual-stack end to end: every node gets an IPv6 block
/// and IPv6 on its links to the two ToRs (BIRD and FRR, from the peering guide's IPv6 sections);
/// each ToR learns the IPv6 blocks over its IPv4 sessions with the node's address on its own link
/// as next hop, and pods reach each other across nodes on both families.
#[test]
fn dual_stack_lab_routes_ipv6_across_nodes() {
    require_root();
    let name = format!("ld{}", std::process::id());
    // The example in the docs, as a user would bring it up.
    let topology = repo_file("docs/examples/dual-stack-lab.yaml");
    let lab = Lab::up(&name, Some(&topology));
    let status = lab.status();
    let blocks: Vec<Vec<String>> = status["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| strs(&n["podCIDRs"]))
        .collect();
    assert_eq!(
        blocks,
        [
            ["10.246.1.0/24", "fd10:246:0:1::/64"],
            ["10.246.2.0/24", "fd10:246:0:2::/64"]
        ]
    );
    // Each ToR learns both IPv6 blocks, each via the node's address on that ToR's own link.
    for (r, proto) in [(0, "bird"), (1, "bgp")] {
        let tor = status["routers"][r]["netns"].as_str().unwrap().to_string();
        let routes = in_netns(&tor, &format!("ip -6 route show proto {proto}"));
        for n in 1..=2 {
            let want = format!("fd10:246:0:{n}::/64 ");
            let via = format!("via fd00:{r}:{n}::2 ");
            assert!(
                routes
                    .lines()
                    .any(|l| l.starts_with(&want) && l.contains(&via)),
                "{tor}: no {want}{via}in\n{routes}"
            );
        }
    }
    // Every pod reaches every other pod on each family: (from, to, address) -> reached.
    let reached = wait_for(
        "pods reaching each other over IPv4 and IPv6",
        || {
            let m = sepal_json(&["lab", "ping", "--name", &name, "--json"]);
            m["results"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| (r["ip"].as_str().unwrap().to_string(), r["ok"] == true))
                .collect::<Vec<_>>()
        },
        |rows| rows.len() == 4 && rows.iter().all(|(_, ok)| *ok),
    );
    assert!(reached.iter().any(|(ip, _)| ip == "fd10:246:0:2::1"));
    lab.down_cleanly();
}

#[test]
fn unnumbered_lab_routes_ipv4_via_link_local_next_hops() {
    require_root();
    let name = format!("lu{}", std::process::id());
    // The example in the docs, as a user would bring it up (its own name replaced by --name).
    let topology = repo_file("docs/examples/unnumbered-lab.yaml");
    let lab = Lab::up(&name, Some(&topology));
    let status = lab.status();
    // Each ToR (FRR, BIRD) routes each node's block via the node's link-local address on the
    // ToR's interface to that node.
    for (r, proto) in [(0, "bgp"), (1, "bird")] {
        let tor = status["routers"][r]["netns"].as_str().unwrap().to_string();
        wait_for(
            "each ToR's routes to the blocks via link-local next hops",
            || in_netns(&tor, &format!("ip -4 route show proto {proto}")),
            |routes| {
                (1..=2).all(|n| {
                    routes.lines().any(|l| {
                        l.starts_with(&format!("10.244.{n}.0/24 "))
                            && l.contains("via inet6 fe80:")
                            && l.contains(&format!("dev n{n} "))
                    })
                })
            },
        );
    }
    // Each node has the other's block over both ToRs (ECMP), each hop on its own interface.
    let n1 = status["nodes"][0]["netns"].as_str().unwrap().to_string();
    // (The second ToR's session may come up after `lab up` reports the first routes.)
    wait_for(
        "n1's route to n2's block over both ToRs",
        || in_netns(&n1, "ip -4 route show proto 83 10.244.2.0/24"),
        |route| {
            ["eth0", "eth1"].iter().all(|dev| {
                route
                    .lines()
                    .any(|l| l.contains("via inet6 fe80:") && l.contains(&format!("dev {dev} ")))
            })
        },
    );
    wait_for(
        "pods reaching each other across the unnumbered fabric",
        || sepal_json(&["lab", "ping", "--name", &name, "--json"]),
        |m| {
            m["results"]
                .as_array()
                .is_some_and(|r| r.len() == 2 && r.iter().all(|r| r["ok"] == true))
        },
    );
    lab.down_cleanly();
}
