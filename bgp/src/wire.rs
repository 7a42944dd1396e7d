// Wire format: framing, decoding and encoding of BGP messages over netgauze-bgp-pkt.
// Owns the conversion to Sepal's own small types, the 4096-byte limit, RFC 7606 decisions and NOTIFICATION codes.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use netgauze_bgp_pkt::capabilities::{
    BgpCapability, ExtendedNextHopEncoding, ExtendedNextHopEncodingCapability,
    FourOctetAsCapability, GracefulRestartAddressFamily, GracefulRestartCapability,
    MultiProtocolExtensionsCapability,
};
use netgauze_bgp_pkt::community::{Community, LargeCommunity};
use netgauze_bgp_pkt::nlri::{Ipv4Unicast, Ipv4UnicastAddress, Ipv6Unicast, Ipv6UnicastAddress};
use netgauze_bgp_pkt::notification::{
    BgpNotificationMessage, CeaseError, FiniteStateMachineError, HoldTimerExpiredError,
    MessageHeaderError, OpenMessageError, RouteRefreshError, UpdateMessageError,
};
use netgauze_bgp_pkt::open::{BgpOpenMessage, BgpOpenMessageParameter};
use netgauze_bgp_pkt::path_attribute::{
    As2PathSegment, As4PathSegment, AsPath, AsPathSegmentType, ClusterId, ClusterList, Communities,
    LargeCommunities, LocalPreference, MpReach, MpUnreach, MultiExitDiscriminator, NextHop, Origin,
    Originator, PathAttribute, PathAttributeValue, UnknownAttribute,
};
use netgauze_bgp_pkt::update::BgpUpdateMessage;
use netgauze_bgp_pkt::wire::deserializer::path_attribute::PathAttributeParsingError;
use netgauze_bgp_pkt::wire::deserializer::update::BgpUpdateMessageParsingError;
use netgauze_bgp_pkt::wire::deserializer::{BgpMessageParsingError, BgpParsingContext};
use netgauze_bgp_pkt::BgpMessage;
use netgauze_iana::address_family::{AddressFamily, AddressType};
use netgauze_parse_utils::reader::SliceReader;
use netgauze_parse_utils::traits::ParseFromWithOneInput;
use netgauze_parse_utils::WritablePdu;

/// The IPv6 next hop to forward to: the global one, or the link-local one when the global
/// field is empty (`::`), as unnumbered peers send it (RFC 2545 §3, RFC 8950).
fn usable_v6(global: Ipv6Addr, link_local: Option<Ipv6Addr>) -> IpAddr {
    match link_local {
        Some(ll) if global.is_unspecified() => IpAddr::V6(ll),
        _ => IpAddr::V6(global),
    }
}

/// RFC 4271 maximum message size; RFC 8654 raises it to 65535 once negotiated.
pub const MAX_MESSAGE: usize = 4096;
pub const MAX_EXTENDED_MESSAGE: usize = 65535;
pub const HEADER_LEN: usize = 19;
/// RFC 6793 AS_TRANS, sent in the 2-octet field when the local AS does not fit.
pub const AS_TRANS: u16 = 23456;

/// An address family Sepal speaks (unicast only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(net: &IpNet) -> Family {
        match net {
            IpNet::V4(_) => Family::Ipv4,
            IpNet::V6(_) => Family::Ipv6,
        }
    }
    fn address_type(self) -> AddressType {
        match self {
            Family::Ipv4 => AddressType::Ipv4Unicast,
            Family::Ipv6 => AddressType::Ipv6Unicast,
        }
    }
    fn from_address_type(t: AddressType) -> Option<Family> {
        match t {
            AddressType::Ipv4Unicast => Some(Family::Ipv4),
            AddressType::Ipv6Unicast => Some(Family::Ipv6),
            _ => None,
        }
    }
}

/// A NOTIFICATION as code, subcode and data (RFC 4271 §4.5).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

impl Notification {
    pub fn new(code: u8, subcode: u8, data: impl Into<Vec<u8>>) -> Self {
        Notification {
            code,
            subcode,
            data: data.into(),
        }
    }
}

impl std::fmt::Display for Notification {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match (self.code, self.subcode) {
            (1, 1) => "Message Header Error / Connection Not Synchronized",
            (1, 2) => "Message Header Error / Bad Message Length",
            (1, 3) => "Message Header Error / Bad Message Type",
            (1, _) => "Message Header Error",
            (2, 1) => "OPEN Message Error / Unsupported Version Number",
            (2, 2) => "OPEN Message Error / Bad Peer AS",
            (2, 3) => "OPEN Message Error / Bad BGP Identifier",
            (2, 4) => "OPEN Message Error / Unsupported Optional Parameter",
            (2, 6) => "OPEN Message Error / Unacceptable Hold Time",
            (2, 7) => "OPEN Message Error / Unsupported Capability",
            (2, _) => "OPEN Message Error",
            (3, 1) => "UPDATE Message Error / Malformed Attribute List",
            (3, 2) => "UPDATE Message Error / Unrecognized Well-known Attribute",
            (3, 3) => "UPDATE Message Error / Missing Well-known Attribute",
            (3, 4) => "UPDATE Message Error / Attribute Flags Error",
            (3, 5) => "UPDATE Message Error / Attribute Length Error",
            (3, 6) => "UPDATE Message Error / Invalid ORIGIN Attribute",
            (3, 8) => "UPDATE Message Error / Invalid NEXT_HOP Attribute",
            (3, 9) => "UPDATE Message Error / Optional Attribute Error",
            (3, 10) => "UPDATE Message Error / Invalid Network Field",
            (3, 11) => "UPDATE Message Error / Malformed AS_PATH",
            (3, _) => "UPDATE Message Error",
            (4, _) => "Hold Timer Expired",
            (5, _) => "Finite State Machine Error",
            (6, 1) => "Cease / Maximum Number of Prefixes Reached",
            (6, 2) => "Cease / Administrative Shutdown",
            (6, 3) => "Cease / Peer De-configured",
            (6, 4) => "Cease / Administrative Reset",
            (6, 5) => "Cease / Connection Rejected",
            (6, 6) => "Cease / Other Configuration Change",
            (6, 7) => "Cease / Connection Collision Resolution",
            (6, 8) => "Cease / Out of Resources",
            (6, _) => "Cease",
            (7, _) => "ROUTE-REFRESH Message Error",
            _ => "unknown",
        };
        write!(f, "{name} ({}/{})", self.code, self.subcode)
    }
}

/// Graceful restart capability (RFC 4724).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct GracefulRestart {
    /// R bit: the sender has restarted.
    pub restarting: bool,
    pub restart_time: u16,
    /// Families with the F bit (forwarding state preserved).
    pub families: Vec<(Family, bool)>,
}

/// The capabilities Sepal understands, as advertised by one side.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Capabilities {
    pub families: Vec<Family>,
    pub asn4: Option<u32>,
    pub route_refresh: bool,
    pub graceful_restart: Option<GracefulRestart>,
    /// RFC 8950: IPv4 unicast NLRI with an IPv6 next hop.
    pub extended_next_hop_v4: bool,
    pub extended_message: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Open {
    pub version: u8,
    /// The 4-octet AS when advertised, else the 2-octet field.
    pub asn: u32,
    pub hold_time: u16,
    pub router_id: Ipv4Addr,
    pub caps: Capabilities,
    /// Whether a multiprotocol capability was present at all (RFC 4760: none means IPv4 only).
    pub has_mp: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum OriginKind {
    Igp = 0,
    Egp = 1,
    Incomplete = 2,
}

/// AS_PATH segment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Segment {
    Sequence(Vec<u32>),
    Set(Vec<u32>),
}

/// Path attributes in Sepal's terms (next hops are kept per route, not here).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Attrs {
    pub origin: OriginKind,
    pub as_path: Vec<Segment>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub communities: Vec<u32>,
    pub originator_id: Option<Ipv4Addr>,
    pub cluster_list: Vec<Ipv4Addr>,
    pub atomic_aggregate: bool,
    /// RFC 8092 large communities: (global administrator, local data 1, local data 2).
    pub large_communities: Vec<(u32, u32, u32)>,
    /// Optional transitive attributes carried on as received (extended communities, and those
    /// Sepal does not know), in the order they came.
    pub carried: Vec<CarriedAttr>,
}

/// An optional transitive path attribute Sepal passes on without interpreting it (RFC 4271 §5).
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct CarriedAttr {
    pub code: u8,
    /// Set on every attribute Sepal does not recognize (RFC 4271 §5: "the Partial bit ... is
    /// set to 1"), kept as received on those it does (extended communities).
    pub partial: bool,
    #[serde(serialize_with = "hex")]
    pub value: Box<[u8]>,
}

/// Extended communities (RFC 4360) and IPv6 address specific ones (RFC 5701): carried, not read.
pub const EXTENDED_COMMUNITIES: u8 = 16;
pub const IPV6_EXTENDED_COMMUNITIES: u8 = 25;

fn hex<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!(
        "{}",
        v.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

impl CarriedAttr {
    /// The attribute as sent across an AS boundary: extended communities lose their
    /// non-transitive members (RFC 4360 §6, RFC 5701 §2), the attribute goes when none is left.
    pub fn across_as_boundary(&self) -> Option<CarriedAttr> {
        let size = match self.code {
            EXTENDED_COMMUNITIES => 8,
            IPV6_EXTENDED_COMMUNITIES => 20,
            _ => return Some(self.clone()),
        };
        // The type's high octet: bit 0x40 set means non-transitive.
        let kept: Vec<u8> = self
            .value
            .chunks(size)
            .filter(|c| c.len() == size && c[0] & 0x40 == 0)
            .flatten()
            .copied()
            .collect();
        (!kept.is_empty()).then(|| CarriedAttr {
            value: kept.into(),
            ..self.clone()
        })
    }
}

impl Default for Attrs {
    fn default() -> Self {
        Attrs {
            origin: OriginKind::Igp,
            as_path: Vec::new(),
            med: None,
            local_pref: None,
            communities: Vec::new(),
            originator_id: None,
            cluster_list: Vec::new(),
            atomic_aggregate: false,
            large_communities: Vec::new(),
            carried: Vec::new(),
        }
    }
}

impl Attrs {
    /// RFC 4271 §9.1.2.2 a: a SET counts as one.
    pub fn as_path_len(&self) -> usize {
        self.as_path
            .iter()
            .map(|s| match s {
                Segment::Sequence(v) => v.len(),
                Segment::Set(v) => usize::from(!v.is_empty()),
            })
            .sum()
    }
    pub fn contains_as(&self, asn: u32) -> bool {
        self.as_path.iter().any(|s| match s {
            Segment::Sequence(v) | Segment::Set(v) => v.contains(&asn),
        })
    }
    /// The neighbouring AS: first AS of the first SEQUENCE.
    pub fn neighbor_as(&self) -> Option<u32> {
        match self.as_path.first() {
            Some(Segment::Sequence(v)) => v.first().copied(),
            _ => None,
        }
    }
    pub fn prepend(&mut self, asn: u32) {
        match self.as_path.first_mut() {
            Some(Segment::Sequence(v)) if v.len() < 255 => v.insert(0, asn),
            _ => self.as_path.insert(0, Segment::Sequence(vec![asn])),
        }
    }
}

/// A decoded UPDATE: what was withdrawn, what was announced with which attributes.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Update {
    pub withdrawn: Vec<IpNet>,
    pub announced: Vec<IpNet>,
    pub attrs: Option<Attrs>,
    /// NEXT_HOP for IPv4 NLRI in the body or MP_REACH (IPv4 or, RFC 8950, IPv6).
    pub next_hop_v4: Option<IpAddr>,
    /// Global IPv6 next hop from MP_REACH (IPv4-mapped kept as given; the consumer decides).
    pub next_hop_v6: Option<IpAddr>,
    pub end_of_rib: Option<Family>,
    /// RFC 7606: the attributes were malformed in a way that turns announcements into withdrawals.
    pub treat_as_withdraw: Option<Notification>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Message {
    Open(Open),
    Update(Box<Update>),
    Notification(Notification),
    Keepalive,
    RouteRefresh(Family),
}

/// What the decoder needs to know about the session.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeCtx {
    pub asn4: bool,
    pub extended_message: bool,
}

/// Pulls one message off the front of `buf`: `Ok(None)` when more bytes are needed,
/// `Ok(Some((msg, used)))` on success, `Err(notification)` when the session must be reset.
pub fn decode(buf: &[u8], ctx: DecodeCtx) -> Result<Option<(Message, usize)>, Notification> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    if buf[..16].iter().any(|b| *b != 0xff) {
        return Err(Notification::new(1, 1, vec![]));
    }
    let len = u16::from_be_bytes([buf[16], buf[17]]) as usize;
    let ty = buf[18];
    let max = if ctx.extended_message && ty != 1 && ty != 4 {
        MAX_EXTENDED_MESSAGE
    } else {
        MAX_MESSAGE
    };
    // RFC 4271 §6.1: per-type minimum lengths, data = the erroneous length field.
    let min = match ty {
        1 => 29,
        2 => 23,
        3 => 21,
        4 => 19,
        5 => 23,
        _ => return Err(Notification::new(1, 3, vec![ty])),
    };
    if len < min || len > max || (ty == 4 && len != 19) {
        return Err(Notification::new(1, 2, buf[16..18].to_vec()));
    }
    if buf.len() < len {
        return Ok(None);
    }
    let frame = &buf[..len];
    let msg = match ty {
        1 => Message::Open(decode_open(frame)?),
        2 => Message::Update(Box::new(decode_update(frame, ctx)?)),
        3 => Message::Notification(Notification::new(frame[19], frame[20], &frame[21..])),
        4 => Message::Keepalive,
        _ => {
            // ROUTE-REFRESH: AFI(2) reserved(1) SAFI(1); unknown families are ignored by the caller.
            if len != 23 {
                return Err(Notification::new(7, 1, frame.to_vec()));
            }
            let afi = u16::from_be_bytes([frame[19], frame[20]]);
            let safi = frame[22];
            match (afi, safi) {
                (1, 1) => Message::RouteRefresh(Family::Ipv4),
                (2, 1) => Message::RouteRefresh(Family::Ipv6),
                _ => return Ok(Some((Message::Keepalive, len))),
            }
        }
    };
    Ok(Some((msg, len)))
}

fn parse_frame(
    frame: &[u8],
    ctx: &mut BgpParsingContext,
) -> Result<BgpMessage, BgpMessageParsingError> {
    let mut reader = SliceReader::new(frame);
    BgpMessage::parse(&mut reader, ctx)
}

fn decode_open(frame: &[u8]) -> Result<Open, Notification> {
    // Fields checked here first so the data of the NOTIFICATION is exact.
    let version = frame[19];
    if version != 4 {
        return Err(Notification::new(2, 1, 4u16.to_be_bytes().to_vec()));
    }
    let hold = u16::from_be_bytes([frame[22], frame[23]]);
    if hold == 1 || hold == 2 {
        return Err(Notification::new(2, 6, vec![]));
    }
    let id = Ipv4Addr::new(frame[24], frame[25], frame[26], frame[27]);
    if id.is_unspecified() || id.is_broadcast() || id.is_multicast() {
        return Err(Notification::new(2, 3, id.octets().to_vec()));
    }
    // Unknown optional parameters (only type 2 exists) get subcode 4.
    let opt_len = frame[28] as usize;
    if 29 + opt_len != frame.len() {
        return Err(Notification::new(2, 0, vec![]));
    }
    let mut p = 29;
    while p + 2 <= frame.len() {
        let (t, l) = (frame[p], frame[p + 1] as usize);
        if t != 2 {
            return Err(Notification::new(2, 4, vec![]));
        }
        p += 2 + l;
    }
    if p != frame.len() {
        return Err(Notification::new(2, 0, vec![]));
    }
    let mut ctx = BgpParsingContext::new(
        true,
        HashMap::new(),
        HashMap::new(),
        false,
        false,
        false,
        false,
    );
    let open = match parse_frame(frame, &mut ctx) {
        Ok(BgpMessage::Open(o)) => o,
        Ok(_) => return Err(Notification::new(1, 3, vec![])),
        Err(e) => return Err(notification_from_parse(e)),
    };
    let mut caps = Capabilities::default();
    let mut has_mp = false;
    for cap in open.capabilities() {
        match cap {
            BgpCapability::MultiProtocolExtensions(mp) => {
                has_mp = true;
                if let Some(f) = Family::from_address_type(mp.address_type()) {
                    if !caps.families.contains(&f) {
                        caps.families.push(f);
                    }
                }
            }
            BgpCapability::FourOctetAs(a) => caps.asn4 = Some(a.asn4()),
            BgpCapability::RouteRefresh | BgpCapability::EnhancedRouteRefresh => {
                caps.route_refresh = true
            }
            BgpCapability::GracefulRestartCapability(gr) => {
                caps.graceful_restart = Some(GracefulRestart {
                    restarting: gr.restart(),
                    restart_time: gr.time(),
                    families: gr
                        .address_families()
                        .iter()
                        .filter_map(|f| {
                            Family::from_address_type(f.address_type())
                                .map(|t| (t, f.forwarding_state()))
                        })
                        .collect(),
                })
            }
            BgpCapability::ExtendedNextHopEncoding(e) => {
                caps.extended_next_hop_v4 |= e.encodings().iter().any(|x| {
                    x.address_type() == AddressType::Ipv4Unicast
                        && x.next_hop_afi() == AddressFamily::IPv6
                })
            }
            BgpCapability::ExtendedMessage => caps.extended_message = true,
            _ => {}
        }
    }
    if !has_mp {
        caps.families.push(Family::Ipv4);
    }
    let asn = caps.asn4.unwrap_or(open.my_as() as u32);
    Ok(Open {
        version,
        asn,
        hold_time: hold,
        router_id: id,
        caps,
        has_mp,
    })
}

/// Maps netgauze's parse errors to the exact RFC 4271 code/subcode.
fn notification_from_parse(e: BgpMessageParsingError) -> Notification {
    match e {
        BgpMessageParsingError::BgpUpdateMessageParsingError(u) => match u {
            BgpUpdateMessageParsingError::PathAttributeError(a) => attr_notification(&a),
            BgpUpdateMessageParsingError::Parse(_) => Notification::new(3, 1, vec![]),
            // Anything else in the UPDATE body is in the NLRI / withdrawn fields.
            _ => Notification::new(3, 10, vec![]),
        },
        other => from_netgauze(BgpNotificationMessage::from(other)),
    }
}

fn attr_notification(a: &PathAttributeParsingError) -> Notification {
    use PathAttributeParsingError as P;
    match a {
        P::OriginError(_) => Notification::new(3, 6, vec![]),
        P::AsPathError(_) => Notification::new(3, 11, vec![]),
        P::NextHopError(_) => Notification::new(3, 8, vec![]),
        P::InvalidPathAttribute { .. } => Notification::new(3, 4, vec![]),
        P::Parse(_) => Notification::new(3, 1, vec![]),
        P::MpReachErrorError(_) | P::MpUnreachErrorError(_) => Notification::new(3, 9, vec![]),
        _ => Notification::new(3, 9, vec![]),
    }
}

/// RFC 7606 §7: what to do with a malformed attribute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rfc7606 {
    Discard,
    TreatAsWithdraw,
    Reset,
}

fn rfc7606_action(a: &PathAttributeParsingError) -> Rfc7606 {
    use PathAttributeParsingError as P;
    match a {
        // §7.11 / §5.3: without parseable NLRI nothing can be withdrawn safely.
        P::MpReachErrorError(_) | P::MpUnreachErrorError(_) => Rfc7606::Reset,
        // §7.6/7.7 ATOMIC_AGGREGATE and AGGREGATOR, §7.12 unknown: attribute discard.
        P::AtomicAggregateError(_)
        | P::AggregatorError(_)
        | P::UnknownAttributeError(_)
        | P::AigpError(_) => Rfc7606::Discard,
        P::BgpLsError(_) | P::SegmentIdentifierParsingError(_) | P::OnlyToCustomerError(_) => {
            Rfc7606::Discard
        }
        // §7.1-7.5, 7.8-7.10: ORIGIN, AS_PATH, NEXT_HOP, MED, LOCAL_PREF, communities, ORIGINATOR_ID, CLUSTER_LIST.
        P::Parse(_) => Rfc7606::Reset,
        _ => Rfc7606::TreatAsWithdraw,
    }
}

fn decode_update(frame: &[u8], ctx: DecodeCtx) -> Result<Update, Notification> {
    // RFC 4271 §6.3: withdrawn + attribute lengths must fit the message (Malformed Attribute List).
    let wl = u16::from_be_bytes([frame[19], frame[20]]) as usize;
    if 23 + wl > frame.len() {
        return Err(Notification::new(3, 1, vec![]));
    }
    let al = u16::from_be_bytes([frame[21 + wl], frame[22 + wl]]) as usize;
    if 23 + wl + al > frame.len() {
        return Err(Notification::new(3, 1, vec![]));
    }
    let mut pctx = BgpParsingContext::new(
        ctx.asn4,
        HashMap::new(),
        HashMap::new(),
        false,
        false,
        false,
        false,
    );
    let upd = match parse_frame(frame, &mut pctx) {
        Ok(BgpMessage::Update(u)) => u,
        Ok(_) => return Err(Notification::new(1, 3, vec![])),
        Err(e) => return Err(notification_from_parse(e)),
    };
    let errors = pctx.reset_parsing_errors();
    let mut out = Update::default();
    for e in errors.path_attr_errors() {
        match rfc7606_action(e) {
            Rfc7606::Reset => return Err(attr_notification(e)),
            Rfc7606::TreatAsWithdraw => {
                if out.treat_as_withdraw.is_none() {
                    out.treat_as_withdraw = Some(attr_notification(e));
                }
            }
            Rfc7606::Discard => {}
        }
    }
    if let Some(t) = upd.end_of_rib() {
        out.end_of_rib = Family::from_address_type(t);
        return Ok(out);
    }
    out.withdrawn = upd
        .withdraw_routes()
        .iter()
        .map(|r| IpNet::V4(r.network().address()))
        .collect();
    out.announced = upd
        .nlri()
        .iter()
        .map(|r| IpNet::V4(r.network().address()))
        .collect();
    let mut attrs = Attrs::default();
    let (mut has_origin, mut has_path, mut seen_mp_reach, mut seen_mp_unreach) =
        (false, false, false, false);
    let mut as4_path: Option<Vec<Segment>> = None;
    for pa in upd.path_attributes() {
        match pa.value() {
            PathAttributeValue::Origin(o) => {
                has_origin = true;
                attrs.origin = match o {
                    Origin::IGP => OriginKind::Igp,
                    Origin::EGP => OriginKind::Egp,
                    Origin::Incomplete => OriginKind::Incomplete,
                }
            }
            PathAttributeValue::AsPath(p) => {
                has_path = true;
                attrs.as_path = convert_path(p);
            }
            PathAttributeValue::As4Path(p) => {
                as4_path = Some(
                    p.segments()
                        .iter()
                        .map(|s| seg(s.segment_type(), s.as_numbers().to_vec()))
                        .collect(),
                )
            }
            PathAttributeValue::NextHop(nh) => out.next_hop_v4 = Some(IpAddr::V4(nh.next_hop())),
            PathAttributeValue::MultiExitDiscriminator(m) => attrs.med = Some(m.metric()),
            PathAttributeValue::LocalPreference(l) => attrs.local_pref = Some(l.metric()),
            PathAttributeValue::AtomicAggregate(_) => attrs.atomic_aggregate = true,
            PathAttributeValue::Communities(c) => {
                attrs.communities = c.communities().iter().map(|c| c.value()).collect()
            }
            PathAttributeValue::LargeCommunities(c) => {
                attrs.large_communities = c
                    .communities()
                    .iter()
                    .map(|c| (c.global_admin(), c.local_data1(), c.local_data2()))
                    .collect()
            }
            PathAttributeValue::ExtendedCommunities(_)
            | PathAttributeValue::ExtendedCommunitiesIpv6(_)
            | PathAttributeValue::OnlyToCustomer(_)
            | PathAttributeValue::PrefixSegmentIdentifier(_)
            | PathAttributeValue::UnknownAttribute(_)
                if pa.optional() && pa.transitive() =>
            {
                attrs.carried.extend(carried(pa));
            }
            PathAttributeValue::Originator(o) => attrs.originator_id = Some(o.id()),
            PathAttributeValue::ClusterList(c) => {
                attrs.cluster_list = c.cluster_list().iter().map(|c| c.id()).collect()
            }
            PathAttributeValue::MpReach(r) => {
                // RFC 7606 §3.g: more than one MP_REACH/MP_UNREACH resets the session.
                if seen_mp_reach {
                    return Err(Notification::new(3, 1, vec![]));
                }
                seen_mp_reach = true;
                match r {
                    MpReach::Ipv4Unicast {
                        next_hop,
                        next_hop_local,
                        nlri,
                    } => {
                        out.next_hop_v4 = Some(match next_hop {
                            IpAddr::V6(g) => usable_v6(*g, *next_hop_local),
                            v4 => *v4,
                        });
                        out.announced
                            .extend(nlri.iter().map(|r| IpNet::V4(r.network().address())));
                    }
                    MpReach::Ipv6Unicast {
                        next_hop_global,
                        next_hop_local,
                        nlri,
                    } => {
                        out.next_hop_v6 = Some(usable_v6(*next_hop_global, *next_hop_local));
                        out.announced
                            .extend(nlri.iter().map(|r| IpNet::V6(r.network().address())));
                    }
                    _ => {}
                }
            }
            PathAttributeValue::MpUnreach(u) => {
                if seen_mp_unreach {
                    return Err(Notification::new(3, 1, vec![]));
                }
                seen_mp_unreach = true;
                match u {
                    MpUnreach::Ipv4Unicast { nlri } => out
                        .withdrawn
                        .extend(nlri.iter().map(|r| IpNet::V4(r.network().address()))),
                    MpUnreach::Ipv6Unicast { nlri } => out
                        .withdrawn
                        .extend(nlri.iter().map(|r| IpNet::V6(r.network().address()))),
                    _ => {}
                }
            }
            _ => {}
        }
    }
    // RFC 6793 §4.2.3: merge AS4_PATH into an AS_PATH carrying AS_TRANS.
    if let (false, Some(p4)) = (ctx.asn4, as4_path) {
        let n2 = attrs.as_path_len();
        let n4: usize = p4
            .iter()
            .map(|s| match s {
                Segment::Sequence(v) => v.len(),
                Segment::Set(_) => 1,
            })
            .sum();
        if n4 <= n2 {
            let mut keep = n2 - n4;
            let mut merged = Vec::new();
            for s in &attrs.as_path {
                if keep == 0 {
                    break;
                }
                match s {
                    Segment::Sequence(v) => {
                        let take = keep.min(v.len());
                        merged.push(Segment::Sequence(v[..take].to_vec()));
                        keep -= take;
                    }
                    Segment::Set(v) => {
                        merged.push(Segment::Set(v.clone()));
                        keep -= 1;
                    }
                }
            }
            merged.extend(p4);
            attrs.as_path = merged;
        }
    }
    if !out.announced.is_empty() {
        // RFC 7606 §3.d: a missing well-known attribute is treat-as-withdraw.
        let has_v4 = out.announced.iter().any(|n| matches!(n, IpNet::V4(_)));
        if !has_origin || !has_path || (has_v4 && out.next_hop_v4.is_none()) {
            let code = if !has_origin {
                1
            } else if !has_path {
                2
            } else {
                3
            };
            out.treat_as_withdraw
                .get_or_insert(Notification::new(3, 3, vec![code]));
        }
    }
    if out.treat_as_withdraw.is_some() {
        out.withdrawn.append(&mut out.announced);
    } else if !out.announced.is_empty() {
        out.attrs = Some(attrs);
    }
    Ok(out)
}

fn seg(t: AsPathSegmentType, v: Vec<u32>) -> Segment {
    match t {
        AsPathSegmentType::AsSet => Segment::Set(v),
        AsPathSegmentType::AsSequence => Segment::Sequence(v),
    }
}

fn convert_path(p: &AsPath) -> Vec<Segment> {
    match p {
        AsPath::As2PathSegments(s) => s
            .iter()
            .map(|s| {
                seg(
                    s.segment_type(),
                    s.as_numbers().iter().map(|a| *a as u32).collect(),
                )
            })
            .collect(),
        AsPath::As4PathSegments(s) => s
            .iter()
            .map(|s| seg(s.segment_type(), s.as_numbers().to_vec()))
            .collect(),
    }
}

fn from_netgauze(n: BgpNotificationMessage) -> Notification {
    use BgpNotificationMessage as B;
    let (code, sub, data): (u8, u8, Box<[u8]>) = match n {
        B::MessageHeaderError(e) => match e {
            MessageHeaderError::Unspecific { value } => (1, 0, value),
            MessageHeaderError::ConnectionNotSynchronized { value } => (1, 1, value),
            MessageHeaderError::BadMessageLength { value } => (1, 2, value),
            MessageHeaderError::BadMessageType { value } => (1, 3, value),
        },
        B::OpenMessageError(e) => match e {
            OpenMessageError::Unspecific { value } => (2, 0, value),
            OpenMessageError::UnsupportedVersionNumber { value } => (2, 1, value),
            OpenMessageError::BadPeerAs { value } => (2, 2, value),
            OpenMessageError::BadBgpIdentifier { value } => (2, 3, value),
            OpenMessageError::UnsupportedOptionalParameter { value } => (2, 4, value),
            OpenMessageError::UnacceptableHoldTime { value } => (2, 6, value),
            OpenMessageError::UnsupportedCapability { value } => (2, 7, value),
            OpenMessageError::RoleMismatch { value } => (2, 11, value),
        },
        B::UpdateMessageError(e) => match e {
            UpdateMessageError::Unspecific { value } => (3, 0, value),
            UpdateMessageError::MalformedAttributeList { value } => (3, 1, value),
            UpdateMessageError::UnrecognizedWellKnownAttribute { value } => (3, 2, value),
            UpdateMessageError::MissingWellKnownAttribute { value } => (3, 3, value),
            UpdateMessageError::AttributeFlagsError { value } => (3, 4, value),
            UpdateMessageError::AttributeLengthError { value } => (3, 5, value),
            UpdateMessageError::InvalidOriginAttribute { value } => (3, 6, value),
            UpdateMessageError::InvalidNextHopAttribute { value } => (3, 8, value),
            UpdateMessageError::OptionalAttributeError { value } => (3, 9, value),
            UpdateMessageError::InvalidNetworkField { value } => (3, 10, value),
            UpdateMessageError::MalformedAsPath { value } => (3, 11, value),
        },
        B::HoldTimerExpiredError(HoldTimerExpiredError::Unspecific { sub_code, value }) => {
            (4, sub_code, value)
        }
        B::FiniteStateMachineError(e) => match e {
            FiniteStateMachineError::Unspecific { value } => (5, 0, value),
            FiniteStateMachineError::ReceiveUnexpectedMessageInOpenSentState { value } => {
                (5, 1, value)
            }
            FiniteStateMachineError::ReceiveUnexpectedMessageInOpenConfirmState { value } => {
                (5, 2, value)
            }
            FiniteStateMachineError::ReceiveUnexpectedMessageInEstablishedState { value } => {
                (5, 3, value)
            }
        },
        B::CeaseError(e) => match e {
            CeaseError::MaximumNumberOfPrefixesReached { value } => (6, 1, value),
            CeaseError::AdministrativeShutdown { value } => (6, 2, value),
            CeaseError::PeerDeConfigured { value } => (6, 3, value),
            CeaseError::AdministrativeReset { value } => (6, 4, value),
            CeaseError::ConnectionRejected { value } => (6, 5, value),
            CeaseError::OtherConfigurationChange { value } => (6, 6, value),
            CeaseError::ConnectionCollisionResolution { value } => (6, 7, value),
            CeaseError::OutOfResources { value } => (6, 8, value),
            CeaseError::HardReset { value } => (6, 9, value),
            CeaseError::BfdDown { value } => (6, 10, value),
        },
        B::RouteRefreshError(RouteRefreshError::InvalidMessageLength { value }) => (7, 1, value),
    };
    Notification::new(code, sub, data.into_vec())
}

// ---- encoding ----

fn header(ty: u8, body_len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + body_len);
    v.extend_from_slice(&[0xff; 16]);
    v.extend_from_slice(&((HEADER_LEN + body_len) as u16).to_be_bytes());
    v.push(ty);
    v
}

pub fn encode_keepalive() -> Vec<u8> {
    header(4, 0)
}

pub fn encode_notification(n: &Notification) -> Vec<u8> {
    // Data is cut so the message stays within 4096 bytes.
    let data = &n.data[..n.data.len().min(MAX_MESSAGE - HEADER_LEN - 2)];
    let mut v = header(3, 2 + data.len());
    v.push(n.code);
    v.push(n.subcode);
    v.extend_from_slice(data);
    v
}

pub fn encode_route_refresh(f: Family) -> Vec<u8> {
    let mut v = header(5, 4);
    v.extend_from_slice(&[0, if f == Family::Ipv4 { 1 } else { 2 }, 0, 1]);
    v
}

fn write_msg(m: &BgpMessage) -> Vec<u8> {
    let mut v = Vec::with_capacity(m.len());
    // Writing into a Vec only fails on a length overflow, which the packer prevents.
    if m.write(&mut v).is_err() {
        v.clear();
    }
    v
}

pub fn encode_open(asn: u32, hold_time: u16, router_id: Ipv4Addr, caps: &Capabilities) -> Vec<u8> {
    let mut c = Vec::new();
    for f in &caps.families {
        c.push(BgpCapability::MultiProtocolExtensions(
            MultiProtocolExtensionsCapability::new(f.address_type()),
        ));
    }
    if caps.route_refresh {
        c.push(BgpCapability::RouteRefresh);
    }
    if caps.extended_next_hop_v4 {
        c.push(BgpCapability::ExtendedNextHopEncoding(
            ExtendedNextHopEncodingCapability::new(vec![ExtendedNextHopEncoding::new(
                AddressType::Ipv4Unicast,
                AddressFamily::IPv6,
            )]),
        ));
    }
    if let Some(gr) = &caps.graceful_restart {
        c.push(BgpCapability::GracefulRestartCapability(
            GracefulRestartCapability::new(
                gr.restarting,
                false,
                gr.restart_time.min(4095),
                gr.families
                    .iter()
                    .map(|(f, fwd)| GracefulRestartAddressFamily::new(*fwd, f.address_type()))
                    .collect::<Vec<_>>(),
            ),
        ));
    }
    c.push(BgpCapability::FourOctetAs(FourOctetAsCapability::new(asn)));
    let my_as = u16::try_from(asn).unwrap_or(AS_TRANS);
    let open = BgpOpenMessage::new(
        my_as,
        hold_time,
        router_id,
        vec![BgpOpenMessageParameter::new_capabilities(c)],
    );
    write_msg(&BgpMessage::Open(open))
}

/// An outgoing set of routes sharing attributes and a next hop.
#[derive(Debug, Clone)]
pub struct OutRoutes<'a> {
    pub attrs: &'a Attrs,
    pub next_hop: IpAddr,
    /// Link-local next hop sent with IPv6 routes (RFC 2545), if any.
    pub next_hop_local: Option<Ipv6Addr>,
    pub prefixes: &'a [IpNet],
}

/// The raw form of an optional transitive attribute to carry on. Besides extended communities,
/// this takes the attributes Sepal does not act on even where the parser knows them (RFC 9234's
/// ONLY_TO_CUSTOMER, RFC 8669's prefix SID): for Sepal they are unrecognized, so Partial is set.
/// AGGREGATOR is not carried: its length depends on the session's AS number size.
fn carried(pa: &PathAttribute) -> Option<CarriedAttr> {
    let mut raw = Vec::new();
    pa.write(&mut raw).ok()?;
    let flags = *raw.first()?;
    let code = *raw.get(1)?;
    let start = if flags & 0x10 != 0 { 4 } else { 3 };
    let recognized = matches!(code, EXTENDED_COMMUNITIES | IPV6_EXTENDED_COMMUNITIES);
    Some(CarriedAttr {
        code,
        partial: pa.partial() || !recognized,
        value: raw.get(start..)?.into(),
    })
}

/// Orders attributes by type code (RFC 4271 §5: "SHOULD ... in ascending order").
fn sort_attrs(v: &mut [PathAttribute]) {
    v.sort_by_key(|a| a.path_attribute_type().map(u8::from).unwrap_or_else(|c| c));
}

/// An optional transitive list attribute (communities): extended length, since a long list
/// passes 255 bytes.
fn list_attr(v: PathAttributeValue) -> Option<PathAttribute> {
    PathAttribute::from(true, true, false, true, v).ok()
}

fn attr(optional: bool, transitive: bool, v: PathAttributeValue) -> Option<PathAttribute> {
    PathAttribute::from(optional, transitive, false, false, v).ok()
}

fn base_attrs(a: &Attrs, asn4: bool) -> Vec<PathAttribute> {
    let mut v = Vec::new();
    let origin = match a.origin {
        OriginKind::Igp => Origin::IGP,
        OriginKind::Egp => Origin::EGP,
        OriginKind::Incomplete => Origin::Incomplete,
    };
    v.extend(attr(false, true, PathAttributeValue::Origin(origin)));
    let path = if asn4 {
        AsPath::As4PathSegments(
            a.as_path
                .iter()
                .map(|s| match s {
                    Segment::Sequence(x) => {
                        As4PathSegment::new(AsPathSegmentType::AsSequence, x.clone())
                    }
                    Segment::Set(x) => As4PathSegment::new(AsPathSegmentType::AsSet, x.clone()),
                })
                .collect::<Vec<_>>()
                .into(),
        )
    } else {
        let conv = |x: &Vec<u32>| {
            x.iter()
                .map(|a| u16::try_from(*a).unwrap_or(AS_TRANS))
                .collect::<Vec<_>>()
        };
        AsPath::As2PathSegments(
            a.as_path
                .iter()
                .map(|s| match s {
                    Segment::Sequence(x) => {
                        As2PathSegment::new(AsPathSegmentType::AsSequence, conv(x))
                    }
                    Segment::Set(x) => As2PathSegment::new(AsPathSegmentType::AsSet, conv(x)),
                })
                .collect::<Vec<_>>()
                .into(),
        )
    };
    // RFC 8654-less extended length for long paths.
    v.extend(PathAttribute::from(false, true, false, true, PathAttributeValue::AsPath(path)).ok());
    if let Some(m) = a.med {
        v.extend(attr(
            true,
            false,
            PathAttributeValue::MultiExitDiscriminator(MultiExitDiscriminator::new(m)),
        ));
    }
    if let Some(l) = a.local_pref {
        v.extend(attr(
            false,
            true,
            PathAttributeValue::LocalPreference(LocalPreference::new(l)),
        ));
    }
    if !a.communities.is_empty() {
        let c: Vec<Community> = a.communities.iter().map(|c| Community::new(*c)).collect();
        v.extend(list_attr(PathAttributeValue::Communities(
            Communities::new(c),
        )));
    }
    if !a.large_communities.is_empty() {
        let c: Vec<LargeCommunity> = a
            .large_communities
            .iter()
            .map(|&(g, l1, l2)| LargeCommunity::new(g, l1, l2))
            .collect();
        v.extend(list_attr(PathAttributeValue::LargeCommunities(
            LargeCommunities::new(c),
        )));
    }
    for c in &a.carried {
        v.extend(
            PathAttribute::from(
                true,
                true,
                c.partial,
                c.value.len() > 255,
                PathAttributeValue::UnknownAttribute(UnknownAttribute::new(
                    c.code,
                    c.value.clone(),
                )),
            )
            .ok(),
        );
    }
    if let Some(o) = a.originator_id {
        v.extend(attr(
            true,
            false,
            PathAttributeValue::Originator(Originator::new(o)),
        ));
    }
    if !a.cluster_list.is_empty() {
        let c: Vec<ClusterId> = a.cluster_list.iter().map(|c| ClusterId::new(*c)).collect();
        v.extend(
            PathAttribute::from(
                true,
                false,
                false,
                true,
                PathAttributeValue::ClusterList(ClusterList::new(c)),
            )
            .ok(),
        );
    }
    v
}

fn v4(n: &IpNet) -> Option<Ipv4UnicastAddress> {
    match n {
        IpNet::V4(n) => Ipv4Unicast::from_net(*n)
            .ok()
            .map(Ipv4UnicastAddress::new_no_path_id),
        IpNet::V6(_) => None,
    }
}
fn v6(n: &IpNet) -> Option<Ipv6UnicastAddress> {
    match n {
        IpNet::V6(n) => Ipv6Unicast::from_net(*n)
            .ok()
            .map(|u| Ipv6UnicastAddress::new(None, u)),
        IpNet::V4(_) => None,
    }
}

fn prefix_bytes(n: &IpNet) -> usize {
    1 + (n.prefix_len() as usize).div_ceil(8)
}

/// Encodes announcements as as few UPDATEs as fit in `max` bytes each (update packing).
/// IPv4 with an IPv4 next hop goes in the body; IPv6 and IPv4-with-IPv6-next-hop in MP_REACH_NLRI.
pub fn encode_announce(r: &OutRoutes<'_>, asn4: bool, max: usize) -> Vec<Vec<u8>> {
    let base = base_attrs(r.attrs, asn4);
    let base_len: usize = base.iter().map(|a| a.len()).sum();
    let body_v4 =
        matches!(r.next_hop, IpAddr::V4(_)) && r.prefixes.iter().all(|p| matches!(p, IpNet::V4(_)));
    // Fixed cost: header + 2 length fields + attributes + next-hop/MP_REACH overhead.
    let overhead = HEADER_LEN + 4 + base_len + if body_v4 { 7 } else { 4 + 5 + 32 + 1 };
    let budget = max.saturating_sub(overhead).max(32);
    let mut out = Vec::new();
    let mut i = 0;
    while i < r.prefixes.len() {
        let mut used = 0;
        let start = i;
        while i < r.prefixes.len() && used + prefix_bytes(&r.prefixes[i]) <= budget {
            used += prefix_bytes(&r.prefixes[i]);
            i += 1;
        }
        if i == start {
            i += 1;
        }
        let chunk = &r.prefixes[start..i];
        let mut attrs = base.clone();
        let msg = if body_v4 {
            if let IpAddr::V4(nh) = r.next_hop {
                attrs.extend(attr(
                    false,
                    true,
                    PathAttributeValue::NextHop(NextHop::new(nh)),
                ));
            }
            sort_attrs(&mut attrs);
            BgpUpdateMessage::new(
                vec![],
                attrs,
                chunk.iter().filter_map(v4).collect::<Vec<_>>(),
            )
        } else {
            let reach = if chunk.iter().all(|p| matches!(p, IpNet::V6(_))) {
                let IpAddr::V6(g) = (match r.next_hop {
                    IpAddr::V4(a) => IpAddr::V6(a.to_ipv6_mapped()),
                    x => x,
                }) else {
                    continue;
                };
                MpReach::Ipv6Unicast {
                    next_hop_global: g,
                    next_hop_local: r.next_hop_local,
                    nlri: chunk.iter().filter_map(v6).collect::<Vec<_>>().into(),
                }
            } else {
                MpReach::Ipv4Unicast {
                    next_hop: r.next_hop,
                    next_hop_local: r.next_hop_local,
                    nlri: chunk.iter().filter_map(v4).collect::<Vec<_>>().into(),
                }
            };
            attrs.extend(
                PathAttribute::from(true, false, false, true, PathAttributeValue::MpReach(reach))
                    .ok(),
            );
            sort_attrs(&mut attrs);
            BgpUpdateMessage::new(vec![], attrs, vec![])
        };
        out.push(write_msg(&BgpMessage::Update(msg)));
    }
    out
}

/// Encodes withdrawals, packed. IPv4 in the body unless `mp_v4` (then MP_UNREACH), IPv6 in MP_UNREACH.
pub fn encode_withdraw(prefixes: &[IpNet], mp_v4: bool, max: usize) -> Vec<Vec<u8>> {
    let budget = max - HEADER_LEN - 4 - 8;
    let mut out = Vec::new();
    for fam in [Family::Ipv4, Family::Ipv6] {
        let list: Vec<&IpNet> = prefixes.iter().filter(|p| Family::of(p) == fam).collect();
        for chunk in chunk_by_size(&list, budget) {
            let msg = match fam {
                Family::Ipv4 if !mp_v4 => BgpUpdateMessage::new(
                    chunk.iter().filter_map(|p| v4(p)).collect::<Vec<_>>(),
                    vec![],
                    vec![],
                ),
                Family::Ipv4 => {
                    let u = MpUnreach::Ipv4Unicast {
                        nlri: chunk
                            .iter()
                            .filter_map(|p| v4(p))
                            .collect::<Vec<_>>()
                            .into(),
                    };
                    mp_unreach_update(u)
                }
                Family::Ipv6 => {
                    let u = MpUnreach::Ipv6Unicast {
                        nlri: chunk
                            .iter()
                            .filter_map(|p| v6(p))
                            .collect::<Vec<_>>()
                            .into(),
                    };
                    mp_unreach_update(u)
                }
            };
            out.push(write_msg(&BgpMessage::Update(msg)));
        }
    }
    out
}

fn chunk_by_size<'a>(list: &[&'a IpNet], budget: usize) -> Vec<Vec<&'a IpNet>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut used = 0;
    for p in list {
        let n = prefix_bytes(p);
        if used + n > budget && !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
            used = 0;
        }
        cur.push(*p);
        used += n;
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

pub fn encode_end_of_rib(f: Family) -> Vec<u8> {
    match f {
        Family::Ipv4 => write_msg(&BgpMessage::Update(BgpUpdateMessage::new(
            vec![],
            vec![],
            vec![],
        ))),
        Family::Ipv6 => {
            let u = MpUnreach::Ipv6Unicast {
                nlri: vec![].into(),
            };
            let a =
                PathAttribute::from(true, false, false, false, PathAttributeValue::MpUnreach(u))
                    .ok();
            write_msg(&BgpMessage::Update(BgpUpdateMessage::new(
                vec![],
                a.into_iter().collect::<Vec<_>>(),
                vec![],
            )))
        }
    }
}

/// Helper for tests and the benchmark: an IPv4 prefix.
pub fn net4(a: [u8; 4], len: u8) -> IpNet {
    IpNet::V4(Ipv4Net::new(Ipv4Addr::from(a), len).unwrap_or_default())
}
pub fn net6(a: Ipv6Addr, len: u8) -> IpNet {
    IpNet::V6(Ipv6Net::new(a, len).unwrap_or_default())
}

/// An UPDATE carrying only an MP_UNREACH_NLRI attribute (optional, non-transitive, extended length).
fn mp_unreach_update(u: MpUnreach) -> BgpUpdateMessage {
    let attr = PathAttribute::from(true, false, false, true, PathAttributeValue::MpUnreach(u)).ok();
    BgpUpdateMessage::new(vec![], attr.into_iter().collect::<Vec<_>>(), vec![])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_global_next_hop_falls_back_to_the_link_local_one() {
        let ll: Ipv6Addr = "fe80::1".parse().unwrap();
        let global: Ipv6Addr = "fd00::1".parse().unwrap();
        assert_eq!(usable_v6(Ipv6Addr::UNSPECIFIED, Some(ll)), IpAddr::V6(ll));
        assert_eq!(usable_v6(global, Some(ll)), IpAddr::V6(global));
        assert_eq!(usable_v6(ll, None), IpAddr::V6(ll));
    }

    fn caps() -> Capabilities {
        Capabilities {
            families: vec![Family::Ipv4, Family::Ipv6],
            asn4: Some(4200000001),
            route_refresh: true,
            graceful_restart: Some(GracefulRestart {
                restarting: false,
                restart_time: 120,
                families: vec![(Family::Ipv4, true)],
            }),
            extended_next_hop_v4: true,
            extended_message: false,
        }
    }

    #[test]
    fn open_round_trip() {
        let b = encode_open(4200000001, 90, Ipv4Addr::new(1, 2, 3, 4), &caps());
        let (m, used) = decode(&b, DecodeCtx::default()).unwrap().unwrap();
        assert_eq!(used, b.len());
        let Message::Open(o) = m else { panic!() };
        assert_eq!(o.asn, 4200000001);
        assert_eq!(o.hold_time, 90);
        assert_eq!(o.caps, caps());
        assert_eq!(u16::from_be_bytes([b[20], b[21]]), AS_TRANS);
    }

    #[test]
    fn header_errors() {
        let mut b = encode_keepalive();
        b[0] = 0;
        assert_eq!(
            decode(&b, DecodeCtx::default()),
            Err(Notification::new(1, 1, vec![]))
        );
        let mut b = encode_keepalive();
        b[18] = 9;
        assert_eq!(
            decode(&b, DecodeCtx::default()),
            Err(Notification::new(1, 3, vec![9]))
        );
        let mut b = encode_keepalive();
        b[17] = 20;
        assert_eq!(
            decode(&b, DecodeCtx::default()),
            Err(Notification::new(1, 2, vec![0, 20]))
        );
        // An UPDATE over 4096 bytes without extended messages.
        let mut b = header(2, 5000 - 19);
        b.resize(5000, 0);
        assert_eq!(
            decode(&b, DecodeCtx::default()),
            Err(Notification::new(1, 2, 5000u16.to_be_bytes().to_vec()))
        );
        assert!(decode(&b[..10], DecodeCtx::default()).unwrap().is_none());
    }

    #[test]
    fn open_errors() {
        let good = encode_open(65001, 90, Ipv4Addr::new(1, 2, 3, 4), &caps());
        let mut b = good.clone();
        b[19] = 3;
        assert_eq!(
            decode(&b, DecodeCtx::default()),
            Err(Notification::new(2, 1, vec![0, 4]))
        );
        let mut b = good.clone();
        b[22] = 0;
        b[23] = 2;
        assert_eq!(decode(&b, DecodeCtx::default()).unwrap_err().subcode, 6);
        let mut b = good.clone();
        b[24..28].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(decode(&b, DecodeCtx::default()).unwrap_err().subcode, 3);
        let mut b = good.clone();
        b[29] = 7;
        assert_eq!(
            decode(&b, DecodeCtx::default()).unwrap_err(),
            Notification::new(2, 4, vec![])
        );
    }

    fn attrs() -> Attrs {
        Attrs {
            as_path: vec![Segment::Sequence(vec![65001, 65002])],
            local_pref: Some(100),
            communities: vec![7],
            ..Default::default()
        }
    }

    #[test]
    fn update_round_trip_and_packing() {
        let prefixes: Vec<IpNet> = (0..3000u32)
            .map(|i| net4([20, (i >> 8) as u8, i as u8, 0], 24))
            .collect();
        let a = attrs();
        let msgs = encode_announce(
            &OutRoutes {
                attrs: &a,
                next_hop: "10.0.0.1".parse().unwrap(),
                next_hop_local: None,
                prefixes: &prefixes,
            },
            true,
            MAX_MESSAGE,
        );
        assert!(msgs.len() < 20, "{} messages", msgs.len());
        let mut got = Vec::new();
        for m in &msgs {
            assert!(m.len() <= MAX_MESSAGE);
            let (Message::Update(u), _) = decode(
                m,
                DecodeCtx {
                    asn4: true,
                    extended_message: false,
                },
            )
            .unwrap()
            .unwrap() else {
                panic!()
            };
            assert_eq!(u.attrs.as_ref(), Some(&a));
            assert_eq!(u.next_hop_v4, Some("10.0.0.1".parse().unwrap()));
            got.extend(u.announced);
        }
        assert_eq!(got, prefixes);
        let v6p = vec![net6("fd00::".parse().unwrap(), 64)];
        let msgs = encode_announce(
            &OutRoutes {
                attrs: &a,
                next_hop: "fd00::1".parse().unwrap(),
                next_hop_local: None,
                prefixes: &v6p,
            },
            false,
            MAX_MESSAGE,
        );
        let (Message::Update(u), _) = decode(&msgs[0], DecodeCtx::default()).unwrap().unwrap()
        else {
            panic!()
        };
        assert_eq!(u.announced, v6p);
        assert_eq!(u.next_hop_v6, Some("fd00::1".parse().unwrap()));
        let w = encode_withdraw(&[prefixes[0], v6p[0]], false, MAX_MESSAGE);
        let mut wd = Vec::new();
        for m in &w {
            let (Message::Update(u), _) = decode(m, DecodeCtx::default()).unwrap().unwrap() else {
                panic!()
            };
            wd.extend(u.withdrawn);
        }
        assert_eq!(wd, vec![prefixes[0], v6p[0]]);
        for f in [Family::Ipv4, Family::Ipv6] {
            let (Message::Update(u), _) = decode(&encode_end_of_rib(f), DecodeCtx::default())
                .unwrap()
                .unwrap()
            else {
                panic!()
            };
            assert_eq!(u.end_of_rib, Some(f));
        }
    }

    /// An UPDATE for 10.1.2.0/24 with the well-known attributes plus `extra` (raw attributes).
    fn update_with(extra: &[u8]) -> Vec<u8> {
        let mut attrs = vec![0x40, 1, 1, 0, 0x40, 2, 4, 2, 1, 0xfd, 0xe9];
        attrs.extend_from_slice(&[0x40, 3, 4, 10, 0, 0, 1]);
        attrs.extend_from_slice(extra);
        let mut b = header(2, 4 + attrs.len() + 4);
        b.extend_from_slice(&[0, 0]);
        b.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        b.extend_from_slice(&attrs);
        b.extend_from_slice(&[24, 10, 1, 2]);
        b
    }

    #[test]
    fn optional_transitive_attributes_are_carried_and_large_communities_read() {
        let ext = [0, 2, 0xfd, 0xe9, 0, 0, 0, 100, 0x43, 0x0b, 0, 0, 0, 0, 0, 1];
        let mut extra = vec![0xc0, 16, 16];
        extra.extend_from_slice(&ext);
        // Large community 65001:1:2.
        extra.extend_from_slice(&[0xc0, 32, 12, 0, 0, 0xfd, 0xe9, 0, 0, 0, 1, 0, 0, 0, 2]);
        // Unknown optional transitive (240) and optional non-transitive (241).
        extra.extend_from_slice(&[0xc0, 240, 3, 1, 2, 3, 0x80, 241, 2, 9, 9]);
        let (Message::Update(u), _) = decode(&update_with(&extra), DecodeCtx::default())
            .unwrap()
            .unwrap()
        else {
            panic!()
        };
        let a = u.attrs.unwrap();
        assert_eq!(a.large_communities, vec![(65001, 1, 2)]);
        let codes: Vec<(u8, bool)> = a.carried.iter().map(|c| (c.code, c.partial)).collect();
        // Extended communities as received; the unknown transitive one marked Partial; the
        // unknown non-transitive one dropped (RFC 4271 §5).
        assert_eq!(codes, vec![(16, false), (240, true)]);
        assert_eq!(&*a.carried[0].value, &ext[..]);
        assert_eq!(&*a.carried[1].value, &[1, 2, 3][..]);

        // Sent on: the same attributes, 240 with flags optional|transitive|partial, in type order.
        let msgs = encode_announce(
            &OutRoutes {
                attrs: &a,
                next_hop: "10.0.0.2".parse().unwrap(),
                next_hop_local: None,
                prefixes: &[net4([10, 1, 2, 0], 24)],
            },
            false,
            MAX_MESSAGE,
        );
        let raw = &msgs[0];
        assert!(
            raw.windows(3).any(|w| w == [0xe0, 240, 3]),
            "no partial attribute 240 in {raw:02x?}"
        );
        let (Message::Update(back), _) = decode(raw, DecodeCtx::default()).unwrap().unwrap() else {
            panic!()
        };
        assert_eq!(back.attrs.as_ref(), Some(&a));

        // Across an AS boundary the non-transitive extended community (type 0x43) goes.
        let out = a.carried[0].across_as_boundary().unwrap();
        assert_eq!(&*out.value, &ext[..8]);
        let only_local = CarriedAttr {
            value: ext[8..].into(),
            ..a.carried[0].clone()
        };
        assert_eq!(only_local.across_as_boundary(), None);
        assert_eq!(
            a.carried[1].across_as_boundary().as_ref(),
            Some(&a.carried[1])
        );
    }

    #[test]
    fn missing_well_known_is_treat_as_withdraw() {
        // UPDATE with one NLRI and only ORIGIN: no AS_PATH, no NEXT_HOP.
        let mut b = header(2, 2 + 2 + 4 + 4);
        b.extend_from_slice(&[0, 0, 0, 4, 0x40, 1, 1, 0, 24, 10, 1, 2]);
        let (Message::Update(u), _) = decode(&b, DecodeCtx::default()).unwrap().unwrap() else {
            panic!()
        };
        assert!(u.announced.is_empty());
        assert_eq!(u.withdrawn, vec![net4([10, 1, 2, 0], 24)]);
        assert_eq!(
            u.treat_as_withdraw.map(|n| (n.code, n.subcode)),
            Some((3, 3))
        );
    }

    #[test]
    fn bad_attribute_lengths_reset() {
        // Total attribute length larger than the message.
        let mut b = header(2, 4);
        b.extend_from_slice(&[0, 0, 0, 40]);
        assert_eq!(
            decode(&b, DecodeCtx::default()),
            Err(Notification::new(3, 1, vec![]))
        );
    }
}
