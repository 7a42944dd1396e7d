//! Shared harness for Sepal's integration tests, end-to-end tests and benchmarks: network
//! namespaces with cleanup guards, and paths of the workspace's own binaries.

pub mod bench;
pub mod bgpd;
pub mod kube;
pub mod kube_agent;
pub mod kubelet;
pub mod lab;
pub mod netns;
pub mod node;
pub mod podnet;
pub mod routing;

use std::path::PathBuf;

/// Path of a binary built from this workspace (`cargo build --workspace --bins`), looked up next
/// to the running test or bench executable so that debug and release runs each use their own.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // Test binaries live in target/<profile>/deps, sepal-bench in target/<profile>.
    for dir in exe.ancestors().skip(1).take(2) {
        let candidate = dir.join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "binary {name} not found next to {}: run `cargo build --workspace --bins` first (scripts/test does)",
        exe.display()
    );
}

/// The kernel-touching tests need root (CAP_NET_ADMIN); say so plainly instead of failing oddly.
pub fn require_root() {
    if !nix_is_root() {
        panic!("this test needs root: it creates network namespaces, veths and routes");
    }
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Makes closing `s` an abortive close (SO_LINGER 0): the peer gets a reset, not a FIN, as
/// from a dropped path or a client that gives up on a connection.
pub fn reset_on_close(s: &std::net::TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket, with a correctly sized value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

/// A tiny deterministic PRNG (xorshift64*) for tests and benchmarks: no crypto, only a seed to
/// print so a failing sequence replays. The seed must not be 0.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A value in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}
