//! Sepal installed into the lab's own API server as a user installs it: the CRDs (generated from
//! the types, the same YAML as deploy/crds), deploy/00-namespace.yaml and deploy/10-rbac.yaml as
//! they are, and for the agents a kubeconfig of the ServiceAccount that RBAC binds, with a token
//! from the TokenRequest API: the agents never hold admin credentials, so the lab runs them with
//! exactly the permissions a cluster gives them.

use super::control_plane::Endpoints;
use super::kubeapi;
use super::objects::{documents, write_object};
use super::state::LabState;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::path::Path;
use std::time::{Duration, Instant};

const NAMESPACE: &str = include_str!("../../../deploy/00-namespace.yaml");
const RBAC: &str = include_str!("../../../deploy/10-rbac.yaml");

/// The agents' identity in deploy/10-rbac.yaml.
const AGENT_NAMESPACE: &str = "sepal-system";
const AGENT_ACCOUNT: &str = "sepal-node";

/// The agents' token outlives any lab session: a lab lives as long as its control plane.
const TOKEN_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);

/// How long the API server may take to serve a new CRD.
const ESTABLISHED_TIMEOUT: Duration = Duration::from_secs(30);

/// Applies the CRDs, the namespace and the RBAC, and waits until the CRDs are served.
pub fn sepal(lab: &LabState, kubeconfig: &Path) -> Result<()> {
    let mut crds = Vec::new();
    for (file, yaml) in crate::crd::crd_files() {
        crds.extend(documents(&yaml).with_context(|| format!("generated CRD {file}"))?);
    }
    let manifests = [("00-namespace.yaml", NAMESPACE), ("10-rbac.yaml", RBAC)];
    let mut rest = Vec::new();
    for (file, yaml) in manifests {
        rest.extend(documents(yaml).with_context(|| format!("deploy/{file}"))?);
    }
    for obj in crds.iter().chain(&rest) {
        write_object(lab, obj)?;
    }
    for crd in &crds {
        let name = crd["metadata"]["name"]
            .as_str()
            .context("CRD without name")?;
        wait_established(kubeconfig, name)?;
    }
    Ok(())
}

fn wait_established(kubeconfig: &Path, name: &str) -> Result<()> {
    let deadline = Instant::now() + ESTABLISHED_TIMEOUT;
    loop {
        let crd = kubeapi::get(
            kubeconfig,
            "apiextensions.k8s.io/v1",
            "CustomResourceDefinition",
            name,
        )?;
        let established = crd.as_ref().is_some_and(|c| {
            c["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Established" && c["status"] == "True")
        });
        if established {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "CRD {name} is not Established after {} s",
                ESTABLISHED_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Writes `path`: a kubeconfig of ServiceAccount sepal-system/sepal-node for the control plane
/// of `endpoints`, the token asked for as admin (`kubeconfig`).
pub fn agent_kubeconfig(kubeconfig: &Path, endpoints: &Endpoints, path: &Path) -> Result<()> {
    let token =
        kubeapi::service_account_token(kubeconfig, AGENT_NAMESPACE, AGENT_ACCOUNT, TOKEN_LIFETIME)?;
    // JSON is YAML: a kubeconfig needs no YAML writer.
    let config = json!({
        "apiVersion": "v1", "kind": "Config",
        "clusters": [{"name": "lab", "cluster": {
            "server": endpoints.server, "certificate-authority": endpoints.ca_cert}}],
        "users": [{"name": AGENT_ACCOUNT, "user": {"token": token}}],
        "contexts": [{"name": "lab", "context": {"cluster": "lab", "user": AGENT_ACCOUNT}}],
        "current-context": "lab",
    });
    super::control_plane::write_private(path, &serde_json::to_string_pretty(&config)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_manifests_are_deploys_own() {
        let rbac = documents(RBAC).unwrap();
        let kinds: Vec<&str> = rbac.iter().filter_map(|o| o["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "ServiceAccount",
                "ClusterRole",
                "ClusterRoleBinding",
                "Role",
                "RoleBinding"
            ]
        );
        assert_eq!(rbac[0]["metadata"]["name"], AGENT_ACCOUNT);
        assert_eq!(rbac[0]["metadata"]["namespace"], AGENT_NAMESPACE);
        let ns = documents(NAMESPACE).unwrap();
        assert_eq!(ns[0]["metadata"]["name"], AGENT_NAMESPACE);
    }
}
