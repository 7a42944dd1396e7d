//! An nfnetlink batch being written: netlink messages with nested attributes (struct nlattr),
//! back to back in one buffer, between BATCH_BEGIN and BATCH_END.

/// nfnetlink's batch delimiters and the nf_tables subsystem (linux/netfilter/nfnetlink.h).
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFPROTO_INET: u8 = 1;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_CREATE: u16 = 0x400;
pub const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;
/// nlmsghdr (16 bytes) and nfgenmsg (4).
#[cfg(test)]
const HEADER: usize = 20;

/// One transaction's messages. Each message is one step of the diff; `steps[i]` says what the
/// message with sequence number `first_seq + i` does, for error reports.
#[derive(Debug)]
pub struct Batch {
    pub buf: Vec<u8>,
    pub first_seq: u32,
    pub steps: Vec<String>,
    seq: u32,
    /// Where the message being written starts, and its nests' starts.
    message: Option<usize>,
    last_message: Option<usize>,
    nests: Vec<usize>,
    /// A nest grew past what its 16-bit length can say: the batch cannot be sent.
    pub overflow: bool,
}

impl Batch {
    /// A batch whose messages take sequence numbers from `first_seq`.
    pub fn new(first_seq: u32) -> Batch {
        let mut b = Batch {
            buf: Vec::with_capacity(4096),
            first_seq,
            steps: Vec::new(),
            seq: first_seq,
            message: None,
            last_message: None,
            nests: Vec::new(),
            overflow: false,
        };
        b.header(
            NFNL_MSG_BATCH_BEGIN,
            NLM_F_REQUEST,
            0,
            first_seq.wrapping_sub(1),
        );
        b.end_header();
        b
    }

    fn header(&mut self, kind: u16, flags: u16, family: u8, seq: u32) {
        let at = self.buf.len();
        self.buf.extend(0u32.to_ne_bytes()); // length, patched by end_header / end_message
        self.buf.extend(kind.to_ne_bytes());
        self.buf.extend(flags.to_ne_bytes());
        self.buf.extend(seq.to_ne_bytes());
        self.buf.extend(0u32.to_ne_bytes()); // port id: the kernel's
        self.buf.push(family);
        self.buf.push(0); // NFNETLINK_V0
                          // res_id: the subsystem for the batch delimiters, 0 for nf_tables messages.
        let res_id = if family == 0 { NFNL_SUBSYS_NFTABLES } else { 0 };
        self.buf.extend(res_id.to_be_bytes());
        self.message = Some(at);
    }

    fn end_header(&mut self) {
        if let Some(at) = self.message.take() {
            let len = (self.buf.len() - at) as u32;
            self.buf[at..at + 4].copy_from_slice(&len.to_ne_bytes());
        }
    }

    /// Starts an nf_tables message (`NFT_MSG_*`) on family inet.
    pub fn begin(&mut self, msg: u8, flags: u16, step: String) {
        debug_assert!(self.message.is_none() && self.nests.is_empty());
        let seq = self.first_seq.wrapping_add(self.steps.len() as u32);
        self.steps.push(step);
        self.seq = seq;
        let at = self.buf.len();
        self.header(
            (NFNL_SUBSYS_NFTABLES << 8) | u16::from(msg),
            NLM_F_REQUEST | flags,
            NFPROTO_INET,
            seq,
        );
        self.last_message = Some(at);
    }

    pub fn end(&mut self) {
        debug_assert!(self.nests.is_empty());
        self.end_header();
    }

    pub fn put(&mut self, kind: u16, data: &[u8]) {
        let len = 4 + data.len();
        if len > u16::MAX as usize {
            self.overflow = true;
            return;
        }
        self.buf.extend((len as u16).to_ne_bytes());
        self.buf.extend(kind.to_ne_bytes());
        self.buf.extend(data);
        self.pad();
    }

    /// A NUL-terminated string.
    pub fn put_str(&mut self, kind: u16, s: &str) {
        let mut data = Vec::with_capacity(s.len() + 1);
        data.extend(s.as_bytes());
        data.push(0);
        self.put(kind, &data);
    }

    /// A 32-bit value in network byte order, as every nf_tables number attribute is.
    pub fn put_u32(&mut self, kind: u16, v: u32) {
        self.put(kind, &v.to_be_bytes());
    }

    pub fn put_u16(&mut self, kind: u16, v: u16) {
        self.put(kind, &v.to_be_bytes());
    }

    pub fn nest(&mut self, kind: u16) {
        self.nests.push(self.buf.len());
        self.buf.extend(0u16.to_ne_bytes());
        self.buf.extend((kind | NLA_F_NESTED).to_ne_bytes());
    }

    pub fn end_nest(&mut self) {
        let Some(at) = self.nests.pop() else {
            return;
        };
        let len = self.buf.len() - at;
        if len > u16::MAX as usize {
            self.overflow = true;
            return;
        }
        self.buf[at..at + 2].copy_from_slice(&(len as u16).to_ne_bytes());
    }

    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }

    /// Bytes written since the current message began (to split long element lists).
    pub fn message_len(&self) -> usize {
        self.last_message.map_or(0, |at| self.buf.len() - at)
    }

    /// Ends the batch: the last message asks for an acknowledgement, so success has an answer
    /// too (failures are always answered), and BATCH_END closes the transaction.
    pub fn finish(&mut self) -> u32 {
        if let Some(at) = self.last_message {
            let flags = u16::from_ne_bytes([self.buf[at + 6], self.buf[at + 7]]) | NLM_F_ACK;
            self.buf[at + 6..at + 8].copy_from_slice(&flags.to_ne_bytes());
        }
        let last = self.seq;
        self.header(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, last.wrapping_add(1));
        self.end_header();
        last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_nests_and_padding() {
        let mut b = Batch::new(10);
        b.begin(3, NLM_F_CREATE, "add chain x".into());
        b.put_str(1, "sepal");
        b.nest(4);
        b.put_u32(2, 7);
        b.end_nest();
        b.end();
        let last = b.finish();
        assert_eq!(last, 10);
        let begin = &b.buf[..HEADER];
        assert_eq!(u32::from_ne_bytes(begin[..4].try_into().unwrap()), 20);
        assert_eq!(&begin[16..20], &[0, 0, 0, 10]);
        let msg = &b.buf[HEADER..];
        // header 20 + "sepal\0" (4 + 6, padded to 12) + nest (4 + 8)
        assert_eq!(
            u32::from_ne_bytes(msg[..4].try_into().unwrap()),
            20 + 12 + 12
        );
        let flags = u16::from_ne_bytes([msg[6], msg[7]]);
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK);
        assert_eq!(u32::from_ne_bytes(msg[8..12].try_into().unwrap()), 10);
        assert_eq!(msg[16], NFPROTO_INET);
        assert_eq!(&msg[32..36], &[12, 0, 4, 0x80]);
        assert_eq!(&msg[40..44], &[0, 0, 0, 7]);
        assert_eq!(b.buf.len(), HEADER + 44 + HEADER);
    }

    #[test]
    fn an_oversized_nest_is_reported_not_truncated() {
        let mut b = Batch::new(1);
        b.begin(12, 0, "elements".into());
        b.nest(3);
        for _ in 0..20_000 {
            b.put_u32(1, 0);
        }
        b.end_nest();
        assert!(b.overflow);
    }
}
