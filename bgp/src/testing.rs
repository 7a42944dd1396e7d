// Drivers shared by the fuzz targets and the mutation test: bytes in, no sockets, no clocks.
// Not part of the stable API.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::fsm::{Action, Event, Session, SessionConfig, State};
use crate::rib::{self, ExportCtx, Path, PeerFacts, Rib, Source};
use crate::wire::{self, Capabilities, DecodeCtx, Family, Message, Open};

/// Establishes a session with a fake peer, then feeds `data` as the byte stream that follows the
/// OPEN exchange: every decoded message goes through the FSM, every UPDATE into a RIB.
/// Returns the number of messages accepted before the session ended.
pub fn feed_established_session(data: &[u8]) -> usize {
    let t = Instant::now();
    let cfg = SessionConfig {
        local_as: 65000,
        router_id: Ipv4Addr::new(10, 0, 0, 9),
        remote_as: 65001,
        passive: false,
        connect_retry: Duration::from_secs(1),
        hold_time: 90,
        keepalive: None,
        families: vec![Family::Ipv4, Family::Ipv6],
        graceful_restart: None,
        extended_next_hop: true,
    };
    let mut s = Session::new(cfg, 1);
    s.handle(t, Event::Start);
    s.handle(t, Event::TcpConnected);
    let open = Open {
        version: 4,
        asn: 65001,
        hold_time: 90,
        router_id: Ipv4Addr::new(10, 0, 0, 1),
        caps: Capabilities {
            families: vec![Family::Ipv4, Family::Ipv6],
            asn4: Some(65001),
            ..Default::default()
        },
        has_mp: true,
    };
    s.handle(t, Event::Message(Message::Open(open)));
    s.handle(t, Event::Message(Message::Keepalive));
    let peer = Arc::new(PeerFacts {
        addr: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)),
        asn: 65001,
        router_id: Ipv4Addr::new(10, 0, 0, 1),
        ibgp: false,
        rr_client: false,
    });
    let ectx = ExportCtx {
        local_as: 65000,
        router_id: Ipv4Addr::new(10, 0, 0, 9),
        cluster_id: Ipv4Addr::new(10, 0, 0, 9),
    };
    let mut rib = Rib::new(4);
    let ctx = DecodeCtx {
        asn4: data.first().is_some_and(|b| b & 1 == 1),
        extended_message: false,
    };
    let mut buf = data.get(1..).unwrap_or_default();
    let mut n = 0;
    while s.state == State::Established {
        let ev = match wire::decode(buf, ctx) {
            Ok(Some((m, used))) => {
                buf = &buf[used..];
                Event::Message(m)
            }
            Ok(None) => break,
            Err(e) => Event::DecodeError(e),
        };
        n += 1;
        for a in s.handle(t, ev) {
            if let Action::Update(u) = a {
                for w in &u.withdrawn {
                    rib.remove(*w, Source::Peer(peer.addr));
                }
                if let Some(attrs) = u.attrs {
                    if rib::looped(&ectx, &attrs) {
                        continue;
                    }
                    let attrs = Arc::new(attrs);
                    for p in &u.announced {
                        let nh = match Family::of(p) {
                            Family::Ipv4 => u.next_hop_v4,
                            Family::Ipv6 => u.next_hop_v6,
                        };
                        if let Some(nh) = nh {
                            let path = Path {
                                source: Source::Peer(peer.addr),
                                next_hop: nh,
                                attrs: attrs.clone(),
                                peer: Some(peer.clone()),
                                stale: false,
                            };
                            rib.insert(*p, path);
                        }
                    }
                }
            }
        }
    }
    n
}

/// Decodes `data` as a stream of messages (first byte: flags, bit 0 4-octet AS, bit 1 extended
/// messages) until it runs out or fails. A failure must be a NOTIFICATION we may send (codes 1-7),
/// and every decoded message must consume bytes. Returns the number of messages decoded.
pub fn decode_stream(data: &[u8]) -> usize {
    let Some((flags, mut buf)) = data.split_first() else {
        return 0;
    };
    let ctx = DecodeCtx {
        asn4: flags & 1 != 0,
        extended_message: flags & 2 != 0,
    };
    let mut n = 0;
    loop {
        match wire::decode(buf, ctx) {
            Ok(Some((_, used))) => {
                assert!(used > 0 && used <= buf.len(), "decode used {used} bytes");
                buf = &buf[used..];
                n += 1;
            }
            Ok(None) => return n,
            Err(e) => {
                assert!((1..=7).contains(&e.code), "NOTIFICATION code {e:?}");
                return n;
            }
        }
    }
}

/// Messages a peer might send, as seeds for mutation.
pub fn seeds() -> Vec<Vec<u8>> {
    use crate::wire::{Attrs, OutRoutes, Segment};
    let attrs = Attrs {
        as_path: vec![
            Segment::Sequence(vec![65001, 4200000001]),
            Segment::Set(vec![7, 8]),
        ],
        med: Some(5),
        local_pref: Some(100),
        communities: vec![1, 2],
        originator_id: Some(Ipv4Addr::new(1, 1, 1, 1)),
        cluster_list: vec![Ipv4Addr::new(2, 2, 2, 2)],
        ..Default::default()
    };
    let v4 = [
        wire::net4([10, 1, 0, 0], 16),
        wire::net4([10, 2, 3, 0], 24),
        wire::net4([192, 0, 2, 1], 32),
    ];
    let v6 = [wire::net6(
        "fd00::".parse().unwrap_or(std::net::Ipv6Addr::LOCALHOST),
        48,
    )];
    let mut out = vec![
        wire::encode_open(
            4200000001,
            90,
            Ipv4Addr::new(1, 2, 3, 4),
            &SessionConfig {
                local_as: 4200000001,
                router_id: Ipv4Addr::new(1, 2, 3, 4),
                remote_as: 1,
                passive: false,
                connect_retry: Duration::from_secs(1),
                hold_time: 90,
                keepalive: None,
                families: vec![Family::Ipv4, Family::Ipv6],
                graceful_restart: Some(wire::GracefulRestart {
                    restarting: true,
                    restart_time: 120,
                    families: vec![(Family::Ipv4, true)],
                }),
                extended_next_hop: true,
            }
            .capabilities(),
        ),
        wire::encode_keepalive(),
        wire::encode_notification(&wire::Notification::new(6, 2, b"bye".to_vec())),
        wire::encode_route_refresh(Family::Ipv6),
        wire::encode_end_of_rib(Family::Ipv6),
    ];
    for asn4 in [true, false] {
        out.extend(wire::encode_announce(
            &OutRoutes {
                attrs: &attrs,
                next_hop: "10.0.0.1"
                    .parse()
                    .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                next_hop_local: None,
                prefixes: &v4,
            },
            asn4,
            wire::MAX_MESSAGE,
        ));
        out.extend(wire::encode_announce(
            &OutRoutes {
                attrs: &attrs,
                next_hop: "fd00::1".parse().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                next_hop_local: Some(std::net::Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
                prefixes: &v6,
            },
            asn4,
            wire::MAX_MESSAGE,
        ));
    }
    out.extend(wire::encode_withdraw(
        &[v4[0], v6[0]],
        false,
        wire::MAX_MESSAGE,
    ));
    out
}
