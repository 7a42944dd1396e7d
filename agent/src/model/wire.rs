//! The shapes the datastores read Pods and EndpointSlices in: only the fields the model keeps,
//! so the rest of each object (managedFields, container specs, statuses, addresses) is skipped
//! while parsing instead of being built and thrown away. At 30,000 pods that is most of the
//! agent's start-up CPU. Fields that are read are still type-checked, as a full parse would.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use serde::{Deserialize, Deserializer};
use std::borrow::Cow;
use std::collections::BTreeMap;

/// The label the EndpointSlice controller puts on a slice, naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Metadata reduced while parsing to identity, labels, the resourceVersion a watch resumes from
/// and whether the object is being deleted. Annotations are not read: nothing in the model of a
/// Pod or an EndpointSlice uses them.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct MetaFields {
    name: Option<String>,
    namespace: Option<String>,
    labels: Option<BTreeMap<String, String>>,
    resource_version: Option<String>,
    deletion_timestamp: Option<Time>,
}

fn lean_meta<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = MetaFields::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        labels: m.labels.filter(|l| !l.is_empty()),
        resource_version: m.resource_version,
        deletion_timestamp: m.deletion_timestamp,
        ..Default::default()
    })
}

/// An object's namespace as the API server defaults it: `default` when unset or empty.
pub fn namespace_of(namespace: Option<&str>) -> std::sync::Arc<str> {
    namespace
        .filter(|n| !n.is_empty())
        .unwrap_or("default")
        .into()
}

/// A Pod as the model reads it (see `PodInfo::from_wire`).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodWire {
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpecWire,
    #[serde(default)]
    pub status: PodStatusWire,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecWire {
    pub node_name: Option<String>,
    pub host_network: Option<bool>,
    #[serde(default)]
    pub containers: Vec<ContainerWire>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ContainerWire {
    #[serde(default)]
    pub ports: Vec<ContainerPortWire>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPortWire {
    pub name: Option<String>,
    pub container_port: i32,
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatusWire {
    pub phase: Option<String>,
    #[serde(rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(rename = "podIPs", default)]
    pub pod_ips: Vec<PodIpWire>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodIpWire {
    pub ip: String,
}

/// An EndpointSlice as the model reads it: whose Service it is (a label) and where its endpoints
/// run, without their addresses, ports, zones or hints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SliceWire {
    #[serde(default, deserialize_with = "lean_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub endpoints: Vec<EndpointWire>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EndpointWire {
    pub node_name: Option<String>,
    pub conditions: Option<ConditionsWire>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ConditionsWire {
    pub ready: Option<bool>,
}

/// Lets the kube watcher list and watch these shapes as it does the full types.
macro_rules! resource {
    ($ty:ty, $group:literal, $version:literal, $kind:literal, $plural:literal) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($group)
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($version)
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

resource!(PodWire, "", "v1", "Pod", "pods");
resource!(
    SliceWire,
    "discovery.k8s.io",
    "v1",
    "EndpointSlice",
    "endpointslices"
);

#[cfg(test)]
mod tests {
    use super::*;
    use kube::Resource;
    use serde_json::json;

    #[test]
    fn skips_what_the_model_does_not_read() {
        let p: PodWire = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "resourceVersion": "7", "uid": "u",
                "labels": {}, "annotations": {"a": "b"}, "managedFields": [{"manager": "m"}]},
            "spec": {"containers": [{"name": "c", "image": "i", "env": [{"name": "X"}]}]},
            "status": {"conditions": [{"type": "Ready"}]}}))
        .unwrap();
        assert_eq!(p.meta().resource_version.as_deref(), Some("7"));
        assert!(p.metadata.labels.is_none() && p.metadata.annotations.is_none());
        assert_eq!(
            <PodWire as Resource>::url_path(&(), Some("ns")),
            "/api/v1/namespaces/ns/pods"
        );
        assert_eq!(
            <SliceWire as Resource>::url_path(&(), None),
            "/apis/discovery.k8s.io/v1/endpointslices"
        );
    }

    #[test]
    fn fields_read_are_type_checked() {
        let bad = json!({"metadata": {"name": "p"},
            "spec": {"containers": [{"ports": [{"containerPort": "80"}]}]}});
        assert!(serde_json::from_value::<PodWire>(bad).is_err());
        assert!(serde_json::from_value::<SliceWire>(json!({"endpoints": {}})).is_err());
    }
}
