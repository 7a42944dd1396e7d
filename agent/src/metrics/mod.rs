//! The agent's telemetry: Prometheus metrics (one process-wide registry, observed where things
//! happen, BGP and IPAM figures refreshed at scrape) and the health flags behind /readyz.

pub mod http;
pub mod rules;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

type Labels = Vec<(&'static str, String)>;

/// Start-up milestones; the agent is ready once the datastore synced and routes are programmed.
#[derive(Debug, Default)]
pub struct Health {
    datastore: OnceLock<String>,
    synced: AtomicBool,
    routes_programmed: AtomicBool,
    objects: AtomicI64,
    /// Resources the API server refuses the agent (403): its RBAC lacks a rule.
    forbidden: std::sync::Mutex<std::collections::BTreeSet<&'static str>>,
    /// When the agent's event loop last ran its heartbeat task (None before it starts).
    beat: std::sync::Mutex<Option<std::time::Instant>>,
}

impl Health {
    pub fn set_datastore(&self, source: String) {
        let _ = self.datastore.set(source);
    }

    pub fn datastore(&self) -> String {
        self.datastore.get().cloned().unwrap_or_default()
    }

    /// The datastore's state as the model holds it now.
    pub fn set_model(&self, synced: bool, objects: usize) {
        self.synced.store(synced, Ordering::Relaxed);
        self.objects.store(objects as i64, Ordering::Relaxed);
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    pub fn objects(&self) -> usize {
        self.objects.load(Ordering::Relaxed).max(0) as usize
    }

    /// Whether the API server currently refuses the agent `resource` (list/watch answered 403).
    pub fn set_forbidden(&self, resource: &'static str, forbidden: bool) {
        let mut set = self.forbidden.lock().unwrap_or_else(|e| e.into_inner());
        if forbidden {
            set.insert(resource);
        } else {
            set.remove(resource);
        }
    }

    pub fn forbidden(&self) -> Vec<&'static str> {
        let set = self.forbidden.lock().unwrap_or_else(|e| e.into_inner());
        set.iter().copied().collect()
    }

    /// The agent's event loop is running now.
    pub fn beat(&self) {
        *self.beat.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::time::Instant::now());
    }

    /// How long since the event loop last ran its heartbeat (None before it started).
    pub fn since_beat(&self) -> Option<std::time::Duration> {
        let beat = self.beat.lock().unwrap_or_else(|e| e.into_inner());
        beat.map(|b| b.elapsed())
    }

    /// The first full route reconcile is done.
    pub fn set_routes_programmed(&self) {
        self.routes_programmed.store(true, Ordering::Relaxed);
    }

    pub fn routes_programmed(&self) -> bool {
        self.routes_programmed.load(Ordering::Relaxed)
    }
}

/// Every series the agent exports.
pub struct Metrics {
    registry: Registry,
    /// Serializes refresh + encode, so two scrapes never see each other's half-filled families.
    scrape: Mutex<()>,
    pub health: Health,
    pub ready: Gauge,
    pub datastore_synced: Gauge,
    pub bgp_session_up: Family<Labels, Gauge>,
    pub bgp_session_state: Family<Labels, Gauge>,
    pub bgp_session_uptime: Family<Labels, Gauge>,
    pub bgp_prefixes_received: Family<Labels, Gauge>,
    pub bgp_prefixes_accepted: Family<Labels, Gauge>,
    pub bgp_prefixes_advertised: Family<Labels, Gauge>,
    pub bgp_updates_received: Family<Labels, Counter>,
    pub bgp_updates_sent: Family<Labels, Counter>,
    pub bgp_routes_installed: Gauge,
    pub bfd_session_up: Family<Labels, Gauge>,
    pub bfd_detection_time: Family<Labels, Gauge>,
    pub bfd_last_diagnostic: Family<Labels, Gauge>,
    pub endpoints: Gauge,
    pub ipam_allocated: Gauge,
    pub ipam_capacity: Family<Labels, Gauge>,
    pub policy_apply_seconds: Histogram,
    pub cni_request_seconds: Family<Labels, Histogram>,
    /// Packets per deciding policy rule (read from the kernel at scrape).
    pub policy_rules: rules::RuleMetrics,
    /// Flow records read from the nflog group, by verdict.
    pub flow_log_records: Family<Labels, Counter>,
    /// Times the kernel had more flow-log packets than the reader's socket could hold.
    pub flow_log_overruns: Counter,
}

fn latency_buckets() -> Histogram {
    // 100 µs to ~6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("sepal");
        let m = Metrics {
            registry: Registry::default(),
            scrape: Mutex::new(()),
            health: Health::default(),
            ready: Gauge::default(),
            datastore_synced: Gauge::default(),
            bgp_session_up: Family::default(),
            bgp_session_state: Family::default(),
            bgp_session_uptime: Family::default(),
            bgp_prefixes_received: Family::default(),
            bgp_prefixes_accepted: Family::default(),
            bgp_prefixes_advertised: Family::default(),
            bgp_updates_received: Family::default(),
            bgp_updates_sent: Family::default(),
            bgp_routes_installed: Gauge::default(),
            bfd_session_up: Family::default(),
            bfd_detection_time: Family::default(),
            bfd_last_diagnostic: Family::default(),
            endpoints: Gauge::default(),
            ipam_allocated: Gauge::default(),
            ipam_capacity: Family::default(),
            policy_apply_seconds: latency_buckets(),
            cni_request_seconds: Family::new_with_constructor(latency_buckets),
            policy_rules: rules::RuleMetrics::default(),
            flow_log_records: Family::default(),
            flow_log_overruns: Counter::default(),
        };
        let r = &mut registry;
        r.register(
            "ready",
            "1 once the datastore synced and routes are programmed",
            m.ready.clone(),
        );
        r.register(
            "datastore_synced",
            "1 once the datastore delivered its initial state",
            m.datastore_synced.clone(),
        );
        r.register(
            "bgp_session_up",
            "1 when the BGP session is Established",
            m.bgp_session_up.clone(),
        );
        r.register(
            "bfd_session_up",
            "1 when the BFD session with the peer is Up",
            m.bfd_session_up.clone(),
        );
        r.register(
            "bfd_detection_time_milliseconds",
            "The BFD detection time in force with the peer",
            m.bfd_detection_time.clone(),
        );
        r.register(
            "bfd_last_diagnostic",
            "The RFC 5880 diagnostic code of the session's last change (1: detection time expired, 3: neighbor signaled down, 7: administratively down)",
            m.bfd_last_diagnostic.clone(),
        );
        r.register(
            "bgp_session_state",
            "1 for the BGP session's current FSM state",
            m.bgp_session_state.clone(),
        );
        r.register(
            "bgp_session_uptime_seconds",
            "Seconds the BGP session has been Established (0 when down)",
            m.bgp_session_uptime.clone(),
        );
        r.register(
            "bgp_prefixes_received",
            "Prefixes the peer announced and has not withdrawn",
            m.bgp_prefixes_received.clone(),
        );
        r.register(
            "bgp_prefixes_accepted",
            "Prefixes from the peer that passed the import filter",
            m.bgp_prefixes_accepted.clone(),
        );
        r.register(
            "bgp_prefixes_advertised",
            "Prefixes advertised to the peer",
            m.bgp_prefixes_advertised.clone(),
        );
        r.register(
            "bgp_updates_received",
            "UPDATE messages received from the peer",
            m.bgp_updates_received.clone(),
        );
        r.register(
            "bgp_updates_sent",
            "UPDATE messages sent to the peer",
            m.bgp_updates_sent.clone(),
        );
        r.register(
            "bgp_routes_installed",
            "BGP-learned routes Sepal wants in the kernel",
            m.bgp_routes_installed.clone(),
        );
        r.register(
            "endpoints",
            "Pod attachments on this node",
            m.endpoints.clone(),
        );
        r.register(
            "ipam_allocated_addresses",
            "Pod addresses allocated on this node",
            m.ipam_allocated.clone(),
        );
        r.register(
            "ipam_block_capacity_addresses",
            "Addresses a node block can hand out",
            m.ipam_capacity.clone(),
        );
        r.register(
            "policy_apply_duration_seconds",
            "Time to compile NetworkPolicy and apply it to nftables",
            m.policy_apply_seconds.clone(),
        );
        r.register(
            "cni_request_duration_seconds",
            "Time the agent took to answer a CNI plugin request",
            m.cni_request_seconds.clone(),
        );
        m.policy_rules.register(r);
        r.register(
            "flow_log_packets",
            "Packets the flow log read from its nflog group (the kernel's rate bound applied)",
            m.flow_log_records.clone(),
        );
        r.register(
            "flow_log_overruns",
            "Times the flow log's socket overflowed and the kernel dropped records",
            m.flow_log_overruns.clone(),
        );
        Metrics { registry, ..m }
    }

    /// One CNI request answered (`op`: add, del, check, status, gc; `result`: ok or error).
    pub fn observe_cni(&self, op: &str, ok: bool, took: Duration) {
        let labels = vec![
            ("op", op.to_string()),
            ("result", if ok { "ok" } else { "error" }.to_string()),
        ];
        self.cni_request_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    /// The text exposition after `refresh` has filled the scrape-time families.
    pub fn render(&self, refresh: impl FnOnce(&Metrics)) -> String {
        let _guard = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        refresh(self);
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &self.registry) {
            tracing::warn!("encoding metrics: {e}");
        }
        out
    }
}

/// The process's metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_series() {
        let m = Metrics::new();
        m.observe_cni("add", true, Duration::from_millis(3));
        m.policy_apply_seconds.observe(0.002);
        let text = m.render(|m| {
            m.endpoints.set(2);
            let peer = vec![("peer", "10.0.0.1".to_string())];
            m.bgp_session_up.get_or_create(&peer).set(1);
            m.bgp_updates_received.get_or_create(&peer).inc_by(7);
            m.bfd_session_up.get_or_create(&peer).set(1);
            m.bfd_detection_time.get_or_create(&peer).set(900);
            m.bfd_last_diagnostic.get_or_create(&peer).set(1);
        });
        for series in [
            "sepal_endpoints 2",
            "sepal_bgp_session_up{peer=\"10.0.0.1\"} 1",
            "sepal_bgp_updates_received_total{peer=\"10.0.0.1\"} 7",
            "sepal_bfd_session_up{peer=\"10.0.0.1\"} 1",
            "sepal_bfd_detection_time_milliseconds{peer=\"10.0.0.1\"} 900",
            "sepal_bfd_last_diagnostic{peer=\"10.0.0.1\"} 1",
            "sepal_cni_request_duration_seconds_count{op=\"add\",result=\"ok\"} 1",
            "sepal_policy_apply_duration_seconds_count 1",
            "sepal_ready 0",
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
    }
}
