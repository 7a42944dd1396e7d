//! Flow logs for `sepal flows`: the agent reads the nflog group its flow-log rules write to
//! (`sepal_felix::flow_log`), turns each logged packet into a record naming both ends, the
//! verdict and the rule that decided, and keeps the newest `RING_CAPACITY` records in memory for
//! the operator socket.
//!
//! The rate is bounded twice: in the kernel, by the tables' shared `limit` per verdict (`--flow-
//! log-rate`, packets per second), so a flood costs neither the kernel's logging path nor this
//! reader more than that; and here, by the ring's fixed size. The reader is a thread of its own
//! that blocks on the socket, apart from the agent's event loop.

pub mod cli;
pub mod pods;
pub mod record;
mod ring;
pub mod rule;

use crate::metrics::metrics;
use clap::ValueEnum;
use pods::{PodDirectory, PodIndex};
use record::{split_prefix, FlowRecord, Verdict};
use ring::{FlowKey, Ring};
use rule::Decision;
use sepal_felix::flow_log::FlowLog;
use sepal_felix::nflog::{self, NflogSocket};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Records the agent keeps (about 400 bytes each).
pub const RING_CAPACITY: usize = 4096;
/// The nflog group by default: 83, as Sepal's route protocol number.
pub const DEFAULT_GROUP: u16 = 83;
/// Packets logged per second and verdict by default.
pub const DEFAULT_RATE: u32 = 100;
/// Most packets per second and verdict `--flow-log-rate` accepts.
pub const MAX_RATE: u32 = 100_000;
/// A group another reader holds is tried again this often.
const REBIND: Duration = Duration::from_secs(5);

/// Which flows are recorded (`--flow-logs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum FlowLogMode {
    /// Nothing: no log rules, no reader.
    Off,
    /// Flows a rule denied (a default deny, a ClusterNetworkPolicy Deny).
    #[default]
    Denied,
    /// Denied flows and flows an allow rule accepted (their first packet).
    All,
}

/// The flow-log settings of `sepal node`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub mode: FlowLogMode,
    pub group: u16,
    pub rate: u32,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            mode: FlowLogMode::Denied,
            group: DEFAULT_GROUP,
            rate: DEFAULT_RATE,
        }
    }
}

impl Settings {
    /// What felix renders into the table.
    pub fn nft(&self) -> Option<FlowLog> {
        (self.mode != FlowLogMode::Off).then_some(FlowLog {
            group: self.group,
            allowed: self.mode == FlowLogMode::All,
            rate: self.rate,
        })
    }
}

/// `sepal flows` asks for the records after `after` (0: all held), denied only or all.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowsRequest {
    #[serde(default)]
    pub denied: bool,
    #[serde(default)]
    pub after: u64,
}

/// One node's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowsReport {
    pub node: String,
    pub mode: FlowLogMode,
    pub group: u16,
    pub rate: u32,
    /// The reader holds the group now.
    pub reading: bool,
    /// Why it does not, if it does not.
    pub error: Option<String>,
    /// The oldest record held (records before it were dropped from the ring).
    pub first_seq: Option<u64>,
    pub last_seq: u64,
    pub records: Vec<FlowRecord>,
}

#[derive(Debug, Default)]
struct ReaderState {
    reading: bool,
    error: Option<String>,
}

/// The node's flow log: settings, the ring of records and the reader's state.
pub struct FlowLogs {
    node: String,
    settings: Settings,
    ring: Mutex<Ring>,
    pods: PodDirectory,
    state: Mutex<ReaderState>,
}

impl FlowLogs {
    /// The flow log of `node`; with a mode other than off, its reader thread starts binding the
    /// group (the table's log rules may come later: the group exists without them).
    pub fn start(node: &str, settings: Settings) -> Arc<FlowLogs> {
        let logs = Arc::new(FlowLogs {
            node: node.to_string(),
            settings,
            ring: Mutex::new(Ring::new(RING_CAPACITY)),
            pods: PodDirectory::default(),
            state: Mutex::new(ReaderState::default()),
        });
        if settings.mode != FlowLogMode::Off {
            let reader = logs.clone();
            let spawned = std::thread::Builder::new()
                .name("flow-log".into())
                .spawn(move || reader.read_forever());
            if let Err(e) = spawned {
                tracing::error!("no flow-log reader thread: {e}");
                logs.set_state(false, Some(format!("no reader thread: {e}")));
            }
        }
        logs
    }

    /// Where the reader looks up pods by address.
    pub fn set_pod_source(&self, source: pods::PodSource) {
        self.pods.set_source(source);
    }

    /// Pods may have changed (called after every policy apply).
    pub fn pods_changed(&self) {
        self.pods.changed();
    }

    fn set_state(&self, reading: bool, error: Option<String>) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        s.reading = reading;
        s.error = error;
    }

    /// Binds the group, reads it until the socket fails, binds again; never returns.
    fn read_forever(&self) {
        let group = self.settings.group;
        let mut said = None::<String>;
        loop {
            match NflogSocket::bind(group) {
                Ok(socket) => {
                    tracing::info!(group, mode = ?self.settings.mode, rate = self.settings.rate, "flow log reading its nflog group");
                    self.set_state(true, None);
                    said = None;
                    let e = self.read(&socket);
                    tracing::warn!(group, "flow log: reading the nflog group failed: {e}");
                    self.set_state(false, Some(e.to_string()));
                }
                Err(e) => {
                    let msg = e.to_string();
                    // Once per distinct failure, not every retry.
                    if said.as_deref() != Some(&msg) {
                        tracing::warn!(group, "flow log not reading (retrying every 5 s): {msg}");
                        said = Some(msg.clone());
                    }
                    self.set_state(false, Some(msg));
                }
            }
            std::thread::sleep(REBIND);
        }
    }

    /// Reads records until the socket fails for good.
    fn read(&self, socket: &NflogSocket) -> std::io::Error {
        let mut buf = vec![0u8; 256 * 1024];
        let mut index = PodIndex::default();
        loop {
            match socket.recv(&mut buf, Duration::from_secs(1)) {
                Ok(n) => self.take(&nflog::parse_packets(&buf[..n]), &mut index),
                Err(e) => match e.raw_os_error() {
                    Some(libc::EAGAIN | libc::EINTR) => {}
                    // The kernel had more than the socket could hold: counted, reading goes on.
                    Some(libc::ENOBUFS) => {
                        metrics().flow_log_overruns.inc();
                    }
                    _ => return e,
                },
            }
        }
    }

    /// Records a datagram's packets: merged into their flow's record, or new records.
    fn take(&self, packets: &[nflog::Packet], index: &mut PodIndex) {
        let now = Instant::now();
        // The ring is locked per step, never across a pod lookup: a rebuild waits for the
        // agent's lock, and `sepal flows` must not wait for that.
        let ring = || self.ring.lock().unwrap_or_else(|e| e.into_inner());
        for p in packets {
            let Some(flow) = p.flow else {
                continue;
            };
            let (verdict, comment) = split_prefix(&p.prefix);
            metrics()
                .flow_log_records
                .get_or_create(&vec![("verdict", verdict.as_str().to_string())])
                .inc();
            let key = FlowKey {
                verdict: verdict.as_str(),
                comment: comment.to_string(),
                protocol: flow.protocol,
                src: flow.src,
                sport: flow.sport,
                dst: flow.dst,
                dport: flow.dport,
            };
            let time = p.time.unwrap_or_else(SystemTime::now);
            if ring().merge(&key, now, time) {
                continue;
            }
            let pods = index.lookup(&self.pods, [flow.src, flow.dst]);
            let record = FlowRecord::new(
                &self.node,
                verdict,
                &flow,
                Decision::parse(comment),
                pods,
                time,
            );
            ring().push(key, record, now);
        }
    }

    /// The records `req` asks for, or why there are none.
    pub fn report(&self, req: &FlowsRequest) -> Result<FlowsReport, String> {
        if self.settings.mode == FlowLogMode::Off {
            return Err(format!(
                "flow logs are off on node {} (sepal node --flow-logs off)",
                self.node
            ));
        }
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        let records = ring.since(req.after, |r| !req.denied || r.verdict == Verdict::Denied);
        let state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        Ok(FlowsReport {
            node: self.node.clone(),
            mode: self.settings.mode,
            group: self.settings.group,
            rate: self.settings.rate,
            reading: state.reading,
            error: state.error.clone(),
            first_seq: ring.first_seq(),
            last_seq: ring.last_seq(),
            records,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sepal_felix::nflog::{Flow, Packet};
    use sepal_felix::policy::Pod;

    fn packet(prefix: &str, sport: u16) -> Packet {
        Packet {
            prefix: prefix.into(),
            flow: Some(Flow {
                protocol: 6,
                src: "10.244.1.2".parse().unwrap(),
                dst: "10.244.1.3".parse().unwrap(),
                sport: Some(sport),
                dport: Some(81),
            }),
            time: None,
            in_ifindex: None,
            out_ifindex: None,
        }
    }

    #[test]
    fn packets_become_records_with_pods_and_rules() {
        let logs = FlowLogs::start(
            "n1",
            Settings {
                mode: FlowLogMode::Off,
                ..Settings::default()
            },
        );
        assert!(logs
            .report(&FlowsRequest::default())
            .unwrap_err()
            .contains("off"));
        let logs = FlowLogs {
            settings: Settings::default(),
            ..Arc::into_inner(logs).unwrap()
        };
        logs.set_pod_source(Box::new(|| {
            vec![Arc::new(Pod {
                namespace: "default".into(),
                name: "server".into(),
                ips: vec!["10.244.1.3".parse().unwrap()],
                ..Pod::default()
            })]
        }));
        let mut index = PodIndex::default();
        let deny = "drop default/server ingress default deny";
        logs.take(
            &[
                packet(deny, 40000),
                packet(deny, 40000),
                packet("accept default/web ingress[0]", 40001),
                Packet {
                    flow: None,
                    ..packet(deny, 1)
                },
            ],
            &mut index,
        );
        let all = logs.report(&FlowsRequest::default()).unwrap();
        assert_eq!(all.records.len(), 2);
        let r = &all.records[0];
        assert_eq!((r.packets, r.verdict), (2, Verdict::Denied));
        assert_eq!(r.dst_pod.as_deref(), Some("default/server"));
        assert_eq!(r.src_pod, None);
        assert_eq!(r.decision.rule.as_deref(), Some("ingress default deny"));
        let denied = logs
            .report(&FlowsRequest {
                denied: true,
                after: 0,
            })
            .unwrap();
        assert_eq!(denied.records.len(), 1);
        let after = logs
            .report(&FlowsRequest {
                denied: false,
                after: 1,
            })
            .unwrap();
        assert_eq!(
            after.records[0].decision.policy.as_deref(),
            Some("default/web")
        );
        assert_eq!(after.last_seq, 2);
    }

    #[test]
    fn settings_render_to_felix_options() {
        assert_eq!(
            Settings {
                mode: FlowLogMode::Off,
                ..Settings::default()
            }
            .nft(),
            None
        );
        let all = Settings {
            mode: FlowLogMode::All,
            ..Settings::default()
        };
        assert_eq!(
            all.nft(),
            Some(FlowLog {
                group: 83,
                allowed: true,
                rate: 100
            })
        );
        assert!(!Settings::default().nft().unwrap().allowed);
    }
}
