//! CRDs a cluster gets from elsewhere than Sepal, installed once the API server is up, as an
//! operator would before installing Sepal: the ClusterNetworkPolicy CRD of network-policy-api's
//! experimental channel (`nodes` peers, named ports), which scripts/kube-build copies from the
//! module version it pins into its output folder. Once per control plane, so every test and lab
//! on it has the resource without waiting for a CRD of its own.

use anyhow::{bail, Context, Result};
use kube::api::{Api, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::core::ApiResource;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Where in scripts/kube-build's folder the ClusterNetworkPolicy CRD is.
pub const CNP_CRD: &str = "crds/experimental/policy.networking.k8s.io_clusternetworkpolicies.yaml";

/// How long the API server may take to serve a new CRD.
const ESTABLISH_TIMEOUT: Duration = Duration::from_secs(60);

/// The CRD file in `bin`, or an error saying how to get it.
pub fn cnp_crd(bin: &Path) -> Result<PathBuf> {
    let path = bin.join(CNP_CRD);
    if !path.is_file() {
        bail!(
            "no ClusterNetworkPolicy CRD at {}: run scripts/kube-build (it copies the one of \
             the network-policy-api version it pins), or start without it (--no-cnp-crd)",
            path.display()
        );
    }
    Ok(path)
}

/// Applies the CRD in `path` (server-side, as `kubectl apply --server-side`) and waits until
/// the API server serves it.
pub async fn install(client: &kube::Client, path: &Path) -> Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?;
    let crd: Value =
        serde_norway::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    let name = crd["metadata"]["name"]
        .as_str()
        .with_context(|| format!("{}: a CRD without metadata.name", path.display()))?
        .to_string();
    let gvk = GroupVersionKind::gvk("apiextensions.k8s.io", "v1", "CustomResourceDefinition");
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ApiResource::from_gvk(&gvk));
    api.patch(
        &name,
        &PatchParams::apply("sepal-lab").force(),
        &Patch::Apply(&crd),
    )
    .await
    .with_context(|| format!("applying CRD {name} from {}", path.display()))?;
    let started = Instant::now();
    loop {
        let now = api.get(&name).await?;
        let established = now.data["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Established" && c["status"] == "True");
        if established {
            tracing::info!(
                crd = name,
                ms = started.elapsed().as_millis() as u64,
                "CRD installed"
            );
            return Ok(());
        }
        if started.elapsed() > ESTABLISH_TIMEOUT {
            bail!(
                "CRD {name} was not Established after {} s",
                ESTABLISH_TIMEOUT.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_crd_says_how_to_get_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = cnp_crd(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("scripts/kube-build") && err.contains("--no-cnp-crd"),
            "{err}"
        );
        let path = dir.path().join(CNP_CRD);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, "kind: CustomResourceDefinition\n").unwrap();
        assert_eq!(cnp_crd(dir.path()).unwrap(), path);
    }
}
