//! Flow-log rules in table `inet sepal`: before each deciding rule (a `drop`, and an `accept`
//! when allowed flows are logged too) a rule with the same matches copies the packet to an nflog
//! group, through a `limit` object shared by every log rule of that verdict.
//!
//! Why a rule of its own: a `limit` that is over its rate stops the rule it is in, so inside the
//! deciding rule it would skip the verdict (a drop would fall through to the base chain's accept).
//! A separate log rule that stops there changes nothing: the deciding rule after it still
//! decides. It has no counter and no comment, so the counters per comment stay the deciding
//! rules' own.
//!
//! Why shared limits: the bound is per node, not per rule, so a flood costs the kernel one token
//! bucket check per packet and the reader at most `rate` records per second and verdict, however
//! many rules it hits. Accept rules only ever see a flow's first packet (established packets are
//! accepted earlier), so allowed logging costs one record per new flow, up to the bound.

use std::fmt::Write as _;

use crate::nft::{quote, render_matches};
use crate::policy::{Action, NftRule};

/// Flow logging of one table: denied flows always, allowed ones when asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlowLog {
    /// The nflog group the records go to (the agent's own reader binds it).
    pub group: u16,
    /// Also log the first packet of flows an accept rule allows.
    pub allowed: bool,
    /// Most packets logged per second and verdict on the node (burst: as many).
    pub rate: u32,
}

/// The named limit of denied-flow log rules.
pub const LIMIT_DENIED: &str = "flow-log-denied";
/// The named limit of allowed-flow log rules.
pub const LIMIT_ALLOWED: &str = "flow-log-allowed";
/// Prefix word of a record a drop rule logged (then a space and the rule's comment).
pub const VERB_DENIED: &str = "drop";
/// Prefix word of a record an accept rule logged.
pub const VERB_ALLOWED: &str = "accept";

/// What the kernel keeps of a log prefix (NF_LOG_PREFIXLEN, without its NUL).
const MAX_PREFIX: usize = 127;

/// The nflog prefix of a record: `drop COMMENT` or `accept COMMENT`, cut at a character boundary
/// to what the kernel keeps (comments are at most 120 bytes, so they fit whole).
pub fn prefix(verb: &str, comment: &str) -> String {
    let mut prefix = format!("{verb} {comment}");
    let mut end = prefix.len().min(MAX_PREFIX);
    while !prefix.is_char_boundary(end) {
        end -= 1;
    }
    prefix.truncate(end);
    prefix
}

/// The limit objects a table with flow logs declares (before any rule refers to them).
pub(crate) fn add_limits(out: &mut String, table: &str, flow: Option<&FlowLog>) {
    let Some(flow) = flow else {
        return;
    };
    let mut limits = vec![LIMIT_DENIED];
    if flow.allowed {
        limits.push(LIMIT_ALLOWED);
    }
    for name in limits {
        writeln!(
            out,
            "add limit {table} {name} {{ rate {rate}/second burst {rate} packets }}",
            rate = flow.rate.max(1)
        )
        .ok();
    }
}

/// The log rule that goes before `rule` (without the `add rule TABLE CHAIN` prefix), if `rule`
/// decides a flow that is logged.
pub(crate) fn log_rule(rule: &NftRule, flow: Option<&FlowLog>) -> Option<String> {
    let (limit, verb) = log_rule_parts(rule, flow)?;
    Some(format!(
        "{}limit name \"{limit}\" log prefix {} group {}",
        render_matches(rule),
        quote(&prefix(verb, &rule.comment)),
        flow?.group
    ))
}

/// The limit and the verb of `rule`'s flow-log rule, if it has one.
pub(crate) fn log_rule_parts(
    rule: &NftRule,
    flow: Option<&FlowLog>,
) -> Option<(&'static str, &'static str)> {
    let flow = flow?;
    match rule.action {
        Action::Drop => Some((LIMIT_DENIED, VERB_DENIED)),
        Action::Accept if flow.allowed => Some((LIMIT_ALLOWED, VERB_ALLOWED)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nft::{render_diff, render_full, Options};
    use crate::policy::{compile, tests::cluster, Family, Match};

    const DENY_81: &str = "metadata: {name: web, namespace: x}\nspec:\n  podSelector: {matchLabels: {pod: a}}\n  ingress: [{from: [{namespaceSelector: {matchLabels: {ns: y}}}], ports: [{port: 80}]}]\n";

    fn opts(allowed: bool) -> Options {
        Options {
            flow_log: Some(FlowLog {
                group: 83,
                allowed,
                rate: 50,
            }),
            ..Options::default()
        }
    }

    #[test]
    fn every_drop_gets_a_limited_log_rule_before_it() {
        let full = render_full(&compile(&cluster(&[DENY_81])), &opts(false));
        assert!(full
            .contains("add limit inet sepal flow-log-denied { rate 50/second burst 50 packets }"));
        assert!(!full.contains(LIMIT_ALLOWED), "{full}");
        let lines: Vec<&str> = full.lines().collect();
        let drop = lines
            .iter()
            .position(|l| l.ends_with(r#"counter drop comment "x/a ingress default deny""#))
            .expect("the default deny");
        assert_eq!(
            lines[drop - 1],
            format!(
                r#"add rule inet sepal {} limit name "flow-log-denied" log prefix "drop x/a ingress default deny" group 83"#,
                lines[drop].split(' ').nth(4).unwrap()
            )
        );
        // The limit is declared before the first rule that names it.
        let limit = full.find("add limit").unwrap();
        assert!(limit < full.find("limit name").unwrap());
        // Allowed flows only when asked: accept rules keep their single line.
        assert!(!full.contains("log prefix \"accept "), "{full}");
    }

    #[test]
    fn allowed_logging_repeats_the_accept_rules_matches() {
        let rule = NftRule {
            matches: vec![
                Match::SrcAddr(Family::V4, "pods-1".into()),
                Match::ProtoPort("ports-2".into()),
            ],
            action: Action::Accept,
            comment: "x/web ingress[0]".into(),
        };
        assert_eq!(log_rule(&rule, opts(false).flow_log.as_ref()), None);
        assert_eq!(
            log_rule(&rule, opts(true).flow_log.as_ref()).unwrap(),
            r#"ip saddr @pods-1 meta l4proto . th dport @ports-2 limit name "flow-log-allowed" log prefix "accept x/web ingress[0]" group 83"#
        );
        let full = render_full(&compile(&cluster(&[DENY_81])), &opts(true));
        assert!(
            full.contains("add limit inet sepal flow-log-allowed {"),
            "{full}"
        );
        // No verdict-less rule logs, whatever the options: jumps, returns, passes.
        for action in [Action::Jump("c".into()), Action::Return, Action::Pass] {
            let rule = NftRule {
                action,
                ..rule.clone()
            };
            assert_eq!(log_rule(&rule, opts(true).flow_log.as_ref()), None);
        }
        assert_eq!(log_rule(&rule, None), None);
    }

    #[test]
    fn refilled_chains_keep_their_log_rules() {
        let before = compile(&cluster(&[]));
        let after = compile(&cluster(&[DENY_81]));
        let diff = render_diff(&before, &after, &opts(false));
        assert!(
            diff.contains(r#"log prefix "drop x/a ingress default deny" group 83"#),
            "{diff}"
        );
    }

    #[test]
    fn prefixes_fit_the_kernel() {
        let long = "é".repeat(70);
        let p = prefix(VERB_ALLOWED, &long);
        assert!(p.len() <= MAX_PREFIX && p.starts_with("accept é"));
        assert_eq!(prefix(VERB_DENIED, "a/b egress[0]"), "drop a/b egress[0]");
    }
}
