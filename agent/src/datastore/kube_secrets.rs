// BGP peer passwords from Kubernetes: the agent watches only the Secrets that BGPPeers name, one
// watch per Secret narrowed by a `metadata.name` field selector, instead of every Secret in
// sepal-system. A Secret nobody references is never sent to any node, and a compromised agent's
// watches show exactly which Secrets it reads (the RBAC Role still grants list/watch in the
// namespace: RBAC cannot name objects that do not exist yet).

use super::kube::{log_watch_error, strip, SyncGate};
use crate::model::{Event, Object, ObjectKey};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Secret;
use kube::api::DynamicObject;
use kube::core::ApiResource;
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// A Secret by namespace and name.
type SecretRef = (String, String);

/// The Secret a BGPPeer's password comes from (its namespace defaults to sepal-system).
pub fn secret_of(peer: &serde_json::Value) -> Option<SecretRef> {
    let r = &peer["spec"]["password"]["secretKeyRef"];
    let name = r["name"].as_str().filter(|n| !n.is_empty())?;
    let ns = r["namespace"]
        .as_str()
        .filter(|n| !n.is_empty())
        .unwrap_or(crate::crd::DEFAULT_SECRET_NAMESPACE);
    Some((ns.to_string(), name.to_string()))
}

fn secret_key((namespace, name): &SecretRef) -> ObjectKey {
    ObjectKey {
        api_version: "v1".into(),
        kind: "Secret".into(),
        namespace: namespace.clone(),
        name: name.clone(),
    }
}

/// Which Secrets the BGPPeers name, kept from the peers' watch events.
#[derive(Default)]
struct References {
    /// BGPPeer name -> its Secret.
    by_peer: BTreeMap<String, SecretRef>,
    /// Peers seen since a (re)list started; the others are gone at its end.
    relisting: Option<BTreeSet<String>>,
}

impl References {
    fn apply(&mut self, ev: watcher::Event<DynamicObject>) -> bool {
        let name_of = |o: &DynamicObject| o.metadata.name.clone().unwrap_or_default();
        let secret = |o: &DynamicObject| serde_json::to_value(o).ok().as_ref().and_then(secret_of);
        match ev {
            watcher::Event::Init => {
                self.relisting = Some(BTreeSet::new());
                return false;
            }
            watcher::Event::InitApply(o) | watcher::Event::Apply(o) => {
                let name = name_of(&o);
                if let Some(seen) = self.relisting.as_mut() {
                    seen.insert(name.clone());
                }
                match secret(&o) {
                    Some(s) => self.by_peer.insert(name, s),
                    None => self.by_peer.remove(&name),
                };
            }
            watcher::Event::Delete(o) => {
                self.by_peer.remove(&name_of(&o));
            }
            watcher::Event::InitDone => {
                if let Some(seen) = self.relisting.take() {
                    self.by_peer.retain(|peer, _| seen.contains(peer));
                }
            }
        }
        true
    }

    fn wanted(&self) -> BTreeSet<SecretRef> {
        self.by_peer.values().cloned().collect()
    }
}

/// Watches one Secret until aborted; reports on `listed` once its first list has completed
/// (or the Secret may not be read at all: a peer's missing password is its own error, and must
/// not keep the whole agent unsynced).
async fn watch_one(
    client: Client,
    secret: SecretRef,
    tx: mpsc::Sender<Event>,
    listed: mpsc::Sender<SecretRef>,
) {
    let api: Api<Secret> = Api::namespaced(client, &secret.0);
    let cfg = watcher::Config::default().fields(&format!("metadata.name={}", secret.1));
    let mut stream = watcher(api, cfg)
        .backoff(super::kube::watch_backoff())
        .boxed();
    let (mut held, mut seen_in_list, mut reported) = (false, false, false);
    let what = "secrets";
    let mut failing = false;
    while let Some(item) = stream.next().await {
        if item.is_ok() && std::mem::take(&mut failing) {
            crate::metrics::metrics().health.set_forbidden(what, false);
        }
        let event = match item {
            Err(err) => {
                failing = true;
                log_watch_error(what, &err);
                if !reported && is_forbidden(&err) {
                    reported = listed.send(secret.clone()).await.is_ok();
                }
                continue;
            }
            Ok(watcher::Event::Init) => {
                seen_in_list = false;
                None
            }
            Ok(watcher::Event::InitApply(s) | watcher::Event::Apply(s)) => {
                seen_in_list = true;
                held = true;
                Some(Event::Upsert(strip(Object::Secret(Box::new(s)))))
            }
            Ok(watcher::Event::Delete(_)) => {
                held = false;
                Some(Event::Delete(secret_key(&secret)))
            }
            Ok(watcher::Event::InitDone) => {
                if !reported {
                    reported = listed.send(secret.clone()).await.is_ok();
                }
                // A relist without it: deleted while the watch was down.
                let gone = held && !seen_in_list;
                held &= seen_in_list;
                gone.then(|| Event::Delete(secret_key(&secret)))
            }
        };
        if let Some(ev) = event {
            if tx.send(ev).await.is_err() {
                return;
            }
        }
    }
}

fn is_forbidden(err: &watcher::Error) -> bool {
    matches!(
        err,
        watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            | watcher::Error::WatchFailed(kube::Error::Api(s))
            if s.code == 403
    )
}

/// The Secret watches, one per Secret the peers name.
struct Watches {
    client: Client,
    tx: mpsc::Sender<Event>,
    listed: mpsc::Sender<SecretRef>,
    running: BTreeMap<SecretRef, JoinHandle<()>>,
    /// Started before the initial sync and not listed yet.
    pending: BTreeSet<SecretRef>,
}

impl Watches {
    /// Starts a watch for each newly named Secret and stops those no peer names any more (their
    /// Secret leaves the model). False once the model's receiver is gone.
    async fn follow(&mut self, wanted: BTreeSet<SecretRef>, synced: bool) -> bool {
        let gone: Vec<SecretRef> = self
            .running
            .keys()
            .filter(|s| !wanted.contains(*s))
            .cloned()
            .collect();
        for s in gone {
            if let Some(task) = self.running.remove(&s) {
                task.abort();
            }
            self.pending.remove(&s);
            if self.tx.send(Event::Delete(secret_key(&s))).await.is_err() {
                return false;
            }
        }
        for s in wanted {
            if self.running.contains_key(&s) {
                continue;
            }
            let task = watch_one(
                self.client.clone(),
                s.clone(),
                self.tx.clone(),
                self.listed.clone(),
            );
            self.running.insert(s.clone(), tokio::spawn(task));
            if !synced {
                self.pending.insert(s);
            }
        }
        true
    }
}

impl Drop for Watches {
    fn drop(&mut self) {
        for task in self.running.values() {
            task.abort();
        }
    }
}

/// Watches the BGPPeers and keeps one Secret watch per referenced Secret. Counts as one resource
/// of the sync gate: done once the peers are listed and each Secret they name is.
pub async fn run(client: Client, tx: mpsc::Sender<Event>, gate: Arc<SyncGate>) {
    const WHAT: &str = "bgppeers (for their secrets)";
    let ar = ApiResource::erase::<crate::crd::BGPPeer>(&());
    let peers: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let mut stream = watcher(peers, watcher::Config::default())
        .backoff(super::kube::watch_backoff())
        .boxed();
    let (listed, mut listed_rx) = mpsc::channel::<SecretRef>(16);
    let mut watches = Watches {
        client,
        tx: tx.clone(),
        listed,
        running: BTreeMap::new(),
        pending: BTreeSet::new(),
    };
    let mut refs = References::default();
    let (mut peers_listed, mut synced, mut failing) = (false, false, false);
    loop {
        tokio::select! {
            item = stream.next() => match item {
                None => return,
                Some(Err(err)) => {
                    failing = true;
                    log_watch_error(WHAT, &err);
                }
                Some(Ok(ev)) => {
                    if std::mem::take(&mut failing) {
                        crate::metrics::metrics().health.set_forbidden(WHAT, false);
                    }
                    peers_listed |= matches!(ev, watcher::Event::InitDone);
                    if refs.apply(ev) && !watches.follow(refs.wanted(), synced).await {
                        return;
                    }
                }
            },
            Some(s) = listed_rx.recv() => {
                watches.pending.remove(&s);
            }
            _ = tx.closed() => return,
        }
        if !synced && peers_listed && watches.pending.is_empty() {
            synced = true;
            tracing::info!(
                secrets = watches.running.len(),
                "initial list done: the BGPPeers' secrets"
            );
            if !gate.done(&tx).await {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_peer_names_its_secret_in_sepal_system_unless_it_says_otherwise() {
        let peer = |r: serde_json::Value| json!({"spec": {"password": {"secretKeyRef": r}}});
        assert_eq!(
            secret_of(&peer(json!({"name": "bgp", "key": "tor"}))),
            Some(("sepal-system".into(), "bgp".into()))
        );
        assert_eq!(
            secret_of(&peer(
                json!({"name": "bgp", "namespace": "net", "key": "tor"})
            )),
            Some(("net".into(), "bgp".into()))
        );
        assert_eq!(secret_of(&json!({"spec": {"peerIP": "10.0.0.1"}})), None);
    }

    fn peer(name: &str, secret: Option<&str>) -> DynamicObject {
        let mut v =
            json!({"metadata": {"name": name}, "spec": {"peerIP": "10.0.0.1", "asNumber": 1}});
        if let Some(s) = secret {
            v["spec"]["password"] = json!({"secretKeyRef": {"name": s, "key": "k"}});
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn references_follow_the_peers_and_a_relist_forgets_deleted_ones() {
        let mut r = References::default();
        let names = |r: &References| r.wanted().into_iter().map(|s| s.1).collect::<Vec<_>>();
        r.apply(watcher::Event::Init);
        r.apply(watcher::Event::InitApply(peer("a", Some("s1"))));
        r.apply(watcher::Event::InitApply(peer("b", Some("s1"))));
        r.apply(watcher::Event::InitApply(peer("c", Some("s2"))));
        r.apply(watcher::Event::InitDone);
        assert_eq!(names(&r), ["s1", "s2"]);
        // c drops its password, then a relist no longer returns a.
        r.apply(watcher::Event::Apply(peer("c", None)));
        assert_eq!(names(&r), ["s1"]);
        r.apply(watcher::Event::Init);
        r.apply(watcher::Event::InitApply(peer("c", Some("s3"))));
        r.apply(watcher::Event::InitDone);
        assert_eq!(names(&r), ["s3"]);
        r.apply(watcher::Event::Delete(peer("c", Some("s3"))));
        assert!(names(&r).is_empty());
    }
}
