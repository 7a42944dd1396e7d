//! A minimal synchronous rtnetlink client: one socket bound to the namespace it was opened in,
//! batched requests (one datagram out, all acks back) and dumps. The plugin's only kernel interface.

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_DUMP,
    NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::io;

/// Receive buffer: a netlink dump datagram is at most 32 KiB on current kernels.
const RECV_BUF: usize = 64 * 1024;

pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Netlink {
    /// Opens a route netlink socket in the calling thread's current network namespace; it stays
    /// bound to that namespace for its whole life, whatever the thread does later.
    pub fn open() -> io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Errors then carry only the header of the failed request, not a copy of it.
        let _ = socket.set_cap_ack(true);
        Ok(Netlink {
            socket,
            seq: 0,
            buf: Vec::with_capacity(RECV_BUF),
        })
    }

    fn encode(&mut self, out: &mut Vec<u8>, msg: RouteNetlinkMessage, flags: u16) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = flags;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        packet.finalize();
        let start = out.len();
        out.resize(start + packet.buffer_len(), 0);
        packet.serialize(&mut out[start..]);
        self.seq
    }

    /// Sends all `requests` (each `(message, NLM_F_* flags)`, ACK added) in one datagram; the
    /// kernel runs them in order. Returns one result per request.
    pub fn batch(
        &mut self,
        requests: Vec<(RouteNetlinkMessage, u16)>,
    ) -> io::Result<Vec<io::Result<()>>> {
        let mut out = Vec::with_capacity(256 * requests.len());
        let mut seqs = Vec::with_capacity(requests.len());
        for (msg, flags) in requests {
            seqs.push(self.encode(&mut out, msg, flags | NLM_F_REQUEST | NLM_F_ACK));
        }
        self.socket.send(&out, 0)?;
        let mut results: Vec<Option<io::Result<()>>> = seqs.iter().map(|_| None).collect();
        let mut pending = seqs.len();
        while pending > 0 {
            self.recv(|seq, payload| {
                let Some(i) = seqs.iter().position(|s| *s == seq) else {
                    return Ok(());
                };
                if let NetlinkPayload::Error(err) = payload {
                    if results[i].is_none() {
                        pending -= 1;
                    }
                    results[i] = Some(match err.code {
                        None => Ok(()),
                        Some(_) => Err(err.to_io()),
                    });
                }
                Ok(())
            })?;
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(io::Error::other("no netlink ack"))))
            .collect())
    }

    /// One request, acknowledged.
    pub fn request(&mut self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        self.batch(vec![(msg, flags)])?
            .pop()
            .unwrap_or_else(|| Err(io::Error::other("no netlink ack")))
    }

    /// A GET for one object (e.g. a link by name): its reply or the kernel's error.
    pub fn get(&mut self, msg: RouteNetlinkMessage) -> io::Result<RouteNetlinkMessage> {
        let mut out = Vec::with_capacity(128);
        let seq = self.encode(&mut out, msg, NLM_F_REQUEST);
        self.socket.send(&out, 0)?;
        let mut reply: Option<io::Result<RouteNetlinkMessage>> = None;
        while reply.is_none() {
            self.recv(|s, payload| {
                if s != seq {
                    return Ok(());
                }
                match payload {
                    NetlinkPayload::InnerMessage(m) => reply = Some(Ok(m)),
                    NetlinkPayload::Error(e) if e.code.is_some() => reply = Some(Err(e.to_io())),
                    _ => {}
                }
                Ok(())
            })?;
        }
        reply.unwrap_or_else(|| Err(io::Error::other("no netlink reply")))
    }

    /// A dump request: every message up to NLMSG_DONE.
    pub fn dump(&mut self, msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut out = Vec::with_capacity(128);
        let seq = self.encode(&mut out, msg, NLM_F_REQUEST | NLM_F_DUMP);
        self.socket.send(&out, 0)?;
        let mut items = Vec::new();
        let mut done: Option<io::Result<()>> = None;
        while done.is_none() {
            self.recv(|s, payload| {
                if s != seq {
                    return Ok(());
                }
                match payload {
                    NetlinkPayload::InnerMessage(m) => items.push(m),
                    NetlinkPayload::Done(d) if d.code != 0 => {
                        done = Some(Err(io::Error::from_raw_os_error(d.code.abs())))
                    }
                    NetlinkPayload::Done(_) => done = Some(Ok(())),
                    NetlinkPayload::Error(e) if e.code.is_some() => done = Some(Err(e.to_io())),
                    _ => {}
                }
                Ok(())
            })?;
        }
        done.unwrap_or(Ok(()))?;
        Ok(items)
    }

    /// Reads one datagram and hands each message in it to `each` with its sequence number.
    fn recv(
        &mut self,
        mut each: impl FnMut(u32, NetlinkPayload<RouteNetlinkMessage>) -> io::Result<()>,
    ) -> io::Result<()> {
        self.buf.clear();
        // MSG_TRUNC makes recv report the full size, so an oversized datagram is an error, not silent loss.
        let n = self.socket.recv(&mut self.buf, nix::libc::MSG_TRUNC)?;
        if n > self.buf.len() {
            return Err(io::Error::other(
                "netlink datagram larger than the receive buffer",
            ));
        }
        let mut offset = 0;
        while offset + 16 <= self.buf.len() {
            let bytes = &self.buf[offset..];
            let len = NetlinkBuffer::new_checked(bytes)
                .map_err(|e| io::Error::other(format!("bad netlink message: {e}")))?
                .length() as usize;
            if len < 16 || len > bytes.len() {
                return Err(io::Error::other("truncated netlink message"));
            }
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[..len])
                .map_err(|e| io::Error::other(format!("cannot decode netlink message: {e}")))?;
            each(msg.header.sequence_number, msg.payload)?;
            offset += (len + 3) & !3;
        }
        Ok(())
    }
}
