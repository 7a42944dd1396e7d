// Milestones of one agent start, from its JSON log: when each resource's initial list was done,
// when routes were reconciled and when /readyz started serving, in ms after the exec. They show
// where the time to ready goes (which list is the long one, and what follows the sync).

use serde_json::Value;
use std::time::SystemTime;

/// Seconds since midnight (UTC), the part of a timestamp a bench run's span needs.
fn time_of_day(t: SystemTime) -> f64 {
    let since = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    since % 86_400.0
}

/// `2026-12-01T22:54:42.707611Z` → seconds since midnight.
fn parse_time_of_day(stamp: &str) -> Option<f64> {
    let clock = stamp.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = clock.split(':');
    let h: f64 = parts.next()?.parse().ok()?;
    let m: f64 = parts.next()?.parse().ok()?;
    let s: f64 = parts.next()?.parse().ok()?;
    Some(h * 3600.0 + m * 60.0 + s)
}

/// (ms after `started`, what happened), in log order.
pub fn milestones(log: &str, started: SystemTime) -> Vec<(f64, String)> {
    let start = time_of_day(started);
    log.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|e| {
            let f = &e["fields"];
            let what = match f["message"].as_str()? {
                "initial list done" => format!(
                    "{} listed ({})",
                    f["resource"].as_str().unwrap_or("?"),
                    f["objects"]
                ),
                "routes reconciled" => "routes reconciled".into(),
                "metrics and health serving" => "serving".into(),
                _ => return None,
            };
            let at = parse_time_of_day(e["timestamp"].as_str()?)?;
            Some((((at - start).rem_euclid(86_400.0)) * 1000.0, what))
        })
        .collect()
}

/// `what at N ms, …` for a run's line.
pub fn describe(m: &[(f64, String)]) -> String {
    let parts: Vec<String> = m
        .iter()
        .map(|(ms, what)| format!("{what} {ms:.0}"))
        .collect();
    parts.join(", ")
}
