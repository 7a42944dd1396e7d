//! Work inside another network namespace without moving the caller: a short-lived thread enters
//! the namespace, does the work and ends. Sockets, netlink contexts and child processes made on
//! that thread keep the namespace they were made in.

use std::path::Path;

/// Runs `f` on a thread that entered the network namespace at `netns` (a /run/netns path) and
/// returns its result; an error when the namespace cannot be opened or entered.
pub fn on_thread_in<T: Send>(netns: &Path, f: impl FnOnce() -> T + Send) -> std::io::Result<T> {
    let ns = std::fs::File::open(netns)?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|_| {
                Err(std::io::Error::other(
                    "thread in a network namespace panicked",
                ))
            })
    })
}
