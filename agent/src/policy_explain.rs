//! `sepal policy explain`: the agent answers from its own model and its table's counters (over the
//! operator socket), the CLI prints the answer.

use crate::admin::{self, AdminRequest, TraceRequest};
use crate::node::Agent;
use crate::ops::FlowArgs;
use anyhow::Result;
use sepal_felix::policy::{parse_port, ExplainPeer, Explainer};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use tokio::sync::Mutex;

/// The verdict for one packet on the asked node, the policy rule that decided each direction,
/// and the packets the kernel counted for those decisions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExplainReport {
    pub node: String,
    pub allowed: bool,
    /// Human-readable explanation with the counters.
    pub text: String,
    /// Packets the deciding rule matched (allowed) or the pod's default deny dropped (denied),
    /// per direction; none where no rule decides.
    pub egress_packets: Option<u64>,
    pub ingress_packets: Option<u64>,
}

/// The agent's side: explains from the model (with this node's endpoints) and reads the counters.
pub async fn answer(
    agent: &Arc<Mutex<Agent>>,
    req: &TraceRequest,
) -> Result<ExplainReport, String> {
    let from: ExplainPeer = req.from.parse()?;
    let to: ExplainPeer = req.to.parse()?;
    let (port, protocol) = parse_port(req.port.as_deref().unwrap_or("80/TCP"))?;
    let a = agent.lock().await;
    let cluster = a.policy_cluster();
    let explanation = Explainer::new(&cluster)
        .explain(&from, &to, protocol, port)
        .map_err(|e| e.to_string())?;
    // No table yet (nothing isolated, or policy not applied): no counts, the verdict stands.
    let counters = a.policy_counters().unwrap_or_default();
    let [egress_packets, ingress_packets] = explanation.counted(&counters);
    Ok(ExplainReport {
        node: a.node_name().to_string(),
        allowed: explanation.allowed,
        text: explanation.report(&counters),
        egress_packets,
        ingress_packets,
    })
}

/// The CLI's side: asks the agent and prints its answer.
pub fn run(args: &FlowArgs) -> Result<()> {
    let request = AdminRequest::PolicyExplain(args.request());
    let report: ExplainReport = admin::call(&args.target.socket()?, &request)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!("node {}", report.node);
        print!("{}", report.text);
    }
    Ok(())
}
