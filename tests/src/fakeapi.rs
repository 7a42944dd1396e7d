// A stand-in Kubernetes API server for tests and benchmarks: list/watch with resourceVersions,
// bookmarks, 410 Gone after compaction, 403 for forbidden resources, plus writes and deletes, on
// 127.0.0.1.

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use tokio::sync::broadcast;

/// A resource type the server knows: (apiVersion, kind, plural, namespaced).
const RESOURCES: &[(&str, &str, &str, bool)] = &[
    ("v1", "Node", "nodes", false),
    ("v1", "Namespace", "namespaces", false),
    ("v1", "Pod", "pods", true),
    ("v1", "Service", "services", true),
    ("v1", "Secret", "secrets", true),
    (
        "networking.k8s.io/v1",
        "NetworkPolicy",
        "networkpolicies",
        true,
    ),
    (
        "discovery.k8s.io/v1",
        "EndpointSlice",
        "endpointslices",
        true,
    ),
    ("events.k8s.io/v1", "Event", "events", true),
    (
        "sepal.dev/v1alpha1",
        "BGPConfiguration",
        "bgpconfigurations",
        false,
    ),
    ("sepal.dev/v1alpha1", "BGPPeer", "bgppeers", false),
    (
        "sepal.dev/v1alpha1",
        "SepalNodeStatus",
        "sepalnodestatuses",
        false,
    ),
];

fn resource_of_kind(
    kind: &str,
) -> Option<&'static (&'static str, &'static str, &'static str, bool)> {
    RESOURCES.iter().find(|r| r.1 == kind)
}

fn resource_of_path(
    api_version: &str,
    plural: &str,
) -> Option<&'static (&'static str, &'static str, &'static str, bool)> {
    RESOURCES
        .iter()
        .find(|r| r.0 == api_version && r.2 == plural)
}

/// One change, as a watch stream reports it.
#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    plural: &'static str,
    namespace: String,
    kind: &'static str, // ADDED, MODIFIED, DELETED
    object: Arc<Value>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// plural -> (namespace, name) -> object
    objects: BTreeMap<&'static str, BTreeMap<(String, String), Arc<Value>>>,
    /// Changes still served to watches that resume from an older resourceVersion.
    history: VecDeque<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest: u64,
    forbidden: BTreeSet<String>,
    /// Every request gets 503 (an API server outage).
    unavailable: bool,
    /// Requests served, by "VERB plural" (list, watch, create, patch, ...).
    requests: BTreeMap<String, u64>,
    /// Every (API group, resource or resource/subresource, verb) asked for, as RBAC names them.
    access: std::collections::BTreeSet<(String, String, String)>,
    /// The resourceVersion the latest watch of each resource started from.
    watch_from: BTreeMap<String, u64>,
}

struct Shared {
    state: Mutex<State>,
    changes: broadcast::Sender<Change>,
    /// Bumped to close every open watch (as an API server restart or a load balancer would).
    cut: broadcast::Sender<()>,
}

/// The running server. Dropping it stops the server.
pub struct FakeApi {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// Whether a Node object carries the condition Sepal writes once the node's routes are
/// programmed: `NetworkUnavailable=False` with reason `SepalIsUp`.
pub fn sepal_is_up(node: &Value) -> bool {
    node["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .any(|c| {
            c["type"] == "NetworkUnavailable"
                && c["status"] == "False"
                && c["reason"] == "SepalIsUp"
        })
}

impl Drop for FakeApi {
    /// Works from inside an async test too (dropping a runtime there would panic).
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Keeps at most this many changes for resuming watches (then compacts, as etcd does).
const HISTORY: usize = 200_000;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, State> {
    shared.state.lock().unwrap_or_else(|e| e.into_inner())
}

impl FakeApi {
    /// Starts a server on 127.0.0.1 (a free port) on its own runtime thread.
    pub fn start() -> FakeApi {
        Self::start_with(std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1"))
    }

    /// Starts a server on 127.0.0.1 inside a network namespace (e.g. a test node's, so an agent
    /// running there reaches it): the socket is bound by a thread that entered the namespace.
    pub fn start_in_netns(netns_path: &Path) -> FakeApi {
        let path = netns_path.to_path_buf();
        let listener = std::thread::spawn(move || {
            let f = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on a valid namespace fd affects only this short-lived thread.
            let rc =
                unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1 in netns")
        })
        .join()
        .expect("bind thread");
        Self::start_with(listener)
    }

    fn start_with(listener: std::net::TcpListener) -> FakeApi {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let (changes, _) = broadcast::channel(65536);
        let (cut, _) = broadcast::channel(16);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                oldest: 1,
                ..Default::default()
            }),
            changes,
            cut,
        });
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        let listener = {
            let _guard = runtime.enter();
            tokio::net::TcpListener::from_std(listener).expect("tokio listener")
        };
        let addr = listener.local_addr().expect("local addr");
        let s = shared.clone();
        runtime.spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let s = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| serve(s.clone(), req));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        FakeApi {
            addr,
            shared,
            runtime: Some(runtime),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at this server (plain HTTP, no credentials).
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: {}\n\
                 contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
                 current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
                self.url()
            ),
        )
    }

    /// Creates or replaces an object (ADDED or MODIFIED), returning its new resourceVersion.
    /// Panics on an object of a kind the server does not serve: that is a bug in the test.
    pub fn apply(&self, obj: Value) -> u64 {
        let mut st = lock(&self.shared);
        apply_locked(&mut st, &self.shared, obj)
    }

    /// Applies many objects under one lock (bench setup).
    pub fn apply_all(&self, objs: impl IntoIterator<Item = Value>) {
        let mut st = lock(&self.shared);
        for o in objs {
            apply_locked(&mut st, &self.shared, o);
        }
    }

    /// Deletes an object (DELETED); false when it did not exist.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> bool {
        let (_, _, plural, _) = *resource_of_kind(kind).expect("kind served by the fake API");
        let mut st = lock(&self.shared);
        let Some(old) = st
            .objects
            .entry(plural)
            .or_default()
            .remove(&(namespace.to_string(), name.to_string()))
        else {
            return false;
        };
        st.rv += 1;
        let rv = st.rv;
        let mut obj = (*old).clone();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        record(
            &mut st,
            &self.shared,
            plural,
            namespace,
            "DELETED",
            Arc::new(obj),
            rv,
        );
        true
    }

    /// The stored object, if any.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Option<Value> {
        let (_, _, plural, _) = *resource_of_kind(kind)?;
        let st = lock(&self.shared);
        st.objects
            .get(plural)?
            .get(&(namespace.to_string(), name.to_string()))
            .map(|v| (**v).clone())
    }

    /// Every object of a kind.
    pub fn list(&self, kind: &str) -> Vec<Value> {
        let Some((_, _, plural, _)) = resource_of_kind(kind) else {
            return Vec::new();
        };
        let st = lock(&self.shared);
        st.objects
            .get(plural)
            .map(|m| m.values().map(|v| (**v).clone()).collect())
            .unwrap_or_default()
    }

    /// Every request to `plural` now gets 403 Forbidden (as RBAC without a matching rule).
    pub fn forbid(&self, plural: &str) {
        lock(&self.shared).forbidden.insert(plural.to_string());
    }

    /// An outage: every request gets 503 Service Unavailable until called with false. Combine
    /// with `cut_watches` to disconnect clients.
    pub fn set_unavailable(&self, down: bool) {
        lock(&self.shared).unavailable = down;
    }

    pub fn allow(&self, plural: &str) {
        lock(&self.shared).forbidden.remove(plural);
    }

    /// Forgets the change history: a watch resuming from any earlier resourceVersion gets 410.
    pub fn compact(&self) {
        let mut st = lock(&self.shared);
        st.history.clear();
        st.oldest = st.rv + 1;
    }

    /// Closes every open watch stream; clients resume from their last resourceVersion.
    pub fn cut_watches(&self) {
        let _ = self.shared.cut.send(());
    }

    /// How many requests of this verb ("list", "watch", ...) reached `plural`.
    pub fn requests(&self, verb: &str, plural: &str) -> u64 {
        lock(&self.shared)
            .requests
            .get(&format!("{verb} {plural}"))
            .copied()
            .unwrap_or(0)
    }

    /// Every (API group, resource[/status], verb) a client has asked for so far, in RBAC's terms.
    pub fn access(&self) -> std::collections::BTreeSet<(String, String, String)> {
        lock(&self.shared).access.clone()
    }

    /// The resourceVersion the latest watch of `plural` asked to start from.
    pub fn last_watch_from(&self, plural: &str) -> Option<u64> {
        lock(&self.shared).watch_from.get(plural).copied()
    }

    pub fn resource_version(&self) -> u64 {
        lock(&self.shared).rv
    }
}

fn apply_locked(st: &mut State, shared: &Shared, mut obj: Value) -> u64 {
    let kind = obj["kind"].as_str().unwrap_or_default().to_string();
    let &(api_version, _, plural, namespaced) = resource_of_kind(&kind)
        .unwrap_or_else(|| panic!("kind {kind:?} not served by the fake API"));
    obj["apiVersion"] = json!(api_version);
    let name = obj["metadata"]["name"]
        .as_str()
        .expect("object with metadata.name")
        .to_string();
    let namespace = if namespaced {
        let ns = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        obj["metadata"]["namespace"] = json!(ns);
        ns
    } else {
        String::new()
    };
    st.rv += 1;
    let rv = st.rv;
    let key = (namespace.clone(), name.clone());
    let existing = st.objects.get(plural).and_then(|m| m.get(&key)).cloned();
    let meta = obj["metadata"].as_object_mut().expect("metadata object");
    meta.insert("resourceVersion".into(), json!(rv.to_string()));
    match &existing {
        Some(old) => {
            meta.insert("uid".into(), old["metadata"]["uid"].clone());
            meta.insert(
                "creationTimestamp".into(),
                old["metadata"]["creationTimestamp"].clone(),
            );
        }
        None => {
            meta.insert("uid".into(), json!(format!("uid-{rv}")));
            meta.insert("creationTimestamp".into(), json!("2026-01-01T00:00:00Z"));
        }
    }
    let obj = Arc::new(obj);
    st.objects
        .entry(plural)
        .or_default()
        .insert(key, obj.clone());
    let what = if existing.is_some() {
        "MODIFIED"
    } else {
        "ADDED"
    };
    record(st, shared, plural, &namespace, what, obj, rv);
    rv
}

fn trim(st: &mut State) {
    while st.history.len() > HISTORY {
        if let Some(c) = st.history.pop_front() {
            st.oldest = c.rv + 1;
        }
    }
}

fn record(
    st: &mut State,
    shared: &Shared,
    plural: &'static str,
    namespace: &str,
    kind: &'static str,
    object: Arc<Value>,
    rv: u64,
) {
    let c = Change {
        rv,
        plural,
        namespace: namespace.to_string(),
        kind,
        object,
    };
    st.history.push_back(c.clone());
    trim(st);
    let _ = shared.changes.send(c);
}

type Body = BoxBody<Bytes, Infallible>;

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("response")
}

fn status(code: StatusCode, reason: &str, message: String) -> Response<Body> {
    json_response(
        code,
        &json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code.as_u16()}),
    )
}

/// The parts of a request path: /api/v1[/namespaces/NS]/PLURAL[/NAME[/status]] or /apis/G/V/...
struct Target {
    resource: &'static (&'static str, &'static str, &'static str, bool),
    namespace: Option<String>,
    name: Option<String>,
    /// The path ends in `/status`.
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (api_version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (format!("{g}/{v}"), rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    let (plural, name) = match rest {
        [p] => (*p, None),
        [p, n] | [p, n, "status"] => (*p, Some(n.to_string())),
        _ => return None,
    };
    Some(Target {
        resource: resource_of_path(&api_version, plural)?,
        namespace,
        name,
        status: rest.len() == 3,
    })
}

fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

async fn serve(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let Some(t) = parse_path(&path) else {
        return Ok(status(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("the server could not find the requested resource {path}"),
        ));
    };
    let q = query(&req);
    let &(api_version, kind, plural, namespaced) = t.resource;
    let watch = q.get("watch").is_some_and(|w| w == "1" || w == "true");
    let verb = match (req.method(), &t.name, watch) {
        (&Method::GET, None, true) => "watch",
        (&Method::GET, None, false) => "list",
        (&Method::GET, Some(_), _) => "get",
        (&Method::POST, _, _) => "create",
        (&Method::PATCH, _, _) => "patch",
        (&Method::PUT, _, _) => "update",
        (&Method::DELETE, _, _) => "delete",
        _ => "other",
    };
    {
        let mut st = lock(&shared);
        *st.requests.entry(format!("{verb} {plural}")).or_default() += 1;
        let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        let resource = if t.status {
            format!("{plural}/status")
        } else {
            plural.to_string()
        };
        st.access
            .insert((group.to_string(), resource, verb.to_string()));
        if verb == "watch" {
            let from = q.get("resourceVersion").and_then(|v| v.parse().ok());
            st.watch_from.insert(plural.to_string(), from.unwrap_or(0));
        }
        if st.unavailable {
            return Ok(status(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailable",
                "the server is currently unable to handle the request".into(),
            ));
        }
        if st.forbidden.contains(plural) {
            let scope = match &t.namespace {
                Some(ns) => format!("in the namespace \"{ns}\""),
                None => "at the cluster scope".to_string(),
            };
            let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
            return Ok(status(
                StatusCode::FORBIDDEN,
                "Forbidden",
                format!(
                    "{plural} is forbidden: User \"system:serviceaccount:sepal-system:sepal-node\" \
                     cannot {verb} resource \"{plural}\" in API group \"{group}\" {scope}"
                ),
            ));
        }
    }
    let ns_filter = t.namespace.clone();
    match verb {
        "list" => {
            // Pages: `limit` items after the key named by `continue` ("<rv>/<namespace>/<name>";
            // later pages report the first page's resourceVersion, as the API server does).
            let limit: usize = q
                .get("limit")
                .and_then(|l| l.parse().ok())
                .filter(|l| *l > 0)
                .unwrap_or(usize::MAX);
            let after = q.get("continue").and_then(|c| {
                let c = c.replace("%2F", "/").replace("%2f", "/");
                let mut parts = c.splitn(3, '/');
                let rv: u64 = parts.next()?.parse().ok()?;
                let ns = parts.next()?.to_string();
                let name = parts.next()?.to_string();
                Some((rv, (ns, name)))
            });
            let st = lock(&shared);
            let list_rv = after.as_ref().map(|a| a.0).unwrap_or(st.rv);
            let empty = BTreeMap::new();
            let all = st.objects.get(plural).unwrap_or(&empty);
            let range = match &after {
                Some((_, k)) => all.range::<(String, String), _>((
                    std::ops::Bound::Excluded(k.clone()),
                    std::ops::Bound::Unbounded,
                )),
                None => all.range::<(String, String), _>(..),
            };
            let mut items = Vec::new();
            let mut last = None;
            let mut more = false;
            for ((ns, name), v) in range {
                if ns_filter.as_ref().is_some_and(|f| f != ns) {
                    continue;
                }
                if items.len() == limit {
                    more = true;
                    break;
                }
                items.push((**v).clone());
                last = Some((ns.clone(), name.clone()));
            }
            let mut meta = json!({"resourceVersion": list_rv.to_string()});
            if let (true, Some((ns, name))) = (more, last) {
                meta["continue"] = json!(format!("{list_rv}/{ns}/{name}"));
            }
            let body = json!({"apiVersion": api_version, "kind": format!("{kind}List"),
                              "metadata": meta, "items": items});
            drop(st);
            Ok(json_response(StatusCode::OK, &body))
        }
        "watch" => Ok(watch_response(shared, plural, ns_filter, &q)),
        "get" => {
            let st = lock(&shared);
            let key = (
                t.namespace.clone().unwrap_or_default(),
                t.name.clone().unwrap_or_default(),
            );
            match st.objects.get(plural).and_then(|m| m.get(&key)) {
                Some(o) => Ok(json_response(StatusCode::OK, o)),
                None => Ok(status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{plural} \"{}\" not found", key.1),
                )),
            }
        }
        "create" | "patch" | "update" => {
            let body = match req.into_body().collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return Ok(status(StatusCode::BAD_REQUEST, "BadRequest", e.to_string())),
            };
            let Ok(mut incoming) = serde_json::from_slice::<Value>(&body) else {
                return Ok(status(
                    StatusCode::BAD_REQUEST,
                    "BadRequest",
                    "body is not JSON".into(),
                ));
            };
            let ns = if namespaced {
                t.namespace.clone().unwrap_or_else(|| "default".into())
            } else {
                String::new()
            };
            let mut st = lock(&shared);
            let name = match t
                .name
                .clone()
                .or_else(|| incoming["metadata"]["name"].as_str().map(str::to_string))
            {
                Some(n) => n,
                None => match incoming["metadata"]["generateName"].as_str() {
                    Some(g) => format!("{g}{}", st.rv + 1),
                    None => {
                        return Ok(status(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "Invalid",
                            "metadata.name: Required value".into(),
                        ))
                    }
                },
            };
            let existing = st
                .objects
                .get(plural)
                .and_then(|m| m.get(&(ns.clone(), name.clone())))
                .map(|v| (**v).clone());
            let merged = match (verb, existing) {
                ("create", Some(_)) => {
                    return Ok(status(
                        StatusCode::CONFLICT,
                        "AlreadyExists",
                        format!("{plural} \"{name}\" already exists"),
                    ))
                }
                ("patch", Some(mut old)) => {
                    merge(&mut old, &incoming);
                    old
                }
                ("patch", None) if path.ends_with("/status") => {
                    return Ok(status(
                        StatusCode::NOT_FOUND,
                        "NotFound",
                        format!("{plural} \"{name}\" not found"),
                    ))
                }
                _ => {
                    incoming["metadata"]["name"] = json!(name);
                    incoming
                }
            };
            let mut obj = merged;
            obj["kind"] = json!(kind);
            if namespaced {
                obj["metadata"]["namespace"] = json!(ns);
            }
            apply_locked(&mut st, &shared, obj);
            let stored = st
                .objects
                .get(plural)
                .and_then(|m| m.get(&(ns, name)))
                .map(|v| (**v).clone())
                .unwrap_or(Value::Null);
            Ok(json_response(
                if verb == "create" {
                    StatusCode::CREATED
                } else {
                    StatusCode::OK
                },
                &stored,
            ))
        }
        "delete" => {
            let mut st = lock(&shared);
            let key = (
                t.namespace.clone().unwrap_or_default(),
                t.name.clone().unwrap_or_default(),
            );
            match st.objects.get_mut(plural).and_then(|m| m.remove(&key)) {
                Some(old) => {
                    st.rv += 1;
                    let rv = st.rv;
                    let mut obj = (*old).clone();
                    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                    let obj = Arc::new(obj);
                    record(&mut st, &shared, plural, &key.0, "DELETED", obj.clone(), rv);
                    Ok(json_response(StatusCode::OK, &obj))
                }
                None => Ok(status(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("{plural} \"{}\" not found", key.1),
                )),
            }
        }
        _ => Ok(status(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{verb} is not supported by the fake API"),
        )),
    }
}

/// JSON merge patch (RFC 7386), with lists of conditions merged by `type` as a strategic merge
/// patch does for Node conditions.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else if k == "conditions" && v.is_array() {
                    let list = t.entry(k.clone()).or_insert_with(|| json!([]));
                    if !list.is_array() {
                        *list = json!([]);
                    }
                    let arr = list.as_array_mut().expect("array");
                    for c in v.as_array().expect("array") {
                        match arr.iter_mut().find(|x| x["type"] == c["type"]) {
                            Some(x) => merge(x, c),
                            None => arr.push(c.clone()),
                        }
                    }
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

fn watch_response(
    shared: Arc<Shared>,
    plural: &'static str,
    ns_filter: Option<String>,
    q: &BTreeMap<String, String>,
) -> Response<Body> {
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // Subscribe before reading history so nothing falls between the two.
    let mut live = shared.changes.subscribe();
    let mut cut = shared.cut.subscribe();
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1024);
    let (backlog, gone, current) = {
        let st = lock(&shared);
        if from != 0 && from + 1 < st.oldest {
            (Vec::new(), true, st.rv)
        } else {
            let backlog: Vec<Change> = st
                .history
                .iter()
                .filter(|c| c.rv > from && c.plural == plural)
                .cloned()
                .collect();
            (backlog, false, st.rv)
        }
    };
    let matches = move |c: &Change| {
        c.plural == plural && ns_filter.as_ref().is_none_or(|f| *f == c.namespace)
    };
    tokio::spawn(async move {
        let line = |v: Value| Bytes::from(format!("{v}\n"));
        if gone {
            let _ = tx
                .send(line(json!({"type": "ERROR", "object": {
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": format!("too old resource version: {from} ({current})"),
                    "reason": "Expired", "code": 410}})))
                .await;
            return;
        }
        let mut last = from;
        for c in backlog.iter().filter(|c| matches(c)) {
            last = c.rv;
            if tx
                .send(line(json!({"type": c.kind, "object": *c.object})))
                .await
                .is_err()
            {
                return;
            }
        }
        // Everything up to `current` was in the backlog; live changes start after it.
        last = last.max(current);
        if bookmarks {
            let _ = tx
                .send(line(json!({"type": "BOOKMARK", "object": {
                    "kind": "Bookmark", "apiVersion": "v1",
                    "metadata": {"resourceVersion": last.max(from).to_string()}}})))
                .await;
        }
        loop {
            // Biased: a cut requested before a change is seen before that change.
            tokio::select! {
                biased;
                _ = cut.recv() => return,
                c = live.recv() => match c {
                    Ok(c) => {
                        if c.rv <= last || !matches(&c) {
                            continue;
                        }
                        last = c.rv;
                        if tx.send(line(json!({"type": c.kind, "object": *c.object}))).await.is_err() {
                            return;
                        }
                    }
                    // A watcher too slow for the broadcast buffer: end the stream, the client
                    // resumes from its last resourceVersion (or relists after 410).
                    Err(_) => return,
                },
            }
        }
    });
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths() {
        let t = parse_path("/api/v1/pods").unwrap();
        assert_eq!(t.resource.2, "pods");
        let t = parse_path("/api/v1/namespaces/sepal-system/secrets").unwrap();
        assert_eq!(t.namespace.as_deref(), Some("sepal-system"));
        let t = parse_path("/api/v1/namespaces/kube-system").unwrap();
        assert_eq!(
            (t.resource.2, t.name.as_deref()),
            ("namespaces", Some("kube-system"))
        );
        let t = parse_path("/apis/sepal.dev/v1alpha1/sepalnodestatuses/n1/status").unwrap();
        assert_eq!(t.name.as_deref(), Some("n1"));
        assert!(parse_path("/apis/apps/v1/deployments").is_none());
    }

    #[test]
    fn merge_patch_and_conditions() {
        let mut n =
            json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}, "a": 1});
        merge(
            &mut n,
            &json!({"a": null, "status": {"conditions": [{"type": "NetworkUnavailable", "status": "False"}]}}),
        );
        assert_eq!(
            n,
            json!({"status": {"conditions": [{"type": "Ready", "status": "True"},
                                             {"type": "NetworkUnavailable", "status": "False"}]}})
        );
    }
}
