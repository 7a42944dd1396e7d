// What routing reads from the cluster, reduced to the facts it plans with: nodes (addresses, AS,
// route-reflector role, pod blocks), services (IPs to advertise, local endpoints) and secrets.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Node, Secret, Service};

use crate::crd::SecretKeyRef;
use crate::model::SliceInfo;

/// Node annotation overriding the node's AS number.
pub const ANN_AS_NUMBER: &str = "sepal.dev/as-number";
/// Node annotation with the node's BGP addresses (comma-separated, v4 and/or v6, optionally with
/// a prefix length like `10.0.0.5/24`); overrides the InternalIP addresses.
pub const ANN_BGP_ADDRESS: &str = "sepal.dev/bgp-address";
/// Node annotation that makes the node a route reflector with this cluster ID.
pub const ANN_RR_CLUSTER_ID: &str = "sepal.dev/route-reflector-cluster-id";

/// One node as routing sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Addresses BGP sessions use, at most one per family, IPv4 first.
    pub addresses: Vec<IpAddr>,
    /// AS number from the annotation; None: the cluster's.
    pub as_number: Option<u32>,
    /// Set when the node is a route reflector.
    pub rr_cluster_id: Option<Ipv4Addr>,
    /// The node's pod blocks (spec.podCIDRs).
    pub pod_cidrs: Vec<IpNet>,
}

/// Converts ipnetwork's type (used by the CRD and model code) to the speaker's.
pub fn to_ipnet(n: ipnetwork::IpNetwork) -> IpNet {
    // Prefix lengths of a parsed IpNetwork are always valid for its family.
    IpNet::new(n.network(), n.prefix()).unwrap_or_else(|_| IpNet::from(n.network()))
}

/// And back, for felix's route table.
pub fn to_ipnetwork(n: IpNet) -> ipnetwork::IpNetwork {
    ipnetwork::IpNetwork::new(n.network(), n.prefix_len())
        .unwrap_or_else(|_| ipnetwork::IpNetwork::from(n.network()))
}

fn parse_addr(s: &str) -> Option<IpAddr> {
    let s = s.trim();
    let addr = s.split_once('/').map_or(s, |(a, _)| a);
    addr.parse().ok()
}

/// One address per family, IPv4 first, in the order given.
fn one_per_family(addrs: impl IntoIterator<Item = IpAddr>) -> Vec<IpAddr> {
    let mut v4 = None;
    let mut v6 = None;
    for a in addrs {
        match a {
            IpAddr::V4(_) if v4.is_none() => v4 = Some(a),
            IpAddr::V6(_) if v6.is_none() => v6 = Some(a),
            _ => {}
        }
    }
    v4.into_iter().chain(v6).collect()
}

impl NodeInfo {
    /// Reads a Node; annotations that do not parse are errors naming the annotation.
    pub fn from_node(node: &Node) -> Result<NodeInfo, String> {
        let name = node.metadata.name.clone().unwrap_or_default();
        if name.is_empty() {
            return Err("Node without metadata.name".into());
        }
        let ann = node.metadata.annotations.clone().unwrap_or_default();
        let addresses = match ann.get(ANN_BGP_ADDRESS) {
            Some(v) => {
                let mut out = Vec::new();
                for part in v.split(',').filter(|p| !p.trim().is_empty()) {
                    out.push(parse_addr(part).ok_or_else(|| {
                        format!("Node {name}: annotation {ANN_BGP_ADDRESS}: {part:?} is not an IP address")
                    })?);
                }
                one_per_family(out)
            }
            None => one_per_family(
                node.status
                    .iter()
                    .flat_map(|s| s.addresses.iter().flatten())
                    .filter(|a| a.type_ == "InternalIP")
                    .filter_map(|a| parse_addr(&a.address)),
            ),
        };
        let as_number = ann
            .get(ANN_AS_NUMBER)
            .map(|v| match v.trim().parse::<u32>() {
                Ok(n) if n > 0 => Ok(n),
                _ => Err(format!(
                    "Node {name}: annotation {ANN_AS_NUMBER}: {v:?} is not an AS number (1..4294967295)"
                )),
            })
            .transpose()?;
        let rr_cluster_id = ann
            .get(ANN_RR_CLUSTER_ID)
            .map(|v| {
                v.trim().parse::<Ipv4Addr>().map_err(|_| {
                    format!("Node {name}: annotation {ANN_RR_CLUSTER_ID}: {v:?} is not a cluster ID like 244.0.0.1")
                })
            })
            .transpose()?;
        let pod_cidrs = crate::routing::pod_cidrs(node)
            .map_err(|e| format!("Node {name}: {e}"))?
            .into_iter()
            .map(to_ipnet)
            .collect();
        Ok(NodeInfo {
            name,
            labels: node.metadata.labels.clone().unwrap_or_default(),
            addresses,
            as_number,
            rr_cluster_id,
            pod_cidrs,
        })
    }
}

/// One Service's advertisable addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceInfo {
    pub namespace: String,
    pub name: String,
    pub external_ips: Vec<IpAddr>,
    pub load_balancer_ips: Vec<IpAddr>,
    /// `externalTrafficPolicy: Local`.
    pub local_only: bool,
    /// A ready endpoint of the service runs on this node.
    pub local_endpoint_ready: bool,
}

impl ServiceInfo {
    /// Reads a Service; `ready_local` is the set of (namespace, name) with a ready endpoint here.
    /// Addresses that do not parse are skipped: the API server validates them, and one bad
    /// Service must not stop the others from being advertised.
    pub fn from_service(svc: &Service, ready_local: &BTreeSet<(String, String)>) -> ServiceInfo {
        let namespace = svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = svc.metadata.name.clone().unwrap_or_default();
        let spec = svc.spec.clone().unwrap_or_default();
        let external_ips = spec
            .external_ips
            .iter()
            .flatten()
            .filter_map(|s| parse_addr(s))
            .collect();
        let load_balancer_ips = svc
            .status
            .iter()
            .flat_map(|s| s.load_balancer.iter())
            .flat_map(|lb| lb.ingress.iter().flatten())
            .filter_map(|i| i.ip.as_deref().and_then(parse_addr))
            .collect();
        let key = (namespace.clone(), name.clone());
        ServiceInfo {
            local_only: spec.external_traffic_policy.as_deref() == Some("Local"),
            local_endpoint_ready: ready_local.contains(&key),
            namespace,
            name,
            external_ips,
            load_balancer_ips,
        }
    }
}

/// The services (namespace, name) with at least one ready endpoint on `node`, from EndpointSlices.
pub fn ready_local_services<'a>(
    slices: impl IntoIterator<Item = &'a SliceInfo>,
    node: &str,
) -> BTreeSet<(String, String)> {
    slices
        .into_iter()
        .filter(|s| s.ready_on(node))
        .filter_map(|s| Some((s.namespace.to_string(), s.service.as_deref()?.to_string())))
        .collect()
}

/// Looks up a BGP password in the Secrets; errors say which Secret or key is missing.
pub fn resolve_password<'a>(
    r: &SecretKeyRef,
    secrets: impl IntoIterator<Item = &'a Secret>,
) -> Result<String, String> {
    let ns = r.namespace();
    let secret = secrets
        .into_iter()
        .find(|s| {
            s.metadata.name.as_deref() == Some(r.name.as_str())
                && s.metadata.namespace.as_deref().unwrap_or("default") == ns
        })
        .ok_or_else(|| format!("Secret {ns}/{} not found", r.name))?;
    if let Some(v) = secret.data.as_ref().and_then(|d| d.get(&r.key)) {
        return String::from_utf8(v.0.clone())
            .map_err(|_| format!("Secret {ns}/{} key {}: not UTF-8 text", r.name, r.key));
    }
    if let Some(v) = secret.string_data.as_ref().and_then(|d| d.get(&r.key)) {
        return Ok(v.clone());
    }
    Err(format!("Secret {ns}/{} has no key {}", r.name, r.key))
}

/// Gathers routing's inputs from the agent's model. Objects that do not parse are left out and
/// reported (one bad Node or BGPPeer must not stop routing for the rest).
pub fn from_model(
    model: &crate::model::Model,
    local: &str,
) -> (crate::routing::plan::Inputs, Vec<String>) {
    use crate::crd::{SepalObject, DEFAULT_CONFIG_NAME};
    use crate::model::Object;
    let mut errors = Vec::new();
    let mut inp = crate::routing::plan::Inputs {
        local: local.to_string(),
        ..Default::default()
    };
    let mut slices = Vec::new();
    let mut services = Vec::new();
    let mut secrets = Vec::new();
    for obj in model.objects() {
        match obj {
            Object::Node(n) => match NodeInfo::from_node(n) {
                Ok(i) => inp.nodes.push(i),
                Err(e) => errors.push(e),
            },
            Object::Service(s) => services.push(&**s),
            Object::Secret(s) => secrets.push(&**s),
            Object::EndpointSlice(s) => slices.push(&**s),
            Object::Other(key, value) if crate::crd::is_sepal_kind(&key.api_version, &key.kind) => {
                match SepalObject::from_json(value) {
                    Ok(SepalObject::BgpConfiguration(c)) if key.name == DEFAULT_CONFIG_NAME => {
                        match c.spec.validate() {
                            Ok(v) => inp.config = v,
                            Err(e) => errors.push(format!("{key}: {e}")),
                        }
                    }
                    Ok(SepalObject::BgpPeer(p)) => match p.spec.validate(&key.name) {
                        Ok(v) => inp.peers.push(v),
                        Err(e) => errors.push(format!("{key}: {e}")),
                    },
                    Ok(_) => {}
                    Err(e) => errors.push(format!("{key}: {e}")),
                }
            }
            _ => {}
        }
    }
    let ready = ready_local_services(slices, local);
    inp.services = services
        .iter()
        .map(|s| ServiceInfo::from_service(s, &ready))
        .collect();
    for p in &inp.peers {
        if let Some(r) = &p.password {
            inp.passwords
                .insert(r.clone(), resolve_password(r, secrets.iter().copied()));
        }
    }
    (inp, errors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(v: serde_json::Value) -> Node {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn node_addresses_and_annotations() {
        let n = node(json!({"metadata":{"name":"a","annotations":{
            "sepal.dev/as-number":"65001","sepal.dev/route-reflector-cluster-id":"244.0.0.1"}},
            "spec":{"podCIDRs":["10.244.1.0/24","fd00:1::/64"]},
            "status":{"addresses":[{"type":"Hostname","address":"a"},
                {"type":"InternalIP","address":"fd10::1"},{"type":"InternalIP","address":"192.168.1.1"},
                {"type":"InternalIP","address":"192.168.1.9"}]}}));
        let i = NodeInfo::from_node(&n).unwrap();
        assert_eq!(
            i.addresses,
            vec![
                "192.168.1.1".parse::<IpAddr>().unwrap(),
                "fd10::1".parse().unwrap()
            ]
        );
        assert_eq!(i.as_number, Some(65001));
        assert_eq!(i.rr_cluster_id, Some(Ipv4Addr::new(244, 0, 0, 1)));
        assert_eq!(i.pod_cidrs.len(), 2);
        let n = node(
            json!({"metadata":{"name":"a","annotations":{"sepal.dev/bgp-address":"10.0.0.5/24, fd00::5/64"}},
            "status":{"addresses":[{"type":"InternalIP","address":"192.168.1.1"}]}}),
        );
        let i = NodeInfo::from_node(&n).unwrap();
        assert_eq!(
            i.addresses,
            vec![
                "10.0.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
    }

    #[test]
    fn bad_annotations_are_errors() {
        for (k, v) in [
            (ANN_AS_NUMBER, "x"),
            (ANN_AS_NUMBER, "0"),
            (ANN_BGP_ADDRESS, "10.0.0"),
            (ANN_RR_CLUSTER_ID, "fd00::1"),
        ] {
            let n = node(json!({"metadata":{"name":"a","annotations":{k: v}}}));
            let e = NodeInfo::from_node(&n).unwrap_err();
            assert!(e.contains(k), "{e}");
        }
    }

    #[test]
    fn services_and_local_endpoints() {
        let slice = SliceInfo::from_wire(serde_json::from_value(json!({"metadata":{"name":"s-1","namespace":"web",
            "labels":{"kubernetes.io/service-name":"s"}},"addressType":"IPv4",
            "endpoints":[{"addresses":["10.244.1.5"],"nodeName":"a","conditions":{"ready":true}},
                         {"addresses":["10.244.2.5"],"nodeName":"b","conditions":{"ready":false}}]}))
        .unwrap())
        .unwrap();
        assert_eq!(ready_local_services([&slice], "a").len(), 1);
        assert!(ready_local_services([&slice], "b").is_empty());
        let svc: Service =
            serde_json::from_value(json!({"metadata":{"name":"s","namespace":"web"},
            "spec":{"externalIPs":["203.0.113.5"],"externalTrafficPolicy":"Local"},
            "status":{"loadBalancer":{"ingress":[{"ip":"198.51.100.7"},{"hostname":"x"}]}}}))
            .unwrap();
        let i = ServiceInfo::from_service(&svc, &ready_local_services([&slice], "a"));
        assert!(i.local_only && i.local_endpoint_ready);
        assert_eq!(i.external_ips.len(), 1);
        assert_eq!(i.load_balancer_ips.len(), 1);
    }

    #[test]
    fn passwords_from_secrets() {
        let s: Secret =
            serde_json::from_value(json!({"metadata":{"name":"bgp","namespace":"sepal-system"},
            "data":{"pw":"c2VjcmV0"},"stringData":{"other":"plain"}}))
            .unwrap();
        let r = |key: &str| SecretKeyRef {
            name: "bgp".into(),
            namespace: None,
            key: key.into(),
        };
        assert_eq!(resolve_password(&r("pw"), [&s]).unwrap(), "secret");
        assert_eq!(resolve_password(&r("other"), [&s]).unwrap(), "plain");
        assert!(resolve_password(&r("nope"), [&s])
            .unwrap_err()
            .contains("no key"));
        let mut missing = r("pw");
        missing.namespace = Some("kube-system".into());
        assert!(resolve_password(&missing, [&s])
            .unwrap_err()
            .contains("not found"));
    }
}
