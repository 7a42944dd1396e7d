// Creates the bench's cluster through the real API server: one HTTPS request per object (and one
// per Pod status, through the status subresource as kubelet writes it), many in flight, from a
// client inside the control plane's network namespace. kubectl would send the same requests one
// at a time; at 64,000 requests that is the difference between minutes and an hour.

use super::objects::{self, Sizes, NAMESPACES};
use crate::kube::Cluster;
use anyhow::{bail, Context, Result};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::ApiResource;
use kube::{Api, Client, Config};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Requests in flight: enough to keep both cores busy in the API server and etcd while one waits
/// on the other; more only queues inside the server.
const IN_FLIGHT: usize = 32;
const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);

/// How long each step of the load took, and how many requests were retried.
pub struct LoadTimes {
    pub steps: Vec<(&'static str, Duration)>,
    pub retried: usize,
}

/// Requests retried after a transient refusal, over the whole load.
static RETRIED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl LoadTimes {
    pub fn total(&self) -> Duration {
        self.steps.iter().map(|s| s.1).sum()
    }
}

/// Loads the cluster (as admin) and waits until the controllers are done with it.
pub fn create(cluster: &Cluster, netns: &std::path::Path, s: &Sizes) -> Result<LoadTimes> {
    let kubeconfig = cluster.admin_kubeconfig();
    sepal_felix::netns::on_thread_in(netns, || {
        // One thread: the API server and etcd want both cores; the client mostly waits.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(load(&kubeconfig, s))
    })
    .context("entering the control plane's network namespace")?
}

/// A client of the API server with the kubeconfig's credentials.
pub(super) async fn client(kubeconfig: &std::path::Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

async fn load(kubeconfig: &std::path::Path, s: &Sizes) -> Result<LoadTimes> {
    let client = client(kubeconfig).await?;
    let mut steps = Vec::new();
    let mut step = |name, started: Instant| steps.push((name, started.elapsed()));

    let t = Instant::now();
    create_all(&client, (0..NAMESPACES).map(objects::namespace)).await?;
    // Pod admission wants each namespace's `default` ServiceAccount, which
    // kube-controller-manager makes a moment after the namespace.
    wait_for_service_accounts(&client).await?;
    step("namespaces", t);

    let t = Instant::now();
    create_all(&client, (0..s.nodes).map(objects::node)).await?;
    step("nodes", t);

    // Pods before Services, with their status: the EndpointSlice controller then writes each
    // slice once, complete, instead of once per Pod that gets an address.
    let t = Instant::now();
    futures::stream::iter((0..s.pods).map(Ok))
        .try_for_each_concurrent(IN_FLIGHT, |p| {
            let client = client.clone();
            async move {
                let (pod, status) = objects::pod(s, p);
                create_one(&client, &pod).await?;
                write_status(&client, &pod, status).await
            }
        })
        .await?;
    step("pods (create + status)", t);

    let t = Instant::now();
    create_all(&client, (0..s.services).map(objects::service)).await?;
    step("services", t);

    let t = Instant::now();
    create_all(&client, (0..s.policies).map(|i| objects::policy(s, i))).await?;
    step("network policies", t);

    let t = Instant::now();
    wait_for_endpoints(&client, objects::expected_endpoints(s)).await?;
    step("endpoint slices (controller)", t);
    Ok(LoadTimes {
        steps,
        retried: RETRIED.load(std::sync::atomic::Ordering::Relaxed),
    })
}

fn resource_of(kind: &str) -> Result<ApiResource> {
    Ok(match kind {
        "Namespace" => ApiResource::erase::<Namespace>(&()),
        "Node" => ApiResource::erase::<Node>(&()),
        "Pod" => ApiResource::erase::<Pod>(&()),
        "Service" => ApiResource::erase::<Service>(&()),
        "NetworkPolicy" => ApiResource::erase::<NetworkPolicy>(&()),
        other => bail!("the bench does not create {other}"),
    })
}

fn api_for(client: &Client, obj: &Value) -> Result<(Api<DynamicObject>, String)> {
    let ar = resource_of(obj["kind"].as_str().unwrap_or_default())?;
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let api = match obj["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &ar),
        None => Api::all_with(client.clone(), &ar),
    };
    Ok((api, name))
}

async fn create_all(client: &Client, objects: impl Iterator<Item = Value>) -> Result<()> {
    futures::stream::iter(objects.map(Ok))
        .try_for_each_concurrent(IN_FLIGHT, |o| async move { create_one(client, &o).await })
        .await
}

pub(super) async fn create_one(client: &Client, obj: &Value) -> Result<()> {
    let (api, name) = api_for(client, obj)?;
    let body: DynamicObject = serde_json::from_value(obj.clone())?;
    let pp = PostParams::default();
    let created = retrying(|| api.create(&pp, &body)).await;
    match created {
        // A retried create whose first try got through.
        Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(()),
        other => other.map(drop),
    }
    .with_context(|| format!("creating {} {name}", obj["kind"]))
}

/// The status as kubelet writes it: a strategic merge patch of the status subresource.
pub(super) async fn write_status(client: &Client, obj: &Value, status: Value) -> Result<()> {
    let (api, name) = api_for(client, obj)?;
    let patch = Patch::Strategic(serde_json::json!({ "status": status }));
    let pp = PatchParams::default();
    retrying(|| api.patch_status(&name, &pp, &patch))
        .await
        .map(drop)
        .with_context(|| format!("writing the status of {} {name}", obj["kind"]))
}

/// Retries what a busy server or a not-yet-made ServiceAccount refuses; other errors are final.
pub(super) async fn retrying<T, F, Fut>(mut request: F) -> kube::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = kube::Result<T>>,
{
    let mut pause = Duration::from_millis(100);
    let mut left = 12;
    loop {
        match request().await {
            Err(e) if left > 0 && transient(&e) => {
                left -= 1;
                RETRIED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(3));
            }
            other => return other,
        }
    }
}

fn transient(e: &kube::Error) -> bool {
    match e {
        kube::Error::Api(s) => {
            s.code == 429 || s.code >= 500 || s.message.contains("service account")
        }
        kube::Error::HyperError(_) | kube::Error::Service(_) => true,
        _ => false,
    }
}

async fn wait_for_service_accounts(client: &Client) -> Result<()> {
    let api: Api<ServiceAccount> = Api::all(client.clone());
    let lp = ListParams::default().fields("metadata.name=default");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have = api
            .list(&lp)
            .await?
            .items
            .iter()
            .filter(|sa| {
                sa.metadata
                    .namespace
                    .as_deref()
                    .is_some_and(|ns| ns.starts_with("ns-"))
            })
            .count();
        if have == NAMESPACES {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{have} of {NAMESPACES} namespaces have their default ServiceAccount after 60 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until the EndpointSlices of the bench's Services list `expected` endpoints in all.
async fn wait_for_endpoints(client: &Client, expected: usize) -> Result<()> {
    let api: Api<EndpointSlice> = Api::all(client.clone());
    let lp = ListParams::default().labels("kubernetes.io/service-name");
    let deadline = Instant::now() + SETTLE_TIMEOUT;
    loop {
        let listed: usize = api
            .list(&lp)
            .await?
            .items
            .iter()
            .filter(|e| {
                e.metadata.labels.as_ref().is_some_and(|l| {
                    l.get("kubernetes.io/service-name")
                        .is_some_and(|s| s.starts_with("svc-"))
                })
            })
            .map(|e| e.endpoints.len())
            .sum();
        if listed == expected {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the EndpointSlices list {listed} of {expected} Pods after {} s",
                SETTLE_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// A few Pods and Nodes read back, to check the load is what the bench meant (status kept,
/// addresses in place) before measuring anything on it.
pub fn check(cluster: &Cluster, s: &Sizes) -> Result<()> {
    let last = s.pods - 1;
    let (pod, status) = objects::pod(s, last);
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let got = cluster
        .get("pod", ns, name)
        .with_context(|| format!("pod {ns}/{name} is missing"))?;
    if got["status"]["podIP"] != status["podIP"] || got["status"]["phase"] != "Running" {
        bail!("pod {ns}/{name} has status {}", got["status"]);
    }
    let node = cluster
        .get("node", "", objects::AGENT_NODE)
        .context("the agent's Node is missing")?;
    if node["status"]["addresses"]
        .as_array()
        .is_none_or(|a| a.is_empty())
        || node["spec"]["podCIDRs"]
            .as_array()
            .is_none_or(|a| a.is_empty())
    {
        bail!("the agent's Node lacks addresses or podCIDRs: {node}");
    }
    Ok(())
}
