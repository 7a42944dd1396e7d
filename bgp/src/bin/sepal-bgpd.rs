// A small BGP speaker process driven by JSON lines on stdin, one JSON reply per line on stdout.
// Used by interop tests and benchmarks to run the library inside a network namespace.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use sepal_bgp::{
    Family, GracefulRestartConfig, LocalRoute, MaxPrefix, PeerConfig, Speaker, SpeakerConfig,
};
use serde::Deserialize;
use serde_json::{json, Value};

#[path = "common/json_lines.rs"]
mod json_lines;

#[derive(Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
enum Cmd {
    Start {
        local_as: u32,
        router_id: Ipv4Addr,
        #[serde(default)]
        listen: Vec<SocketAddr>,
        #[serde(default = "one")]
        ecmp: usize,
        cluster_id: Option<Ipv4Addr>,
        gr_restart_time: Option<u16>,
        #[serde(default)]
        gr_restarting: bool,
    },
    Peer(PeerArgs),
    RemovePeer {
        address: IpAddr,
    },
    Announce {
        prefix: IpNet,
        next_hop: Option<IpAddr>,
        #[serde(default)]
        communities: Vec<u32>,
        #[serde(default)]
        large_communities: Vec<(u32, u32, u32)>,
        local_pref: Option<u32>,
        med: Option<u32>,
    },
    Withdraw {
        prefix: IpNet,
    },
    Routes,
    Count,
    Peers,
    Shutdown,
}

fn one() -> usize {
    1
}

#[derive(Deserialize)]
struct PeerArgs {
    address: IpAddr,
    remote_as: u32,
    port: Option<u16>,
    #[serde(default)]
    passive: bool,
    connect_retry_ms: Option<u64>,
    hold_time: Option<u16>,
    password: Option<String>,
    ttl_security: Option<u8>,
    #[serde(default)]
    rr_client: bool,
    max_prefixes: Option<usize>,
    max_prefixes_restart_ms: Option<u64>,
    families: Option<Vec<String>>,
    source: Option<IpAddr>,
    #[serde(default)]
    extended_next_hop: bool,
    /// Import policy: reject prefixes outside these CIDRs (and the default route).
    allow: Option<Vec<IpNet>>,
}

impl PeerArgs {
    fn into_config(self) -> Result<PeerConfig, String> {
        let mut p = PeerConfig::new(self.address, self.remote_as);
        p.port = self.port.unwrap_or(179);
        p.passive = self.passive;
        if let Some(ms) = self.connect_retry_ms {
            p.connect_retry = Duration::from_millis(ms);
        }
        if let Some(h) = self.hold_time {
            p.hold_time = h;
        }
        p.password = self.password;
        p.ttl_security = self.ttl_security;
        p.rr_client = self.rr_client;
        p.max_prefixes = self.max_prefixes.map(|limit| MaxPrefix {
            limit,
            restart_after: self.max_prefixes_restart_ms.map(Duration::from_millis),
        });
        if let Some(f) = self.families {
            p.families = f
                .iter()
                .map(|s| match s.as_str() {
                    "ipv4" => Ok(Family::Ipv4),
                    "ipv6" => Ok(Family::Ipv6),
                    o => Err(format!("unknown family {o:?}")),
                })
                .collect::<Result<_, _>>()?;
        }
        p.source = self.source;
        p.extended_next_hop = self.extended_next_hop;
        if let Some(allow) = self.allow {
            p.import = Some(Arc::new(move |n: &IpNet, _: &sepal_bgp::Attrs| {
                n.prefix_len() > 0 && allow.iter().any(|a| a.contains(n))
            }));
        }
        Ok(p)
    }
}

fn main() {
    json_lines::run("sepal-bgpd", None, handle);
}

async fn handle(speaker: &mut Option<Speaker>, cmd: Cmd) -> Result<Value, String> {
    if let Cmd::Start {
        local_as,
        router_id,
        listen,
        ecmp,
        cluster_id,
        gr_restart_time,
        gr_restarting,
    } = cmd
    {
        let (s, mut changes) = Speaker::start(SpeakerConfig {
            local_as,
            router_id,
            listen,
            ecmp,
            cluster_id,
            graceful_restart: gr_restart_time.map(|t| GracefulRestartConfig {
                restart_time: t,
                restarting: gr_restarting,
            }),
        })
        .await
        .map_err(|e| e.to_string())?;
        // Best-route changes would go to a FIB; here they are only drained.
        tokio::spawn(async move { while changes.recv().await.is_some() {} });
        *speaker = Some(s);
        return Ok(json!({ "ok": true }));
    }
    let s = speaker.as_ref().ok_or("send start first")?;
    let e = |e: sepal_bgp::Error| e.to_string();
    Ok(match cmd {
        Cmd::Start { .. } => unreachable!("handled above"),
        Cmd::Peer(p) => {
            s.add_peer(p.into_config()?).map_err(e)?;
            json!({ "ok": true })
        }
        Cmd::RemovePeer { address } => {
            s.remove_peer(address).map_err(e)?;
            json!({ "ok": true })
        }
        Cmd::Announce {
            prefix,
            next_hop,
            communities,
            large_communities,
            local_pref,
            med,
        } => {
            s.announce(
                prefix,
                LocalRoute {
                    next_hop,
                    communities,
                    large_communities,
                    local_pref,
                    med,
                },
            )
            .map_err(e)?;
            json!({ "ok": true })
        }
        Cmd::Withdraw { prefix } => {
            s.withdraw(prefix).map_err(e)?;
            json!({ "ok": true })
        }
        Cmd::Routes => {
            let routes = s.routes().await.map_err(e)?;
            let v: Vec<Value> = routes
                .into_iter()
                .map(|(p, b)| {
                    json!({ "prefix": p.to_string(), "next_hops": b.next_hops, "source": b.source, "attrs": *b.attrs })
                })
                .collect();
            json!({ "routes": v })
        }
        Cmd::Count => json!({ "count": s.route_count().await.map_err(e)? }),
        Cmd::Peers => json!({ "peers": s.peers().await.map_err(e)? }),
        Cmd::Shutdown => {
            s.shutdown().await.map_err(e)?;
            json!({ "bye": true })
        }
    })
}
