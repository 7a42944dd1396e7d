//! Route writes in batches: many RTM_NEWROUTE/RTM_DELROUTE messages in one sendmsg on a netlink
//! socket of our own. The kernel handles each message of the buffer in turn inside the syscall
//! and answers only failures, plus one acknowledgement for the last message (NLM_F_ACK), so a
//! batch of a few hundred routes costs two or three syscalls instead of two per route. This is
//! the path a 100,000-route BGP table takes into the kernel; single writes stay on rtnetlink.

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

/// Messages per sendmsg. At ~60-100 bytes each this stays well inside one page-sized skb
/// allocation limit, and the worst case (every message fails) queues at most this many error
/// replies, which the receive buffer set below holds.
pub const BATCH: usize = 256;
/// The socket's receive buffer: room for BATCH error replies (each an skb of about 1 KiB as the
/// kernel accounts it) with margin.
const RCVBUF: usize = 1 << 20;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HDRLEN: usize = 16;

/// What to do with one route.
#[derive(Debug, Clone)]
pub enum Op {
    /// RTM_NEWROUTE with NLM_F_CREATE|NLM_F_EXCL: fails with EEXIST if something is there.
    Add(RouteMessage),
    /// RTM_NEWROUTE with NLM_F_CREATE|NLM_F_REPLACE.
    Replace(RouteMessage),
    /// RTM_DELROUTE.
    Delete(RouteMessage),
}

/// The outcome of one message of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// The kernel refused it with this errno.
    Failed(i32),
    /// No answer could be matched to it (the replies were lost to a full receive buffer): the
    /// caller must find out another way.
    Unknown,
}

pub struct BatchSocket {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
    reply: Vec<u8>,
}

impl BatchSocket {
    /// A NETLINK_ROUTE socket in the calling thread's network namespace.
    pub fn open() -> std::io::Result<BatchSocket> {
        Ok(BatchSocket {
            socket: open_batch_socket(NETLINK_ROUTE)?,
            seq: 0,
            buf: Vec::with_capacity(BATCH * 128),
            reply: vec![0; 64 * 1024],
        })
    }

    /// Sends `ops` (at most BATCH) in one sendmsg and returns each one's outcome, in order.
    pub fn run(&mut self, ops: Vec<Op>) -> std::io::Result<Vec<Outcome>> {
        if ops.is_empty() {
            return Ok(Vec::new());
        }
        let first_seq = self.seq.wrapping_add(1);
        let last = ops.len() - 1;
        self.buf.clear();
        for (i, op) in ops.into_iter().enumerate() {
            self.seq = self.seq.wrapping_add(1);
            let mut flags = NLM_F_REQUEST;
            if i == last {
                flags |= NLM_F_ACK;
            }
            let payload = match op {
                Op::Add(m) => {
                    flags |= NLM_F_CREATE | NLM_F_EXCL;
                    RouteNetlinkMessage::NewRoute(m)
                }
                Op::Replace(m) => {
                    flags |= NLM_F_CREATE | NLM_F_REPLACE;
                    RouteNetlinkMessage::NewRoute(m)
                }
                Op::Delete(m) => RouteNetlinkMessage::DelRoute(m),
            };
            let mut header = NetlinkHeader::default();
            header.flags = flags;
            header.sequence_number = self.seq;
            let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
            msg.finalize();
            let at = self.buf.len();
            self.buf.resize(at + msg.buffer_len(), 0);
            msg.serialize(&mut self.buf[at..]);
        }
        let sent = self.socket.send(&self.buf, 0)?;
        if sent != self.buf.len() {
            return Err(std::io::Error::other(format!(
                "netlink took {sent} of {} bytes",
                self.buf.len()
            )));
        }
        let mut outcomes = vec![Outcome::Unknown; last + 1];
        let mut answered: Vec<bool> = vec![false; last + 1];
        // Replies were dropped for want of room: silence no longer means success.
        let mut overrun = false;
        // The kernel has handled every message by the time send returns: its replies are queued.
        // Read until the last message's acknowledgement; anything else is a failure reply.
        loop {
            let n = match self
                .socket
                .recv(&mut &mut self.reply[..], libc::MSG_DONTWAIT)
            {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    overrun = true;
                    continue;
                }
                // None left: what was not answered stays Unknown.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break,
                Err(e) => return Err(e),
            };
            let mut done = false;
            for (seq, errno) in replies(&self.reply[..n]) {
                let i = seq.wrapping_sub(first_seq) as usize;
                if i > last {
                    continue; // a reply to an earlier batch's message, already given up on
                }
                answered[i] = true;
                outcomes[i] = match errno {
                    0 => Outcome::Done,
                    e => Outcome::Failed(e),
                };
                done |= i == last;
            }
            if done {
                // The last one's ack, and no reply lost: every message not answered went through.
                if !overrun {
                    for (o, a) in outcomes.iter_mut().zip(&answered) {
                        if !a {
                            *o = Outcome::Done;
                        }
                    }
                }
                return Ok(outcomes);
            }
        }
        Ok(outcomes)
    }
}

/// A netlink socket of `protocol` talking to the kernel, in the calling thread's network
/// namespace, sized for the error replies of a batch that fails in many places.
pub(crate) fn open_batch_socket(protocol: isize) -> std::io::Result<Socket> {
    let mut socket = Socket::new(protocol)?;
    socket.bind_auto()?;
    socket.connect(&SocketAddr::new(0, 0))?;
    // Error replies carry only the failed message's header, not the whole message.
    socket.set_cap_ack(true)?;
    socket.set_rx_buf_sz(RCVBUF)?;
    Ok(socket)
}

/// The (sequence number, errno) of each NLMSG_ERROR message in a datagram; errno 0 is an ack.
pub(crate) fn replies(mut b: &[u8]) -> Vec<(u32, i32)> {
    let mut out = Vec::new();
    while b.len() >= NLMSG_HDRLEN {
        let len = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
        if len < NLMSG_HDRLEN || len > b.len() {
            break;
        }
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        let seq = u32::from_ne_bytes([b[8], b[9], b[10], b[11]]);
        if kind == NLMSG_ERROR && len >= NLMSG_HDRLEN + 4 {
            let code = i32::from_ne_bytes([b[16], b[17], b[18], b[19]]);
            out.push((seq, -code));
        }
        b = &b[(len + 3) & !3..];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_reply(seq: u32, code: i32) -> Vec<u8> {
        // nlmsghdr, then the error code and the failed message's header (NETLINK_CAP_ACK).
        let len: u32 = 16 + 4 + 16;
        let mut v = Vec::new();
        v.extend(len.to_ne_bytes());
        v.extend(NLMSG_ERROR.to_ne_bytes());
        v.extend(0u16.to_ne_bytes());
        v.extend(seq.to_ne_bytes());
        v.extend(0u32.to_ne_bytes());
        v.extend(code.to_ne_bytes());
        v.extend([0u8; 16]);
        v
    }

    #[test]
    fn replies_are_read_with_their_sequence_numbers() {
        let mut d = error_reply(7, -libc::EEXIST);
        d.extend(error_reply(9, 0));
        assert_eq!(replies(&d), vec![(7, libc::EEXIST), (9, 0)]);
        // A truncated tail is ignored, not misread.
        assert_eq!(replies(&d[..30]), vec![]);
    }
}
