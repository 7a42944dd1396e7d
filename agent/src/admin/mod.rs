//! The agent's operator socket: `sepal status|routes|endpoints|trace|flows` ask the running agent over a
//! Unix socket of its own, apart from the CNI plugin's protocol (`sepal_cni::api`).
//!
//! Framing as on the plugin's socket: one JSON request line per connection, one JSON reply line
//! back. Every reply is `{"result":"ok","data":…}` or `{"result":"error","msg":…}`; `data` is one
//! of the report types below, so other tools may read the socket as a stable interface.

pub mod collect;
pub mod lookup;
pub mod server;
pub mod trace;

use anyhow::{bail, Context, Result};
use sepal_felix::policy::{parse_port, ExplainPeer, Protocol};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Default path of the operator socket, beside the plugin's.
pub const DEFAULT_ADMIN_SOCKET: &str = "/run/sepal/admin.sock";

/// The operator socket that goes with a plugin socket: `admin.sock` in the same directory.
pub fn admin_socket_beside(plugin_socket: &Path) -> PathBuf {
    plugin_socket.with_file_name("admin.sock")
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    /// Node, blocks, datastore, readiness and BGP peers: a [`StatusReport`].
    Status,
    /// Kernel routes Sepal owns with their BGP origin: a `Vec<RouteReport>`.
    Routes,
    /// This node's pods: a `Vec<EndpointReport>`.
    Endpoints,
    /// What this node does with one packet: a [`TraceHop`].
    Trace(TraceRequest),
    /// NetworkPolicy's verdict for one packet, the deciding rules and their counters on this
    /// node: a `policy_explain::ExplainReport`.
    PolicyExplain(TraceRequest),
    /// Flow records this node's flow log holds: a `flows::FlowsReport`.
    Flows(crate::flows::FlowsRequest),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum AdminReply {
    Ok { data: serde_json::Value },
    Error { msg: String },
}

/// Most bytes of an error reply's message (as a JSON string): messages quote the request they
/// refuse, which may be 64 KiB.
pub const MAX_ERROR_MSG: usize = 4000;

impl AdminReply {
    /// An error reply, its message clipped to `MAX_ERROR_MSG`.
    pub fn error(msg: &str) -> AdminReply {
        AdminReply::Error {
            msg: sepal_cni::error::clip(msg, MAX_ERROR_MSG),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatusReport {
    pub node: String,
    /// The node's pod blocks (empty until its Node object with spec.podCIDRs is known).
    pub blocks: Vec<String>,
    pub datastore: DatastoreReport,
    /// Ready for CNI ADDs and `/readyz`: synced, blocks known, routes programmed.
    pub ready: bool,
    pub endpoints: usize,
    pub ipam: IpamReport,
    pub bgp: BgpReport,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DatastoreReport {
    pub source: String,
    /// The datastore delivered its initial state.
    pub synced: bool,
    /// Objects in the agent's model.
    pub objects: usize,
    /// Resources the API server refuses the agent (403: a rule missing from its RBAC).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forbidden: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IpamReport {
    pub allocated: usize,
    /// Addresses the blocks can hand out, per block.
    pub capacity: Vec<(String, u128)>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct BgpReport {
    /// False when no BGP speaker runs (no BGP configuration for this node).
    pub running: bool,
    pub peers: Vec<PeerReport>,
    /// Inputs the BGP plan left out, with the reason.
    pub warnings: Vec<String>,
    /// BFD sessions of the BGP sessions that have one.
    #[serde(default)]
    pub bfd: Vec<BfdReport>,
}

/// One BFD session (RFC 5880), as `show bfd peers` would describe it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BfdReport {
    pub peer: IpAddr,
    /// AdminDown, Down, Init or Up.
    pub state: String,
    pub remote_state: String,
    /// Why the session last went down (RFC 5880 diagnostic), and the peer's.
    pub diag: String,
    pub remote_diag: String,
    /// Diagnostic code as on the wire (0-8).
    pub diag_code: u8,
    /// The interval this node sends at and the detection time, both in force now.
    pub tx_interval_ms: u64,
    pub detection_time_ms: u64,
    pub since_change_secs: u64,
    /// This node's BFD runs apart from the agent (`sepal bfd`), and says so with the C bit.
    #[serde(default)]
    pub control_plane_independent: bool,
    /// The peer's BFD runs apart from its control plane (the C bit).
    pub remote_control_plane_independent: bool,
}

/// One BGP session, as `birdc show protocols all` would describe it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerReport {
    pub address: IpAddr,
    pub remote_as: u32,
    /// Idle, Connect, Active, OpenSent, OpenConfirm or Established.
    pub state: String,
    /// Seconds in Established (none when not established).
    pub uptime_secs: Option<u64>,
    pub prefixes_received: u64,
    pub prefixes_accepted: usize,
    pub prefixes_advertised: usize,
    pub updates_in: u64,
    pub updates_out: u64,
    pub last_error: Option<String>,
    pub last_notification_sent: Option<String>,
    pub last_notification_received: Option<String>,
}

/// A kernel route of Sepal's (protocol 83).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RouteReport {
    pub destination: String,
    /// `pod` (to a host veth), `blackhole` (a node block), `bgp` (learned) or `other`.
    pub kind: String,
    /// Output device of a pod route.
    pub device: Option<String>,
    /// Gateways of a learned route, as the kernel has them.
    pub gateways: Vec<IpAddr>,
    /// The BGP best route this kernel route comes from, if any.
    pub bgp: Option<BgpOrigin>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BgpOrigin {
    pub prefix: String,
    /// The peer the best path was learned from; none for our own announcements.
    pub peer: Option<IpAddr>,
    /// AS numbers, nearest first (sets flattened).
    pub as_path: Vec<u32>,
    pub next_hops: Vec<IpAddr>,
    pub local_pref: Option<u32>,
    pub med: Option<u32>,
}

/// One pod attachment on this node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct EndpointReport {
    pub namespace: String,
    pub pod: String,
    pub container_id: String,
    pub interface: String,
    pub ips: Vec<IpAddr>,
    pub host_veth: String,
    /// The host veth exists and the host routes to the pod point at it.
    pub routed: bool,
}

/// `sepal trace` asks each node on the path what it does with the packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRequest {
    /// `NS/POD` or an IP address.
    pub from: String,
    /// `NS/POD` or an IP address.
    pub to: String,
    /// `PORT[/PROTO]`, 80/TCP by default.
    pub port: Option<String>,
}

/// The packet a trace or explain request asks about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Flow {
    pub from: ExplainPeer,
    pub to: ExplainPeer,
    pub port: u16,
    pub protocol: Protocol,
}

impl TraceRequest {
    /// Parses both ends and the port (80/TCP when not given).
    pub fn flow(&self) -> Result<Flow, String> {
        let from = self.from.parse()?;
        let to = self.to.parse()?;
        let (port, protocol) = parse_port(self.port.as_deref().unwrap_or("80/TCP"))?;
        Ok(Flow {
            from,
            to,
            port,
            protocol,
        })
    }
}

/// One node's part of a packet's path.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TraceHop {
    pub node: String,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    /// The source pod when it lives on this node: where the packet enters.
    pub source: Option<TraceEndpoint>,
    /// The destination pod when it lives on this node: where the packet leaves.
    pub destination: Option<TraceEndpoint>,
    /// The kernel's route lookup for the destination (`ip route get`).
    pub lookup: RouteLookup,
    /// The BGP best route covering the destination, if the lookup used one.
    pub bgp: Option<BgpOrigin>,
    /// NetworkPolicy on this node: egress when the source is local, ingress when the
    /// destination is; the other direction as the cluster's policies predict it.
    pub egress: String,
    pub ingress: String,
    pub allowed: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TraceEndpoint {
    pub pod: String,
    pub ip: IpAddr,
    /// Pod side: the interface inside the pod's namespace.
    pub interface: String,
    pub host_veth: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct RouteLookup {
    /// `unicast`, `blackhole`, `unreachable`, `local`, …
    pub kind: String,
    pub device: Option<String>,
    pub gateway: Option<IpAddr>,
    pub source: Option<IpAddr>,
    /// The kernel's error when the lookup failed (e.g. no route).
    pub error: Option<String>,
}

/// How long the CLI waits for the agent.
const CALL_TIMEOUT: Duration = Duration::from_secs(20);

/// Sends one request to the agent's operator socket and decodes the reply's data.
pub fn call<T: DeserializeOwned>(socket: &Path, request: &AdminRequest) -> Result<T> {
    let mut stream = std::os::unix::net::UnixStream::connect(socket).with_context(|| {
        format!(
            "connecting to the agent at {} (is `sepal node` running? --admin-socket)",
            socket.display()
        )
    })?;
    stream.set_read_timeout(Some(CALL_TIMEOUT))?;
    stream.set_write_timeout(Some(CALL_TIMEOUT))?;
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .with_context(|| format!("reading the agent's reply on {}", socket.display()))?;
    if reply.trim().is_empty() {
        bail!("the agent at {} closed without a reply", socket.display());
    }
    match serde_json::from_str(&reply).context("the agent's reply is not valid")? {
        AdminReply::Ok { data } => {
            serde_json::from_value(data).context("the agent's reply has an unexpected shape")
        }
        AdminReply::Error { msg } => bail!("{msg}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_are_tagged_json() {
        let req = AdminRequest::Trace(TraceRequest {
            from: "a/b".into(),
            to: "10.0.0.1".into(),
            port: None,
        });
        let text = serde_json::to_string(&req).unwrap();
        assert!(text.contains(r#""op":"trace""#), "{text}");
        assert_eq!(serde_json::from_str::<AdminRequest>(&text).unwrap(), req);
        let status = serde_json::to_string(&AdminRequest::Status).unwrap();
        assert_eq!(status, r#"{"op":"status"}"#);
        let err = AdminReply::Error { msg: "no".into() };
        assert_eq!(
            serde_json::to_string(&err).unwrap(),
            r#"{"result":"error","msg":"no"}"#
        );
    }

    #[test]
    fn bad_requests_get_bounded_clear_replies() {
        // A 64 KiB request came back whole in serde's "unknown variant" message; the
        // agent/admin_request fuzz target bounds replies at 4 KiB.
        let op = "x".repeat(60_000);
        let line = format!(r#"{{"op":"{op}"}}"#);
        let msg = server::decode_request(line.as_bytes()).unwrap_err();
        let AdminReply::Error { msg } = AdminReply::error(&msg) else {
            panic!("not an error reply")
        };
        assert!(msg.starts_with("bad request: unknown variant") && msg.len() <= MAX_ERROR_MSG);
        // The packet: both ends, then the port (80/TCP by default); the first bad part is named.
        let req = |from: &str, to: &str, port: Option<&str>| TraceRequest {
            from: from.into(),
            to: to.into(),
            port: port.map(Into::into),
        };
        let flow = req("a/b", "10.0.0.1", None).flow().unwrap();
        assert_eq!((flow.port, flow.protocol), (80, Protocol::Tcp));
        assert!(req("a", "b/", Some("0"))
            .flow()
            .unwrap_err()
            .contains("\"a\""));
        assert!(req("a/b", "c/d", Some("0/udp"))
            .flow()
            .unwrap_err()
            .contains("port"));
    }

    #[test]
    fn admin_socket_sits_beside_the_plugin_socket() {
        assert_eq!(
            admin_socket_beside(Path::new("/run/sepal/sepal.sock")),
            PathBuf::from(DEFAULT_ADMIN_SOCKET)
        );
    }
}
