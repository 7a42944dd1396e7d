//! A minimal synchronous rtnetlink client: one socket bound to the namespace it was opened in,
//! batched requests (one datagram out, all acks back) and dumps. The plugin's only kernel interface.

use netlink_packet_core::{
    NetlinkBuffer, NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_ACK_TLVS,
    NLM_F_CAPPED, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::io;

/// Receive buffer: a netlink dump datagram is at most 32 KiB on current kernels.
const RECV_BUF: usize = 64 * 1024;
const HEADER_LEN: usize = 16;
/// `NLMSGERR_ATTR_MSG`: the extended ack's human-readable error string.
const NLMSGERR_ATTR_MSG: u16 = 1;

pub struct Netlink {
    socket: Socket,
    seq: u32,
    buf: Vec<u8>,
}

/// One message from the kernel, reduced to what the plugin acts on.
enum Reply {
    Ack,
    Error(io::Error),
    Message(RouteNetlinkMessage),
    Done(io::Result<()>),
    Other,
}

impl Netlink {
    /// Opens a route netlink socket in the calling thread's current network namespace; it stays
    /// bound to that namespace for its whole life, whatever the thread does later.
    pub fn open() -> io::Result<Netlink> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        // Errors carry only the header of the failed request, plus the kernel's own explanation
        // ("Nexthop device is not up", …) for the error object's details.
        let _ = socket.set_cap_ack(true);
        let _ = socket.set_ext_ack(true);
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
            self.recv(|seq, reply| {
                let Some(i) = seqs.iter().position(|s| *s == seq) else {
                    return;
                };
                let result = match reply {
                    Reply::Ack => Ok(()),
                    Reply::Error(e) => Err(e),
                    _ => return,
                };
                if results[i].is_none() {
                    pending -= 1;
                }
                results[i] = Some(result);
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
        let mut answer: Option<io::Result<RouteNetlinkMessage>> = None;
        while answer.is_none() {
            self.recv(|s, reply| {
                if s != seq {
                    return;
                }
                match reply {
                    Reply::Message(m) => answer = Some(Ok(m)),
                    Reply::Error(e) => answer = Some(Err(e)),
                    _ => {}
                }
            })?;
        }
        answer.unwrap_or_else(|| Err(io::Error::other("no netlink reply")))
    }

    /// A dump request: every message up to NLMSG_DONE.
    pub fn dump(&mut self, msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let mut out = Vec::with_capacity(128);
        let seq = self.encode(&mut out, msg, NLM_F_REQUEST | NLM_F_DUMP);
        self.socket.send(&out, 0)?;
        let mut items = Vec::new();
        let mut done: Option<io::Result<()>> = None;
        while done.is_none() {
            self.recv(|s, reply| {
                if s != seq {
                    return;
                }
                match reply {
                    Reply::Message(m) => items.push(m),
                    Reply::Done(result) => done = Some(result),
                    Reply::Error(e) => done = Some(Err(e)),
                    Reply::Ack | Reply::Other => {}
                }
            })?;
        }
        done.unwrap_or(Ok(()))?;
        Ok(items)
    }

    /// Reads one datagram and hands each message in it to `each` with its sequence number.
    fn recv(&mut self, mut each: impl FnMut(u32, Reply)) -> io::Result<()> {
        self.buf.clear();
        // MSG_TRUNC makes recv report the full size: an oversized datagram is an error, not loss.
        let n = self.socket.recv(&mut self.buf, nix::libc::MSG_TRUNC)?;
        if n > self.buf.len() {
            return Err(io::Error::other(
                "netlink datagram larger than the receive buffer",
            ));
        }
        let mut offset = 0;
        while offset + HEADER_LEN <= self.buf.len() {
            let bytes = &self.buf[offset..];
            let len = NetlinkBuffer::new_checked(bytes)
                .map_err(|e| io::Error::other(format!("bad netlink message: {e}")))?
                .length() as usize;
            if len < HEADER_LEN || len > bytes.len() {
                return Err(io::Error::other("truncated netlink message"));
            }
            let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&bytes[..len])
                .map_err(|e| io::Error::other(format!("cannot decode netlink message: {e}")))?;
            let flags = msg.header.flags;
            let reply = match msg.payload {
                NetlinkPayload::Error(e) if e.code.is_none() => Reply::Ack,
                NetlinkPayload::Error(e) => {
                    let os = e.to_io();
                    match ext_ack_message(flags, &e.header) {
                        Some(text) => {
                            Reply::Error(io::Error::new(os.kind(), format!("{os}: {text}")))
                        }
                        None => Reply::Error(os),
                    }
                }
                NetlinkPayload::InnerMessage(m) => Reply::Message(m),
                NetlinkPayload::Done(d) if d.code != 0 => {
                    Reply::Done(Err(io::Error::from_raw_os_error(d.code.abs())))
                }
                NetlinkPayload::Done(_) => Reply::Done(Ok(())),
                _ => Reply::Other,
            };
            each(msg.header.sequence_number, reply);
            offset += (len + 3) & !3;
        }
        Ok(())
    }
}

/// The kernel's error string from an extended ack. `rest` is what follows the error code: the
/// failed request (only its header when NLM_F_CAPPED), then TLVs when NLM_F_ACK_TLVS.
fn ext_ack_message(flags: u16, rest: &[u8]) -> Option<String> {
    if flags & NLM_F_ACK_TLVS == 0 || rest.len() < HEADER_LEN {
        return None;
    }
    let request_len = if flags & NLM_F_CAPPED != 0 {
        HEADER_LEN
    } else {
        u32::from_ne_bytes(rest[..4].try_into().ok()?) as usize
    };
    let mut tlvs = rest.get((request_len + 3) & !3..)?;
    while tlvs.len() >= 4 {
        let len = u16::from_ne_bytes([tlvs[0], tlvs[1]]) as usize;
        let kind = u16::from_ne_bytes([tlvs[2], tlvs[3]]) & 0x3fff;
        if len < 4 || len > tlvs.len() {
            return None;
        }
        if kind == NLMSGERR_ATTR_MSG {
            let text = &tlvs[4..len];
            let text = text.split(|b| *b == 0).next().unwrap_or(text);
            return Some(String::from_utf8_lossy(text).into_owned());
        }
        tlvs = tlvs.get((len + 3) & !3..).unwrap_or(&[]);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tlv(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut out = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
        out.extend(kind.to_ne_bytes());
        out.extend(value);
        out.resize(out.len().next_multiple_of(4), 0);
        out
    }

    #[test]
    fn extended_ack_message_is_found_after_the_capped_header() {
        let mut rest = vec![0u8; HEADER_LEN];
        rest[..4].copy_from_slice(&136u32.to_ne_bytes());
        rest.extend(tlv(3, &8u32.to_ne_bytes()));
        rest.extend(tlv(NLMSGERR_ATTR_MSG, b"Nexthop device is not up\0"));
        assert_eq!(
            ext_ack_message(NLM_F_CAPPED | NLM_F_ACK_TLVS, &rest).as_deref(),
            Some("Nexthop device is not up")
        );
        assert_eq!(ext_ack_message(NLM_F_CAPPED, &rest), None);
    }

    #[test]
    fn extended_ack_after_an_uncapped_request() {
        let mut rest = vec![0u8; 20];
        rest[..4].copy_from_slice(&20u32.to_ne_bytes());
        rest.extend(tlv(NLMSGERR_ATTR_MSG, b"bad\0"));
        assert_eq!(
            ext_ack_message(NLM_F_ACK_TLVS, &rest).as_deref(),
            Some("bad")
        );
        // Garbage never panics.
        assert_eq!(ext_ack_message(NLM_F_ACK_TLVS, &[1, 2, 3]), None);
        assert_eq!(ext_ack_message(NLM_F_ACK_TLVS, &[0xff; 40]), None);
    }
}
