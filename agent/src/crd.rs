// Sepal's custom resource kinds (sepal.dev/v1alpha1): the Rust types, the CRD YAML generated from
// them into deploy/crds/, and the typed conversion from raw JSON objects (used by both datastores).
#![allow(dead_code)] // the validated forms are consumed by the routing and status code

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use ipnetwork::IpNetwork;
use kube::{CustomResource, CustomResourceExt, Resource};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group and version of every Sepal kind.
pub const GROUP: &str = "sepal.dev";
pub const VERSION: &str = "v1alpha1";
pub const API_VERSION: &str = "sepal.dev/v1alpha1";

/// The only BGPConfiguration the agent reads: the cluster default.
pub const DEFAULT_CONFIG_NAME: &str = "default";

/// What went wrong turning a raw object or a field into Sepal's types.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    #[error("object has apiVersion {found:?}, expected {API_VERSION:?}")]
    ApiVersion { found: String },
    #[error(
        "object has kind {found:?}, expected one of BGPConfiguration, BGPPeer, SepalNodeStatus"
    )]
    Kind { found: String },
    #[error("{kind} {name:?}: {source}")]
    Decode {
        kind: &'static str,
        name: String,
        source: serde_json::Error,
    },
    #[error("{field}: {value:?} is not {what}")]
    Field {
        field: String,
        value: String,
        what: &'static str,
    },
}

fn field_err(field: impl Into<String>, value: impl Into<String>, what: &'static str) -> CrdError {
    CrdError::Field {
        field: field.into(),
        value: value.into(),
        what,
    }
}

// ---------------------------------------------------------------------------------------------
// BGPConfiguration

fn default_as_number() -> u32 {
    64512
}
fn default_true() -> bool {
    true
}
fn default_listen_port() -> u16 {
    179
}
fn default_graceful_restart_time() -> String {
    "120s".to_string()
}

/// Cluster-wide BGP settings; the agent reads the object named `default`.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sepal.dev",
    version = "v1alpha1",
    kind = "BGPConfiguration",
    plural = "bgpconfigurations",
    derive = "PartialEq",
    singular = "bgpconfiguration",
    shortname = "bgpconfig",
    doc = "Cluster-wide BGP settings of Sepal (the object named `default` is used)"
)]
#[kube(printcolumn = r#"{"name":"AS","type":"integer","jsonPath":".spec.asNumber"}"#)]
#[kube(printcolumn = r#"{"name":"Mesh","type":"boolean","jsonPath":".spec.nodeToNodeMesh"}"#)]
#[serde(rename_all = "camelCase")]
pub struct BGPConfigurationSpec {
    /// AS number of every node without a `sepal.dev/as-number` annotation.
    #[serde(default = "default_as_number")]
    #[schemars(range(min = 1))]
    pub as_number: u32,
    /// Whether every node peers with every other node over iBGP.
    #[serde(default = "default_true")]
    pub node_to_node_mesh: bool,
    /// TCP port the node's BGP speaker listens on.
    #[serde(default = "default_listen_port")]
    #[schemars(range(min = 1))]
    pub listen_port: u16,
    /// Keepalive interval as a duration ("20s"); by default a third of the hold time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub keepalive_time: Option<String>,
    /// Hold time as a duration ("90s"; "0s" disables keepalives).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub hold_time: Option<String>,
    /// How long peers keep this node's routes while its agent restarts; 0s turns graceful restart
    /// off (the capability is not offered).
    #[serde(default = "default_graceful_restart_time")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub graceful_restart_time: String,
    /// Service ClusterIP ranges advertised from every node.
    #[serde(
        default,
        rename = "serviceClusterIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_cluster_ips: Vec<CidrEntry>,
    /// Service ExternalIP ranges advertised (per externalTrafficPolicy).
    #[serde(
        default,
        rename = "serviceExternalIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_external_ips: Vec<CidrEntry>,
    /// LoadBalancer ingress IP ranges advertised (per externalTrafficPolicy).
    #[serde(
        default,
        rename = "serviceLoadBalancerIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_load_balancer_ips: Vec<CidrEntry>,
    /// BGP communities attached to advertised prefixes inside a CIDR.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<PrefixCommunities>,
    /// BFD on the node mesh's sessions (and automatic route reflection's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<BfdSpec>,
}

/// BFD (RFC 5880, single hop) for a BGP session: when it goes down, so does the session, and
/// its routes leave the kernel at once.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BfdSpec {
    pub enabled: bool,
    /// The fastest the peer may send at, as a duration; default 300ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub min_rx_interval: Option<String>,
    /// The fastest this node sends at, as a duration; default 300ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub min_tx_interval: Option<String>,
    /// Packets missed in a row before the session is declared down; default 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 255))]
    pub multiplier: Option<u8>,
}

/// Shortest BFD interval accepted: below it a busy node would flap sessions.
const BFD_MIN_INTERVAL: Duration = Duration::from_millis(10);

impl BfdSpec {
    /// The session timers, or None when BFD is off.
    pub fn validate(&self, field: &str) -> Result<Option<sepal_bgp::bfd::Timers>, CrdError> {
        if !self.enabled {
            return Ok(None);
        }
        let d = sepal_bgp::bfd::Timers::default();
        let interval = |name: &str, v: &Option<String>, default: Duration| {
            let f = format!("{field}.{name}");
            let got = duration_field(&f, v)?.unwrap_or(default);
            if got < BFD_MIN_INTERVAL || got > Duration::from_secs(60) {
                return Err(field_err(
                    f,
                    v.as_deref().unwrap_or_default(),
                    "an interval from 10ms to 60s",
                ));
            }
            Ok(got)
        };
        let multiplier = self.multiplier.unwrap_or(d.multiplier);
        if multiplier == 0 {
            return Err(field_err(
                format!("{field}.multiplier"),
                "0",
                "a multiplier (1..255)",
            ));
        }
        Ok(Some(sepal_bgp::bfd::Timers {
            min_rx: interval("minRxInterval", &self.min_rx_interval, d.min_rx)?,
            min_tx: interval("minTxInterval", &self.min_tx_interval, d.min_tx)?,
            multiplier,
        }))
    }
}

/// One CIDR in a list of ranges to advertise.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct CidrEntry {
    pub cidr: String,
}

/// Communities for every advertised prefix inside `cidr`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct PrefixCommunities {
    pub cidr: String,
    /// Standard ("65000:100") or large ("65000:1:2") communities.
    pub communities: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// BGPPeer

/// A BGP peer outside the node mesh (a top-of-rack router, a route reflector).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "sepal.dev",
    version = "v1alpha1",
    kind = "BGPPeer",
    plural = "bgppeers",
    derive = "PartialEq",
    singular = "bgppeer",
    doc = "A BGP peer of some or all nodes"
)]
#[kube(printcolumn = r#"{"name":"Peer","type":"string","jsonPath":".spec.peerIP"}"#)]
#[kube(printcolumn = r#"{"name":"AS","type":"integer","jsonPath":".spec.asNumber"}"#)]
#[kube(printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.node"}"#)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{
    "rule": "has(self.peerIP) || has(self.interface)",
    "message": "spec.peerIP is required unless spec.interface names the link (unnumbered)"
}]))]
pub struct BGPPeerSpec {
    /// The peer's address (IPv4 or IPv6). With `interface`: the peer's IPv6 link-local address
    /// on it, or nothing to learn it from the peer's IPv6 router advertisements.
    #[serde(rename = "peerIP", default, skip_serializing_if = "String::is_empty")]
    pub peer_ip: String,
    /// Unnumbered peering: the session runs over this interface's IPv6 link-local addresses
    /// and carries IPv4 routes with IPv6 next hops (RFC 8950).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// The peer's AS number.
    #[schemars(range(min = 1))]
    pub as_number: u32,
    /// Only this node peers (exclusive with nodeSelector; neither = every node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Only nodes whose labels match peer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<NodeSelector>,
    /// TCP MD5 password taken from a Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<PeerPassword>,
    /// GTSM (RFC 5082): the peer is at most this many hops away.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 255))]
    pub ttl_security: Option<u8>,
    /// Close the session when the peer sends more prefixes than this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub max_prefixes: Option<u32>,
    /// The node reflects routes to this peer (the node must be a route reflector).
    #[serde(default)]
    pub route_reflector_client: bool,
    /// Local address the session is sourced from; by default the node's BGP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<String>,
    /// Wait for the peer to connect instead of connecting.
    #[serde(default)]
    pub passive: bool,
    /// Keepalive interval as a duration ("20s").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub keepalive_time: Option<String>,
    /// Hold time as a duration ("90s").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub hold_time: Option<String>,
    /// Which learned routes are installed; by default all but a default route.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_policy: Option<RoutePolicySpec>,
    /// Which routes this peer is sent, on top of the leak guards (an eBGP peer of a node that is
    /// not a route reflector gets only the node's own announcements); by default all of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub export_policy: Option<RoutePolicySpec>,
    /// BFD on this session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<BfdSpec>,
}

/// A label selector (the shape of Kubernetes' LabelSelector).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub match_expressions: Vec<SelectorRequirement>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub values: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

impl NodeSelector {
    /// Whether a node with these labels is selected (an empty selector selects every node).
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let got = labels.get(&r.key);
                match r.operator {
                    SelectorOperator::In => got.is_some_and(|v| r.values.contains(v)),
                    SelectorOperator::NotIn => !got.is_some_and(|v| r.values.contains(v)),
                    SelectorOperator::Exists => got.is_some(),
                    SelectorOperator::DoesNotExist => got.is_none(),
                }
            })
    }
}

/// Where a peer's password lives.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerPassword {
    pub secret_key_ref: SecretKeyRef,
}

/// A key of a v1 Secret; the namespace defaults to Sepal's own (`sepal-system`).
#[derive(
    Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, JsonSchema,
)]
pub struct SecretKeyRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub key: String,
}

/// Namespace of Secrets referenced without one.
pub const DEFAULT_SECRET_NAMESPACE: &str = "sepal-system";

impl SecretKeyRef {
    pub fn namespace(&self) -> &str {
        self.namespace
            .as_deref()
            .unwrap_or(DEFAULT_SECRET_NAMESPACE)
    }
}

/// Import or export policy as written: `action: Accept|Reject|AllowList`, `cidrs` for AllowList.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct RoutePolicySpec {
    pub action: RouteAction,
    /// With AllowList: prefixes inside one of these pass.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cidrs: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RouteAction {
    Accept,
    Reject,
    AllowList,
}

// ---------------------------------------------------------------------------------------------
// SepalNodeStatus

/// Per-node state written by the node's agent (one object per node, named after it).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[kube(
    group = "sepal.dev",
    version = "v1alpha1",
    kind = "SepalNodeStatus",
    plural = "sepalnodestatuses",
    derive = "PartialEq",
    singular = "sepalnodestatus",
    shortname = "sns",
    status = "NodeStatusReport",
    doc = "BGP sessions and dataplane state of one node, written by its agent"
)]
#[kube(printcolumn = r#"{"name":"Routes","type":"boolean","jsonPath":".status.routesProgrammed"}"#)]
#[kube(
    printcolumn = r#"{"name":"Established","type":"integer","jsonPath":".status.establishedSessions"}"#
)]
#[kube(printcolumn = r#"{"name":"Sessions","type":"integer","jsonPath":".status.totalSessions"}"#)]
#[kube(printcolumn = r#"{"name":"Updated","type":"date","jsonPath":".status.lastUpdated"}"#)]
#[serde(rename_all = "camelCase")]
pub struct SepalNodeStatusSpec {
    /// The node this status belongs to (same as the object's name).
    pub node: String,
}

/// What the agent reports.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatusReport {
    /// The node's routes (pod blocks, learned routes) are in the kernel.
    #[serde(default)]
    pub routes_programmed: bool,
    #[serde(default)]
    pub established_sessions: u32,
    #[serde(default)]
    pub total_sessions: u32,
    /// RFC 3339 time of the last report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_updated: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<BgpSessionStatus>,
}

/// One BGP session of the node.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BgpSessionStatus {
    #[serde(rename = "peerIP")]
    pub peer_ip: String,
    pub peer_as: u32,
    /// `mesh`, or the BGPPeer's name.
    pub source: String,
    /// RFC 4271 state: Idle, Connect, Active, OpenSent, OpenConfirm, Established.
    pub state: String,
    /// RFC 3339 time of the last state change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    #[serde(default)]
    pub prefixes_received: u32,
    #[serde(default)]
    pub prefixes_advertised: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The session's BFD, when it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bfd: Option<BfdSessionStatus>,
}

/// A BGP session's BFD session (RFC 5880).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BfdSessionStatus {
    /// AdminDown, Down, Init or Up.
    pub state: String,
    /// RFC 5880 diagnostic code of the last change (1: detection time expired, 3: neighbor
    /// signaled session down, 7: administratively down).
    pub diagnostic: u8,
    /// The interval this node transmits at and the detection time, as negotiated and in force.
    #[serde(default)]
    pub tx_interval_ms: u32,
    pub detection_time_ms: u32,
    /// When the session last changed state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_change: Option<String>,
    /// The C bit this node sends: its BFD runs in `sepal bfd`, apart from the agent, so it stays
    /// Up across an agent restart and a peer should keep the routes (RFC 5880 §4.1, RFC 5882 §4.3).
    #[serde(default)]
    pub control_plane_independent: bool,
    /// The C bit the peer sends.
    #[serde(default)]
    pub remote_control_plane_independent: bool,
}

// ---------------------------------------------------------------------------------------------
// Validated forms: parsed once here, so the routing code gets addresses, not strings.

/// BGPConfiguration with every field parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct BgpConfig {
    pub as_number: u32,
    pub node_to_node_mesh: bool,
    pub listen_port: u16,
    pub keepalive_time: Option<Duration>,
    pub hold_time: Option<Duration>,
    pub graceful_restart_time: Duration,
    pub service_cluster_ips: Vec<IpNetwork>,
    pub service_external_ips: Vec<IpNetwork>,
    pub service_load_balancer_ips: Vec<IpNetwork>,
    pub communities: Vec<(IpNetwork, Vec<Community>)>,
    /// BFD timers of the mesh sessions; None: no BFD.
    pub bfd: Option<sepal_bgp::bfd::Timers>,
}

impl Default for BgpConfig {
    /// The configuration used when no `default` BGPConfiguration exists.
    fn default() -> Self {
        BGPConfigurationSpec::default()
            .validate()
            .expect("built-in defaults are valid")
    }
}

impl Default for BGPConfigurationSpec {
    fn default() -> Self {
        BGPConfigurationSpec {
            as_number: default_as_number(),
            node_to_node_mesh: true,
            listen_port: default_listen_port(),
            keepalive_time: None,
            hold_time: None,
            graceful_restart_time: default_graceful_restart_time(),
            service_cluster_ips: Vec::new(),
            service_external_ips: Vec::new(),
            service_load_balancer_ips: Vec::new(),
            communities: Vec::new(),
            bfd: None,
        }
    }
}

/// A BGP community: standard (RFC 1997) or large (RFC 8092).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Community {
    Standard(u16, u16),
    Large(u32, u32, u32),
}

impl std::str::FromStr for Community {
    type Err = ();
    fn from_str(s: &str) -> Result<Self, ()> {
        let parts: Vec<&str> = s.split(':').collect();
        match parts.as_slice() {
            [a, b] => Ok(Community::Standard(
                a.parse().map_err(|_| ())?,
                b.parse().map_err(|_| ())?,
            )),
            [a, b, c] => Ok(Community::Large(
                a.parse().map_err(|_| ())?,
                b.parse().map_err(|_| ())?,
                c.parse().map_err(|_| ())?,
            )),
            _ => Err(()),
        }
    }
}

/// Parses a Go-style duration ("90s", "1m30s", "500ms", "1.5h").
pub fn parse_duration(s: &str) -> Option<Duration> {
    let mut rest = s;
    let mut total = 0f64;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        if num_len == 0 {
            return None;
        }
        let n: f64 = rest[..num_len].parse().ok()?;
        rest = &rest[num_len..];
        let (mult, unit_len) = if rest.starts_with("ms") {
            (0.001, 2)
        } else if rest.starts_with('s') {
            (1.0, 1)
        } else if rest.starts_with('m') {
            (60.0, 1)
        } else if rest.starts_with('h') {
            (3600.0, 1)
        } else {
            return None;
        };
        rest = &rest[unit_len..];
        total += n * mult;
    }
    (total.is_finite() && total < 1e9).then(|| Duration::from_secs_f64(total))
}

fn duration_field(field: &str, v: &Option<String>) -> Result<Option<Duration>, CrdError> {
    v.as_deref()
        .map(|s| parse_duration(s).ok_or_else(|| field_err(field, s, "a duration like 90s")))
        .transpose()
}

fn cidr(field: &str, s: &str) -> Result<IpNetwork, CrdError> {
    let net: IpNetwork = s
        .parse()
        .map_err(|_| field_err(field, s, "a CIDR like 10.96.0.0/12"))?;
    if net.network() != net.ip() {
        return Err(field_err(field, s, "a CIDR without host bits"));
    }
    Ok(net)
}

fn cidr_list(field: &str, v: &[CidrEntry]) -> Result<Vec<IpNetwork>, CrdError> {
    v.iter()
        .enumerate()
        .map(|(i, e)| cidr(&format!("{field}[{i}].cidr"), &e.cidr))
        .collect()
}

impl BGPConfigurationSpec {
    pub fn validate(&self) -> Result<BgpConfig, CrdError> {
        if self.as_number == 0 {
            return Err(field_err(
                "spec.asNumber",
                "0",
                "an AS number (1..4294967295)",
            ));
        }
        if self.listen_port == 0 {
            return Err(field_err("spec.listenPort", "0", "a TCP port"));
        }
        let communities = self
            .communities
            .iter()
            .enumerate()
            .map(|(i, pc)| {
                let net = cidr(&format!("spec.communities[{i}].cidr"), &pc.cidr)?;
                let cs = pc
                    .communities
                    .iter()
                    .map(|c| {
                        c.parse().map_err(|_| {
                            field_err(
                                format!("spec.communities[{i}].communities"),
                                c,
                                "a community like 65000:100 or 65000:1:2",
                            )
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok((net, cs))
            })
            .collect::<Result<Vec<_>, CrdError>>()?;
        Ok(BgpConfig {
            as_number: self.as_number,
            node_to_node_mesh: self.node_to_node_mesh,
            listen_port: self.listen_port,
            keepalive_time: duration_field("spec.keepaliveTime", &self.keepalive_time)?,
            hold_time: duration_field("spec.holdTime", &self.hold_time)?,
            graceful_restart_time: parse_duration(&self.graceful_restart_time).ok_or_else(
                || {
                    field_err(
                        "spec.gracefulRestartTime",
                        &self.graceful_restart_time,
                        "a duration like 120s",
                    )
                },
            )?,
            service_cluster_ips: cidr_list("spec.serviceClusterIPs", &self.service_cluster_ips)?,
            service_external_ips: cidr_list("spec.serviceExternalIPs", &self.service_external_ips)?,
            service_load_balancer_ips: cidr_list(
                "spec.serviceLoadBalancerIPs",
                &self.service_load_balancer_ips,
            )?,
            communities,
            bfd: match &self.bfd {
                Some(b) => b.validate("spec.bfd")?,
                None => None,
            },
        })
    }
}

/// Which routes pass a peer's import or export policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoutePolicy {
    /// Everything except a default route.
    Accept,
    Reject,
    /// Prefixes inside one of these (a 0.0.0.0/0 entry is what allows a default route).
    Allow(Vec<IpNetwork>),
}

/// BGPPeer with every field parsed.
#[derive(Clone, Debug, PartialEq)]
pub struct BgpPeer {
    pub name: String,
    /// None with `interface`: learned from router advertisements.
    pub peer_ip: Option<IpAddr>,
    /// Unnumbered: the interface whose link-local addresses the session runs between.
    pub interface: Option<String>,
    pub as_number: u32,
    pub node: Option<String>,
    pub node_selector: Option<NodeSelector>,
    pub password: Option<SecretKeyRef>,
    pub ttl_security: Option<u8>,
    pub max_prefixes: Option<u32>,
    pub route_reflector_client: bool,
    pub source_address: Option<IpAddr>,
    pub passive: bool,
    pub keepalive_time: Option<Duration>,
    pub hold_time: Option<Duration>,
    pub import_policy: RoutePolicy,
    /// None: no policy of its own (the leak guards alone decide).
    pub export_policy: Option<RoutePolicy>,
    /// BFD timers; None: no BFD.
    pub bfd: Option<sepal_bgp::bfd::Timers>,
}

impl BgpPeer {
    /// Whether the node with this name and these labels peers with this peer.
    pub fn selects(&self, node: &str, labels: &BTreeMap<String, String>) -> bool {
        match (&self.node, &self.node_selector) {
            (Some(n), _) => n == node,
            (None, Some(sel)) => sel.matches(labels),
            (None, None) => true,
        }
    }
}

fn ip(field: &str, s: &str) -> Result<IpAddr, CrdError> {
    s.parse()
        .map_err(|_| field_err(field, s, "an IPv4 or IPv6 address"))
}

impl BGPPeerSpec {
    pub fn validate(&self, name: &str) -> Result<BgpPeer, CrdError> {
        if self.as_number == 0 {
            return Err(field_err(
                "spec.asNumber",
                "0",
                "an AS number (1..4294967295)",
            ));
        }
        if self.node.is_some() && self.node_selector.is_some() {
            return Err(field_err(
                "spec.nodeSelector",
                "set together with spec.node",
                "allowed (use one of node, nodeSelector)",
            ));
        }
        if self.ttl_security == Some(0) {
            return Err(field_err("spec.ttlSecurity", "0", "a hop count (1..255)"));
        }
        let (peer_ip, interface) = self.peer_address()?;
        let import_policy = match &self.import_policy {
            None => RoutePolicy::Accept,
            Some(p) => p.validate("spec.importPolicy")?,
        };
        let export_policy = self
            .export_policy
            .as_ref()
            .map(|p| p.validate("spec.exportPolicy"))
            .transpose()?;
        Ok(BgpPeer {
            name: name.to_string(),
            peer_ip,
            interface,
            as_number: self.as_number,
            node: self.node.clone(),
            node_selector: self.node_selector.clone(),
            password: self.password.as_ref().map(|p| p.secret_key_ref.clone()),
            ttl_security: self.ttl_security,
            max_prefixes: self.max_prefixes,
            route_reflector_client: self.route_reflector_client,
            source_address: self
                .source_address
                .as_deref()
                .map(|s| ip("spec.sourceAddress", s))
                .transpose()?,
            passive: self.passive,
            keepalive_time: duration_field("spec.keepaliveTime", &self.keepalive_time)?,
            hold_time: duration_field("spec.holdTime", &self.hold_time)?,
            import_policy,
            export_policy,
            bfd: match &self.bfd {
                Some(b) => b.validate("spec.bfd")?,
                None => None,
            },
        })
    }
}

impl BGPPeerSpec {
    /// `peerIP` and `interface`: an address, or an interface with a link-local address or none.
    fn peer_address(&self) -> Result<(Option<IpAddr>, Option<String>), CrdError> {
        let Some(iface) = &self.interface else {
            return Ok((Some(ip("spec.peerIP", &self.peer_ip)?), None));
        };
        // Linux interface names: 1-15 bytes, no '/', no whitespace, not "." or "..".
        if iface.is_empty()
            || iface.len() > 15
            || iface == "."
            || iface == ".."
            || iface
                .chars()
                .any(|c| c == '/' || c == ':' || c.is_whitespace())
        {
            return Err(field_err("spec.interface", iface, "an interface name"));
        }
        if self.peer_ip.is_empty() {
            return Ok((None, Some(iface.clone())));
        }
        match self.peer_ip.parse::<IpAddr>() {
            Ok(IpAddr::V6(v6)) if v6.is_unicast_link_local() => {
                Ok((Some(IpAddr::V6(v6)), Some(iface.clone())))
            }
            _ => Err(field_err(
                "spec.peerIP",
                &self.peer_ip,
                "with spec.interface, an IPv6 link-local address (fe80::/10) or nothing",
            )),
        }
    }
}

impl RoutePolicySpec {
    fn validate(&self, field: &str) -> Result<RoutePolicy, CrdError> {
        Ok(match self.action {
            RouteAction::Accept => RoutePolicy::Accept,
            RouteAction::Reject => RoutePolicy::Reject,
            RouteAction::AllowList => RoutePolicy::Allow(
                self.cidrs
                    .iter()
                    .enumerate()
                    .map(|(i, c)| cidr(&format!("{field}.cidrs[{i}]"), c))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Raw JSON -> typed objects (the dir datastore keeps unknown kinds as raw JSON).

/// One of Sepal's objects, decoded.
#[derive(Clone, Debug, PartialEq)]
pub enum SepalObject {
    BgpConfiguration(BGPConfiguration),
    BgpPeer(BGPPeer),
    NodeStatus(SepalNodeStatus),
}

/// Whether `(apiVersion, kind)` names one of Sepal's kinds.
pub fn is_sepal_kind(api_version: &str, kind: &str) -> bool {
    api_version == API_VERSION && matches!(kind, "BGPConfiguration" | "BGPPeer" | "SepalNodeStatus")
}

fn decode<K: serde::de::DeserializeOwned>(
    kind: &'static str,
    value: &serde_json::Value,
) -> Result<K, CrdError> {
    K::deserialize(value).map_err(|source| CrdError::Decode {
        kind,
        name: value
            .pointer("/metadata/name")
            .and_then(|n| n.as_str())
            .unwrap_or("<unnamed>")
            .to_string(),
        source,
    })
}

impl SepalObject {
    /// Decodes a raw object (from a YAML/JSON file or the API server); defaults are applied as
    /// the API server would apply the CRD schema's defaults.
    pub fn from_json(value: &serde_json::Value) -> Result<SepalObject, CrdError> {
        let api_version = value
            .get("apiVersion")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        if api_version != API_VERSION {
            return Err(CrdError::ApiVersion {
                found: api_version.to_string(),
            });
        }
        match value
            .get("kind")
            .and_then(|v| v.as_str())
            .unwrap_or_default()
        {
            "BGPConfiguration" => Ok(SepalObject::BgpConfiguration(decode(
                "BGPConfiguration",
                value,
            )?)),
            "BGPPeer" => Ok(SepalObject::BgpPeer(decode("BGPPeer", value)?)),
            "SepalNodeStatus" => Ok(SepalObject::NodeStatus(decode("SepalNodeStatus", value)?)),
            other => Err(CrdError::Kind {
                found: other.to_string(),
            }),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// CRD YAML for deploy/crds/

/// Every CRD as (file name, YAML), in a stable order.
pub fn crd_files() -> Vec<(String, String)> {
    let crds = [
        BGPConfiguration::crd(),
        BGPPeer::crd(),
        SepalNodeStatus::crd(),
    ];
    crds.into_iter()
        .map(|crd| {
            let name = crd.metadata.name.clone().unwrap_or_default();
            let mut crd = serde_json::to_value(&crd).expect("CRD serializes");
            drop_unsigned_formats(&mut crd);
            let yaml = serde_norway::to_string(&crd).expect("CRD serializes");
            (
                format!("{name}.yaml"),
                format!("# Generated from agent/src/crd.rs by `sepal crds`; do not edit.\n{yaml}"),
            )
        })
        .collect()
}

/// Replaces the `uint8`..`uint32` formats schemars gives unsigned fields by the bounds they
/// mean: the API server knows only int32 and int64, and warns about every other format on each
/// apply. schemars already writes the `minimum`; the `maximum` is added where it is missing.
fn drop_unsigned_formats(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(map) => {
            let max = match map.get("format").and_then(|f| f.as_str()) {
                Some("uint8") => Some(f64::from(u8::MAX)),
                Some("uint16") => Some(f64::from(u16::MAX)),
                Some("uint32") => Some(f64::from(u32::MAX)),
                _ => None,
            };
            if let Some(max) = max {
                map.remove("format");
                map.entry("maximum").or_insert(serde_json::json!(max));
            }
            map.values_mut().for_each(drop_unsigned_formats);
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(drop_unsigned_formats),
        _ => {}
    }
}

/// Writes every CRD into `dir` (deploy/crds), replacing each file atomically.
pub fn write_crds(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for (file, yaml) in crd_files() {
        let path = dir.join(&file);
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &path)?;
        written.push(path);
    }
    Ok(written)
}

/// The kinds' names as the API server serves them (RBAC rules name these).
pub fn plurals() -> [&'static str; 3] {
    ["bgpconfigurations", "bgppeers", "sepalnodestatuses"]
}

/// `apiVersion` of a Sepal resource type (kept next to the derive so they cannot drift).
pub fn api_version_of<K: Resource<DynamicType = ()>>() -> String {
    K::api_version(&()).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn crds_dir() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/crds")
    }

    /// The committed YAML must be what the types generate. To regenerate:
    /// `sepal crds` (or `SEPAL_UPDATE_CRDS=1 cargo test -p sepal-agent crd`).
    #[test]
    fn committed_crds_match_types() {
        if std::env::var_os("SEPAL_UPDATE_CRDS").is_some() {
            write_crds(&crds_dir()).expect("write CRDs");
        }
        for (file, yaml) in crd_files() {
            let path = crds_dir().join(&file);
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == yaml,
                "{} is out of date with agent/src/crd.rs; run `sepal crds` \
                 (or SEPAL_UPDATE_CRDS=1 cargo test -p sepal-agent crd) and commit the result",
                path.display()
            );
        }
    }

    #[test]
    fn crd_metadata() {
        let crd = BGPPeer::crd();
        assert_eq!(crd.metadata.name.as_deref(), Some("bgppeers.sepal.dev"));
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(SepalNodeStatus::crd().spec.scope, "Cluster");
        assert_eq!(api_version_of::<BGPConfiguration>(), API_VERSION);
        for (plural, crd) in plurals().iter().zip([
            BGPConfiguration::crd(),
            BGPPeer::crd(),
            SepalNodeStatus::crd(),
        ]) {
            assert_eq!(&crd.spec.names.plural, plural);
        }
    }

    #[test]
    fn bfd_spec_defaults_and_limits() {
        let peer = |bfd: serde_json::Value| {
            serde_json::from_value::<BGPPeerSpec>(json!({
                "peerIP": "10.0.0.1", "asNumber": 65000, "bfd": bfd
            }))
            .unwrap()
            .validate("tor")
        };
        let t = peer(json!({"enabled": true})).unwrap().bfd.unwrap();
        assert_eq!(t, sepal_bgp::bfd::Timers::default());
        assert_eq!(
            (t.min_rx, t.min_tx, t.multiplier),
            (Duration::from_millis(300), Duration::from_millis(300), 3)
        );
        let t = peer(json!({"enabled": true, "minTxInterval": "50ms", "multiplier": 5}))
            .unwrap()
            .bfd
            .unwrap();
        assert_eq!((t.min_tx, t.multiplier), (Duration::from_millis(50), 5));
        assert_eq!(peer(json!({"enabled": false})).unwrap().bfd, None);
        let e = peer(json!({"enabled": true, "minRxInterval": "5ms"})).unwrap_err();
        assert!(e.to_string().contains("spec.bfd.minRxInterval"), "{e}");
        let e = peer(json!({"enabled": true, "multiplier": 0})).unwrap_err();
        assert!(e.to_string().contains("spec.bfd.multiplier"), "{e}");
        // The mesh's BFD comes from the BGPConfiguration.
        let cfg: BGPConfigurationSpec =
            serde_json::from_value(json!({"bfd": {"enabled": true}})).unwrap();
        assert!(cfg.validate().unwrap().bfd.is_some());
    }

    #[test]
    fn bgp_configuration_defaults() {
        let obj = SepalObject::from_json(&json!({
            "apiVersion": "sepal.dev/v1alpha1", "kind": "BGPConfiguration",
            "metadata": {"name": "default"}, "spec": {}
        }))
        .expect("decodes");
        let SepalObject::BgpConfiguration(c) = obj else {
            panic!("wrong kind")
        };
        let v = c.spec.validate().expect("valid");
        assert_eq!(v, BgpConfig::default());
        assert_eq!(v.as_number, 64512);
        assert!(v.node_to_node_mesh);
        assert_eq!(v.listen_port, 179);
        assert_eq!(v.graceful_restart_time, Duration::from_secs(120));
    }

    #[test]
    fn bgp_configuration_full() {
        let obj = SepalObject::from_json(&json!({
            "apiVersion": "sepal.dev/v1alpha1", "kind": "BGPConfiguration",
            "metadata": {"name": "default"},
            "spec": {"asNumber": 65010, "nodeToNodeMesh": false, "listenPort": 1790,
                     "keepaliveTime": "3s", "holdTime": "9s", "gracefulRestartTime": "1m30s",
                     "serviceClusterIPs": [{"cidr": "10.96.0.0/12"}, {"cidr": "fd00:96::/108"}],
                     "serviceExternalIPs": [{"cidr": "192.0.2.0/24"}],
                     "communities": [{"cidr": "10.96.0.0/12", "communities": ["65010:100", "65010:1:2"]}]}
        }))
        .expect("decodes");
        let SepalObject::BgpConfiguration(c) = obj else {
            panic!("wrong kind")
        };
        let v = c.spec.validate().expect("valid");
        assert_eq!(v.as_number, 65010);
        assert!(!v.node_to_node_mesh);
        assert_eq!(v.hold_time, Some(Duration::from_secs(9)));
        assert_eq!(v.graceful_restart_time, Duration::from_secs(90));
        assert_eq!(v.service_cluster_ips.len(), 2);
        assert_eq!(
            v.communities[0].1,
            vec![
                Community::Standard(65010, 100),
                Community::Large(65010, 1, 2)
            ]
        );
    }

    #[test]
    fn bad_fields_are_named() {
        let mut spec = BGPConfigurationSpec {
            hold_time: Some("ninety".into()),
            ..Default::default()
        };
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("spec.holdTime"), "{err}");
        spec.hold_time = None;
        spec.service_cluster_ips = vec![CidrEntry {
            cidr: "10.96.0.1/12".into(),
        }];
        let err = spec.validate().unwrap_err().to_string();
        assert!(err.contains("serviceClusterIPs[0]"), "{err}");
        let err =
            SepalObject::from_json(&json!({"apiVersion": "sepal.dev/v1alpha1", "kind": "IPPool"}))
                .unwrap_err()
                .to_string();
        assert!(err.contains("IPPool"), "{err}");
        // A BGPPeer without peerIP (and no interface) reads, but does not validate.
        let spec: BGPPeerSpec = serde_json::from_value(json!({"asNumber": 65000})).unwrap();
        let err = spec.validate("tor").unwrap_err().to_string();
        assert!(err.contains("spec.peerIP"), "{err}");
    }

    #[test]
    fn bgp_peer_validation_and_selection() {
        let SepalObject::BgpPeer(p) = SepalObject::from_json(&json!({
            "apiVersion": "sepal.dev/v1alpha1", "kind": "BGPPeer", "metadata": {"name": "tor-a"},
            "spec": {"peerIP": "10.0.1.1", "asNumber": 65000,
                     "nodeSelector": {"matchLabels": {"rack": "a"},
                                      "matchExpressions": [{"key": "edge", "operator": "DoesNotExist"}]},
                     "password": {"secretKeyRef": {"name": "bgp", "key": "tor-a"}},
                     "ttlSecurity": 1, "maxPrefixes": 1000, "passive": true,
                     "importPolicy": {"action": "AllowList", "cidrs": ["0.0.0.0/0"]}}
        }))
        .expect("decodes") else {
            panic!("wrong kind")
        };
        let peer = p.spec.validate("tor-a").expect("valid");
        assert_eq!(peer.peer_ip, Some("10.0.1.1".parse::<IpAddr>().unwrap()));
        assert_eq!(
            peer.password.as_ref().map(|r| r.namespace()),
            Some("sepal-system")
        );
        assert_eq!(
            peer.import_policy,
            RoutePolicy::Allow(vec!["0.0.0.0/0".parse().unwrap()])
        );
        let labels = |kv: &[(&str, &str)]| {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<BTreeMap<_, _>>()
        };
        assert!(peer.selects("n1", &labels(&[("rack", "a")])));
        assert!(!peer.selects("n1", &labels(&[("rack", "b")])));
        assert!(!peer.selects("n1", &labels(&[("rack", "a"), ("edge", "")])));

        let mut bad = p.spec.clone();
        bad.peer_ip = "10.0.1".into();
        assert!(bad
            .validate("x")
            .unwrap_err()
            .to_string()
            .contains("spec.peerIP"));
        let mut both = p.spec.clone();
        both.node = Some("n1".into());
        assert!(both.validate("x").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("s"), None);
    }

    #[test]
    fn an_unnumbered_peer_names_an_interface_and_a_link_local_address_or_none() {
        let spec = |v: serde_json::Value| serde_json::from_value::<BGPPeerSpec>(v).unwrap();
        let p = spec(serde_json::json!({"interface": "eth1", "asNumber": 65000}))
            .validate("tor")
            .unwrap();
        assert_eq!((p.peer_ip, p.interface.as_deref()), (None, Some("eth1")));
        let p =
            spec(serde_json::json!({"interface": "eth1", "peerIP": "fe80::1", "asNumber": 65000}))
                .validate("tor")
                .unwrap();
        assert_eq!(p.peer_ip, Some("fe80::1".parse().unwrap()));
        let e =
            spec(serde_json::json!({"interface": "eth1", "peerIP": "10.0.0.1", "asNumber": 65000}))
                .validate("tor")
                .unwrap_err();
        assert!(e.to_string().contains("link-local"), "{e}");
        let e = spec(serde_json::json!({"interface": "a/b", "asNumber": 65000}))
            .validate("tor")
            .unwrap_err();
        assert!(e.to_string().contains("spec.interface"), "{e}");
        // Without an interface the address is required.
        assert!(spec(serde_json::json!({"asNumber": 65000}))
            .validate("tor")
            .is_err());
    }
}
