//! Connection probes from inside a pod's netns, one thread each: TCP connect, UDP round trip
//! to the echo servers, SCTP INIT sent on a raw socket and looked for at the server.

use std::fmt;
use std::io::ErrorKind;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::{Duration, Instant};

use sepal_felix::policy::Protocol;

use super::{enter_netns, SctpSeen};

/// What a probe saw. Upstream's suites tell a dropped connection (`TIMEOUT`) from a refused or
/// unreachable one, and only the first counts as "denied" for ClusterNetworkPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Connected,
    Timeout,
    /// Refused, unreachable or another error before the timeout.
    Failed(ErrorKind),
}

impl Outcome {
    pub fn connected(&self) -> bool {
        *self == Outcome::Connected
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Connected => f.write_str("connected"),
            Outcome::Timeout => f.write_str("timeout"),
            Outcome::Failed(kind) => write!(f, "failed ({kind})"),
        }
    }
}

/// One probe: from the pod in netns `client_netns` (whose address is `src`) to `dst`.
#[derive(Debug, Clone)]
pub struct ProbeSpec {
    pub client_netns: String,
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub protocol: Protocol,
    pub port: u16,
}

static NEXT_PORT: AtomicU16 = AtomicU16::new(20000);

/// A source port no earlier probe of this process used, so an old conntrack entry of an allowed
/// flow can never make a new probe look established.
fn fresh_port() -> u16 {
    let p = NEXT_PORT.fetch_add(1, Ordering::Relaxed);
    20000 + p % 40000
}

/// Runs every probe at once, each on a thread of its own; outcomes in the order given.
pub fn probe_all(specs: &[ProbeSpec], timeout: Duration, sctp: &SctpSeen) -> Vec<Outcome> {
    std::thread::scope(|s| {
        let handles: Vec<_> = specs
            .iter()
            .map(|spec| s.spawn(move || probe(spec, timeout, sctp)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("probe thread"))
            .collect()
    })
}

/// One probe on the calling thread (which it moves into the client's netns).
pub fn probe(spec: &ProbeSpec, timeout: Duration, sctp: &SctpSeen) -> Outcome {
    enter_netns(&spec.client_netns);
    let addr = SocketAddr::new(IpAddr::V4(spec.dst), spec.port);
    match spec.protocol {
        Protocol::Tcp => match TcpStream::connect_timeout(&addr, timeout) {
            Ok(_) => Outcome::Connected,
            Err(e) if e.kind() == ErrorKind::TimedOut => Outcome::Timeout,
            Err(e) => Outcome::Failed(e.kind()),
        },
        Protocol::Udp => udp(addr, timeout),
        Protocol::Sctp => sctp_init_seen(spec, timeout, sctp),
    }
}

fn udp(addr: SocketAddr, timeout: Duration) -> Outcome {
    let sock = loop {
        match UdpSocket::bind(("0.0.0.0", fresh_port())) {
            Ok(s) => break s,
            Err(e) if e.kind() == ErrorKind::AddrInUse => continue,
            Err(e) => panic!("udp bind: {e}"),
        }
    };
    let nonce = fresh_port().to_be_bytes();
    if let Err(e) = sock.connect(addr).and_then(|_| sock.send(&nonce)) {
        return Outcome::Failed(e.kind());
    }
    sock.set_read_timeout(Some(timeout)).expect("timeout");
    let mut buf = [0u8; 16];
    match sock.recv(&mut buf) {
        Ok(2) if buf[..2] == nonce => Outcome::Connected,
        Ok(_) => Outcome::Failed(ErrorKind::InvalidData),
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            Outcome::Timeout
        }
        Err(e) => Outcome::Failed(e.kind()),
    }
}

fn sctp_init_seen(spec: &ProbeSpec, timeout: Duration, sctp: &SctpSeen) -> Outcome {
    let sport = fresh_port();
    let tag = 0x5e9a_0000 | sport as u32;
    let pkt = sctp_init(sport, spec.port, tag);
    // SAFETY: plain socket(2) and sendto(2) with a valid sockaddr_in; fd closed below.
    let sent = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_RAW, 132);
        assert!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from(spec.dst).to_be(),
            },
            sin_zero: [0; 8],
        };
        let n = libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            pkt.len(),
            0,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        let err = std::io::Error::last_os_error();
        libc::close(fd);
        if n == pkt.len() as isize {
            Ok(())
        } else {
            Err(err)
        }
    };
    if let Err(e) = sent {
        return Outcome::Failed(e.kind());
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if sctp
            .lock()
            .expect("lock")
            .contains(&(spec.src, spec.port, tag))
        {
            return Outcome::Connected;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Outcome::Timeout
}

fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82F6_3B78
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// An SCTP common header and INIT chunk (RFC 9260 §3.3.2) with a valid CRC32c.
fn sctp_init(sport: u16, dport: u16, tag: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(32);
    p.extend_from_slice(&sport.to_be_bytes());
    p.extend_from_slice(&dport.to_be_bytes());
    p.extend_from_slice(&0u32.to_be_bytes()); // verification tag 0 in an INIT
    p.extend_from_slice(&0u32.to_be_bytes()); // checksum, filled below
    p.extend_from_slice(&[1, 0]); // chunk INIT, flags
    p.extend_from_slice(&20u16.to_be_bytes());
    p.extend_from_slice(&tag.to_be_bytes()); // initiate tag
    p.extend_from_slice(&65535u32.to_be_bytes()); // a_rwnd
    p.extend_from_slice(&10u16.to_be_bytes()); // outbound streams
    p.extend_from_slice(&10u16.to_be_bytes()); // inbound streams
    p.extend_from_slice(&tag.to_be_bytes()); // initial TSN
    let crc = crc32c(&p);
    p[8..12].copy_from_slice(&crc.to_le_bytes());
    p
}
