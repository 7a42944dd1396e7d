//! The lab as control plane against a Kubernetes API server (`lab up --datastore kubernetes`):
//! objects are created, replaced (status through the status subresource, as kubelet writes a
//! Pod's IPs) and deleted there instead of in the dir datastore.

use anyhow::{bail, Context, Result};
use kube::api::{Api, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use kube::core::ApiResource;
use kube::Client;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Kinds without a namespace; every other kind the lab writes is namespaced.
const CLUSTER_SCOPED: &[&str] = &[
    "Node",
    "Namespace",
    "BGPConfiguration",
    "BGPPeer",
    "SepalNodeStatus",
];

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

/// The API handle for an object's kind, in its namespace, and the object's name.
fn handle(client: &Client, obj: &Value) -> Result<(Api<DynamicObject>, String)> {
    let api_version = obj["apiVersion"]
        .as_str()
        .context("object without apiVersion")?;
    let kind = obj["kind"].as_str().context("object without kind")?;
    let name = obj["metadata"]["name"]
        .as_str()
        .context("object without metadata.name")?;
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let ar = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    let api = if CLUSTER_SCOPED.contains(&kind) {
        Api::all_with(client.clone(), &ar)
    } else {
        let ns = obj["metadata"]["namespace"].as_str().unwrap_or("default");
        Api::namespaced_with(client.clone(), ns, &ar)
    };
    Ok((api, name.to_string()))
}

fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}

/// Creates the object, or replaces it when it exists; then writes its `status`, if it has one.
pub fn put(kubeconfig: &Path, obj: &Value) -> Result<()> {
    let (_, rt, client) = api(kubeconfig)?;
    let (api, name) = handle(client, obj)?;
    let what = format!("{} {name}", obj["kind"].as_str().unwrap_or("object"));
    let mut object: DynamicObject = serde_json::from_value(obj.clone())
        .with_context(|| format!("{what} is not a Kubernetes object"))?;
    rt.block_on(async {
        let pp = PostParams::default();
        let stored = match api.create(&pp, &object).await {
            Err(e) if is_status(&e, 409) => {
                let current = api.get(&name).await?;
                object.metadata.resource_version = current.metadata.resource_version;
                api.replace(&name, &pp, &object).await?
            }
            other => other?,
        };
        if !obj["status"].is_null() {
            object.metadata.resource_version = stored.metadata.resource_version;
            api.replace_status(&name, &pp, &object).await?;
        }
        Ok::<_, kube::Error>(())
    })
    .with_context(|| format!("writing {what} to the API server"))
}

/// Deletes the object; one that is not there is fine.
pub fn remove(kubeconfig: &Path, obj: &Value) -> Result<()> {
    let (_, rt, client) = api(kubeconfig)?;
    let (api, name) = handle(client, obj)?;
    match rt.block_on(api.delete(&name, &DeleteParams::default())) {
        Err(e) if !is_status(&e, 404) => Err(e).with_context(|| {
            format!(
                "deleting {} {name} from the API server",
                obj["kind"].as_str().unwrap_or("object")
            )
        }),
        _ => Ok(()),
    }
}
