//! Pods' hostPorts on this node: the port mappings IPAM keeps with each allocation, checked for
//! conflicts at ADD and turned into felix's DNAT rules (`sepal_felix::hostport`).

use crate::ipam::Allocation;
use sepal_cni::api::{AttachmentKey, PortMapping};
use sepal_felix::hostport::HostPort;

/// The rules for every allocation's mappings: one per mapping and pod address of its family.
pub fn rules(allocations: &[Allocation]) -> Vec<HostPort> {
    let mut out = Vec::new();
    for a in allocations {
        for m in &a.port_mappings {
            for ip in a.ips.iter().filter(|ip| m.applies_to(**ip)) {
                out.push(HostPort {
                    protocol: m.protocol.as_str(),
                    host_ip: m.host_ip,
                    host_port: m.host_port,
                    pod_ip: *ip,
                    container_port: m.container_port,
                    owner: format!("{}/{}", a.pod_namespace, a.pod_name),
                });
            }
        }
    }
    out
}

/// A node socket two mappings both claim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conflict {
    pub wanted: PortMapping,
    /// `namespace/name` of the pod already holding it (or this pod, for two of its own).
    pub holder: String,
    pub held: PortMapping,
}

impl std::fmt::Display for Conflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let at = |m: &PortMapping| match m.host_ip {
            Some(ip) => format!("{} {ip} port {}", m.protocol.as_str(), m.host_port),
            None => format!(
                "{} port {} on every node address",
                m.protocol.as_str(),
                m.host_port
            ),
        };
        write!(
            f,
            "hostPort {} conflicts with pod {}'s {}",
            at(&self.wanted),
            self.holder,
            at(&self.held)
        )
    }
}

/// The first of `wanted` (for attachment `key`, pod `owner`) that overlaps a mapping of another
/// attachment, or another of its own with a different target. Kubernetes' scheduler keeps
/// hostPorts apart on a node; this catches runtimes and races that do not, so one node socket
/// never silently maps to two pods.
pub fn conflict(
    allocations: &[Allocation],
    key: &AttachmentKey,
    host_veth: &str,
    owner: &str,
    wanted: &[PortMapping],
) -> Option<Conflict> {
    for (i, w) in wanted.iter().enumerate() {
        for other in &wanted[..i] {
            if w.overlaps(other) && w.container_port != other.container_port {
                return Some(Conflict {
                    wanted: w.clone(),
                    holder: owner.to_string(),
                    held: other.clone(),
                });
            }
        }
        // The attachment itself, and those it supersedes (same host veth), hold nothing.
        for a in allocations
            .iter()
            .filter(|a| &a.key != key && a.host_veth != host_veth)
        {
            if let Some(held) = a.port_mappings.iter().find(|h| w.overlaps(h)) {
                return Some(Conflict {
                    wanted: w.clone(),
                    holder: format!("{}/{}", a.pod_namespace, a.pod_name),
                    held: held.clone(),
                });
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(id: &str, ips: &[&str], mappings: Vec<PortMapping>) -> Allocation {
        Allocation {
            key: AttachmentKey {
                container_id: id.into(),
                ifname: "eth0".into(),
            },
            ips: ips.iter().map(|ip| ip.parse().unwrap()).collect(),
            pod_namespace: "ns".into(),
            pod_name: id.into(),
            host_veth: format!("sep{id}"),
            port_mappings: mappings,
        }
    }

    /// One mapping on port 8080 of the pod, parsed as the plugin parses the runtime's.
    fn m(protocol: &str, host_ip: Option<&str>, port: u16) -> PortMapping {
        let rc = serde_json::json!({"portMappings": [
            {"hostPort": port, "containerPort": 8080, "protocol": protocol, "hostIP": host_ip}
        ]});
        sepal_cni::port_mappings::parse(Some(&rc))
            .unwrap()
            .remove(0)
    }

    #[test]
    fn a_mapping_targets_the_pod_address_of_its_family() {
        let a = alloc(
            "a",
            &["10.1.0.2", "fd00::2"],
            vec![
                m("tcp", None, 80),
                m("tcp", Some("10.0.0.5"), 81),
                m("udp", Some("fd00::10"), 82),
            ],
        );
        let got: Vec<(u16, String)> = rules(&[a])
            .into_iter()
            .map(|r| (r.host_port, r.pod_ip.to_string()))
            .collect();
        assert_eq!(
            got,
            [
                (80, "10.1.0.2".to_string()),
                (80, "fd00::2".into()),
                (81, "10.1.0.2".into()),
                (82, "fd00::2".into())
            ]
        );
    }

    #[test]
    fn the_upstream_trio_does_not_conflict_but_a_wildcard_does() {
        // The Conformance test's three pods: one port, two host addresses, two protocols.
        let held = [
            alloc(
                "p1",
                &["10.1.0.2"],
                vec![m("tcp", Some("127.0.0.1"), 54323)],
            ),
            alloc("p2", &["10.1.0.3"], vec![m("tcp", Some("10.0.1.2"), 54323)]),
        ];
        let key = alloc("p3", &[], vec![]).key;
        assert_eq!(
            conflict(
                &held,
                &key,
                "sepp3",
                "ns/p3",
                &[m("udp", Some("10.0.1.2"), 54323)]
            ),
            None
        );
        let c = conflict(&held, &key, "sepp3", "ns/p3", &[m("tcp", None, 54323)]).unwrap();
        assert_eq!(c.holder, "ns/p1");
        assert!(c.to_string().contains("127.0.0.1"), "{c}");
        // An ADD again for the same attachment does not conflict with itself.
        assert_eq!(
            conflict(
                &held,
                &held[0].key,
                "sepp1",
                "ns/p1",
                &held[0].port_mappings
            ),
            None
        );
        // Nor does a new sandbox of p1 (same host veth) with the mappings of the one it replaces.
        let next = alloc("p1-again", &[], vec![]).key;
        assert_eq!(
            conflict(&held, &next, "sepp1", "ns/p1", &held[0].port_mappings),
            None
        );
    }
}
