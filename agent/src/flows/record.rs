//! One flow record: what `sepal flows` prints and its `--json` lines hold.

use super::rule::Decision;
use k8s_openapi::jiff::Timestamp;
use sepal_felix::flow_log::{VERB_ALLOWED, VERB_DENIED};
use sepal_felix::nflog::Flow;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::time::SystemTime;

/// What the deciding rule did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allowed,
    Denied,
    /// A prefix this version does not know (another writer on the group).
    Unknown,
}

impl Verdict {
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Unknown => "unknown",
        }
    }
}

/// The verdict and rule comment of a flow-log prefix (`drop COMMENT`, `accept COMMENT`).
pub fn split_prefix(prefix: &str) -> (Verdict, &str) {
    match prefix.split_once(' ') {
        Some((VERB_DENIED, comment)) => (Verdict::Denied, comment),
        Some((VERB_ALLOWED, comment)) => (Verdict::Allowed, comment),
        _ => (Verdict::Unknown, prefix),
    }
}

/// One flow as this node decided it: the first packet logged, and how many more were merged
/// into the record (a denied flow's retransmissions, up to the log's rate).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowRecord {
    /// Increases by one per record on this node; `sepal flows --follow` asks for what follows
    /// the last one it printed.
    pub seq: u64,
    /// The first packet (RFC 3339, UTC).
    pub time: String,
    /// The last packet merged into the record.
    pub last_time: String,
    /// Packets logged for this flow (the log's rate bound applies, the counters are exact).
    pub packets: u64,
    pub node: String,
    pub verdict: Verdict,
    /// `TCP`, `UDP`, `SCTP`, `ICMP`, `ICMPv6`, or the protocol number.
    pub protocol: String,
    pub src_ip: IpAddr,
    pub src_port: Option<u16>,
    pub dst_ip: IpAddr,
    pub dst_port: Option<u16>,
    /// `NAMESPACE/NAME` of the pod with the source address; None: outside the pods.
    pub src_pod: Option<String>,
    pub dst_pod: Option<String>,
    #[serde(flatten)]
    pub decision: Decision,
}

/// An RFC 3339 time in milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    match Timestamp::try_from(t) {
        Ok(ts) => format!("{ts:.3}"),
        Err(_) => "1970-01-01T00:00:00.000Z".to_string(),
    }
}

pub fn protocol_name(number: u8) -> String {
    match number {
        1 => "ICMP".into(),
        6 => "TCP".into(),
        17 => "UDP".into(),
        58 => "ICMPv6".into(),
        132 => "SCTP".into(),
        136 => "UDPLite".into(),
        n => n.to_string(),
    }
}

impl FlowRecord {
    /// The record of a flow's first logged packet.
    pub fn new(
        node: &str,
        verdict: Verdict,
        flow: &Flow,
        decision: Decision,
        pods: [Option<String>; 2],
        time: SystemTime,
    ) -> FlowRecord {
        let [src_pod, dst_pod] = pods;
        let time = rfc3339(time);
        FlowRecord {
            seq: 0,
            last_time: time.clone(),
            time,
            packets: 1,
            node: node.to_string(),
            verdict,
            protocol: protocol_name(flow.protocol),
            src_ip: flow.src,
            src_port: flow.sport,
            dst_ip: flow.dst,
            dst_port: flow.dport,
            src_pod,
            dst_pod,
            decision,
        }
    }

    /// One line: time, verdict, 5-tuple with the pods, the deciding tier and rule.
    pub fn line(&self) -> String {
        let end = |ip: &IpAddr, port: Option<u16>, pod: &Option<String>| {
            let addr = match (ip, port) {
                (IpAddr::V6(v6), Some(p)) => format!("[{v6}]:{p}"),
                (ip, Some(p)) => format!("{ip}:{p}"),
                (ip, None) => ip.to_string(),
            };
            match pod {
                Some(pod) => format!("{addr} ({pod})"),
                None => addr,
            }
        };
        let more = match self.packets {
            1 => String::new(),
            n => format!("  x{n} until {}", self.last_time),
        };
        format!(
            "{} {:<7} {:<5} {} -> {}  {}{more}",
            self.time,
            self.verdict.as_str(),
            self.protocol,
            end(&self.src_ip, self.src_port, &self.src_pod),
            end(&self.dst_ip, self.dst_port, &self.dst_pod),
            self.decision.describe()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn records_read_as_one_line_and_as_json() {
        let flow = Flow {
            protocol: 6,
            src: "10.244.1.2".parse().unwrap(),
            dst: "10.244.2.3".parse().unwrap(),
            sport: Some(40312),
            dport: Some(5432),
        };
        let (verdict, comment) = split_prefix("drop shop/db ingress default deny");
        assert_eq!(verdict, Verdict::Denied);
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
        let r = FlowRecord::new(
            "node1",
            verdict,
            &flow,
            Decision::parse(comment),
            [None, Some("shop/db".into())],
            t,
        );
        assert_eq!(
            r.line(),
            "2023-11-14T22:13:20.250Z denied  TCP   10.244.1.2:40312 -> 10.244.2.3:5432 (shop/db)  NetworkPolicy: shop/db ingress default deny"
        );
        let json = serde_json::to_value(&r).unwrap();
        for (key, value) in [
            ("verdict", "denied"),
            ("protocol", "TCP"),
            ("dst_pod", "shop/db"),
            ("tier", "NetworkPolicy"),
            ("direction", "ingress"),
            ("rule", "ingress default deny"),
            ("comment", "shop/db ingress default deny"),
            ("time", "2023-11-14T22:13:20.250Z"),
        ] {
            assert_eq!(json[key], value, "{key} in {json}");
        }
        assert_eq!(json["policy"], serde_json::Value::Null);
        assert_eq!(json["src_port"], 40312);
        let back: FlowRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back, r);
    }

    #[test]
    fn foreign_prefixes_are_unknown() {
        assert_eq!(
            split_prefix("sepal x/y ingress default deny: "),
            (Verdict::Unknown, "sepal x/y ingress default deny: ")
        );
        assert_eq!(split_prefix("accept a/b egress[0]").0, Verdict::Allowed);
        assert_eq!(split_prefix("").0, Verdict::Unknown);
    }
}
