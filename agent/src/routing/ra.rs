// IPv6 router advertisements on the interfaces of unnumbered BGPPeers (RFC 4861 §4.2): sent, so
// that the peer learns this node's link-local address (FRR's `neighbor IFACE interface` waits
// for one), and heard, to learn the peer's when the BGPPeer gives none. The advertisements say
// "not a default router" (router lifetime 0): they only make the address known.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IoSliceMut;
use std::net::{Ipv6Addr, SocketAddr, SocketAddrV6};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    self, sockopt, AddressFamily, ControlMessageOwned, MsgFlags, SockFlag, SockProtocol, SockType,
    SockaddrIn6,
};
use tokio::io::Interest;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How often each interface advertises (FRR's default for unnumbered interfaces is 10 s too).
const INTERVAL: Duration = Duration::from_secs(10);
/// Wait before retrying an interface whose socket could not be opened (e.g. not there yet).
const RETRY: Duration = Duration::from_secs(2);
const ROUTER_ADVERTISEMENT: u8 = 134;
/// <netinet/icmp6.h> ICMP6_FILTER (not in the libc crate).
const ICMP6_FILTER: libc::c_int = 1;
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// A router heard on an interface: the interface and its link-local address.
pub type Heard = (String, Ipv6Addr);

/// Handle to the task that runs one advertiser and listener per interface.
pub struct RouterAdverts {
    tx: mpsc::UnboundedSender<BTreeSet<String>>,
}

impl RouterAdverts {
    pub fn start() -> (RouterAdverts, mpsc::UnboundedReceiver<Heard>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let (heard_tx, heard) = mpsc::unbounded_channel();
        tokio::spawn(run(rx, heard_tx));
        (RouterAdverts { tx }, heard)
    }

    /// Advertise and listen on exactly these interfaces.
    pub fn set_interfaces(&self, ifaces: BTreeSet<String>) {
        let _ = self.tx.send(ifaces);
    }
}

async fn run(
    mut sets: mpsc::UnboundedReceiver<BTreeSet<String>>,
    heard: mpsc::UnboundedSender<Heard>,
) {
    let mut running: BTreeMap<String, JoinHandle<()>> = BTreeMap::new();
    while let Some(want) = sets.recv().await {
        running.retain(|iface, task| {
            let keep = want.contains(iface);
            if !keep {
                task.abort();
            }
            keep
        });
        for iface in want {
            if let std::collections::btree_map::Entry::Vacant(slot) = running.entry(iface) {
                let task = tokio::spawn(interface(slot.key().clone(), heard.clone()));
                slot.insert(task);
            }
        }
    }
    for task in running.into_values() {
        task.abort();
    }
}

/// One interface: advertise every INTERVAL, report each new router heard.
async fn interface(iface: String, heard: mpsc::UnboundedSender<Heard>) {
    let mut warned = false;
    loop {
        let (sock, index) = match open(&iface) {
            Ok(s) => s,
            Err(e) => {
                if !warned {
                    tracing::warn!(interface = %iface, "router advertisements: {e}; retrying");
                    warned = true;
                }
                tokio::time::sleep(RETRY).await;
                continue;
            }
        };
        warned = false;
        let to = SocketAddr::V6(SocketAddrV6::new(ALL_NODES, 0, 0, index));
        let mut tick = tokio::time::interval(INTERVAL);
        let mut last: Option<Ipv6Addr> = None;
        let mut buf = [0u8; 1500];
        let failed = loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(e) = sock.send_to(&advertisement(), to).await {
                        break e;
                    }
                }
                r = sock.async_io(Interest::READABLE, || receive(&sock, &mut buf)) => match r {
                    Ok(Some(src)) if last != Some(src) => {
                        tracing::info!(interface = %iface, router = %src, "router advertisement");
                        last = Some(src);
                        let _ = heard.send((iface.clone(), src));
                    }
                    Ok(_) => {}
                    Err(e) => break e,
                },
            }
        };
        tracing::warn!(interface = %iface, "router advertisements: {failed}; reopening");
        tokio::time::sleep(RETRY).await;
    }
}

/// One ICMPv6 message off the socket: the sender, when it is a router advertisement that RFC 4861
/// §6.1.2 lets a host accept.
fn receive(sock: &UdpSocket, buf: &mut [u8]) -> std::io::Result<Option<Ipv6Addr>> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsgs = nix::cmsg_space!(libc::c_int);
    let msg = socket::recvmsg::<SockaddrIn6>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsgs),
        MsgFlags::MSG_DONTWAIT,
    )?;
    let hop_limit = msg.cmsgs()?.find_map(|c| match c {
        ControlMessageOwned::Ipv6HopLimit(h) => Some(h),
        _ => None,
    });
    let (Some(from), Some(hop_limit)) = (msg.address, hop_limit) else {
        return Ok(None);
    };
    let bytes = msg.bytes;
    Ok(acceptable(&buf[..bytes], hop_limit, from.ip()).then(|| from.ip()))
}

/// RFC 4861 §6.1.2: an advertisement counts only with hop limit 255 (so it was sent on this
/// link, not routed here from afar), ICMP code 0, at least its 16 bytes, from a link-local
/// address. The kernel has checked the checksum; the socket's filter passes only type 134.
fn acceptable(message: &[u8], hop_limit: libc::c_int, src: Ipv6Addr) -> bool {
    hop_limit == 255
        && message.len() >= 16
        && message[0] == ROUTER_ADVERTISEMENT
        && message[1] == 0
        && src.is_unicast_link_local()
}

/// A router advertisement that announces no default route, prefix or option (RFC 4861 §4.2);
/// the kernel fills in the checksum of ICMPv6 raw sockets.
fn advertisement() -> [u8; 16] {
    let mut ra = [0u8; 16];
    ra[0] = ROUTER_ADVERTISEMENT;
    ra[4] = 64; // Cur Hop Limit
    ra
}

/// An ICMPv6 raw socket on `iface` that receives only router advertisements and sends with hop
/// limit 255 (receivers drop neighbor discovery packets with any other, RFC 4861 §6.1.2).
fn open(iface: &str) -> std::io::Result<(UdpSocket, u32)> {
    let index = nix::net::if_::if_nametoindex(iface)?;
    let fd: OwnedFd = socket::socket(
        AddressFamily::Inet6,
        SockType::Raw,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        SockProtocol::IcmpV6,
    )?;
    socket::setsockopt(&fd, sockopt::BindToDevice, &std::ffi::OsString::from(iface))?;
    set_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, 255)?;
    set_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, 255)?;
    set_int(
        &fd,
        libc::IPPROTO_IPV6,
        libc::IPV6_MULTICAST_IF,
        index as libc::c_int,
    )?;
    set_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_LOOP, 0)?;
    // Each message's hop limit comes with it, to check (RFC 4861 §6.1.2).
    socket::setsockopt(&fd, sockopt::Ipv6RecvHopLimit, &true)?;
    // ICMP6_FILTER: a bit set blocks its type; every type but router advertisements.
    let mut filter = [u32::MAX; 8];
    filter[usize::from(ROUTER_ADVERTISEMENT >> 5)] &= !(1u32 << (ROUTER_ADVERTISEMENT & 31));
    setsockopt_raw(&fd, libc::IPPROTO_ICMPV6, ICMP6_FILTER, &filter)?;
    // SAFETY: `fd` is an open socket we own; the std socket takes it over.
    let std_sock =
        unsafe { std::net::UdpSocket::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) };
    Ok((UdpSocket::from_std(std_sock)?, index))
}

fn set_int(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> std::io::Result<()> {
    setsockopt_raw(fd, level, name, &v)
}

fn setsockopt_raw<T>(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    v: &T,
) -> std::io::Result<()> {
    // SAFETY: `v` points to a live T of the size given.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_on_link_advertisements_count() {
        let ll: Ipv6Addr = "fe80::1".parse().unwrap();
        let ra = advertisement();
        assert!(acceptable(&ra, 255, ll));
        // Routed here (hop limit below 255), from a global address, too short, or a nonzero
        // code: dropped silently.
        assert!(!acceptable(&ra, 64, ll));
        assert!(!acceptable(&ra, 254, ll));
        assert!(!acceptable(&ra, 255, "2001:db8::1".parse().unwrap()));
        assert!(!acceptable(&ra[..15], 255, ll));
        let mut coded = ra;
        coded[1] = 1;
        assert!(!acceptable(&coded, 255, ll));
    }
}
