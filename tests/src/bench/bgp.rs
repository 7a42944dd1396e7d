//! `sepal-bench bgp`: one pre-encoded stream of 100,000 IPv4 prefixes (UPDATEs of ≤ 4096 bytes)
//! sent unpaced into Sepal's speaker and into BIRD in the same run; time to a full Loc-RIB, peak RSS.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::json;

use crate::bgpd::{Bird, SepalBgpd};
use crate::netns::{veth, Netns};
use sepal_bgp::wire::{self, Attrs, Capabilities, DecodeCtx, Family, Message, OutRoutes, Segment};

const SENDER: &str = "10.214.0.1";
const RECEIVER: &str = "10.214.0.2";

/// The whole session from the sender's side after its OPEN: KEEPALIVE, UPDATEs, End-of-RIB.
fn encode_stream(n: u32) -> Vec<u8> {
    let prefixes: Vec<_> = (0..n)
        .map(|i| {
            let a = u32::from(Ipv4Addr::new(20, 0, 0, 0)) + (i << 8);
            wire::net4(Ipv4Addr::from(a).octets(), 24)
        })
        .collect();
    let attrs = Attrs {
        as_path: vec![Segment::Sequence(vec![65001])],
        ..Default::default()
    };
    let sender: IpAddr = SENDER.parse().expect("address");
    let mut out = Vec::new();
    for m in wire::encode_announce(
        &OutRoutes {
            attrs: &attrs,
            next_hop: sender,
            next_hop_local: None,
            prefixes: &prefixes,
        },
        true,
        wire::MAX_MESSAGE,
    ) {
        out.extend_from_slice(&m);
    }
    out.extend_from_slice(&wire::encode_end_of_rib(Family::Ipv4));
    out
}

/// Opens a TCP connection from inside `ns` (the socket stays in that namespace).
fn connect_in(ns: &Netns, to: SocketAddr) -> anyhow::Result<TcpStream> {
    let path = ns.path();
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<TcpStream> {
            let f =
                std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
            // SAFETY: setns on this short-lived thread only; the fd is valid for the call.
            if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                bail!("setns: {}", std::io::Error::last_os_error());
            }
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                match TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                    Ok(s) => return Ok(s),
                    Err(e) if Instant::now() > deadline => bail!("connect {to}: {e}"),
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            }
        })
        .join()
        .map_err(|_| anyhow::anyhow!("connect thread panicked"))?
    })
}

/// Reads one BGP message.
fn read_msg(s: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<Message> {
    loop {
        match wire::decode(
            buf,
            DecodeCtx {
                asn4: true,
                extended_message: false,
            },
        ) {
            Ok(Some((m, used))) => {
                buf.drain(..used);
                return Ok(m);
            }
            Ok(None) => {}
            Err(n) => bail!("receiver sent a bad message: {n}"),
        }
        let mut chunk = [0u8; 4096];
        let k = s.read(&mut chunk)?;
        if k == 0 {
            bail!("receiver closed the session");
        }
        buf.extend_from_slice(&chunk[..k]);
    }
}

/// Runs the session up to Established, then writes the stream unpaced; returns the Established instant.
fn blast(ns: &Netns, stream: &[u8]) -> anyhow::Result<(Instant, TcpStream)> {
    let mut s = connect_in(ns, SocketAddr::new(RECEIVER.parse()?, 179))?;
    s.set_nodelay(true)?;
    let caps = Capabilities {
        families: vec![Family::Ipv4],
        asn4: Some(65001),
        ..Default::default()
    };
    s.write_all(&wire::encode_open(65001, 240, SENDER.parse()?, &caps))?;
    let mut buf = Vec::new();
    match read_msg(&mut s, &mut buf)? {
        Message::Open(_) => {}
        other => bail!("expected OPEN, got {other:?}"),
    }
    s.write_all(&wire::encode_keepalive())?;
    loop {
        match read_msg(&mut s, &mut buf)? {
            Message::Keepalive => break,
            Message::Notification(n) => bail!("receiver sent NOTIFICATION {n}"),
            _ => {}
        }
    }
    let t0 = Instant::now();
    // Drain whatever the receiver sends so it never blocks on a full window.
    let mut r = s.try_clone()?;
    std::thread::spawn(move || {
        let mut b = [0u8; 65536];
        while matches!(r.read(&mut b), Ok(k) if k > 0) {}
    });
    s.write_all(stream)?;
    Ok((t0, s))
}

fn wait_count(what: &str, n: usize, mut count: impl FnMut() -> usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let c = count();
        if c >= n {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{what}: only {c} of {n} routes after 300 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

/// User + system CPU time of a process in ms (clock ticks of 10 ms).
fn cpu_ms(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|x| x.1).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) * 10
}

fn pair(tag: &str) -> (Netns, Netns) {
    let snd = Netns::new(&format!("{tag}s"));
    let rcv = Netns::new(&format!("{tag}r"));
    veth(&snd, "b0", &rcv, "b1");
    snd.run(&format!("ip addr add {SENDER}/24 dev b0"));
    rcv.run(&format!("ip addr add {RECEIVER}/24 dev b1"));
    (snd, rcv)
}

pub fn run(args: &[String]) -> anyhow::Result<()> {
    crate::require_root();
    let n: u32 = match args.iter().position(|a| a == "--prefixes") {
        Some(i) => args.get(i + 1).context("--prefixes N")?.parse()?,
        None => 100_000,
    };
    let stream = encode_stream(n);
    println!("stream: {n} prefixes, {} bytes", stream.len());

    // Sepal.
    let (snd1, rcv1) = pair("bgs");
    let mut sepal = SepalBgpd::start(
        &rcv1,
        json!({"local_as": 65000, "router_id": RECEIVER, "listen": [format!("{RECEIVER}:179")]}),
    );
    sepal.peer(json!({"address": SENDER, "remote_as": 65001, "passive": true, "families": ["ipv4"], "hold_time": 240}));
    let (t0, _s1) = blast(&snd1, &stream)?;
    wait_count("sepal", n as usize, || sepal.count())?;
    let sepal_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let rss_kib = vm_hwm_kib(sepal.pid());
    let sepal_cpu = cpu_ms(sepal.pid());
    println!(
        "sepal: {n} prefixes in Loc-RIB after {sepal_ms:.0} ms ({sepal_cpu} ms CPU), peak RSS {:.1} MiB",
        rss_kib as f64 / 1024.0
    );

    // BIRD, same stream.
    let (snd2, rcv2) = pair("bgb");
    let bird = Bird::start(
        &rcv2,
        &format!(
            "router id {RECEIVER};\nprotocol device {{ }}\nprotocol bgp blast {{\n  local {RECEIVER} as 65000; neighbor {SENDER} as 65001;\n  passive on; hold time 240;\n  ipv4 {{ import all; export none; }};\n}}\n"
        ),
    );
    let (t0, _s2) = blast(&snd2, &stream)?;
    wait_count("bird", n as usize, || bird.route_count("master4"))?;
    let bird_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let bird_cpu = cpu_ms(bird.pid());
    println!("bird: {n} prefixes in its table after {bird_ms:.0} ms ({bird_cpu} ms CPU)");

    let result = json!({
        "prefixes": n,
        "sepal_ms": (sepal_ms * 10.0).round() / 10.0,
        "bird_ms": (bird_ms * 10.0).round() / 10.0,
        "ratio": ((sepal_ms / bird_ms) * 1000.0).round() / 1000.0,
        "rss_mib": ((rss_kib as f64 / 1024.0) * 10.0).round() / 10.0,
    });
    println!("{result}");
    Ok(())
}
