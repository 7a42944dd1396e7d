//! What a rule's comment says about the decision it makes: the tier, the policy, the direction
//! and the rule. Comments are written by felix's compiler (`fit_comment`, `default_deny_comment`,
//! `cluster_rule_comment`); flow records and the per-rule metrics read them back here, and a
//! comment of a shape this version does not know is kept raw, never refused.
//!
//! Shapes (a long `ID` is cut to 70 bytes and followed by `~` and a hash):
//! - `NS/POD ingress default deny`, `NS/POD egress default deny`: a pod's NetworkPolicy default
//!   deny (tier NetworkPolicy, no policy: the pod isolated and no rule matched);
//! - `NS/NAME ingress[0]`, `NS/NAME egress[0,2]`: a NetworkPolicy's rule (or rules with the same
//!   ports);
//! - `Admin/NAME ingress[3]`, `Baseline/NAME egress[0] RULE-NAME`: a ClusterNetworkPolicy rule,
//!   with the rule's `name` if it has one.

use serde::{Deserialize, Serialize};

/// The tier of the namespaced NetworkPolicies, between Admin and Baseline.
pub const NETWORK_POLICY_TIER: &str = "NetworkPolicy";
const CLUSTER_TIERS: [&str; 2] = ["Admin", "Baseline"];
const DEFAULT_DENY: &str = "default deny";

/// A rule comment, parsed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// `Admin`, `NetworkPolicy` or `Baseline`; None for a comment of unknown shape.
    pub tier: Option<String>,
    /// `NS/NAME` of a NetworkPolicy, `NAME` of a ClusterNetworkPolicy; None for a default deny.
    pub policy: Option<String>,
    /// `ingress` or `egress`.
    pub direction: Option<String>,
    /// The rule within the policy: `ingress[0]`, `egress[1,2]`, `ingress[3] RULE-NAME`,
    /// `ingress default deny`.
    pub rule: Option<String>,
    /// The comment itself, as `nft list table inet sepal` and `sepal policy explain` show it.
    pub comment: String,
}

impl Decision {
    /// Parses `comment`; an unknown shape gives a decision with only the raw comment.
    pub fn parse(comment: &str) -> Decision {
        let mut d = Decision {
            tier: None,
            policy: None,
            direction: None,
            rule: None,
            comment: comment.to_string(),
        };
        let Some((id, what)) = comment.split_once(' ') else {
            return d;
        };
        let Some((direction, after)) = direction_of(what) else {
            return d;
        };
        let Some((scope, name)) = id.split_once('/') else {
            return d;
        };
        if scope.is_empty() || name.is_empty() {
            return d;
        }
        let cluster_tier = CLUSTER_TIERS.iter().find(|t| **t == scope);
        let default_deny = after == format!(" {DEFAULT_DENY}");
        let indexed = is_index_list(after);
        match (cluster_tier, default_deny, indexed) {
            (Some(tier), false, Some(rest)) if rest.is_empty() || rest.starts_with(' ') => {
                d.tier = Some(tier.to_string());
                d.policy = Some(name.to_string());
            }
            // Namespace names are DNS labels: `Admin` and `Baseline` cannot be namespaces.
            (None, true, _) => d.tier = Some(NETWORK_POLICY_TIER.to_string()),
            (None, false, Some("")) => {
                d.tier = Some(NETWORK_POLICY_TIER.to_string());
                d.policy = Some(id.to_string());
            }
            _ => return d,
        }
        d.direction = Some(direction.to_string());
        d.rule = Some(what.to_string());
        d
    }

    /// `TIER: COMMENT`, or the comment alone when its shape is unknown.
    pub fn describe(&self) -> String {
        match &self.tier {
            Some(tier) => format!("{tier}: {}", self.comment),
            None => self.comment.clone(),
        }
    }
}

/// `ingress…` or `egress…`: the direction and what follows it.
fn direction_of(what: &str) -> Option<(&'static str, &str)> {
    ["ingress", "egress"]
        .into_iter()
        .find_map(|d| what.strip_prefix(d).map(|rest| (d, rest)))
}

/// `[0]` or `[1,2]` at the start of `s`: what follows it.
fn is_index_list(s: &str) -> Option<&str> {
    let inside = s.strip_prefix('[')?;
    let (list, rest) = inside.split_once(']')?;
    let valid = !list.is_empty()
        && list
            .split(',')
            .all(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
    valid.then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(comment: &str) -> [Option<String>; 4] {
        let d = Decision::parse(comment);
        assert_eq!(d.comment, comment);
        [d.tier, d.policy, d.direction, d.rule]
    }

    fn some(values: [&str; 4]) -> [Option<String>; 4] {
        values.map(|v| (!v.is_empty()).then(|| v.to_string()))
    }

    #[test]
    fn every_shape_the_compiler_writes() {
        assert_eq!(
            parts("shop/web ingress default deny"),
            some(["NetworkPolicy", "", "ingress", "ingress default deny"])
        );
        assert_eq!(
            parts("shop/allow-frontend egress[0,2]"),
            some([
                "NetworkPolicy",
                "shop/allow-frontend",
                "egress",
                "egress[0,2]"
            ])
        );
        assert_eq!(
            parts("Admin/guardrails ingress[3] deny from the internet"),
            some([
                "Admin",
                "guardrails",
                "ingress",
                "ingress[3] deny from the internet"
            ])
        );
        assert_eq!(
            parts("Baseline/defaults egress[0]"),
            some(["Baseline", "defaults", "egress", "egress[0]"])
        );
        // Long names are cut and hashed, the shape stays.
        let long = format!("ns/{}~0123456789 ingress[1]", "p".repeat(67));
        assert_eq!(
            parts(&long)[1].as_deref(),
            Some(&long[..long.find(' ').unwrap()])
        );
        let d = Decision::parse("Admin/x egress[0]");
        assert_eq!(d.describe(), "Admin: Admin/x egress[0]");
    }

    #[test]
    fn unknown_shapes_keep_the_raw_comment() {
        for comment in [
            "",
            "Admin tier: 3 policies",
            "Admin tier passed",
            "Admin/x ingress",
            "Admin/x ingress passed",
            "shop/web ingress[0] extra",
            "shop/web ingress[]",
            "shop/web ingress[a]",
            "shop/web sideways[0]",
            "/web ingress[0]",
            "noslash ingress[0]",
            "Admin/x ingress default deny",
            "é ingress[0",
        ] {
            let d = Decision::parse(comment);
            assert_eq!(parts(comment), [None, None, None, None], "{comment:?}");
            assert_eq!(d.describe(), comment);
        }
    }
}
