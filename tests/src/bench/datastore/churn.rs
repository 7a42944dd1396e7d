// Pod churn on the loaded cluster: one round replaces CHANGES / 2 Pods spread over as many Nodes
// (a rollout's delete, then the new Pod's create and its status as kubelet writes it), so a
// round is CHANGES pod changes (deletes and starts) and the cluster keeps its size. A sentinel
// Pod created after the last write tells when a watcher has seen them all: a watch delivers a
// resource's events in resourceVersion order, so the agent's model counting the sentinel has
// applied every change before it.

use super::load::{create_one, retrying, write_status};
use super::objects::{self, Sizes};
use crate::bench::procstat::cpu_ms;
use anyhow::{bail, Context, Result};
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::DeleteParams;
use kube::{Api, Client};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::time::{Duration, Instant};

/// Pod changes per round: half deletes, half starts.
pub const CHANGES: usize = 1000;
/// Requests in flight: a burst, as a rollout of many Deployments at once makes.
const IN_FLIGHT: usize = 16;
const ABSORB_TIMEOUT: Duration = Duration::from_secs(60);

/// One round's writes: the deletes, the starts (create + status), then the sentinel. Returns the
/// sentinel's name (in namespace ns-0).
pub async fn write(client: &Client, s: &Sizes, round: usize) -> Result<String> {
    let pods = objects::churned(s, round, CHANGES / 2);
    futures::stream::iter(pods.iter().map(Ok))
        .try_for_each_concurrent(IN_FLIGHT, |&p| {
            let client = client.clone();
            async move {
                let (pod, _) = objects::pod(s, p);
                delete(&client, &pod).await
            }
        })
        .await?;
    futures::stream::iter(pods.iter().map(Ok))
        .try_for_each_concurrent(IN_FLIGHT, |&p| {
            let client = client.clone();
            async move {
                let (pod, status) = objects::replacement(s, p, round);
                create_one(&client, &pod).await?;
                write_status(&client, &pod, status).await
            }
        })
        .await?;
    let name = format!("churn-sentinel-{round}");
    let sentinel = json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "ns-0"},
        "spec": {"nodeName": "node-1", "containers": [{"name": "c", "image": "registry.example/app:1.2.3"}]}});
    create_one(client, &sentinel).await?;
    Ok(name)
}

/// Deletes a Pod at once (grace period 0: no kubelet here to confirm a graceful stop).
async fn delete(client: &Client, pod: &Value) -> Result<()> {
    let ns = pod["metadata"]["namespace"].as_str().unwrap_or_default();
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let dp = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    match retrying(|| api.delete(name, &dp)).await {
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        other => other.map(drop),
    }
    .with_context(|| format!("deleting pod {ns}/{name}"))
}

/// Removes a round's sentinel again (not measured).
pub async fn remove_sentinel(client: &Client, name: &str) -> Result<()> {
    delete(
        client,
        &json!({"metadata": {"namespace": "ns-0", "name": name}}),
    )
    .await
}

/// The churn figures of one agent run.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    /// From the first write until the agent's model holds every change.
    pub absorbed_ms: f64,
    /// Until the last write (the sentinel) was answered: the API server's share.
    pub writes_ms: f64,
    /// The agent's CPU over the same span.
    pub cpu_ms: f64,
}

/// Runs one round against the running agent (its PID and operator socket) and waits until its
/// model has absorbed it.
pub fn measure(
    netns: &Path,
    admin_kubeconfig: &Path,
    s: &Sizes,
    round: usize,
    pid: u32,
    admin_socket: &Path,
) -> Result<Figures> {
    let before = model_objects(admin_socket)?;
    let cpu_before = cpu_ms(pid).context("the agent's CPU time")?;
    let started = Instant::now();
    let sentinel = on_runtime(netns, async {
        let client = super::load::client(admin_kubeconfig).await?;
        write(&client, s, round).await
    })?;
    let writes_ms = started.elapsed().as_secs_f64() * 1000.0;
    // The model's count is back where it was, plus the sentinel, only once the sentinel (the
    // last event of the round) is in.
    let deadline = Instant::now() + ABSORB_TIMEOUT;
    loop {
        let now = model_objects(admin_socket)?;
        if now == before + 1 {
            break;
        }
        if Instant::now() > deadline {
            bail!("the agent's model has {now} objects, {before} + 1 expected, {ABSORB_TIMEOUT:?} after the churn");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // One more status request: it queues behind the agent's own update for that last batch.
    model_objects(admin_socket)?;
    let absorbed_ms = started.elapsed().as_secs_f64() * 1000.0;
    let cpu = cpu_ms(pid).context("the agent's CPU time")? - cpu_before;
    on_runtime(netns, async {
        let client = super::load::client(admin_kubeconfig).await?;
        remove_sentinel(&client, &sentinel).await
    })?;
    Ok(Figures {
        absorbed_ms,
        writes_ms,
        cpu_ms: cpu,
    })
}

/// Runs `f` to its end on a runtime of its own, on a thread in the control plane's namespace.
pub fn on_runtime<T: Send>(
    netns: &Path,
    f: impl std::future::Future<Output = Result<T>> + Send,
) -> Result<T> {
    sepal_felix::netns::on_thread_in(netns, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(f)
    })
    .context("entering the control plane's network namespace")?
}

/// The number of objects in the agent's model, from `sepal status` over its operator socket.
fn model_objects(admin_socket: &Path) -> Result<usize> {
    let mut s = std::os::unix::net::UnixStream::connect(admin_socket)
        .with_context(|| format!("connecting to {}", admin_socket.display()))?;
    s.write_all(b"{\"op\":\"status\"}\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let reply: Value = serde_json::from_str(&line).context("the agent's status reply")?;
    reply["data"]["datastore"]["objects"]
        .as_u64()
        .map(|n| n as usize)
        .with_context(|| format!("no object count in {line}"))
}
