//! Servers in pod and node netns: TCP accept, UDP echo, and SCTP INITs recorded from a raw
//! socket (this kernel has no SCTP sockets, so an INIT arriving is what "connected" means).

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use super::enter_netns;

/// SCTP INITs seen by the servers' raw sockets: (source, destination port, initiate tag).
pub type SctpSeen = Arc<Mutex<HashSet<(Ipv4Addr, u16, u32)>>>;

/// One server thread per netns, all stopped and joined on drop. Drop it before the netns go.
#[derive(Default)]
pub struct Servers {
    threads: Vec<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
    sctp: SctpSeen,
}

impl Servers {
    pub fn new() -> Servers {
        Servers::default()
    }

    /// Starts serving in netns `netns` on these TCP and UDP ports (any address) and records every
    /// SCTP INIT it receives, whatever its port; returns once the sockets are bound.
    pub fn start(&mut self, netns: &str, tcp: &[u16], udp: &[u16]) {
        let (stop, sctp) = (self.stop.clone(), self.sctp.clone());
        let (netns, tcp, udp) = (netns.to_string(), tcp.to_vec(), udp.to_vec());
        let (tx, rx) = std::sync::mpsc::channel();
        self.threads.push(std::thread::spawn(move || {
            serve(&netns, &tcp, &udp, stop, sctp, tx)
        }));
        rx.recv().expect("server started");
    }

    /// The INITs every server has seen so far.
    pub fn sctp(&self) -> &SctpSeen {
        &self.sctp
    }
}

impl Drop for Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn serve(
    netns: &str,
    tcp_ports: &[u16],
    udp_ports: &[u16],
    stop: Arc<AtomicBool>,
    sctp: SctpSeen,
    ready: Sender<()>,
) {
    enter_netns(netns);
    let tcp: Vec<TcpListener> = tcp_ports
        .iter()
        .map(|p| TcpListener::bind(("0.0.0.0", *p)).expect("bind tcp"))
        .collect();
    let udp: Vec<UdpSocket> = udp_ports
        .iter()
        .map(|p| UdpSocket::bind(("0.0.0.0", *p)).expect("bind udp"))
        .collect();
    for l in &tcp {
        l.set_nonblocking(true).expect("nonblocking");
    }
    for u in &udp {
        u.set_nonblocking(true).expect("nonblocking");
    }
    // SAFETY: plain socket(2); the fd is closed below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW | libc::SOCK_NONBLOCK, 132) };
    assert!(
        raw >= 0,
        "raw sctp socket: {}",
        std::io::Error::last_os_error()
    );
    let _ = ready.send(());
    let mut fds: Vec<RawFd> = tcp.iter().map(|l| l.as_raw_fd()).collect();
    fds.extend(udp.iter().map(|u| u.as_raw_fd()));
    fds.push(raw);
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let mut pfds: Vec<libc::pollfd> = fds
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect();
        // SAFETY: pfds is a valid array of pollfd for the duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, 100) };
        if n <= 0 {
            continue;
        }
        for l in &tcp {
            while let Ok((s, _)) = l.accept() {
                drop(s);
            }
        }
        for u in &udp {
            while let Ok((len, from)) = u.recv_from(&mut buf) {
                let _ = u.send_to(&buf[..len], from);
            }
        }
        loop {
            // SAFETY: buf is valid for buf.len() bytes.
            let len = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if len <= 0 {
                break;
            }
            if let Some(init) = sctp_init_of(&buf[..len as usize]) {
                sctp.lock().expect("lock").insert(init);
            }
        }
    }
    // SAFETY: raw is our own open fd.
    unsafe { libc::close(raw) };
}

/// (source, destination port, initiate tag) of an IPv4 packet carrying an SCTP INIT.
fn sctp_init_of(b: &[u8]) -> Option<(Ipv4Addr, u16, u32)> {
    let ihl = ((b.first().copied()? & 0x0f) as usize) * 4;
    if b.len() < ihl + 32 || b[ihl + 12] != 1 {
        return None; // not an INIT
    }
    let src = Ipv4Addr::new(b[12], b[13], b[14], b[15]);
    let dport = u16::from_be_bytes([b[ihl + 2], b[ihl + 3]]);
    let tag = u32::from_be_bytes([b[ihl + 16], b[ihl + 17], b[ihl + 18], b[ihl + 19]]);
    Some((src, dport, tag))
}
