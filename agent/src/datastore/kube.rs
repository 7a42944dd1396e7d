// The Kubernetes datastore: kube-rs watchers on the API server turned into the same model events as
// the dir datastore, objects stripped to what routing and policy use; plus the agent's status writes.

use crate::crd::{BGPConfiguration, BGPPeer, SepalNodeStatus};
use crate::model::wire::SliceWire;
use crate::model::{Event, KindKey, Object, ObjectKey, SliceInfo};
use anyhow::{Context, Result};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Namespace, Node, NodeStatus, Service, ServiceSpec, ServiceStatus,
};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::ApiResource;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Config, Resource};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Annotation kubectl keeps a full copy of the object in; never needed, often large.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// A client for the API server: the kubeconfig given, else the in-cluster ServiceAccount (a pod
/// of the DaemonSet), else `KUBECONFIG`/~/.kube/config.
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => match Config::incluster() {
            Ok(c) => c,
            Err(_) => Config::infer()
                .await
                .context("no Kubernetes config: not in a cluster and no kubeconfig found")?,
        },
    };
    Client::try_from(config).context("building the Kubernetes client")
}

// ---------------------------------------------------------------------------------------------
// Stripping: only what routing and policy read is kept, so memory stays bounded with many pods and
// status-only churn (conditions, container states) becomes no model change at all.

/// Metadata reduced to identity, labels and annotations (without kubectl's copy of the object).
pub fn strip_meta(m: ObjectMeta) -> ObjectMeta {
    let mut annotations = m.annotations;
    if let Some(a) = annotations.as_mut() {
        a.remove(LAST_APPLIED);
    }
    ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        labels: m.labels.filter(|l| !l.is_empty()),
        annotations: annotations.filter(|a| !a.is_empty()),
        ..Default::default()
    }
}

fn strip_meta_value(v: &mut Value) {
    let Some(meta) = v.get_mut("metadata").and_then(Value::as_object_mut) else {
        return;
    };
    meta.retain(|k, _| matches!(k.as_str(), "name" | "namespace" | "labels" | "annotations"));
    if let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut) {
        a.remove(LAST_APPLIED);
    }
    for k in ["labels", "annotations"] {
        if meta
            .get(k)
            .is_some_and(|v| v.as_object().is_some_and(|o| o.is_empty()) || v.is_null())
        {
            meta.remove(k);
        }
    }
}

/// A node: labels/annotations (Sepal's overrides), spec (pod CIDRs, taints), its addresses.
pub fn strip_node(n: Node) -> Node {
    Node {
        metadata: strip_meta(n.metadata),
        spec: n.spec,
        status: n.status.and_then(|s| {
            s.addresses.map(|a| NodeStatus {
                addresses: Some(a),
                ..Default::default()
            })
        }),
    }
}

/// A Service: what routing advertises (external and load-balancer IPs, whether only nodes with
/// a local endpoint may) and its type. Ports, selectors and cluster IPs are kube-proxy's.
pub fn strip_service(s: Service) -> Service {
    let spec = s.spec.map(|spec| ServiceSpec {
        type_: spec.type_,
        external_ips: spec.external_ips.filter(|ips| !ips.is_empty()),
        external_traffic_policy: spec.external_traffic_policy,
        ..Default::default()
    });
    let status = s
        .status
        .and_then(|st| st.load_balancer)
        .filter(|lb| lb.ingress.as_ref().is_some_and(|i| !i.is_empty()))
        .map(|lb| ServiceStatus {
            load_balancer: Some(lb),
            ..Default::default()
        });
    Service {
        metadata: strip_meta(s.metadata),
        spec,
        status,
    }
}

/// Any object brought to the shape the model keeps (both datastores can use this).
pub fn strip(obj: Object) -> Object {
    match obj {
        // Already compact.
        Object::Pod(p) => Object::Pod(p),
        Object::EndpointSlice(s) => Object::EndpointSlice(s),
        Object::Node(n) => Object::Node(Box::new(strip_node(*n))),
        Object::Namespace(mut n) => {
            n.metadata = strip_meta(n.metadata);
            n.spec = None;
            n.status = None;
            Object::Namespace(n)
        }
        Object::Service(s) => Object::Service(Box::new(strip_service(*s))),
        Object::Secret(mut s) => {
            s.metadata = strip_meta(s.metadata);
            Object::Secret(s)
        }
        Object::NetworkPolicy(mut p) => {
            let p_mut = Arc::make_mut(&mut p);
            p_mut.metadata = strip_meta(std::mem::take(&mut p_mut.metadata));
            Object::NetworkPolicy(p)
        }
        Object::ClusterNetworkPolicy(mut p) => {
            let p_mut = Arc::make_mut(&mut p);
            let meta = std::mem::take(&mut p_mut.metadata);
            // The status writer's inputs: the generation its condition observes, and the version
            // its write is conditional on (so of N agents only the first one writes).
            let (generation, resource_version) = (meta.generation, meta.resource_version.clone());
            p_mut.metadata = ObjectMeta {
                generation,
                resource_version,
                ..strip_meta(meta)
            };
            Object::ClusterNetworkPolicy(p)
        }
        Object::Other(key, mut v) => {
            strip_meta_value(&mut v);
            Object::Other(key, v)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Watchers

/// Counts resources still in their initial list; the last one to finish sends `Synced`.
pub(super) struct SyncGate {
    pending: AtomicUsize,
}

impl SyncGate {
    /// A gate already passed, for a watcher started after its resource counted as synced (a
    /// CRD that appeared later): its `done` sends nothing.
    pub(super) fn spent() -> Arc<SyncGate> {
        Arc::new(SyncGate {
            pending: AtomicUsize::new(0),
        })
    }

    pub(super) async fn done(&self, tx: &mpsc::Sender<Event>) -> bool {
        let before = self
            .pending
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| p.checked_sub(1));
        if before == Ok(1) {
            return tx.send(Event::Synced).await.is_ok();
        }
        true
    }
}

/// One watched resource: its API handle and how its objects become model objects.
struct Watched<K> {
    what: &'static str,
    api: Api<K>,
    convert: fn(K) -> Option<Object>,
}

fn dynamic_converter(ar: &ApiResource) -> impl Fn(DynamicObject) -> Option<Object> + Clone {
    let (api_version, kind) = (ar.api_version.clone(), ar.kind.clone());
    move |o: DynamicObject| {
        let mut v = serde_json::to_value(&o).ok()?;
        let map = v.as_object_mut()?;
        map.insert("apiVersion".into(), Value::String(api_version.clone()));
        map.insert("kind".into(), Value::String(kind.clone()));
        strip_meta_value(&mut v);
        let key = ObjectKey {
            api_version: api_version.clone(),
            kind: kind.clone(),
            namespace: o.metadata.namespace.clone().unwrap_or_default(),
            name: o.metadata.name.clone()?,
        };
        Some(Object::Other(Box::new(key), Box::new(v)))
    }
}

/// Watch retries: kube's default (0.8 s doubling, with jitter, reset after 120 s without an
/// error) but capped at 10 s rather than 30 s. Only an event resets the backoff, and an idle
/// watch that resumed after an outage receives none: with the default, the next break (a
/// compaction, a restarted load balancer) left it away 30 s or more before it came back.
pub(super) fn watch_backoff(
) -> kube::runtime::utils::ResetTimerBackoff<kube::runtime::watcher::ExponentialBackoff> {
    let retries = backon::ExponentialBuilder::default()
        .with_min_delay(std::time::Duration::from_millis(800))
        .with_max_delay(std::time::Duration::from_secs(10))
        .with_factor(2.0)
        .without_max_times()
        .with_jitter();
    kube::runtime::utils::ResetTimerBackoff::new(
        retries.into(),
        std::time::Duration::from_secs(120),
    )
}

/// Runs one watcher until the model's receiver goes away. The kube watcher lists, then watches
/// from the list's resourceVersion, resumes from the last one seen (bookmarks included) after a
/// dropped connection, and relists after 410 Gone; errors are retried with backoff.
pub(super) async fn run_watcher<K, F>(
    what: &'static str,
    kind: KindKey,
    api: Api<K>,
    convert: F,
    tx: mpsc::Sender<Event>,
    gate: Arc<SyncGate>,
) where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(K) -> Option<Object>,
{
    run_watcher_until(what, kind, api, convert, tx, gate, |_| false).await;
}

/// Why `run_watcher_until` returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WatchEnd {
    /// The model's receiver went away.
    ReceiverGone,
    /// An error `stop` picked (the resource is no longer served, say); `synced`: the initial
    /// list had been done (the gate was passed).
    Stopped { synced: bool },
}

/// `run_watcher`, which also returns on an error that `stop` says no retry will cure.
pub(super) async fn run_watcher_until<K, F>(
    what: &'static str,
    kind: KindKey,
    api: Api<K>,
    convert: F,
    tx: mpsc::Sender<Event>,
    gate: Arc<SyncGate>,
    stop: impl Fn(&watcher::Error) -> bool,
) -> WatchEnd
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
    F: Fn(K) -> Option<Object>,
{
    let mut streaming = true;
    let mut stream = watcher(api.clone(), list_config(streaming))
        .backoff(watch_backoff())
        .boxed();
    let mut synced = false;
    let mut listed = 0usize;
    let mut failures = 0u32;
    while let Some(item) = stream.next().await {
        let events: Vec<Event> = match item {
            Err(err) if streaming && !synced && refuses_streaming(&err) => {
                tracing::info!(
                    resource = what,
                    "the API server does not stream lists (WatchList off): listing in pages"
                );
                streaming = false;
                stream = watcher(api.clone(), list_config(streaming))
                    .backoff(watch_backoff())
                    .boxed();
                continue;
            }
            Err(err) if stop(&err) => return WatchEnd::Stopped { synced },
            Err(err) => {
                failures += 1;
                let (forbidden, text) = classify(&err);
                report_watch_failure(what, forbidden, &text, synced, failures);
                continue;
            }
            Ok(ev) => {
                if failures > 0 {
                    crate::metrics::metrics().health.set_forbidden(what, false);
                }
                failures = 0;
                match ev {
                    // The model deletes what a relist no longer returns (see `Event::ListStart`).
                    watcher::Event::Init => {
                        listed = 0;
                        vec![Event::ListStart(kind.clone())]
                    }
                    watcher::Event::InitApply(o) => {
                        listed += 1;
                        convert(o).map(Event::Upsert).into_iter().collect()
                    }
                    watcher::Event::InitDone => {
                        if tx.send(Event::ListEnd(kind.clone())).await.is_err() {
                            return WatchEnd::ReceiverGone;
                        }
                        if !synced {
                            synced = true;
                            tracing::info!(resource = what, objects = listed, "initial list done");
                            if !gate.done(&tx).await {
                                return WatchEnd::ReceiverGone;
                            }
                        }
                        Vec::new()
                    }
                    watcher::Event::Apply(o) => convert(o).map(Event::Upsert).into_iter().collect(),
                    watcher::Event::Delete(o) => convert(o)
                        .map(|obj| Event::Delete(obj.key()))
                        .into_iter()
                        .collect(),
                }
            }
        };
        for ev in events {
            if tx.send(ev).await.is_err() {
                return WatchEnd::ReceiverGone;
            }
        }
    }
    WatchEnd::ReceiverGone
}

/// Objects per page when the initial list is paged: half the round trips of kube's 500, for a
/// response of a few MiB held at once.
const LIST_PAGE: u32 = 1000;

/// How a watcher gets its initial state. A streaming list (a watch with `sendInitialEvents`,
/// Kubernetes' WatchList, on by default since 1.32) has the server send every object from its
/// watch cache as one event each, with no pages to ask for one after another and no page held
/// in memory; servers that refuse it are listed in pages.
fn list_config(streaming: bool) -> watcher::Config {
    let cfg = watcher::Config::default();
    if streaming {
        cfg.streaming_lists()
    } else {
        cfg.page_size(LIST_PAGE)
    }
}

/// Whether a server refused the streaming list itself (its WatchList gate is off: the request
/// is invalid), as opposed to failing for a reason a paged list would meet too.
fn refuses_streaming(err: &watcher::Error) -> bool {
    let status = match err {
        watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code,
        watcher::Error::WatchError(s) => s.code,
        _ => return false,
    };
    matches!(status, 400 | 422)
}

/// Whether a watch failed for want of RBAC, and the error's text.
pub(super) fn classify(err: &watcher::Error) -> (bool, String) {
    let forbidden = matches!(
        err,
        watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            | watcher::Error::WatchFailed(kube::Error::Api(s))
            if s.code == 403
    );
    (forbidden, err.to_string())
}

/// Records a watch failure (the forbidden flag of health and `sepal status`) and logs it: every
/// failure while unsynced, then every 10th, so a long outage is visible without flooding the log.
pub(super) fn report_watch_failure(
    what: &'static str,
    forbidden: bool,
    text: &str,
    synced: bool,
    failures: u32,
) {
    if synced && failures % 10 != 1 {
        crate::metrics::metrics()
            .health
            .set_forbidden(what, forbidden);
        return;
    }
    log_failure(what, forbidden, text);
}

pub(super) fn log_watch_error(what: &'static str, err: &watcher::Error) {
    let (forbidden, text) = classify(err);
    log_failure(what, forbidden, &text);
}

fn log_failure(what: &'static str, forbidden: bool, text: &str) {
    crate::metrics::metrics()
        .health
        .set_forbidden(what, forbidden);
    if forbidden {
        tracing::error!(
            resource = what,
            "forbidden: the agent's ServiceAccount may not list/watch {what} \
             (see the ClusterRole in deploy/10-rbac.yaml); retrying: {text}"
        );
    } else {
        tracing::warn!(
            resource = what,
            "watch failed, retrying with backoff: {text}"
        );
    }
}

fn spawn_typed<K>(w: Watched<K>, tx: &mpsc::Sender<Event>, gate: &Arc<SyncGate>)
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    let kind = KindKey {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
    };
    tokio::spawn(run_watcher(
        w.what,
        kind,
        w.api,
        w.convert,
        tx.clone(),
        gate.clone(),
    ));
}

fn spawn_dynamic(
    what: &'static str,
    client: &Client,
    ar: ApiResource,
    tx: &mpsc::Sender<Event>,
    gate: &Arc<SyncGate>,
) {
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let convert = dynamic_converter(&ar);
    let kind = KindKey {
        api_version: ar.api_version.clone(),
        kind: ar.kind.clone(),
    };
    tokio::spawn(run_watcher(
        what,
        kind,
        api,
        convert,
        tx.clone(),
        gate.clone(),
    ));
}

/// Starts every watcher. Events go to `tx`: the initial state of all resources, then one
/// `Synced`, then live changes.
pub async fn run(client: Client, tx: mpsc::Sender<Event>) {
    // SepalNodeStatuses are not watched: they are the agents' output, nothing reads them back.
    const RESOURCES: usize = 10;
    let gate = Arc::new(SyncGate {
        pending: AtomicUsize::new(RESOURCES),
    });
    let c = &client;
    spawn_typed(
        Watched {
            what: "nodes",
            api: Api::<Node>::all(c.clone()),
            convert: |n| Some(Object::Node(Box::new(strip_node(n)))),
        },
        &tx,
        &gate,
    );
    // Pods in protobuf, by a watcher of their own (see kube_pods).
    tokio::spawn(super::kube_pods::run(c.clone(), tx.clone(), gate.clone()));
    spawn_typed(
        Watched {
            what: "namespaces",
            api: Api::<Namespace>::all(c.clone()),
            convert: |n| Some(strip(Object::Namespace(Box::new(n)))),
        },
        &tx,
        &gate,
    );
    spawn_typed(
        Watched {
            what: "services",
            api: Api::<Service>::all(c.clone()),
            convert: |s| Some(strip(Object::Service(Box::new(s)))),
        },
        &tx,
        &gate,
    );
    spawn_typed(
        Watched {
            what: "networkpolicies",
            api: Api::<NetworkPolicy>::all(c.clone()),
            convert: |p| Some(strip(Object::NetworkPolicy(Arc::new(p)))),
        },
        &tx,
        &gate,
    );
    // BGPPeer passwords: only the Secrets the peers name, each by its own narrowed watch.
    tokio::spawn(super::kube_secrets::run(
        c.clone(),
        tx.clone(),
        gate.clone(),
    ));
    spawn_typed(
        Watched {
            what: "endpointslices",
            api: Api::<SliceWire>::all(c.clone()),
            convert: |s| SliceInfo::from_wire(s).map(|s| Object::EndpointSlice(Box::new(s))),
        },
        &tx,
        &gate,
    );
    spawn_dynamic(
        "bgpconfigurations",
        c,
        ApiResource::erase::<BGPConfiguration>(&()),
        &tx,
        &gate,
    );
    spawn_dynamic(
        "bgppeers",
        c,
        ApiResource::erase::<BGPPeer>(&()),
        &tx,
        &gate,
    );
    // Its CRD is optional: a watcher of its own waits for it (see kube_cnp).
    tokio::spawn(super::kube_cnp::run(c.clone(), tx.clone(), gate.clone()));
    tx.closed().await;
}

/// Starts the Kubernetes datastore on the current runtime (used by `datastore::start`): the client
/// is built in the task, and a failure to build it is retried, not fatal, so a node agent started
/// before its API server is reachable still comes up.
pub fn spawn(kubeconfig: Option<PathBuf>, tx: mpsc::Sender<Event>) {
    tokio::spawn(async move {
        let mut delay = std::time::Duration::from_millis(500);
        loop {
            match client(kubeconfig.as_deref()).await {
                Ok(c) => return run(c, tx).await,
                Err(e) => {
                    tracing::error!("kubernetes datastore: {e:#}; retrying in {delay:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = tx.closed() => return,
                    }
                    delay = (delay * 2).min(std::time::Duration::from_secs(30));
                }
            }
        }
    });
}

// ---------------------------------------------------------------------------------------------
// Status back to the cluster

/// Field manager name of every write the agent makes.
pub const FIELD_MANAGER: &str = "sepal-node";

/// What a node's agent writes to the cluster: its SepalNodeStatus, the Node's NetworkUnavailable
/// condition, and Events. Each call is one idempotent request (server-side apply / patch).
#[derive(Clone)]
pub struct StatusWriter {
    client: Client,
    node: String,
}

impl StatusWriter {
    pub fn new(client: Client, node: impl Into<String>) -> StatusWriter {
        StatusWriter {
            client,
            node: node.into(),
        }
    }

    /// The client, for writers of other objects' status (`cnp_status`).
    pub(super) fn client(&self) -> &Client {
        &self.client
    }

    /// Creates or updates the node's SepalNodeStatus (object named after the node) and its status.
    pub async fn report(&self, report: &crate::crd::NodeStatusReport) -> Result<()> {
        let api: Api<SepalNodeStatus> = Api::all(self.client.clone());
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let obj = serde_json::json!({
            "apiVersion": crate::crd::API_VERSION, "kind": "SepalNodeStatus",
            "metadata": {"name": self.node},
            "spec": {"node": self.node},
        });
        api.patch(&self.node, &pp, &Patch::Apply(&obj))
            .await
            .with_context(|| format!("applying SepalNodeStatus {}", self.node))?;
        let status = serde_json::json!({
            "apiVersion": crate::crd::API_VERSION, "kind": "SepalNodeStatus",
            "metadata": {"name": self.node},
            "status": report,
        });
        api.patch_status(&self.node, &pp, &Patch::Apply(&status))
            .await
            .with_context(|| format!("writing the status of SepalNodeStatus {}", self.node))?;
        Ok(())
    }

    /// Sets the Node condition NetworkUnavailable=False (reason SepalIsUp): call once the node's
    /// routes are programmed.
    pub async fn network_available(&self, now_rfc3339: &str) -> Result<()> {
        let api: Api<Node> = Api::all(self.client.clone());
        let patch = serde_json::json!({"status": {"conditions": [{
            "type": "NetworkUnavailable", "status": "False", "reason": "SepalIsUp",
            "message": "Sepal's routes are programmed on this node",
            "lastTransitionTime": now_rfc3339, "lastHeartbeatTime": now_rfc3339,
        }]}});
        // A strategic merge patch merges conditions by type, leaving kubelet's alone.
        api.patch_status(
            &self.node,
            &PatchParams::default(),
            &Patch::Strategic(&patch),
        )
        .await
        .with_context(|| format!("setting NetworkUnavailable=False on node {}", self.node))?;
        Ok(())
    }

    /// Records an events.k8s.io/v1 Event about an object (a rejected NetworkPolicy, a BGPPeer whose
    /// session fails), `warning` for problems. Returns the Event's namespace and name, for
    /// `event_repeated`. Events about cluster-scoped objects go to `default`, as kubectl looks.
    pub async fn event(
        &self,
        regarding: &ObjectKey,
        warning: bool,
        reason: &str,
        note: &str,
        now_rfc3339: &str,
    ) -> Result<(String, String)> {
        let ns = if regarding.namespace.is_empty() {
            "default"
        } else {
            regarding.namespace.as_str()
        };
        let api = self.events(ns);
        let ev: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "events.k8s.io/v1", "kind": "Event",
            "metadata": {"name": event_name(&regarding.name), "namespace": ns},
            "eventTime": now_rfc3339,
            "reportingController": "sepal.dev/node",
            "reportingInstance": format!("sepal-node-{}", self.node),
            "action": reason, "reason": reason, "note": note,
            "type": if warning { "Warning" } else { "Normal" },
            "regarding": {"apiVersion": regarding.api_version, "kind": regarding.kind,
                          "namespace": (!regarding.namespace.is_empty()).then_some(&regarding.namespace),
                          "name": regarding.name},
        }))?;
        let created = api
            .create(&Default::default(), &ev)
            .await
            .with_context(|| format!("recording event {reason} on {regarding}"))?;
        Ok((ns.to_string(), created.metadata.name.unwrap_or_default()))
    }

    /// The same Event again: its series (count, last time) is updated instead of a new Event
    /// being created, as Kubernetes' own event recorders deduplicate.
    pub async fn event_repeated(
        &self,
        namespace: &str,
        name: &str,
        count: u32,
        now_micro_time: &str,
    ) -> Result<()> {
        let patch =
            serde_json::json!({"series": {"count": count, "lastObservedTime": now_micro_time}});
        self.events(namespace)
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .with_context(|| format!("updating event {namespace}/{name}"))?;
        Ok(())
    }

    fn events(&self, namespace: &str) -> Api<DynamicObject> {
        let ar = ApiResource::erase::<k8s_openapi::api::events::v1::Event>(&());
        Api::namespaced_with(self.client.clone(), namespace, &ar)
    }
}

/// An Event's name: the object's name and the time in hex nanoseconds, as Kubernetes' own event
/// recorders name theirs. (A `generateName` of "NAME." is refused by events.k8s.io/v1: the
/// prefix itself must be a valid name, and may not end in a dot.)
fn event_name(regarding: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    format!("{regarding}.{nanos:x}")
}

// ---------------------------------------------------------------------------------------------
// `sepal datastore`: what the agent's model holds, from either datastore (tests, bench, debugging)

/// Flags of `sepal datastore`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// Where the cluster's objects come from: `kubernetes` or `dir:PATH`.
    #[arg(long)]
    pub datastore: super::DatastoreSpec,
    /// Kubeconfig for `--datastore kubernetes` (default: KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Keep running and print the model again after every change (a burst of changes prints once).
    #[arg(long)]
    pub watch: bool,
    /// Print only counts, not the objects.
    #[arg(long)]
    pub summary: bool,
}

fn object_value(o: &Object) -> Value {
    let v = match o {
        Object::Node(x) => serde_json::to_value(x),
        Object::Namespace(x) => serde_json::to_value(x),
        Object::Pod(x) => return x.to_value(),
        Object::EndpointSlice(x) => return x.to_value(),
        Object::Service(x) => serde_json::to_value(x),
        Object::Secret(x) => serde_json::to_value(x),
        Object::NetworkPolicy(x) => serde_json::to_value(&**x),
        Object::ClusterNetworkPolicy(x) => serde_json::to_value(&**x),
        Object::Other(_, v) => return (**v).clone(),
    };
    v.unwrap_or(Value::Null)
}

fn model_line(model: &crate::model::Model, started: std::time::Instant, summary: bool) -> String {
    let mut line = serde_json::json!({
        "synced": model.synced(),
        "elapsed_ms": started.elapsed().as_millis() as u64,
        "objects": model.len(),
    });
    if !summary {
        line["items"] = Value::Array(model.objects().map(object_value).collect());
    }
    line.to_string()
}

/// Runs a datastore into a model and prints it as one JSON line once synced (and, with --watch,
/// after every later change).
pub fn run_inspect(args: InspectArgs) -> Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let started = std::time::Instant::now();
        let mut rx = super::start(&args.datastore, args.kubeconfig.as_deref())?;
        let mut model = crate::model::Model::default();
        while let Some(ev) = rx.recv().await {
            let mut changed = model.apply(ev);
            // Drain what is already queued so a burst prints once.
            while let Ok(ev) = rx.try_recv() {
                changed |= model.apply(ev);
            }
            if model.synced() && changed {
                println!("{}", model_line(&model, started, args.summary));
                if !args.watch {
                    return Ok(());
                }
            }
        }
        anyhow::bail!("the datastore stopped")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Every write of the status writer against a real API server, as the agent's
    /// ServiceAccount under the shipped RBAC: server-side apply of SepalNodeStatus and its status
    /// subresource, the Node condition beside kubelet's, Events and their series.
    #[tokio::test]
    async fn status_writer_against_a_real_api_server() {
        let c = sepal_tests::kube::Cluster::start();
        c.install_sepal();
        c.kubectl(&["create", "namespace", "web"]);
        c.apply(&[json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
            "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                "lastHeartbeatTime": "2026-01-01T00:00:00Z", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}})]);
        let kc = c.agent_kubeconfig(None);
        let w = StatusWriter::new(client(Some(&kc)).await.unwrap(), "n1");

        let report = crate::crd::NodeStatusReport {
            routes_programmed: true,
            established_sessions: 1,
            total_sessions: 2,
            sessions: vec![crate::crd::BgpSessionStatus {
                peer_ip: "10.0.1.1".into(),
                peer_as: 65000,
                source: "tor".into(),
                state: "Established".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        w.report(&report).await.unwrap();
        w.report(&report).await.unwrap(); // idempotent: the second apply updates in place
        let sns = c.get("sepalnodestatus", "", "n1").expect("status object");
        assert_eq!(sns["spec"]["node"], json!("n1"));
        assert_eq!(sns["status"]["routesProgrammed"], json!(true));
        assert_eq!(sns["status"]["sessions"][0]["state"], json!("Established"));

        w.network_available("2026-01-01T00:00:00Z").await.unwrap();
        let node = c.get("node", "", "n1").unwrap();
        let conds = node["status"]["conditions"].as_array().unwrap();
        assert!(
            conds.iter().any(|c| c["type"] == "Ready"),
            "kubelet's condition kept"
        );
        let nu = conds
            .iter()
            .find(|c| c["type"] == "NetworkUnavailable")
            .expect("condition");
        assert_eq!(
            (&nu["status"], &nu["reason"]),
            (&json!("False"), &json!("SepalIsUp"))
        );

        let key = ObjectKey {
            api_version: "networking.k8s.io/v1".into(),
            kind: "NetworkPolicy".into(),
            namespace: "web".into(),
            name: "bad".into(),
        };
        w.event(
            &key,
            true,
            "PolicyRejected",
            "ipBlock.except outside cidr",
            "2026-01-01T00:00:00.000000Z",
        )
        .await
        .unwrap();
        let (ns, name) = w
            .event(
                &key,
                true,
                "PolicyRejected",
                "repeated",
                "2026-01-01T00:00:00.000000Z",
            )
            .await
            .unwrap();
        w.event_repeated(&ns, &name, 2, "2026-01-01T00:00:01.000000Z")
            .await
            .unwrap();
        let repeated = c.get("events.events.k8s.io", &ns, &name).unwrap();
        assert_eq!(repeated["series"]["count"], json!(2));
        assert_eq!(repeated["note"], json!("repeated"));
        c.delete("events.events.k8s.io", &ns, &name);
        // Only Sepal's own: the control plane may report events of its own meanwhile.
        let events: Vec<_> = c
            .list("events.events.k8s.io", &[])
            .into_iter()
            .filter(|e| e["reportingController"] == json!("sepal.dev/node"))
            .collect();
        assert_eq!(events.len(), 1, "{events:#?}");
        assert_eq!(events[0]["regarding"]["name"], json!("bad"));
        assert_eq!(events[0]["type"], json!("Warning"));
        assert_eq!(events[0]["metadata"]["namespace"], json!("web"));

        // A forbidden write (the ClusterRole without its SepalNodeStatus rules) is an error naming
        // what failed, not a panic.
        c.remove_rbac_rule("sepalnodestatuses");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let err = loop {
            match w.report(&report).await {
                Err(e) => break e,
                Ok(()) if std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await
                }
                Ok(()) => panic!("the write was allowed without its RBAC rule"),
            }
        };
        assert!(format!("{err:#}").contains("SepalNodeStatus n1"), "{err:#}");
        assert!(format!("{err:#}").contains("forbidden"), "{err:#}");
    }

    #[test]
    fn raw_objects_lose_server_metadata() {
        let ar = ApiResource::erase::<BGPPeer>(&());
        let o: DynamicObject = serde_json::from_value(json!({
            "metadata": {"name": "tor", "resourceVersion": "3", "uid": "x", "generation": 1,
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"peerIP": "10.0.0.1", "asNumber": 65000}
        }))
        .unwrap();
        let Some(Object::Other(key, v)) = dynamic_converter(&ar)(o) else {
            panic!("not converted")
        };
        assert_eq!(key.kind, "BGPPeer");
        assert_eq!(
            *v,
            json!({"apiVersion": "sepal.dev/v1alpha1", "kind": "BGPPeer",
                   "metadata": {"name": "tor"}, "spec": {"peerIP": "10.0.0.1", "asNumber": 65000}})
        );
        assert!(matches!(
            crate::crd::SepalObject::from_json(&v),
            Ok(crate::crd::SepalObject::BgpPeer(_))
        ));
    }
}
