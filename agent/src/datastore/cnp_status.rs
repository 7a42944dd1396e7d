// The `Accepted` condition of each ClusterNetworkPolicy, written back to the cluster (Kubernetes
// datastore only). Every agent computes the same condition from the policy alone (felix's
// validation), and writes it only where the object's differs, by a merge patch of the status
// subresource conditional on the resourceVersion the agent saw: of N agents the first write
// wins, the others get 409 Conflict and then see an equal condition. Other conditions (another
// implementation's) are kept as they are.

use super::kube::StatusWriter;
use anyhow::{Context, Result};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{DynamicObject, Patch, PatchParams};
use kube::Api;
use sepal_felix::policy::{
    validate_cluster_policy, ClusterNetworkPolicy, ClusterPeer, Direction, Problem, ProblemScope,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The condition's type.
pub const ACCEPTED: &str = "Accepted";
/// Most bytes of a condition's message (the API allows 32 KiB; a list of problems is cut here).
pub const MAX_MESSAGE: usize = 2048;

/// What the `Accepted` condition says of a policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub status: bool,
    /// `Valid`, `RulesFailClosed` or `Invalid`.
    pub reason: &'static str,
    pub message: String,
    /// The `metadata.generation` it was computed from.
    pub observed_generation: Option<i64>,
}

impl Accepted {
    fn status_text(&self) -> &'static str {
        if self.status {
            "True"
        } else {
            "False"
        }
    }

    /// Whether `current` already says this. The message does not count: it is a function of
    /// the spec like the rest, so it differs only between agent versions, which must not
    /// rewrite each other's condition during a rolling update.
    pub fn matches(&self, current: Option<&Condition>) -> bool {
        current.is_some_and(|c| {
            c.status == self.status_text()
                && c.reason == self.reason
                && c.observed_generation == self.observed_generation
        })
    }
}

/// The condition for a policy, from felix's validation (the same on every node):
/// - `True`/`Valid`: nothing invalid; the message names the `domainNames` peers, which Sepal
///   does not resolve (they match nothing);
/// - `True`/`RulesFailClosed`: some rules are invalid and fail closed (an Accept rule matches
///   nothing, any other denies all traffic in its direction); the message lists the problems;
/// - `False`/`Invalid`: the policy as a whole is ignored (its tier, priority or subject).
pub fn accepted(cnp: &ClusterNetworkPolicy) -> Accepted {
    let (policy, problems) = validate_cluster_policy(cnp);
    let observed_generation = cnp.metadata.generation;
    let Some(policy) = policy else {
        return Accepted {
            status: false,
            reason: "Invalid",
            message: listed("the policy is ignored", &problems),
            observed_generation,
        };
    };
    if !problems.is_empty() {
        let head = format!(
            "{} invalid rule(s) fail closed (an Accept rule matches nothing, any other denies \
             all traffic in its direction)",
            problems.len()
        );
        return Accepted {
            status: true,
            reason: "RulesFailClosed",
            message: listed(&head, &problems),
            observed_generation,
        };
    }
    let mut unresolved = Vec::new();
    for (direction, list, peers) in [
        (Direction::Ingress, "spec.ingress", "from"),
        (Direction::Egress, "spec.egress", "to"),
    ] {
        for rule in policy.rules(direction) {
            for (i, p) in rule.peers.iter().flatten().enumerate() {
                if matches!(p, ClusterPeer::Nothing) {
                    unresolved.push(format!("{list}[{}].{peers}[{i}].domainNames", rule.index));
                }
            }
        }
    }
    let message = if unresolved.is_empty() {
        "all rules are valid".to_string()
    } else {
        bounded(
            "all rules are valid; these peers match nothing (Sepal resolves no domain names)",
            &unresolved,
        )
    };
    Accepted {
        status: true,
        reason: "Valid",
        message,
        observed_generation,
    }
}

/// `head: problem; problem; ...`, each without the policy's name (the condition is on it).
fn listed(head: &str, problems: &[Problem]) -> String {
    let items: Vec<String> = problems
        .iter()
        .map(|p| {
            let effect = match &p.scope {
                ProblemScope::Policy => "policy ignored".to_string(),
                ProblemScope::Rule(d, i) => format!("rule {d}[{i}] fails closed"),
            };
            format!("{}: {} ({effect})", p.field, p.message)
        })
        .collect();
    bounded(head, &items)
}

/// `head: a; b; ...` within MAX_MESSAGE bytes: the items that fit, then how many did not (a
/// first item too long on its own is cut).
fn bounded(head: &str, items: &[String]) -> String {
    // Room kept for "; and N more" while items follow.
    const TAIL: usize = 24;
    let mut out = format!("{head}: ");
    for (n, item) in items.iter().enumerate() {
        let sep = if n == 0 { "" } else { "; " };
        let after = items.len() - n - 1;
        let tail = if after > 0 { TAIL } else { 0 };
        if out.len() + sep.len() + item.len() + tail <= MAX_MESSAGE {
            out.push_str(sep);
            out.push_str(item);
            continue;
        }
        if n == 0 {
            let mut cut = MAX_MESSAGE
                .saturating_sub(out.len() + tail + 3)
                .min(item.len());
            while !item.is_char_boundary(cut) {
                cut -= 1;
            }
            out.push_str(&item[..cut]);
            out.push_str("...");
            if after > 0 {
                out.push_str(&format!("; and {after} more"));
            }
        } else {
            out.push_str(&format!("; and {} more", items.len() - n));
        }
        return out;
    }
    out
}

/// The policy's current `Accepted` condition.
pub fn current(cnp: &ClusterNetworkPolicy) -> Option<&Condition> {
    cnp.status
        .iter()
        .flat_map(|s| &s.conditions)
        .find(|c| c.type_ == ACCEPTED)
}

/// The merge patch of the status subresource that sets `want`: every other condition as the
/// object has it (a merge patch replaces the list), the resourceVersion as its precondition.
/// The transition time is kept while the status stays.
pub fn status_patch(cnp: &ClusterNetworkPolicy, want: &Accepted, now: &str) -> Value {
    let before = current(cnp);
    let since = match before {
        Some(c) if c.status == want.status_text() => c
            .last_transition_time
            .0
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string(),
        _ => now.to_string(),
    };
    let mut ours = json!({
        "type": ACCEPTED, "status": want.status_text(), "reason": want.reason,
        "message": want.message, "lastTransitionTime": since,
    });
    if let Some(g) = want.observed_generation {
        ours["observedGeneration"] = json!(g);
    }
    let mut conditions: Vec<Value> = cnp
        .status
        .iter()
        .flat_map(|s| &s.conditions)
        .filter(|c| c.type_ != ACCEPTED)
        .filter_map(|c| serde_json::to_value(c).ok())
        .collect();
    conditions.push(ours);
    let mut patch = json!({"status": {"conditions": conditions}});
    if let Some(rv) = &cnp.metadata.resource_version {
        patch["metadata"] = json!({"resourceVersion": rv});
    }
    patch
}

/// How a write ended, short of an error worth a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Written,
    /// The object changed since the version the patch was for (another agent wrote first).
    Conflict,
    /// The object is gone.
    Gone,
}

/// Patches one policy's status subresource.
pub async fn write(writer: &StatusWriter, name: &str, patch: &Value) -> Result<Outcome> {
    let api: Api<DynamicObject> =
        Api::all_with(writer.client().clone(), &super::kube_cnp::api_resource());
    // Named, so managedFields say who wrote the condition.
    let params = PatchParams {
        field_manager: Some(super::kube::FIELD_MANAGER.into()),
        ..PatchParams::default()
    };
    match api.patch_status(name, &params, &Patch::Merge(patch)).await {
        Ok(_) => Ok(Outcome::Written),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Outcome::Conflict),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(Outcome::Gone),
        Err(e) => Err(e).with_context(|| {
            format!("writing the Accepted condition of ClusterNetworkPolicy {name}")
        }),
    }
}

/// What this agent wrote (or lost the race for) at which resourceVersion, so it waits for the
/// watch to bring the outcome instead of writing again.
#[derive(Default)]
pub struct Written(BTreeMap<String, String>);

/// Writes every condition that differs; false when the API server failed a write (the rest
/// wait for the next round, which the status writer backs off).
pub async fn round(
    writer: &StatusWriter,
    policies: &[Arc<ClusterNetworkPolicy>],
    written: &mut Written,
    now: &str,
) -> bool {
    let mut ok = true;
    for cnp in policies {
        let want = accepted(cnp);
        if want.matches(current(cnp)) {
            continue;
        }
        let name = cnp.name();
        let rv = cnp.metadata.resource_version.clone().unwrap_or_default();
        if written.0.get(name) == Some(&rv) {
            continue;
        }
        match write(writer, name, &status_patch(cnp, &want, now)).await {
            Ok(outcome) => {
                if outcome == Outcome::Written {
                    tracing::info!(
                        policy = name,
                        status = want.status_text(),
                        reason = want.reason,
                        "ClusterNetworkPolicy condition Accepted written"
                    );
                } else {
                    tracing::debug!(policy = name, ?outcome, "Accepted condition not written");
                }
                written.0.insert(name.to_string(), rv);
            }
            Err(e) => {
                tracing::warn!("{e:#}");
                ok = false;
                break;
            }
        }
    }
    written
        .0
        .retain(|name, _| policies.iter().any(|p| p.name() == name));
    ok
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Object;

    fn cnp(spec: Value, status: Value) -> ClusterNetworkPolicy {
        serde_json::from_value(json!({
            "metadata": {"name": "p", "generation": 4, "resourceVersion": "17"},
            "spec": spec, "status": status,
        }))
        .expect("ClusterNetworkPolicy")
    }

    fn spec(ingress: Value) -> Value {
        json!({"tier": "Admin", "priority": 5, "subject": {"namespaces": {}}, "ingress": ingress})
    }

    #[test]
    fn valid_policies_are_accepted() {
        let p = cnp(
            spec(json!([{"action": "Deny", "from": [{"namespaces": {}}]}])),
            Value::Null,
        );
        let a = accepted(&p);
        assert_eq!((a.status, a.reason), (true, "Valid"));
        assert_eq!(a.message, "all rules are valid");
        assert_eq!(a.observed_generation, Some(4));
        // A domainNames peer is admitted, and matches nothing: the message says where.
        let mut s = spec(json!([]));
        s["egress"] = json!([{"action": "Accept", "to": [{"namespaces": {}}, {"domainNames": ["example.com"]}]}]);
        let a = accepted(&cnp(s, Value::Null));
        assert_eq!((a.status, a.reason), (true, "Valid"));
        assert!(
            a.message.ends_with(": spec.egress[0].to[1].domainNames"),
            "{}",
            a.message
        );
    }

    #[test]
    fn invalid_rules_fail_closed_and_invalid_policies_are_not_accepted() {
        let p = cnp(
            spec(json!([
                {"action": "Allow", "from": [{"namespaces": {}}]},
                {"action": "Accept", "from": [{"namespaces": {}}]},
                {"action": "Deny", "from": [{}]},
            ])),
            Value::Null,
        );
        let a = accepted(&p);
        assert_eq!((a.status, a.reason), (true, "RulesFailClosed"));
        assert!(
            a.message.starts_with("2 invalid rule(s) fail closed"),
            "{}",
            a.message
        );
        assert!(
            a.message
                .contains("spec.ingress[0].action: Unsupported value: \"Allow\"")
                && a.message.contains("(rule ingress[0] fails closed)")
                && a.message
                    .contains("spec.ingress[2].from[0]: no peer field set"),
            "{}",
            a.message
        );
        assert!(
            !a.message.contains("ClusterNetworkPolicy p"),
            "{}",
            a.message
        );

        let mut s = spec(json!([]));
        s["tier"] = json!("Platform");
        let a = accepted(&cnp(s, Value::Null));
        assert_eq!((a.status, a.reason), (false, "Invalid"));
        assert!(
            a.message
                .starts_with("the policy is ignored: spec.tier: Unsupported value"),
            "{}",
            a.message
        );
    }

    #[test]
    fn messages_are_bounded() {
        let rules: Vec<Value> = (0..25)
            .map(|i| json!({"name": "r".repeat(101 + i), "action": "Deny", "from": [{}]}))
            .collect();
        let a = accepted(&cnp(spec(Value::Array(rules)), Value::Null));
        assert_eq!(a.reason, "RulesFailClosed");
        assert!(a.message.len() <= MAX_MESSAGE, "{}", a.message.len());
        assert!(a.message.ends_with(" more"), "{}", a.message);
        let huge = vec!["é".repeat(MAX_MESSAGE)];
        let m = bounded("head", &huge);
        assert!(m.len() <= MAX_MESSAGE && m.ends_with("é..."), "{}", m.len());
        let m = bounded("head", &[huge[0].clone(), "b".into()]);
        assert!(
            m.len() <= MAX_MESSAGE && m.ends_with("...; and 1 more"),
            "{m}"
        );
        let m = bounded("head", &["a".into(), "b".into()]);
        assert_eq!(m, "head: a; b");
    }

    #[test]
    fn the_patch_keeps_other_conditions_and_is_conditional() {
        let status = json!({"conditions": [
            {"type": "Accepted", "status": "True", "reason": "Valid", "message": "old",
             "observedGeneration": 3, "lastTransitionTime": "2026-01-01T00:00:00Z"},
            {"type": "example.com/Programmed", "status": "True", "reason": "Done", "message": "",
             "lastTransitionTime": "2026-01-02T00:00:00Z"},
        ]});
        let p = cnp(
            spec(json!([{"action": "Deny", "from": [{"namespaces": {}}]}])),
            status,
        );
        let want = accepted(&p);
        // Generation 4 against an observed 3: differs, although status and reason are the same.
        assert!(!want.matches(current(&p)));
        let patch = status_patch(&p, &want, "2026-02-01T00:00:00Z");
        assert_eq!(patch["metadata"]["resourceVersion"], "17");
        let conds = patch["status"]["conditions"].as_array().unwrap();
        assert_eq!(conds.len(), 2);
        assert_eq!(conds[0]["type"], "example.com/Programmed");
        let ours = &conds[1];
        assert_eq!(ours["observedGeneration"], 4);
        assert_eq!(ours["reason"], "Valid");
        // Still True: the transition time stays.
        assert_eq!(ours["lastTransitionTime"], "2026-01-01T00:00:00Z");

        // Written, the condition matches, whatever its message (another agent version's).
        let mut after = p.clone();
        let mut written = patch["status"].clone();
        written["conditions"][1]["message"] = json!("worded otherwise");
        after.status = serde_json::from_value(written).unwrap();
        assert!(want.matches(current(&after)));

        // A new status: a new transition time.
        let mut s = spec(json!([]));
        s["priority"] = json!(5000);
        let mut bad = after.clone();
        bad.spec = serde_json::from_value(s).unwrap();
        let want = accepted(&bad);
        assert!(!want.status && !want.matches(current(&bad)));
        let patch = status_patch(&bad, &want, "2026-02-01T00:00:00Z");
        assert_eq!(
            patch["status"]["conditions"][1]["lastTransitionTime"],
            "2026-02-01T00:00:00Z"
        );
        assert_eq!(patch["status"]["conditions"][1]["status"], "False");
    }

    /// The cluster's ClusterNetworkPolicies as the Kubernetes datastore models them.
    fn listed(c: &sepal_tests::kube::Cluster) -> Vec<Arc<ClusterNetworkPolicy>> {
        c.list("clusternetworkpolicies.policy.networking.k8s.io", &[])
            .into_iter()
            .map(
                |v| match super::super::kube::strip(Object::from_value(v).unwrap()) {
                    Object::ClusterNetworkPolicy(p) => p,
                    other => panic!("not a cluster policy: {other:?}"),
                },
            )
            .collect()
    }

    fn by_name<'a>(all: &'a [Arc<ClusterNetworkPolicy>], name: &str) -> &'a ClusterNetworkPolicy {
        all.iter().find(|p| p.name() == name).expect(name)
    }

    /// Against a real API server with network-policy-api's CRD, as the agents' ServiceAccount
    /// under the shipped RBAC: content the CRD admits but felix flags gets its condition, two
    /// agents with the same view write once between them, and an equal condition is not
    /// written again.
    #[tokio::test]
    async fn two_agents_write_each_condition_once() {
        let c = sepal_tests::kube::Cluster::start();
        c.install_sepal();
        let cnp = |name: &str, subject: Value, ingress: Value| {
            json!({"apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
                   "metadata": {"name": name},
                   "spec": {"tier": "Admin", "priority": 10, "subject": subject, "ingress": ingress}})
        };
        let all_ns = json!({"namespaces": {}});
        let deny_all = json!([{"action": "Deny", "from": [{"namespaces": {}}]}]);
        // A label key the CRD's schema does not check, and a selector without values.
        let bad_subject = json!({"namespaces": {"matchLabels": {"bad key!": "x"}}});
        let empty_in = json!([{"name": "empty-in", "action": "Deny", "from": [{"namespaces":
            {"matchExpressions": [{"key": "team", "operator": "In", "values": []}]}}]},
            {"action": "Accept", "from": [{"namespaces": {}}]}]);
        c.apply(&[
            cnp("valid", all_ns.clone(), deny_all.clone()),
            cnp("fails-closed", all_ns, empty_in),
            cnp("invalid", bad_subject, deny_all),
        ]);
        let kc = c.agent_kubeconfig(None);
        let client = super::super::kube::client(Some(&kc)).await.unwrap();
        let a = StatusWriter::new(client.clone(), "n1");
        let b = StatusWriter::new(client, "n2");

        // Both agents act on the same view of the policies: the first writes, the second's
        // writes are conditional on a version that is gone.
        let seen = listed(&c);
        assert_eq!(seen.len(), 3);
        let (mut wa, mut wb) = (Written::default(), Written::default());
        assert!(round(&a, &seen, &mut wa, "2026-01-01T00:00:00Z").await);
        assert!(round(&b, &seen, &mut wb, "2026-01-01T00:00:09Z").await);
        let after = listed(&c);
        let cond = |name: &str| current(by_name(&after, name)).cloned().expect(name);
        let valid = cond("valid");
        assert_eq!((&*valid.status, &*valid.reason), ("True", "Valid"));
        let managers = c.kubectl(&[
            "get",
            "clusternetworkpolicies.policy.networking.k8s.io",
            "valid",
            "-o",
            "jsonpath={.metadata.managedFields[*].manager}",
            "--show-managed-fields",
        ]);
        assert!(managers.contains("sepal-node"), "{managers}");
        assert_eq!(
            valid.observed_generation,
            by_name(&after, "valid").metadata.generation
        );
        // The first write stands: the second agent's transition time never made it.
        assert_eq!(
            valid.last_transition_time.0.to_string(),
            "2026-01-01T00:00:00Z"
        );
        let closed = cond("fails-closed");
        assert_eq!(
            (&*closed.status, &*closed.reason),
            ("True", "RulesFailClosed")
        );
        assert!(
            closed
                .message
                .contains("spec.ingress[0].from[0].namespaces")
                && closed.message.contains("must be specified"),
            "{}",
            closed.message
        );
        let invalid = cond("invalid");
        assert_eq!((&*invalid.status, &*invalid.reason), ("False", "Invalid"));
        assert!(invalid.message.contains("bad key!"), "{}", invalid.message);

        // The agents' next rounds, on the new view: nothing differs, nothing is written.
        let versions = |all: &[Arc<ClusterNetworkPolicy>]| -> Vec<Option<String>> {
            all.iter()
                .map(|p| p.metadata.resource_version.clone())
                .collect()
        };
        assert!(round(&a, &after, &mut wa, "2026-01-01T00:01:00Z").await);
        assert!(round(&b, &after, &mut wb, "2026-01-01T00:01:00Z").await);
        assert_eq!(versions(&listed(&c)), versions(&after));

        // A new generation is observed anew; still valid, so the transition time stays.
        let mut changed = cnp("valid", json!({"namespaces": {}}), json!([]));
        changed["spec"]["priority"] = json!(11);
        c.apply(&[changed]);
        let seen = listed(&c);
        assert!(round(&b, &seen, &mut wb, "2026-01-01T00:02:00Z").await);
        let now = listed(&c);
        let valid = current(by_name(&now, "valid")).cloned().unwrap();
        assert_eq!(
            valid.observed_generation,
            by_name(&now, "valid").metadata.generation
        );
        assert!(valid.observed_generation > Some(1));
        assert_eq!(
            valid.last_transition_time.0.to_string(),
            "2026-01-01T00:00:00Z"
        );
        for other in ["fails-closed", "invalid"] {
            assert_eq!(
                by_name(&now, other).metadata.resource_version,
                by_name(&seen, other).metadata.resource_version,
                "only `valid` was written"
            );
        }
    }
}
