//! The agent's model of the cluster: the Kubernetes objects a datastore feeds it, as typed
//! k8s-openapi values (pods in a compact form of their own, see `pod`), plus an escape hatch for
//! kinds Sepal does not type (e.g. its own sepal.dev kinds).

pub mod pod;
pub mod slice;
pub mod wire;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Namespace, Node, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
pub use pod::PodInfo;
use sepal_felix::policy::cnp_api::{CNP_GROUP, CNP_KIND, CNP_VERSIONS};
use sepal_felix::policy::ClusterNetworkPolicy;
use serde_json::Value;
pub use slice::SliceInfo;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Identity of an object: apiVersion/kind/namespace/name (namespace empty when cluster-scoped).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub api_version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// One object, typed when Sepal knows its kind.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Node(Box<Node>),
    Namespace(Box<Namespace>),
    /// Kept compact: a cluster has far more pods than anything else.
    Pod(Box<PodInfo>),
    /// Compact too: a large cluster has one or more per Service.
    EndpointSlice(Box<SliceInfo>),
    Service(Box<Service>),
    Secret(Box<Secret>),
    /// Shared with the policy engine and compiler, which keep the cluster's policies too.
    NetworkPolicy(Arc<NetworkPolicy>),
    /// policy.networking.k8s.io, cluster-scoped; its key names the version the Kubernetes
    /// datastore watches (`CNP_API_VERSION`) whichever version it came as, so one policy is one
    /// object.
    ClusterNetworkPolicy(Arc<ClusterNetworkPolicy>),
    /// Any other kind (Sepal's own sepal.dev kinds until they get types), kept as it came. Boxed
    /// so that `Object` stays two words: the model holds one per pod.
    Other(Box<ObjectKey>, Box<Value>),
}

/// A change the datastore reports; the model applies them in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Created or changed.
    Upsert(Object),
    Delete(ObjectKey),
    /// The datastore has delivered its initial state; the model is now complete.
    Synced,
    /// The datastore lists every object of one kind again (after a watch expired with 410 Gone):
    /// the upserts up to the matching `ListEnd` are the kind's whole set, and what the model holds
    /// of the kind beyond them is gone. The model keeps that bookkeeping, not each watcher, so
    /// the keys of all objects are not held twice.
    ListStart(KindKey),
    ListEnd(KindKey),
}

/// A kind: apiVersion and kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KindKey {
    pub api_version: String,
    pub kind: String,
}

/// Why an object could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    #[error("not an object with apiVersion, kind and metadata.name: {0}")]
    Shape(String),
    #[error("{key}: {msg}")]
    Invalid { key: ObjectKey, msg: String },
}

fn str_field<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

/// The key of a raw object, checking the fields every Kubernetes object has.
pub fn key_of(value: &Value) -> Result<ObjectKey, ObjectError> {
    // Empty counts as missing: the API server refuses both, and an empty kind would make
    // objects of no kind that differ only by name.
    let api_version = str_field(value, &["apiVersion"])
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ObjectError::Shape("missing apiVersion".into()))?;
    let kind = str_field(value, &["kind"])
        .filter(|k| !k.is_empty())
        .ok_or_else(|| ObjectError::Shape("missing kind".into()))?;
    let name = str_field(value, &["metadata", "name"])
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ObjectError::Shape(format!("{kind} without metadata.name")))?;
    Ok(ObjectKey {
        api_version: api_version.to_string(),
        kind: kind.to_string(),
        namespace: str_field(value, &["metadata", "namespace"])
            .unwrap_or_default()
            .to_string(),
        name: name.to_string(),
    })
}

/// The apiVersion the model keys ClusterNetworkPolicies by: the one the Kubernetes datastore
/// watches (v1alpha2 and v1beta1 have the same schema, and the API server serves both).
pub const CNP_API_VERSION: &str = "policy.networking.k8s.io/v1alpha2";

/// Whether `api_version`/`kind` is a ClusterNetworkPolicy of a version Sepal reads.
pub fn is_cnp(api_version: &str, kind: &str) -> bool {
    kind == CNP_KIND
        && api_version
            .split_once('/')
            .is_some_and(|(g, v)| g == CNP_GROUP && CNP_VERSIONS.contains(&v))
}

/// Whether the kind at this key is one the model types (so its fields are checked on load).
pub fn is_typed(key: &ObjectKey) -> bool {
    matches!(
        (key.api_version.as_str(), key.kind.as_str()),
        ("v1", "Node" | "Namespace" | "Pod" | "Service" | "Secret")
            | ("networking.k8s.io/v1", "NetworkPolicy")
            | ("discovery.k8s.io/v1", "EndpointSlice")
    ) || is_cnp(&key.api_version, &key.kind)
}

impl Object {
    /// Reads a raw object: typed for the kinds Sepal knows, raw otherwise. Namespaced kinds
    /// without a namespace get `default`, as kubectl does.
    pub fn from_value(mut value: Value) -> Result<Object, ObjectError> {
        let mut key = key_of(&value)?;
        let namespaced = matches!(
            key.kind.as_str(),
            "Pod" | "Service" | "Secret" | "NetworkPolicy" | "EndpointSlice"
        );
        if namespaced && key.namespace.is_empty() && is_typed(&key) {
            key.namespace = "default".into();
            if let Some(meta) = value.get_mut("metadata").and_then(Value::as_object_mut) {
                meta.insert("namespace".into(), Value::String("default".into()));
            }
        }
        fn typed<T: serde::de::DeserializeOwned>(
            key: &ObjectKey,
            value: Value,
        ) -> Result<Box<T>, ObjectError> {
            serde_json::from_value(value)
                .map(Box::new)
                .map_err(|e| ObjectError::Invalid {
                    key: key.clone(),
                    msg: e.to_string(),
                })
        }
        Ok(match (key.api_version.as_str(), key.kind.as_str()) {
            ("v1", "Node") => Object::Node(typed(&key, value)?),
            ("v1", "Namespace") => Object::Namespace(typed(&key, value)?),
            ("v1", "Pod") => {
                let pod: Box<wire::PodWire> = typed(&key, value)?;
                Object::Pod(Box::new(PodInfo::from_wire(*pod).ok_or_else(|| {
                    ObjectError::Shape("Pod without metadata.name".into())
                })?))
            }
            ("discovery.k8s.io/v1", "EndpointSlice") => {
                let slice: Box<wire::SliceWire> = typed(&key, value)?;
                Object::EndpointSlice(Box::new(SliceInfo::from_wire(*slice).ok_or_else(|| {
                    ObjectError::Shape("EndpointSlice without metadata.name".into())
                })?))
            }
            ("v1", "Service") => Object::Service(typed(&key, value)?),
            ("v1", "Secret") => Object::Secret(typed(&key, value)?),
            ("networking.k8s.io/v1", "NetworkPolicy") => {
                Object::NetworkPolicy(Arc::new(*typed::<NetworkPolicy>(&key, value)?))
            }
            (api, kind) if is_cnp(api, kind) => {
                let mut p = typed::<ClusterNetworkPolicy>(&key, value)?;
                // Either version is the same object (see `CNP_API_VERSION`).
                p.api_version = Some(CNP_API_VERSION.into());
                Object::ClusterNetworkPolicy(Arc::new(*p))
            }
            _ => Object::Other(Box::new(key), Box::new(value)),
        })
    }

    pub fn key(&self) -> ObjectKey {
        fn k(
            api: &str,
            kind: &str,
            meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
        ) -> ObjectKey {
            ObjectKey {
                api_version: api.into(),
                kind: kind.into(),
                namespace: meta.namespace.clone().unwrap_or_default(),
                name: meta.name.clone().unwrap_or_default(),
            }
        }
        match self {
            Object::Node(o) => k("v1", "Node", &o.metadata),
            Object::Namespace(o) => k("v1", "Namespace", &o.metadata),
            Object::Pod(p) => ObjectKey {
                api_version: "v1".into(),
                kind: "Pod".into(),
                namespace: p.namespace.to_string(),
                name: p.name.to_string(),
            },
            Object::EndpointSlice(s) => ObjectKey {
                api_version: "discovery.k8s.io/v1".into(),
                kind: "EndpointSlice".into(),
                namespace: s.namespace.to_string(),
                name: s.name.to_string(),
            },
            Object::Service(o) => k("v1", "Service", &o.metadata),
            Object::Secret(o) => k("v1", "Secret", &o.metadata),
            Object::NetworkPolicy(o) => k("networking.k8s.io/v1", "NetworkPolicy", &o.metadata),
            // Cluster-scoped: a namespace in the object means nothing.
            Object::ClusterNetworkPolicy(o) => ObjectKey {
                api_version: CNP_API_VERSION.into(),
                kind: CNP_KIND.into(),
                namespace: String::new(),
                name: o.name().to_string(),
            },
            Object::Other(key, _) => (**key).clone(),
        }
    }
}

/// Pods by namespace and name; both shared with the `PodInfo` (so a pod's key costs no copies).
type PodKey = (Arc<str>, Arc<str>);

fn is_pod_kind(api_version: &str, kind: &str) -> bool {
    api_version == "v1" && kind == "Pod"
}

/// The cluster as the agent knows it.
#[derive(Debug, Default, Clone)]
pub struct Model {
    /// Every object but pods.
    objects: BTreeMap<ObjectKey, Object>,
    /// Pods (all `Object::Pod`), apart with a compact key: a cluster has far more of them.
    pods: BTreeMap<PodKey, Object>,
    synced: bool,
    /// Shares pods' label sets and namespace/node names.
    interner: pod::Interner,
    /// Kinds being listed again: the keys of theirs not upserted since `ListStart`.
    relisting: BTreeMap<KindKey, BTreeSet<ObjectKey>>,
}

// Accessors for the policy and routing wiring; not every one has a caller yet.
#[allow(dead_code)]
impl Model {
    /// Applies one event; returns whether the model changed.
    pub fn apply(&mut self, event: Event) -> bool {
        match event {
            Event::Upsert(mut obj) => {
                if !self.relisting.is_empty() {
                    let key = obj.key();
                    if let Some(unseen) = self.relisting.get_mut(&KindKey {
                        api_version: key.api_version.clone(),
                        kind: key.kind.clone(),
                    }) {
                        unseen.remove(&key);
                    }
                }
                if let Object::Pod(p) = &obj {
                    let key = (p.namespace.clone(), p.name.clone());
                    if self.pods.get(&key) == Some(&obj) {
                        return false;
                    }
                }
                if let Object::Pod(p) = &mut obj {
                    self.interner.intern(p);
                    let key = (p.namespace.clone(), p.name.clone());
                    self.pods.insert(key, obj);
                    return true;
                }
                if let Object::EndpointSlice(s) = &mut obj {
                    self.interner.intern_slice(s);
                }
                let key = obj.key();
                if self.objects.get(&key) == Some(&obj) {
                    return false;
                }
                self.objects.insert(key, obj);
                true
            }
            Event::Delete(key) => self.remove(&key),
            Event::Synced => !std::mem::replace(&mut self.synced, true),
            Event::ListStart(kind) => {
                let unseen: BTreeSet<ObjectKey> = if is_pod_kind(&kind.api_version, &kind.kind) {
                    self.pods.values().map(Object::key).collect()
                } else {
                    let held = self.objects.keys();
                    held.filter(|k| k.api_version == kind.api_version && k.kind == kind.kind)
                        .cloned()
                        .collect()
                };
                // A first list (nothing held yet) needs no bookkeeping.
                if !unseen.is_empty() {
                    self.relisting.insert(kind, unseen);
                }
                false
            }
            Event::ListEnd(kind) => {
                let gone = self.relisting.remove(&kind).unwrap_or_default();
                let mut changed = false;
                for key in &gone {
                    changed |= self.remove(key);
                }
                changed
            }
        }
    }

    fn remove(&mut self, key: &ObjectKey) -> bool {
        if is_pod_kind(&key.api_version, &key.kind) {
            let key: PodKey = (key.namespace.as_str().into(), key.name.as_str().into());
            return self.pods.remove(&key).is_some();
        }
        self.objects.remove(key).is_some()
    }

    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&Object> {
        if is_pod_kind(&key.api_version, &key.kind) {
            let key: PodKey = (key.namespace.as_str().into(), key.name.as_str().into());
            return self.pods.get(&key);
        }
        self.objects.get(key)
    }

    pub fn len(&self) -> usize {
        self.objects.len() + self.pods.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every object, pods included.
    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.objects.values().chain(self.pods.values())
    }

    pub fn node(&self, name: &str) -> Option<&Node> {
        match self.objects.get(&ObjectKey {
            api_version: "v1".into(),
            kind: "Node".into(),
            namespace: String::new(),
            name: name.into(),
        }) {
            Some(Object::Node(n)) => Some(n),
            _ => None,
        }
    }

    /// Whether Pod `namespace/name` exists (on any node).
    pub fn has_pod(&self, namespace: &str, name: &str) -> bool {
        let key: PodKey = (namespace.into(), name.into());
        self.pods.contains_key(&key)
    }

    pub fn pods(&self) -> impl Iterator<Item = &PodInfo> {
        self.pods.values().filter_map(|o| match o {
            Object::Pod(p) => Some(&**p),
            _ => None,
        })
    }

    pub fn network_policies(&self) -> impl Iterator<Item = &Arc<NetworkPolicy>> {
        self.objects.values().filter_map(|o| match o {
            Object::NetworkPolicy(p) => Some(p),
            _ => None,
        })
    }

    /// ClusterNetworkPolicies, by name.
    pub fn cluster_network_policies(&self) -> impl Iterator<Item = &Arc<ClusterNetworkPolicy>> {
        self.objects.values().filter_map(|o| match o {
            Object::ClusterNetworkPolicy(p) => Some(p),
            _ => None,
        })
    }

    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.objects.values().filter_map(|o| match o {
            Object::Node(n) => Some(&**n),
            _ => None,
        })
    }

    pub fn endpoint_slices(&self) -> impl Iterator<Item = &SliceInfo> {
        self.objects.values().filter_map(|o| match o {
            Object::EndpointSlice(s) => Some(&**s),
            _ => None,
        })
    }

    pub fn namespaces(&self) -> impl Iterator<Item = &Namespace> {
        self.objects.values().filter_map(|o| match o {
            Object::Namespace(n) => Some(&**n),
            _ => None,
        })
    }
}

/// The pod blocks of a node: `spec.podCIDRs`, else the older single `spec.podCIDR`. Entries that
/// do not parse are reported, not silently dropped.
pub fn pod_cidrs(node: &Node) -> Result<Vec<IpNetwork>, String> {
    let spec = node.spec.as_ref();
    let list: Vec<String> = match spec.and_then(|s| s.pod_cidrs.clone()) {
        Some(l) if !l.is_empty() => l,
        _ => spec.and_then(|s| s.pod_cidr.clone()).into_iter().collect(),
    };
    let mut out = Vec::new();
    for c in list {
        let net: IpNetwork = c
            .parse()
            .map_err(|e| format!("spec.podCIDRs entry {c:?}: {e}"))?;
        if net.network() != net.ip() {
            return Err(format!(
                "spec.podCIDRs entry {c:?} has host bits set (did you mean {}/{}?)",
                net.network(),
                net.prefix()
            ));
        }
        out.push(net);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(cidrs: &[&str]) -> Value {
        json!({"apiVersion":"v1","kind":"Node","metadata":{"name":"n1"},"spec":{"podCIDRs":cidrs}})
    }

    #[test]
    fn typed_and_raw_objects() {
        let n = Object::from_value(node(&["10.0.0.0/24", "fd00::/112"])).unwrap();
        let Object::Node(ref typed) = n else {
            panic!("not a node")
        };
        assert_eq!(pod_cidrs(typed).unwrap().len(), 2);
        assert_eq!(n.key().name, "n1");
        let own = Object::from_value(json!({"apiVersion":"sepal.dev/v1","kind":"BGPPeer","metadata":{"name":"tor"},"spec":{"asn":65000}})).unwrap();
        assert!(matches!(own, Object::Other(ref k, _) if k.kind == "BGPPeer"));
        let pod =
            Object::from_value(json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"}}))
                .unwrap();
        assert_eq!(pod.key().namespace, "default");
    }

    #[test]
    fn bad_objects_are_errors() {
        assert!(Object::from_value(json!({"kind":"Node"})).is_err());
        // Found by the agent/datastore_file fuzz target: an empty kind or apiVersion was taken
        // as a kind of its own.
        for (api, kind) in [("sepal.dev/v1", ""), ("", "Node")] {
            let v = json!({"apiVersion": api, "kind": kind, "metadata": {"name": "n"}});
            assert!(
                matches!(Object::from_value(v), Err(ObjectError::Shape(_))),
                "{api:?} {kind:?}"
            );
        }
        assert!(
            Object::from_value(json!({"apiVersion":"v1","kind":"Node","metadata":{}})).is_err()
        );
        let bad = json!({"apiVersion":"v1","kind":"Node","metadata":{"name":"x"},"spec":{"podCIDRs":"nope"}});
        assert!(matches!(
            Object::from_value(bad),
            Err(ObjectError::Invalid { .. })
        ));
        let n = Object::from_value(node(&["10.0.0.1/24"])).unwrap();
        let Object::Node(n) = n else { panic!() };
        assert!(pod_cidrs(&n).unwrap_err().contains("host bits"));
    }

    #[test]
    fn cluster_network_policies_of_both_versions_are_one_cluster_scoped_object() {
        let cnp = |version: &str, priority: i64| {
            json!({"apiVersion": format!("policy.networking.k8s.io/{version}"),
                   "kind": "ClusterNetworkPolicy",
                   "metadata": {"name": "web", "namespace": "ignored", "generation": 3},
                   "spec": {"tier": "Baseline", "priority": priority,
                            "subject": {"pods": {"namespaceSelector": {},
                                                 "podSelector": {"matchLabels": {"app": "web"}}}},
                            "egress": [{"action": "Deny", "to": [{"nodes": {}}]}]}})
        };
        let mut m = Model::default();
        for (version, priority) in [("v1alpha2", 5), ("v1beta1", 6)] {
            let o = Object::from_value(cnp(version, priority)).unwrap();
            let Object::ClusterNetworkPolicy(ref p) = o else {
                panic!("{version}: not typed: {o:?}")
            };
            assert_eq!(p.spec.priority, priority);
            assert_eq!(p.metadata.generation, Some(3));
            let key = o.key();
            assert_eq!(key.to_string(), "ClusterNetworkPolicy web");
            assert_eq!(key.api_version, CNP_API_VERSION);
            assert!(is_typed(&key));
            m.apply(Event::Upsert(o));
        }
        // The v1beta1 copy replaced the v1alpha2 one: one policy, the last seen, as the
        // Kubernetes datastore's watch would have it.
        let all: Vec<_> = m.cluster_network_policies().collect();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].spec.priority, 6);
        assert_eq!(all[0].api_version.as_deref(), Some(CNP_API_VERSION));

        // Other versions and groups stay untyped; content of the wrong type is an error.
        for api in ["policy.networking.k8s.io/v1", "example.com/v1alpha2"] {
            let mut v = cnp("v1alpha2", 1);
            v["apiVersion"] = json!(api);
            assert!(
                matches!(Object::from_value(v), Ok(Object::Other(..))),
                "{api}"
            );
        }
        let mut bad = cnp("v1beta1", 1);
        bad["spec"]["priority"] = json!("high");
        let err = Object::from_value(bad).unwrap_err();
        assert!(
            matches!(&err, ObjectError::Invalid { key, .. } if key.name == "web"),
            "{err}"
        );
    }

    #[test]
    fn relist_deletes_what_it_no_longer_returns() {
        let pod = |name: &str| {
            Object::from_value(
                json!({"apiVersion":"v1","kind":"Pod","metadata":{"name":name,"namespace":"ns"}}),
            )
            .unwrap()
        };
        let pods = KindKey {
            api_version: "v1".into(),
            kind: "Pod".into(),
        };
        let mut m = Model::default();
        // The first list: nothing held, nothing to delete.
        assert!(!m.apply(Event::ListStart(pods.clone())));
        for p in ["a", "b", "c"] {
            assert!(m.apply(Event::Upsert(pod(p))));
        }
        assert!(!m.apply(Event::ListEnd(pods.clone())));
        assert!(m.apply(Event::Upsert(Object::from_value(node(&[])).unwrap())));
        // A relist returning a (unchanged) and d: b and c are gone, the node stays.
        assert!(!m.apply(Event::ListStart(pods.clone())));
        assert!(!m.apply(Event::Upsert(pod("a"))));
        assert!(m.apply(Event::Upsert(pod("d"))));
        assert!(m.apply(Event::ListEnd(pods)));
        let names: Vec<&str> = m.pods().map(|p| &*p.name).collect();
        assert_eq!(names, ["a", "d"]);
        assert_eq!(m.len(), 3);
        assert!(m.get(&pod("a").key()).is_some() && m.get(&pod("b").key()).is_none());
    }

    #[test]
    fn model_applies_events() {
        let mut m = Model::default();
        let n = Object::from_value(node(&["10.0.0.0/24"])).unwrap();
        assert!(m.apply(Event::Upsert(n.clone())));
        assert!(
            !m.apply(Event::Upsert(n.clone())),
            "same object twice is no change"
        );
        assert!(m.node("n1").is_some());
        assert!(m.apply(Event::Synced));
        assert!(m.synced());
        assert!(m.apply(Event::Delete(n.key())));
        assert!(m.node("n1").is_none());
        assert!(!m.apply(Event::Delete(n.key())));
    }
}
