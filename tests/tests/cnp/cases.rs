//! The case file `tests/policy/cnp-upstream.yaml` (its header says how upstream's tests map) and
//! the world a test mutates: namespace and pod labels, ClusterNetworkPolicies kept as YAML so a
//! step can patch any field of their spec, NetworkPolicies.

use std::collections::BTreeMap;
use std::sync::Arc;

use sepal_felix::policy::cnp_api::{CNP_GROUP, CNP_KIND, CNP_VERSIONS};
use sepal_felix::policy::{
    validate_cluster_policy, Cluster, ClusterNetworkPolicy, Namespace, NetworkPolicy, Protocol,
};
use serde::Deserialize;
use serde_norway::Value;

use super::houses::{self, PodDef};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseFile {
    /// Anchors for the selectors the tests share; nothing reads them but YAML itself.
    #[serde(default)]
    #[allow(dead_code)]
    aliases: Value,
    pub tests: Vec<Test>,
}

/// One upstream ConformanceTest.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Test {
    /// Upstream's ShortName.
    pub test: String,
    /// Upstream's file under conformance/tests.
    #[allow(dead_code)]
    pub source: String,
    #[allow(dead_code)]
    pub features: Vec<String>,
    /// False for a test upstream defines but never adds to its suite.
    #[serde(default = "yes")]
    #[allow(dead_code)]
    pub registered: bool,
    pub objects: Vec<Value>,
    pub subtests: Vec<Subtest>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subtest {
    pub name: String,
    pub steps: Vec<Step>,
    #[serde(default)]
    pub cleanup: Vec<Step>,
}

/// One step; in the file a map with exactly one of these keys (YAML's own enum form is a tag).
#[derive(Debug, Clone, Deserialize)]
#[serde(try_from = "StepFields")]
pub enum Step {
    /// `[client, server, protocol, port, connect]`.
    Poke(String, String, String, u16, bool),
    Swap(Swap),
    Set(Patch),
    Insert(Patch),
    NamespaceLabels(BTreeMap<String, BTreeMap<String, String>>),
    LabelPod(BTreeMap<String, BTreeMap<String, String>>),
    UnlabelPod(BTreeMap<String, String>),
    DeleteNetworkPolicy(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StepFields {
    poke: Option<(String, String, String, u16, bool)>,
    swap: Option<Swap>,
    set: Option<Patch>,
    insert: Option<Patch>,
    namespace_labels: Option<BTreeMap<String, BTreeMap<String, String>>>,
    label_pod: Option<BTreeMap<String, BTreeMap<String, String>>>,
    unlabel_pod: Option<BTreeMap<String, String>>,
    delete_network_policy: Option<String>,
}

impl TryFrom<StepFields> for Step {
    type Error = String;

    fn try_from(f: StepFields) -> Result<Step, String> {
        let steps: Vec<Step> = [
            f.poke.map(|(c, s, p, n, ok)| Step::Poke(c, s, p, n, ok)),
            f.swap.map(Step::Swap),
            f.set.map(Step::Set),
            f.insert.map(Step::Insert),
            f.namespace_labels.map(Step::NamespaceLabels),
            f.label_pod.map(Step::LabelPod),
            f.unlabel_pod.map(Step::UnlabelPod),
            f.delete_network_policy.map(Step::DeleteNetworkPolicy),
        ]
        .into_iter()
        .flatten()
        .collect();
        match <[Step; 1]>::try_from(steps) {
            Ok([step]) => Ok(step),
            Err(v) => Err(format!(
                "a step has exactly one key, this one has {}",
                v.len()
            )),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Swap {
    pub cnp: String,
    #[serde(default)]
    pub ingress: Option<(usize, usize)>,
    #[serde(default)]
    pub egress: Option<(usize, usize)>,
}

/// A field of a ClusterNetworkPolicy's spec, by path (`egress[5].protocols`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Patch {
    pub cnp: String,
    pub path: String,
    pub value: Value,
}

/// A poke resolved against the world.
#[derive(Debug, Clone)]
pub struct Poke {
    pub client: PodDef,
    pub server: PodDef,
    pub protocol: Protocol,
    pub port: u16,
    pub connect: bool,
}

impl std::fmt::Display for Poke {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} -> {} ({}) {}/{}, upstream expects {}",
            self.client.name,
            self.server.name,
            self.server.ip,
            self.protocol,
            self.port,
            if self.connect {
                "connect"
            } else {
                "no connect (timeout)"
            }
        )
    }
}

/// Reads the case file with `${pod}` replaced by pod IPs and `${host-port-N}` by host ports, and
/// YAML merge keys applied.
pub fn load(pods: &[PodDef]) -> CaseFile {
    let path = format!(
        "{}/tests/policy/cnp-upstream.yaml",
        env!("CARGO_MANIFEST_DIR")
    );
    let mut text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    for p in pods {
        text = text.replace(&format!("${{{}}}", p.name), &p.ip.to_string());
    }
    for n in 0..8 {
        text = text.replace(
            &format!("${{host-port-{n}}}"),
            &houses::host_port(n).to_string(),
        );
    }
    let unknown = text
        .lines()
        .find(|l| l.contains("${") && !l.trim_start().starts_with('#'));
    assert!(
        unknown.is_none(),
        "{path}: a placeholder names nothing: {unknown:?}"
    );
    let mut value: Value = serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
    value
        .apply_merge()
        .unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_norway::from_value(value).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// The state one upstream test sees.
pub struct World {
    pub pods: Vec<PodDef>,
    ns_labels: BTreeMap<String, BTreeMap<String, String>>,
    pod_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// By name, as YAML.
    cnps: BTreeMap<String, Value>,
    nps: BTreeMap<String, NetworkPolicy>,
}

impl World {
    /// The base world with the test's objects applied.
    pub fn new(pods: &[PodDef], objects: &[Value]) -> Result<World, String> {
        let mut w = World {
            pods: pods.to_vec(),
            ns_labels: houses::namespaces(),
            pod_labels: pods.iter().map(|p| (p.name.clone(), p.labels())).collect(),
            cnps: BTreeMap::new(),
            nps: BTreeMap::new(),
        };
        for o in objects {
            let kind = o["kind"].as_str().unwrap_or_default();
            let api = o["apiVersion"].as_str().unwrap_or_default();
            match kind {
                "ClusterNetworkPolicy" => {
                    let known = CNP_VERSIONS
                        .iter()
                        .any(|v| api == format!("{CNP_GROUP}/{v}"));
                    if !known || kind != CNP_KIND {
                        return Err(format!("{api} {kind}: not a version Sepal reads"));
                    }
                    let name = o["metadata"]["name"].as_str().ok_or("CNP without a name")?;
                    w.cnps.insert(name.to_string(), o.clone());
                }
                "NetworkPolicy" => {
                    let np: NetworkPolicy = serde_norway::from_value(o.clone())
                        .map_err(|e| format!("NetworkPolicy: {e}"))?;
                    let key = format!(
                        "{}/{}",
                        np.metadata.namespace.as_deref().unwrap_or_default(),
                        np.metadata.name.as_deref().unwrap_or_default()
                    );
                    w.nps.insert(key, np);
                }
                other => return Err(format!("object of kind {other:?}")),
            }
        }
        Ok(w)
    }

    pub fn pod(&self, name: &str) -> Result<&PodDef, String> {
        self.pods
            .iter()
            .find(|p| p.name == name)
            .ok_or_else(|| format!("no pod {name}"))
    }

    pub fn poke(&self, step: &Step) -> Result<Option<Poke>, String> {
        let Step::Poke(client, server, protocol, port, connect) = step else {
            return Ok(None);
        };
        let client = self.pod(client)?.clone();
        if client.host_network {
            return Err(format!("client {} is a host-network pod", client.name));
        }
        Ok(Some(Poke {
            client,
            server: self.pod(server)?.clone(),
            protocol: Protocol::from_api(protocol).ok_or_else(|| format!("protocol {protocol}"))?,
            port: *port,
            connect: *connect,
        }))
    }

    /// Applies a mutation step (a poke changes nothing).
    pub fn mutate(&mut self, step: &Step) -> Result<(), String> {
        match step {
            Step::Poke(..) => {}
            Step::Swap(s) => {
                let spec = self.spec(&s.cnp)?;
                for (list, pair) in [("ingress", s.ingress), ("egress", s.egress)] {
                    if let Some((i, j)) = pair {
                        let rules = spec[list]
                            .as_sequence_mut()
                            .ok_or(format!("{}: no {list}", s.cnp))?;
                        if i.max(j) >= rules.len() {
                            return Err(format!("{}: {list} has {} rules", s.cnp, rules.len()));
                        }
                        rules.swap(i, j);
                    }
                }
            }
            Step::Set(p) => *field(self.spec(&p.cnp)?, &p.path, false)? = p.value.clone(),
            Step::Insert(p) => {
                let (list, index) = p
                    .path
                    .rsplit_once('[')
                    .ok_or(format!("insert at {}", p.path))?;
                let index: usize = index
                    .trim_end_matches(']')
                    .parse()
                    .map_err(|_| format!("insert at {}", p.path))?;
                let rules = field(self.spec(&p.cnp)?, list, true)?;
                if rules.is_null() {
                    *rules = Value::Sequence(Vec::new());
                }
                let rules = rules
                    .as_sequence_mut()
                    .ok_or(format!("{}: not a list", p.path))?;
                if index > rules.len() {
                    return Err(format!("{}: only {} items", p.path, rules.len()));
                }
                rules.insert(index, p.value.clone());
            }
            Step::NamespaceLabels(m) => {
                for (ns, labels) in m {
                    let l = self
                        .ns_labels
                        .get_mut(ns)
                        .ok_or(format!("no namespace {ns}"))?;
                    let mut labels = labels.clone();
                    // The API server keeps the name label whatever a patch says.
                    labels.insert(sepal_felix::policy::NAMESPACE_NAME_LABEL.into(), ns.clone());
                    *l = labels;
                }
            }
            Step::LabelPod(m) => {
                for (pod, labels) in m {
                    let l = self
                        .pod_labels
                        .get_mut(pod)
                        .ok_or(format!("no pod {pod}"))?;
                    l.extend(labels.clone());
                }
            }
            Step::UnlabelPod(m) => {
                for (pod, key) in m {
                    self.pod_labels
                        .get_mut(pod)
                        .ok_or(format!("no pod {pod}"))?
                        .remove(key);
                }
            }
            Step::DeleteNetworkPolicy(key) => {
                self.nps
                    .remove(key)
                    .ok_or(format!("no NetworkPolicy {key}"))?;
            }
        }
        Ok(())
    }

    fn spec(&mut self, cnp: &str) -> Result<&mut Value, String> {
        Ok(&mut self
            .cnps
            .get_mut(cnp)
            .ok_or(format!("no ClusterNetworkPolicy {cnp}"))?["spec"])
    }

    /// felix's model of the world; `Err` with every problem validation finds in a policy (the
    /// upstream policies are all valid, at every step).
    pub fn cluster(&self) -> Result<Cluster, Vec<String>> {
        let mut problems = Vec::new();
        let mut cluster = Cluster {
            nodes: houses::nodes(),
            ..Cluster::default()
        };
        for (name, labels) in &self.ns_labels {
            let ns = Namespace {
                name: name.clone(),
                labels: labels.clone(),
            };
            cluster.namespaces.insert(name.clone(), ns);
        }
        for p in &self.pods {
            cluster
                .pods
                .push(Arc::new(p.model(self.pod_labels[&p.name].clone())));
        }
        cluster.policies = self.nps.values().cloned().map(Arc::new).collect();
        for (name, v) in &self.cnps {
            match serde_norway::from_value::<ClusterNetworkPolicy>(v.clone()) {
                Ok(cnp) => {
                    let (valid, found) = validate_cluster_policy(&cnp);
                    problems.extend(found.iter().map(|p| format!("{name}: {p}")));
                    if valid.is_none() {
                        problems.push(format!("{name}: ignored as a whole"));
                    }
                    cluster.cluster_policies.push(Arc::new(cnp));
                }
                Err(e) => problems.push(format!("{name}: {e}")),
            }
        }
        if problems.is_empty() {
            Ok(cluster)
        } else {
            Err(problems)
        }
    }
}

/// The value at `path` (`a[1].b`) below `v`; with `create`, missing map keys are added as null.
fn field<'a>(mut v: &'a mut Value, path: &str, create: bool) -> Result<&'a mut Value, String> {
    for seg in path.split('.') {
        let (key, index) = match seg.split_once('[') {
            Some((k, i)) => (
                k,
                Some(
                    i.trim_end_matches(']')
                        .parse::<usize>()
                        .map_err(|_| format!("path {path}"))?,
                ),
            ),
            None => (seg, None),
        };
        let map = v
            .as_mapping_mut()
            .ok_or(format!("{path}: {key} is not in a map"))?;
        if !map.contains_key(key) {
            if !create {
                return Err(format!("{path}: no {key}"));
            }
            map.insert(key.into(), Value::Null);
        }
        v = map.get_mut(key).expect("present");
        if let Some(i) = index {
            v = v.get_mut(i).ok_or(format!("{path}: no item {i}"))?;
        }
    }
    Ok(v)
}
