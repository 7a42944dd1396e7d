// The agent's API requests, counted two ways: the API server's own `apiserver_request_total`
// (all clients, by verb; the difference around the agent's life less an idle window's) and the
// audit log, which names the ServiceAccount of each request (only the agent's), by verb.

use crate::kube::Cluster;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Requests by verb (the metrics' upper-case verbs, or the audit's lower-case ones).
pub type ByVerb = BTreeMap<String, i64>;

/// Every request the API server has counted so far, of any client, by verb.
pub fn served(cluster: &Cluster) -> ByVerb {
    let mut by_verb = ByVerb::new();
    for line in cluster.metrics().lines() {
        let Some(labels) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let verb = labels
            .split_once("verb=\"")
            .and_then(|(_, rest)| rest.split_once('"'))
            .map_or("?", |(v, _)| v);
        let count = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0);
        *by_verb.entry(verb.to_string()).or_insert(0) += count as i64;
    }
    by_verb
}

/// `after - before`, verb by verb; verbs that did not change are left out.
pub fn difference(after: &ByVerb, before: &ByVerb) -> ByVerb {
    after
        .iter()
        .map(|(v, n)| (v.clone(), n - before.get(v).copied().unwrap_or(0)))
        .filter(|(_, n)| *n != 0)
        .collect()
}

pub fn total(v: &ByVerb) -> i64 {
    v.values().sum()
}

/// The agent's audited requests after the first `skip` audit events: distinct audit IDs (a
/// watch is audited when its response starts and again when it ends), by verb.
pub fn audited(cluster: &Cluster, skip: usize) -> ByVerb {
    let events = cluster.agent_requests();
    let mut seen = BTreeSet::new();
    let mut by_verb = ByVerb::new();
    for e in events.iter().skip(skip) {
        let id = e["auditID"].as_str().unwrap_or_default().to_string();
        if seen.insert(id) {
            let verb = match &e["verb"] {
                Value::String(v) => v.clone(),
                _ => "?".into(),
            };
            *by_verb.entry(verb).or_insert(0) += 1;
        }
    }
    by_verb
}
