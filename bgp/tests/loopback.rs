// Two speakers in one process over 127.0.0.0/8 (no root, no namespaces): session setup,
// announce/withdraw propagation, and the NOTIFICATION a wrong remote AS gets.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use sepal_bgp::{LocalRoute, PeerConfig, Speaker, SpeakerConfig};
use tokio::sync::mpsc::UnboundedReceiver;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn wait_for<F: Fn(&sepal_bgp::RouteChange) -> bool>(
    rx: &mut UnboundedReceiver<sepal_bgp::RouteChange>,
    f: F,
) -> sepal_bgp::RouteChange {
    tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            let c = rx.recv().await.expect("speaker stopped");
            if f(&c) {
                return c;
            }
        }
    })
    .await
    .expect("route change did not arrive")
}

#[tokio::test]
async fn two_speakers_exchange_routes() {
    let port = free_port();
    let a_addr: IpAddr = "127.0.0.1".parse().unwrap();
    let b_addr: IpAddr = "127.0.0.2".parse().unwrap();
    let (a, _arx) = Speaker::start(SpeakerConfig {
        local_as: 4200000001,
        router_id: Ipv4Addr::new(1, 1, 1, 1),
        listen: vec![SocketAddr::new(a_addr, port)],
        ecmp: 4,
        cluster_id: None,
        graceful_restart: None,
    })
    .await
    .unwrap();
    let (b, mut brx) = Speaker::start(SpeakerConfig {
        local_as: 65002,
        router_id: Ipv4Addr::new(2, 2, 2, 2),
        listen: vec![],
        ecmp: 4,
        cluster_id: None,
        graceful_restart: None,
    })
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
    // eBGP: next-hop-self; over an IPv4 session the IPv6 route carries our IPv4-mapped address.
    assert_eq!(c6.next_hops, vec![a_addr]);

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
