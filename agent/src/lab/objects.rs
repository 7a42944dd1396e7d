//! The lab as control plane and kubelet: Kubernetes objects written into the shared dir
//! datastore (or the lab's API server), and pods created and removed through the real
//! `sepal-cni`, as a runtime does.

use super::net;
use super::state::{LabState, PodState};
use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::Stdio;

/// File in the datastore holding one object: `<kind>.<namespace>.<name>.json`.
fn object_path(lab: &LabState, obj: &Value) -> Result<PathBuf> {
    let kind = obj["kind"]
        .as_str()
        .context("object without kind")?
        .to_ascii_lowercase();
    let name = obj["metadata"]["name"]
        .as_str()
        .context("object without metadata.name")?;
    let namespace = obj["metadata"]["namespace"].as_str().unwrap_or("_");
    for part in [kind.as_str(), namespace, name] {
        if part.contains('/') || part.starts_with('.') {
            bail!("invalid object name part {part:?}");
        }
    }
    Ok(lab
        .datastore()
        .join(format!("{kind}.{namespace}.{name}.json")))
}

/// Writes (or replaces) an object: in the lab's API server, or atomically in the dir datastore,
/// so the agents' watchers never read half a file.
pub fn write_object(lab: &LabState, obj: &Value) -> Result<()> {
    if let Some(kubeconfig) = lab.admin_kubeconfig() {
        return super::kubeapi::put(kubeconfig, obj);
    }
    let path = object_path(lab, obj)?;
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(&serde_json::to_vec_pretty(obj)?)?;
    file.sync_all()?;
    std::fs::rename(&tmp, &path).with_context(|| format!("write {}", path.display()))
}

pub fn remove_object(lab: &LabState, obj: &Value) -> Result<()> {
    if let Some(kubeconfig) = lab.admin_kubeconfig() {
        return super::kubeapi::remove(kubeconfig, obj);
    }
    let path = object_path(lab, obj)?;
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
        _ => Ok(()),
    }
}

/// The objects of a YAML stream, as `kubectl apply -f` reads it: every document, a List's items
/// in its place, empty documents skipped.
pub fn documents(text: &str) -> Result<Vec<Value>> {
    let mut docs = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        match <Value as serde::Deserialize>::deserialize(doc)? {
            Value::Null => {}
            list @ Value::Object(_) if list["kind"] == "List" => {
                docs.extend(list["items"].as_array().cloned().unwrap_or_default())
            }
            other => docs.push(other),
        }
    }
    Ok(docs)
}

pub fn namespace_object(name: &str, labels: &BTreeMap<String, String>) -> Value {
    let mut labels = labels.clone();
    // Kubernetes labels every namespace with its own name; policies rely on it.
    labels.insert("kubernetes.io/metadata.name".into(), name.into());
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

/// Pod spec fields the lab understands from an applied Pod object.
pub struct PodRequest {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub labels: BTreeMap<String, String>,
    /// The Pod object as applied (containers, ports), written back with status filled in.
    pub object: Value,
}

impl PodRequest {
    pub fn from_object(obj: &Value) -> Result<PodRequest> {
        let name = obj["metadata"]["name"]
            .as_str()
            .context("Pod without metadata.name")?
            .to_string();
        let namespace = obj["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_string();
        let node = obj["spec"]["nodeName"]
            .as_str()
            .with_context(|| {
                format!("Pod {namespace}/{name} needs spec.nodeName (the lab has no scheduler)")
            })?
            .to_string();
        let labels = serde_json::from_value(obj["metadata"]["labels"].clone()).unwrap_or_default();
        let mut object = obj.clone();
        object["metadata"]["namespace"] = json!(namespace);
        Ok(PodRequest {
            namespace,
            name,
            node,
            labels,
            object,
        })
    }
}

/// Creates the pod: its namespace, CNI ADD on its node, and the Pod object with `status.podIPs`.
pub fn create_pod(lab: &LabState, req: PodRequest) -> Result<PodState> {
    let node = lab
        .node(&req.node)
        .with_context(|| format!("unknown node {:?}", req.node))?;
    let netns = lab.pod_netns(&req.namespace, &req.name);
    let container_id = format!("{}-{}-{}", lab.name, req.namespace, req.name);
    // As in Kubernetes, the Pod object (with its labels) exists before kubelet calls CNI ADD:
    // the agent's policy for the pod is in place when ADD returns.
    let pending = PodState {
        namespace: req.namespace.clone(),
        name: req.name.clone(),
        node: req.node.clone(),
        netns: netns.clone(),
        container_id: container_id.clone(),
        ips: Vec::new(),
        labels: req.labels.clone(),
    };
    write_pod(lab, &pending, req.object.clone())?;
    net::add_netns(&netns, false)?;
    let result = cni(
        lab,
        &node.netns,
        &node.name,
        "ADD",
        &container_id,
        &netns,
        &req.namespace,
        &req.name,
    );
    let result = match result {
        Ok(r) => r,
        Err(e) => {
            net::del_netns(&netns);
            let obj = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": req.name, "namespace": req.namespace}});
            let _ = remove_object(lab, &obj);
            return Err(e.context(format!("CNI ADD for pod {}/{}", req.namespace, req.name)));
        }
    };
    let ips: Vec<String> = result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .map(|a| a.split('/').next().unwrap_or(a).to_string())
        .collect();
    let pod = PodState {
        namespace: req.namespace,
        name: req.name,
        node: req.node,
        netns,
        container_id,
        ips,
        labels: req.labels,
    };
    write_pod(lab, &pod, req.object)?;
    Ok(pod)
}

/// Writes the Pod object as kubelet would have it: labels, node, phase Running, pod IPs.
pub fn write_pod(lab: &LabState, pod: &PodState, mut object: Value) -> Result<()> {
    object["apiVersion"] = json!("v1");
    object["kind"] = json!("Pod");
    object["metadata"]["name"] = json!(pod.name);
    object["metadata"]["namespace"] = json!(pod.namespace);
    object["metadata"]["labels"] = json!(pod.labels);
    object["spec"]["nodeName"] = json!(pod.node);
    if object["spec"]["containers"].is_null() {
        object["spec"]["containers"] = json!([{"name": "main", "image": "lab"}]);
    }
    let pod_ips: Vec<Value> = pod.ips.iter().map(|ip| json!({"ip": ip})).collect();
    let running = !pod.ips.is_empty();
    // One status per container, as kubelet reports them (kubectl's READY column counts these).
    let state = match running {
        true => json!({"running": {}}),
        false => json!({"waiting": {"reason": "ContainerCreating"}}),
    };
    let containers: Vec<Value> = object["spec"]["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            json!({"name": c["name"], "image": c["image"], "imageID": "", "ready": running,
                   "started": running, "restartCount": 0, "state": state})
        })
        .collect();
    object["status"] = json!({
        "phase": if running { "Running" } else { "Pending" },
        "podIP": pod.ips.first(),
        "podIPs": pod_ips,
        "conditions": [{"type": "Ready", "status": if running { "True" } else { "False" }}],
        "containerStatuses": containers,
    });
    write_object(lab, &object)
}

/// CNI DEL on the pod's node, then its namespace and object go.
pub fn delete_pod(lab: &LabState, pod: &PodState) -> Result<()> {
    if let Some(node) = lab.node(&pod.node) {
        cni(
            lab,
            &node.netns,
            &node.name,
            "DEL",
            &pod.container_id,
            &pod.netns,
            &pod.namespace,
            &pod.name,
        )
        .with_context(|| format!("CNI DEL for pod {}/{}", pod.namespace, pod.name))?;
    }
    net::del_netns(&pod.netns);
    let obj = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod.name, "namespace": pod.namespace}});
    remove_object(lab, &obj)
}

/// Calls `sepal-cni` inside the node's namespace with the runtime's environment and config.
#[allow(clippy::too_many_arguments)]
fn cni(
    lab: &LabState,
    node_netns: &str,
    node: &str,
    command: &str,
    container_id: &str,
    pod_netns: &str,
    namespace: &str,
    name: &str,
) -> Result<Value> {
    let plugin = sibling_binary("sepal-cni")?;
    let config = json!({
        "cniVersion": "1.1.0", "name": "sepal", "type": "sepal-cni",
        "socket": lab.socket(node),
    });
    let mut cmd = net::command_in(node_netns, &[plugin.to_str().context("plugin path")?]);
    cmd.env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", format!("/run/netns/{pod_netns}"))
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name}"),
        )
        .env(
            "CNI_PATH",
            plugin.parent().unwrap_or(std::path::Path::new("/")),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("start sepal-cni")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(config.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "sepal-cni {command}: {} {}",
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    if stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout).with_context(|| format!("sepal-cni {command} printed {stdout:?}"))
}

/// A binary installed next to the running `sepal` (both come from the same build or package).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe.with_file_name(name);
    if !path.is_file() {
        bail!(
            "{name} not found next to {} (build the whole workspace)",
            exe.display()
        );
    }
    Ok(path)
}
