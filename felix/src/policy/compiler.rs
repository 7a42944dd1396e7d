//! The long-lived compiler. It keeps what it built for each policy (its chains and the sets they
//! look up) and for each local endpoint (its chains and dispatch entries), and on the next cluster
//! state rebuilds only what the change can reach:
//! - a changed policy: its own chains and sets, and the endpoints it selected or now selects;
//! - a changed pod: the sets whose recipe names it (peer sets, named ports), the policies that
//!   select it when it is on this node (before or after the change), and its own endpoint. A
//!   policy that only names the pod as a peer keeps its chains: they look the sets up by name.
//!
//! Anything broader (namespace labels, the address families in use, duplicate pods or veths)
//! rebuilds everything. A set's or chain's name determines its content (names derive from what
//! decides the content), so fragments that share one agree on it; reference counts say when the
//! last user is gone. `Touched` names what changed, so the dataplane only compares those.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::cnp::{validate_cluster_policy, Tier};
use super::compile::{
    compile_group, dir_index, endpoint_chain, families_in_use, fit_comment, ns_labels,
    policy_chain, rule_groups, selects, short_hash, Ctx, GroupSource, NsLabels, PodIndex,
    DIRECTIONS,
};
use super::recipe::{key_of, PodChange, Recipe};
use super::tiers::{
    clear_pass, cluster_families, cluster_selects, compile_cluster_policy, local_subjects,
    tier_jump, CNamed,
};
use super::validate::{validate, Direction, Problem};
use super::{
    default_deny_comment, Action, Chain, Cluster, ClusterNetworkPolicy, Family, Match, Namespace,
    NetworkPolicy, NftRule, Node, Pod, Policy, Ruleset,
};

/// A policy's or pod's identity: (namespace, name).
type Key = (String, String);

/// What the last `Compiler::update` may have changed in its ruleset, by name; everything else is
/// as the update before left it. `full`: anything may have changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    /// The update this one follows (0: none) and this update's own number, unique in the
    /// process: a dataplane compares only touched names when it applied exactly `since`.
    pub since: u64,
    pub generation: u64,
    pub full: bool,
    pub sets: BTreeSet<String>,
    pub chains: BTreeSet<String>,
    /// Host veths whose dispatch entries or endpoint membership may have changed.
    pub ifaces: BTreeSet<String>,
}

/// Compiles again and again (one per model change), rebuilding only what a change affects.
/// `compile` is a fresh one.
#[derive(Debug, Default)]
pub struct Compiler {
    /// By (namespace, name): the source last seen, and what it validated to.
    cache: BTreeMap<Key, Validated>,
    /// The same for ClusterNetworkPolicies, by name.
    cluster_cache: BTreeMap<String, ClusterValidated>,
    state: State,
    touched: Touched,
    generation: u64,
}

static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

#[derive(Debug)]
struct Validated {
    source: Arc<NetworkPolicy>,
    policy: Option<Named>,
    problems: Vec<Problem>,
}

#[derive(Debug)]
struct ClusterValidated {
    source: Arc<ClusterNetworkPolicy>,
    policy: Option<CNamed>,
    problems: Vec<Problem>,
}

/// A validated policy and the names of its chains and jump comments (by direction: ingress,
/// egress), computed once.
#[derive(Debug)]
struct Named {
    policy: Policy,
    chain: [String; 2],
    jump_comment: [String; 2],
}

/// The last compile's result and what each part of it came from.
#[derive(Debug, Default)]
struct State {
    /// False until the first compile, and after one whose input forces the next to start over.
    incremental: bool,
    /// Pods by namespace and name.
    pods: HashMap<Arc<str>, HashMap<Arc<str>, Arc<Pod>>>,
    namespaces: BTreeMap<String, Namespace>,
    families: Vec<Family>,
    policies: HashMap<Key, PolicyPart>,
    /// What each ClusterNetworkPolicy contributes, by name.
    cluster_parts: HashMap<String, PolicyPart>,
    /// The nodes `nodes` peers were resolved against.
    nodes: Vec<Arc<Node>>,
    endpoints: HashMap<String, EndpointPart>,
    /// Users of each set (policies) and of each shared jump chain (endpoints).
    set_users: HashMap<String, usize>,
    /// How each pod-dependent set in use was built, by recipe key (a set name's prefix).
    recipes: HashMap<String, Recipe>,
    shared_users: HashMap<String, usize>,
    rs: Ruleset,
}

/// What one policy contributes.
#[derive(Debug, Default)]
struct PolicyPart {
    chains: Vec<String>,
    sets: BTreeSet<String>,
    /// Host veths of the local pods it selects (their endpoint chains jump to its chains).
    ifaces: Vec<String>,
}

/// What one local endpoint contributes besides its dispatch entries.
#[derive(Debug, Default)]
struct EndpointPart {
    chains: Vec<String>,
    shared: Vec<String>,
}

impl Compiler {
    /// Builds the desired ruleset for the node whose pods have `host_iface` set.
    ///
    /// Layout: one chain per (policy, direction) with its rules, shared by every local pod it
    /// selects; one chain per isolated (endpoint, direction) that jumps to the chains of the
    /// policies selecting it (through a chain shared by pods selected by the same policies) and
    /// drops what none accepted.
    pub fn compile(&mut self, cluster: &Cluster) -> Ruleset {
        self.update(cluster).0.clone()
    }

    /// `compile` without copying the result: the ruleset, and what changed since the last call.
    pub fn update(&mut self, cluster: &Cluster) -> (&Ruleset, &Touched) {
        let Compiler {
            cache,
            cluster_cache,
            state,
            touched,
            generation,
        } = self;
        let changed_policies = revalidate(cache, cluster);
        let mut changed_cluster = revalidate_cluster(cluster_cache, cluster);
        // The caches are ordered maps: iterating them gives the sorted order.
        let cluster_names: Vec<&String> = cluster_cache.keys().collect();
        let cnamed: BTreeMap<&str, &CNamed> = cluster_names
            .iter()
            .filter_map(|&k| cluster_cache[k].policy.as_ref().map(|n| (k.as_str(), n)))
            .collect();
        // Evaluation order within each tier.
        let mut tier_order: Vec<&CNamed> = cnamed.values().copied().collect();
        tier_order.sort_by(|a, b| a.policy.order_key().cmp(&b.policy.order_key()));
        let keys: Vec<&Key> = cache.keys().collect();
        let named: BTreeMap<&Key, &Named> = keys
            .iter()
            .filter_map(|&k| cache[k].policy.as_ref().map(|n| (k, n)))
            .collect();

        // Pods by identity and local pods by veth; the last of duplicates wins, as in a list.
        let mut pods: HashSet<(&str, &str)> = HashSet::with_capacity(cluster.pods.len());
        let mut local: BTreeMap<&str, &Pod> = BTreeMap::new();
        let mut local_count = 0;
        for pod in &cluster.pods {
            pods.insert((&pod.namespace, &pod.name));
            if let Some(iface) = pod.host_iface.as_deref() {
                local_count += 1;
                local.insert(iface, pod);
            }
        }
        let duplicates = pods.len() < cluster.pods.len() || local.len() < local_count;
        let mut families = families_in_use(cluster, named.values().map(|n| &n.policy));
        families.extend(cluster_families(cluster, cnamed.values().copied()));
        families.sort();
        families.dedup();
        let mut ns_labels = ns_labels(cluster);

        *touched = Touched {
            since: *generation,
            generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
            ..Touched::default()
        };
        *generation = touched.generation;
        let full = !state.incremental
            || duplicates
            || state.namespaces != cluster.namespaces
            || state.families != families;
        let mut affected: BTreeSet<Key> = BTreeSet::new();
        let mut affected_cluster: BTreeSet<String> = BTreeSet::new();
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        // Policies selecting a local pod that changed (before or after): whom they select here
        // changes, and their chains only if they gain their first local pod or lose their last.
        let mut retarget: BTreeSet<Key> = BTreeSet::new();
        let mut retarget_cluster: BTreeSet<String> = BTreeSet::new();
        // Pod-dependent sets to patch for policies that are not rebuilt themselves, and the pods
        // that changed (before, after).
        let mut refresh: Vec<Recipe> = Vec::new();
        let mut changed: Vec<(Option<Arc<Pod>>, Option<&Pod>)> = Vec::new();
        if full {
            *state = State::default();
            touched.full = true;
            affected.extend(named.keys().map(|k| (*k).clone()));
            affected_cluster.extend(cnamed.keys().map(|k| k.to_string()));
            dirty.extend(local.keys().map(|i| i.to_string()));
            for pod in &cluster.pods {
                state.remember(pod);
            }
            state.namespaces = cluster.namespaces.clone();
            state.families = families.clone();
        } else {
            for pod in &cluster.pods {
                let old = state.pod(&pod.namespace, &pod.name);
                // The caller's unchanged pods are usually the very ones remembered.
                if !old.is_some_and(|o| Arc::ptr_eq(o, pod) || o == pod) {
                    changed.push((old.cloned(), Some(&**pod)));
                    state.remember(pod);
                }
            }
            for (namespace, by_name) in &mut state.pods {
                by_name.retain(|name, old| {
                    let keep = pods.contains(&(&**namespace, &**name));
                    if !keep {
                        changed.push((Some(old.clone()), None));
                    }
                    keep
                });
            }
            // A removed pod's namespace may be gone from the cluster; its labels are still known.
            for old in changed.iter().filter_map(|(old, _)| old.as_ref()) {
                if !ns_labels.contains_key(&*old.namespace) {
                    let labels = cluster.namespace_labels(&old.namespace);
                    ns_labels.insert(old.namespace.to_string(), labels);
                }
            }
            // A policy's chains depend on pods only through whether it selects a local pod; what
            // it selects and names as peers is in sets, patched from their recipes.
            let mut stale: BTreeSet<&str> = BTreeSet::new();
            for (old, new) in &changed {
                let versions = || old.iter().map(|p| &**p).chain(new.iter().copied());
                dirty.extend(versions().filter_map(|p| p.host_iface.clone()));
                for (key, recipe) in &state.recipes {
                    if !stale.contains(key.as_str())
                        && versions().any(|p| recipe.depends_on(&ns_labels, p))
                    {
                        stale.insert(key);
                    }
                }
                let local = || versions().filter(|p| p.host_iface.is_some());
                if local().next().is_none() {
                    continue;
                }
                for (key, n) in &named {
                    if !retarget.contains(*key) && local().any(|p| selects(&n.policy, p)) {
                        retarget.insert((*key).clone());
                    }
                }
                for (&name, n) in &cnamed {
                    if !retarget_cluster.contains(name)
                        && local().any(|p| cluster_selects(&ns_labels, &n.policy, p))
                    {
                        retarget_cluster.insert(name.to_string());
                    }
                }
            }
            refresh.extend(stale.into_iter().map(|key| state.recipes[key].clone()));
            affected.extend(changed_policies.iter().cloned());
            affected_cluster.extend(changed_cluster.iter().cloned());
            // `nodes` peers resolve to the nodes' addresses.
            if state.nodes != cluster.nodes {
                affected_cluster.extend(
                    cnamed
                        .iter()
                        .filter(|(_, n)| n.uses_nodes)
                        .map(|(name, _)| name.to_string()),
                );
            }
        }
        if full {
            changed_cluster.clear();
        }
        state.nodes = cluster.nodes.clone();

        // A policy's chains depend on this node's pods only through whether it selects one of
        // them: while that holds, a retargeted policy keeps its chains and only its endpoints
        // change (its pod-dependent sets were patched above).
        let index = PodIndex::new(cluster);
        for key in &retarget {
            if let (false, Some(n)) = (affected.contains(key), named.get(key)) {
                let ifaces = local_ifaces(&index, &n.policy);
                if !retargeted(state.policies.get_mut(key), ifaces) {
                    affected.insert(key.clone());
                }
            }
        }
        for name in &retarget_cluster {
            if let (false, Some(n)) = (affected_cluster.contains(name), cnamed.get(name.as_str())) {
                let ifaces = cluster_local_ifaces(&index, &ns_labels, &n.policy);
                if !retargeted(state.cluster_parts.get_mut(name), ifaces) {
                    affected_cluster.insert(name.clone());
                }
            }
        }

        // Policies: drop what the affected ones built, then build them anew.
        // Endpoints jump to the policies selecting them: only a changed policy (or a changed pod,
        // dirty above) changes whom it selects or whether it isolates a direction.
        for key in &affected {
            if let Some(part) = state.policies.remove(key) {
                if changed_policies.contains(key) {
                    dirty.extend(part.ifaces.iter().cloned());
                }
                state.drop_policy(part, touched);
            }
        }
        // Cluster policies, the same way.
        for name in &affected_cluster {
            if let Some(part) = state.cluster_parts.remove(name) {
                if changed_cluster.contains(name) {
                    dirty.extend(part.ifaces.iter().cloned());
                }
                state.drop_policy(part, touched);
            }
        }
        // Sets in use that name a changed pod, patched; the policies rebuilt below reuse them
        // and every set in use they find unchanged.
        if !refresh.is_empty() {
            let mut by_ip: HashMap<IpAddr, Vec<&Pod>> = HashMap::new();
            for pod in &cluster.pods {
                for ip in &pod.ips {
                    by_ip.entry(*ip).or_default().push(pod);
                }
            }
            let holders = |ip: &IpAddr| by_ip.get(ip).cloned().unwrap_or_default();
            let changes: Vec<PodChange> = changed.iter().map(|(o, n)| (o.as_deref(), *n)).collect();
            for recipe in &refresh {
                let patched = recipe.patch(&mut state.rs.sets, &changes, &ns_labels, &holders);
                touched.sets.extend(patched);
            }
        }

        let mut fresh = HashMap::new();
        let mut fresh_recipes = HashMap::new();
        let mut ctx = Ctx {
            cluster,
            index: &index,
            ns_labels: &ns_labels,
            families: &families,
            sets: &mut fresh,
            recipes: &mut fresh_recipes,
            current: &state.rs.sets,
            kept: &state.recipes,
        };

        let mut built = Vec::new();
        for key in &affected {
            if let Some(n) = named.get(key) {
                built.push((key, compile_policy(&mut ctx, n)));
            }
        }
        let mut cluster_built = Vec::new();
        for name in &affected_cluster {
            if let Some(n) = cnamed.get(name.as_str()) {
                let mut part = PolicyPart {
                    ifaces: cluster_local_ifaces(&index, &ns_labels, &n.policy),
                    ..PolicyPart::default()
                };
                let mut chains = Vec::new();
                if !part.ifaces.is_empty() {
                    chains = compile_cluster_policy(&mut ctx, n);
                    for (name, chain) in &chains {
                        part.chains.push(name.clone());
                        part.sets.extend(
                            chain
                                .rules
                                .iter()
                                .flat_map(|r| r.matches.iter().filter_map(Match::set))
                                .map(str::to_string),
                        );
                    }
                }
                cluster_built.push((name, part, chains));
            }
        }
        for (key, (part, chains)) in built {
            if full || changed_policies.contains(key) {
                dirty.extend(part.ifaces.iter().cloned());
            }
            state.install(&part, chains, &fresh, &fresh_recipes, touched);
            state.policies.insert(key.clone(), part);
        }

        for (name, part, chains) in cluster_built {
            if full || changed_cluster.contains(name) {
                dirty.extend(part.ifaces.iter().cloned());
            }
            state.install(&part, chains, &fresh, &fresh_recipes, touched);
            state.cluster_parts.insert(name.clone(), part);
        }
        // Endpoints whose pod or whose selecting policies changed.
        let mut by_namespace: BTreeMap<&str, Vec<&Named>> = BTreeMap::new();
        for n in named.values() {
            by_namespace
                .entry(n.policy.namespace.as_str())
                .or_default()
                .push(n);
        }
        let mut jumps_of: HashMap<(Vec<&str>, usize), Option<NftRule>> = HashMap::new();
        for iface in dirty {
            if let Some(part) = state.endpoints.remove(&iface) {
                state.drop_endpoint(part, touched);
            }
            state.rs.ingress_dispatch.remove(&iface);
            state.rs.local_dispatch.remove(&iface);
            state.rs.egress_dispatch.remove(&iface);
            state.rs.endpoints.remove(&iface);
            if let Some(pod) = local.get(iface.as_str()) {
                let selecting: Vec<&Named> = by_namespace
                    .get(&*pod.namespace)
                    .into_iter()
                    .flatten()
                    .filter(|n| selects(&n.policy, pod))
                    .copied()
                    .collect();
                let tiers = TierLists::of(&tier_order, &ns_labels, pod);
                let part =
                    state.build_endpoint(&iface, pod, &selecting, &tiers, &mut jumps_of, touched);
                state.endpoints.insert(iface.clone(), part);
                state.rs.endpoints.insert(iface.clone());
            }
            touched.ifaces.insert(iface);
        }

        let mut problems: Vec<Problem> = keys
            .iter()
            .flat_map(|k| cache[*k].problems.iter().cloned())
            .chain(
                cluster_names
                    .iter()
                    .flat_map(|k| cluster_cache[*k].problems.iter().cloned()),
            )
            .collect();
        problems.sort_by(|a, b| (&a.policy, &a.field).cmp(&(&b.policy, &b.field)));
        state.rs.problems = problems;
        state.incremental = !duplicates;
        (&state.rs, touched)
    }
}

/// Validates the policies whose source changed (the cache keeps the rest); returns the keys of
/// policies changed, added or removed.
fn revalidate(cache: &mut BTreeMap<Key, Validated>, cluster: &Cluster) -> BTreeSet<Key> {
    let mut seen: BTreeSet<Key> = BTreeSet::new();
    let mut changed: BTreeSet<Key> = BTreeSet::new();
    for np in &cluster.policies {
        let key = (
            np.metadata.namespace.clone().unwrap_or_default(),
            np.metadata.name.clone().unwrap_or_default(),
        );
        if cache
            .get(&key)
            .is_none_or(|v| !Arc::ptr_eq(&v.source, np) && v.source != *np)
        {
            let (policy, problems) = validate(np);
            let policy = policy.map(|policy| Named {
                chain: DIRECTIONS.map(|d| policy_chain(&policy, d)),
                jump_comment: DIRECTIONS.map(|d| fit_comment(&policy.id(), &d.to_string())),
                policy,
            });
            cache.insert(
                key.clone(),
                Validated {
                    source: np.clone(),
                    policy,
                    problems,
                },
            );
            changed.insert(key.clone());
        }
        seen.insert(key);
    }
    cache.retain(|key, _| {
        let keep = seen.contains(key);
        if !keep {
            changed.insert(key.clone());
        }
        keep
    });
    changed
}

/// `revalidate` for ClusterNetworkPolicies: returns the names changed, added or removed.
fn revalidate_cluster(
    cache: &mut BTreeMap<String, ClusterValidated>,
    cluster: &Cluster,
) -> BTreeSet<String> {
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut changed: BTreeSet<String> = BTreeSet::new();
    for cnp in &cluster.cluster_policies {
        let name = cnp.name().to_string();
        if cache
            .get(&name)
            .is_none_or(|v| !Arc::ptr_eq(&v.source, cnp) && v.source != *cnp)
        {
            let (policy, problems) = validate_cluster_policy(cnp);
            cache.insert(
                name.clone(),
                ClusterValidated {
                    source: cnp.clone(),
                    policy: policy.map(CNamed::new),
                    problems,
                },
            );
            changed.insert(name.clone());
        }
        seen.insert(name);
    }
    cache.retain(|name, _| {
        let keep = seen.contains(name);
        if !keep {
            changed.insert(name.clone());
        }
        keep
    });
    changed
}

/// A local pod's ClusterNetworkPolicies per tier, in evaluation order.
struct TierLists<'n> {
    admin: Vec<&'n CNamed>,
    baseline: Vec<&'n CNamed>,
}

impl<'n> TierLists<'n> {
    fn of(ordered: &[&'n CNamed], ns_labels: &NsLabels, pod: &Pod) -> TierLists<'n> {
        let (admin, baseline) = ordered
            .iter()
            .filter(|n| cluster_selects(ns_labels, &n.policy, pod))
            .partition(|n| n.policy.tier == Tier::Admin);
        TierLists { admin, baseline }
    }

    fn in_direction(list: &[&'n CNamed], direction: Direction) -> Vec<&'n CNamed> {
        list.iter()
            .filter(|n| n.applies(direction))
            .copied()
            .collect()
    }
}

/// Points an unchanged policy's part at the local pods it selects now (`ifaces`). False when
/// its chains must be built instead: it has no part yet, or it gained its first local pod or
/// lost its last.
fn retargeted(part: Option<&mut PolicyPart>, ifaces: Vec<String>) -> bool {
    match part {
        Some(part) if part.ifaces.is_empty() == ifaces.is_empty() => {
            part.ifaces = ifaces;
            true
        }
        _ => false,
    }
}

/// The veths of the local pods a cluster policy's subject holds.
fn cluster_local_ifaces(
    index: &PodIndex,
    ns_labels: &NsLabels,
    policy: &super::cnp::ClusterPolicy,
) -> Vec<String> {
    local_subjects(index, ns_labels, &policy.namespaces, &policy.pods)
        .iter()
        .filter_map(|p| p.host_iface.clone())
        .collect()
}

/// The veths of the local pods a NetworkPolicy selects.
fn local_ifaces(index: &PodIndex, policy: &Policy) -> Vec<String> {
    index
        .in_namespace(&policy.namespace)
        .iter()
        .filter(|(_, pod)| selects(policy, pod))
        .filter_map(|(_, pod)| pod.host_iface.clone())
        .collect()
}

/// One policy's chains (when it selects a pod of this node) and the names of the sets they use.
fn compile_policy(ctx: &mut Ctx, named: &Named) -> (PolicyPart, Vec<(String, Chain)>) {
    let policy = &named.policy;
    let mut part = PolicyPart {
        ifaces: local_ifaces(ctx.index, policy),
        ..PolicyPart::default()
    };
    let mut chains = Vec::new();
    // A policy selecting no pod of this node needs nothing here.
    if part.ifaces.is_empty() {
        return (part, chains);
    }
    for direction in DIRECTIONS {
        let Some(rules) = policy.rules(direction) else {
            continue;
        };
        let mut chain = Chain::default();
        for group in rule_groups(rules) {
            let src = GroupSource::network_policy(policy, direction, &group);
            compile_group(ctx, &src, direction, &group, &mut chain.rules);
        }
        for rule in &chain.rules {
            part.sets.extend(
                rule.matches
                    .iter()
                    .filter_map(Match::set)
                    .map(str::to_string),
            );
        }
        let name = named.chain[dir_index(direction)].clone();
        part.chains.push(name.clone());
        chains.push((name, chain));
    }
    (part, chains)
}

impl State {
    fn pod(&self, namespace: &str, name: &str) -> Option<&Arc<Pod>> {
        self.pods.get(namespace)?.get(name)
    }

    fn remember(&mut self, pod: &Arc<Pod>) {
        let by_name = match self.pods.get_mut(&pod.namespace) {
            Some(m) => m,
            None => self.pods.entry(pod.namespace.clone()).or_default(),
        };
        by_name.insert(pod.name.clone(), pod.clone());
    }

    fn drop_chains(&mut self, names: impl IntoIterator<Item = String>, touched: &mut Touched) {
        for name in names {
            self.rs.chains.remove(&name);
            touched.chains.insert(name);
        }
    }

    /// Puts a freshly built policy's chains into the ruleset and counts it as a user of its
    /// sets (taken from this round's `fresh` sets where their content changed).
    fn install(
        &mut self,
        part: &PolicyPart,
        chains: Vec<(String, Chain)>,
        fresh: &HashMap<String, super::Set>,
        recipes: &HashMap<String, Recipe>,
        touched: &mut Touched,
    ) {
        for (name, chain) in chains {
            touched.chains.insert(name.clone());
            self.rs.chains.insert(name, chain);
        }
        for name in &part.sets {
            *self.set_users.entry(name.clone()).or_default() += 1;
            let key = key_of(name);
            if let Some(recipe) = recipes.get(key) {
                if !self.recipes.contains_key(key) {
                    self.recipes.insert(key.to_string(), recipe.clone());
                }
            }
            // Not built this round: a set in use, current, that the policy reuses.
            let Some(set) = fresh.get(name) else {
                debug_assert!(
                    self.rs.sets.contains_key(name),
                    "{name} neither built nor in use"
                );
                continue;
            };
            if self.rs.sets.get(name) != Some(set) {
                touched.sets.insert(name.clone());
                self.rs.sets.insert(name.clone(), set.clone());
            }
        }
    }

    fn drop_policy(&mut self, part: PolicyPart, touched: &mut Touched) {
        self.drop_chains(part.chains, touched);
        for name in part.sets {
            if release(&mut self.set_users, &name) {
                self.rs.sets.remove(&name);
                self.recipes.remove(key_of(&name));
                touched.sets.insert(name);
            }
        }
    }

    fn drop_endpoint(&mut self, part: EndpointPart, touched: &mut Touched) {
        self.drop_chains(part.chains, touched);
        // Shared jump chains go with their last user.
        let unused: Vec<String> = part
            .shared
            .into_iter()
            .filter(|name| release(&mut self.shared_users, name))
            .collect();
        self.drop_chains(unused, touched);
    }

    /// The chains of an endpoint isolated in a direction: a jump to the policies selecting it
    /// (one policy's chain, or a chain shared by pods selected by the same policies), then its
    /// default-deny drop.
    fn build_endpoint<'n>(
        &mut self,
        iface: &str,
        pod: &Pod,
        selecting: &[&'n Named],
        tiers: &TierLists<'_>,
        jumps_of: &mut HashMap<(Vec<&'n str>, usize), Option<NftRule>>,
        touched: &mut Touched,
    ) -> EndpointPart {
        let mut part = EndpointPart::default();
        for direction in DIRECTIONS {
            let d = dir_index(direction);
            let policies: Vec<&Named> = selecting
                .iter()
                .filter(|n| n.policy.rules(direction).is_some())
                .copied()
                .collect();
            let key: Vec<&str> = policies.iter().map(|n| n.chain[d].as_str()).collect();
            let jump = jumps_of
                .entry((key, d))
                .or_insert_with(|| jump_rule(&policies, direction))
                .clone();
            let admin = TierLists::in_direction(&tiers.admin, direction);
            let baseline = TierLists::in_direction(&tiers.baseline, direction);
            let mut rules = Vec::new();
            // Admin first, whatever else selects the pod.
            if !admin.is_empty() {
                rules.push(self.tier_entry(Tier::Admin, &admin, direction, &mut part, touched));
                rules.extend(clear_pass(Tier::Admin, &admin, direction));
            }
            if let Some(jump) = jump {
                if policies.len() > 1 {
                    // The shared chain of jumps.
                    let Action::Jump(shared) = &jump.action else {
                        unreachable!("jump_rule returns jumps");
                    };
                    let rules = policies.iter().map(|n| policy_jump(n, d)).collect();
                    self.share(shared.clone(), rules, &mut part, touched);
                }
                // NetworkPolicy isolates the pod: its verdict is final.
                rules.push(jump);
                rules.push(NftRule {
                    matches: vec![],
                    action: Action::Drop,
                    comment: default_deny_comment(&pod.namespace, &pod.name, direction),
                });
            } else if !baseline.is_empty() {
                rules.push(self.tier_entry(
                    Tier::Baseline,
                    &baseline,
                    direction,
                    &mut part,
                    touched,
                ));
                rules.extend(clear_pass(Tier::Baseline, &baseline, direction));
            }
            let isolated = !policies.is_empty();
            if direction == Direction::Egress {
                self.build_local(iface, &admin, &baseline, isolated, &mut part, touched);
            }
            if rules.is_empty() {
                continue;
            }
            // Only an isolated pod's chain is its own (its default deny names it); the others
            // hold the tiers alone and are shared by every pod with the same ones.
            let name = if isolated {
                let name = endpoint_chain(iface, direction);
                self.rs.chains.insert(name.clone(), Chain { rules });
                touched.chains.insert(name.clone());
                part.chains.push(name.clone());
                name
            } else {
                let name = shared_endpoint_chain(&endpoint_chain("", direction)[..1], &rules);
                self.share(name, rules, &mut part, touched)
            };
            let dispatch = match direction {
                Direction::Ingress => &mut self.rs.ingress_dispatch,
                Direction::Egress => &mut self.rs.egress_dispatch,
            };
            dispatch.insert(iface.to_string(), name);
        }
        part
    }

    /// Counts `part` as a user of the shared chain `name`, creating it with its first user.
    fn share(
        &mut self,
        name: String,
        rules: Vec<NftRule>,
        part: &mut EndpointPart,
        touched: &mut Touched,
    ) -> String {
        let users = self.shared_users.entry(name.clone()).or_default();
        if *users == 0 {
            self.rs.chains.insert(name.clone(), Chain { rules });
            touched.chains.insert(name.clone());
        }
        *users += 1;
        part.shared.push(name.clone());
        name
    }
}

impl State {
    /// The chain for a pod's traffic to its own node, which never crosses the forward hook:
    /// the same Admin tier as its egress, then, unless a NetworkPolicy isolates it (which
    /// always allows the pod's node, as Kubernetes says), Baseline.
    fn build_local(
        &mut self,
        iface: &str,
        admin: &[&CNamed],
        baseline: &[&CNamed],
        isolated: bool,
        part: &mut EndpointPart,
        touched: &mut Touched,
    ) {
        let direction = Direction::Egress;
        let mut rules = Vec::new();
        if !admin.is_empty() {
            rules.push(self.tier_entry(Tier::Admin, admin, direction, part, touched));
            rules.extend(clear_pass(Tier::Admin, admin, direction));
        }
        if !isolated && !baseline.is_empty() {
            rules.push(self.tier_entry(Tier::Baseline, baseline, direction, part, touched));
            rules.extend(clear_pass(Tier::Baseline, baseline, direction));
        }
        if rules.is_empty() {
            return;
        }
        // Nothing in it is the pod's own: shared by every pod with the same tiers.
        let name = shared_endpoint_chain("l", &rules);
        let name = self.share(name, rules, part, touched);
        self.rs.local_dispatch.insert(iface.to_string(), name);
    }

    /// The jump into a tier's policies for an endpoint; a shared tier chain is created with
    /// its first user and counted like the shared NetworkPolicy jump chains.
    fn tier_entry(
        &mut self,
        tier: Tier,
        policies: &[&CNamed],
        direction: Direction,
        part: &mut EndpointPart,
        touched: &mut Touched,
    ) -> NftRule {
        let (jump, shared) = tier_jump(tier, policies, direction);
        if let Some((name, chain)) = shared {
            self.share(name, chain.rules, part, touched);
        }
        jump
    }
}

/// The name of an endpoint chain shared by the pods whose chain would hold `rules` (`kind`:
/// `i`ngress, `e`gress, `l`ocal): `si-`, `se-` or `sl-` and a hash of the rules.
fn shared_endpoint_chain(kind: &str, rules: &[NftRule]) -> String {
    format!("s{kind}-{}", short_hash(&format!("{rules:?}")))
}

fn policy_jump(named: &Named, d: usize) -> NftRule {
    NftRule {
        matches: vec![],
        action: Action::Jump(named.chain[d].clone()),
        comment: named.jump_comment[d].clone(),
    }
}

/// An endpoint chain's jump: to the one policy's chain, or to the chain shared by every pod
/// that the same policies select (named after them).
fn jump_rule(policies: &[&Named], direction: Direction) -> Option<NftRule> {
    let d = dir_index(direction);
    match policies {
        [] => None,
        [one] => Some(policy_jump(one, d)),
        several => {
            let key: Vec<&str> = several.iter().map(|n| n.jump_comment[d].as_str()).collect();
            let shared = format!(
                "ps{}-{}",
                &endpoint_chain("", direction)[..2],
                short_hash(&key.join("\n"))
            );
            Some(NftRule {
                matches: vec![],
                action: Action::Jump(shared),
                comment: format!("{} policies", several.len()),
            })
        }
    }
}

/// Drops one user of `name`; true when that was the last.
fn release(users: &mut HashMap<String, usize>, name: &str) -> bool {
    match users.get_mut(name) {
        Some(n) if *n > 1 => {
            *n -= 1;
            false
        }
        _ => {
            users.remove(name);
            true
        }
    }
}
