//! Kernel sysctls Sepal's routed dataplane needs: node-wide forwarding (set by the agent at
//! start) and per-interface proxy ARP / forwarding for host veths (used by the CNI plugin).

use std::io;
use std::path::PathBuf;

/// Sysctls are per network namespace: /proc/sys/net shows the namespace of the calling thread.
const ROOT: &str = "/proc/sys";

/// The path of a dotted sysctl name (`net.ipv4.ip_forward` → /proc/sys/net/ipv4/ip_forward).
/// Interface names may not contain '/' or be '.'/'..', so a name like `net.ipv4.conf.eth0.x`
/// maps unambiguously.
fn path(name: &[&str]) -> io::Result<PathBuf> {
    path_under(std::path::Path::new(ROOT), name)
}

fn path_under(root: &std::path::Path, name: &[&str]) -> io::Result<PathBuf> {
    let mut p = root.to_path_buf();
    for part in name {
        if part.is_empty() || part.contains('/') || *part == "." || *part == ".." {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("invalid sysctl path component {part:?}"),
            ));
        }
        p.push(part);
    }
    Ok(p)
}

fn write(name: &[&str], value: &str) -> io::Result<()> {
    write_path(&path(name)?, value)
}

fn write_path(p: &std::path::Path, value: &str) -> io::Result<()> {
    // Skip the write when the value is already right: cheaper and works on read-only /proc/sys
    // (containers) when nothing needs changing.
    if let Ok(current) = std::fs::read_to_string(p) {
        if current.trim() == value {
            return Ok(());
        }
    }
    std::fs::write(p, value)
        .map_err(|e| io::Error::new(e.kind(), format!("setting {}={value}: {e}", p.display())))
}

/// Reads a sysctl given as its path components (`["net", "ipv4", "ip_forward"]`).
pub fn read(name: &[&str]) -> io::Result<String> {
    Ok(std::fs::read_to_string(path(name)?)?.trim().to_string())
}

/// What the node itself needs: it routes every pod packet, for both families. `root` is where
/// the node's /proc/sys is: /proc/sys, or in a container whose /proc/sys is read-only (as
/// runtimes mount it), a writable hostPath mount of the host's /proc/sys/net below it.
pub fn enable_node_forwarding(root: &std::path::Path) -> io::Result<()> {
    write_path(&path_under(root, &["net", "ipv4", "ip_forward"])?, "1")?;
    // IPv6 may be disabled in the kernel (no net/ipv6): nothing to forward then.
    if root.join("net/ipv6").exists() {
        let all = path_under(root, &["net", "ipv6", "conf", "all", "forwarding"])?;
        write_path(&all, "1")?;
    }
    Ok(())
}

/// `net.ipv4.conf.<ifname>.proxy_arp`: the host answers the pod's ARP for its gateway 169.254.1.1.
pub fn set_proxy_arp(ifname: &str, on: bool) -> io::Result<()> {
    write(
        &["net", "ipv4", "conf", ifname, "proxy_arp"],
        if on { "1" } else { "0" },
    )
}

/// `net.ipv4.neigh.<ifname>.proxy_delay`: answer proxy ARP at once instead of after a random
/// delay of up to 0.8 s (the pod's first packet would wait for it).
pub fn set_proxy_delay(ifname: &str, delay: u32) -> io::Result<()> {
    write(
        &["net", "ipv4", "neigh", ifname, "proxy_delay"],
        &delay.to_string(),
    )
}

/// Per-interface forwarding for IPv4 (`net.ipv4.conf.<if>.forwarding`) and, when the kernel has
/// IPv6, `net.ipv6.conf.<if>.forwarding`.
pub fn set_forwarding(ifname: &str, on: bool) -> io::Result<()> {
    let v = if on { "1" } else { "0" };
    write(&["net", "ipv4", "conf", ifname, "forwarding"], v)?;
    let v6 = path(&["net", "ipv6", "conf", ifname, "forwarding"])?;
    if v6.exists() {
        write(&["net", "ipv6", "conf", ifname, "forwarding"], v)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_reject_traversal() {
        assert!(path(&["net", "ipv4", "conf", "..", "x"]).is_err());
        assert!(path(&["net", "ipv4", "conf", "a/b", "x"]).is_err());
        assert!(path(&["net", "ipv4", "conf", "", "x"]).is_err());
        assert_eq!(
            path(&["net", "ipv4", "ip_forward"]).unwrap(),
            PathBuf::from("/proc/sys/net/ipv4/ip_forward")
        );
    }

    #[test]
    fn reads_a_sysctl() {
        let v = read(&["net", "ipv4", "ip_forward"]).unwrap();
        assert!(v == "0" || v == "1");
    }
}
