//! One iperf3 client run, read from its JSON report: what it moved and what that cost.
//!
//! Throughput between namespaces on a shared virtual machine comes in episodes: for half a second
//! or so a stream runs at two thirds of its usual rate while something outside the machine takes
//! its CPU, then recovers. A whole-run mean is as noisy as those episodes, so the figure the
//! benches compare is the median of quarter-second intervals, which sits at the stream's steady
//! rate; the mean is reported beside it.

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Report interval, seconds.
const INTERVAL: &str = "0.25";

/// What one run measured.
#[derive(Debug, Clone, Copy)]
pub struct IperfRun {
    /// Median of the interval rates, bit/s.
    pub steady_bps: f64,
    /// Bytes received over the whole run's time, bit/s.
    pub mean_bps: f64,
    /// CPU time of sender and receiver (with the forwarding softirq work they run) per MB
    /// moved, which other load on the machine barely moves.
    pub cpu_us_per_mb: f64,
}

/// The client's command line: one TCP stream to `server` for `seconds`, JSON report.
pub fn client_args(server: &str, seconds: u64) -> Vec<String> {
    [
        "iperf3",
        "-c",
        server,
        "-t",
        &seconds.to_string(),
        "-i",
        INTERVAL,
        "-J",
    ]
    .map(String::from)
    .to_vec()
}

/// Reads a client's JSON report; `label` names the path in errors.
pub fn parse(stdout: &[u8], label: &str) -> Result<IperfRun> {
    let report: Value = serde_json::from_slice(stdout)
        .with_context(|| format!("{label}: iperf3 output is not JSON"))?;
    if let Some(e) = report.get("error") {
        bail!("{label}: iperf3: {e}");
    }
    let number = |v: &Value, what: &str| {
        v.as_f64()
            .with_context(|| format!("{label}: no {what} in iperf3's report"))
    };
    let end = &report["end"];
    let mean_bps = number(&end["sum_received"]["bits_per_second"], "end.sum_received")?;
    let secs = number(&end["sum_sent"]["seconds"], "end.sum_sent.seconds")?;
    let mb = number(&end["sum_sent"]["bytes"], "end.sum_sent.bytes")? / 1e6;
    let cpu = &end["cpu_utilization_percent"];
    let percent = number(&cpu["host_total"], "end.cpu_utilization_percent")?
        + number(&cpu["remote_total"], "end.cpu_utilization_percent")?;
    let mut intervals: Vec<f64> = report["intervals"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
                .collect()
        })
        .unwrap_or_default();
    intervals.sort_by(|a, b| a.total_cmp(b));
    let steady_bps = intervals
        .get(intervals.len() / 2)
        .copied()
        .unwrap_or(mean_bps);
    Ok(IperfRun {
        steady_bps,
        mean_bps,
        cpu_us_per_mb: percent / 100.0 * secs * 1e6 / mb.max(1e-9),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steady_rate_is_the_median_interval() {
        let report = br#"{"intervals": [
            {"sum": {"bits_per_second": 20e9}}, {"sum": {"bits_per_second": 11e9}},
            {"sum": {"bits_per_second": 19e9}}, {"sum": {"bits_per_second": 21e9}},
            {"sum": {"bits_per_second": 10e9}}],
          "end": {"sum_received": {"bits_per_second": 16.2e9},
                  "sum_sent": {"seconds": 1.25, "bytes": 2.5e9},
                  "cpu_utilization_percent": {"host_total": 60.0, "remote_total": 40.0}}}"#;
        let run = parse(report, "test").unwrap();
        assert_eq!(run.steady_bps, 19e9);
        assert_eq!(run.mean_bps, 16.2e9);
        assert!((run.cpu_us_per_mb - 500.0).abs() < 1e-6);
        assert!(parse(br#"{"error": "unable to connect"}"#, "test").is_err());
    }
}
