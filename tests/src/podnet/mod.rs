//! Pods on one node for the policy conformance runners (NetworkPolicy and ClusterNetworkPolicy):
//! a node netns with an uplink, pod netns attached exactly as the CNI plugin attaches them (host
//! veth `sep…` with the fixed MAC, /32 host route, proxy ARP for the gateway 169.254.1.1),
//! servers on the ports a suite probes (`serve`) and real connection probes (`probe`).

mod probe;
mod serve;

pub use probe::{probe, probe_all, Outcome, ProbeSpec};
pub use serve::{SctpSeen, Servers};

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;

use crate::netns::{veth, Netns};

/// Moves the calling thread into the network namespace `/run/netns/NAME`.
pub fn enter_netns(name: &str) {
    let f = File::open(format!("/run/netns/{name}")).expect("open netns");
    // SAFETY: setns on a valid namespace fd only changes this thread's network namespace.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {name}: {}", std::io::Error::last_os_error());
}

/// A node netns whose `eth0` (`ip`/24) is wired to an uplink netns, with a default route out of
/// it: proxy ARP for the pods' gateway answers only for an address the node has a route to.
pub struct PodNode {
    pub node: Netns,
    /// The other end of the node's `eth0` (its `eth0`, no address: the caller may give it one).
    pub uplink: Netns,
}

impl PodNode {
    pub fn new(node_tag: &str, uplink_tag: &str, ip: Ipv4Addr) -> PodNode {
        crate::require_root();
        let node = Netns::new(node_tag);
        let uplink = Netns::new(uplink_tag);
        veth(&node, "eth0", &uplink, "eth0");
        node.run(&format!(
            "ip addr add {ip}/24 dev eth0 && ip route add default dev eth0 && sysctl -qw net.ipv4.ip_forward=1"
        ));
        PodNode { node, uplink }
    }

    /// A pod netns `tag` with address `ip`, attached through host veth `host_iface` as
    /// sepal-cni does it.
    pub fn attach_pod(&self, tag: &str, host_iface: &str, ip: Ipv4Addr) -> Netns {
        let p = Netns::new(tag);
        veth(&self.node, host_iface, &p, "eth0");
        self.node.run(&format!(
            "ip link set {host_iface} address ee:ee:ee:ee:ee:ee && \
             sysctl -qw net.ipv4.conf.{host_iface}.proxy_arp=1 net.ipv4.neigh.{host_iface}.proxy_delay=0 && \
             ip route add {ip}/32 dev {host_iface} scope link"
        ));
        p.run(&format!(
            "ip addr add {ip}/32 dev eth0 && ip route add 169.254.1.1 dev eth0 scope link && \
             ip route add default via 169.254.1.1 dev eth0"
        ));
        p
    }
}
