//! `sepal flows [--denied] [--follow] [--json]`: asks the agent (or every node of a lab) for its
//! flow records and prints them, one line or one JSON object per record; `--follow` keeps
//! asking for the records after the last one printed until interrupted.

use super::record::FlowRecord;
use super::{FlowsReport, FlowsRequest};
use crate::admin::{self, AdminRequest};
use crate::ops::AgentTarget;
use anyhow::{Context, Result};
use clap::Args;
use std::path::PathBuf;
use std::time::Duration;

/// How often `--follow` asks again.
const POLL: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, Args)]
pub struct FlowsArgs {
    /// Only flows a rule denied.
    #[arg(long)]
    pub denied: bool,
    /// Keep printing new records as they come (until interrupted).
    #[arg(long)]
    pub follow: bool,
    /// One JSON object per record and line.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub target: AgentTarget,
}

/// One agent asked, and the last record printed from it.
struct Source {
    node: Option<String>,
    socket: PathBuf,
    after: u64,
    /// Whether the last report said the reader reads (notes only on a change).
    reading: Option<bool>,
}

impl Source {
    fn ask(&self, denied: bool) -> Result<FlowsReport> {
        let request = AdminRequest::Flows(FlowsRequest {
            denied,
            after: self.after,
        });
        admin::call(&self.socket, &request).with_context(|| match &self.node {
            Some(n) => format!("asking node {n}'s agent"),
            None => "asking the agent".to_string(),
        })
    }

    /// Notes for the operator on stderr: a reader that does not read, records lost between two
    /// polls, an agent that restarted (its records start again from 1).
    fn check(&mut self, report: &FlowsReport) {
        if self.reading != Some(report.reading) && !report.reading {
            eprintln!(
                "note: node {}: the flow log is not reading nflog group {}: {}",
                report.node,
                report.group,
                report.error.as_deref().unwrap_or("starting")
            );
        }
        self.reading = Some(report.reading);
        if report.last_seq < self.after {
            eprintln!(
                "note: node {}: the agent restarted, its records start again",
                report.node
            );
            self.after = 0;
            return;
        }
        if let Some(first) = report
            .first_seq
            .filter(|f| self.after > 0 && *f > self.after + 1)
        {
            eprintln!(
                "note: node {}: {} records were dropped from the agent's buffer before they were read",
                report.node,
                first - self.after - 1
            );
        }
        self.after = self.after.max(report.last_seq);
    }
}

fn print(records: &mut [FlowRecord], json: bool) -> Result<()> {
    // One node's records are in order; several nodes' are merged by time (RFC 3339 in
    // milliseconds sorts as text).
    records.sort_by(|a, b| (&a.time, &a.node, a.seq).cmp(&(&b.time, &b.node, b.seq)));
    for r in records.iter() {
        if json {
            println!("{}", serde_json::to_string(r)?);
        } else {
            println!("{}", r.line());
        }
    }
    Ok(())
}

pub fn run(args: &FlowsArgs) -> Result<()> {
    let mut sources: Vec<Source> = args
        .target
        .agents()?
        .into_iter()
        .map(|(node, socket)| Source {
            node,
            socket,
            after: 0,
            reading: None,
        })
        .collect();
    let several = sources.len() > 1;
    loop {
        let mut records = Vec::new();
        for source in &mut sources {
            let report = source.ask(args.denied)?;
            source.check(&report);
            records.extend(report.records);
        }
        print(&mut records, args.json)?;
        if !args.follow {
            if records.is_empty() && !args.json {
                let nodes = if several { " on any node" } else { "" };
                eprintln!(
                    "no flow records{nodes} ({} are logged; see `sepal node --flow-logs`)",
                    if args.denied {
                        "denied flows"
                    } else {
                        "denied flows, and allowed ones with --flow-logs all,"
                    }
                );
            }
            return Ok(());
        }
        std::thread::sleep(POLL);
    }
}
