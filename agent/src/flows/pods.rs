//! Which pod has an address, for flow records: an index the reader thread keeps and rebuilds
//! from the agent's policy model only when pods changed since, and only when it needs it (a
//! lookup missed, or the index is a second old), so a quiet node or a busy datastore costs
//! nothing extra and a flood costs at most one rebuild per model change.

use sepal_felix::policy::Pod;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The cluster's pods as the agent's policy model has them now.
pub type PodSource = Box<dyn Fn() -> Vec<Arc<Pod>> + Send + Sync>;

/// An index older than this is rebuilt on its next use when pods changed.
const MAX_AGE: Duration = Duration::from_secs(1);

/// The agent's side: where pods come from, and whether they changed.
#[derive(Default)]
pub struct PodDirectory {
    changed: AtomicBool,
    source: OnceLock<PodSource>,
}

impl PodDirectory {
    /// Pods may have changed (an apply of policy, which follows every model change and CNI call).
    pub fn changed(&self) {
        self.changed.store(true, Ordering::Relaxed);
    }

    /// Sets where pods come from (once, when the agent exists).
    pub fn set_source(&self, source: PodSource) {
        let _ = self.source.set(source);
        self.changed();
    }
}

/// The reader thread's side: address → `NAMESPACE/NAME`.
#[derive(Default)]
pub struct PodIndex {
    by_ip: HashMap<IpAddr, String>,
    built: Option<Instant>,
}

impl PodIndex {
    /// The pods with `ips` (None: no pod has it), rebuilding the index first when it may be
    /// stale and it matters.
    pub fn lookup<const N: usize>(
        &mut self,
        dir: &PodDirectory,
        ips: [IpAddr; N],
    ) -> [Option<String>; N] {
        let found = ips.map(|ip| self.by_ip.get(&ip).cloned());
        let missed = found.iter().any(Option::is_none);
        let old = self.built.is_none_or(|t| t.elapsed() > MAX_AGE);
        if (missed || old) && self.rebuild(dir) {
            return ips.map(|ip| self.by_ip.get(&ip).cloned());
        }
        found
    }

    /// Rebuilds from the directory's source if pods changed since the last build.
    fn rebuild(&mut self, dir: &PodDirectory) -> bool {
        let Some(source) = dir.source.get() else {
            return false;
        };
        if !dir.changed.swap(false, Ordering::Relaxed) {
            return false;
        }
        self.by_ip = index(&source());
        self.built = Some(Instant::now());
        true
    }
}

/// Host-network pods are left out: their address is their node's, shared by all of them.
fn index(pods: &[Arc<Pod>]) -> HashMap<IpAddr, String> {
    pods.iter()
        .filter(|p| !p.host_network)
        .flat_map(|p| {
            let name = format!("{}/{}", p.namespace, p.name);
            p.ips.iter().map(move |ip| (*ip, name.clone()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn pod(ns: &str, name: &str, ip: &str, host_network: bool) -> Arc<Pod> {
        Arc::new(Pod {
            namespace: ns.into(),
            name: name.into(),
            ips: vec![ip.parse().unwrap()],
            host_network,
            ..Pod::default()
        })
    }

    #[test]
    fn rebuilds_only_when_pods_changed_and_a_lookup_needs_it() {
        let dir = PodDirectory::default();
        let builds = Arc::new(AtomicUsize::new(0));
        let counted = builds.clone();
        dir.set_source(Box::new(move || {
            counted.fetch_add(1, Ordering::Relaxed);
            vec![
                pod("shop", "web", "10.0.0.1", false),
                pod("kube-system", "proxy", "192.0.2.1", true),
            ]
        }));
        let mut index = PodIndex::default();
        let [web, node, outside] = index.lookup(
            &dir,
            ["10.0.0.1", "192.0.2.1", "203.0.113.9"].map(|ip| ip.parse().unwrap()),
        );
        assert_eq!(web.as_deref(), Some("shop/web"));
        assert_eq!((node, outside), (None, None));
        // Misses without a change rebuild nothing; a change and a miss do.
        index.lookup(&dir, ["203.0.113.9".parse().unwrap()]);
        assert_eq!(builds.load(Ordering::Relaxed), 1);
        dir.changed();
        index.lookup(&dir, ["10.0.0.1".parse().unwrap()]);
        assert_eq!(
            builds.load(Ordering::Relaxed),
            1,
            "a fresh hit needs no rebuild"
        );
        index.lookup(&dir, ["203.0.113.9".parse().unwrap()]);
        assert_eq!(builds.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn without_a_source_nothing_resolves() {
        let mut index = PodIndex::default();
        let dir = PodDirectory::default();
        assert_eq!(index.lookup(&dir, ["10.0.0.1".parse().unwrap()]), [None]);
    }
}
