//! The protocol between `sepal-cni` and the `sepal node` agent over its Unix socket.
//!
//! One JSON request per connection, one JSON response back, then the connection closes.
//! Framing: the plugin writes the request as one line of JSON ending in `\n` and then shuts
//! down its write half; the agent answers with one line of JSON (ending in `\n`) and closes.
//! The plugin does the namespace plumbing (veth pair, pod-side addresses and routes); the agent
//! owns IPAM and everything on the host side that outlives one CNI call (host routes, policy).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::net::IpAddr;

/// Default path of the agent's socket.
pub const DEFAULT_SOCKET: &str = "/run/sepal/sepal.sock";

/// Prefix of every host-side veth Sepal creates; the agent treats links with this prefix as its own.
pub const HOST_VETH_PREFIX: &str = "sep";

/// MAC address of every host-side veth: the pod's gateway (169.254.1.1) resolves to it by proxy ARP.
pub const HOST_VETH_MAC: [u8; 6] = [0xee; 6];

/// The pod's IPv4 gateway: a link-local address the host answers for with proxy ARP.
pub const POD_GATEWAY_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 1, 1);

/// Host-side veth name for a pod: `sep` + 11 hex chars of SHA-256("namespace/name"), 14 chars,
/// stable across restarts so the agent can find a pod's link from its name alone.
pub fn host_veth_name(pod_namespace: &str, pod_name: &str) -> String {
    let digest = Sha256::digest(format!("{pod_namespace}/{pod_name}").as_bytes());
    let mut name = String::from(HOST_VETH_PREFIX);
    name.push_str(&hex::encode(digest)[..11]);
    name
}

/// Prefix of a retired host veth. `sep` + 11 hex chars never starts with `sepx`, so a tombstone
/// cannot collide with a live veth.
pub const TOMBSTONE_PREFIX: &str = "sepx";

/// The name DEL gives a pod's host veth when it takes it out of service: `sepx` + the same 11 hex
/// chars (15 chars). Unregistering a device blocks its caller for tens of milliseconds of RCU
/// waits, so DEL does not delete the pair: it sets the host side down (the pod loses carrier at
/// once) and renames it to this name. The pair dies with the pod's network namespace, which the
/// runtime removes right after DEL; the agent deletes tombstones in the background (links named
/// `TOMBSTONE_PREFIX*`, e.g. after answering a Del and at start) for runtimes that keep the netns.
pub fn tombstone_name(host_veth: &str) -> String {
    let suffix = host_veth
        .strip_prefix(HOST_VETH_PREFIX)
        .unwrap_or(host_veth);
    let mut name = String::from(TOMBSTONE_PREFIX);
    name.push_str(suffix);
    name.truncate(15);
    name
}

/// Identity of one attachment: the CNI spec keys everything by container ID + interface name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct AttachmentKey {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Allocate (or return the existing) addresses for an attachment and program the host side
    /// for the already-created host veth. Idempotent per `key`.
    Add(AddRequest),
    /// Release the attachment's addresses and host state. Succeeds if nothing is known. The
    /// plugin has already retired the host veth (see `tombstone_name`), so its routes may be gone.
    Del(DelRequest),
    /// Verify the agent's record and host state for an attachment.
    Check(CheckRequest),
    /// Is the agent ready to serve ADDs (node known, with a pod block)?
    Status,
    /// Release every attachment not in `valid` and remove host-side leftovers.
    Gc(GcRequest),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddRequest {
    pub key: AttachmentKey,
    /// Path of the pod's network namespace, as given in CNI_NETNS.
    pub netns: String,
    /// From CNI_ARGS K8S_POD_NAMESPACE/K8S_POD_NAME. A runtime that passes no pod identity
    /// gets an empty namespace and the container ID as name (the veth is named from these).
    pub pod_namespace: String,
    pub pod_name: String,
    pub host_veth: String,
    /// The runtime's `portMappings` (capability `portMappings`): the pod's hostPorts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_mappings: Vec<PortMapping>,
}

/// One port mapping as the CNI conventions define the `portMappings` capability: connections to
/// `host_port` on the node go to `container_port` on the pod. `host_ip` narrows it to one of the
/// node's addresses; absent, or the unspecified address of a family, means every node address
/// (of that family).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortMapping {
    pub protocol: Protocol,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub container_port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    /// The name nft and the CNI conventions use.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }
}

impl PortMapping {
    /// Whether the mapping reaches the pod's address `pod_ip`: a mapping on one family's host
    /// address only forwards to the pod's address of that family.
    pub fn applies_to(&self, pod_ip: IpAddr) -> bool {
        self.host_ip.is_none_or(|h| h.is_ipv4() == pod_ip.is_ipv4())
    }

    /// Whether connections from the node to 127.0.0.1 reach it (needs route_localnet on the
    /// host veth, since the reply comes back with a loopback source).
    pub fn reaches_localhost(&self) -> bool {
        match self.host_ip {
            None => true,
            Some(IpAddr::V4(a)) => a.is_unspecified() || a.is_loopback(),
            Some(IpAddr::V6(_)) => false,
        }
    }

    /// Two mappings claim the same node socket: same protocol and port on overlapping
    /// addresses (a wildcard overlaps every address of its family, or of both when absent).
    pub fn overlaps(&self, other: &PortMapping) -> bool {
        if self.protocol != other.protocol || self.host_port != other.host_port {
            return false;
        }
        match (self.host_ip, other.host_ip) {
            (None, _) | (_, None) => true,
            (Some(a), Some(b)) => {
                a == b || (a.is_ipv4() == b.is_ipv4() && (a.is_unspecified() || b.is_unspecified()))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelRequest {
    pub key: AttachmentKey,
    /// Pod identity when the runtime passed it (CNI_ARGS); lets the agent find the veth.
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRequest {
    pub key: AttachmentKey,
    pub host_veth: String,
    /// Addresses the runtime's prevResult says the attachment has.
    pub ips: Vec<IpAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcRequest {
    pub valid: Vec<AttachmentKey>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Added(AddReply),
    Ok,
    /// GC outcome: how many attachments were released.
    Collected {
        released: usize,
    },
    Error(ErrorReply),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AddReply {
    /// One address per family the node has a block for (IPv4 first).
    pub ips: Vec<IpAddr>,
    /// MTU for the pod's interface: the node's default-route interface MTU, unless configured.
    pub mtu: u32,
}

/// An error the plugin passes on to the runtime with the given CNI error code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

/// Sepal-specific CNI error codes (the spec reserves 100+ for plugins).
pub mod codes {
    /// Spec: incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Spec: unsupported field in network configuration.
    pub const UNSUPPORTED_FIELD: u32 = 2;
    /// Spec: container unknown or does not exist.
    pub const CONTAINER_UNKNOWN: u32 = 3;
    /// Spec: invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// Spec: I/O failure.
    pub const IO_FAILURE: u32 = 5;
    /// Spec: failed to decode content.
    pub const DECODE_FAILURE: u32 = 6;
    /// Spec: invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Spec: try again later (the agent is unreachable).
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// Spec (STATUS): the plugin is not available to serve ADDs.
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// The node's pod blocks have no free address.
    pub const IPAM_EXHAUSTED: u32 = 100;
    /// The node has no pod block yet (its Node object has no spec.podCIDRs).
    pub const NO_POD_BLOCK: u32 = 101;
    /// The agent failed to program the host side (routes, policy).
    pub const DATAPLANE_FAILURE: u32 = 102;
    /// CHECK found the attachment differs from what Sepal recorded.
    pub const CHECK_FAILED: u32 = 103;
    /// A port mapping claims a node port another pod on this node already holds.
    pub const PORT_CONFLICT: u32 = 104;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn veth_names_are_stable_and_short() {
        let a = host_veth_name("default", "web-0");
        assert_eq!(a, host_veth_name("default", "web-0"));
        assert_ne!(a, host_veth_name("default", "web-1"));
        assert_eq!(a.len(), 14);
        assert!(a.starts_with("sep"));
        let t = tombstone_name(&a);
        assert_eq!(t.len(), 15);
        assert!(t.starts_with(TOMBSTONE_PREFIX));
        assert_eq!(&t[4..], &a[3..]);
        assert!(!a.starts_with(TOMBSTONE_PREFIX));
    }

    fn mapping(protocol: Protocol, host_ip: Option<&str>, port: u16) -> PortMapping {
        PortMapping {
            protocol,
            host_ip: host_ip.map(|h| h.parse().unwrap()),
            host_port: port,
            container_port: 8080,
        }
    }

    #[test]
    fn port_mappings_overlap_on_the_same_socket_only() {
        use Protocol::*;
        let any = mapping(Tcp, None, 80);
        assert!(any.overlaps(&mapping(Tcp, Some("10.0.0.1"), 80)));
        assert!(any.overlaps(&mapping(Tcp, Some("fd00::1"), 80)));
        assert!(!any.overlaps(&mapping(Udp, None, 80)));
        assert!(!any.overlaps(&mapping(Tcp, None, 81)));
        let local = mapping(Tcp, Some("127.0.0.1"), 80);
        assert!(!local.overlaps(&mapping(Tcp, Some("10.0.0.1"), 80)));
        assert!(local.overlaps(&mapping(Tcp, Some("0.0.0.0"), 80)));
        assert!(!mapping(Tcp, Some("::"), 80).overlaps(&local));
        assert!(local.reaches_localhost() && any.reaches_localhost());
        assert!(!mapping(Tcp, Some("10.0.0.1"), 80).reaches_localhost());
        assert!(!mapping(Tcp, Some("10.0.0.1"), 80).applies_to("fd00::5".parse().unwrap()));
        assert!(any.applies_to("fd00::5".parse().unwrap()));
    }

    #[test]
    fn requests_round_trip_as_json() {
        let req = Request::Gc(GcRequest {
            valid: vec![AttachmentKey {
                container_id: "c1".into(),
                ifname: "eth0".into(),
            }],
        });
        let text = serde_json::to_string(&req).unwrap();
        assert!(text.contains("\"op\":\"gc\""));
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), req);
    }
}
