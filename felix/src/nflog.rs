//! Reading an nflog group (nfnetlink_log) in this network namespace: bind the group, ask for the
//! first bytes of every packet, and decode each logged packet to its prefix and its flow
//! (addresses, protocol, ports). The flow-log rules (`crate::flow_log`) write to the group.
//!
//! Raw netlink rather than libnetfilter_log: binding a group and reading its messages is four
//! small requests and one message layout, and the decoder is pure code a unit test can feed.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, SystemTime};

const NETLINK_NETFILTER: libc::c_int = 12;
const NFNL_SUBSYS_ULOG: u16 = 4;
const NFULNL_MSG_PACKET: u16 = 0;
const NFULNL_MSG_CONFIG: u16 = 1;
const NFULA_CFG_CMD: u16 = 1;
const NFULA_CFG_MODE: u16 = 2;
const NFULA_CFG_TIMEOUT: u16 = 4;
const NFULA_CFG_QTHRESH: u16 = 5;
const NFULNL_CFG_CMD_BIND: u8 = 1;
const NFULNL_COPY_PACKET: u8 = 2;
const NFULA_TIMESTAMP: u16 = 3;
const NFULA_IFINDEX_INDEV: u16 = 4;
const NFULA_IFINDEX_OUTDEV: u16 = 5;
const NFULA_PAYLOAD: u16 = 9;
const NFULA_PREFIX: u16 = 10;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_HDRLEN: usize = 16;
/// Attribute type bits that are flags (nested, network byte order), not the type.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Bytes of each packet the kernel copies: an IPv6 header with a few extension headers and the
/// ports fit, and nothing of the payload is kept.
pub const COPY_RANGE: u32 = 128;
/// The kernel sends what it has gathered after this long (1/100 s) or once this many packets
/// wait: records arrive within 0.1 s, a busy group costs one message per batch.
const FLUSH_TIMEOUT: u32 = 10;
const QUEUE_THRESHOLD: u32 = 64;
/// Receive buffer: what the kernel may queue before it drops (the reader counts the loss).
const RCVBUF: libc::c_int = 1 << 20;

/// One packet the kernel logged to the group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// The rule's log prefix.
    pub prefix: String,
    /// The packet's addresses, protocol and ports (None when the copy is not an IP packet).
    pub flow: Option<Flow>,
    /// When the kernel saw it, if it stamped the packet.
    pub time: Option<SystemTime>,
    pub in_ifindex: Option<u32>,
    pub out_ifindex: Option<u32>,
}

/// A packet's flow identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Flow {
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP, 1 ICMP, 58 ICMPv6, ...).
    pub protocol: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// Ports of TCP, UDP, UDP-Lite and SCTP (None for other protocols and later fragments).
    pub sport: Option<u16>,
    pub dport: Option<u16>,
}

/// A socket bound to one nflog group. Only one socket of a network namespace can bind a group:
/// a second reader (ulogd, `tcpdump -i nflog:N`) gets EBUSY.
#[derive(Debug)]
pub struct NflogSocket {
    fd: OwnedFd,
    seq: u32,
}

impl NflogSocket {
    /// Binds `group` in the caller's network namespace and configures it: packet copies of
    /// `COPY_RANGE` bytes, flushed within 0.1 s.
    pub fn bind(group: u16) -> io::Result<NflogSocket> {
        // SAFETY: plain socket(2); the descriptor is owned right away.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_NETFILTER,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: a zeroed sockaddr_nl is valid; family set, pid 0 lets the kernel pick one.
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: addr is a valid sockaddr_nl of the given size.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        };
        if bound < 0 {
            return Err(io::Error::last_os_error());
        }
        // Beyond the default limit needs CAP_NET_ADMIN, which the agent has; the plain option
        // (capped by net.core.rmem_max) otherwise.
        if set_int(&fd, libc::SO_RCVBUFFORCE, RCVBUF).is_err() {
            let _ = set_int(&fd, libc::SO_RCVBUF, RCVBUF);
        }
        let mut socket = NflogSocket { fd, seq: 0 };
        socket
            .configure(group, NFULA_CFG_CMD, &[NFULNL_CFG_CMD_BIND])
            .map_err(|e| annotate(e, group))?;
        let mut mode = COPY_RANGE.to_be_bytes().to_vec();
        mode.extend([NFULNL_COPY_PACKET, 0]);
        socket.configure(group, NFULA_CFG_MODE, &mode)?;
        socket.configure(group, NFULA_CFG_TIMEOUT, &FLUSH_TIMEOUT.to_be_bytes())?;
        socket.configure(group, NFULA_CFG_QTHRESH, &QUEUE_THRESHOLD.to_be_bytes())?;
        Ok(socket)
    }

    /// Receives one datagram of messages into `buf` (blocks up to `timeout`). ENOBUFS means the
    /// kernel dropped messages the socket had no room for; reading goes on after it.
    pub fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
        let tv = libc::timeval {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_usec: timeout.subsec_micros() as libc::suseconds_t,
        };
        // SAFETY: tv is a valid timeval of the given size.
        unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                &tv as *const libc::timeval as *const libc::c_void,
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            );
        }
        // SAFETY: buf is valid for writes of its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }

    /// Sends one config message for `group` with one attribute and waits for its ack.
    fn configure(&mut self, group: u16, attr: u16, payload: &[u8]) -> io::Result<()> {
        self.seq = self.seq.wrapping_add(1);
        let msg = config_message(self.seq, group, attr, payload);
        // SAFETY: msg is a valid buffer of its length; the kernel is the destination (pid 0).
        let sent = unsafe { libc::send(self.fd.as_raw_fd(), msg.as_ptr().cast(), msg.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut buf = vec![0u8; 8192];
        loop {
            let n = self.recv(&mut buf, Duration::from_secs(2))?;
            if let Some(ack) = find_ack(&buf[..n], self.seq) {
                return ack;
            }
        }
    }
}

fn set_int(fd: &OwnedFd, option: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: value is a valid c_int of the given size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// EBUSY on bind says why in words: another reader holds the group.
fn annotate(e: io::Error, group: u16) -> io::Error {
    if e.raw_os_error() == Some(libc::EBUSY) {
        io::Error::new(
            e.kind(),
            format!("nflog group {group} is bound by another reader (ulogd, tcpdump?): {e}"),
        )
    } else {
        io::Error::new(e.kind(), format!("binding nflog group {group}: {e}"))
    }
}

fn push_attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend(((4 + payload.len()) as u16).to_ne_bytes());
    out.extend(kind.to_ne_bytes());
    out.extend(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// An nfnetlink_log config request: netlink header, nfgenmsg (family unspecified, version 0, the
/// group in network order), one attribute.
fn config_message(seq: u32, group: u16, attr: u16, payload: &[u8]) -> Vec<u8> {
    let mut body = vec![libc::AF_UNSPEC as u8, 0];
    body.extend(group.to_be_bytes());
    push_attr(&mut body, attr, payload);
    let mut msg = Vec::with_capacity(NLMSG_HDRLEN + body.len());
    msg.extend(((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes());
    msg.extend(((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG).to_ne_bytes());
    msg.extend((NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
    msg.extend(seq.to_ne_bytes());
    msg.extend(0u32.to_ne_bytes());
    msg.extend(body);
    msg
}

fn u16_ne(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_ne(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u16_be(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_be(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_be(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The netlink messages of a datagram: (type, seq, body). Stops at the first malformed header.
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, u32, &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let len = u32_ne(buf, at)? as usize;
        let kind = u16_ne(buf, at + 4)?;
        let seq = u32_ne(buf, at + 8)?;
        if len < NLMSG_HDRLEN || at + len > buf.len() {
            return None;
        }
        let body = &buf[at + NLMSG_HDRLEN..at + len];
        at += len.next_multiple_of(4);
        Some((kind, seq, body))
    })
}

/// The ack (or error) of request `seq` in a datagram, if it holds one.
fn find_ack(buf: &[u8], seq: u32) -> Option<io::Result<()>> {
    messages(buf)
        .filter(|(kind, s, _)| *kind == NLMSG_ERROR && *s == seq)
        .map(|(_, _, body)| match u32_ne(body, 0).map(|e| e as i32) {
            Some(0) => Ok(()),
            Some(err) => Err(io::Error::from_raw_os_error(-err)),
            None => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "short netlink error message",
            )),
        })
        .next()
}

/// The attributes after a message's 4-byte nfgenmsg: (type, payload).
fn attributes(body: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut at = 4;
    std::iter::from_fn(move || {
        let len = u16_ne(body, at)? as usize;
        let kind = u16_ne(body, at + 2)? & NLA_TYPE_MASK;
        if len < 4 || at + len > body.len() {
            return None;
        }
        let payload = &body[at + 4..at + len];
        at += len.next_multiple_of(4);
        Some((kind, payload))
    })
}

/// Every logged packet in a datagram; other messages (acks, unknown types) are skipped.
pub fn parse_packets(buf: &[u8]) -> Vec<Packet> {
    messages(buf)
        .filter(|(kind, _, _)| *kind == (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET)
        .map(|(_, _, body)| parse_packet(body))
        .collect()
}

fn parse_packet(body: &[u8]) -> Packet {
    let mut packet = Packet {
        prefix: String::new(),
        flow: None,
        time: None,
        in_ifindex: None,
        out_ifindex: None,
    };
    for (kind, payload) in attributes(body) {
        match kind {
            NFULA_PREFIX => {
                let text = payload.split(|b| *b == 0).next().unwrap_or_default();
                packet.prefix = String::from_utf8_lossy(text).into_owned();
            }
            NFULA_PAYLOAD => packet.flow = parse_flow(payload),
            NFULA_TIMESTAMP => {
                packet.time = u64_be(payload, 0)
                    .zip(u64_be(payload, 8))
                    .and_then(|(s, us)| {
                        SystemTime::UNIX_EPOCH.checked_add(
                            Duration::from_secs(s) + Duration::from_micros(us.min(999_999)),
                        )
                    })
            }
            NFULA_IFINDEX_INDEV => packet.in_ifindex = u32_be(payload, 0),
            NFULA_IFINDEX_OUTDEV => packet.out_ifindex = u32_be(payload, 0),
            _ => {}
        }
    }
    packet
}

/// Protocols whose first four bytes are the source and destination ports.
fn has_ports(protocol: u8) -> bool {
    matches!(protocol, 6 | 17 | 132 | 136)
}

/// The flow of an IP packet copy (from its network header on).
pub fn parse_flow(ip: &[u8]) -> Option<Flow> {
    match ip.first()? >> 4 {
        4 => parse_v4(ip),
        6 => parse_v6(ip),
        _ => None,
    }
}

fn ports(protocol: u8, l4: Option<&[u8]>) -> (Option<u16>, Option<u16>) {
    // Both or neither: half a port pair names no flow.
    match l4.filter(|l4| has_ports(protocol) && l4.len() >= 4) {
        Some(l4) => (u16_be(l4, 0), u16_be(l4, 2)),
        None => (None, None),
    }
}

fn parse_v4(ip: &[u8]) -> Option<Flow> {
    let header = usize::from(ip[0] & 0x0f) * 4;
    let protocol = *ip.get(9)?;
    let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
    let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
    let fragment_offset = u16_be(ip, 6)? & 0x1fff;
    let l4 = (header >= 20 && fragment_offset == 0)
        .then(|| ip.get(header..))
        .flatten();
    let (sport, dport) = ports(protocol, l4);
    Some(Flow {
        protocol,
        src: IpAddr::V4(Ipv4Addr::from(src)),
        dst: IpAddr::V4(Ipv4Addr::from(dst)),
        sport,
        dport,
    })
}

fn parse_v6(ip: &[u8]) -> Option<Flow> {
    let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
    let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
    let mut next = *ip.get(6)?;
    let mut at = 40;
    let mut first_fragment = true;
    // Extension headers, a few at most (the copy is short anyway).
    for _ in 0..8 {
        let len = match next {
            0 | 43 | 60 => (usize::from(*ip.get(at + 1)?) + 1) * 8,
            44 => {
                first_fragment = u16_be(ip, at + 2)? >> 3 == 0;
                8
            }
            51 => (usize::from(*ip.get(at + 1)?) + 2) * 4,
            _ => break,
        };
        next = *ip.get(at)?;
        at += len;
    }
    let l4 = first_fragment.then(|| ip.get(at..)).flatten();
    let (sport, dport) = ports(next, l4);
    Some(Flow {
        protocol: next,
        src: IpAddr::V6(Ipv6Addr::from(src)),
        dst: IpAddr::V6(Ipv6Addr::from(dst)),
        sport,
        dport,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4_syn(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        p.extend(src);
        p.extend(dst);
        p.extend(sport.to_be_bytes());
        p.extend(dport.to_be_bytes());
        p.extend([0; 16]);
        p
    }

    /// A packet message as the kernel sends it (attribute order as in nfulnl_log_packet).
    fn packet_message(prefix: &str, payload: &[u8]) -> Vec<u8> {
        let mut body = vec![libc::AF_INET as u8, 0, 0, 83];
        push_attr(&mut body, 1, &[0x08, 0x00, 2, 0]);
        push_attr(&mut body, NFULA_IFINDEX_INDEV, &7u32.to_be_bytes());
        let mut ts = 1_700_000_000u64.to_be_bytes().to_vec();
        ts.extend(250_000u64.to_be_bytes());
        push_attr(&mut body, NFULA_TIMESTAMP, &ts);
        let mut text = prefix.as_bytes().to_vec();
        text.push(0);
        push_attr(&mut body, NFULA_PREFIX, &text);
        push_attr(&mut body, NFULA_PAYLOAD, payload);
        let mut msg = ((NLMSG_HDRLEN + body.len()) as u32).to_ne_bytes().to_vec();
        msg.extend(((NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET).to_ne_bytes());
        msg.extend([0; 10]);
        msg.extend(body);
        msg
    }

    #[test]
    fn decodes_logged_packets_from_a_datagram() {
        let syn = v4_syn([10, 244, 1, 2], [10, 244, 2, 3], 40312, 5432);
        let mut datagram = packet_message("drop ns/db ingress default deny", &syn);
        datagram.extend(packet_message("accept ns/web egress[0]", &syn[..22]));
        let packets = parse_packets(&datagram);
        assert_eq!(packets.len(), 2);
        let p = &packets[0];
        assert_eq!(p.prefix, "drop ns/db ingress default deny");
        assert_eq!(p.in_ifindex, Some(7));
        assert_eq!(
            p.time,
            Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250))
        );
        assert_eq!(
            p.flow,
            Some(Flow {
                protocol: 6,
                src: "10.244.1.2".parse().unwrap(),
                dst: "10.244.2.3".parse().unwrap(),
                sport: Some(40312),
                dport: Some(5432),
            })
        );
        // A copy cut inside the ports still names the addresses.
        let cut = packets[1].flow.unwrap();
        assert_eq!((cut.sport, cut.dport), (None, None));
    }

    #[test]
    fn ipv6_extension_headers_and_fragments() {
        let mut p = vec![0x60, 0, 0, 0, 0, 16, 0, 64];
        p.extend("fd00::1".parse::<Ipv6Addr>().unwrap().octets());
        p.extend("fd00::2".parse::<Ipv6Addr>().unwrap().octets());
        // Hop-by-hop (8 bytes) then UDP.
        p.extend([17, 0, 0, 0, 0, 0, 0, 0]);
        p.extend(53u16.to_be_bytes());
        p.extend(5353u16.to_be_bytes());
        let f = parse_flow(&p).unwrap();
        assert_eq!((f.protocol, f.sport, f.dport), (17, Some(53), Some(5353)));
        // A later fragment has no ports.
        p[6] = 44;
        p[40..48].copy_from_slice(&[17, 0, 0, 0x10, 0, 0, 0, 1]);
        let f = parse_flow(&p).unwrap();
        assert_eq!((f.protocol, f.sport), (17, None));
    }

    #[test]
    fn garbage_never_panics() {
        for len in 0..64 {
            let junk: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let _ = parse_packets(&junk);
            let _ = parse_flow(&junk);
        }
        // A header claiming more than the datagram holds ends the walk.
        let mut msg = packet_message("x", &v4_syn([1; 4], [2; 4], 1, 2));
        msg[0] = 0xff;
        assert!(parse_packets(&msg).is_empty());
        assert_eq!(parse_flow(&[0x4f]), None);
        // Acks: found by sequence number, errors as errors.
        let mut ack = 36u32.to_ne_bytes().to_vec();
        ack.extend(NLMSG_ERROR.to_ne_bytes());
        ack.extend([0, 0]);
        ack.extend(5u32.to_ne_bytes());
        ack.extend([0; 4]);
        ack.extend((-libc::EBUSY).to_ne_bytes());
        ack.extend([0; 16]);
        assert!(find_ack(&ack, 4).is_none());
        let err = find_ack(&ack, 5).unwrap().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EBUSY));
    }
}
