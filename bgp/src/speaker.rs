// The tokio edge and public API: one task owns every session FSM and the RIB; socket readers, writers,
// connects and the listener are tasks that only send events to it. Also graceful restart and max-prefix.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use ipnet::IpNet;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::fsm::{self, Action, DownReason, Event, Negotiated, Session, SessionConfig, State};
use crate::rib::{self, ExportCtx, ExportTarget, Path, PeerFacts, Rib, RouteChange, Source};
use crate::socket;
use crate::wire::{self, Attrs, DecodeCtx, Family, GracefulRestart, Message, Notification, Update};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the speaker has stopped")]
    Stopped,
    #[error("invalid peer configuration: {0}")]
    Config(String),
}

/// Speaker-wide settings.
#[derive(Debug, Clone)]
pub struct SpeakerConfig {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    /// Addresses to accept connections on (port usually 179); empty: connect only.
    pub listen: Vec<SocketAddr>,
    /// Maximum ECMP next hops per prefix (1 = no multipath).
    pub ecmp: usize,
    /// RFC 4456 cluster ID when reflecting (default: the router ID).
    pub cluster_id: Option<Ipv4Addr>,
    pub graceful_restart: Option<GracefulRestartConfig>,
}

/// RFC 4724 settings: `restarting` is set by an agent that comes back after a restart and kept its
/// forwarding state (R and F bits); peers then keep our routes until our End-of-RIB. A restarting
/// speaker defers advertising (and its End-of-RIB) until every peer sent End-of-RIB or
/// `restart_time` seconds passed (the selection-deferral timer).
#[derive(Debug, Clone)]
pub struct GracefulRestartConfig {
    pub restart_time: u16,
    pub restarting: bool,
}

/// What the speaker tells its consumer (a FIB), in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RibEvent {
    /// Loc-RIB best-route changes, in the order they happened (a burst of messages comes in
    /// batches of a few thousand).
    Changes(Vec<RouteChange>),
    /// A peer sent End-of-RIB (RFC 4724 §2) for a family: its table for that family is complete.
    EndOfRib { peer: IpAddr, family: Family },
    /// Initial convergence, sent once: every configured peer is up and sent End-of-RIB for each
    /// family, or the selection-deferral time ran out. Routes not relearned by now are gone.
    Converged,
}

/// Loc-RIB changes handed to the consumer at a time during a burst (about one full UPDATE's worth of
/// /24s is 1,000).
const BATCH: usize = 2048;

/// Upper bound on waiting for initial convergence when graceful restart is off.
const CONVERGENCE_LIMIT: Duration = Duration::from_secs(120);

/// Import/export hook: return false to reject the prefix.
pub type Policy = Arc<dyn Fn(&IpNet, &Attrs) -> bool + Send + Sync>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MaxPrefix {
    pub limit: usize,
    /// Restart the session this long after tripping; `None` waits for a configuration change.
    pub restart_after: Option<Duration>,
}

#[derive(Clone)]
pub struct PeerConfig {
    pub address: IpAddr,
    pub port: u16,
    pub remote_as: u32,
    pub passive: bool,
    pub connect_retry: Duration,
    pub hold_time: u16,
    pub keepalive: Option<u16>,
    pub password: Option<String>,
    /// GTSM: the peer is at most this many hops away.
    pub ttl_security: Option<u8>,
    pub rr_client: bool,
    pub max_prefixes: Option<MaxPrefix>,
    pub families: Vec<Family>,
    pub import: Option<Policy>,
    pub export: Option<Policy>,
    pub source: Option<IpAddr>,
    /// RFC 8950: offer IPv4 routes with IPv6 next hops.
    pub extended_next_hop: bool,
    /// The interface (index) a link-local peer address is on: the session's scope.
    pub scope_id: Option<u32>,
}

impl std::fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerConfig")
            .field("address", &self.address)
            .field("remote_as", &self.remote_as)
            .field("passive", &self.passive)
            .field("families", &self.families)
            .finish_non_exhaustive()
    }
}

impl PeerConfig {
    pub fn new(address: IpAddr, remote_as: u32) -> PeerConfig {
        PeerConfig {
            address,
            port: 179,
            remote_as,
            passive: false,
            connect_retry: Duration::from_secs(5),
            hold_time: 90,
            keepalive: None,
            password: None,
            ttl_security: None,
            rr_client: false,
            max_prefixes: None,
            families: vec![Family::Ipv4, Family::Ipv6],
            import: None,
            export: None,
            source: None,
            extended_next_hop: false,
            scope_id: None,
        }
    }

    /// Settings whose change needs a new session.
    fn session_key(&self) -> impl PartialEq {
        (
            self.port,
            self.remote_as,
            self.passive,
            self.hold_time,
            self.keepalive,
            self.password.clone(),
            self.ttl_security,
            self.rr_client,
            self.families.clone(),
            self.source,
            self.extended_next_hop,
            self.scope_id,
        )
    }
}

/// One of the speaker's own routes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalRoute {
    /// None: the session's own address (next-hop-self).
    pub next_hop: Option<IpAddr>,
    pub communities: Vec<u32>,
    /// RFC 8092 large communities.
    pub large_communities: Vec<(u32, u32, u32)>,
    pub local_pref: Option<u32>,
    pub med: Option<u32>,
}

/// Per-peer state and statistics.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PeerStatus {
    pub address: IpAddr,
    pub remote_as: u32,
    pub state: State,
    pub uptime: Option<Duration>,
    pub messages_in: u64,
    pub messages_out: u64,
    pub updates_in: u64,
    pub updates_out: u64,
    pub prefixes_received: u64,
    pub prefixes_accepted: usize,
    pub prefixes_advertised: usize,
    pub last_error: Option<String>,
    pub last_notification_sent: Option<Notification>,
    pub last_notification_received: Option<Notification>,
    pub negotiated: Option<Negotiated>,
    /// RFC 4724 helper: the peer's routes are being retained as stale.
    pub graceful_restart_active: bool,
}

enum Cmd {
    AddPeer(Box<PeerConfig>),
    UpdatePeer(Box<PeerConfig>),
    RemovePeer(IpAddr),
    PathDown(IpAddr),
    Announce(IpNet, LocalRoute),
    Withdraw(IpNet),
    Peers(oneshot::Sender<Vec<PeerStatus>>),
    Routes(oneshot::Sender<Vec<(IpNet, rib::BestRoute)>>),
    Count(oneshot::Sender<usize>),
    /// Stop; with `true`, Cease/Administrative Shutdown to every peer first.
    Shutdown(oneshot::Sender<()>, bool),
}

enum Io {
    Accepted(TcpStream, SocketAddr),
    Connected {
        peer: IpAddr,
        attempt: u64,
        stream: std::io::Result<TcpStream>,
    },
    Msg {
        conn: u64,
        msg: Message,
    },
    Bad {
        conn: u64,
        n: Notification,
    },
    Closed {
        conn: u64,
    },
}

/// Handle to a running speaker. Dropping every handle stops it.
#[derive(Clone)]
pub struct Speaker {
    tx: mpsc::UnboundedSender<Cmd>,
}

impl Speaker {
    /// Binds the listeners and starts the speaker; returns the handle and the stream of Loc-RIB
    /// changes and End-of-RIB notices.
    pub async fn start(
        cfg: SpeakerConfig,
    ) -> Result<(Speaker, mpsc::UnboundedReceiver<RibEvent>), Error> {
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (io_tx, io_rx) = mpsc::unbounded_channel();
        let (route_tx, route_rx) = mpsc::unbounded_channel();
        let mut listeners = Vec::new();
        let mut tasks = Vec::new();
        for addr in &cfg.listen {
            let sock = if addr.is_ipv4() {
                TcpSocket::new_v4()
            } else {
                TcpSocket::new_v6()
            }
            .map_err(|source| Error::Listen {
                addr: *addr,
                source,
            })?;
            sock.set_reuseaddr(true).map_err(|source| Error::Listen {
                addr: *addr,
                source,
            })?;
            sock.bind(*addr).map_err(|source| Error::Listen {
                addr: *addr,
                source,
            })?;
            let l = sock.listen(64).map_err(|source| Error::Listen {
                addr: *addr,
                source,
            })?;
            listeners.push((l.as_raw_fd(), addr.is_ipv4()));
            let tx = io_tx.clone();
            tasks.push(tokio::spawn(async move {
                while let Ok((s, a)) = l.accept().await {
                    if tx.send(Io::Accepted(s, a)).is_err() {
                        break;
                    }
                }
            }));
        }
        let gr = cfg.graceful_restart.as_ref();
        let deferral = gr.map_or(CONVERGENCE_LIMIT, |g| {
            Duration::from_secs(g.restart_time.into())
        });
        let core = Core {
            converge_by: Some(Instant::now() + deferral),
            deferring: gr.is_some_and(|g| g.restarting),
            pending: Vec::new(),
            ectx: ExportCtx {
                local_as: cfg.local_as,
                router_id: cfg.router_id,
                cluster_id: cfg.cluster_id.unwrap_or(cfg.router_id),
            },
            rib: Rib::new(cfg.ecmp),
            cfg,
            peers: HashMap::new(),
            conns: HashMap::new(),
            next_id: 1,
            io_tx,
            route_tx,
            listeners,
            dirty: Vec::new(),
            tasks,
        };
        tokio::spawn(core.run(cmd_rx, io_rx));
        Ok((Speaker { tx: cmd_tx }, route_rx))
    }

    fn send(&self, c: Cmd) -> Result<(), Error> {
        self.tx.send(c).map_err(|_| Error::Stopped)
    }

    pub fn add_peer(&self, p: PeerConfig) -> Result<(), Error> {
        validate(&p)?;
        self.send(Cmd::AddPeer(Box::new(p)))
    }
    /// Applies new settings; the session is reset only when a session parameter changed.
    pub fn update_peer(&self, p: PeerConfig) -> Result<(), Error> {
        validate(&p)?;
        self.send(Cmd::UpdatePeer(Box::new(p)))
    }
    pub fn remove_peer(&self, address: IpAddr) -> Result<(), Error> {
        self.send(Cmd::RemovePeer(address))
    }
    pub fn announce(&self, prefix: IpNet, route: LocalRoute) -> Result<(), Error> {
        self.send(Cmd::Announce(prefix.trunc(), route))
    }
    pub fn withdraw(&self, prefix: IpNet) -> Result<(), Error> {
        self.send(Cmd::Withdraw(prefix.trunc()))
    }
    pub async fn peers(&self) -> Result<Vec<PeerStatus>, Error> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Peers(tx))?;
        rx.await.map_err(|_| Error::Stopped)
    }
    /// BFD found the path to `peer` down (RFC 5882 §4.3): the session closes at once, and its
    /// routes go with it, stale ones kept for a graceful restart too; it is retried after the
    /// connect-retry time.
    pub fn path_down(&self, peer: IpAddr) -> Result<(), Error> {
        self.send(Cmd::PathDown(peer))
    }
    /// The Loc-RIB: every prefix with its best route.
    pub async fn routes(&self) -> Result<Vec<(IpNet, rib::BestRoute)>, Error> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Routes(tx))?;
        rx.await.map_err(|_| Error::Stopped)
    }
    /// Number of prefixes in the Loc-RIB.
    pub async fn route_count(&self) -> Result<usize, Error> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Count(tx))?;
        rx.await.map_err(|_| Error::Stopped)
    }
    /// Sends Cease/Administrative Shutdown to every peer and stops.
    pub async fn shutdown(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Shutdown(tx, true))?;
        rx.await.map_err(|_| Error::Stopped)
    }

    /// Stops for a restart: every session's connection is closed without a NOTIFICATION, so
    /// peers that negotiated graceful restart keep this speaker's routes, stale, until it is
    /// back and has sent End-of-RIB, or its restart time passes (RFC 4724 §4.2).
    pub async fn stop_for_restart(&self) -> Result<(), Error> {
        let (tx, rx) = oneshot::channel();
        self.send(Cmd::Shutdown(tx, false))?;
        rx.await.map_err(|_| Error::Stopped)
    }
}

fn validate(p: &PeerConfig) -> Result<(), Error> {
    if p.password
        .as_ref()
        .is_some_and(|k| k.len() > socket::MD5_MAX_KEY)
    {
        return Err(Error::Config(
            "TCP MD5 password longer than 80 bytes".into(),
        ));
    }
    if p.hold_time == 1 || p.hold_time == 2 {
        return Err(Error::Config(
            "hold time must be 0 or at least 3 seconds".into(),
        ));
    }
    if p.families.is_empty() {
        return Err(Error::Config("no address family".into()));
    }
    Ok(())
}

struct Conn {
    id: u64,
    tx: mpsc::UnboundedSender<Vec<u8>>,
    local: IpAddr,
    /// Our global IPv6 address on the interface `local` (IPv4) is on: the next hop of IPv6 routes
    /// over this session.
    local_v6: Option<IpAddr>,
    inbound: bool,
    reader: JoinHandle<()>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The writer task ends when `tx` drops, after flushing queued bytes (e.g. a NOTIFICATION).
        self.reader.abort();
    }
}

#[derive(Default)]
struct Stats {
    messages_in: u64,
    messages_out: u64,
    updates_in: u64,
    updates_out: u64,
    prefixes_received: u64,
    last_error: Option<String>,
    last_sent: Option<Notification>,
    last_received: Option<Notification>,
    up_since: Option<Instant>,
}

struct Peer {
    cfg: PeerConfig,
    session: Session,
    conn: Option<Conn>,
    /// An inbound connection racing the current one (RFC 4271 §6.8), with its own FSM.
    pending: Option<(Conn, Session)>,
    attempt: u64,
    neg: Option<Negotiated>,
    facts: Option<Arc<PeerFacts>>,
    target: Option<ExportTarget>,
    adj_out: HashMap<IpNet, (Arc<Attrs>, IpAddr), rib::PrefixHash>,
    stats: Stats,
    /// Helper side of graceful restart: stale routes kept until this deadline.
    gr_until: Option<Instant>,
    gr_families: Vec<Family>,
    /// Families the peer has not sent End-of-RIB for since the session came up (only tracked for
    /// peers that announced graceful restart, which promises End-of-RIB).
    eor_pending: Vec<Family>,
    /// Max-prefix tripped: restart at this time (or, when None, on a new limit).
    restart_at: Option<Instant>,
    /// The session is down because the peer sent more prefixes than its limit: a changed limit
    /// restarts it at once.
    prefix_limited: bool,
}

struct Core {
    cfg: SpeakerConfig,
    ectx: ExportCtx,
    rib: Rib,
    peers: HashMap<IpAddr, Peer>,
    conns: HashMap<u64, IpAddr>,
    next_id: u64,
    io_tx: mpsc::UnboundedSender<Io>,
    route_tx: mpsc::UnboundedSender<RibEvent>,
    /// Changes not yet handed to the consumer (sent as one batch per burst).
    pending: Vec<RouteChange>,
    /// Until initial convergence: its deadline (then `None`).
    converge_by: Option<Instant>,
    /// Restarting speaker before convergence: advertise nothing yet.
    deferring: bool,
    listeners: Vec<(std::os::fd::RawFd, bool)>,
    /// Prefixes whose best route changed since the last flush (may repeat: advertising is
    /// idempotent against the Adj-RIB-Out, and a list is cheaper than a set on a table load).
    /// Each with the peer its new best path came from, when known: advertising never sends a
    /// route back to that peer, so for it only a withdrawal can be due.
    dirty: Vec<(IpNet, Option<IpAddr>)>,
    tasks: Vec<JoinHandle<()>>,
}

/// A listener's GTSM for the `ttl_security` of the peers it may accept. The kernel checks the
/// minimum TTL before it knows which peer a SYN is for, so the listener filters only when every
/// peer uses GTSM (at the loosest of their hop counts); with a mix it only sends TTL 255, and each
/// accepted GTSM socket filters on its own (a distant host can then finish a handshake, but what
/// it sends once the connection is accepted is dropped).
fn listener_gtsm(peers: impl Iterator<Item = Option<u8>>) -> socket::Gtsm {
    let (mut any, mut all, mut widest) = (false, true, 0u8);
    for hops in peers {
        match hops {
            Some(h) => {
                any = true;
                widest = widest.max(h.max(1));
            }
            None => all = false,
        }
    }
    match (any, all) {
        (false, _) => socket::Gtsm::Off,
        (true, true) => socket::Gtsm::Hops(widest),
        (true, false) => socket::Gtsm::Send,
    }
}

fn unmap(a: IpAddr) -> IpAddr {
    match a {
        IpAddr::V6(v) => v.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(a),
        v4 => v4,
    }
}

impl Core {
    async fn run(
        mut self,
        mut cmds: mpsc::UnboundedReceiver<Cmd>,
        mut io: mpsc::UnboundedReceiver<Io>,
    ) {
        loop {
            let next = self.next_deadline();
            tokio::select! {
                c = cmds.recv() => match c {
                    Some(Cmd::Shutdown(done, notify)) => {
                        self.shutdown(notify);
                        let _ = done.send(());
                        return;
                    }
                    Some(c) => self.command(c),
                    None => { self.shutdown(true); return; }
                },
                Some(e) = io.recv() => {
                    self.io(e);
                    // Take what else is queued before advertising, so bursts pack into few
                    // UPDATEs; but hand out at most about BATCH changes at a time, so a table
                    // load reuses the same few buffers instead of growing them to its size.
                    for _ in 0..256 {
                        if self.pending.len() >= BATCH {
                            break;
                        }
                        match io.try_recv() { Ok(e) => self.io(e), Err(_) => break }
                    }
                }
                _ = sleep_until(next) => self.timers(Instant::now()),
            }
            self.check_converged(Instant::now());
            let handed_out = !self.pending.is_empty();
            self.flush();
            if handed_out {
                // Let the consumer take the batch (on this thread, in a current-thread runtime).
                tokio::task::yield_now().await;
            }
        }
    }

    fn shutdown(&mut self, notify: bool) {
        if notify {
            let addrs: Vec<IpAddr> = self.peers.keys().copied().collect();
            for a in addrs {
                self.session_event(a, Event::Stop(Notification::new(6, 2, vec![])));
            }
        }
        for t in &self.tasks {
            t.abort();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.peers
            .values()
            .flat_map(|p| {
                [
                    p.session.next_deadline(),
                    p.gr_until,
                    p.restart_at,
                    p.pending.as_ref().and_then(|x| x.1.next_deadline()),
                ]
            })
            .flatten()
            .chain(self.converge_by)
            .min()
    }

    fn session_cfg(&self, p: &PeerConfig) -> SessionConfig {
        SessionConfig {
            local_as: self.cfg.local_as,
            router_id: self.cfg.router_id,
            remote_as: p.remote_as,
            passive: p.passive,
            connect_retry: p.connect_retry,
            hold_time: p.hold_time,
            keepalive: p.keepalive,
            families: p.families.clone(),
            graceful_restart: self.cfg.graceful_restart.as_ref().map(|g| GracefulRestart {
                restarting: g.restarting,
                restart_time: g.restart_time,
                families: p.families.iter().map(|f| (*f, g.restarting)).collect(),
            }),
            extended_next_hop: p.extended_next_hop,
        }
    }

    fn set_listener_md5(&self, addr: IpAddr, key: &[u8]) {
        for (fd, v4) in &self.listeners {
            // An IPv6 listener also takes IPv4 peers as mapped addresses.
            let target = match (addr, v4) {
                (IpAddr::V4(a), false) => IpAddr::V6(a.to_ipv6_mapped()),
                _ => addr,
            };
            if addr.is_ipv6() && *v4 {
                continue;
            }
            if let Err(e) = socket::set_md5(*fd, target, key) {
                if !key.is_empty() {
                    tracing::warn!(peer = %addr, error = %e, "setting TCP MD5 key on listener");
                }
            }
        }
    }

    /// Sets each listener's GTSM for the peers it may accept (RFC 5082 §3: the SYN-ACK to a
    /// GTSM peer must leave with TTL 255, or the peer drops it).
    fn set_listener_gtsm(&self) {
        for (fd, v4) in &self.listeners {
            let hops = self
                .peers
                .values()
                .filter(|p| !*v4 || p.cfg.address.is_ipv4())
                .map(|p| p.cfg.ttl_security);
            let g = listener_gtsm(hops);
            if let Err(e) = socket::set_gtsm(*fd, !*v4, g) {
                tracing::warn!(error = %e, setting = ?g, "setting GTSM on listener");
            }
        }
    }

    fn command(&mut self, c: Cmd) {
        let now = Instant::now();
        match c {
            Cmd::AddPeer(p) => {
                if self.peers.contains_key(&p.address) {
                    return self.command(Cmd::UpdatePeer(p));
                }
                self.add_peer(*p, now);
            }
            Cmd::UpdatePeer(p) => {
                let Some(old) = self.peers.get_mut(&p.address) else {
                    return self.add_peer(*p, now);
                };
                let reset = old.cfg.session_key() != p.session_key();
                let export_changed = old.cfg.export.is_some() || p.export.is_some();
                let import_changed = old.cfg.import.is_some() || p.import.is_some();
                // Compared before the new configuration replaces the old one.
                let max_changed = old.cfg.max_prefixes != p.max_prefixes;
                old.cfg = *p.clone();
                if reset {
                    let a = p.address;
                    self.session_event(a, Event::Stop(Notification::new(6, 6, vec![])));
                    self.remove_peer_state(a);
                    self.add_peer(*p, now);
                } else {
                    if let Some(peer) = self.peers.get_mut(&p.address) {
                        // A peer held down by its prefix limit restarts at once on a new one.
                        if peer.prefix_limited && max_changed {
                            peer.restart_at = Some(now);
                        }
                        if import_changed && peer.session.state == State::Established {
                            if let Some(n) = &peer.neg {
                                if n.route_refresh {
                                    for f in n.families.clone() {
                                        send(peer, wire::encode_route_refresh(f));
                                    }
                                }
                            }
                        }
                    }
                    if let (true, Some(import)) = (import_changed, &p.import) {
                        // The Adj-RIB-In holds what the old policy let in: what the new one
                        // refuses goes now, whether or not the peer can send its routes again
                        // (the route refresh above brings in what it newly allows).
                        let source = Source::Peer(p.address);
                        for ch in self.rib.retain_source(source, |k, a| import(k, a)) {
                            self.changed(ch);
                        }
                    }
                    if export_changed {
                        let all: Vec<_> = self.rib.prefixes().map(|k| (k, None)).collect();
                        self.dirty.extend(all);
                    }
                }
            }
            Cmd::RemovePeer(a) => {
                self.session_event(a, Event::Stop(Notification::new(6, 3, vec![])));
                self.remove_peer_state(a);
            }
            Cmd::PathDown(a) => {
                let Some(retry) = self.peers.get(&a).map(|p| p.cfg.connect_retry) else {
                    return;
                };
                // Cease / BFD Down (RFC 9384); the peer will rarely hear it over a dead path.
                self.session_event(a, Event::Stop(Notification::new(6, 10, vec![])));
                if let Some(p) = self.peers.get_mut(&a) {
                    p.gr_until = None;
                    p.gr_families.clear();
                    p.stats.last_error = Some("BFD: path down".into());
                    p.restart_at = Some(now + retry);
                }
                for ch in self.rib.remove_source(Source::Peer(a)) {
                    self.changed(ch);
                }
            }
            Cmd::Announce(prefix, r) => {
                let attrs = Attrs {
                    communities: r.communities,
                    large_communities: r.large_communities,
                    local_pref: r.local_pref,
                    med: r.med,
                    ..Default::default()
                };
                let nh = r.next_hop.unwrap_or(match prefix {
                    IpNet::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                    IpNet::V6(_) => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
                });
                let path = Path {
                    source: Source::Local,
                    next_hop: nh,
                    attrs: Arc::new(attrs),
                    peer: None,
                    stale: false,
                };
                if let Some(ch) = self.rib.insert(prefix, path) {
                    self.changed(ch);
                }
            }
            Cmd::Withdraw(prefix) => {
                if let Some(ch) = self.rib.remove(prefix, Source::Local) {
                    self.changed(ch);
                }
            }
            Cmd::Peers(tx) => {
                let mut v: Vec<PeerStatus> =
                    self.peers.values().map(|p| self.status(p, now)).collect();
                v.sort_by_key(|s| s.address);
                let _ = tx.send(v);
            }
            Cmd::Routes(tx) => {
                let v = self
                    .rib
                    .iter_best()
                    .filter_map(|(k, b)| {
                        let first = b.first()?;
                        Some((
                            k,
                            rib::BestRoute {
                                next_hops: b.iter().map(|p| p.next_hop).collect(),
                                source: first.source,
                                attrs: first.attrs.clone(),
                            },
                        ))
                    })
                    .collect();
                let _ = tx.send(v);
            }
            Cmd::Count(tx) => {
                let _ = tx.send(self.rib.len());
            }
            Cmd::Shutdown(..) => {}
        }
    }

    fn add_peer(&mut self, p: PeerConfig, now: Instant) {
        if let Some(k) = &p.password {
            self.set_listener_md5(p.address, k.as_bytes());
        }
        let seed = u64::from(u32::from(self.cfg.router_id))
            ^ (now.elapsed().as_nanos() as u64)
            ^ self.next_id;
        let session = Session::new(self.session_cfg(&p), seed);
        let addr = p.address;
        self.peers.insert(
            addr,
            Peer {
                cfg: p,
                session,
                conn: None,
                pending: None,
                attempt: 0,
                neg: None,
                facts: None,
                target: None,
                adj_out: HashMap::default(),
                stats: Stats::default(),
                gr_until: None,
                gr_families: Vec::new(),
                eor_pending: Vec::new(),
                restart_at: None,
                prefix_limited: false,
            },
        );
        self.set_listener_gtsm();
        self.session_event(addr, Event::Start);
    }

    fn remove_peer_state(&mut self, a: IpAddr) {
        if let Some(p) = self.peers.remove(&a) {
            if p.cfg.password.is_some() {
                self.set_listener_md5(a, b"");
            }
            self.set_listener_gtsm();
        }
        for ch in self.rib.remove_source(Source::Peer(a)) {
            self.changed(ch);
        }
    }

    fn status(&self, p: &Peer, now: Instant) -> PeerStatus {
        PeerStatus {
            address: p.cfg.address,
            remote_as: p.cfg.remote_as,
            state: p.session.state,
            uptime: p.stats.up_since.map(|t| now.saturating_duration_since(t)),
            messages_in: p.stats.messages_in,
            messages_out: p.stats.messages_out,
            updates_in: p.stats.updates_in,
            updates_out: p.stats.updates_out,
            prefixes_received: p.stats.prefixes_received,
            prefixes_accepted: self.rib.count(p.cfg.address),
            prefixes_advertised: p.adj_out.len(),
            last_error: p.stats.last_error.clone(),
            last_notification_sent: p.stats.last_sent.clone(),
            last_notification_received: p.stats.last_received.clone(),
            negotiated: p.neg.clone(),
            graceful_restart_active: p.gr_until.is_some(),
        }
    }

    fn changed(&mut self, ch: RouteChange) {
        if !self.deferring {
            let from = match ch.best.as_ref().map(|b| b.source) {
                Some(Source::Peer(a)) => Some(a),
                _ => None,
            };
            self.dirty.push((ch.prefix, from));
        }
        self.pending.push(ch);
    }

    /// Hands the consumer the pending changes, then `ev` (so it sees them in order).
    fn emit(&mut self, ev: Option<RibEvent>) {
        if !self.pending.is_empty() {
            let batch = std::mem::replace(&mut self.pending, Vec::with_capacity(BATCH));
            let _ = self.route_tx.send(RibEvent::Changes(batch));
        }
        if let Some(ev) = ev {
            let _ = self.route_tx.send(ev);
        }
    }

    /// Initial convergence: every configured peer up with all its End-of-RIBs, or the deadline.
    fn check_converged(&mut self, now: Instant) {
        let Some(by) = self.converge_by else {
            return;
        };
        let all_in = !self.peers.is_empty()
            && self
                .peers
                .values()
                .all(|p| p.stats.up_since.is_some() && p.eor_pending.is_empty());
        if !all_in && now < by {
            return;
        }
        self.converge_by = None;
        tracing::info!(
            deadline = !all_in,
            "initial convergence: every peer sent End-of-RIB"
        );
        if std::mem::take(&mut self.deferring) {
            // RFC 4724 §4.1: now advertise to every peer, each followed by our End-of-RIB.
            let up: Vec<IpAddr> = self
                .peers
                .iter()
                .filter(|(_, p)| p.neg.is_some())
                .map(|(a, _)| *a)
                .collect();
            for a in up {
                self.send_table(a);
            }
        }
        self.emit(Some(RibEvent::Converged));
    }

    fn timers(&mut self, now: Instant) {
        let addrs: Vec<IpAddr> = self.peers.keys().copied().collect();
        for a in addrs {
            let Some(p) = self.peers.get_mut(&a) else {
                continue;
            };
            if p.gr_until.is_some_and(|t| t <= now) {
                // Restart time ran out: the peer's stale routes go.
                p.gr_until = None;
                p.gr_families.clear();
                for ch in self.rib.sweep_stale(Source::Peer(a), None) {
                    self.changed(ch);
                }
            }
            let Some(p) = self.peers.get_mut(&a) else {
                continue;
            };
            if p.restart_at.is_some_and(|t| t <= now) {
                p.restart_at = None;
                p.prefix_limited = false;
                self.session_event(a, Event::Start);
            }
            let Some(p) = self.peers.get_mut(&a) else {
                continue;
            };
            let acts = p.session.poll_timers(now);
            self.actions(a, acts, now);
            let Some(p) = self.peers.get_mut(&a) else {
                continue;
            };
            if let Some((_, s)) = p.pending.as_mut() {
                let acts = s.poll_timers(now);
                self.pending_actions(a, acts);
            }
        }
    }

    fn session_event(&mut self, a: IpAddr, ev: Event) {
        let now = Instant::now();
        let Some(p) = self.peers.get_mut(&a) else {
            return;
        };
        let acts = p.session.handle(now, ev);
        self.actions(a, acts, now);
    }

    fn io(&mut self, e: Io) {
        let now = Instant::now();
        match e {
            Io::Accepted(stream, from) => self.accepted(stream, unmap(from.ip())),
            Io::Connected {
                peer,
                attempt,
                stream,
            } => {
                let Some(p) = self.peers.get_mut(&peer) else {
                    return;
                };
                if p.attempt != attempt || p.conn.is_some() {
                    return;
                }
                match stream {
                    Ok(s) => {
                        let c = self.spawn_conn(s, peer, false);
                        if let Some(p) = self.peers.get_mut(&peer) {
                            p.conn = Some(c);
                        }
                        self.session_event(peer, Event::TcpConnected);
                    }
                    Err(e) => {
                        p.stats.last_error = Some(format!("connect: {e}"));
                        self.session_event(peer, Event::TcpFailed);
                    }
                }
            }
            Io::Msg { conn, msg } => {
                let Some(&a) = self.conns.get(&conn) else {
                    return;
                };
                let Some(p) = self.peers.get_mut(&a) else {
                    return;
                };
                p.stats.messages_in += 1;
                if let Message::Notification(n) = &msg {
                    p.stats.last_received = Some(n.clone());
                    p.stats.last_error = Some(format!("received NOTIFICATION {n}"));
                }
                if p.pending.as_ref().is_some_and(|(c, _)| c.id == conn) {
                    let acts = p
                        .pending
                        .as_mut()
                        .map(|(_, s)| s.handle(now, Event::Message(msg)))
                        .unwrap_or_default();
                    self.pending_actions(a, acts);
                    self.resolve_collision(a);
                } else if p.conn.as_ref().is_some_and(|c| c.id == conn) {
                    let acts = p.session.handle(now, Event::Message(msg));
                    self.actions(a, acts, now);
                    self.resolve_collision(a);
                }
            }
            Io::Bad { conn, n } => {
                let Some(&a) = self.conns.get(&conn) else {
                    return;
                };
                let Some(p) = self.peers.get_mut(&a) else {
                    return;
                };
                p.stats.last_error = Some(format!("malformed message: {n}"));
                if p.conn.as_ref().is_some_and(|c| c.id == conn) {
                    self.session_event(a, Event::DecodeError(n));
                } else if p.pending.as_ref().is_some_and(|(c, _)| c.id == conn) {
                    if let Some((c, _)) = p.pending.take() {
                        send_conn(&c, wire::encode_notification(&n));
                    }
                }
            }
            Io::Closed { conn } => {
                let Some(a) = self.conns.remove(&conn) else {
                    return;
                };
                let Some(p) = self.peers.get_mut(&a) else {
                    return;
                };
                if p.conn.as_ref().is_some_and(|c| c.id == conn) {
                    p.stats
                        .last_error
                        .get_or_insert_with(|| "connection closed".into());
                    self.session_event(a, Event::TcpFailed);
                } else if p.pending.as_ref().is_some_and(|(c, _)| c.id == conn) {
                    p.pending = None;
                }
            }
        }
    }

    fn accepted(&mut self, stream: TcpStream, from: IpAddr) {
        let Some(p) = self.peers.get(&from) else {
            // Unknown peers are dropped without a word (RFC 4271 §8: not configured).
            return;
        };
        let state = p.session.state;
        match state {
            State::Idle => {}
            State::Connect | State::Active => {
                let c = self.spawn_conn(stream, from, true);
                if let Some(p) = self.peers.get_mut(&from) {
                    p.attempt += 1;
                    p.conn = Some(c);
                }
                self.session_event(from, Event::TcpConnected);
            }
            State::OpenSent | State::OpenConfirm if p.pending.is_none() => {
                let cfg = p.session.cfg.clone();
                let c = self.spawn_conn(stream, from, true);
                let mut s = Session::new(
                    SessionConfig {
                        passive: true,
                        ..cfg
                    },
                    c.id,
                );
                let now = Instant::now();
                s.handle(now, Event::Start);
                let acts = s.handle(now, Event::TcpConnected);
                if let Some(p) = self.peers.get_mut(&from) {
                    p.pending = Some((c, s));
                }
                self.pending_actions(from, acts);
            }
            _ => {
                // Established (or a second race): the new connection loses (RFC 4271 §6.8).
                let c = self.spawn_conn(stream, from, true);
                send_conn(
                    &c,
                    wire::encode_notification(&Notification::new(6, 7, vec![])),
                );
                self.conns.remove(&c.id);
            }
        }
    }

    /// RFC 4271 §6.8: once both connections know the peer's BGP identifier, keep one.
    fn resolve_collision(&mut self, a: IpAddr) {
        let local_id = self.cfg.router_id;
        let Some(p) = self.peers.get_mut(&a) else {
            return;
        };
        let Some((_, ps)) = &p.pending else { return };
        let remote = match (
            ps.state,
            &ps.negotiated,
            p.session.state,
            &p.session.negotiated,
        ) {
            (State::OpenConfirm, Some(n), _, _) => n.peer_router_id,
            (_, _, State::OpenConfirm, Some(n)) => n.peer_router_id,
            _ => return,
        };
        let main_outgoing = p.conn.as_ref().is_some_and(|c| !c.inbound);
        let cease = wire::encode_notification(&Notification::new(6, 7, vec![]));
        if !main_outgoing || fsm::keep_outgoing(local_id, remote) || ps.state != State::OpenConfirm
        {
            if let Some((c, _)) = p.pending.take() {
                send_conn(&c, cease);
                self.conns.remove(&c.id);
            }
        } else if let (Some(old), Some((c, s))) = (p.conn.take(), p.pending.take()) {
            send_conn(&old, cease);
            self.conns.remove(&old.id);
            p.conn = Some(c);
            let cfg = p.session.cfg.clone();
            p.session = s;
            p.session.cfg = SessionConfig {
                passive: p.cfg.passive,
                ..cfg
            };
        }
    }

    fn spawn_conn(&mut self, stream: TcpStream, peer: IpAddr, inbound: bool) -> Conn {
        let id = self.next_id;
        self.next_id += 1;
        let _ = stream.set_nodelay(true);
        // An accepted socket inherits its listener's setting, which serves every peer at once;
        // from here on it serves one, so it takes that peer's own.
        let gtsm = match self.peers.get(&peer).and_then(|p| p.cfg.ttl_security) {
            Some(hops) => socket::Gtsm::Hops(hops),
            None => socket::Gtsm::Off,
        };
        // An outgoing socket without GTSM has the kernel's defaults already.
        if inbound || gtsm != socket::Gtsm::Off {
            let v6 = stream.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
            if let Err(e) = socket::set_gtsm(stream.as_raw_fd(), v6, gtsm) {
                tracing::warn!(%peer, error = %e, "GTSM");
            }
        }
        let local = stream
            .local_addr()
            .map(|a| unmap(a.ip()))
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        let local_v6 = crate::ifaddr::ipv6_beside(local);
        let (mut rd, mut wr) = stream.into_split();
        let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
        tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if wr.write_all(&b).await.is_err() {
                    break;
                }
            }
            let _ = wr.shutdown().await;
        });
        let io = self.io_tx.clone();
        let reader = tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(65536);
            let mut ctx = DecodeCtx::default();
            loop {
                loop {
                    match wire::decode(&buf, ctx) {
                        Ok(Some((msg, used))) => {
                            let _ = buf.split_to(used);
                            if let Message::Open(o) = &msg {
                                // We always offer 4-octet AS, so the peer's OPEN decides.
                                ctx.asn4 = o.caps.asn4.is_some();
                            }
                            if io.send(Io::Msg { conn: id, msg }).is_err() {
                                return;
                            }
                        }
                        Ok(None) => break,
                        Err(n) => {
                            let _ = io.send(Io::Bad { conn: id, n });
                            return;
                        }
                    }
                }
                // Bounded: one message is at most 64 KiB, and a full message always decodes or errors.
                // Keep room for big reads: BytesMut only grows by 64 bytes when it is full.
                buf.reserve(65536);
                match rd.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => {
                        let _ = io.send(Io::Closed { conn: id });
                        return;
                    }
                    Ok(_) => {}
                }
            }
        });
        self.conns.insert(id, peer);
        Conn {
            id,
            tx,
            local,
            local_v6,
            inbound,
            reader,
        }
    }

    fn connect(&mut self, a: IpAddr) {
        let Some(p) = self.peers.get_mut(&a) else {
            return;
        };
        p.attempt += 1;
        let attempt = p.attempt;
        let cfg = p.cfg.clone();
        let io = self.io_tx.clone();
        tokio::spawn(async move {
            let stream = connect(&cfg).await;
            let _ = io.send(Io::Connected {
                peer: cfg.address,
                attempt,
                stream,
            });
        });
    }

    fn pending_actions(&mut self, a: IpAddr, acts: Vec<Action>) {
        let Some(p) = self.peers.get_mut(&a) else {
            return;
        };
        for act in acts {
            let Some((c, _)) = &p.pending else { return };
            match act {
                Action::SendOpen => {
                    let s = &p.session.cfg;
                    send_conn(
                        c,
                        wire::encode_open(s.local_as, s.hold_time, s.router_id, &s.capabilities()),
                    )
                }
                Action::SendKeepalive => send_conn(c, wire::encode_keepalive()),
                Action::SendNotification(n) => send_conn(c, wire::encode_notification(&n)),
                Action::Disconnect => {
                    if let Some((c, _)) = p.pending.take() {
                        self.conns.remove(&c.id);
                    }
                }
                _ => {}
            }
        }
    }

    fn actions(&mut self, a: IpAddr, acts: Vec<Action>, now: Instant) {
        for act in acts {
            let Some(p) = self.peers.get_mut(&a) else {
                return;
            };
            match act {
                Action::Connect => self.connect(a),
                Action::Disconnect => {
                    p.attempt += 1;
                    if let Some(c) = p.conn.take() {
                        self.conns.remove(&c.id);
                    }
                }
                Action::SendOpen => {
                    let s = &p.session.cfg;
                    let b =
                        wire::encode_open(s.local_as, s.hold_time, s.router_id, &s.capabilities());
                    send(p, b);
                }
                Action::SendKeepalive => send(p, wire::encode_keepalive()),
                Action::SendNotification(n) => {
                    p.stats.last_sent = Some(n.clone());
                    p.stats.last_error = Some(format!("sent NOTIFICATION {n}"));
                    send(p, wire::encode_notification(&n));
                }
                Action::Established(n) => self.established(a, n, now),
                Action::Update(u) => self.update(a, *u, now),
                Action::RouteRefresh(f) => {
                    p.adj_out.retain(|k, _| Family::of(k) != f);
                    let all: Vec<_> = self
                        .rib
                        .prefixes()
                        .filter(|k| Family::of(k) == f)
                        .map(|k| (k, None))
                        .collect();
                    self.dirty.extend(all);
                }
                Action::Down(reason) => self.down(a, reason, now),
            }
        }
    }

    fn established(&mut self, a: IpAddr, n: Negotiated, now: Instant) {
        let Some(p) = self.peers.get_mut(&a) else {
            return;
        };
        let ibgp = n.peer_as == self.cfg.local_as;
        let (local, local_v6) = p
            .conn
            .as_ref()
            .map(|c| (c.local, c.local_v6))
            .unwrap_or((IpAddr::V4(Ipv4Addr::UNSPECIFIED), None));
        p.facts = Some(Arc::new(PeerFacts {
            addr: a,
            asn: n.peer_as,
            router_id: n.peer_router_id,
            ibgp,
            rr_client: p.cfg.rr_client,
        }));
        p.target = Some(ExportTarget {
            addr: a,
            asn: n.peer_as,
            ibgp,
            rr_client: p.cfg.rr_client,
            router_id: n.peer_router_id,
            local_addr: local,
            local_addr_v6: local_v6,
            local_addr_v4: None,
        });
        p.stats.up_since = Some(now);
        p.stats.last_error = None;
        if p.gr_until.is_some() {
            // The restarting peer is back: its stale routes stay until its End-of-RIB per family.
            // RFC 4724 §4.2: families it no longer preserves are swept now.
            let keep: Vec<Family> = n
                .peer_graceful_restart
                .as_ref()
                .map(|g| {
                    g.families
                        .iter()
                        .filter(|(_, fwd)| *fwd)
                        .map(|(f, _)| *f)
                        .collect()
                })
                .unwrap_or_default();
            p.gr_until = None;
            let drop_now: Vec<Family> = p
                .gr_families
                .iter()
                .copied()
                .filter(|f| !keep.contains(f))
                .collect();
            p.gr_families.retain(|f| keep.contains(f));
            for f in drop_now {
                for ch in self.rib.sweep_stale(Source::Peer(a), Some(f)) {
                    self.changed(ch);
                }
            }
        }
        let Some(p) = self.peers.get_mut(&a) else {
            return;
        };
        p.eor_pending = match n.peer_graceful_restart {
            Some(_) => n.families.clone(),
            None => Vec::new(),
        };
        p.neg = Some(n);
        p.adj_out.clear();
        if !self.deferring {
            self.send_table(a);
        }
    }

    /// The initial table towards a peer: everything, then End-of-RIB per family.
    fn send_table(&mut self, a: IpAddr) {
        let Some(families) = self
            .peers
            .get(&a)
            .and_then(|p| p.neg.as_ref())
            .map(|n| n.families.clone())
        else {
            return;
        };
        let all: Vec<_> = self.rib.prefixes().map(|k| (k, None)).collect();
        let mut msgs = self.advertise(a, &all);
        for f in &families {
            msgs.push(wire::encode_end_of_rib(*f));
        }
        if let Some(p) = self.peers.get_mut(&a) {
            for m in msgs {
                p.stats.updates_out += 1;
                send(p, m);
            }
        }
    }

    fn update(&mut self, a: IpAddr, u: Update, now: Instant) {
        let Some(p) = self.peers.get_mut(&a) else {
            return;
        };
        p.stats.updates_in += 1;
        if let Some(f) = u.end_of_rib {
            p.eor_pending.retain(|x| *x != f);
            if let Some(i) = p.gr_families.iter().position(|x| *x == f) {
                p.gr_families.remove(i);
                for ch in self.rib.sweep_stale(Source::Peer(a), Some(f)) {
                    self.changed(ch);
                }
            }
            self.emit(Some(RibEvent::EndOfRib { peer: a, family: f }));
            return;
        }
        if let Some(n) = &u.treat_as_withdraw {
            p.stats.last_error = Some(format!("treat-as-withdraw: {n}"));
        }
        p.stats.prefixes_received += u.announced.len() as u64;
        let (Some(facts), Some(neg)) = (p.facts.clone(), p.neg.clone()) else {
            return;
        };
        let import = p.cfg.import.clone();
        let max = p.cfg.max_prefixes;
        for w in &u.withdrawn {
            if let Some(ch) = self.rib.remove(*w, Source::Peer(a)) {
                self.changed(ch);
            }
        }
        if let Some(attrs) = u.attrs {
            let looped = rib::looped(&self.ectx, &attrs);
            // eBGP peers must put their own AS first (RFC 4271 §6.3).
            let bad_first = !facts.ibgp && attrs.neighbor_as() != Some(facts.asn);
            let attrs = Arc::new(attrs);
            for prefix in &u.announced {
                let fam = Family::of(prefix);
                let nh = match fam {
                    Family::Ipv4 => u
                        .next_hop_v4
                        .filter(|nh| nh.is_ipv4() || neg.extended_next_hop_v4),
                    Family::Ipv6 => u.next_hop_v6.map(unmap),
                };
                let accept = !looped
                    && !bad_first
                    && neg.families.contains(&fam)
                    && nh.is_some_and(|n| !n.is_unspecified())
                    && import.as_ref().is_none_or(|f| f(prefix, &attrs));
                let ch = match (accept, nh) {
                    (true, Some(nh)) => self.rib.insert(
                        *prefix,
                        Path {
                            source: Source::Peer(a),
                            next_hop: nh,
                            attrs: attrs.clone(),
                            peer: Some(facts.clone()),
                            stale: false,
                        },
                    ),
                    // A rejected announcement replaces (withdraws) what we had from that peer.
                    _ => self.rib.remove(*prefix, Source::Peer(a)),
                };
                if let Some(ch) = ch {
                    self.changed(ch);
                }
            }
        }
        if let Some(m) = max {
            if self.rib.count(a) > m.limit {
                // RFC 4486: Cease / Maximum Number of Prefixes Reached, data AFI/SAFI/limit.
                let mut data = vec![0, 1, 1];
                data.extend_from_slice(&(m.limit.min(u32::MAX as usize) as u32).to_be_bytes());
                self.session_event(a, Event::Stop(Notification::new(6, 1, data)));
                if let Some(p) = self.peers.get_mut(&a) {
                    p.stats.last_error = Some(format!("maximum prefix limit {} exceeded", m.limit));
                    p.restart_at = m.restart_after.map(|d| now + d);
                    p.prefix_limited = true;
                }
            }
        }
    }

    fn down(&mut self, a: IpAddr, reason: DownReason, now: Instant) {
        let Some(p) = self.peers.get_mut(&a) else {
            return;
        };
        let was_up = p.stats.up_since.take().is_some();
        p.adj_out.clear();
        p.facts = None;
        p.target = None;
        let neg = p.neg.take();
        if !was_up {
            return;
        }
        // RFC 4724 helper: a connection lost without NOTIFICATION keeps the routes as stale.
        let gr = neg
            .as_ref()
            .and_then(|n| n.peer_graceful_restart.clone())
            .filter(|g| g.restart_time > 0);
        match (reason, gr) {
            (DownReason::ConnectionLost, Some(g)) => {
                let fams: Vec<Family> = g.families.iter().map(|(f, _)| *f).collect();
                for f in &fams {
                    self.rib.mark_stale(Source::Peer(a), Some(*f));
                }
                let others: Vec<Family> = [Family::Ipv4, Family::Ipv6]
                    .into_iter()
                    .filter(|f| !fams.contains(f))
                    .collect();
                for f in others {
                    for ch in self.rib.sweep_stale(Source::Peer(a), Some(f)) {
                        self.changed(ch);
                    }
                    let left: Vec<IpNet> = self
                        .rib
                        .prefixes_of(Source::Peer(a))
                        .into_iter()
                        .filter(|k| Family::of(k) == f)
                        .collect();
                    for k in left {
                        if let Some(ch) = self.rib.remove(k, Source::Peer(a)) {
                            self.changed(ch);
                        }
                    }
                }
                if let Some(p) = self.peers.get_mut(&a) {
                    p.gr_until = Some(now + Duration::from_secs(g.restart_time as u64));
                    p.gr_families = fams;
                }
            }
            _ => {
                if let Some(p) = self.peers.get_mut(&a) {
                    p.gr_until = None;
                    p.gr_families.clear();
                }
                for ch in self.rib.remove_source(Source::Peer(a)) {
                    self.changed(ch);
                }
            }
        }
    }

    /// Computes the Adj-RIB-Out diff for `prefixes` towards peer `a` and returns packed UPDATEs.
    fn advertise(&mut self, a: IpAddr, prefixes: &[(IpNet, Option<IpAddr>)]) -> Vec<Vec<u8>> {
        let Some(p) = self.peers.get_mut(&a) else {
            return vec![];
        };
        let (Some(target), Some(neg)) = (p.target.clone(), p.neg.clone()) else {
            return vec![];
        };
        let mut groups: HashMap<(Arc<Attrs>, IpAddr), Vec<IpNet>> = HashMap::new();
        let mut withdraw = Vec::new();
        for (prefix, from) in prefixes {
            if !neg.families.contains(&Family::of(prefix)) {
                continue;
            }
            // Learned from this peer (the bulk of its own table load): nothing to send back.
            if *from == Some(a) && !p.adj_out.contains_key(prefix) {
                continue;
            }
            let want = self.rib.best_path(prefix).and_then(|best| {
                let (attrs, nh) = rib::export(&self.ectx, &target, prefix, best)?;
                // IPv4 routes need an IPv4 next hop unless RFC 8950 was negotiated.
                if prefix.addr().is_ipv4() && nh.is_ipv6() && !neg.extended_next_hop_v4 {
                    return None;
                }
                if p.cfg.export.as_ref().is_some_and(|f| !f(prefix, &attrs)) {
                    return None;
                }
                Some((attrs, nh))
            });
            match want {
                Some((attrs, nh)) => {
                    if p.adj_out
                        .get(prefix)
                        .is_some_and(|(a, n)| **a == attrs && *n == nh)
                    {
                        continue;
                    }
                    let attrs = Arc::new(attrs);
                    p.adj_out.insert(*prefix, (attrs.clone(), nh));
                    groups.entry((attrs, nh)).or_default().push(*prefix);
                }
                None => {
                    if p.adj_out.remove(prefix).is_some() {
                        withdraw.push(*prefix);
                    }
                }
            }
        }
        let mut out = Vec::new();
        if !withdraw.is_empty() {
            out.extend(wire::encode_withdraw(&withdraw, false, wire::MAX_MESSAGE));
        }
        for ((attrs, nh), mut list) in groups {
            list.sort();
            for fam in [Family::Ipv4, Family::Ipv6] {
                let part: Vec<IpNet> = list
                    .iter()
                    .copied()
                    .filter(|p| Family::of(p) == fam)
                    .collect();
                if part.is_empty() {
                    continue;
                }
                out.extend(wire::encode_announce(
                    &wire::OutRoutes {
                        attrs: &attrs,
                        next_hop: nh,
                        next_hop_local: None,
                        prefixes: &part,
                    },
                    neg.asn4,
                    wire::MAX_MESSAGE,
                ));
            }
        }
        out
    }

    fn flush(&mut self) {
        self.emit(None);
        if self.deferring {
            // Everything goes out with the initial tables at convergence.
            self.dirty.clear();
        }
        if self.dirty.is_empty() {
            return;
        }
        // The list goes back afterwards (cleared), so a burst reuses one buffer.
        let mut dirty = std::mem::take(&mut self.dirty);
        let up: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|(_, p)| p.session.state == State::Established)
            .map(|(a, _)| *a)
            .collect();
        for a in up {
            let msgs = self.advertise(a, &dirty);
            if let Some(p) = self.peers.get_mut(&a) {
                for m in msgs {
                    p.stats.updates_out += 1;
                    send(p, m);
                }
            }
        }
        dirty.clear();
        self.dirty = dirty;
    }
}

fn send(p: &mut Peer, b: Vec<u8>) {
    if let Some(c) = &p.conn {
        p.stats.messages_out += 1;
        send_conn(c, b);
    }
}

fn send_conn(c: &Conn, b: Vec<u8>) {
    let _ = c.tx.send(b);
}

/// Sleeps until `t`, or for ever when there is no deadline.
pub(crate) async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// A socket address; a link-local IPv6 one takes the interface it is on as its scope.
fn scoped(addr: IpAddr, port: u16, scope_id: Option<u32>) -> SocketAddr {
    match (addr, scope_id) {
        (IpAddr::V6(v6), Some(scope)) if v6.is_unicast_link_local() => {
            SocketAddr::V6(std::net::SocketAddrV6::new(v6, port, 0, scope))
        }
        _ => SocketAddr::new(addr, port),
    }
}

/// Active open with MD5, GTSM and source address applied before the SYN.
async fn connect(cfg: &PeerConfig) -> std::io::Result<TcpStream> {
    let sock = if cfg.address.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(k) = &cfg.password {
        socket::set_md5(sock.as_raw_fd(), cfg.address, k.as_bytes())?;
    }
    if let Some(h) = cfg.ttl_security {
        socket::set_ttl_security(sock.as_raw_fd(), cfg.address.is_ipv6(), h)?;
    }
    if let Some(src) = cfg.source {
        sock.bind(scoped(src, 0, cfg.scope_id))?;
    }
    let timeout = cfg.connect_retry.max(Duration::from_secs(1));
    match tokio::time::timeout(
        timeout,
        sock.connect(scoped(cfg.address, cfg.port, cfg.scope_id)),
    )
    .await
    {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "connect timed out",
        )),
    }
}
