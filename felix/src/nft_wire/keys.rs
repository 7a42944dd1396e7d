//! Set elements as the kernel stores them, from the text the compiler writes (`10.0.0.1`,
//! `10.0.0.0/8`, `10.0.0.1-10.0.0.9`, `tcp . 80`, `udp . 1000-2000`, `10.0.0.1 . tcp . 8080`).
//! Layouts follow nft: each field of a concatenation takes a multiple of 4 bytes; numbers are in
//! network byte order; an rbtree interval is a start element and an interval-end element one
//! past its last address (none when it reaches the top); a pipapo (concatenated) interval is
//! one element with a key and a key end, both inclusive.

use std::net::IpAddr;

use crate::policy::{Family, SetKind};

/// One element of a netlink element list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireElement {
    pub key: Vec<u8>,
    pub key_end: Option<Vec<u8>>,
    /// NFT_SET_ELEM_INTERVAL_END: this key is one past the end of the interval before it.
    pub interval_end: bool,
}

impl WireElement {
    fn plain(key: Vec<u8>) -> WireElement {
        WireElement {
            key,
            key_end: None,
            interval_end: false,
        }
    }
}

/// The elements `text` stands for in a set of `kind`; `None` when the text is not one the
/// compiler writes (the caller leaves the change to nft, which reports it).
pub fn elements(kind: SetKind, text: &str) -> Option<Vec<WireElement>> {
    match kind {
        SetKind::Addr(f) => Some(vec![WireElement::plain(addr(f, text)?)]),
        SetKind::AddrInterval(f) => {
            let (start, last) = addr_range(f, text)?;
            let mut out = vec![WireElement::plain(to_bytes(f, start))];
            // One past the last address, unless the range runs to the top of the family.
            if last < max(f) {
                out.push(WireElement {
                    key: to_bytes(f, last + 1),
                    key_end: None,
                    interval_end: true,
                });
            }
            Some(out)
        }
        SetKind::ProtoPort => {
            let (proto, port) = text.split_once(" . ")?;
            let key = proto_port(proto, port.trim().parse().ok()?)?;
            Some(vec![WireElement::plain(key)])
        }
        SetKind::ProtoPortInterval => {
            let (proto, ports) = text.split_once(" . ")?;
            let (first, last) = match ports.trim().split_once('-') {
                Some((a, b)) => (a.parse().ok()?, b.parse().ok()?),
                None => {
                    let p = ports.trim().parse().ok()?;
                    (p, p)
                }
            };
            if first > last {
                return None;
            }
            Some(vec![WireElement {
                key: proto_port(proto, first)?,
                key_end: Some(proto_port(proto, last)?),
                interval_end: false,
            }])
        }
        SetKind::AddrProtoPort(f) => {
            let mut parts = text.split(" . ");
            let (a, proto, port) = (parts.next()?, parts.next()?, parts.next()?);
            if parts.next().is_some() {
                return None;
            }
            let mut key = addr(f, a)?;
            key.extend(proto_port(proto, port.trim().parse().ok()?)?);
            Some(vec![WireElement::plain(key)])
        }
    }
}

/// A verdict map's `ifname` key: the name, zero-padded to IFNAMSIZ.
pub fn ifname(name: &str) -> Option<Vec<u8>> {
    if name.is_empty() || name.len() >= 16 || name.bytes().any(|b| b == 0) {
        return None;
    }
    let mut key = name.as_bytes().to_vec();
    key.resize(16, 0);
    Some(key)
}

fn proto_port(proto: &str, port: u16) -> Option<Vec<u8>> {
    let number = match proto.trim() {
        "tcp" => 6,
        "udp" => 17,
        "sctp" => 132,
        other => other.parse().ok()?,
    };
    let mut key = vec![number, 0, 0, 0];
    key.extend(port.to_be_bytes());
    key.extend([0, 0]);
    Some(key)
}

fn parse_ip(f: Family, text: &str) -> Option<u128> {
    match (f, text.trim().parse::<IpAddr>().ok()?) {
        (Family::V4, IpAddr::V4(a)) => Some(u32::from(a) as u128),
        (Family::V6, IpAddr::V6(a)) => Some(u128::from(a)),
        _ => None,
    }
}

fn addr(f: Family, text: &str) -> Option<Vec<u8>> {
    Some(to_bytes(f, parse_ip(f, text)?))
}

/// First and last address of `a`, `a/len` or `a-b`.
fn addr_range(f: Family, text: &str) -> Option<(u128, u128)> {
    let bits = match f {
        Family::V4 => 32,
        Family::V6 => 128,
    };
    if let Some((a, len)) = text.split_once('/') {
        let len: u32 = len.trim().parse().ok()?;
        if len > bits {
            return None;
        }
        let start = parse_ip(f, a)?;
        let host_bits = bits - len;
        let span = if host_bits == 128 {
            u128::MAX
        } else {
            (1u128 << host_bits) - 1
        };
        if start & span != 0 {
            return None;
        }
        return Some((start, start | span));
    }
    if let Some((a, b)) = text.split_once('-') {
        let (s, e) = (parse_ip(f, a)?, parse_ip(f, b)?);
        return (s <= e).then_some((s, e));
    }
    let a = parse_ip(f, text)?;
    Some((a, a))
}

fn max(f: Family) -> u128 {
    match f {
        Family::V4 => u32::MAX as u128,
        Family::V6 => u128::MAX,
    }
}

fn to_bytes(f: Family, v: u128) -> Vec<u8> {
    match f {
        Family::V4 => (v as u32).to_be_bytes().to_vec(),
        Family::V6 => v.to_be_bytes().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(e: &[WireElement]) -> Vec<String> {
        e.iter()
            .map(|e| {
                let mut s: String = e.key.iter().map(|b| format!("{b:02x}")).collect();
                if let Some(end) = &e.key_end {
                    s.push_str("..");
                    s.extend(end.iter().map(|b| format!("{b:02x}")));
                }
                if e.interval_end {
                    s.push_str(" end");
                }
                s
            })
            .collect()
    }

    // The byte strings below are what nft 1.0.6 sends for the same elements (`--debug=mnl`).
    #[test]
    fn layouts_match_nft() {
        let v4 = Family::V4;
        assert_eq!(
            hex(&elements(SetKind::Addr(v4), "10.1.2.3").unwrap()),
            ["0a010203"]
        );
        assert_eq!(
            hex(&elements(SetKind::AddrInterval(v4), "10.1.0.0/16").unwrap()),
            ["0a010000", "0a020000 end"]
        );
        assert_eq!(
            hex(&elements(SetKind::ProtoPort, "tcp . 80").unwrap()),
            ["0600000000500000"]
        );
        assert_eq!(
            hex(&elements(SetKind::ProtoPortInterval, "udp . 1000-2000").unwrap()),
            ["1100000003e80000..1100000007d00000"]
        );
        assert_eq!(
            hex(&elements(SetKind::ProtoPortInterval, "sctp . 5").unwrap()),
            ["8400000000050000..8400000000050000"]
        );
        assert_eq!(
            hex(&elements(SetKind::AddrProtoPort(Family::V6), "fd00::1 . tcp . 443").unwrap()),
            ["fd0000000000000000000000000000010600000001bb0000"]
        );
        assert_eq!(
            hex(&elements(SetKind::AddrInterval(Family::V6), "fd00::/64").unwrap()),
            [
                "fd000000000000000000000000000000",
                "fd000000000000010000000000000000 end"
            ]
        );
        assert_eq!(
            ifname("sepabc").unwrap(),
            b"sepabc\0\0\0\0\0\0\0\0\0\0".to_vec()
        );
    }

    #[test]
    fn ranges_to_the_top_have_no_end_element() {
        let v4 = Family::V4;
        assert_eq!(
            hex(&elements(SetKind::AddrInterval(v4), "11.0.0.0-255.255.255.255").unwrap()),
            ["0b000000"]
        );
        assert_eq!(
            hex(&elements(SetKind::AddrInterval(v4), "0.0.0.0/0").unwrap()),
            ["00000000"]
        );
        assert_eq!(
            hex(&elements(SetKind::AddrInterval(Family::V6), "::/0").unwrap()),
            ["00000000000000000000000000000000"]
        );
    }

    #[test]
    fn text_the_compiler_never_writes_is_refused() {
        let v4 = Family::V4;
        for (kind, text) in [
            (SetKind::Addr(v4), "fd00::1"),
            (SetKind::Addr(v4), "10.0.0.256"),
            (SetKind::AddrInterval(v4), "10.0.0.1/8"),
            (SetKind::AddrInterval(v4), "10.0.0.9-10.0.0.1"),
            (SetKind::AddrInterval(v4), "10.0.0.0/33"),
            (SetKind::ProtoPort, "tcp 80"),
            (SetKind::ProtoPort, "icmp . 80"),
            (SetKind::ProtoPortInterval, "tcp . 90-80"),
            (SetKind::AddrProtoPort(v4), "10.0.0.1 . tcp"),
        ] {
            assert_eq!(elements(kind, text), None, "{text}");
        }
        assert_eq!(ifname("a-name-of-16-chr"), None);
    }
}
