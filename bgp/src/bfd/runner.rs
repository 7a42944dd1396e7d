// The UDP edge of BFD single hop (RFC 5881): one receiving socket per family on port 3784 that
// checks each packet's TTL is 255, one sending socket per session with a source port of its
// own, and a task that drives the sessions' timers and reports their state changes.

use std::collections::HashMap;
use std::io::IoSliceMut;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::time::Instant;

use nix::sys::socket::{self, sockopt, ControlMessageOwned, MsgFlags, SockaddrStorage};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

use super::packet::{Diag, Packet, State};
use super::session::{Output, Session, Status, Timers};
use crate::socket::{set_gtsm, Gtsm};
use crate::speaker::sleep_until;

/// Control packets go to this port (RFC 5881 §4).
pub const CONTROL_PORT: u16 = 3784;
/// Source ports come from this range (RFC 5881 §4).
const SOURCE_PORTS: std::ops::RangeInclusive<u16> = 49152..=65535;

/// One session to run.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerConfig {
    pub peer: IpAddr,
    /// Source address; by default the kernel's choice towards the peer.
    pub local: Option<IpAddr>,
    pub timers: Timers,
    /// The interface (index) a link-local peer address is on.
    #[serde(default)]
    pub scope_id: Option<u32>,
}

/// A session's state change, for the BGP sessions over the same path.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Change {
    pub peer: IpAddr,
    pub from: State,
    pub to: State,
    pub diag: Diag,
    /// The peer took the session down on purpose (AdminDown): not a failure of the path, so
    /// the BGP session stays (RFC 5882 §3.2).
    pub peer_admin_down: bool,
}

/// One session's status with its peer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerStatus {
    pub peer: IpAddr,
    #[serde(flatten)]
    pub status: Status,
    /// Seconds since the last state change.
    pub since_change_s: u64,
}

enum Cmd {
    Set(PeerConfig),
    Remove(IpAddr),
    AdminDown(IpAddr, bool),
    Status(oneshot::Sender<Vec<PeerStatus>>),
}

/// Handle to the running BFD task; dropping every handle stops it.
#[derive(Clone)]
pub struct Bfd {
    tx: mpsc::UnboundedSender<Cmd>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("BFD socket on {addr}: {source}")]
    Socket {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the BFD task has stopped")]
    Stopped,
}

struct Entry {
    cfg: PeerConfig,
    session: Session,
    sock: UdpSocket,
    since: Instant,
}

/// A received packet: its source and what it holds, if its TTL was 255 and it decoded.
struct Received {
    from: IpAddr,
    packet: Packet,
}

impl Bfd {
    /// Binds port 3784 on IPv4 and, where the host has it, IPv6, and starts the task.
    /// `control_plane_independent` is sent as the C bit (RFC 5880 §4.1).
    pub async fn start(
        control_plane_independent: bool,
    ) -> Result<(Bfd, mpsc::UnboundedReceiver<Change>), Error> {
        let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), CONTROL_PORT);
        let rx4 = listener(v4).map_err(|source| Error::Socket { addr: v4, source })?;
        let v6 = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), CONTROL_PORT);
        let rx6 = listener(v6).ok();
        let (tx, cmds) = mpsc::unbounded_channel();
        let (changes_tx, changes) = mpsc::unbounded_channel();
        let (pkt_tx, pkts) = mpsc::unbounded_channel();
        for rx in [Some(rx4), rx6].into_iter().flatten() {
            let pkt_tx = pkt_tx.clone();
            tokio::spawn(async move {
                while let Ok(r) = receive(&rx).await {
                    if let Some(r) = r {
                        if pkt_tx.send(r).is_err() {
                            return;
                        }
                    }
                }
            });
        }
        let core = Core {
            cpi: control_plane_independent,
            peers: HashMap::new(),
            by_discr: HashMap::new(),
            next_discr: 1,
            changes: changes_tx,
        };
        tokio::spawn(core.run(cmds, pkts));
        Ok((Bfd { tx }, changes))
    }

    /// Adds a session, or changes its timers.
    pub fn set_peer(&self, cfg: PeerConfig) -> Result<(), Error> {
        self.tx.send(Cmd::Set(cfg)).map_err(|_| Error::Stopped)
    }

    pub fn remove_peer(&self, peer: IpAddr) -> Result<(), Error> {
        self.tx.send(Cmd::Remove(peer)).map_err(|_| Error::Stopped)
    }

    /// Takes a session administratively down (the peer is told) or back.
    pub fn admin_down(&self, peer: IpAddr, down: bool) -> Result<(), Error> {
        self.tx
            .send(Cmd::AdminDown(peer, down))
            .map_err(|_| Error::Stopped)
    }

    pub async fn sessions(&self) -> Result<Vec<PeerStatus>, Error> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Cmd::Status(tx)).map_err(|_| Error::Stopped)?;
        rx.await.map_err(|_| Error::Stopped)
    }
}

/// The receiving socket on port 3784, reporting each packet's TTL (RFC 5881 §5: only 255).
fn listener(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let std_sock = if addr.is_ipv6() {
        bind_ipv6_only(addr)?
    } else {
        std::net::UdpSocket::bind(addr)?
    };
    std_sock.set_nonblocking(true)?;
    if addr.is_ipv6() {
        socket::setsockopt(&std_sock, sockopt::Ipv6RecvHopLimit, &true)?;
    } else {
        socket::setsockopt(&std_sock, sockopt::Ipv4RecvTtl, &true)?;
    }
    UdpSocket::from_std(std_sock)
}

/// An IPv6-only UDP socket bound to `addr` (IPv4 has its own listener on the same port).
fn bind_ipv6_only(addr: SocketAddr) -> std::io::Result<std::net::UdpSocket> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType};
    let fd = socket::socket(
        AddressFamily::Inet6,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    socket::setsockopt(&fd, sockopt::Ipv6V6Only, &true)?;
    socket::bind(fd.as_raw_fd(), &SockaddrStorage::from(addr))?;
    Ok(std::net::UdpSocket::from(fd))
}

/// Reads one datagram; `None` for one to drop (TTL below 255, not a valid Control packet).
async fn receive(sock: &UdpSocket) -> std::io::Result<Option<Received>> {
    let fd = sock.as_raw_fd();
    let mut buf = [0u8; 64];
    let (n, from, ttl) = sock
        .async_io(Interest::READABLE, || {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!(libc::c_int);
            let msg = socket::recvmsg::<SockaddrStorage>(
                fd,
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT,
            )
            .map_err(std::io::Error::from)?;
            let mut ttl = None;
            for c in msg.cmsgs().map_err(std::io::Error::from)? {
                match c {
                    ControlMessageOwned::Ipv4Ttl(t) => ttl = Some(t),
                    ControlMessageOwned::Ipv6HopLimit(t) => ttl = Some(t),
                    _ => {}
                }
            }
            let from = msg.address.and_then(|a| {
                a.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            });
            Ok((msg.bytes, from, ttl))
        })
        .await?;
    let (Some(from), Some(255)) = (from, ttl) else {
        return Ok(None);
    };
    Ok(Packet::decode(&buf[..n])
        .ok()
        .map(|packet| Received { from, packet }))
}

/// A socket address; a link-local IPv6 one (or the unspecified one of a link-local session)
/// takes the session's interface as its scope.
fn scoped(addr: IpAddr, port: u16, scope_id: Option<u32>) -> SocketAddr {
    match (addr, scope_id) {
        (IpAddr::V6(v6), Some(scope)) if v6.is_unicast_link_local() || v6.is_unspecified() => {
            SocketAddr::V6(std::net::SocketAddrV6::new(v6, port, 0, scope))
        }
        _ => SocketAddr::new(addr, port),
    }
}

/// A sending socket for one session: TTL 255, a source port of its own from 49152-65535.
fn sender(cfg: &PeerConfig, hint: u32) -> std::io::Result<UdpSocket> {
    let local = cfg.local.unwrap_or(match cfg.peer {
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    });
    let span = u32::from(SOURCE_PORTS.end() - SOURCE_PORTS.start()) + 1;
    let mut last = None;
    for i in 0..span {
        let port = SOURCE_PORTS.start() + ((hint + i) % span) as u16;
        match std::net::UdpSocket::bind(scoped(local, port, cfg.scope_id)) {
            Ok(s) => {
                set_gtsm(s.as_raw_fd(), cfg.peer.is_ipv6(), Gtsm::Send)?;
                s.set_nonblocking(true)?;
                s.connect(scoped(cfg.peer, CONTROL_PORT, cfg.scope_id))?;
                return UdpSocket::from_std(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free BFD source port")))
}

struct Core {
    cpi: bool,
    peers: HashMap<IpAddr, Entry>,
    by_discr: HashMap<u32, IpAddr>,
    next_discr: u32,
    changes: mpsc::UnboundedSender<Change>,
}

impl Core {
    async fn run(
        mut self,
        mut cmds: mpsc::UnboundedReceiver<Cmd>,
        mut pkts: mpsc::UnboundedReceiver<Received>,
    ) {
        loop {
            let deadline = self.peers.values().map(|e| e.session.deadline()).min();
            tokio::select! {
                c = cmds.recv() => match c {
                    Some(c) => self.command(c),
                    None => return,
                },
                Some(r) = pkts.recv() => self.packet(r),
                _ = sleep_until(deadline) => {}
            }
            self.timers();
        }
    }

    fn command(&mut self, c: Cmd) {
        let now = Instant::now();
        match c {
            Cmd::Set(cfg) => {
                if let Some(e) = self.peers.get_mut(&cfg.peer) {
                    if e.cfg.local == cfg.local {
                        let outs = e.session.set_timers(cfg.timers, now);
                        e.cfg = cfg.clone();
                        self.outputs(cfg.peer, outs);
                        return;
                    }
                    self.remove(cfg.peer);
                }
                let discr = self.next_discr;
                // Never 0 (RFC 5880 §6.8.1), unique among the sessions.
                self.next_discr = self.next_discr.checked_add(1).unwrap_or(1);
                let sock = match sender(&cfg, discr) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(peer = %cfg.peer, error = %e, "BFD: no socket for the session");
                        return;
                    }
                };
                // Jitter differs between sessions and between runs.
                let clock = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64);
                let seed = u64::from(discr) ^ clock;
                let session = Session::new(cfg.timers, self.cpi, discr, now, seed);
                self.by_discr.insert(discr, cfg.peer);
                self.peers.insert(
                    cfg.peer,
                    Entry {
                        cfg,
                        session,
                        sock,
                        since: now,
                    },
                );
            }
            Cmd::Remove(peer) => self.remove(peer),
            Cmd::AdminDown(peer, down) => {
                if let Some(e) = self.peers.get_mut(&peer) {
                    let outs = e.session.set_admin_down(down, now);
                    self.outputs(peer, outs);
                }
            }
            Cmd::Status(tx) => {
                let mut v: Vec<PeerStatus> = self
                    .peers
                    .values()
                    .map(|e| PeerStatus {
                        peer: e.cfg.peer,
                        status: e.session.status(),
                        since_change_s: now.duration_since(e.since).as_secs(),
                    })
                    .collect();
                v.sort_by_key(|s| s.peer);
                let _ = tx.send(v);
            }
        }
    }

    fn remove(&mut self, peer: IpAddr) {
        if let Some(mut e) = self.peers.remove(&peer) {
            self.by_discr
                .remove(&e.session.status().local_discriminator);
            // Tell the peer, so it does not take the silence for a failure (RFC 5880 §6.8.16).
            let outs = e.session.set_admin_down(true, Instant::now());
            for o in outs {
                if let Output::Send(p) = o {
                    let _ = e.sock.try_send(&p.encode());
                }
            }
        }
    }

    fn packet(&mut self, r: Received) {
        let peer = match r.packet.your_discriminator {
            0 => Some(r.from).filter(|a| self.peers.contains_key(a)),
            d => self.by_discr.get(&d).copied(),
        };
        // A packet naming a session must come from that session's peer.
        let Some(peer) = peer.filter(|p| *p == r.from) else {
            return;
        };
        let now = Instant::now();
        if let Some(e) = self.peers.get_mut(&peer) {
            let outs = e.session.receive(&r.packet, now);
            self.outputs(peer, outs);
        }
    }

    fn timers(&mut self) {
        let now = Instant::now();
        let due: Vec<IpAddr> = self
            .peers
            .iter()
            .filter(|(_, e)| e.session.deadline() <= now)
            .map(|(a, _)| *a)
            .collect();
        for peer in due {
            if let Some(e) = self.peers.get_mut(&peer) {
                let outs = e.session.on_timer(now);
                self.outputs(peer, outs);
            }
        }
    }

    fn outputs(&mut self, peer: IpAddr, outs: Vec<Output>) {
        let Some(e) = self.peers.get_mut(&peer) else {
            return;
        };
        for o in outs {
            match o {
                Output::Send(p) => {
                    // A full socket buffer loses one packet; the next interval sends again.
                    let _ = e.sock.try_send(&p.encode());
                }
                Output::Changed { from, to, diag } => {
                    e.since = Instant::now();
                    tracing::info!(%peer, ?from, ?to, ?diag, "BFD session");
                    let _ = self.changes.send(Change {
                        peer,
                        from,
                        to,
                        diag,
                        peer_admin_down: e.session.status().remote_state == State::AdminDown,
                    });
                }
            }
        }
    }
}
