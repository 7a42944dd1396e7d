//! `sepal-bench bgp`: one pre-encoded stream of 100,000 IPv4 prefixes (UPDATEs of ≤ 4096 bytes)
//! sent unpaced into Sepal's speaker and into BIRD in the same run; time to a full Loc-RIB, peak RSS.
//! Then the same stream through the whole agent (`sepal node`) and through BIRD with its kernel
//! protocol: time until the kernel's FIB holds every prefix.
//!
//! Both receivers are watched the same way: a route count over an already open control channel
//! (Sepal's stdin/stdout, BIRD's control socket), polled every millisecond; spawning `birdc` per
//! poll would cost more than the ingest. The machine may be shared: besides wall time the run
//! reports each receiver's CPU time and its time spent runnable but waiting for a CPU during the
//! ingest (/proc schedstat), so a slow run can be told from a loaded machine.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
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

/// A BIRD CLI session on its control socket.
struct BirdCtl(BufReader<UnixStream>);

impl BirdCtl {
    fn open(path: &std::path::Path) -> anyhow::Result<BirdCtl> {
        let mut c = BirdCtl(BufReader::new(
            UnixStream::connect(path).with_context(|| format!("connect {}", path.display()))?,
        ));
        c.reply()?; // greeting
        Ok(c)
    }

    /// Lines of one reply: `NNNN-` continues, `NNNN ` ends it (a leading space continues too).
    fn reply(&mut self) -> anyhow::Result<Vec<String>> {
        let mut lines = Vec::new();
        loop {
            let mut l = String::new();
            if self.0.read_line(&mut l)? == 0 {
                bail!("BIRD closed its control socket");
            }
            let last = l.len() > 4
                && l.as_bytes()[..4].iter().all(u8::is_ascii_digit)
                && l.as_bytes()[4] == b' ';
            lines.push(l);
            if last {
                return Ok(lines);
            }
        }
    }

    fn route_count(&mut self, table: &str) -> anyhow::Result<usize> {
        writeln!(self.0.get_mut(), "show route count table {table}")?;
        let lines = self.reply()?;
        Ok(lines
            .iter()
            .filter(|l| l.contains(" of "))
            .find_map(|l| {
                l.get(5..)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0))
    }
}

/// CPU time and run-queue wait (ns) of all threads of a process, from /proc/PID/task/*/schedstat.
fn sched_ns(pid: u32) -> (u64, u64) {
    let mut total = (0, 0);
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return total;
    };
    for t in tasks.flatten() {
        let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        let mut f = s.split_whitespace().map(|x| x.parse::<u64>().unwrap_or(0));
        total.0 += f.next().unwrap_or(0);
        total.1 += f.next().unwrap_or(0);
    }
    total
}

/// What one receiver took for the ingest.
struct Ingest {
    wall_ms: f64,
    cpu_ms: f64,
    wait_ms: f64,
}

/// Blasts the stream at the receiver in `ns` and waits until `count` reaches `n`.
fn ingest(
    ns: &Netns,
    stream: &[u8],
    pid: u32,
    n: usize,
    what: &str,
    count: impl FnMut() -> usize,
) -> anyhow::Result<Ingest> {
    let (cpu0, wait0) = sched_ns(pid);
    let (t0, _session) = blast(ns, stream)?;
    wait_count(what, n, count)?;
    let wall_ms = t0.elapsed().as_secs_f64() * 1000.0;
    let (cpu1, wait1) = sched_ns(pid);
    Ok(Ingest {
        wall_ms,
        cpu_ms: cpu1.saturating_sub(cpu0) as f64 / 1e6,
        wait_ms: wait1.saturating_sub(wait0) as f64 / 1e6,
    })
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
        std::thread::sleep(Duration::from_millis(1));
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

fn pair(tag: &str) -> (Netns, Netns) {
    let snd = Netns::new(&format!("{tag}s"));
    let rcv = Netns::new(&format!("{tag}r"));
    veth(&snd, "b0", &rcv, "b1");
    snd.run(&format!("ip addr add {SENDER}/24 dev b0"));
    rcv.run(&format!("ip addr add {RECEIVER}/24 dev b1"));
    (snd, rcv)
}

/// One ingest into a fresh Sepal speaker; also its peak RSS in KiB.
fn run_sepal(run: usize, n: u32, stream: &[u8]) -> anyhow::Result<(Ingest, u64)> {
    let (snd, rcv) = pair(&format!("bgs{run}"));
    let mut sepal = SepalBgpd::start(
        &rcv,
        json!({"local_as": 65000, "router_id": RECEIVER, "listen": [format!("{RECEIVER}:179")]}),
    );
    sepal.peer(json!({"address": SENDER, "remote_as": 65001, "passive": true, "families": ["ipv4"], "hold_time": 240}));
    let pid = sepal.pid();
    let s = ingest(&snd, stream, pid, n as usize, "sepal", || sepal.count())?;
    let rss = vm_hwm_kib(pid);
    println!(
        "sepal: {n} prefixes in Loc-RIB after {:.0} ms ({:.0} ms CPU, {:.0} ms runnable without a CPU), peak RSS {:.1} MiB",
        s.wall_ms, s.cpu_ms, s.wait_ms,
        rss as f64 / 1024.0
    );
    Ok((s, rss))
}

/// The same ingest into a fresh BIRD.
fn run_bird(run: usize, n: u32, stream: &[u8]) -> anyhow::Result<(Ingest, u64)> {
    let (snd, rcv) = pair(&format!("bgb{run}"));
    let bird = Bird::start(
        &rcv,
        &format!(
            "router id {RECEIVER};\nprotocol device {{ }}\nprotocol bgp blast {{\n  local {RECEIVER} as 65000; neighbor {SENDER} as 65001;\n  passive on; hold time 240;\n  ipv4 {{ import all; export none; }};\n}}\n"
        ),
    );
    let mut ctl = BirdCtl::open(&bird.ctl_path())?;
    let b = ingest(&snd, stream, bird.pid(), n as usize, "bird", || {
        ctl.route_count("master4").unwrap_or(0)
    })?;
    let rss = vm_hwm_kib(bird.pid());
    println!(
        "bird: {n} prefixes in its table after {:.0} ms ({:.0} ms CPU, {:.0} ms runnable without a CPU), peak RSS {:.1} MiB",
        b.wall_ms, b.cpu_ms, b.wait_ms,
        rss as f64 / 1024.0
    );
    Ok((b, rss))
}

/// Prefixes in the main IPv4 table of the namespace process `pid` runs in (the kernel's own
/// count, /proc/PID/net/fib_triestat: cheap at any table size, unlike a route dump).
fn fib_prefixes(pid: u32) -> usize {
    let text = std::fs::read_to_string(format!("/proc/{pid}/net/fib_triestat")).unwrap_or_default();
    let main = text.split("Main:").nth(1).unwrap_or("");
    main.lines()
        .find_map(|l| l.trim().strip_prefix("Prefixes:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}

/// The same stream through the whole agent: `sepal node` (dir datastore, a passive BGPPeer for
/// the sender) until the kernel's main table holds every prefix.
fn run_sepal_fib(run: usize, n: u32, stream: &[u8]) -> anyhow::Result<Ingest> {
    let mut node = crate::node::Node::new(&format!("bff{run}"), &["10.244.0.0/24"]);
    let snd = Netns::new(&format!("bff{run}s"));
    veth(&snd, "b0", &node.netns, "b1");
    snd.run(&format!("ip addr add {SENDER}/24 dev b0"));
    node.netns.run(&format!("ip addr add {RECEIVER}/24 dev b1"));
    let name = node.name.clone();
    std::fs::write(
        node.datastore.join(format!("node-{name}.yaml")),
        crate::routing::node_yaml_named(&name, RECEIVER, "10.244.0.0/24"),
    )?;
    std::fs::write(
        node.datastore.join("routing.yaml"),
        crate::routing::bgp_configuration(false, "")
            + &format!(
                "---\napiVersion: sepal.dev/v1alpha1\nkind: BGPPeer\nmetadata:\n  name: blast\nspec:\n  \
                 peerIP: {SENDER}\n  asNumber: 65001\n  passive: true\n  keepaliveTime: 80s\n  holdTime: 240s\n"
            ),
    )?;
    node.start_agent();
    let pid = node.agent_pid().context("agent pid")?;
    let base = fib_prefixes(pid);
    let s = ingest(
        &snd,
        stream,
        pid,
        base + n as usize,
        "sepal node FIB",
        || fib_prefixes(pid),
    )?;
    println!(
        "sepal node: {n} prefixes in the kernel FIB after {:.0} ms ({:.0} ms CPU, {:.0} ms runnable without a CPU)",
        s.wall_ms, s.cpu_ms, s.wait_ms
    );
    Ok(s)
}

/// BIRD with its kernel protocol exporting what it learns, until the kernel has every prefix.
fn run_bird_fib(run: usize, n: u32, stream: &[u8]) -> anyhow::Result<Ingest> {
    let (snd, rcv) = pair(&format!("bfb{run}"));
    let bird = Bird::start(
        &rcv,
        &format!(
            "router id {RECEIVER};\nprotocol device {{ }}\nprotocol kernel {{ ipv4 {{ import none; export all; }}; }}\n\
             protocol bgp blast {{\n  local {RECEIVER} as 65000; neighbor {SENDER} as 65001;\n  passive on; hold time 240;\n  \
             ipv4 {{ import all; export none; }};\n}}\n"
        ),
    );
    let pid = bird.pid();
    let base = fib_prefixes(pid);
    let b = ingest(&snd, stream, pid, base + n as usize, "bird FIB", || {
        fib_prefixes(pid)
    })?;
    println!(
        "bird: {n} prefixes in the kernel FIB after {:.0} ms ({:.0} ms CPU, {:.0} ms runnable without a CPU)",
        b.wall_ms, b.cpu_ms, b.wait_ms
    );
    Ok(b)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// `--prefixes N` (default 100,000), `--runs R` (default 3): Sepal and BIRD alternate (and take
/// turns going first), each run on fresh daemons; medians are reported, so one unlucky run on a shared machine does not decide.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    crate::require_root();
    let arg = |name: &str, default: u32| -> anyhow::Result<u32> {
        match args.iter().position(|a| a == name) {
            Some(i) => Ok(args
                .get(i + 1)
                .with_context(|| format!("{name} N"))?
                .parse()?),
            None => Ok(default),
        }
    };
    let n = arg("--prefixes", 100_000)?;
    let runs = arg("--runs", 3)?.max(1) as usize;
    let stream = encode_stream(n);
    println!(
        "stream: {n} prefixes, {} bytes; {runs} runs each",
        stream.len()
    );

    let (mut sepal, mut bird) = (Vec::new(), Vec::new());
    let (mut sepal_fib, mut bird_fib) = (Vec::new(), Vec::new());
    for run in 0..runs {
        if run % 2 == 0 {
            sepal_fib.push(run_sepal_fib(run, n, &stream)?.wall_ms);
            bird_fib.push(run_bird_fib(run, n, &stream)?.wall_ms);
        } else {
            bird_fib.push(run_bird_fib(run, n, &stream)?.wall_ms);
            sepal_fib.push(run_sepal_fib(run, n, &stream)?.wall_ms);
        }
        // Alternate who goes first: each run's namespaces are torn down by the kernel in the
        // background while the next ingest runs.
        if run % 2 == 0 {
            sepal.push(run_sepal(run, n, &stream)?);
            bird.push(run_bird(run, n, &stream)?);
        } else {
            bird.push(run_bird(run, n, &stream)?);
            sepal.push(run_sepal(run, n, &stream)?);
        }
    }
    let med =
        |v: &[(Ingest, u64)], f: fn(&Ingest) -> f64| median(v.iter().map(|(i, _)| f(i)).collect());
    let rss = |v: &[(Ingest, u64)]| v.iter().map(|x| x.1).max().unwrap_or(0) as f64 / 1024.0;
    let (s_ms, b_ms) = (med(&sepal, |i| i.wall_ms), med(&bird, |i| i.wall_ms));
    let spread = |v: &[f64]| {
        let (lo, hi) = v
            .iter()
            .fold((f64::MAX, 0f64), |(l, h), x| (l.min(*x), h.max(*x)));
        format!("{lo:.0}-{hi:.0}")
    };
    println!(
        "kernel FIB: sepal node runs {} ms, bird runs {} ms; Loc-RIB: sepal runs {} ms, bird runs {} ms",
        spread(&sepal_fib),
        spread(&bird_fib),
        spread(&sepal.iter().map(|(i, _)| i.wall_ms).collect::<Vec<_>>()),
        spread(&bird.iter().map(|(i, _)| i.wall_ms).collect::<Vec<_>>()),
    );
    let (f_ms, bf_ms) = (median(sepal_fib), median(bird_fib));
    let (s_cpu, b_cpu) = (med(&sepal, |i| i.cpu_ms), med(&bird, |i| i.cpu_ms));

    let r1 = |x: f64| (x * 10.0).round() / 10.0;
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    let result = json!({
        "prefixes": n,
        "runs": runs,
        "sepal_ms": r1(s_ms),
        "bird_ms": r1(b_ms),
        "ratio": r3(s_ms / b_ms.max(0.001)),
        "sepal_cpu_ms": r1(s_cpu),
        "bird_cpu_ms": r1(b_cpu),
        "cpu_ratio": r3(s_cpu / b_cpu.max(0.001)),
        "rss_mib": r1(rss(&sepal)),
        "bird_rss_mib": r1(rss(&bird)),
        "fib_ms": r1(f_ms),
        "bird_fib_ms": r1(bf_ms),
        "fib_ratio": r3(f_ms / bf_ms.max(0.001)),
    });
    println!("{result}");
    Ok(())
}
