//! ClusterNetworkPolicy conformance: upstream's suite (sigs.k8s.io/network-policy-api v0.3.0) as
//! data in tests/policy/cnp-upstream.yaml, run on upstream's house world (cnp/houses.rs) with
//! real connections. Policy is compiled by felix's `compile` and programmed by its nftables
//! dataplane; every poke is also checked against felix's `explain` on the same model.
//!
//! `upstream_cnp_conformance_root` needs root (netns, veths, nftables); `upstream_cnp_model`
//! runs the same cases against `explain` alone, and checks every policy at every step validates
//! without a problem.

#[path = "cnp/cases.rs"]
mod cases;
#[path = "cnp/houses.rs"]
mod houses;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use cases::{CaseFile, Poke, World};
use houses::{Lab, Placement, PodDef};
use sepal_felix::nft::{Dataplane, Options};
use sepal_felix::policy::{
    compile, Cluster, Compiler, ExplainPeer, Explainer, Explanation, Protocol,
};
use sepal_tests::podnet::{probe_all, Outcome, ProbeSpec};

/// First probe timeout; a probe that disagrees is probed again with the longer one (upstream
/// retries for 10 s), so a slow allowed connection never fails a case.
const PROBE_TIMEOUT: Duration = Duration::from_millis(600);
const RETRY_TIMEOUT: Duration = Duration::from_millis(2000);

/// Where a batch of pokes is: upstream's test and subtest.
struct At<'a> {
    test: &'a str,
    subtest: &'a str,
}

impl std::fmt::Display for At<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} / {:?}", self.test, self.subtest)
    }
}

/// Runs every test's steps in order; each run of consecutive pokes goes to `batch` with the
/// model of that moment. Returns (subtests, problems found walking).
fn walk(
    file: &CaseFile,
    pods: &[PodDef],
    mut batch: impl FnMut(&At, &Cluster, &[Poke]),
) -> (usize, Vec<String>) {
    let mut problems = Vec::new();
    let mut subtests = 0;
    for test in &file.tests {
        let mut world = match World::new(pods, &test.objects) {
            Ok(w) => w,
            Err(e) => {
                problems.push(format!("{}: {e}", test.test));
                continue;
            }
        };
        for sub in &test.subtests {
            subtests += 1;
            let at = At {
                test: &test.test,
                subtest: &sub.name,
            };
            let mut pending: Vec<Poke> = Vec::new();
            for step in sub.steps.iter().chain(&sub.cleanup) {
                match world.poke(step) {
                    Ok(Some(p)) => {
                        pending.push(p);
                        continue;
                    }
                    Ok(None) => {}
                    Err(e) => {
                        problems.push(format!("{at}: {e}"));
                        continue;
                    }
                }
                flush(&at, &world, &mut pending, &mut batch, &mut problems);
                if let Err(e) = world.mutate(step) {
                    problems.push(format!("{at}: {e}"));
                }
            }
            flush(&at, &world, &mut pending, &mut batch, &mut problems);
        }
    }
    (subtests, problems)
}

fn flush(
    at: &At,
    world: &World,
    pending: &mut Vec<Poke>,
    batch: &mut impl FnMut(&At, &Cluster, &[Poke]),
    problems: &mut Vec<String>,
) {
    if pending.is_empty() {
        return;
    }
    match world.cluster() {
        Ok(cluster) => batch(at, &cluster, pending),
        Err(found) => problems.push(format!("{at}: policy problems:\n  {}", found.join("\n  "))),
    }
    pending.clear();
}

fn peer(p: &PodDef) -> ExplainPeer {
    if p.host_network {
        // Upstream pokes a host-network pod at its podIP, which is its node's address.
        ExplainPeer::Ip(IpAddr::V4(p.ip))
    } else {
        ExplainPeer::Pod {
            namespace: p.namespace(),
            name: p.name.clone(),
        }
    }
}

fn explain_all(cluster: &Cluster, pokes: &[Poke]) -> Vec<Result<Explanation, String>> {
    let explainer = Explainer::new(cluster);
    pokes
        .iter()
        .map(|p| {
            explainer
                .explain(&peer(&p.client), &peer(&p.server), p.protocol, p.port)
                .map_err(|e| e.to_string())
        })
        .collect()
}

fn verdict(e: &Result<Explanation, String>) -> String {
    match e {
        Ok(e) => format!("{}", e).trim_end().replace('\n', "\n    "),
        Err(e) => format!("error: {e}"),
    }
}

/// Upstream's reading of a poke: connect must connect; no connect must time out (a refusal
/// means something answered, which a dropped flow never does).
fn holds(connect: bool, outcome: &Outcome) -> bool {
    if connect {
        outcome.connected()
    } else {
        *outcome == Outcome::Timeout
    }
}

#[test]
fn upstream_cnp_model() {
    let pods = houses::pods(Placement::Spread);
    let file = cases::load(&pods);
    let (mut pokes, mut agreed) = (0, 0);
    let mut failures = Vec::new();
    let mut compiler = Compiler::default();
    let (subtests, problems) = walk(&file, &pods, |at, cluster, batch| {
        let fresh = compile(cluster);
        failures.extend(fresh.problems.iter().map(|p| format!("{at}: compile: {p}")));
        if *compiler.update(cluster).0 != fresh {
            failures.push(format!(
                "{at}: the incremental ruleset differs from a fresh compile"
            ));
        }
        for (p, e) in batch.iter().zip(explain_all(cluster, batch)) {
            pokes += 1;
            if e.as_ref().map(|e| e.allowed) == Ok(p.connect) {
                agreed += 1;
            } else {
                failures.push(format!("{at}: {p}: explain says\n    {}", verdict(&e)));
            }
        }
    });
    failures.extend(problems);
    eprintln!(
        "cnp-upstream.yaml (explain only): {} tests, {subtests} subtests, {pokes} pokes: {agreed} passed, {} failed",
        file.tests.len(),
        pokes - agreed
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn upstream_cnp_conformance_root() {
    run_root(Placement::Spread, |_| true);
}

/// The node-peer tests with centaur-1 on its clients' node, a placement upstream's scheduler may
/// pick (and must on a one-node cluster): a pod's traffic to its own node never crosses the
/// forward hook, and the `nodes` and `networks` Deny rules must hold there too (input hook).
#[test]
fn upstream_cnp_centaur_on_clients_node_root() {
    run_root(Placement::OnClientsNode, |t| {
        let steps = t.subtests.iter().flat_map(|s| &s.steps);
        steps
            .filter_map(|s| match s {
                cases::Step::Poke(_, to, ..) => Some(to),
                _ => None,
            })
            .any(|to| to.starts_with("centaur"))
    });
}

/// Runs the tests `keep` selects on the house world with that placement.
fn run_root(placement: Placement, keep: impl Fn(&cases::Test) -> bool) {
    sepal_tests::require_root();
    let started = Instant::now();
    let pods = houses::pods(placement);
    let mut file = cases::load(&pods);
    file.tests.retain(keep);
    let lab = Lab::new(&pods);
    let mut dp = Dataplane::in_netns(lab.node.node.path(), Options::default());
    let mut failures = Vec::new();

    let preflight = everything_allowed(&lab, &mut dp, &pods, &mut failures);

    let (mut pokes, mut passed, mut explained) = (0, 0, 0);
    // The agent's path: one incremental compiler for the whole run, its updates applied as
    // such; each must equal a fresh compile of the same model.
    let mut compiler = Compiler::default();
    let (subtests, problems) = walk(&file, &pods, |at, cluster, batch| {
        let fresh = compile(cluster);
        for p in &fresh.problems {
            failures.push(format!("{at}: compile: {p}"));
        }
        let (rs, touched) = compiler.update(cluster);
        if *rs != fresh {
            failures.push(format!(
                "{at}: the incremental ruleset differs from a fresh compile"
            ));
        }
        if let Err(e) = dp.apply_update(rs, touched) {
            failures.push(format!("{at}: apply: {e}"));
            return;
        }
        let explanations = explain_all(cluster, batch);
        let outcomes = probe_with_retry(&lab, batch, |i, o| holds(batch[i].connect, o));
        for ((p, e), o) in batch.iter().zip(&explanations).zip(&outcomes) {
            pokes += 1;
            let agrees = e.as_ref().map(|e| e.allowed) == Ok(p.connect);
            explained += agrees as usize;
            if holds(p.connect, o) && agrees {
                passed += 1;
                continue;
            }
            failures.push(format!(
                "{at}: {p}: got {o}; explain says\n    {}",
                verdict(e)
            ));
        }
    });
    failures.extend(problems);
    dp.delete().expect("delete table");
    eprintln!(
        "cnp-upstream.yaml ({placement:?}): {} tests, {subtests} subtests, {pokes} pokes: {passed} passed, \
         {} failed (explain agreed on {explained}); everything-allowed preflight: {preflight} probes; {:.1} s",
        file.tests.len(),
        pokes - passed,
        started.elapsed().as_secs_f64()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// Probes every poke at once; those `ok` rejects are probed again with the longer timeout and
/// keep that answer.
fn probe_with_retry(
    lab: &Lab,
    pokes: &[Poke],
    ok: impl Fn(usize, &Outcome) -> bool,
) -> Vec<Outcome> {
    let specs: Vec<ProbeSpec> = pokes
        .iter()
        .map(|p| ProbeSpec {
            client_netns: lab.netns[&p.client.name].clone(),
            src: p.client.ip,
            dst: p.server.ip,
            protocol: p.protocol,
            port: p.port,
        })
        .collect();
    let sctp = lab.servers.sctp();
    let mut outcomes = probe_all(&specs, PROBE_TIMEOUT, sctp);
    let again: Vec<usize> = (0..specs.len()).filter(|&i| !ok(i, &outcomes[i])).collect();
    if !again.is_empty() {
        let retry: Vec<ProbeSpec> = again.iter().map(|&i| specs[i].clone()).collect();
        for (i, o) in again
            .into_iter()
            .zip(probe_all(&retry, RETRY_TIMEOUT, sctp))
        {
            outcomes[i] = o;
        }
    }
    outcomes
}

/// With no policy, every pod reaches every other pod and both nodes on every port the suite
/// serves: the harness works, so a denial later is the policy's doing. Returns the probe count.
fn everything_allowed(
    lab: &Lab,
    dp: &mut Dataplane,
    pods: &[PodDef],
    failures: &mut Vec<String>,
) -> usize {
    let cluster = World::new(pods, &[])
        .and_then(|w| w.cluster().map_err(|p| p.join(", ")))
        .expect("base world");
    dp.apply(&compile(&cluster)).expect("apply empty ruleset");
    let mut pokes = Vec::new();
    for client in pods.iter().filter(|p| !p.host_network) {
        for server in pods.iter().filter(|s| s.name != client.name) {
            let ports: Vec<(Protocol, u16)> = if server.host_network {
                let tcp = houses::host_tcp().map(|p| (Protocol::Tcp, p));
                let udp = houses::host_udp().map(|p| (Protocol::Udp, p));
                let sctp = houses::host_sctp().map(|p| (Protocol::Sctp, p));
                tcp.into_iter().chain(udp).chain(sctp).collect()
            } else {
                let tcp = houses::POD_TCP.map(|p| (Protocol::Tcp, p));
                let udp = houses::POD_UDP.map(|p| (Protocol::Udp, p));
                let sctp = houses::POD_SCTP.map(|p| (Protocol::Sctp, p));
                tcp.into_iter().chain(udp).chain(sctp).collect()
            };
            for (protocol, port) in ports {
                pokes.push(Poke {
                    client: client.clone(),
                    server: server.clone(),
                    protocol,
                    port,
                    connect: true,
                });
            }
        }
    }
    let outcomes = probe_with_retry(lab, &pokes, |_, o| o.connected());
    let explanations = explain_all(&cluster, &pokes);
    for ((p, o), e) in pokes.iter().zip(&outcomes).zip(&explanations) {
        let agrees = e.as_ref().map(|e| e.allowed) == Ok(true);
        if !o.connected() || !agrees {
            failures.push(format!(
                "everything-allowed preflight: {p}: got {o}; explain says\n    {}",
                verdict(e)
            ));
        }
    }
    pokes.len()
}
