//! `sepal node`: the node agent. It owns this node's IPAM, serves the CNI plugin's requests and
//! keeps the host side of every endpoint (pod routes, node-block blackholes) in the kernel.
//!
//! Everything happens in the network namespace the process runs in. On start it adopts what a
//! previous run left (allocations, veths, protocol-83 routes) and removes only what is stale.

use crate::config::NodeConfig;
use crate::datastore;
use crate::ipam::store::{Ipam, StoreError};
use crate::ipam::{Claim, IpamError};
use crate::model::{pod_cidrs, Event, Model};
use crate::server;
use anyhow::{Context, Result};
use ipnetwork::IpNetwork;
use rtnetlink::Handle;
use sepal_cni::api::{
    codes, AddReply, AddRequest, AttachmentKey, CheckRequest, DelRequest, ErrorReply, GcRequest,
    Request, Response, HOST_VETH_PREFIX, TOMBSTONE_PREFIX,
};
use sepal_felix::links;
use sepal_felix::routes::{host_net, Desired, RouteReconciler, Target};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Mutex, Notify};

/// Full route reconcile against the kernel this often, repairing anything changed behind our back.
const RESYNC: Duration = Duration::from_secs(60);
/// Tombstones (retired veths) are deleted this long after the last DEL: batches the deletions and
/// keeps their RCU waits away from the CNI calls in flight.
const REAP_DELAY: Duration = Duration::from_secs(1);
const FALLBACK_MTU: u32 = 1500;

/// The agent's mutable state; requests are handled one at a time under a lock.
pub struct Agent {
    node_name: String,
    mtu_override: Option<u32>,
    mtu: u32,
    handle: Handle,
    ipam: Ipam,
    routes: RouteReconciler,
    /// The node's blocks as the datastore says now; None until the Node with podCIDRs is known.
    blocks: Option<Vec<IpNetwork>>,
    /// Host routes of live endpoints (destination → host veth).
    endpoints: BTreeMap<IpNetwork, Target>,
    reap: Arc<Notify>,
    /// BGP control; its learned routes are part of the protocol-83 table.
    routing: Option<crate::routing::Routing>,
    /// NetworkPolicy compiler inputs and the nftables dataplane.
    policy: crate::policy::PolicyEngine,
    /// The pods' hostPorts (table `inet sepal-hostports`).
    hostports: sepal_felix::hostport::HostPorts,
    /// Flow records for `sepal flows`, read from the policy table's log rules.
    flows: Arc<crate::flows::FlowLogs>,
}

/// Read-only views for the operator socket and metrics (`crate::admin`).
impl Agent {
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The node's pod blocks (as last saved when the datastore does not know them now).
    pub fn pod_blocks(&self) -> Vec<IpNetwork> {
        self.blocks()
    }

    pub fn allocations(&self) -> &[crate::ipam::Allocation] {
        &self.ipam.state().allocations
    }

    pub fn routing(&self) -> Option<&crate::routing::Routing> {
        self.routing.as_ref()
    }

    /// NetworkPolicy content left out as invalid.
    pub fn policy_problems(&self) -> &[sepal_felix::policy::Problem] {
        self.policy.problems()
    }

    /// The ClusterNetworkPolicies as the datastore has them (status included).
    pub fn cluster_network_policies(
        &self,
    ) -> &[std::sync::Arc<sepal_felix::policy::ClusterNetworkPolicy>] {
        self.policy.cluster_network_policies()
    }

    /// The cluster as NetworkPolicy sees it, with this node's endpoints.
    pub fn policy_cluster(&self) -> sepal_felix::policy::Cluster {
        self.policy.cluster(self.allocations())
    }

    /// Per-rule counters of this node's policy table.
    pub fn policy_counters(
        &self,
    ) -> Result<
        std::collections::BTreeMap<(String, String), sepal_felix::nft::RuleCounter>,
        sepal_felix::nft::NftError,
    > {
        self.policy.counters()
    }

    pub fn netlink(&self) -> &Handle {
        &self.handle
    }

    pub fn flow_logs(&self) -> &Arc<crate::flows::FlowLogs> {
        &self.flows
    }

    /// Serving ADDs: the node's blocks are known.
    pub fn has_blocks(&self) -> bool {
        self.blocks.as_ref().is_some_and(|b| !b.is_empty())
    }
}

/// Installs the BGP routes as they change: every batch waiting is taken at once, the agent's own
/// routes (pod routes, block blackholes) win on the same destination, and only the changed
/// destinations are written, so a table of 100,000 routes costs nothing per change but the
/// change itself.
async fn install_bgp_routes(
    agent: Arc<Mutex<Agent>>,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<Vec<crate::routing::RouteDelta>>,
) {
    while let Some(first) = changes.recv().await {
        // In address order, as the FIB hands them over: the kernel's trie takes sorted inserts
        // with fewer cache misses than scattered ones.
        let mut batch: BTreeMap<IpNetwork, Option<Target>> = first.into_iter().collect();
        while let Ok(more) = changes.try_recv() {
            batch.extend(more);
        }
        let mut a = agent.lock().await;
        let own = a.own_routes();
        let wanted: Vec<(IpNetwork, Option<&Target>)> = batch
            .iter()
            .filter(|(dst, _)| !own.contains_key(dst))
            .map(|(dst, t)| (*dst, t.as_ref()))
            .collect();
        match a.routes.apply_changes(&wanted).await {
            Ok(r) => r
                .errors
                .iter()
                .for_each(|e| tracing::warn!("BGP route not programmed: {e}")),
            Err(e) => tracing::warn!("installing BGP routes: {e}"),
        }
    }
}

fn error(code: u32, msg: impl Into<String>) -> Response {
    Response::Error(ErrorReply {
        code,
        msg: msg.into(),
        details: String::new(),
    })
}

fn store_error(e: StoreError) -> Response {
    match e {
        StoreError::Ipam(IpamError::Exhausted(b)) => error(
            codes::IPAM_EXHAUSTED,
            format!("pod block {b} has no free address"),
        ),
        StoreError::Ipam(IpamError::NoBlock) => error(
            codes::NO_POD_BLOCK,
            "this node has no pod block yet (its Node object has no spec.podCIDRs)",
        ),
        other => error(codes::IO_FAILURE, other.to_string()),
    }
}

impl Agent {
    fn blocks(&self) -> Vec<IpNetwork> {
        self.blocks
            .clone()
            .unwrap_or_else(|| self.ipam.state().blocks.clone())
    }

    /// The agent's own routes: block blackholes and pod routes.
    fn own_routes(&self) -> Desired {
        let mut d: Desired = self
            .blocks()
            .into_iter()
            .map(|b| (b, Target::Blackhole))
            .collect();
        d.extend(self.endpoints.iter().map(|(k, v)| (*k, v.clone())));
        d
    }

    fn desired(&self) -> Desired {
        let mut d = self.own_routes();
        if let Some(r) = &self.routing {
            r.merge_into(&mut d);
        }
        d
    }

    /// Endpoints from the allocations whose host veth exists (the others' pods are gone or
    /// their ADD never finished: their routes would point nowhere).
    async fn adopt_endpoints(&mut self) -> Result<()> {
        let live: HashSet<String> = links::links_with_prefix(&self.handle, HOST_VETH_PREFIX)
            .await
            .context("listing host veths")?
            .into_iter()
            .map(|l| l.name)
            .collect();
        self.endpoints.clear();
        for a in &self.ipam.state().allocations {
            if live.contains(&a.host_veth) {
                for ip in &a.ips {
                    self.endpoints
                        .insert(host_net(*ip), Target::Dev(a.host_veth.clone()));
                }
            } else {
                tracing::info!(
                    container = %a.key.container_id, veth = %a.host_veth,
                    "allocation without its host veth: keeping the addresses until DEL/GC, no route"
                );
            }
        }
        Ok(())
    }

    /// Full reconcile: kernel routes of protocol 83 become exactly blocks + live endpoints.
    async fn resync(&mut self) -> Result<()> {
        self.adopt_endpoints().await?;
        let desired = self.desired();
        let report = self
            .routes
            .reconcile(&desired)
            .await
            .context("reconciling routes")?;
        for e in &report.errors {
            tracing::warn!("route not programmed: {e}");
        }
        tracing::info!(
            adopted = report.adopted,
            added = report.added,
            replaced = report.replaced,
            removed = report.removed,
            "routes reconciled"
        );
        if self.mtu_override.is_none() {
            self.mtu = links::default_route_mtu(&self.handle)
                .await
                .ok()
                .flatten()
                .unwrap_or(FALLBACK_MTU);
        }
        Ok(())
    }

    /// The Node object changed (or appeared/disappeared).
    async fn set_node_blocks(&mut self, blocks: Option<Vec<IpNetwork>>) {
        if blocks == self.blocks {
            return;
        }
        tracing::info!(node = %self.node_name, ?blocks, "node pod blocks");
        self.blocks = blocks.clone();
        match self.ipam.set_blocks(blocks.unwrap_or_default()) {
            Ok(outside) => {
                for a in outside {
                    tracing::warn!(
                        container = %a.key.container_id, ips = ?a.ips,
                        "allocation outside the node's blocks: kept until released"
                    );
                }
            }
            Err(e) => tracing::error!("saving the node's blocks: {e}"),
        }
        let desired = self.desired();
        match self.routes.update(&desired).await {
            Ok(r) => r
                .errors
                .iter()
                .for_each(|e| tracing::warn!("route not programmed: {e}")),
            Err(e) => tracing::error!("updating block routes: {e}"),
        }
    }

    pub async fn handle(&mut self, req: Request) -> Response {
        match req {
            Request::Status => match &self.blocks {
                Some(b) if !b.is_empty() => Response::Ok,
                _ => error(
                    codes::PLUGIN_NOT_AVAILABLE,
                    format!(
                        "node {} has no pod block yet (its Node object with spec.podCIDRs is not known)",
                        self.node_name
                    ),
                ),
            },
            Request::Add(r) => self.add(r).await,
            Request::Del(r) => {
                let reply = self.del(r).await;
                self.apply_policy_logged();
                self.apply_hostports_logged();
                reply
            }
            Request::Check(r) => self.check(r).await,
            Request::Gc(r) => {
                let reply = self.gc(r).await;
                self.apply_policy_logged();
                self.apply_hostports_logged();
                reply
            }
        }
    }

    async fn add(&mut self, r: AddRequest) -> Response {
        if self.blocks.as_ref().is_none_or(|b| b.is_empty()) {
            return store_error(StoreError::Ipam(IpamError::NoBlock));
        }
        if !r.host_veth.starts_with(HOST_VETH_PREFIX) || r.host_veth.len() > 15 {
            return error(
                codes::INVALID_CONFIG,
                format!("host veth name {:?} is not a Sepal veth", r.host_veth),
            );
        }
        let started = std::time::Instant::now();
        let owner = format!("{}/{}", r.pod_namespace, r.pod_name);
        let allocations = &self.ipam.state().allocations;
        if let Some(c) =
            crate::hostports::conflict(allocations, &r.key, &r.host_veth, &owner, &r.port_mappings)
        {
            return error(codes::PORT_CONFLICT, c.to_string());
        }
        let known = self.ipam.state().get(&r.key).is_some();
        let claim = Claim {
            key: r.key.clone(),
            pod_namespace: r.pod_namespace.clone(),
            pod_name: r.pod_name.clone(),
            host_veth: r.host_veth.clone(),
            port_mappings: r.port_mappings.clone(),
        };
        let (alloc, superseded) = match self.ipam.allocate(&claim) {
            Ok(a) => a,
            Err(e) => return store_error(e),
        };
        for old in &superseded {
            for ip in &old.ips {
                self.endpoints.remove(&host_net(*ip));
                if let Err(e) = self.routes.withdraw(host_net(*ip)).await {
                    tracing::warn!("removing the route to {ip}: {e}");
                }
            }
            tracing::info!(
                container = %old.key.container_id, ips = ?old.ips, by = %r.key.container_id,
                "endpoint released: a new sandbox of its pod replaced its veth"
            );
        }
        let ipam_done = std::time::Instant::now();
        for ip in &alloc.ips {
            let dst = host_net(*ip);
            let target = Target::Dev(r.host_veth.clone());
            if let Err(e) = self.routes.install(dst, target.clone()).await {
                self.undo_add(&alloc.ips, &r.key, known).await;
                return error(
                    codes::DATAPLANE_FAILURE,
                    format!(
                        "programming the host route to {ip} via {}: {e}",
                        r.host_veth
                    ),
                );
            }
            self.endpoints.insert(dst, target);
        }
        // The pod's policy (its own rules and its membership in every selector set) is in the
        // kernel before ADD returns, so its first packet already meets it.
        if let Err(e) = self.apply_policy() {
            self.undo_add(&alloc.ips, &r.key, known).await;
            return error(
                codes::DATAPLANE_FAILURE,
                format!("programming NetworkPolicy: {e}"),
            );
        }
        if let Err(e) = self.apply_hostports() {
            self.undo_add(&alloc.ips, &r.key, known).await;
            return error(
                codes::DATAPLANE_FAILURE,
                format!("programming hostPorts: {e}"),
            );
        }
        tracing::info!(
            pod = %owner, container = %r.key.container_id,
            ips = ?alloc.ips, veth = %r.host_veth,
            ipam_ms = ipam_done.duration_since(started).as_secs_f64() * 1e3,
            total_ms = started.elapsed().as_secs_f64() * 1e3,
            "endpoint added"
        );
        Response::Added(AddReply {
            ips: alloc.ips,
            mtu: self.mtu,
        })
    }

    /// A failed ADD leaves nothing behind: the host routes written so far and, unless the
    /// attachment existed before this ADD, its allocation (and the policy that included it).
    async fn undo_add(&mut self, ips: &[std::net::IpAddr], key: &AttachmentKey, known: bool) {
        for ip in ips {
            let _ = self.routes.withdraw(host_net(*ip)).await;
            self.endpoints.remove(&host_net(*ip));
        }
        if !known {
            if let Err(e) = self.ipam.release(key) {
                tracing::error!("releasing after a failed ADD: {e}");
            }
            self.apply_policy_logged();
            self.apply_hostports_logged();
        }
    }

    /// Makes the hostport table match the allocations' mappings (no batch when unchanged).
    fn apply_hostports(&mut self) -> Result<(), String> {
        let rules = crate::hostports::rules(&self.ipam.state().allocations);
        self.hostports
            .apply(rules)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn apply_hostports_logged(&mut self) {
        if let Err(e) = self.apply_hostports() {
            tracing::error!("applying hostPorts: {e}");
        }
    }

    /// Compiles the current policy inputs with this node's endpoints and applies the result.
    fn apply_policy(&mut self) -> Result<(), String> {
        let endpoints = &self.ipam.state().allocations;
        let started = std::time::Instant::now();
        let applied = self.policy.apply(endpoints).map(|_| ());
        // Every change of pods passes here: flow records name pods from a fresh index.
        self.flows.pods_changed();
        crate::metrics::metrics()
            .policy_apply_seconds
            .observe(started.elapsed().as_secs_f64());
        applied
    }

    fn apply_policy_logged(&mut self) {
        if let Err(e) = self.apply_policy() {
            tracing::error!("applying NetworkPolicy: {e}");
        }
    }

    async fn release(&mut self, key: &AttachmentKey) -> Result<Option<String>, Response> {
        let released = self.release_all(std::slice::from_ref(key)).await?;
        Ok(released.into_iter().next().map(|a| a.host_veth))
    }

    /// Releases `keys` in one durable write, then withdraws their host routes.
    async fn release_all(
        &mut self,
        keys: &[AttachmentKey],
    ) -> Result<Vec<crate::ipam::Allocation>, Response> {
        let released = self.ipam.release_all(keys).map_err(store_error)?;
        for alloc in &released {
            for ip in &alloc.ips {
                let dst = host_net(*ip);
                // Only our own route to the veth: another allocation may hold the address by
                // now only if this one did not, so the destination is this endpoint's.
                self.endpoints.remove(&dst);
                if let Err(e) = self.routes.withdraw(dst).await {
                    tracing::warn!("removing the route to {ip}: {e}");
                }
            }
            tracing::info!(container = %alloc.key.container_id, ips = ?alloc.ips, "endpoint released");
        }
        Ok(released)
    }

    /// Releases the allocations no pod can be using: their host veth is gone (so no traffic
    /// can flow) and `pod_exists` says their Pod is not in the datastore, which the caller
    /// consults only once it has synced. This is what CNI GC would do, for runtimes that never
    /// call it and for ADDs cut short by an agent crash (the plugin then removes the veth but
    /// cannot reach the agent to undo the allocation). Returns how many were released.
    pub async fn release_orphans(&mut self, pod_exists: impl Fn(&str, &str) -> bool) -> usize {
        if self.ipam.state().allocations.is_empty() {
            return 0;
        }
        let live: HashSet<String> =
            match links::links_with_prefix(&self.handle, HOST_VETH_PREFIX).await {
                Ok(found) => found.into_iter().map(|l| l.name).collect(),
                Err(e) => {
                    tracing::warn!("listing host veths for orphaned allocations: {e}");
                    return 0;
                }
            };
        let orphans: Vec<AttachmentKey> = self
            .ipam
            .state()
            .allocations
            .iter()
            .filter(|a| !live.contains(&a.host_veth) && !pod_exists(&a.pod_namespace, &a.pod_name))
            .map(|a| a.key.clone())
            .collect();
        if orphans.is_empty() {
            return 0;
        }
        match self.release_all(&orphans).await {
            Ok(released) => {
                tracing::info!(
                    released = released.len(),
                    "released allocations whose host veth and Pod are both gone"
                );
                self.apply_policy_logged();
                self.apply_hostports_logged();
                released.len()
            }
            Err(e) => {
                tracing::error!("releasing orphaned allocations: {e:?}");
                0
            }
        }
    }

    async fn del(&mut self, r: DelRequest) -> Response {
        let out = match self.release(&r.key).await {
            Ok(_) => Response::Ok,
            Err(resp) => resp,
        };
        self.reap.notify_one();
        out
    }

    async fn check(&mut self, r: CheckRequest) -> Response {
        let Some(alloc) = self.ipam.state().get(&r.key).cloned() else {
            return error(
                codes::CONTAINER_UNKNOWN,
                format!(
                    "no allocation for container {} interface {}",
                    r.key.container_id, r.key.ifname
                ),
            );
        };
        let mut want: Vec<_> = alloc.ips.clone();
        let mut have = r.ips.clone();
        want.sort();
        have.sort();
        if want != have {
            return error(
                codes::CHECK_FAILED,
                format!("addresses {have:?} differ from the allocation {want:?}"),
            );
        }
        if alloc.host_veth != r.host_veth {
            return error(
                codes::CHECK_FAILED,
                format!(
                    "host veth {} differs from the recorded {}",
                    r.host_veth, alloc.host_veth
                ),
            );
        }
        match links::link_by_name(&self.handle, &r.host_veth).await {
            Ok(Some(_)) => {}
            Ok(None) => {
                return error(
                    codes::CHECK_FAILED,
                    format!("host veth {} is missing", r.host_veth),
                )
            }
            Err(e) => return error(codes::IO_FAILURE, format!("looking up links: {e}")),
        }
        let kernel = match self.routes.kernel_routes().await {
            Ok(k) => k,
            Err(e) => return error(codes::IO_FAILURE, e.to_string()),
        };
        for ip in &alloc.ips {
            let want = Target::Dev(r.host_veth.clone());
            if !kernel
                .iter()
                .any(|k| k.dst == host_net(*ip) && k.target == want)
            {
                return error(
                    codes::CHECK_FAILED,
                    format!("host route to {ip} via {} is missing", r.host_veth),
                );
            }
        }
        Response::Ok
    }

    async fn gc(&mut self, r: GcRequest) -> Response {
        let valid: HashSet<&AttachmentKey> = r.valid.iter().collect();
        let stale: Vec<AttachmentKey> = self
            .ipam
            .state()
            .allocations
            .iter()
            .filter(|a| !valid.contains(&a.key))
            .map(|a| a.key.clone())
            .collect();
        let released = match self.release_all(&stale).await {
            Ok(r) => r.len(),
            Err(resp) => return resp,
        };
        // Host-side leftovers: every Sepal veth (and tombstone) no remaining allocation uses.
        let keep: HashSet<String> = self
            .ipam
            .state()
            .allocations
            .iter()
            .map(|a| a.host_veth.clone())
            .collect();
        match links::links_with_prefix(&self.handle, HOST_VETH_PREFIX).await {
            Ok(found) => {
                for l in found.into_iter().filter(|l| !keep.contains(&l.name)) {
                    match links::delete_link(&self.handle, &l.name).await {
                        Ok(_) => tracing::info!(veth = %l.name, "GC removed a host veth"),
                        Err(e) => tracing::warn!(veth = %l.name, "GC could not remove: {e}"),
                    }
                }
            }
            Err(e) => return error(codes::IO_FAILURE, format!("listing links: {e}")),
        }
        Response::Collected { released }
    }
}

/// Deletes retired veths (tombstones) a little after DELs, off the request path.
async fn reaper(handle: Handle, reap: Arc<Notify>) {
    loop {
        reap.notified().await;
        tokio::time::sleep(REAP_DELAY).await;
        reap_tombstones(&handle).await;
    }
}

async fn reap_tombstones(handle: &Handle) {
    match links::links_with_prefix(handle, TOMBSTONE_PREFIX).await {
        Ok(found) => {
            for l in found {
                if let Err(e) = links::delete_link(handle, &l.name).await {
                    tracing::warn!(link = %l.name, "removing a retired veth: {e}");
                }
            }
        }
        Err(e) => tracing::warn!("listing retired veths: {e}"),
    }
}

fn node_blocks(model: &Model, node_name: &str) -> Option<Vec<IpNetwork>> {
    let node = model.node(node_name)?;
    match pod_cidrs(node) {
        Ok(b) if !b.is_empty() => Some(b),
        Ok(_) => None,
        Err(e) => {
            tracing::error!(node = %node_name, "ignoring the node's pod blocks: {e}");
            None
        }
    }
}

/// Applies datastore events to the model and hands node changes to the agent. Once synced, it
/// has the agent release orphaned allocations every [`RESYNC`] and after changes that may
/// have made one (see [`Agent::release_orphans`]).
async fn follow_datastore(
    mut events: mpsc::Receiver<Event>,
    mut model: Model,
    agent: Arc<Mutex<Agent>>,
    node_name: String,
) {
    let mut sweep = tokio::time::interval(RESYNC);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    sweep.tick().await;
    loop {
        let ev = tokio::select! {
            ev = events.recv() => ev,
            _ = sweep.tick() => {
                if model.synced() {
                    agent.lock().await.release_orphans(|ns, name| model.has_pod(ns, name)).await;
                }
                continue;
            }
        };
        let Some(ev) = ev else { break };
        let was_synced = model.synced();
        let mut changed = model.apply(ev);
        // Take every event already queued before touching the agent: one update per burst.
        while let Ok(ev) = events.try_recv() {
            changed |= model.apply(ev);
        }
        crate::metrics::metrics()
            .health
            .set_model(model.synced(), model.len());
        if changed {
            let blocks = node_blocks(&model, &node_name);
            let mut a = agent.lock().await;
            if let Some(r) = &a.routing {
                r.update_from_model(&model, &node_name);
            }
            a.set_node_blocks(blocks).await;
            a.policy.update_model(&model);
            a.apply_policy_logged();
            // A Pod gone from the datastore may leave an orphan; checking costs a link dump,
            // so only when some allocation's Pod is absent (or on the first sync).
            let pod_absent = a
                .allocations()
                .iter()
                .any(|al| !model.has_pod(&al.pod_namespace, &al.pod_name));
            if model.synced() && (pod_absent || !was_synced) {
                a.release_orphans(|ns, name| model.has_pod(ns, name)).await;
            }
        }
    }
    tracing::warn!("the datastore stopped sending events");
}

/// Runs the agent until SIGTERM/SIGINT.
pub async fn run(cfg: NodeConfig) -> Result<()> {
    tracing::info!(node = %cfg.node_name, datastore = %cfg.datastore, state_dir = %cfg.state_dir.display(), socket = %cfg.socket.display(), "starting sepal node");
    sepal_felix::sysctl::enable_node_forwarding(&cfg.proc_sys).context("enabling forwarding")?;
    let ipam = Ipam::load(&cfg.state_dir)?;
    tracing::info!(
        allocations = ipam.state().allocations.len(),
        file = %ipam.path().display(),
        "IPAM state loaded"
    );
    let handle = links::connect().context("opening rtnetlink")?;
    let reap = Arc::new(Notify::new());

    // The datastore's initial state first, so the first reconcile knows the node's blocks.
    let mut events = datastore::start(&cfg.datastore, cfg.kubeconfig.as_deref())?;
    let mut model = Model::default();
    let deadline = tokio::time::Instant::now() + cfg.sync_timeout;
    while !model.synced() {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Ok(Some(ev)) => {
                model.apply(ev);
            }
            Ok(None) => anyhow::bail!("the datastore stopped before delivering its state"),
            Err(_) => {
                tracing::warn!(
                    "datastore not synced after {:?}; serving anyway (not ready, Node not declared up)",
                    cfg.sync_timeout
                );
                break;
            }
        }
    }
    let health = &crate::metrics::metrics().health;
    health.set_datastore(cfg.datastore.to_string());
    health.set_model(model.synced(), model.len());
    let blocks = node_blocks(&model, &cfg.node_name);
    if blocks.is_none() {
        tracing::warn!(node = %cfg.node_name, "no Node object with spec.podCIDRs for this node yet: STATUS reports not ready until it appears");
    }
    let mut agent = Agent {
        node_name: cfg.node_name.clone(),
        mtu_override: cfg.mtu,
        mtu: cfg.mtu.unwrap_or(FALLBACK_MTU),
        routes: RouteReconciler::new(handle.clone()),
        handle: handle.clone(),
        ipam,
        blocks: None,
        endpoints: BTreeMap::new(),
        reap: reap.clone(),
        routing: None,
        policy: crate::policy::PolicyEngine::new(sepal_felix::nft::Options {
            nflog_group: cfg.policy_log_drops,
            flow_log: cfg.flow_log.nft(),
        }),
        hostports: Default::default(),
        flows: crate::flows::FlowLogs::start(&cfg.node_name, cfg.flow_log),
    };
    crate::metrics::metrics()
        .policy_rules
        .set_max_series(cfg.policy_rule_series);
    agent.policy.update_model(&model);
    if let Some(b) = &blocks {
        agent.blocks = Some(b.clone());
        agent.ipam.set_blocks(b.clone())?;
    }
    // Routing reads the kernel's BGP routes before the first reconcile, which then keeps them
    // (graceful restart: stale until relearned or swept).
    let routing = crate::routing::Routing::start(handle.clone(), cfg.bfd_socket.clone()).await?;
    routing.update_from_model(&model, &cfg.node_name);
    let bgp_routes = routing.take_route_changes();
    agent.routing = Some(routing);
    agent.resync().await?;
    health.set_routes_programmed();
    // Adopts the previous run's tables: they keep enforcing until these atomic replaces.
    let adopting = agent.policy.table_exists();
    agent.apply_policy_logged();
    if adopting {
        tracing::info!(
            "adopted the previous run's policy table: it enforced until now and was replaced in one transaction, never flushed"
        );
    }
    agent.apply_hostports_logged();
    if model.synced() {
        agent
            .release_orphans(|ns, name| model.has_pod(ns, name))
            .await;
    }
    let agent = Arc::new(Mutex::new(agent));
    {
        // The flow log's reader thread names pods from the agent's model (weakly: the agent
        // owns the flow log).
        let weak = Arc::downgrade(&agent);
        let flows = agent.lock().await.flows.clone();
        flows.set_pod_source(Box::new(move || match weak.upgrade() {
            Some(agent) => agent.blocking_lock().policy_cluster().pods,
            None => Vec::new(),
        }));
    }
    if let Some(bgp_routes) = bgp_routes {
        tokio::spawn(install_bgp_routes(agent.clone(), bgp_routes));
    }

    tokio::spawn(follow_datastore(
        events,
        model,
        agent.clone(),
        cfg.node_name.clone(),
    ));
    if cfg.datastore == datastore::DatastoreSpec::Kubernetes {
        // Routes are programmed: the node condition, BGP sessions and problems go to the cluster.
        tokio::spawn(datastore::status::run(
            cfg.kubeconfig.clone(),
            cfg.node_name.clone(),
            agent.clone(),
        ));
    }
    reap_tombstones(&handle).await;
    tokio::spawn(reaper(handle.clone(), reap));
    {
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RESYNC);
            tick.tick().await;
            loop {
                tick.tick().await;
                if let Err(e) = agent.lock().await.resync().await {
                    tracing::error!("periodic resync: {e:#}");
                }
            }
        });
    }
    // Operators' socket and the metrics/health endpoint; both go when the process stops.
    let admin = crate::admin::server::bind(&cfg.admin_socket)?;
    tokio::spawn(crate::admin::server::serve(admin, agent.clone()));
    if let Some(addr) = cfg.metrics_addr {
        crate::metrics::http::spawn(addr, agent.clone())?;
        tokio::spawn(crate::metrics::http::heartbeat());
    }
    let result = server::serve(&cfg.socket, agent.clone()).await;
    let routing = agent.lock().await.routing.take();
    if let Some(r) = routing {
        r.shutdown(cfg.stop_mode == crate::config::StopMode::Restart)
            .await;
    }
    result
}
