//! `sepal_policy_rule_packets_total{tier, policy, rule, verdict}`: the packets each deciding
//! policy rule accepted, dropped or passed, from the kernel's own rule counters in table
//! `inet sepal`, read at every scrape.
//!
//! The kernel's counters are exact but not monotonic for Prometheus: a chain that a policy change
//! refills starts its rules at 0 again. So the series are the agent's own counters, advanced by
//! what each rule counted since the last read (a counter found lower than before restarted from
//! 0). Packets a rule counted between the last scrape and a refill of its chain are lost.
//!
//! Cardinality is bounded: at most `max_series` rules (comments) have series of their own, taken
//! first come; the packets of every other rule add up in the `_overflow` series of their verdict,
//! and `sepal_policy_rule_overflow_rules` says how many rules that is. A rule gone from the table
//! loses its series and frees its place.

use super::Labels;
use crate::flows::rule::Decision;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

/// Series with a rule of their own, by default (`--policy-rule-series`).
pub const DEFAULT_SERIES: usize = 1000;
/// The label values of the series the rules beyond the cap share.
pub const OVERFLOW: &str = "_overflow";

/// What a counted rule does with the packets it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RuleVerdict {
    Allowed,
    Denied,
    /// A ClusterNetworkPolicy `Pass`: on to the next tier.
    Passed,
}

impl RuleVerdict {
    fn as_str(self) -> &'static str {
        match self {
            RuleVerdict::Allowed => "allowed",
            RuleVerdict::Denied => "denied",
            RuleVerdict::Passed => "passed",
        }
    }
}

/// One deciding rule's kernel counter: its chain, comment, verdict and packets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRule {
    pub chain: String,
    pub comment: String,
    pub verdict: RuleVerdict,
    pub packets: u64,
}

/// The deciding rules of `nft -j list table inet sepal`: those with a comment that accept, drop
/// or pass (jumps, returns and the tier bookkeeping are not decisions).
pub fn parse_rules(json: &str) -> Result<Vec<KernelRule>, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("nft JSON: {e}"))?;
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("nft JSON: no `nftables` array")?;
    let mut out = Vec::new();
    for rule in items.iter().filter_map(|i| i.get("rule")) {
        let (Some(chain), Some(comment), Some(expr)) = (
            rule.get("chain").and_then(Value::as_str),
            rule.get("comment").and_then(Value::as_str),
            rule.get("expr").and_then(Value::as_array),
        ) else {
            continue;
        };
        let has = |key: &str| expr.iter().any(|e| e.get(key).is_some());
        let verdict = if has("accept") {
            RuleVerdict::Allowed
        } else if has("drop") {
            RuleVerdict::Denied
        } else if has("return") && has("mangle") {
            RuleVerdict::Passed
        } else {
            continue;
        };
        let packets = expr
            .iter()
            .filter_map(|e| e.get("counter")?.get("packets")?.as_u64())
            .sum();
        out.push(KernelRule {
            chain: chain.to_string(),
            comment: comment.to_string(),
            verdict,
            packets,
        });
    }
    Ok(out)
}

/// The deciding rules of this network namespace's table (none when it has no table yet).
pub fn read_kernel() -> Result<Vec<KernelRule>, String> {
    // Terse: the sets' elements (every pod address) are not needed for counters.
    let args = ["-t", "-j", "list", "table", "inet", sepal_felix::nft::TABLE];
    match sepal_felix::exec::run(&["nft".to_string()], None, &args, None) {
        Ok(json) => parse_rules(&json),
        Err(e) if e.to_string().contains("No such file or directory") => Ok(Vec::new()),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Debug, Default)]
struct State {
    /// The kernel counter last read, per (chain, comment, verdict).
    last: BTreeMap<(String, String, RuleVerdict), u64>,
    /// Rules with series of their own, and their labels.
    own: BTreeMap<(String, RuleVerdict), Labels>,
}

/// The per-rule families and what they were last advanced from.
pub struct RuleMetrics {
    packets: Family<Labels, Counter>,
    overflow_rules: Gauge,
    state: Mutex<State>,
    max_series: std::sync::atomic::AtomicUsize,
}

impl Default for RuleMetrics {
    fn default() -> RuleMetrics {
        RuleMetrics {
            packets: Family::default(),
            overflow_rules: Gauge::default(),
            state: Mutex::default(),
            max_series: DEFAULT_SERIES.into(),
        }
    }
}

fn labels(tier: &str, policy: &str, rule: &str, verdict: RuleVerdict) -> Labels {
    vec![
        ("tier", tier.to_string()),
        ("policy", policy.to_string()),
        ("rule", rule.to_string()),
        ("verdict", verdict.as_str().to_string()),
    ]
}

impl RuleMetrics {
    pub fn register(&self, r: &mut Registry) {
        r.register(
            "policy_rule_packets",
            "Packets a policy rule allowed (a flow's first packet), denied or passed, by tier, policy and rule (its nft comment)",
            self.packets.clone(),
        );
        r.register(
            "policy_rule_overflow_rules",
            "Rules counted in the _overflow series because the per-rule series are capped",
            self.overflow_rules.clone(),
        );
    }

    /// The cap on series with a rule of their own.
    pub fn set_max_series(&self, n: usize) {
        self.max_series
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Advances the series by what the kernel counted since the last read.
    pub fn observe(&self, rules: &[KernelRule]) {
        let max = self.max_series.load(std::sync::atomic::Ordering::Relaxed);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let State { last, own } = &mut *state;
        let present: BTreeSet<(String, RuleVerdict)> = rules
            .iter()
            .map(|r| (r.comment.clone(), r.verdict))
            .collect();
        // Rules gone from the table free their series first, so new ones can take them.
        own.retain(|key, labels| {
            let keep = present.contains(key);
            if !keep {
                self.packets.remove(labels);
            }
            keep
        });
        let mut overflowed = BTreeSet::new();
        let mut seen = BTreeSet::new();
        for r in rules {
            let id = (r.chain.clone(), r.comment.clone(), r.verdict);
            let before = last.get(&id).copied().unwrap_or(0);
            let delta = if r.packets >= before {
                r.packets - before
            } else {
                r.packets
            };
            last.insert(id.clone(), r.packets);
            seen.insert(id);
            let key = (r.comment.clone(), r.verdict);
            if !own.contains_key(&key) && own.len() < max {
                let d = Decision::parse(&r.comment);
                own.insert(
                    key.clone(),
                    labels(
                        d.tier.as_deref().unwrap_or(""),
                        d.policy.as_deref().unwrap_or(""),
                        &r.comment,
                        r.verdict,
                    ),
                );
            }
            let series = match own.get(&key) {
                Some(labels) => labels.clone(),
                None => {
                    overflowed.insert(key);
                    labels(OVERFLOW, OVERFLOW, OVERFLOW, r.verdict)
                }
            };
            let counter = self.packets.get_or_create(&series);
            // Series exist from the first read, zero or not.
            counter.inc_by(delta);
        }
        last.retain(|id, _| seen.contains(id));
        self.overflow_rules.set(overflowed.len() as i64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(chain: &str, comment: &str, verdict: RuleVerdict, packets: u64) -> KernelRule {
        KernelRule {
            chain: chain.into(),
            comment: comment.into(),
            verdict,
            packets,
        }
    }

    fn render(m: &RuleMetrics) -> String {
        let mut r = Registry::with_prefix("sepal");
        m.register(&mut r);
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &r).unwrap();
        out
    }

    #[test]
    fn deciding_rules_come_from_the_tables_json() {
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
          {"rule": {"chain": "pi-1", "comment": "shop/web ingress[0]", "expr": [{"match": {}}, {"counter": {"packets": 2, "bytes": 120}}, {"accept": null}]}},
          {"rule": {"chain": "in-sepa", "comment": "shop/db ingress default deny", "expr": [{"counter": {"packets": 7, "bytes": 420}}, {"drop": null}]}},
          {"rule": {"chain": "ai-1", "comment": "Admin/x ingress[1]", "expr": [{"counter": {"packets": 1, "bytes": 60}}, {"mangle": {}}, {"return": null}]}},
          {"rule": {"chain": "in-sepa", "comment": "Admin/x ingress", "expr": [{"counter": {"packets": 9, "bytes": 1}}, {"jump": {"target": "ai-1"}}]}},
          {"rule": {"chain": "in-sepa", "expr": [{"limit": "flow-log-denied"}, {"log": {"group": 83}}]}}]}"#;
        let rules = parse_rules(json).unwrap();
        assert_eq!(
            rules,
            [
                rule("pi-1", "shop/web ingress[0]", RuleVerdict::Allowed, 2),
                rule(
                    "in-sepa",
                    "shop/db ingress default deny",
                    RuleVerdict::Denied,
                    7
                ),
                rule("ai-1", "Admin/x ingress[1]", RuleVerdict::Passed, 1),
            ]
        );
        assert!(parse_rules("{").is_err());
        assert!(parse_rules("{}").is_err());
    }

    #[test]
    fn series_are_monotonic_across_refills_and_capped() {
        let m = RuleMetrics::default();
        m.set_max_series(2);
        let web = "shop/web ingress[0]";
        let deny = "shop/db ingress default deny";
        m.observe(&[
            rule("pi-1", web, RuleVerdict::Allowed, 5),
            rule("in-a", deny, RuleVerdict::Denied, 3),
            rule(
                "in-b",
                "shop/api ingress default deny",
                RuleVerdict::Denied,
                4,
            ),
        ]);
        let text = render(&m);
        assert!(text.contains(
            r#"sepal_policy_rule_packets_total{tier="NetworkPolicy",policy="shop/web",rule="shop/web ingress[0]",verdict="allowed"} 5"#
        ), "{text}");
        assert!(text.contains(
            r#"sepal_policy_rule_packets_total{tier="NetworkPolicy",policy="",rule="shop/db ingress default deny",verdict="denied"} 3"#
        ), "{text}");
        assert!(text.contains(
            r#"sepal_policy_rule_packets_total{tier="_overflow",policy="_overflow",rule="_overflow",verdict="denied"} 4"#
        ), "{text}");
        assert!(
            text.contains("sepal_policy_rule_overflow_rules 1"),
            "{text}"
        );
        // A refill restarts the kernel's counter: the series keeps counting up.
        m.observe(&[
            rule("pi-1", web, RuleVerdict::Allowed, 2),
            rule(
                "in-b",
                "shop/api ingress default deny",
                RuleVerdict::Denied,
                6,
            ),
        ]);
        let text = render(&m);
        assert!(
            text.contains(r#"rule="shop/web ingress[0]",verdict="allowed"} 7"#),
            "{text}"
        );
        // The default deny that went freed its place: the overflowing rule has its own now.
        assert!(!text.contains("shop/db ingress default deny"), "{text}");
        assert!(
            text.contains(r#"rule="shop/api ingress default deny",verdict="denied"} 2"#),
            "{text}"
        );
        assert!(
            text.contains("sepal_policy_rule_overflow_rules 0"),
            "{text}"
        );
    }
}
