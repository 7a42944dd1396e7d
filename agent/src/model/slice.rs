//! The model's EndpointSlice: which Service it serves and the nodes it has a ready endpoint on,
//! all that routing reads (a Service with `externalTrafficPolicy: Local` is advertised only from
//! nodes with a ready endpoint). A slice holds up to 100 endpoints with addresses, ports, zones
//! and hints; kept whole they were a third of the agent's memory in a large cluster.

use super::wire::{SliceWire, SERVICE_NAME_LABEL};
use serde_json::{json, Value};
use std::sync::Arc;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceInfo {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// The `kubernetes.io/service-name` label; a slice without one serves no Service.
    pub service: Option<Arc<str>>,
    /// Nodes with at least one ready endpoint of the slice, sorted, each once. A missing `ready`
    /// condition means ready, as kube-proxy reads it.
    pub ready_nodes: Vec<Arc<str>>,
}

impl SliceInfo {
    /// `None` without a name; namespaced `default` when unset, as the API server does.
    pub fn from_wire(slice: SliceWire) -> Option<SliceInfo> {
        let meta = slice.metadata;
        let name = meta.name.filter(|n| !n.is_empty())?;
        let mut ready_nodes: Vec<Arc<str>> = slice
            .endpoints
            .iter()
            .filter(|e| e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true))
            .filter_map(|e| e.node_name.as_deref())
            .map(Arc::from)
            .collect();
        ready_nodes.sort();
        ready_nodes.dedup();
        Some(SliceInfo {
            namespace: super::wire::namespace_of(meta.namespace.as_deref()),
            name: name.into(),
            service: meta
                .labels
                .and_then(|mut l| l.remove(SERVICE_NAME_LABEL))
                .map(Arc::from),
            ready_nodes,
        })
    }

    /// Whether the slice has a ready endpoint on `node`.
    pub fn ready_on(&self, node: &str) -> bool {
        self.ready_nodes
            .binary_search_by(|n| (**n).cmp(node))
            .is_ok()
    }

    /// The slice as a (reduced) EndpointSlice object, for `sepal datastore`; reading it back with
    /// `Object::from_value` gives the same `SliceInfo`.
    pub fn to_value(&self) -> Value {
        let mut meta = json!({"name": &*self.name, "namespace": &*self.namespace});
        if let Some(s) = &self.service {
            meta["labels"] = json!({SERVICE_NAME_LABEL: &**s});
        }
        let endpoints: Vec<Value> = self
            .ready_nodes
            .iter()
            .map(|n| json!({"nodeName": &**n, "conditions": {"ready": true}}))
            .collect();
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "metadata": meta,
               "endpoints": endpoints})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slice(v: Value) -> SliceInfo {
        SliceInfo::from_wire(serde_json::from_value(v).unwrap()).unwrap()
    }

    #[test]
    fn keeps_the_service_and_the_nodes_with_ready_endpoints() {
        let s = slice(json!({"metadata": {"name": "s-1", "namespace": "web",
                "labels": {"kubernetes.io/service-name": "s", "endpointslice.kubernetes.io/managed-by": "x"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.244.1.5"], "nodeName": "b", "conditions": {"ready": true}},
                {"addresses": ["10.244.1.6"], "nodeName": "b"},
                {"addresses": ["10.244.2.5"], "nodeName": "c", "conditions": {"ready": false}},
                {"addresses": ["10.244.3.5"], "nodeName": "a", "conditions": {}},
                {"addresses": ["10.244.4.5"]}],
            "ports": [{"port": 80}]}));
        assert_eq!(s.service.as_deref(), Some("s"));
        let nodes: Vec<&str> = s.ready_nodes.iter().map(|n| &**n).collect();
        assert_eq!(nodes, ["a", "b"]);
        assert!(s.ready_on("a") && s.ready_on("b") && !s.ready_on("c"));
        assert_eq!(slice(s.to_value()), s);
        let bare = slice(json!({"metadata": {"name": "x"}}));
        assert_eq!((&*bare.namespace, bare.service.clone()), ("default", None));
        assert!(SliceInfo::from_wire(SliceWire::default()).is_none());
    }
}
