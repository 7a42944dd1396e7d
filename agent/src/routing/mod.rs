// The agent's BGP control: plans peers, announcements and filters from the cluster (plan), drives
// the speaker to that plan, and turns learned best routes into protocol-83 kernel routes (fib).
#![allow(dead_code)] // the agent's main loop starts it; until then only tests use every part

pub mod fib;
pub mod inputs;
pub mod plan;
mod ra;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::bfd::{client::DaemonClient, Backend};
use anyhow::{Context, Result};
use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use k8s_openapi::api::core::v1::Node;
use rtnetlink::packet_route::address::AddressAttribute;
use sepal_bgp::bfd::{self, Bfd};
use sepal_bgp::{
    Family, GracefulRestartConfig, LocalRoute, MaxPrefix, PeerConfig, PeerStatus, RibEvent,
    Speaker, SpeakerConfig,
};
use sepal_felix::routes::{Desired, RouteReconciler, Target};
use std::net::IpAddr;
use tokio::sync::{mpsc, watch};

pub use fib::Fib;
pub use plan::{diff, plan, Inputs, Plan};

/// Maximum next hops per prefix installed as one multipath route.
pub const ECMP: usize = 8;
const TICK: Duration = Duration::from_millis(500);

/// The pod blocks of a node: `spec.podCIDRs`, else the older single `spec.podCIDR`.
pub fn pod_cidrs(node: &Node) -> Result<Vec<IpNetwork>, String> {
    let spec = node.spec.as_ref();
    let list: Vec<String> = match spec.and_then(|s| s.pod_cidrs.clone()) {
        Some(l) if !l.is_empty() => l,
        _ => spec.and_then(|s| s.pod_cidr.clone()).into_iter().collect(),
    };
    list.iter()
        .map(|c| {
            let n: IpNetwork = c
                .parse()
                .map_err(|e| format!("spec.podCIDRs entry {c:?}: {e}"))?;
            if n.network() != n.ip() {
                return Err(format!("spec.podCIDRs entry {c:?} has host bits set"));
            }
            Ok(n)
        })
        .collect()
}

/// The speaker's peer settings for one planned peer.
pub fn peer_config(p: &plan::PeerPlan) -> PeerConfig {
    let mut c = PeerConfig::new(p.address, p.remote_as);
    c.port = p.port;
    c.passive = p.passive;
    c.connect_retry = p.connect_retry;
    c.hold_time = p.hold_time;
    c.keepalive = p.keepalive;
    c.password = p.password.clone();
    c.ttl_security = p.ttl_security;
    c.rr_client = p.rr_client;
    c.max_prefixes = p.max_prefixes.map(|limit| MaxPrefix {
        limit: limit as usize,
        restart_after: Some(Duration::from_secs(60)),
    });
    // One session carries both families (MP-BGP), whichever family its addresses are.
    c.families = vec![Family::Ipv4, Family::Ipv6];
    c.source = p.source;
    if let Some(iface) = &p.interface {
        // Unnumbered: IPv4 routes ride the link-local session with IPv6 next hops (RFC 8950).
        c.extended_next_hop = true;
        c.scope_id = nix::net::if_::if_nametoindex(iface.as_str()).ok();
        if c.scope_id.is_none() {
            tracing::warn!(interface = %iface, "BGPPeer interface not found");
        }
    }
    let import = p.clone();
    c.import = Some(Arc::new(move |prefix, _| import.imports(prefix)));
    let export = p.clone();
    c.export = Some(Arc::new(move |prefix, _| export.exports(prefix)));
    c
}

/// One change to the BGP routes the kernel should have: the destination's new target, or None
/// for none.
pub type RouteDelta = (IpNetwork, Option<Target>);

/// Handle to the running routing task.
pub struct Routing {
    inputs: watch::Sender<Option<Inputs>>,
    /// The BGP routes the kernel should have, kept up to date change by change.
    routes: Arc<RwLock<Desired>>,
    /// The same changes as they happen, in batches, for the one consumer that installs them.
    route_changes: Mutex<Option<mpsc::UnboundedReceiver<Vec<RouteDelta>>>>,
    speaker: Arc<Mutex<Option<Speaker>>>,
    bfd: Arc<Mutex<Option<Backend>>>,
    warnings: watch::Receiver<Vec<String>>,
    /// Inputs left out as invalid, as last logged: each is logged once while it lasts, not on
    /// every datastore change.
    left_out: std::sync::Mutex<Vec<String>>,
}

impl Routing {
    /// Starts routing in the current network namespace. Gateway routes of protocol 83 already in
    /// the kernel (a previous agent's) are kept as stale and the speaker announces a graceful
    /// restart, so peers keep our routes and we keep theirs until the tables are relearned.
    /// BFD runs in the agent, or in the `sepal bfd` daemon at `bfd_socket`.
    pub async fn start(handle: rtnetlink::Handle, bfd_socket: Option<PathBuf>) -> Result<Routing> {
        let kernel = RouteReconciler::new(handle.clone())
            .kernel_routes()
            .await
            .context("reading Sepal's kernel routes")?;
        let mut fib = Fib::new(connected(&handle).await.unwrap_or_default());
        let restarting = fib.adopt_stale(&kernel) > 0;
        if restarting {
            tracing::info!(
                stale = fib.stale_count(),
                "keeping the previous agent's BGP routes until graceful restart completes"
            );
        }
        let (inputs_tx, inputs_rx) = watch::channel(None);
        // The previous agent's routes are in the kernel already: the snapshot starts with them
        // and the change stream without.
        let routes = Arc::new(RwLock::new(fib.desired()));
        fib.take_changes();
        let (changes_tx, changes_rx) = mpsc::unbounded_channel();
        let (warn_tx, warn_rx) = watch::channel(Vec::new());
        let speaker = Arc::new(Mutex::new(None));
        let bfd = Arc::new(Mutex::new(None));
        let task = Task {
            bfd: BfdSessions {
                daemon: bfd_socket,
                running: None,
                shared: bfd.clone(),
                changes: None,
                peers: BTreeMap::new(),
                told_daemon: false,
            },
            adverts: None,
            heard: None,
            link_neighbors: BTreeMap::new(),
            handle,
            fib,
            restarting,
            running: None,
            speaker: None,
            shared: speaker.clone(),
            route_rx: None,
            routes: routes.clone(),
            changes_tx,
            warn_tx,
            sweep_deadline: None,
        };
        tokio::spawn(task.run(inputs_rx));
        Ok(Routing {
            inputs: inputs_tx,
            routes,
            route_changes: Mutex::new(Some(changes_rx)),
            speaker,
            bfd,
            warnings: warn_rx,
            left_out: Default::default(),
        })
    }

    /// New facts from the model; routing replans and applies only the difference.
    pub fn update(&self, inputs: Inputs) {
        self.inputs.send_replace(Some(inputs));
    }

    /// Replans from the agent's model (objects that do not parse are logged and left out).
    pub fn update_from_model(&self, model: &crate::model::Model, node: &str) {
        let (inputs, errors) = inputs::from_model(model, node);
        let errors: Vec<String> = errors.iter().map(ToString::to_string).collect();
        let mut logged = self.left_out.lock().unwrap_or_else(|e| e.into_inner());
        for e in errors.iter().filter(|e| !logged.contains(e)) {
            tracing::warn!("BGP input left out: {e}");
        }
        *logged = errors;
        drop(logged);
        self.update(inputs);
    }

    /// How many BGP routes the kernel should have (gateway routes of protocol 83).
    pub fn route_count(&self) -> usize {
        self.routes.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// The stream of changes to those routes, batch by batch; the first caller gets it (the
    /// agent's route reconciler), later ones None.
    pub fn take_route_changes(&self) -> Option<mpsc::UnboundedReceiver<Vec<RouteDelta>>> {
        self.route_changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Adds the BGP routes to the agent's desired protocol-83 table; the agent's own routes (pod
    /// routes, block blackholes) win on the same destination.
    pub fn merge_into(&self, desired: &mut Desired) {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        for (dst, target) in routes.iter() {
            desired.entry(*dst).or_insert_with(|| target.clone());
        }
    }

    /// Inputs the last plan left out, with the reason.
    pub fn warnings(&self) -> Vec<String> {
        self.warnings.borrow().clone()
    }

    /// Stops the speaker when the agent stops. `for_restart` (`--stop-mode restart`) with
    /// graceful restart on: the sessions close without a NOTIFICATION, so peers keep this node's
    /// routes until the next agent is back (a DaemonSet rolling update, a node reboot), and a
    /// node that never comes back loses them after the restart time. Otherwise, or with graceful
    /// restart off: Cease/Administrative Shutdown, so peers drop the routes now.
    pub async fn shutdown(self, for_restart: bool) {
        let speaker = self.speaker.lock().ok().and_then(|mut s| s.take());
        let graceful = self
            .inputs
            .borrow()
            .as_ref()
            .map(plan)
            .and_then(Result::ok)
            .is_some_and(|p| !p.speaker.graceful_restart_time.is_zero());
        if let Some(s) = speaker {
            let _ = match for_restart && graceful {
                true => s.stop_for_restart().await,
                false => s.shutdown().await,
            };
        }
    }

    /// The running speaker, for the operator socket and metrics to query without the agent's
    /// lock (peers, best routes); None until the plan has started one.
    pub fn speaker(&self) -> Option<Speaker> {
        self.speaker.lock().ok().and_then(|s| s.clone())
    }

    /// Which configuration makes each planned session, by peer address: `mesh` (the node mesh,
    /// or automatic route reflection) or the BGPPeer's name; from the latest inputs.
    pub fn peer_sources(&self) -> BTreeMap<std::net::IpAddr, String> {
        let inputs = self.inputs.borrow();
        let Some(Ok(planned)) = inputs.as_ref().map(plan) else {
            return BTreeMap::new();
        };
        planned
            .peers
            .iter()
            .map(|(addr, p)| {
                let source = match &p.kind {
                    plan::PeerKind::Node(_) => "mesh".to_string(),
                    plan::PeerKind::Global(name) => name.clone(),
                };
                (*addr, source)
            })
            .collect()
    }

    /// The running BFD task, for the operator socket, status and metrics to query without the
    /// agent's lock; None while no session has BFD.
    pub fn bfd(&self) -> Option<Backend> {
        self.bfd.lock().ok().and_then(|s| s.clone())
    }

    /// Session state of every peer.
    pub async fn peers(&self) -> Vec<PeerStatus> {
        let speaker = self.speaker.lock().ok().and_then(|s| s.clone());
        match speaker {
            Some(s) => s.peers().await.unwrap_or_default(),
            None => Vec::new(),
        }
    }
}

/// Every address of every interface in the namespace, with its interface name.
async fn connected(handle: &rtnetlink::Handle) -> Result<Vec<(String, IpNetwork)>> {
    let names: BTreeMap<u32, String> = sepal_felix::links::all_links(handle)
        .await?
        .into_iter()
        .map(|l| (l.index, l.name))
        .collect();
    let msgs: Vec<_> = handle.address().get().execute().try_collect().await?;
    let mut out = Vec::new();
    for m in msgs {
        let Some(name) = names.get(&m.header.index) else {
            continue;
        };
        let addr = m.attributes.iter().find_map(|a| match a {
            AddressAttribute::Address(ip) => Some(*ip),
            _ => None,
        });
        if let Some(ip) = addr {
            if let Ok(net) = IpNetwork::new(ip, m.header.prefix_len) {
                out.push((name.clone(), net));
            }
        }
    }
    Ok(out)
}

/// The BFD sessions of the planned BGP sessions that ask for one.
struct BfdSessions {
    /// The `sepal bfd` daemon's socket; None: BFD in this process.
    daemon: Option<PathBuf>,
    running: Option<Backend>,
    shared: Arc<Mutex<Option<Backend>>>,
    changes: Option<mpsc::UnboundedReceiver<bfd::Change>>,
    /// What each running session was given.
    peers: BTreeMap<IpAddr, bfd::PeerConfig>,
    /// Whether the daemon has had this agent's set. A restarted agent must tell it even an
    /// empty one: the sessions the previous agent asked for would otherwise run on, Up at any
    /// peer that still has BFD configured, after the configuration turned them off.
    told_daemon: bool,
}

impl BfdSessions {
    /// Starts, changes and stops sessions to match the plan. BFD starts only once a session
    /// asks for it; if binding its port fails, the next replan tries again.
    async fn sync(&mut self, p: &Plan) {
        let want: BTreeMap<IpAddr, bfd::PeerConfig> = p
            .peers
            .iter()
            .filter_map(|(a, pp)| {
                pp.bfd.map(|timers| {
                    let cfg = bfd::PeerConfig {
                        peer: *a,
                        local: pp.source,
                        timers,
                        scope_id: pp
                            .interface
                            .as_deref()
                            .and_then(|i| nix::net::if_::if_nametoindex(i).ok()),
                    };
                    (*a, cfg)
                })
            })
            .collect();
        // A daemon that has a socket may hold a previous agent's sessions; one without has none.
        let daemon_to_tell = !self.told_daemon && self.daemon.as_ref().is_some_and(|s| s.exists());
        if want == self.peers && !daemon_to_tell {
            return;
        }
        if self.running.is_none() {
            let (backend, rx) = match &self.daemon {
                Some(socket) => {
                    let (c, rx) = DaemonClient::start(socket.clone());
                    (Backend::Daemon(c), rx)
                }
                None => match Bfd::start(false).await {
                    Ok((b, rx)) => (Backend::InProcess(b), rx),
                    Err(e) => {
                        tracing::warn!("starting BFD: {e}");
                        return;
                    }
                },
            };
            if let Ok(mut s) = self.shared.lock() {
                *s = Some(backend.clone());
            }
            self.running = Some(backend);
            self.changes = Some(rx);
        }
        match &self.running {
            Some(Backend::InProcess(b)) => {
                let _ = crate::bfd::apply(b, &self.peers, &want);
            }
            Some(Backend::Daemon(d)) => {
                d.set_peers(want.values().cloned().collect());
                self.told_daemon = true;
            }
            None => return,
        }
        self.peers = want;
    }

    async fn next_change(&mut self) -> Option<bfd::Change> {
        match &mut self.changes {
            Some(rx) => rx.recv().await,
            None => std::future::pending().await,
        }
    }
}

struct Task {
    bfd: BfdSessions,
    /// Router advertisements on the unnumbered peers' interfaces, once there are any.
    adverts: Option<ra::RouterAdverts>,
    heard: Option<mpsc::UnboundedReceiver<ra::Heard>>,
    /// The router last heard on each interface.
    link_neighbors: BTreeMap<String, std::net::Ipv6Addr>,
    handle: rtnetlink::Handle,
    fib: Fib,
    restarting: bool,
    running: Option<Plan>,
    speaker: Option<Speaker>,
    shared: Arc<Mutex<Option<Speaker>>>,
    route_rx: Option<mpsc::UnboundedReceiver<RibEvent>>,
    routes: Arc<RwLock<Desired>>,
    changes_tx: mpsc::UnboundedSender<Vec<RouteDelta>>,
    warn_tx: watch::Sender<Vec<String>>,
    sweep_deadline: Option<Instant>,
}

async fn next_heard(rx: &mut Option<mpsc::UnboundedReceiver<ra::Heard>>) -> Option<ra::Heard> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn next_change(rx: &mut Option<mpsc::UnboundedReceiver<RibEvent>>) -> Option<RibEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Task {
    async fn run(mut self, mut inputs: watch::Receiver<Option<Inputs>>) {
        let mut tick = tokio::time::interval(TICK);
        let mut current: Option<Inputs> = None;
        loop {
            tokio::select! {
                r = inputs.changed() => {
                    if r.is_err() {
                        break;
                    }
                    current = inputs.borrow_and_update().clone();
                    if let Some(i) = &current {
                        self.reconfigure(i).await;
                    }
                }
                Some(c) = self.bfd.next_change() => self.bfd_change(c),
                Some((iface, router)) = next_heard(&mut self.heard) => {
                    if self.link_neighbors.insert(iface, router) != Some(router) {
                        if let Some(i) = &current {
                            self.reconfigure(i).await;
                        }
                    }
                }
                change = next_change(&mut self.route_rx) => match change {
                    Some(ev) => self.rib_event(ev),
                    None => {
                        // The speaker stopped: start over on the next tick.
                        tracing::warn!("BGP speaker stopped; restarting it");
                        self.route_rx = None;
                        self.running = None;
                    }
                },
                _ = tick.tick() => {
                    if self.running.is_none() {
                        if let Some(i) = &current {
                            self.reconfigure(i).await;
                        }
                    }
                    if let Ok(c) = connected(&self.handle).await {
                        if self.fib.set_connected(c) {
                            self.publish();
                        }
                    }
                    self.maybe_sweep();
                }
            }
        }
        if let Some(s) = self.speaker.take() {
            let _ = s.shutdown().await;
        }
    }

    /// Router advertisements on `ifaces`; started with the first unnumbered BGPPeer.
    fn advertise_on(&mut self, ifaces: &std::collections::BTreeSet<String>) {
        if self.adverts.is_none() && !ifaces.is_empty() {
            let (adverts, heard) = ra::RouterAdverts::start();
            self.adverts = Some(adverts);
            self.heard = Some(heard);
        }
        if let Some(a) = &self.adverts {
            a.set_interfaces(ifaces.clone());
        }
    }

    /// Brings the shared table up to date with the FIB's changes and passes them on.
    fn publish(&mut self) {
        let changes = self.fib.take_changes();
        if changes.is_empty() {
            return;
        }
        {
            let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
            for (dst, target) in &changes {
                match target {
                    Some(t) => routes.insert(*dst, t.clone()),
                    None => routes.remove(dst),
                };
            }
        }
        let _ = self.changes_tx.send(changes);
    }

    /// A BFD session that goes from Up to Down takes its BGP session and routes down with it,
    /// unless the peer only took BFD down on purpose (RFC 5882 §3.2); this side's own AdminDown
    /// is no path failure either.
    fn bfd_change(&mut self, c: bfd::Change) {
        if c.from != bfd::State::Up || c.to != bfd::State::Down || c.peer_admin_down {
            return;
        }
        tracing::warn!(peer = %c.peer, diag = ?c.diag, "BFD down: closing the BGP session");
        if let Some(s) = &self.speaker {
            let _ = s.path_down(c.peer);
        }
    }

    fn rib_event(&mut self, ev: RibEvent) {
        match ev {
            RibEvent::Changes(changes) => {
                // Apply every change, then publish once.
                let mut changed = false;
                for c in &changes {
                    changed |= self.fib.apply(c);
                }
                if changed {
                    self.publish();
                }
            }
            RibEvent::EndOfRib { peer, family } => {
                tracing::debug!(%peer, ?family, "End-of-RIB");
            }
            // Every peer sent End-of-RIB (or the speaker's deferral time ran out): routes from
            // before the restart that were not relearned go now.
            RibEvent::Converged => self.sweep(),
        }
    }

    fn sweep(&mut self) {
        self.sweep_deadline = None;
        if self.fib.stale_count() == 0 {
            return;
        }
        let gone = self.fib.sweep();
        tracing::info!(
            removed = gone.len(),
            "graceful restart over: stale BGP routes swept"
        );
        self.publish();
    }

    /// Safety net: the speaker reports convergence by the graceful-restart time at the latest.
    fn maybe_sweep(&mut self) {
        if self.sweep_deadline.is_some_and(|d| Instant::now() >= d) {
            self.sweep();
        }
    }

    async fn reconfigure(&mut self, inputs: &Inputs) {
        let mut inputs = inputs.clone();
        inputs.link_neighbors = self.link_neighbors.clone();
        let desired = match plan(&inputs) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!("BGP plan: {e}");
                return;
            }
        };
        self.advertise_on(&desired.link_interfaces);
        self.fib.set_link_peers(
            desired
                .peers
                .values()
                .filter_map(|p| Some((p.address, p.interface.clone()?)))
                .collect(),
        );
        for w in &desired.warnings {
            if self
                .running
                .as_ref()
                .is_none_or(|r| !r.warnings.contains(w))
            {
                tracing::warn!("BGP: {w}");
            }
        }
        self.warn_tx.send_replace(desired.warnings.clone());
        let d = diff(self.running.as_ref(), &desired);
        if d.is_empty() {
            self.bfd.sync(&desired).await;
            self.running = Some(desired);
            return;
        }
        if d.restart_speaker {
            if let Err(e) = self.start_speaker(&desired).await {
                tracing::warn!("starting the BGP speaker: {e:#}");
                self.running = None;
                return;
            }
        }
        let Some(s) = self.speaker.clone() else {
            return;
        };
        let mut ok = true;
        for a in &d.remove {
            ok &= s.remove_peer(*a).is_ok();
        }
        for (list, add) in [(&d.add, true), (&d.update, false)] {
            for a in list {
                let cfg = peer_config(&desired.peers[a]);
                let r = if add {
                    s.add_peer(cfg)
                } else {
                    s.update_peer(cfg)
                };
                if let Err(e) = r {
                    tracing::warn!("BGP peer {a}: {e}");
                    ok &= !matches!(e, sepal_bgp::Error::Stopped);
                }
            }
        }
        for p in &d.withdraw {
            ok &= s.withdraw(*p).is_ok();
        }
        for p in &d.announce {
            let a = &desired.announcements[p];
            let route = LocalRoute {
                communities: a.communities.clone(),
                large_communities: a.large_communities.clone(),
                next_hop: a.next_hop,
                ..LocalRoute::default()
            };
            ok &= s.announce(*p, route).is_ok();
        }
        self.bfd.sync(&desired).await;
        self.running = ok.then_some(desired);
    }

    async fn start_speaker(&mut self, p: &Plan) -> Result<()> {
        if let Some(old) = self.speaker.take() {
            let _ = old.shutdown().await;
            // Routes of the old speaker stay until the new one has relearned them.
            self.fib.age();
            self.sweep_deadline = None;
        }
        let gr_secs = p.speaker.graceful_restart_time.as_secs().min(4095) as u16;
        let cfg = SpeakerConfig {
            local_as: p.speaker.local_as,
            router_id: p.speaker.router_id,
            listen: p.speaker.listen.clone(),
            ecmp: ECMP,
            cluster_id: p.speaker.cluster_id,
            // A restart time of 0 turns graceful restart off: the capability is not offered, so
            // peers drop this node's routes as soon as its sessions go (some helpers, GoBGP's,
            // would otherwise keep them for the restart time even when the hold timer expires).
            graceful_restart: (gr_secs > 0).then_some(GracefulRestartConfig {
                restart_time: gr_secs,
                restarting: self.restarting,
            }),
        };
        let (speaker, rx) = Speaker::start(cfg).await?;
        self.restarting = false;
        self.speaker = Some(speaker.clone());
        if let Ok(mut s) = self.shared.lock() {
            *s = Some(speaker);
        }
        self.route_rx = Some(rx);
        if self.sweep_deadline.is_none() {
            // Without graceful restart the speaker still reports convergence (End-of-RIB from
            // every peer), by its 120 s limit at the latest.
            let limit = match gr_secs {
                0 => Duration::from_secs(120),
                _ => p.speaker.graceful_restart_time,
            };
            self.sweep_deadline = Some(Instant::now() + limit);
        }
        Ok(())
    }
}
