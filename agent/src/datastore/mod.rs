//! Datastores: where the agent's model comes from. Each one is a stream of model events
//! (upsert, delete, synced), so the Kubernetes API and a plain directory feed the same model.

mod cnp_status;
pub mod dir;
pub mod kube;
mod kube_cnp;
mod kube_pods;
mod kube_secrets;
mod proto;
pub mod status;

use crate::model::Event;
use anyhow::Result;
use std::path::PathBuf;
use std::str::FromStr;
use tokio::sync::mpsc;

/// The `--datastore` value: `kubernetes` or `dir:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatastoreSpec {
    Kubernetes,
    Dir(PathBuf),
}

impl FromStr for DatastoreSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        if s == "kubernetes" {
            return Ok(DatastoreSpec::Kubernetes);
        }
        match s.strip_prefix("dir:") {
            Some(path) if !path.is_empty() => Ok(DatastoreSpec::Dir(PathBuf::from(path))),
            _ => Err(format!(
                "invalid datastore {s:?}: expected `kubernetes` or `dir:PATH`"
            )),
        }
    }
}

impl std::fmt::Display for DatastoreSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DatastoreSpec::Kubernetes => f.write_str("kubernetes"),
            DatastoreSpec::Dir(p) => write!(f, "dir:{}", p.display()),
        }
    }
}

/// Starts the datastore: its events arrive on the returned channel, the initial state first,
/// then `Event::Synced`, then live changes. The task ends when the receiver is dropped.
/// `kubeconfig` is for `kubernetes` (default: in-cluster, else KUBECONFIG or ~/.kube/config).
pub fn start(
    spec: &DatastoreSpec,
    kubeconfig: Option<&std::path::Path>,
) -> Result<mpsc::Receiver<Event>> {
    let (tx, rx) = mpsc::channel(1024);
    match spec {
        DatastoreSpec::Kubernetes => self::kube::spawn(kubeconfig.map(Into::into), tx),
        DatastoreSpec::Dir(path) => {
            let source = dir::DirSource::new(path.clone())?;
            tokio::spawn(dir::run(source, tx));
        }
    }
    Ok(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_specs() {
        assert_eq!(
            "kubernetes".parse::<DatastoreSpec>().unwrap(),
            DatastoreSpec::Kubernetes
        );
        assert_eq!(
            "dir:/x/y".parse::<DatastoreSpec>().unwrap(),
            DatastoreSpec::Dir("/x/y".into())
        );
        assert!("dir:".parse::<DatastoreSpec>().is_err());
        assert!("etcd".parse::<DatastoreSpec>().is_err());
    }
}
