//! NetworkPolicy on this node: the model's namespaces, pods and policies, plus this node's
//! endpoints as IPAM knows them, compiled by felix and applied to the `inet sepal` table.

use crate::ipam::Allocation;
use crate::model::Model;
use sepal_felix::conntrack::Conntrack;
use sepal_felix::nft::{Applied, Dataplane, Options};
use sepal_felix::policy::{Cluster, Compiler, Namespace, Pod};
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};

/// The compiler's inputs from the datastore, and the dataplane that enforces the result.
pub struct PolicyEngine {
    from_model: Cluster,
    compiler: Compiler,
    dataplane: Dataplane,
    revoker: Revoker,
    /// Problem reports already logged, so a policy's invalid rule is reported once.
    reported: Vec<String>,
    /// The last compile's problems (sent to the cluster as Events by the status writer).
    problems: Vec<sepal_felix::policy::Problem>,
}

impl PolicyEngine {
    /// An engine programming this network namespace's `inet sepal` table with `opts`.
    pub fn new(opts: Options) -> PolicyEngine {
        PolicyEngine {
            from_model: Cluster::default(),
            compiler: Compiler::default(),
            dataplane: Dataplane::new(opts),
            revoker: Revoker::default(),
            reported: Vec::new(),
            problems: Vec::new(),
        }
    }

    /// Takes the namespaces, pods and policies of a new model state.
    pub fn update_model(&mut self, model: &Model) {
        self.from_model = cluster_of(model);
    }

    /// The cluster as policy sees it, with this node's endpoints (see `with_endpoints`).
    pub fn cluster(&self, endpoints: &[Allocation]) -> Cluster {
        with_endpoints(self.from_model.clone(), endpoints)
    }

    /// Invalid policy content the last `apply` left out.
    pub fn problems(&self) -> &[sepal_felix::policy::Problem] {
        &self.problems
    }

    /// Compiles and applies; only a changed ruleset reaches the kernel. When the change may deny
    /// something that was allowed, established flows it now denies lose their conntrack
    /// entries, so they stop (revocation).
    pub fn apply(&mut self, endpoints: &[Allocation]) -> Result<Applied, String> {
        let cluster = self.cluster(endpoints);
        let (ruleset, touched) = self.compiler.update(&cluster);
        for problem in &ruleset.problems {
            let text = format!("{problem:?}");
            if !self.reported.contains(&text) {
                tracing::warn!(problem = %text, "NetworkPolicy content ignored");
                self.reported.push(text);
            }
        }
        self.problems = ruleset.problems.clone();
        let started = std::time::Instant::now();
        let applied = self
            .dataplane
            .apply_update(ruleset, touched)
            .map_err(|e| e.to_string())?;
        if applied != Applied::Unchanged {
            tracing::debug!(
                ?applied,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "policy applied"
            );
        }
        let narrowed = matches!(
            applied,
            Applied::Full | Applied::Incremental { narrowed: true, .. }
        );
        self.revoker.offer(cluster, narrowed);
        Ok(applied)
    }

    /// Is there a table `inet sepal` already (left by the previous run)?
    pub fn table_exists(&self) -> bool {
        self.dataplane.table_exists().unwrap_or(false)
    }

    /// Per-rule counters of the table this engine programs.
    pub fn counters(
        &self,
    ) -> Result<BTreeMap<(String, String), sepal_felix::nft::RuleCounter>, sepal_felix::nft::NftError>
    {
        self.dataplane.counters()
    }
}

/// The namespaces, pods and policies of a model state, as the compiler takes them.
pub fn cluster_of(model: &Model) -> Cluster {
    let namespaces = model
        .namespaces()
        .filter_map(|ns| {
            let name = ns.metadata.name.clone()?;
            let labels = ns.metadata.labels.clone().unwrap_or_default();
            Some((name.clone(), Namespace { name, labels }))
        })
        .collect();
    let pods = model.pods().map(|p| p.policy.clone()).collect();
    let policies = model.network_policies().cloned().collect();
    Cluster {
        namespaces,
        pods,
        policies,
        ..Cluster::default()
    }
}

/// `cluster` with this node's endpoints: they take their addresses and host veth from IPAM,
/// which knows them before kubelet writes the Pod's status (CNI ADD waits for the rules of a pod
/// whose IPs the datastore does not show yet).
pub fn with_endpoints(mut cluster: Cluster, endpoints: &[Allocation]) -> Cluster {
    // By namespace, then name: looked up by the pods' shared names without copying them.
    let mut local: BTreeMap<&str, BTreeMap<&str, &Allocation>> = BTreeMap::new();
    for a in endpoints {
        local
            .entry(&a.pod_namespace)
            .or_default()
            .insert(&a.pod_name, a);
    }
    for pod in &mut cluster.pods {
        let found = local
            .get_mut(&*pod.namespace)
            .and_then(|by_name| by_name.remove(&*pod.name));
        if let Some(a) = found {
            let pod = Arc::make_mut(pod);
            pod.ips = a.ips.clone();
            pod.host_iface = Some(a.host_veth.clone());
        }
    }
    // Endpoints whose Pod object is not in the datastore (yet): no labels, but their
    // interface is dispatched, so policies selecting everything already apply.
    for a in local.into_values().flat_map(BTreeMap::into_values) {
        cluster.pods.push(Arc::new(Pod {
            namespace: a.pod_namespace.as_str().into(),
            name: a.pod_name.as_str().into(),
            ips: a.ips.clone(),
            host_iface: Some(a.host_veth.clone()),
            ..Pod::default()
        }));
    }
    cluster
}

/// Removes the conntrack entries of established flows the rules now deny, on a thread of its own
/// so that listing conntrack never holds up the agent: the rules are in place before it runs,
/// and every new flow obeys them. Requests that pile up while it works collapse into the newest
/// (what the newest rules deny is what must go).
#[derive(Default)]
struct Revoker {
    pending: Option<Arc<(Mutex<Option<Cluster>>, Condvar)>>,
}

impl Revoker {
    /// The cluster the rules were just compiled from: revocation runs on it when `narrowed`
    /// (the change may deny something that was allowed), and it replaces a request still waiting.
    fn offer(&mut self, cluster: Cluster, narrowed: bool) {
        if !narrowed && self.pending.is_none() {
            return;
        }
        if self.pending.is_none() {
            let pending = Arc::new((Mutex::new(None), Condvar::new()));
            let worker = pending.clone();
            let spawned = std::thread::Builder::new()
                .name("revoke".into())
                .spawn(move || revoke_loop(&worker));
            if let Err(e) = spawned {
                tracing::warn!(error = %e, "no revocation thread: revoking in line");
                revoke_logged(&Conntrack::new(), &cluster);
                return;
            }
            self.pending = Some(pending);
        }
        let Some((slot, ready)) = self.pending.as_deref() else {
            return;
        };
        let mut waiting = slot.lock().unwrap_or_else(|e| e.into_inner());
        if narrowed || waiting.is_some() {
            *waiting = Some(cluster);
            ready.notify_one();
        }
    }
}

fn revoke_loop(pending: &(Mutex<Option<Cluster>>, Condvar)) {
    let conntrack = Conntrack::new();
    let (slot, ready) = pending;
    loop {
        let cluster = {
            let mut guard = slot.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if let Some(c) = guard.take() {
                    break c;
                }
                guard = ready.wait(guard).unwrap_or_else(|e| e.into_inner());
            }
        };
        revoke_logged(&conntrack, &cluster);
    }
}

/// A failure is logged, not returned: the rules are in place.
fn revoke_logged(conntrack: &Conntrack, cluster: &Cluster) {
    match conntrack.revoke(cluster) {
        Ok(flows) if flows.is_empty() => {}
        Ok(flows) => tracing::info!(
            flows = flows.len(),
            first = ?flows[0],
            "NetworkPolicy revoked established flows"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot revoke flows the new NetworkPolicy denies"),
    }
}
