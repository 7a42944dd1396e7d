//! NetworkPolicy and ClusterNetworkPolicy on this node: the model's namespaces, pods, nodes and
//! policies, plus this node's endpoints as IPAM knows them, compiled by felix and applied to the
//! `inet sepal` table.

use crate::ipam::Allocation;
use crate::model::Model;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sepal_felix::conntrack::Conntrack;
use sepal_felix::nft::{Applied, Dataplane, Options};
use sepal_felix::policy::{Cluster, ClusterNetworkPolicy, Compiler, Namespace, Node, Pod};
use std::collections::BTreeMap;
use std::net::IpAddr;
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
    /// The model's ClusterNetworkPolicies as they came, status included (the compiler gets them
    /// without): the status writer's input.
    cluster_network_policies: Vec<Arc<ClusterNetworkPolicy>>,
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
            cluster_network_policies: Vec::new(),
        }
    }

    /// Takes the namespaces, pods, nodes and policies of a new model state.
    pub fn update_model(&mut self, model: &Model) {
        self.from_model = cluster_reusing(model, &self.from_model);
        self.cluster_network_policies = model.cluster_network_policies().cloned().collect();
    }

    /// The ClusterNetworkPolicies as the datastore has them (metadata and status included).
    pub fn cluster_network_policies(&self) -> &[Arc<ClusterNetworkPolicy>] {
        &self.cluster_network_policies
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
                tracing::warn!(problem = %text, "{} content ignored or failing closed", problem.kind);
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

/// The namespaces, pods, nodes and policies of a model state, as the compiler takes them.
pub fn cluster_of(model: &Model) -> Cluster {
    cluster_reusing(model, &Cluster::default())
}

/// `cluster_of`, with the very `Arc` of `previous` for each cluster policy and node that is
/// unchanged for policy: Nodes change often (addresses, labels of other concerns), and the
/// compiler then compares pointers, not contents.
pub fn cluster_reusing(model: &Model, previous: &Cluster) -> Cluster {
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
    // Both in name order (the model's), as `reuse` looks them up.
    let cluster_policies = model
        .cluster_network_policies()
        .map(|p| {
            let view = policy_view(p);
            reuse(view, &previous.cluster_policies, |p| p.name())
        })
        .collect();
    let nodes = model
        .nodes()
        .filter_map(policy_node)
        .map(|n| reuse(n, &previous.nodes, |n| &n.name))
        .collect();
    Cluster {
        namespaces,
        pods,
        policies,
        cluster_policies,
        nodes,
    }
}

/// `value`, or the equal one of `previous` (sorted by `name`) so its `Arc` is shared.
fn reuse<T: PartialEq>(value: T, previous: &[Arc<T>], name: impl Fn(&T) -> &str) -> Arc<T> {
    match previous.binary_search_by(|p| name(p).cmp(name(&value))) {
        Ok(i) if *previous[i] == value => previous[i].clone(),
        _ => Arc::new(value),
    }
}

/// What policy reads of a ClusterNetworkPolicy: its name and spec. The status (which the agents
/// write, once per change of the spec) and the rest of the metadata are no change for policy.
fn policy_view(p: &ClusterNetworkPolicy) -> ClusterNetworkPolicy {
    ClusterNetworkPolicy {
        metadata: ObjectMeta {
            name: p.metadata.name.clone(),
            ..ObjectMeta::default()
        },
        spec: p.spec.clone(),
        ..ClusterNetworkPolicy::default()
    }
}

/// A Node as ClusterNetworkPolicy `nodes` peers see it: labels and every address of
/// `status.addresses` that is an IP (hostnames are not), sorted, so the order kubelet reports
/// them in is no change.
fn policy_node(n: &k8s_openapi::api::core::v1::Node) -> Option<Node> {
    let name = n.metadata.name.clone()?;
    let mut ips: Vec<IpAddr> = n
        .status
        .iter()
        .flat_map(|s| s.addresses.iter().flatten())
        .filter_map(|a| a.address.trim().parse().ok())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    Some(Node {
        name,
        labels: n.metadata.labels.clone().unwrap_or_default(),
        ips,
    })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Event, Object};
    use serde_json::{json, Value};

    fn upsert(m: &mut Model, v: Value) {
        let obj = crate::datastore::kube::strip(Object::from_value(v).expect("object"));
        m.apply(Event::Upsert(obj));
    }

    fn node(labels: Value, addresses: Value, annotations: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Node",
               "metadata": {"name": "n1", "labels": labels, "annotations": annotations},
               "status": {"addresses": addresses}})
    }

    fn cnp(priority: i64, status: Value) -> Value {
        json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
               "metadata": {"name": "deny-all", "generation": 2, "resourceVersion": "7"},
               "spec": {"tier": "Admin", "priority": priority,
                        "subject": {"namespaces": {}},
                        "ingress": [{"action": "Deny", "from": [{"namespaces": {}}]}]},
               "status": status})
    }

    #[test]
    fn nodes_carry_labels_and_every_ip_of_their_addresses() {
        let mut m = Model::default();
        upsert(
            &mut m,
            node(
                json!({"zone": "a"}),
                json!([{"type": "Hostname", "address": "n1"},
                       {"type": "InternalIP", "address": "fd00::1"},
                       {"type": "InternalIP", "address": "10.0.0.1"},
                       {"type": "ExternalIP", "address": "10.0.0.1"}]),
                json!({}),
            ),
        );
        let c = cluster_of(&m);
        assert_eq!(c.nodes.len(), 1);
        let n = &c.nodes[0];
        assert_eq!(n.name, "n1");
        assert_eq!(n.labels, BTreeMap::from([("zone".into(), "a".into())]));
        let ips: Vec<IpAddr> = vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()];
        assert_eq!(n.ips, ips, "IPs only, sorted, each once");
    }

    #[test]
    fn unchanged_nodes_and_policies_keep_their_arc() {
        let mut m = Model::default();
        let addrs = json!([{"type": "InternalIP", "address": "10.0.0.1"}]);
        upsert(&mut m, node(json!({"zone": "a"}), addrs.clone(), json!({})));
        upsert(&mut m, cnp(10, Value::Null));
        let first = cluster_of(&m);
        assert_eq!(first.cluster_policies.len(), 1);
        // What policy reads: name and spec, nothing the agents' status writes change.
        let view = &first.cluster_policies[0];
        assert_eq!(view.name(), "deny-all");
        assert!(view.status.is_none() && view.metadata.resource_version.is_none());

        // An annotation on the Node, the address order, the CNP's status: no change for policy.
        let swapped = json!([{"type": "Hostname", "address": "n1"},
                             {"type": "InternalIP", "address": "10.0.0.1"}]);
        upsert(
            &mut m,
            node(json!({"zone": "a"}), swapped, json!({"x": "y"})),
        );
        let status = json!({"conditions": [{"type": "Accepted", "status": "True",
            "reason": "Valid", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]});
        let mut with_status = cnp(10, status);
        with_status["metadata"]["resourceVersion"] = json!("8");
        upsert(&mut m, with_status);
        let second = cluster_reusing(&m, &first);
        assert!(Arc::ptr_eq(&first.nodes[0], &second.nodes[0]));
        assert!(Arc::ptr_eq(
            &first.cluster_policies[0],
            &second.cluster_policies[0]
        ));

        // A label or a priority: a new value.
        upsert(&mut m, node(json!({"zone": "b"}), addrs, json!({})));
        upsert(&mut m, cnp(20, Value::Null));
        let third = cluster_reusing(&m, &second);
        assert_eq!(third.nodes[0].labels["zone"], "b");
        assert_eq!(third.cluster_policies[0].spec.priority, 20);
        assert!(!Arc::ptr_eq(&second.nodes[0], &third.nodes[0]));
    }
}
