//! The agent's model of the cluster: the Kubernetes objects a datastore feeds it, as typed
//! k8s-openapi values (pods in a compact form of their own, see `pod`), plus an escape hatch for
//! kinds Sepal does not type (e.g. its own sepal.dev kinds).

pub mod pod;

use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
pub use pod::PodInfo;
use serde_json::Value;
use std::collections::BTreeMap;

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
    Service(Box<Service>),
    Secret(Box<Secret>),
    NetworkPolicy(Box<NetworkPolicy>),
    /// Any other kind (Sepal's own sepal.dev kinds until they get types), kept as it came.
    Other(ObjectKey, Value),
}

/// A change the datastore reports; the model applies them in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Created or changed.
    Upsert(Object),
    Delete(ObjectKey),
    /// The datastore has delivered its initial state; the model is now complete.
    Synced,
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
    let api_version = str_field(value, &["apiVersion"])
        .ok_or_else(|| ObjectError::Shape("missing apiVersion".into()))?;
    let kind =
        str_field(value, &["kind"]).ok_or_else(|| ObjectError::Shape("missing kind".into()))?;
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

/// Whether the kind at this key is one the model types (so its fields are checked on load).
pub fn is_typed(key: &ObjectKey) -> bool {
    matches!(
        (key.api_version.as_str(), key.kind.as_str()),
        ("v1", "Node" | "Namespace" | "Pod" | "Service" | "Secret")
            | ("networking.k8s.io/v1", "NetworkPolicy")
    )
}

impl Object {
    /// Reads a raw object: typed for the kinds Sepal knows, raw otherwise. Namespaced kinds
    /// without a namespace get `default`, as kubectl does.
    pub fn from_value(mut value: Value) -> Result<Object, ObjectError> {
        let mut key = key_of(&value)?;
        let namespaced = matches!(
            key.kind.as_str(),
            "Pod" | "Service" | "Secret" | "NetworkPolicy"
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
                let pod: Box<Pod> = typed(&key, value)?;
                Object::Pod(Box::new(PodInfo::from_pod(&pod).ok_or_else(|| {
                    ObjectError::Shape("Pod without metadata.name".into())
                })?))
            }
            ("v1", "Service") => Object::Service(typed(&key, value)?),
            ("v1", "Secret") => Object::Secret(typed(&key, value)?),
            ("networking.k8s.io/v1", "NetworkPolicy") => Object::NetworkPolicy(typed(&key, value)?),
            _ => Object::Other(key, value),
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
            Object::Service(o) => k("v1", "Service", &o.metadata),
            Object::Secret(o) => k("v1", "Secret", &o.metadata),
            Object::NetworkPolicy(o) => k("networking.k8s.io/v1", "NetworkPolicy", &o.metadata),
            Object::Other(key, _) => key.clone(),
        }
    }
}

/// The cluster as the agent knows it.
#[derive(Debug, Default, Clone)]
pub struct Model {
    objects: BTreeMap<ObjectKey, Object>,
    synced: bool,
    /// Shares pods' label sets and namespace/node names.
    interner: pod::Interner,
}

// Accessors for the policy and routing wiring; not every one has a caller yet.
#[allow(dead_code)]
impl Model {
    /// Applies one event; returns whether the model changed.
    pub fn apply(&mut self, event: Event) -> bool {
        match event {
            Event::Upsert(mut obj) => {
                let key = obj.key();
                if self.objects.get(&key) == Some(&obj) {
                    return false;
                }
                if let Object::Pod(p) = &mut obj {
                    self.interner.intern(p);
                }
                self.objects.insert(key, obj);
                true
            }
            Event::Delete(key) => self.objects.remove(&key).is_some(),
            Event::Synced => !std::mem::replace(&mut self.synced, true),
        }
    }

    pub fn synced(&self) -> bool {
        self.synced
    }

    pub fn get(&self, key: &ObjectKey) -> Option<&Object> {
        self.objects.get(key)
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.objects.values()
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

    pub fn pods(&self) -> impl Iterator<Item = &PodInfo> {
        self.objects.values().filter_map(|o| match o {
            Object::Pod(p) => Some(&**p),
            _ => None,
        })
    }

    pub fn network_policies(&self) -> impl Iterator<Item = &NetworkPolicy> {
        self.objects.values().filter_map(|o| match o {
            Object::NetworkPolicy(p) => Some(&**p),
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
