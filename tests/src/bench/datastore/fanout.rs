// What N agents' watches cost the API server. An agent-equivalent watcher opens the watches one
// agent opens (agent/src/datastore: Pods in protobuf, Nodes, Namespaces, Services,
// EndpointSlices, NetworkPolicies, ClusterNetworkPolicies, BGPConfigurations, BGPPeers), each on
// a connection of its own with the agent's ServiceAccount token, from the current
// resourceVersion (no initial list: the steady state, not a relist storm). With N watchers open,
// one churn round (churn.rs) runs; the API server's CPU (from /proc) over the round until the
// watchers have gone quiet, its RSS, and the bytes the watchers read (response bodies, after
// TLS) are the figures. N = 0 is the same round with no watcher: the control plane's own cost.

use super::churn;
use super::objects::Sizes;
use crate::bench::procstat::{cpu_ms, status_kib};
use anyhow::{bail, Context, Result};
use futures::AsyncReadExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The watches of one agent (path, Accept).
const WATCHES: &[(&str, &str)] = &[
    (
        "/api/v1/pods",
        "application/vnd.kubernetes.protobuf;stream=watch",
    ),
    ("/api/v1/nodes", "application/json"),
    ("/api/v1/namespaces", "application/json"),
    ("/api/v1/services", "application/json"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "application/json",
    ),
    (
        "/apis/networking.k8s.io/v1/networkpolicies",
        "application/json",
    ),
    (
        "/apis/policy.networking.k8s.io/v1alpha2/clusternetworkpolicies",
        "application/json",
    ),
    (
        "/apis/sepal.dev/v1alpha1/bgpconfigurations",
        "application/json",
    ),
    ("/apis/sepal.dev/v1alpha1/bgppeers", "application/json"),
];
/// The watchers are quiet once no byte arrived for this long.
const QUIET: Duration = Duration::from_secs(1);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(120);

/// One fan-out measurement.
#[derive(Debug, Clone, Copy)]
pub struct Figures {
    pub watchers: usize,
    /// The API server's CPU from the first write until the watchers went quiet.
    pub apiserver_cpu_ms: f64,
    /// Its RSS at the end, and the change since before the watchers connected.
    pub apiserver_rss_mib: f64,
    pub apiserver_rss_delta_mib: f64,
    /// Bytes the watchers read over the round, all of them.
    pub bytes_sent_mib: f64,
    /// From the first write until quiet, and the writes' share.
    pub window_ms: f64,
    pub writes_ms: f64,
    /// Opening every watch.
    pub connect_ms: f64,
}

/// The API server of this cluster: the kube-apiserver process whose command line names the
/// control plane's directory.
pub fn apiserver_pid(cluster_dir: &Path) -> Result<u32> {
    let dir = cluster_dir.to_string_lossy().to_string();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(pid) = entry?.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "kube-apiserver" {
            continue;
        }
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(&dir) {
            return Ok(pid);
        }
    }
    bail!("no kube-apiserver of {dir} in /proc")
}

fn mib(bytes: f64) -> f64 {
    (bytes / (1024.0 * 1024.0) * 10.0).round() / 10.0
}

/// Opens `n` agent-equivalent watchers, runs churn round `round` and measures.
pub fn measure(
    netns: &Path,
    apiserver: u32,
    agent_kubeconfig: &Path,
    admin_kubeconfig: &Path,
    s: &Sizes,
    round: usize,
    n: usize,
) -> Result<Figures> {
    sepal_felix::netns::on_thread_in(netns, || {
        // Two workers: the watchers' reads (TLS) and the writes side by side.
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(run(
                apiserver,
                agent_kubeconfig,
                admin_kubeconfig,
                s,
                round,
                n,
            ))
    })
    .context("entering the control plane's network namespace")?
}

async fn run(
    apiserver: u32,
    agent_kubeconfig: &Path,
    admin_kubeconfig: &Path,
    s: &Sizes,
    round: usize,
    n: usize,
) -> Result<Figures> {
    let admin = super::load::client(admin_kubeconfig).await?;
    let rss_before = status_kib(apiserver, "VmRSS").context("the API server's RSS")? as f64;
    // Where the watches start: the store's revision now (a one-Pod list gives it).
    let rv = {
        let api: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::all(admin.clone());
        api.list_metadata(&kube::api::ListParams::default().limit(1))
            .await?
            .metadata
            .resource_version
            .context("no resourceVersion in the list")?
    };
    let bytes = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        // A client each: its own connections, as another node's agent has.
        let client = super::load::client(agent_kubeconfig).await?;
        for (path, accept) in WATCHES {
            let uri = format!(
                "{path}?watch=1&allowWatchBookmarks=true&timeoutSeconds=3600&resourceVersion={rv}"
            );
            let (client, bytes, connected, failed) = (
                client.clone(),
                bytes.clone(),
                connected.clone(),
                failed.clone(),
            );
            tasks.spawn(async move {
                let request = http::Request::get(uri)
                    .header(http::header::ACCEPT, *accept)
                    .body(Vec::new())
                    .expect("request");
                let mut body = match client.request_stream(request).await {
                    Ok(b) => b,
                    Err(e) => {
                        eprintln!("watch {path}: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                };
                connected.fetch_add(1, Ordering::Relaxed);
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(got) = body.read(&mut buf).await {
                    if got == 0 {
                        break;
                    }
                    bytes.fetch_add(got as u64, Ordering::Relaxed);
                }
            });
        }
    }
    let want = n * WATCHES.len();
    while connected.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < want {
        if started.elapsed() > CONNECT_TIMEOUT {
            bail!(
                "{} of {want} watches open after {CONNECT_TIMEOUT:?}",
                connected.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if failed.load(Ordering::Relaxed) > 0 {
        bail!(
            "{} of {want} watches refused",
            failed.load(Ordering::Relaxed)
        );
    }
    let connect_ms = started.elapsed().as_secs_f64() * 1000.0;
    // Settle: the connections' own set-up is not the round's.
    tokio::time::sleep(Duration::from_secs(1)).await;

    let bytes_before = bytes.load(Ordering::Relaxed);
    let cpu_before = cpu_ms(apiserver).context("the API server's CPU")?;
    let round_started = Instant::now();
    let sentinel = churn::write(&admin, s, round).await?;
    let writes_ms = round_started.elapsed().as_secs_f64() * 1000.0;
    // Quiet: nothing more for QUIET (the EndpointSlice controller's updates follow the Pods').
    let mut last = (bytes.load(Ordering::Relaxed), Instant::now());
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = bytes.load(Ordering::Relaxed);
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() >= QUIET {
            break;
        }
    }
    let window_ms = round_started.elapsed().as_secs_f64() * 1000.0;
    let cpu = cpu_ms(apiserver).context("the API server's CPU")? - cpu_before;
    let rss = status_kib(apiserver, "VmRSS").context("the API server's RSS")? as f64;
    let sent = bytes.load(Ordering::Relaxed) - bytes_before;
    tasks.abort_all();
    churn::remove_sentinel(&admin, &sentinel).await?;
    Ok(Figures {
        watchers: n,
        apiserver_cpu_ms: cpu.round(),
        apiserver_rss_mib: mib(rss * 1024.0),
        apiserver_rss_delta_mib: mib((rss - rss_before) * 1024.0),
        bytes_sent_mib: mib(sent as f64),
        window_ms: window_ms.round(),
        writes_ms: writes_ms.round(),
        connect_ms: connect_ms.round(),
    })
}
