//! `sepal policy explain`: the agent answers from its own model and its table's counters (over the
//! operator socket), the CLI prints the answer.

use crate::admin::{self, AdminRequest, Flow, TraceRequest};
use crate::node::Agent;
use crate::ops::FlowArgs;
use anyhow::Result;
use sepal_felix::nft::RuleCounter;
use sepal_felix::policy::{Cluster, DirectionVerdict, Explainer};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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
    /// The tier that decided each direction (`Admin`, `NetworkPolicy`, `Baseline`; none when
    /// nothing did) and the deciding rule's comment, as the counters and flow logs name it.
    #[serde(default)]
    pub egress_tier: Option<String>,
    #[serde(default)]
    pub ingress_tier: Option<String>,
    #[serde(default)]
    pub egress_rule: Option<String>,
    #[serde(default)]
    pub ingress_rule: Option<String>,
}

/// The agent's side: explains from the model (with this node's endpoints) and reads the counters.
pub async fn answer(
    agent: &Arc<Mutex<Agent>>,
    req: &TraceRequest,
) -> Result<ExplainReport, String> {
    let flow = req.flow()?;
    let a = agent.lock().await;
    // No table yet (nothing isolated, or policy not applied): no counts, the verdict stands.
    let counters = a.policy_counters().unwrap_or_default();
    report(a.node_name(), &a.policy_cluster(), &counters, &flow)
}

/// The report for one packet on `cluster`, with the rules' `counters`.
pub fn report(
    node: &str,
    cluster: &Cluster,
    counters: &BTreeMap<(String, String), RuleCounter>,
    flow: &Flow,
) -> Result<ExplainReport, String> {
    let explanation = Explainer::new(cluster)
        .explain(&flow.from, &flow.to, flow.protocol, flow.port)
        .map_err(|e| e.to_string())?;
    let [egress_packets, ingress_packets] = explanation.counted(counters);
    let rule = |v: &DirectionVerdict| match v {
        DirectionVerdict::Allowed { comment, .. } => Some(comment.clone()),
        DirectionVerdict::Cluster(rule) => Some(rule.comment.clone()),
        _ => None,
    };
    Ok(ExplainReport {
        node: node.to_string(),
        allowed: explanation.allowed,
        text: explanation.report(counters),
        egress_packets,
        ingress_packets,
        egress_tier: explanation.egress.tier().map(str::to_string),
        ingress_tier: explanation.ingress.tier().map(str::to_string),
        egress_rule: rule(&explanation.egress),
        ingress_rule: rule(&explanation.ingress),
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
