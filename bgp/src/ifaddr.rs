//! This host's IPv6 address beside a session's IPv4 address: the next hop of IPv6 routes sent
//! over an IPv4 session. A route's next hop must be of its own family (RFC 4760), and the peer
//! can only use one on the link it shares with us; a node with a link to each of two ToRs needs
//! a different one per session, so it comes from the session's interface, not from settings.

use std::net::IpAddr;

/// Among `(interface, address)` pairs, the first global IPv6 address on the interface that holds
/// `local` (an IPv4 address). None when `local` is IPv6 or its interface has no such address.
pub(crate) fn pick_v6(addrs: &[(String, IpAddr)], local: IpAddr) -> Option<IpAddr> {
    if !local.is_ipv4() {
        return None;
    }
    let (iface, _) = addrs.iter().find(|(_, a)| *a == local)?;
    addrs.iter().find_map(|(i, a)| match a {
        IpAddr::V6(v6)
            if i == iface
                && !v6.is_loopback()
                && !v6.is_unspecified()
                && !v6.is_multicast()
                && !v6.is_unicast_link_local() =>
        {
            Some(*a)
        }
        _ => None,
    })
}

/// `pick_v6` over this network namespace's interfaces as the kernel lists them now.
pub(crate) fn ipv6_beside(local: IpAddr) -> Option<IpAddr> {
    if !local.is_ipv4() {
        return None;
    }
    let addrs: Vec<(String, IpAddr)> = nix::ifaddrs::getifaddrs()
        .ok()?
        .filter_map(|i| {
            let addr = i.address?;
            let ip = if let Some(v4) = addr.as_sockaddr_in() {
                IpAddr::V4(v4.ip())
            } else {
                IpAddr::V6(addr.as_sockaddr_in6()?.ip())
            };
            Some((i.interface_name, ip))
        })
        .collect();
    pick_v6(&addrs, local)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, IpAddr)> {
        list.iter()
            .map(|(i, a)| (i.to_string(), a.parse().unwrap()))
            .collect()
    }

    #[test]
    fn the_global_ipv6_address_of_the_sessions_interface() {
        let addrs = pairs(&[
            ("lo", "127.0.0.1"),
            ("lo", "::1"),
            ("eth0", "10.0.1.2"),
            ("eth0", "fe80::1"),
            ("eth0", "fd00:0:1::2"),
            ("eth1", "10.1.1.2"),
            ("eth1", "fe80::2"),
            ("eth1", "fd00:1:1::2"),
            ("eth2", "10.2.1.2"),
            ("eth2", "fe80::3"),
        ]);
        let pick = |local: &str| pick_v6(&addrs, local.parse().unwrap());
        assert_eq!(pick("10.0.1.2"), Some("fd00:0:1::2".parse().unwrap()));
        assert_eq!(pick("10.1.1.2"), Some("fd00:1:1::2".parse().unwrap()));
        // Only a link-local address there, or the session is not over IPv4, or unknown.
        assert_eq!(pick("10.2.1.2"), None);
        assert_eq!(pick("fd00:0:1::2"), None);
        assert_eq!(pick("192.0.2.1"), None);
    }

    #[test]
    fn loopback_has_no_global_ipv6_beside_it() {
        assert_eq!(ipv6_beside("127.0.0.1".parse().unwrap()), None);
    }
}
