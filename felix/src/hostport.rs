//! Pods' hostPorts: table `inet sepal-hostports`, DNAT from the node's own addresses to pods.
//!
//! kubelet hands a pod's `hostPort`s to the CNI plugin as port mappings; the agent keeps them with
//! the pod's allocation and this module turns all of them into one table, replaced atomically in
//! one transaction whenever they change (NAT state lives in conntrack, so flows already mapped
//! keep going across a replace, and across an agent restart, which leaves the table in place).
//!
//! - `prerouting` and `output` (priority -110, ahead of kube-proxy's dstnat chains) send packets
//!   for a local address to `mappings`: from the fabric, from pods, and from the node itself.
//! - `mappings` has one DNAT rule per mapping and pod address, narrowed to the mapping's host
//!   address when it has one.
//! - `postrouting` (priority 90, ahead of srcnat) jumps to `masq-replies`, which masquerades the two cases whose reply would not come back through the node:
//!   a pod reaching its own hostPort (hairpin), and the node reaching a hostPort on 127.0.0.1
//!   (the reply must not be addressed to loopback).
//! - `guard` (prerouting, raw) drops what a pod sends to 127.0.0.0/8: host veths of pods with
//!   localhost mappings have `route_localnet` on, which would otherwise let the pod reach the
//!   node's loopback services.
//!
//! NetworkPolicy still applies: after DNAT the packet is forwarded to the pod and meets the
//! pod's ingress rules in `inet sepal` with its real source.

use crate::nft_runner::NftRunner;
use std::fmt::Write as _;
use std::net::IpAddr;

pub const TABLE: &str = "sepal-hostports";
const FAMILY_TABLE: &str = "inet sepal-hostports";
const POD_IFACES: &str = "\"sep*\"";

/// One mapping to one pod address.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct HostPort {
    /// `tcp`, `udp` or `sctp`.
    pub protocol: &'static str,
    /// The node address it is reached on; `None` or unspecified: every local address.
    pub host_ip: Option<IpAddr>,
    pub host_port: u16,
    pub pod_ip: IpAddr,
    pub container_port: u16,
    /// `namespace/name` of the pod, written as the rule's comment.
    pub owner: String,
}

fn family(ip: IpAddr) -> &'static str {
    if ip.is_ipv4() {
        "ip"
    } else {
        "ip6"
    }
}

fn dnat_rule(m: &HostPort) -> String {
    let fam = family(m.pod_ip);
    let mut rule = String::new();
    match m.host_ip.filter(|h| !h.is_unspecified()) {
        Some(h) => write!(rule, "{fam} daddr {h} ").unwrap(),
        None => write!(
            rule,
            "meta nfproto {} ",
            if m.pod_ip.is_ipv4() { "ipv4" } else { "ipv6" }
        )
        .unwrap(),
    }
    let to = match m.pod_ip {
        IpAddr::V4(a) => format!("{a}:{}", m.container_port),
        IpAddr::V6(a) => format!("[{a}]:{}", m.container_port),
    };
    write!(
        rule,
        "meta l4proto {} th dport {} counter dnat {fam} to {to} comment \"{}\"",
        m.protocol,
        m.host_port,
        comment(&m.owner)
    )
    .unwrap();
    rule
}

/// nft comments are quoted strings of at most 128 bytes; pod names are DNS labels, but be safe.
fn comment(owner: &str) -> String {
    let mut c: String = owner.chars().filter(|c| *c != '"' && *c != '\\').collect();
    c.truncate(120);
    c
}

/// The batch that makes the table exactly `mappings` (or removes it when there are none), in one
/// transaction. Pure, so the layout is unit-tested without a kernel.
pub fn render(mappings: &[HostPort]) -> String {
    let mut out = format!("table {FAMILY_TABLE} {{}}\ndelete table {FAMILY_TABLE}\n");
    if mappings.is_empty() {
        return out;
    }
    let mut pods: Vec<IpAddr> = mappings.iter().map(|m| m.pod_ip).collect();
    pods.sort();
    pods.dedup();
    let localhost = mappings.iter().any(|m| {
        m.pod_ip.is_ipv4()
            && m.host_ip
                .is_none_or(|h| h.is_unspecified() || h.is_loopback())
    });
    writeln!(out, "table {FAMILY_TABLE} {{").unwrap();
    writeln!(
        out,
        "  chain guard {{ type filter hook prerouting priority raw; policy accept;\n    iifname {POD_IFACES} ip daddr 127.0.0.0/8 counter drop\n  }}"
    )
    .unwrap();
    // -110: just ahead of dstnat (-100), where kube-proxy maps Services. The named priority
    // is not accepted on the output hook, so both use the number.
    for hook in ["prerouting", "output"] {
        writeln!(
            out,
            "  chain {hook} {{ type nat hook {hook} priority -110; policy accept;\n    fib daddr type local jump mappings\n  }}"
        )
        .unwrap();
    }
    writeln!(out, "  chain mappings {{").unwrap();
    for m in mappings {
        writeln!(out, "    {}", dnat_rule(m)).unwrap();
    }
    writeln!(out, "  }}").unwrap();
    writeln!(
        out,
        "  chain postrouting {{ type nat hook postrouting priority 90; policy accept;\n    oifname {POD_IFACES} ct status dnat jump masq-replies\n  }}"
    )
    .unwrap();
    writeln!(out, "  chain masq-replies {{").unwrap();
    if localhost {
        writeln!(out, "    ip saddr 127.0.0.0/8 counter masquerade").unwrap();
    }
    for p in pods {
        let fam = family(p);
        writeln!(
            out,
            "    {fam} saddr {p} {fam} daddr {p} counter masquerade"
        )
        .unwrap();
    }
    writeln!(out, "  }}\n}}").unwrap();
    out
}

/// Programs the table, sending a batch only when the mappings changed since the last one this
/// process applied. The first apply after a start always replaces the table (adoption: the old
/// table kept mapping until then).
#[derive(Debug, Default)]
pub struct HostPorts {
    runner: NftRunner,
    last: Option<Vec<HostPort>>,
}

impl HostPorts {
    /// Makes the table hold exactly `mappings`; true when the kernel was changed.
    pub fn apply(&mut self, mut mappings: Vec<HostPort>) -> Result<bool, crate::exec::ExecError> {
        mappings.sort();
        mappings.dedup();
        if self.last.as_ref() == Some(&mappings) {
            return Ok(false);
        }
        self.last = None;
        self.runner.batch(&render(&mappings))?;
        self.last = Some(mappings);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hp(host_ip: Option<&str>, proto: &'static str, pod: &str) -> HostPort {
        HostPort {
            protocol: proto,
            host_ip: host_ip.map(|h| h.parse().unwrap()),
            host_port: 54323,
            pod_ip: pod.parse().unwrap(),
            container_port: 8080,
            owner: "ns/pod".into(),
        }
    }

    #[test]
    fn no_mappings_removes_the_table() {
        let batch = render(&[]);
        assert_eq!(
            batch,
            "table inet sepal-hostports {}\ndelete table inet sepal-hostports\n"
        );
    }

    #[test]
    fn each_mapping_is_one_dnat_narrowed_to_its_host_address() {
        let batch = render(&[
            hp(Some("127.0.0.1"), "tcp", "10.1.0.2"),
            hp(Some("10.0.1.2"), "tcp", "10.1.0.3"),
            hp(Some("10.0.1.2"), "udp", "10.1.0.4"),
            hp(None, "tcp", "fd00:1::5"),
        ]);
        for want in [
            "ip daddr 127.0.0.1 meta l4proto tcp th dport 54323 counter dnat ip to 10.1.0.2:8080",
            "ip daddr 10.0.1.2 meta l4proto udp th dport 54323 counter dnat ip to 10.1.0.4:8080",
            "meta nfproto ipv6 meta l4proto tcp th dport 54323 counter dnat ip6 to [fd00:1::5]:8080",
            "ip saddr 10.1.0.3 ip daddr 10.1.0.3 counter masquerade",
            "ip6 saddr fd00:1::5 ip6 daddr fd00:1::5 counter masquerade",
            "ip saddr 127.0.0.0/8 counter masquerade",
            "fib daddr type local jump mappings",
            "iifname \"sep*\" ip daddr 127.0.0.0/8 counter drop",
        ] {
            assert!(batch.contains(want), "missing {want:?} in\n{batch}");
        }
        // Removal and the new table are one batch: one transaction.
        assert!(batch.starts_with("table inet sepal-hostports {}\ndelete table"));
    }

    #[test]
    fn no_loopback_masquerade_without_a_localhost_mapping() {
        let batch = render(&[hp(Some("10.0.1.2"), "tcp", "10.1.0.3")]);
        assert!(!batch.contains("127.0.0.0/8 counter masquerade"), "{batch}");
    }
}
