// Learned best routes to kernel routes: the BGP part of felix's protocol-83 table (gateway routes
// only), with the routes a previous agent left kept as stale until graceful restart sweeps them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use felix::routes::{Desired, KernelRoute, NextHop, Target};
use ipnet::IpNet;
use ipnetwork::IpNetwork;
use sepal_bgp::{RouteChange, Source};
use sepal_felix as felix;

use super::inputs::{to_ipnet, to_ipnetwork};

/// The BGP routes this node wants in the kernel.
#[derive(Debug, Default, Clone)]
pub struct Fib {
    /// The node's interface addresses (interface name, address with prefix): next hops inside
    /// one are directly connected.
    connected: Vec<(String, IpNetwork)>,
    learned: BTreeMap<IpNet, Target>,
    /// Gateway routes found in the kernel at start (a previous agent's), kept until `sweep`.
    stale: BTreeMap<IpNet, Target>,
    /// Unnumbered sessions: peer address to the interface the session runs on. A link-local
    /// next hop is only usable through the interface of the session it came from.
    link_peers: BTreeMap<IpAddr, String>,
    /// Destinations whose route may have changed since the last `take_changes`.
    changed: BTreeSet<IpNet>,
}

fn is_link_local(a: IpAddr) -> bool {
    matches!(a, IpAddr::V6(v6) if v6.is_unicast_link_local())
}

impl Fib {
    pub fn new(connected: Vec<(String, IpNetwork)>) -> Fib {
        Fib {
            connected,
            ..Fib::default()
        }
    }

    pub fn set_connected(&mut self, connected: Vec<(String, IpNetwork)>) -> bool {
        if connected == self.connected {
            return false;
        }
        self.connected = connected;
        // Re-derive the targets: a next hop may have become (or stopped being) directly connected.
        let learned = std::mem::take(&mut self.learned);
        self.changed.extend(learned.keys().copied());
        for (p, t) in learned {
            if let Target::Via(hops) = t {
                // Link-local hops keep their session's interface.
                let dev = hops
                    .iter()
                    .find(|h| is_link_local(h.gateway))
                    .and_then(|h| h.dev.clone());
                let gws: Vec<IpAddr> = hops.iter().map(|h| h.gateway).collect();
                self.learned.insert(p, self.target(&gws, dev.as_deref()));
            }
        }
        true
    }

    /// The interfaces of the unnumbered sessions, by peer address.
    pub fn set_link_peers(&mut self, link_peers: BTreeMap<IpAddr, String>) {
        self.link_peers = link_peers;
    }

    /// Takes over the gateway routes of protocol 83 a previous agent left: BGP routes (pod and
    /// blackhole routes are the agent's own and never gateway routes).
    pub fn adopt_stale(&mut self, kernel: &[KernelRoute]) -> usize {
        for r in kernel {
            if matches!(r.target, Target::Via(_)) {
                self.stale.insert(to_ipnet(r.dst), r.target.clone());
                self.changed.insert(to_ipnet(r.dst));
            }
        }
        self.stale.len()
    }

    pub fn stale_count(&self) -> usize {
        self.stale.len()
    }

    /// Every learned route becomes stale (a new speaker replaces the old one).
    pub fn age(&mut self) {
        let learned = std::mem::take(&mut self.learned);
        self.stale.extend(learned);
    }

    /// Graceful restart is over: routes not learned again go.
    pub fn sweep(&mut self) -> Vec<IpNet> {
        let gone: Vec<IpNet> = self
            .stale
            .keys()
            .filter(|p| !self.learned.contains_key(p))
            .copied()
            .collect();
        self.stale.clear();
        self.changed.extend(gone.iter().copied());
        gone
    }

    /// Next hops for `gateways`. A link-local one goes out the interface of the unnumbered
    /// session with that peer (ECMP over several: each its own), else `link_dev`, the
    /// interface of the session the route came from.
    fn target(&self, gateways: &[IpAddr], link_dev: Option<&str>) -> Target {
        let mut hops: Vec<NextHop> = gateways
            .iter()
            .map(|gw| {
                if is_link_local(*gw) {
                    let dev = self.link_peers.get(gw).map(String::as_str).or(link_dev);
                    return NextHop {
                        gateway: *gw,
                        dev: dev.map(str::to_string),
                        onlink: true,
                    };
                }
                // Directly connected: name the interface and set onlink, so the route does not
                // depend on how the kernel resolves the gateway.
                match self
                    .connected
                    .iter()
                    .find(|(_, n)| n.contains(*gw) && n.prefix() > 0)
                {
                    Some((dev, _)) => NextHop {
                        gateway: *gw,
                        dev: Some(dev.clone()),
                        onlink: true,
                    },
                    None => NextHop {
                        gateway: *gw,
                        dev: None,
                        onlink: false,
                    },
                }
            })
            .collect();
        hops.sort();
        hops.dedup();
        Target::Via(hops)
    }

    /// Applies one Loc-RIB change; returns whether the kernel table changes. The speaker's own
    /// routes and routes without a usable next hop are not installed.
    pub fn apply(&mut self, change: &RouteChange) -> bool {
        let prefix = change.prefix.trunc();
        let want = change.best.as_ref().and_then(|b| {
            if b.source == Source::Local {
                return None;
            }
            let link_dev = match b.source {
                Source::Peer(peer) => self.link_peers.get(&peer).map(String::as_str),
                Source::Local => None,
            };
            let gws: Vec<IpAddr> = b
                .next_hops
                .iter()
                .filter(|gw| gw.is_ipv4() == prefix.addr().is_ipv4() || gw.is_ipv6())
                .filter(|gw| !gw.is_unspecified())
                // A link-local next hop from a numbered session names no interface: unusable.
                .filter(|gw| {
                    !is_link_local(**gw) || link_dev.is_some() || self.link_peers.contains_key(gw)
                })
                .copied()
                .collect();
            (!gws.is_empty()).then(|| self.target(&gws, link_dev))
        });
        let changed = match want {
            Some(t) => self.learned.insert(prefix, t.clone()) != Some(t),
            None => self.learned.remove(&prefix).is_some(),
        };
        if changed {
            self.changed.insert(prefix);
        }
        changed
    }

    /// The routes changed since the last call: each destination with its target now (a
    /// learned route, else a stale one), None where it has none.
    pub fn take_changes(&mut self) -> Vec<(IpNetwork, Option<Target>)> {
        std::mem::take(&mut self.changed)
            .into_iter()
            .map(|p| {
                let target = self.learned.get(&p).or_else(|| self.stale.get(&p));
                (to_ipnetwork(p), target.cloned())
            })
            .collect()
    }

    /// The gateway routes for felix's reconciler: learned routes, and stale ones not relearned.
    pub fn desired(&self) -> Desired {
        let mut d: Desired = self
            .stale
            .iter()
            .map(|(p, t)| (to_ipnetwork(*p), t.clone()))
            .collect();
        d.extend(
            self.learned
                .iter()
                .map(|(p, t)| (to_ipnetwork(*p), t.clone())),
        );
        d
    }

    pub fn learned_count(&self) -> usize {
        self.learned.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sepal_bgp::BestRoute;

    fn change(prefix: &str, hops: &[&str], source: Source) -> RouteChange {
        RouteChange {
            prefix: prefix.parse().unwrap(),
            best: Some(BestRoute {
                next_hops: hops.iter().map(|h| h.parse().unwrap()).collect(),
                source,
                attrs: Default::default(),
            }),
        }
    }
    fn peer(s: &str) -> Source {
        Source::Peer(s.parse().unwrap())
    }
    fn fib() -> Fib {
        Fib::new(vec![("eth0".into(), "192.168.0.2/24".parse().unwrap())])
    }

    #[test]
    fn learned_route_onlink_when_connected_and_removed_on_withdraw() {
        let mut f = fib();
        assert!(f.apply(&change(
            "10.244.0.0/24",
            &["192.168.0.1"],
            peer("192.168.0.1")
        )));
        assert!(!f.apply(&change(
            "10.244.0.0/24",
            &["192.168.0.1"],
            peer("192.168.0.1")
        )));
        let d = f.desired();
        let t = &d[&"10.244.0.0/24".parse().unwrap()];
        assert_eq!(
            t,
            &Target::Via(vec![NextHop {
                gateway: "192.168.0.1".parse().unwrap(),
                dev: Some("eth0".into()),
                onlink: true
            }])
        );
        // A next hop further away is left to the kernel to resolve.
        f.apply(&change(
            "10.244.5.0/24",
            &["172.16.0.1"],
            peer("192.168.0.1"),
        ));
        let d = f.desired();
        assert_eq!(
            d[&"10.244.5.0/24".parse().unwrap()],
            Target::Via(vec![NextHop {
                gateway: "172.16.0.1".parse().unwrap(),
                dev: None,
                onlink: false
            }])
        );
        assert!(f.apply(&RouteChange {
            prefix: "10.244.0.0/24".parse().unwrap(),
            best: None
        }));
        assert_eq!(f.desired().len(), 1);
    }

    #[test]
    fn changes_name_each_destination_once_with_its_target_now() {
        let mut f = fib();
        f.apply(&change(
            "10.244.1.0/24",
            &["192.168.0.1"],
            peer("192.168.0.1"),
        ));
        f.apply(&change(
            "10.244.2.0/24",
            &["192.168.0.1"],
            peer("192.168.0.1"),
        ));
        f.apply(&change(
            "10.244.1.0/24",
            &["192.168.0.2"],
            peer("192.168.0.2"),
        ));
        let changes = f.take_changes();
        assert_eq!(changes.len(), 2);
        let Some(Target::Via(hops)) = &changes[0].1 else {
            panic!("{changes:?}")
        };
        assert_eq!(hops[0].gateway.to_string(), "192.168.0.2");
        assert!(f.take_changes().is_empty(), "taken once");
        // A withdrawal is a change to nothing; one that changes nothing is no change.
        f.apply(&RouteChange {
            prefix: "10.244.2.0/24".parse().unwrap(),
            best: None,
        });
        f.apply(&RouteChange {
            prefix: "10.244.9.0/24".parse().unwrap(),
            best: None,
        });
        assert_eq!(
            f.take_changes(),
            vec![("10.244.2.0/24".parse().unwrap(), None)]
        );
    }

    #[test]
    fn ecmp_and_own_routes() {
        let mut f = fib();
        f.apply(&change(
            "10.244.9.0/24",
            &["192.168.0.9", "192.168.0.8"],
            peer("192.168.0.9"),
        ));
        let Target::Via(hops) = &f.desired()[&"10.244.9.0/24".parse().unwrap()] else {
            panic!()
        };
        assert_eq!(hops.len(), 2);
        assert!(!f.apply(&change("10.244.1.0/24", &["0.0.0.0"], Source::Local)));
        assert_eq!(f.desired().len(), 1);
    }

    #[test]
    fn stale_routes_kept_until_sweep() {
        let mut f = fib();
        let via = |gw: &str| {
            Target::Via(vec![NextHop {
                gateway: gw.parse().unwrap(),
                dev: Some("eth0".into()),
                onlink: true,
            }])
        };
        let kernel = vec![
            KernelRoute {
                dst: "10.244.0.0/24".parse().unwrap(),
                target: via("192.168.0.1"),
                priority: None,
            },
            KernelRoute {
                dst: "10.244.2.0/24".parse().unwrap(),
                target: via("192.168.0.3"),
                priority: None,
            },
            KernelRoute {
                dst: "10.244.1.5/32".parse().unwrap(),
                target: Target::Dev("sepa1".into()),
                priority: None,
            },
            KernelRoute {
                dst: "10.244.1.0/24".parse().unwrap(),
                target: Target::Blackhole,
                priority: None,
            },
        ];
        assert_eq!(f.adopt_stale(&kernel), 2, "only gateway routes are BGP's");
        assert_eq!(f.desired().len(), 2);
        f.apply(&change(
            "10.244.0.0/24",
            &["192.168.0.1"],
            peer("192.168.0.1"),
        ));
        assert_eq!(f.desired().len(), 2);
        assert_eq!(f.sweep(), vec!["10.244.2.0/24".parse::<IpNet>().unwrap()]);
        assert_eq!(f.desired().len(), 1);
    }
}
