//! The lab as a client of its Kubernetes API server (`lab up --kubernetes`, `--datastore
//! kubernetes`): objects are server-side applied (as `kubectl apply --server-side`), their status
//! written through the status subresource (as kubelet writes a Pod's IPs), deleted, and read
//! back; plus the two requests setting up the agents needs (a ServiceAccount token, /version).

use anyhow::{bail, Context, Result};
use kube::api::{
    Api, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams,
};
use kube::core::ApiResource;
use kube::Client;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Kinds without a namespace; every other kind the lab writes is namespaced.
const CLUSTER_SCOPED: &[&str] = &[
    "Node",
    "Namespace",
    "BGPConfiguration",
    "BGPPeer",
    "SepalNodeStatus",
    "CustomResourceDefinition",
    "ClusterNetworkPolicy",
    "ClusterRole",
    "ClusterRoleBinding",
];

/// The field manager of everything the lab applies: a relabel drops exactly the labels the lab
/// set before and no longer sets, as `kubectl apply` would.
const FIELD_MANAGER: &str = "sepal-lab";

/// How long a Pod may wait for its namespace's `default` ServiceAccount, which the
/// ServiceAccount admission plugin wants and kube-controller-manager makes shortly after the
/// namespace.
const ADMISSION_WAIT: Duration = Duration::from_secs(60);

/// One client (and the runtime it runs on) per `sepal lab` process: a lab has one kubeconfig.
static API: OnceLock<(PathBuf, tokio::runtime::Runtime, Client)> = OnceLock::new();

fn api(kubeconfig: &Path) -> Result<&'static (PathBuf, tokio::runtime::Runtime, Client)> {
    if let Some(api) = API.get() {
        if api.0 != kubeconfig {
            bail!("one lab process talks to one API server");
        }
        return Ok(api);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let client = rt.block_on(crate::datastore::kube::client(Some(kubeconfig)))?;
    Ok(API.get_or_init(|| (kubeconfig.to_path_buf(), rt, client)))
}

/// The API handle for a kind (`apiVersion` as in an object), in a namespace when it has one.
fn handle_for(
    client: &Client,
    api_version: &str,
    kind: &str,
    namespace: Option<&str>,
) -> Api<DynamicObject> {
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    if CLUSTER_SCOPED.contains(&kind) {
        Api::all_with(client.clone(), &ar)
    } else {
        Api::namespaced_with(client.clone(), namespace.unwrap_or("default"), &ar)
    }
}

/// The API handle for an object's kind, in its namespace, and the object's name.
fn handle(client: &Client, obj: &Value) -> Result<(Api<DynamicObject>, String)> {
    let api_version = obj["apiVersion"]
        .as_str()
        .context("object without apiVersion")?;
    let kind = obj["kind"].as_str().context("object without kind")?;
    let name = obj["metadata"]["name"]
        .as_str()
        .context("object without metadata.name")?;
    let api = handle_for(
        client,
        api_version,
        kind,
        obj["metadata"]["namespace"].as_str(),
    );
    Ok((api, name.to_string()))
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// A Pod refused only because its namespace's ServiceAccount is not made yet.
fn waits_for_service_account(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 403 && s.message.contains("service account"))
}

/// Applies the object (created, or updated where it differs); then writes its `status`, if it
/// has one, over what the server holds.
pub fn put(kubeconfig: &Path, obj: &Value) -> Result<()> {
    let (_, rt, client) = api(kubeconfig)?;
    let (api, name) = handle(client, obj)?;
    let what = format!("{} {name}", obj["kind"].as_str().unwrap_or("object"));
    let mut body = obj.clone();
    let status = body
        .as_object_mut()
        .and_then(|o| o.remove("status"))
        .filter(|s| !s.is_null());
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    rt.block_on(async {
        let started = Instant::now();
        let mut stored = loop {
            match api.patch(&name, &pp, &Patch::Apply(&body)).await {
                Err(e) if waits_for_service_account(&e) && started.elapsed() < ADMISSION_WAIT => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => break other?,
            }
        };
        let Some(status) = status else {
            return Ok(());
        };
        // A replace, not an apply: a Node's addresses repeat their type, which an apply's list
        // merge (keyed by type) refuses. Whoever wrote in between (kube-controller-manager
        // giving a Node its podCIDR) makes it a conflict: read again and retry.
        loop {
            stored.data["status"] = status.clone();
            match api
                .replace_status(&name, &PostParams::default(), &stored)
                .await
            {
                Err(e) if is_status(&e, 409) => stored = api.get(&name).await?,
                other => break other.map(|_| ()),
            }
        }
    })
    .with_context(|| format!("writing {what} to the API server"))
}

/// Deletes the object; one that is not there is fine. A Pod goes at once (no grace period):
/// the lab is its kubelet, whose final delete this is, and the pod is gone already (CNI DEL
/// done); with a grace period it would stay Terminating for want of a kubelet.
pub fn remove(kubeconfig: &Path, obj: &Value) -> Result<()> {
    let (_, rt, client) = api(kubeconfig)?;
    let (api, name) = handle(client, obj)?;
    let dp = match obj["kind"].as_str() {
        Some("Pod") => DeleteParams::default().grace_period(0),
        _ => DeleteParams::default(),
    };
    match rt.block_on(api.delete(&name, &dp)) {
        Err(e) if !is_status(&e, 404) => Err(e).with_context(|| {
            format!(
                "deleting {} {name} from the API server",
                obj["kind"].as_str().unwrap_or("object")
            )
        }),
        _ => Ok(()),
    }
}

/// One object as the server holds it; None when it is not there.
pub fn get(kubeconfig: &Path, api_version: &str, kind: &str, name: &str) -> Result<Option<Value>> {
    get_in(kubeconfig, api_version, kind, None, name)
}

/// One namespaced object as the server holds it; None when it is not there.
pub fn get_namespaced(
    kubeconfig: &Path,
    api_version: &str,
    kind: &str,
    namespace: &str,
    name: &str,
) -> Result<Option<Value>> {
    get_in(kubeconfig, api_version, kind, Some(namespace), name)
}

fn get_in(
    kubeconfig: &Path,
    api_version: &str,
    kind: &str,
    namespace: Option<&str>,
    name: &str,
) -> Result<Option<Value>> {
    let (_, rt, client) = api(kubeconfig)?;
    let api = handle_for(client, api_version, kind, namespace);
    let what = match namespace {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    };
    let found = rt
        .block_on(api.get_opt(name))
        .with_context(|| format!("reading {kind} {what} from the API server"))?;
    found
        .map(serde_json::to_value)
        .transpose()
        .map_err(Into::into)
}

/// The server's version (`gitVersion` of its /version).
pub fn version(kubeconfig: &Path) -> Result<String> {
    let (_, rt, client) = api(kubeconfig)?;
    let info = rt
        .block_on(client.apiserver_version())
        .context("the API server's /version")?;
    Ok(info.git_version)
}
