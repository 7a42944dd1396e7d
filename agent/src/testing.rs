// Drivers shared by the fuzz targets in agent/fuzz and the mutation tests: bytes in, no agent,
// sockets, kernel or files. Not part of the stable API.

use crate::admin::server::{decode_request, MAX_REQUEST};
use crate::admin::{AdminReply, AdminRequest, MAX_ERROR_MSG};
use crate::datastore::dir::{parse_file, FileError};
use crate::ipam::Allocation;
use crate::model::{Event, Model, Object};
use crate::policy::{cluster_of, with_endpoints};
use sepal_cni::api::AttachmentKey;
use sepal_felix::nft::{render_diff, render_full, Options};
use sepal_felix::policy::{compile, validate, Cluster, Compiler, Explainer, Protocol};
use std::net::IpAddr;
use std::path::Path;
use std::sync::OnceLock;

/// Bound on any one message an input can cause (a datastore file's error, a reply's message,
/// a policy problem).
pub const MAX_MESSAGE: usize = 4096;

/// One datastore file: its name on the first line (the extension picks JSON or YAML, as in the
/// dir datastore), its content after it. Returns how many objects it held. Panics when an
/// invariant breaks: an error names a line of the file and says what is wrong in at most
/// `MAX_MESSAGE` bytes; the objects are as large as the file at most (times a constant: no
/// YAML alias bombs), and each one is in the model after it is applied.
pub fn datastore_file(data: &[u8]) -> usize {
    let Some((path, text)) = split_path(data) else {
        return 0;
    };
    match parse_file(Path::new(path), text) {
        Err(e) => {
            check_file_error(&e, text);
            0
        }
        Ok(objects) => {
            let size: usize = objects.iter().map(|o| format!("{o:?}").len()).sum();
            assert!(
                size <= 64 * 1024 + 512 * text.len(),
                "{} objects of {size} bytes (as Debug) from {} bytes",
                objects.len(),
                text.len()
            );
            let mut model = Model::default();
            for obj in &objects {
                let key = obj.key();
                assert!(!key.kind.is_empty() && !key.name.is_empty(), "{key:?}");
                model.apply(Event::Upsert(obj.clone()));
                assert!(model.get(&key).is_some(), "{key} not in the model");
            }
            objects.len()
        }
    }
}

/// `PATH\nTEXT`, both UTF-8 (the dir datastore reads files as UTF-8 text).
fn split_path(data: &[u8]) -> Option<(&str, &str)> {
    let text = std::str::from_utf8(data).ok()?;
    let (path, text) = text.split_once('\n').unwrap_or(("f.yaml", text));
    Some((path, text))
}

fn check_file_error(e: &FileError, text: &str) {
    let lines = text.lines().count();
    assert!(
        (1..=lines + 1).contains(&e.line),
        "line {} of a {lines}-line file: {e}",
        e.line
    );
    check_message(&e.msg);
}

fn check_message(msg: &str) {
    assert!(!msg.trim().is_empty(), "empty message");
    assert!(msg.len() <= MAX_MESSAGE, "message of {} bytes", msg.len());
}

/// A small cluster for the policy and explain drivers: namespaces, pods (some on this node,
/// one with the longest name Kubernetes allows, one without addresses) decoded through the
/// dir datastore's reader, and this node's endpoints as IPAM has them.
const CLUSTER: &str = include_str!("../fuzz/cluster.yaml");

fn fixed_model() -> &'static Model {
    static MODEL: OnceLock<Model> = OnceLock::new();
    MODEL.get_or_init(|| {
        let mut model = Model::default();
        let objects = parse_file(Path::new("cluster.yaml"), CLUSTER).unwrap_or_default();
        assert!(objects.len() >= 8, "the fixed cluster parses");
        for obj in objects {
            model.apply(Event::Upsert(obj));
        }
        model
    })
}

fn endpoints() -> Vec<Allocation> {
    let long = format!("{}-0", "x".repeat(251));
    let endpoint = |ns: &str, name: &str, veth: &str, ips: &[&str]| Allocation {
        key: AttachmentKey {
            container_id: format!("c-{veth}"),
            ifname: "eth0".into(),
        },
        ips: ips.iter().filter_map(|ip| ip.parse().ok()).collect(),
        pod_namespace: ns.into(),
        pod_name: name.into(),
        host_veth: veth.into(),
        port_mappings: Vec::new(),
    };
    vec![
        endpoint(
            "web",
            "front-0",
            "sep00000000001",
            &["10.244.0.10", "fd00::10"],
        ),
        endpoint("db", "pg-0", "sep00000000002", &["10.244.0.20"]),
        endpoint("default", &long, "sep00000000003", &["10.244.0.30"]),
        // An endpoint whose Pod the datastore has not delivered yet.
        endpoint("web", "ghost", "sep00000000004", &["10.244.0.40"]),
    ]
}

fn fixed_cluster(model: &Model) -> Cluster {
    with_endpoints(cluster_of(model), &endpoints())
}

/// Packets the drivers explain: pod to pod both ways, an outside address in and out, a pod
/// this node does not know.
fn flows() -> Vec<crate::admin::Flow> {
    let long = format!("default/{}-0", "x".repeat(251));
    let flow = |from: &str, to: &str, port: u16, protocol: Protocol| {
        Some(crate::admin::Flow {
            from: from.parse().ok()?,
            to: to.parse().ok()?,
            port,
            protocol,
        })
    };
    [
        flow("web/front-0", "db/pg-0", 5432, Protocol::Tcp),
        flow("db/pg-0", "web/front-0", 8080, Protocol::Tcp),
        flow("192.0.2.1", "web/front-0", 80, Protocol::Udp),
        flow("web/front-1", "198.51.100.7", 53, Protocol::Udp),
        flow("web/front-0", &long, 443, Protocol::Sctp),
        flow("web/ghost", "db/pg-0", 5432, Protocol::Tcp),
    ]
    .into_iter()
    .flatten()
    .collect()
}

/// One policy file (JSON, as the dir datastore reads it: an object or a `List`) compiled
/// against the fixed cluster. Its policies (`is_policy`) join the cluster; other kinds are
/// ignored.
/// Returns the size of the rendered table. Panics when an invariant breaks: problems are clear
/// and bounded messages; the incremental compiler agrees with a fresh compile; the rendered
/// table is well-formed for nft (balanced quotes, no control characters, comments within nft's
/// 128 bytes) and grows at most linearly with the input; explaining fixed packets works and
/// its report is bounded.
pub fn policy(data: &[u8]) -> usize {
    let Ok(text) = std::str::from_utf8(data) else {
        return 0;
    };
    let objects = match parse_file(Path::new("policies.json"), text) {
        Ok(objects) => objects,
        Err(e) => {
            check_file_error(&e, text);
            return 0;
        }
    };
    let mut model = fixed_model().clone();
    let base = fixed_cluster(&model);
    for obj in objects.into_iter().filter(is_policy) {
        model.apply(Event::Upsert(obj));
    }
    let cluster = fixed_cluster(&model);
    for np in &cluster.policies {
        for problem in validate(np).1 {
            check_message(&problem.message);
            check_message(&problem.to_string());
        }
    }

    let fresh = compile(&cluster);
    // Incrementally: from no policies, then from all but the last one.
    let mut compiler = Compiler::default();
    compiler.update(&base);
    let mut fewer = cluster.clone();
    fewer.policies.pop();
    compiler.update(&fewer);
    let (incremental, _) = compiler.update(&cluster);
    assert_eq!(incremental, &fresh, "the incremental compile differs");

    let opts = Options {
        nflog_group: Some(7),
        ..Options::default()
    };
    let full = render_full(&fresh, &opts);
    check_nft(&full);
    // The fixed cluster's pods all isolated cost a few KiB; each input byte some bytes more.
    let bound = 16 * 1024 + 32 * data.len();
    assert!(
        full.len() <= bound,
        "{} bytes of nft from {} bytes of policy",
        full.len(),
        data.len()
    );
    let diff = render_diff(&compile(&base), &fresh, &opts);
    check_nft(&diff);
    assert!(diff.len() <= bound + full.len());

    let explainer = Explainer::new(&cluster);
    for flow in flows() {
        // An unknown pod is an error; its message must still be clear.
        match explainer.explain(&flow.from, &flow.to, flow.protocol, flow.port) {
            Ok(explanation) => {
                let report = explanation.report(&Default::default());
                assert!(report.len() <= MAX_MESSAGE + 8 * data.len(), "{report}");
            }
            Err(e) => check_message(&e.to_string()),
        }
    }
    full.len()
}

/// The policy kinds the policy driver takes from its input, each through the same compile,
/// render and explain checks.
fn is_policy(obj: &Object) -> bool {
    matches!(
        obj,
        Object::NetworkPolicy(_) | Object::ClusterNetworkPolicy(_)
    )
}

/// What nft's parser needs of our text: printable lines, every quoted string closed on its
/// line, comments at most 128 bytes (NFTNL_UDATA_COMMENT_MAXLEN; longer fails the batch).
fn check_nft(text: &str) {
    for line in text.lines() {
        assert!(
            !line.chars().any(char::is_control),
            "control character in {line:?}"
        );
        let quoted: Vec<&str> = line.split('"').collect();
        assert!(quoted.len() % 2 == 1, "unbalanced quotes in {line:?}");
        if let Some(i) = quoted.iter().position(|p| p.ends_with("comment ")) {
            let comment = quoted.get(i + 1).copied().unwrap_or_default();
            assert!(
                comment.len() <= 128,
                "comment of {} bytes: {line}",
                comment.len()
            );
        }
    }
}

/// One operator socket request as the agent reads it (up to `MAX_REQUEST` bytes, up to and
/// including the first newline), decoded and, for trace and explain, parsed and explained on the
/// fixed cluster. Returns the reply as the socket would send it (explain answered, trace up to
/// its addresses; the rest needs a live agent). Panics when an invariant breaks: a bad request
/// gets an error reply with a clear message of at most `MAX_ERROR_MSG` bytes; a good one
/// encodes back to itself.
pub fn admin_request(data: &[u8]) -> AdminReply {
    let data = &data[..data.len().min(MAX_REQUEST as usize)];
    let line = match data.iter().position(|b| *b == b'\n') {
        Some(i) => &data[..=i],
        None => data,
    };
    let reply = match decode_request(line) {
        Err(msg) => AdminReply::error(&msg),
        Ok(req) => {
            let again = serde_json::to_vec(&req).map_err(|e| e.to_string());
            let again = again.and_then(|text| decode_request(&text));
            assert_eq!(
                again.as_ref(),
                Ok(&req),
                "the request encodes back to itself"
            );
            answer(&req)
        }
    };
    if let AdminReply::Error { msg } = &reply {
        assert!(!msg.trim().is_empty(), "empty error message");
        assert!(msg.len() <= MAX_ERROR_MSG, "message of {} bytes", msg.len());
    }
    let sent = serde_json::to_vec(&reply).expect("replies encode");
    assert!(sent.len() <= 64 * 1024, "reply of {} bytes", sent.len());
    reply
}

/// What the agent answers without its kernel state: explain in full, trace's addresses.
fn answer(req: &AdminRequest) -> AdminReply {
    let (AdminRequest::Trace(t) | AdminRequest::PolicyExplain(t)) = req else {
        return AdminReply::Ok {
            data: serde_json::Value::Null,
        };
    };
    let cluster = fixed_cluster(fixed_model());
    let result = t.flow().and_then(|flow| match req {
        AdminRequest::Trace(_) => crate::admin::trace::addresses(&cluster, &flow)
            .map(|(src, dst): (IpAddr, IpAddr)| serde_json::json!([src, dst])),
        _ => crate::policy_explain::report("n1", &cluster, &Default::default(), &flow)
            .and_then(|r| serde_json::to_value(r).map_err(|e| e.to_string())),
    });
    match result {
        Ok(data) => AdminReply::Ok { data },
        Err(msg) => AdminReply::error(&msg),
    }
}

/// Seeds for mutation (the fuzz targets' seed corpora, too), by target.
pub fn seeds(target: &str) -> Vec<&'static [u8]> {
    match target {
        "datastore_file" => vec![
            include_bytes!("../fuzz/seeds/datastore_file/cluster.yaml"),
            include_bytes!("../fuzz/seeds/datastore_file/list.json"),
            include_bytes!("../fuzz/seeds/datastore_file/sepal.yml"),
        ],
        "policy" => vec![
            include_bytes!("../fuzz/seeds/policy/policies.json"),
            include_bytes!("../fuzz/seeds/policy/one.json"),
            include_bytes!("../fuzz/seeds/policy/cluster-policies.json"),
        ],
        "admin_request" => vec![
            include_bytes!("../fuzz/seeds/admin_request/status.json"),
            include_bytes!("../fuzz/seeds/admin_request/trace.json"),
            include_bytes!("../fuzz/seeds/admin_request/explain.json"),
            include_bytes!("../fuzz/seeds/admin_request/explain-ip.json"),
            include_bytes!("../fuzz/seeds/admin_request/flows.json"),
        ],
        _ => Vec::new(),
    }
}

/// The shared cluster's pods, for tests that look at it.
#[cfg(test)]
fn cluster_pods() -> Vec<std::sync::Arc<sepal_felix::policy::Pod>> {
    fixed_cluster(fixed_model()).pods
}

#[cfg(test)]
mod tests {
    use super::*;
    use sepal_cni::testing::Mutator;

    /// Kubernetes' words and values (with the mutator's own value tokens).
    const TOKENS: &[&str] = &[
        "\"TCP\"",
        "\"UDP\"",
        "\"SCTP\"",
        "\"http\"",
        "\"10.0.0.0/8\"",
        "\"10.0.0.1/32\"",
        "\"::/0\"",
        "\"fd00::/64\"",
        "\"0.0.0.0/0\"",
        "\"In\"",
        "\"NotIn\"",
        "\"Exists\"",
        "\"DoesNotExist\"",
        "\"Ingress\"",
        "\"Egress\"",
        "\"app\"",
        "\"front\"",
        "\"web\"",
        "{\"matchLabels\":{}}",
        "---\n",
        "&a [1]",
        "*a",
        "\n",
        "- ",
        ": ",
        "\"op\"",
        "\"trace\"",
        "\"policy_explain\"",
        "\"web/front-0\"",
        // ClusterNetworkPolicy's own words.
        "\"Admin\"",
        "\"Baseline\"",
        "\"Accept\"",
        "\"Deny\"",
        "\"Pass\"",
        "{\"nodes\":{}}",
        "{\"destinationNamedPort\":\"http\"}",
    ];

    fn run(target: &str, rounds: u32, f: impl Fn(&[u8]) -> bool) -> (u32, u32) {
        let seeds = seeds(target);
        let mut rng = Mutator::new(0x5e9a1);
        let (mut ok, mut err) = (0, 0);
        for _ in 0..rounds {
            let seed = seeds[rng.below(seeds.len())];
            let input = rng.mutate(seed, TOKENS);
            if f(&input) {
                ok += 1;
            } else {
                err += 1;
            }
        }
        (ok, err)
    }

    #[test]
    fn seeds_pass_their_checks() {
        for seed in seeds("datastore_file") {
            assert!(
                datastore_file(seed) > 0,
                "{}",
                String::from_utf8_lossy(seed)
            );
        }
        for seed in seeds("policy") {
            assert!(policy(seed) > 0);
        }
        for seed in seeds("admin_request") {
            let reply = admin_request(seed);
            assert!(matches!(reply, AdminReply::Ok { .. }), "{reply:?}");
        }
        // The fixed cluster has what the flows need: local pods, a remote one, a long name.
        let pods = cluster_pods();
        assert!(pods.iter().filter(|p| p.host_iface.is_some()).count() >= 3);
        assert!(pods.iter().any(|p| p.name.len() == 253));
    }

    #[test]
    fn mutated_datastore_files_keep_the_invariants() {
        let (ok, err) = run("datastore_file", 6_000, |d| datastore_file(d) > 0);
        assert!(ok > 500 && err > 500, "{ok} ok, {err} errors");
    }

    #[test]
    fn mutated_policies_keep_the_invariants() {
        let (ok, err) = run("policy", 4_000, |d| policy(d) > 0);
        assert!(ok > 250 && err > 1000, "{ok} ok, {err} errors");
    }

    #[test]
    fn mutated_admin_requests_keep_the_invariants() {
        let (ok, err) = run("admin_request", 20_000, |d| {
            matches!(admin_request(d), AdminReply::Ok { .. })
        });
        // Requests are short: most edits break them.
        assert!(ok > 300 && err > 1000, "{ok} ok, {err} errors");
    }
}
