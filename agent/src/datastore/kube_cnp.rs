// ClusterNetworkPolicies from the Kubernetes API (policy.networking.k8s.io/v1alpha2). Sepal does
// not own their CRD, and a cluster may not have installed it: then the agent syncs without them
// (there are none), says so once, and checks for the CRD every RECHECK with a one-object list
// (granted by the same RBAC rule as the watch; watching CustomResourceDefinitions would need a
// cluster-wide grant on every CRD). Once the API server serves the resource, a watcher like the
// others' runs; if the CRD is removed (its objects go with it), the model's are dropped and the
// checks resume.

use super::kube::{report_watch_failure, run_watcher_until, strip, SyncGate, WatchEnd};
use crate::model::{Event, KindKey, Object, CNP_API_VERSION};
use kube::api::{DynamicObject, ListParams};
use kube::core::{ApiResource, GroupVersionKind};
use kube::runtime::watcher;
use kube::{Api, Client};
use sepal_felix::policy::cnp_api::CNP_KIND;
use serde_json::Value;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;

const WHAT: &str = "clusternetworkpolicies";
/// How often a missing CRD is looked for: a policy created with it waits this long at most.
const RECHECK: Duration = Duration::from_secs(30);
/// The longest pause between probes the API server failed.
const MAX_RETRY: Duration = Duration::from_secs(10);

pub(super) fn api_resource() -> ApiResource {
    let (group, version) = CNP_API_VERSION.split_once('/').unwrap_or_default();
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, CNP_KIND), WHAT)
}

fn kind() -> KindKey {
    KindKey {
        api_version: CNP_API_VERSION.into(),
        kind: CNP_KIND.into(),
    }
}

/// Whether the API server answered 404: it serves no such resource.
fn not_found(err: &kube::Error) -> bool {
    matches!(err, kube::Error::Api(s) if s.code == 404)
}

/// A watch error that means the CRD is gone (no retry brings the resource back).
fn resource_gone(err: &watcher::Error) -> bool {
    match err {
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => not_found(e),
        watcher::Error::WatchError(s) => s.code == 404,
        _ => false,
    }
}

/// A watched object as the model keeps it; content its type cannot read is logged and left
/// out (the CRD's schema makes that unlikely: the type reads every field in its raw form).
fn convert(o: DynamicObject) -> Option<Object> {
    let mut v = serde_json::to_value(&o).ok()?;
    let map = v.as_object_mut()?;
    map.insert("apiVersion".into(), Value::String(CNP_API_VERSION.into()));
    map.insert("kind".into(), Value::String(CNP_KIND.into()));
    match Object::from_value(v) {
        Ok(obj) => Some(strip(obj)),
        Err(e) => {
            tracing::error!(resource = WHAT, "ClusterNetworkPolicy left out: {e}");
            None
        }
    }
}

/// Does the API server serve the resource? An error is neither answer (unreachable, forbidden).
async fn served(api: &Api<DynamicObject>) -> Result<bool, kube::Error> {
    match api.list_metadata(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(true),
        Err(e) if not_found(&e) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Feeds the model ClusterNetworkPolicies until its receiver goes away. `gate` is passed once
/// the initial list is done, or as soon as the CRD is found missing.
pub(super) async fn run(client: Client, tx: mpsc::Sender<Event>, gate: Arc<SyncGate>) {
    let api: Api<DynamicObject> = Api::all_with(client, &api_resource());
    let mut gate = Some(gate);
    let mut absent = false;
    let mut failures = 0u32;
    let mut retry = Duration::from_millis(500);
    loop {
        let pause = match served(&api).await {
            Ok(true) => {
                failures = 0;
                retry = Duration::from_millis(500);
                if absent {
                    tracing::info!(
                        resource = WHAT,
                        "the ClusterNetworkPolicy CRD is served now: watching"
                    );
                }
                absent = false;
                let passed = gate.clone().unwrap_or_else(SyncGate::spent);
                let end = run_watcher_until(
                    WHAT,
                    kind(),
                    api.clone(),
                    convert,
                    tx.clone(),
                    passed,
                    resource_gone,
                )
                .await;
                match end {
                    WatchEnd::ReceiverGone => return,
                    WatchEnd::Stopped { synced } => {
                        if synced {
                            gate = None;
                        }
                        // Its objects went with the CRD; whatever the watch missed of that goes
                        // too: a list start and end with nothing between clears the kind.
                        for ev in [Event::ListStart(kind()), Event::ListEnd(kind())] {
                            if tx.send(ev).await.is_err() {
                                return;
                            }
                        }
                        Duration::ZERO
                    }
                }
            }
            Ok(false) => {
                failures = 0;
                if !absent {
                    tracing::info!(
                        resource = WHAT,
                        "the API server serves no {CNP_API_VERSION} ClusterNetworkPolicy (its CRD \
                         is not installed): none is in force; checking again every {} s",
                        RECHECK.as_secs()
                    );
                    absent = true;
                }
                if let Some(g) = gate.take() {
                    if !g.done(&tx).await {
                        return;
                    }
                }
                RECHECK
            }
            // Not knowing is not "absent": a CRD that exists must not be missed, so the sync
            // waits, as it does for the other resources.
            Err(e) => {
                failures += 1;
                let forbidden = matches!(&e, kube::Error::Api(s) if s.code == 403);
                let text = format!("checking for the ClusterNetworkPolicy CRD: {e}");
                report_watch_failure(WHAT, forbidden, &text, gate.is_none(), failures);
                retry = (retry * 2).min(MAX_RETRY);
                retry
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = tx.closed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn watched_objects_become_the_models_cluster_policies() {
        let o: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "policy.networking.k8s.io/v1alpha2", "kind": "ClusterNetworkPolicy",
            "metadata": {"name": "p", "generation": 2, "resourceVersion": "41", "uid": "u",
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"tier": "Admin", "priority": 3, "subject": {"namespaces": {}}},
            "status": {"conditions": []}
        }))
        .unwrap();
        let Some(Object::ClusterNetworkPolicy(p)) = convert(o) else {
            panic!("not converted")
        };
        assert_eq!(p.metadata.resource_version.as_deref(), Some("41"));
        assert_eq!(p.metadata.generation, Some(2));
        assert!(p.metadata.uid.is_none() && p.metadata.managed_fields.is_none());
        assert_eq!(p.spec.priority, 3);
        assert_eq!(api_resource().plural, WHAT);
        assert_eq!(api_resource().api_version, CNP_API_VERSION);
        // Content its type cannot read: left out, not a panic.
        let bad: DynamicObject = serde_json::from_value(json!({
            "metadata": {"name": "q"}, "spec": {"priority": "high"}
        }))
        .unwrap();
        assert!(convert(bad).is_none());
    }
}
