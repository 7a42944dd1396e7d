// `sepal-bench datastore`: a large cluster (1,000 Nodes, 30,000 Pods, 1,000 NetworkPolicies,
// 2,000 Services by default) through the Kubernetes datastore against the stand-in API server.
//
// Measures the agent's datastore (`sepal datastore --datastore kubernetes --summary`: the same
// watchers and model as `sepal node`) from process start to the synced model: wall time to ready and
// peak RSS (the kernel's high-water mark of the process, VmHWM).

use crate::fakeapi::FakeApi;
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Instant;

struct Sizes {
    nodes: usize,
    pods: usize,
    policies: usize,
    services: usize,
}

fn parse(args: &[String]) -> Result<Sizes> {
    let mut s = Sizes {
        nodes: 1000,
        pods: 30_000,
        policies: 1000,
        services: 2000,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v: usize = it
            .next()
            .with_context(|| format!("{a} needs a number"))?
            .parse()
            .with_context(|| format!("{a} needs a number"))?;
        match a.as_str() {
            "--nodes" => s.nodes = v,
            "--pods" => s.pods = v,
            "--policies" => s.policies = v,
            "--services" => s.services = v,
            other => bail!("unknown option {other}; use --nodes/--pods/--policies/--services N"),
        }
    }
    if s.nodes == 0 || s.nodes > 65_000 {
        bail!("--nodes must be 1..=65000");
    }
    Ok(s)
}

const NAMESPACES: usize = 50;

/// Objects shaped like a real cluster's, with the bulk the API server really sends (managed
/// fields, images, env, conditions) so that stripping is measured too.
fn cluster(s: &Sizes) -> Vec<Value> {
    let mut out = Vec::with_capacity(s.nodes + s.pods + s.policies + s.services + NAMESPACES);
    let managed = json!([{"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
        "time": "2026-01-01T00:00:00Z", "fieldsType": "FieldsV1",
        "fieldsV1": {"f:status": {"f:conditions": {".": {}, "k:{\"type\":\"Ready\"}": {}}}}}]);
    for n in 0..s.nodes {
        out.push(json!({"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": format!("node-{n}"), "managedFields": managed,
                "labels": {"kubernetes.io/hostname": format!("node-{n}"), "topology.sepal.dev/rack": format!("r{}", n / 40)}},
            "spec": {"podCIDRs": [format!("10.{}.{}.0/24", 64 + n / 256, n % 256)]},
            "status": {"addresses": [{"type": "InternalIP", "address": format!("172.16.{}.{}", n / 256, n % 256)}],
                "images": [{"names": ["registry.example/app@sha256:0123456789abcdef"], "sizeBytes": 123456789}],
                "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}}));
    }
    for ns in 0..NAMESPACES {
        out.push(json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": format!("ns-{ns}"), "labels": {"team": format!("t{}", ns % 7)}}}));
    }
    for p in 0..s.pods {
        let node = p % s.nodes;
        let ip = format!(
            "10.{}.{}.{}",
            64 + node / 256,
            node % 256,
            2 + (p / s.nodes) % 250
        );
        out.push(json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": format!("app-{p}-7d9f8b6c5-x2k4q"), "namespace": format!("ns-{}", p % NAMESPACES),
                "labels": {"app": format!("app-{}", p % 500), "pod-template-hash": "7d9f8b6c5", "tier": "backend"},
                "annotations": {"kubectl.kubernetes.io/restartedAt": "2026-01-01T00:00:00Z"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "app-7d9f8b6c5", "uid": "1234", "controller": true}],
                "managedFields": managed},
            "spec": {"nodeName": format!("node-{node}"),
                "containers": [{"name": "app", "image": "registry.example/app:1.2.3",
                    "env": [{"name": "MODE", "value": "production"}, {"name": "LOG", "value": "info"}],
                    "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}},
                    "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
                    "volumeMounts": [{"name": "kube-api-access", "mountPath": "/var/run/secrets/kubernetes.io/serviceaccount", "readOnly": true}]}],
                "volumes": [{"name": "kube-api-access", "projected": {"sources": [{"serviceAccountToken": {"path": "token"}}]}}],
                "serviceAccountName": "default", "restartPolicy": "Always"},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": "172.16.0.1",
                "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
                "containerStatuses": [{"name": "app", "ready": true, "restartCount": 0, "image": "registry.example/app:1.2.3",
                    "imageID": "registry.example/app@sha256:0123456789abcdef", "containerID": "containerd://abcdef",
                    "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}}));
    }
    for i in 0..s.policies {
        out.push(json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": format!("policy-{i}"), "namespace": format!("ns-{}", i % NAMESPACES)},
            "spec": {"podSelector": {"matchLabels": {"app": format!("app-{}", i % 500)}}, "policyTypes": ["Ingress"],
                "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {"team": format!("t{}", i % 7)}}},
                                      {"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}],
                             "ports": [{"port": "http", "protocol": "TCP"}]}]}}));
    }
    for i in 0..s.services {
        out.push(json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": format!("svc-{i}"), "namespace": format!("ns-{}", i % NAMESPACES)},
            "spec": {"type": "ClusterIP", "clusterIP": format!("10.96.{}.{}", i / 256, i % 256),
                "clusterIPs": [format!("10.96.{}.{}", i / 256, i % 256)],
                "selector": {"app": format!("app-{}", i % 500)},
                "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]}}));
    }
    out
}

/// CPU time (user + system) a process has used so far, in ms.
fn cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after the last ')'.
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks * 1000.0 / hz)
}

/// Runs the datastore once; returns (ready_ms, cpu_ms, peak RSS in KiB, objects in the model).
fn measure(api: &FakeApi, kubeconfig: &std::path::Path) -> Result<(f64, f64, u64, u64)> {
    let started = Instant::now();
    let mut child = Command::new(crate::bin_path("sepal"))
        .args([
            "datastore",
            "--datastore",
            "kubernetes",
            "--summary",
            "--watch",
            "--kubeconfig",
        ])
        .arg(kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting sepal datastore")?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let ready = started.elapsed().as_secs_f64() * 1000.0;
    let cpu = cpu_ms(child.id()).unwrap_or(f64::NAN);
    // VmHWM: the peak RSS of the process's own memory since exec (rusage's maxrss would also
    // count the bench's memory, inherited across fork and exec).
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id()));
    let _ = child.kill();
    let _ = child.wait();
    let status = status.context("reading the datastore's /proc/PID/status")?;
    let hwm_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .context("no VmHWM in /proc/PID/status")?;
    let v: Value = serde_json::from_str(line.trim()).with_context(|| {
        format!(
            "sepal datastore printed {line:?} (API server at {})",
            api.url()
        )
    })?;
    if v["synced"] != json!(true) {
        bail!("not synced: {line}");
    }
    Ok((ready, cpu, hwm_kib, v["objects"].as_u64().unwrap_or(0)))
}

pub fn run(args: &[String]) -> Result<()> {
    let s = parse(args)?;
    let objects = cluster(&s);
    let total = objects.len();
    let api = FakeApi::start();
    api.apply_all(objects);
    let dir = tempfile::tempdir()?;
    let kc = dir.path().join("kubeconfig");
    api.write_kubeconfig(&kc)?;
    println!(
        "cluster: {} nodes, {} pods, {} network policies, {} services, {} namespaces ({total} objects)",
        s.nodes, s.pods, s.policies, s.services, NAMESPACES
    );
    let mut runs = Vec::new();
    for i in 1..=3 {
        let (ready, cpu, rss_kib, objects) = measure(&api, &kc)?;
        if objects as usize != total {
            bail!("the model holds {objects} objects, the API server {total}");
        }
        println!(
            "run {i}: ready in {ready:.0} ms (agent CPU {cpu:.0} ms), peak RSS {:.1} MiB",
            rss_kib as f64 / 1024.0
        );
        runs.push((ready, rss_kib, cpu));
    }
    // Median of 3 for time; the largest peak RSS (memory is a ceiling, not an average).
    let mut times: Vec<f64> = runs.iter().map(|r| r.0).collect();
    times.sort_by(f64::total_cmp);
    let rss = runs.iter().map(|r| r.1).max().unwrap_or(0) as f64 / 1024.0;
    let mut cpus: Vec<f64> = runs.iter().map(|r| r.2).collect();
    cpus.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({"nodes": s.nodes, "pods": s.pods, "policies": s.policies, "services": s.services,
               "objects": total, "ready_ms": times[1].round(), "cpu_ms": cpus[1].round(), "rss_mib": (rss * 10.0).round() / 10.0,
               "target_rss_mib": 64})
    );
    Ok(())
}
