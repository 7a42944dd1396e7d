// Two speakers in one process over 127.0.0.0/8 (no root, no namespaces): session setup,
// announce/withdraw propagation, and the NOTIFICATION a wrong remote AS gets.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use sepal_bgp::{
    Family, GracefulRestartConfig, LocalRoute, PeerConfig, RibEvent, RouteChange, Speaker,
    SpeakerConfig,
};
use tokio::sync::mpsc::UnboundedReceiver;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits for the first event `f` picks something out of (route changes are looked at one by one).
async fn wait_event<T>(
    rx: &mut UnboundedReceiver<RibEvent>,
    mut f: impl FnMut(&RibEvent) -> Option<T>,
) -> T {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let ev = rx.recv().await.expect("speaker stopped");
            if let RibEvent::Changes(v) = &ev {
                for c in v {
                    if let Some(t) = f(&RibEvent::Changes(vec![c.clone()])) {
                        return t;
                    }
                }
            } else if let Some(t) = f(&ev) {
                return t;
            }
        }
    })
    .await
    .expect("event did not arrive")
}

async fn wait_for<F: Fn(&RouteChange) -> bool>(
    rx: &mut UnboundedReceiver<RibEvent>,
    f: F,
) -> RouteChange {
    wait_event(rx, |ev| match ev {
        RibEvent::Changes(v) => v.iter().find(|c| f(c)).cloned(),
        _ => None,
    })
    .await
}

fn speaker_config(asn: u32, id: u8, listen: Vec<SocketAddr>) -> SpeakerConfig {
    SpeakerConfig {
        local_as: asn,
        router_id: Ipv4Addr::new(id, id, id, id),
        listen,
        ecmp: 4,
        cluster_id: None,
        graceful_restart: None,
    }
}

#[tokio::test]
async fn two_speakers_exchange_routes() {
    let port = free_port();
    let a_addr: IpAddr = "127.0.0.1".parse().unwrap();
    let b_addr: IpAddr = "127.0.0.2".parse().unwrap();
    let (a, _arx) = Speaker::start(speaker_config(
        4200000001,
        1,
        vec![SocketAddr::new(a_addr, port)],
    ))
    .await
    .unwrap();
    let (b, mut brx) = Speaker::start(speaker_config(65002, 2, vec![]))
        .await
        .unwrap();
    let mut pa = PeerConfig::new(b_addr, 65002);
    pa.passive = true;
    pa.hold_time = 9;
    a.add_peer(pa).unwrap();
    let mut pb = PeerConfig::new(a_addr, 4200000001);
    pb.port = port;
    pb.source = Some(b_addr);
    pb.connect_retry = Duration::from_secs(1);
    pb.hold_time = 9;
    b.add_peer(pb.clone()).unwrap();

    let n: ipnet::IpNet = "10.244.7.0/24".parse().unwrap();
    let n6: ipnet::IpNet = "fd00:244:7::/64".parse().unwrap();
    a.announce(
        n,
        LocalRoute {
            communities: vec![65000 << 16 | 7],
            ..Default::default()
        },
    )
    .unwrap();
    a.announce(
        n6,
        LocalRoute {
            next_hop: Some("fd00::1".parse().unwrap()),
            ..Default::default()
        },
    )
    .unwrap();
    let c = wait_for(&mut brx, |c| c.prefix == n && c.best.is_some()).await;
    let best = c.best.unwrap();
    assert_eq!(best.next_hops, vec![a_addr]);
    assert_eq!(
        best.attrs.as_path,
        vec![sepal_bgp::wire::Segment::Sequence(vec![4200000001])]
    );
    assert_eq!(best.attrs.communities, vec![65000 << 16 | 7]);
    // The IPv6 change may have passed while waiting for the IPv4 one: read the Loc-RIB.
    let c6 = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if let Some((_, r)) = b
                .routes()
                .await
                .unwrap()
                .into_iter()
                .find(|(p, _)| *p == n6)
            {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .unwrap();
    // eBGP next-hop-self needs an address of the route's family: over an IPv4-only session our
    // own IPv6 route keeps its explicit IPv6 next hop (an IPv4-mapped one no kernel installs).
    assert_eq!(c6.next_hops, vec!["fd00::1".parse::<IpAddr>().unwrap()]);

    let peers = b.peers().await.unwrap();
    assert_eq!(peers[0].state, sepal_bgp::fsm::State::Established);
    assert_eq!(peers[0].prefixes_accepted, 2);

    a.withdraw(n).unwrap();
    wait_for(&mut brx, |c| c.prefix == n && c.best.is_none()).await;
    assert_eq!(b.routes().await.unwrap().len(), 1);

    // Wrong AS: B now expects 65009 from A and answers A's OPEN with Bad Peer AS.
    pb.remote_as = 65009;
    b.update_peer(pb).unwrap();
    wait_for(&mut brx, |c| c.prefix == n6 && c.best.is_none()).await;
    let sent = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let p = b.peers().await.unwrap();
            if let Some(n) = p[0].last_notification_sent.clone() {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap();
    assert_eq!((sent.code, sent.subcode), (2, 2));
    assert_eq!(sent.data, 23456u16.to_be_bytes().to_vec());
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// RFC 4724 restarting side: a restarting speaker advertises nothing (not even End-of-RIB) until
/// every configured peer sent End-of-RIB; then it reports `Converged` to its consumer. Here one of
/// its two peers never comes up, so it waits until that peer is removed.
#[tokio::test]
async fn restarting_speaker_defers_advertisement_until_every_end_of_rib() {
    let port = free_port();
    let a_addr: IpAddr = "127.0.0.11".parse().unwrap();
    let b_addr: IpAddr = "127.0.0.12".parse().unwrap();
    let absent: IpAddr = "127.0.0.13".parse().unwrap();
    let mut ca = speaker_config(65001, 11, vec![SocketAddr::new(a_addr, port)]);
    ca.graceful_restart = Some(GracefulRestartConfig {
        restart_time: 600,
        restarting: true,
    });
    let (a, mut arx) = Speaker::start(ca).await.unwrap();
    let mut cb = speaker_config(65002, 12, vec![]);
    cb.graceful_restart = Some(GracefulRestartConfig {
        restart_time: 600,
        restarting: false,
    });
    let (b, mut brx) = Speaker::start(cb).await.unwrap();
    let n: ipnet::IpNet = "10.245.0.0/24".parse().unwrap();
    let from_b: ipnet::IpNet = "10.246.0.0/24".parse().unwrap();
    a.announce(n, LocalRoute::default()).unwrap();
    b.announce(from_b, LocalRoute::default()).unwrap();
    let mut pa = PeerConfig::new(b_addr, 65002);
    pa.passive = true;
    pa.hold_time = 9;
    a.add_peer(pa).unwrap();
    let mut never = PeerConfig::new(absent, 65003);
    never.passive = true;
    a.add_peer(never).unwrap();
    let mut pb = PeerConfig::new(a_addr, 65001);
    pb.port = port;
    pb.source = Some(b_addr);
    pb.connect_retry = Duration::from_secs(1);
    pb.hold_time = 9;
    b.add_peer(pb).unwrap();

    // A learns B's table and End-of-RIB, and tells its consumer; B's route reaches A's FIB stream.
    wait_for(&mut arx, |c| c.prefix == from_b && c.best.is_some()).await;
    let fam = wait_event(&mut arx, |ev| match ev {
        RibEvent::EndOfRib { peer, family } if *peer == b_addr => Some(*family),
        RibEvent::Converged => panic!("converged with a peer still down"),
        _ => None,
    })
    .await;
    assert_eq!(fam, Family::Ipv4);
    // B has had a full session with A, yet A has sent it nothing: no route, no End-of-RIB.
    let b_peer = b.peers().await.unwrap().remove(0);
    assert_eq!(b_peer.state, sepal_bgp::fsm::State::Established);
    assert_eq!(b_peer.updates_in, 0);
    assert!(b.routes().await.unwrap().iter().all(|(p, _)| *p != n));

    // The missing peer is deconfigured: A converges, advertises, and B gets the route.
    a.remove_peer(absent).unwrap();
    wait_event(&mut arx, |ev| {
        matches!(ev, RibEvent::Converged).then_some(())
    })
    .await;
    wait_for(&mut brx, |c| c.prefix == n && c.best.is_some()).await;
    wait_event(&mut brx, |ev| match ev {
        RibEvent::EndOfRib { peer, .. } if *peer == a_addr => Some(()),
        _ => None,
    })
    .await;
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

/// A stricter import policy takes effect on what the peer already sent, even when the peer
/// cannot send its routes again (no route refresh capability): the refused default route goes,
/// the rest stays. The peer is a bare BGP speaker written with the wire module.
#[tokio::test]
async fn stricter_import_policy_drops_refused_routes_without_route_refresh() {
    use sepal_bgp::wire::{self, Attrs, Capabilities, OutRoutes, Segment};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let peer_addr: IpAddr = "127.0.0.21".parse().unwrap();
    let local: IpAddr = "127.0.0.22".parse().unwrap();
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(peer_addr, 0))
        .await
        .unwrap();
    let port = listener.local_addr().unwrap().port();
    let default: ipnet::IpNet = "0.0.0.0/0".parse().unwrap();
    let block: ipnet::IpNet = "10.9.0.0/24".parse().unwrap();
    let bare = tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let caps = Capabilities {
            families: vec![Family::Ipv4],
            asn4: Some(65010),
            route_refresh: false,
            graceful_restart: None,
            extended_next_hop_v4: false,
            extended_message: false,
        };
        let attrs = Attrs {
            as_path: vec![Segment::Sequence(vec![65010])],
            ..Default::default()
        };
        let mut out = wire::encode_open(65010, 90, Ipv4Addr::new(127, 0, 0, 21), &caps);
        out.extend(wire::encode_keepalive());
        for m in wire::encode_announce(
            &OutRoutes {
                attrs: &attrs,
                next_hop: peer_addr,
                next_hop_local: None,
                prefixes: &[default, block],
            },
            true,
            wire::MAX_MESSAGE,
        ) {
            out.extend(m);
        }
        out.extend(wire::encode_end_of_rib(Family::Ipv4));
        s.write_all(&out).await.unwrap();
        // Whatever the speaker sends (its OPEN, keepalives, a route refresh it must not send)
        // is read and dropped until it closes the connection.
        let mut buf = [0u8; 4096];
        while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    });
    let (b, mut rx) = Speaker::start(speaker_config(65002, 22, vec![]))
        .await
        .unwrap();
    let mut p = PeerConfig::new(peer_addr, 65010);
    p.port = port;
    p.source = Some(local);
    p.connect_retry = Duration::from_secs(1);
    p.families = vec![Family::Ipv4];
    p.import = Some(std::sync::Arc::new(|_: &ipnet::IpNet, _: &Attrs| true));
    b.add_peer(p.clone()).unwrap();
    wait_event(&mut rx, |ev| {
        matches!(
            ev,
            RibEvent::EndOfRib {
                family: Family::Ipv4,
                ..
            }
        )
        .then_some(())
    })
    .await;
    assert_eq!(b.routes().await.unwrap().len(), 2);

    p.import = Some(std::sync::Arc::new(|n: &ipnet::IpNet, _: &Attrs| {
        n.prefix_len() > 0
    }));
    b.update_peer(p).unwrap();
    wait_for(&mut rx, |c| c.prefix == default && c.best.is_none()).await;
    let left: Vec<ipnet::IpNet> = b
        .routes()
        .await
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(left, vec![block]);
    let peers = b.peers().await.unwrap();
    assert_eq!(peers[0].state, sepal_bgp::fsm::State::Established);
    assert_eq!(peers[0].prefixes_accepted, 1);
    b.shutdown().await.unwrap();
    bare.await.unwrap();
}

/// Waits until `s` reports its session with `peer` Established.
async fn established(s: &Speaker, peer: IpAddr) {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let up = s
                .peers()
                .await
                .unwrap()
                .iter()
                .any(|p| p.address == peer && p.state == sepal_bgp::fsm::State::Established);
            if up {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no session with {peer}"));
}

/// Opens a TCP connection from `src` whose packets leave with `ttl` (loopback keeps it as sent,
/// so this stands in for a peer `255 - ttl` hops away). `None` if the handshake never completes.
async fn connect_with_ttl(src: IpAddr, dst: SocketAddr, ttl: i32) -> Option<tokio::net::TcpStream> {
    use std::os::fd::AsRawFd;
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    // SAFETY: setsockopt on a socket this function owns, with an int of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_TTL,
            &ttl as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0);
    sock.bind(SocketAddr::new(src, 0)).unwrap();
    tokio::time::timeout(Duration::from_secs(2), sock.connect(dst))
        .await
        .ok()
        .map(|r| r.unwrap())
}

/// GTSM (RFC 5082) on the passive side. A peer with `ttl_security` drops every segment below
/// TTL 255, the SYN-ACK included, so the listener must send with 255: the GTSM session here
/// comes up only through A's listener. While every peer of A uses GTSM, the listener also drops
/// a SYN that arrives with less; once a peer without GTSM is added, that peer is accepted (and
/// the GTSM session stays up).
#[tokio::test]
async fn gtsm_on_the_listening_side() {
    let port = free_port();
    let a_addr: IpAddr = "127.0.0.1".parse().unwrap();
    let (b_addr, c_addr): (IpAddr, IpAddr) =
        ("127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap());
    let listen = SocketAddr::new(a_addr, port);
    let (a, _arx) = Speaker::start(speaker_config(65001, 21, vec![listen]))
        .await
        .unwrap();
    let (b, _brx) = Speaker::start(speaker_config(65002, 22, vec![]))
        .await
        .unwrap();
    let mut pa = PeerConfig::new(b_addr, 65002);
    pa.passive = true;
    pa.ttl_security = Some(1);
    a.add_peer(pa).unwrap();
    let mut pb = PeerConfig::new(a_addr, 65001);
    pb.port = port;
    pb.source = Some(b_addr);
    pb.connect_retry = Duration::from_secs(1);
    pb.ttl_security = Some(1);
    b.add_peer(pb).unwrap();
    established(&a, b_addr).await;

    assert!(
        connect_with_ttl(c_addr, listen, 200).await.is_none(),
        "a SYN with TTL 200 got an answer from a listener whose peers all use GTSM"
    );

    let mut pc = PeerConfig::new(c_addr, 65003);
    pc.passive = true;
    a.add_peer(pc).unwrap();
    let (c, _crx) = Speaker::start(speaker_config(65003, 23, vec![]))
        .await
        .unwrap();
    let mut pca = PeerConfig::new(a_addr, 65001);
    pca.port = port;
    pca.source = Some(c_addr);
    pca.connect_retry = Duration::from_secs(1);
    c.add_peer(pca).unwrap();
    established(&a, c_addr).await;
    established(&a, b_addr).await;
    for s in [a, b, c] {
        s.shutdown().await.unwrap();
    }
}
