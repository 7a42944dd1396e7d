//! Namespace plumbing of one attachment over rtnetlink: the veth pair, host-side sysctls, the pod
//! side's addresses and routes, removal, and the CHECK of all of it. No subprocesses.

use crate::api::{HOST_VETH_MAC, POD_GATEWAY_V4};
use crate::netlink::Netlink;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::{
    AddressAttribute, AddressFlags, AddressHeaderFlags, AddressMessage, AddressScope,
};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use nix::sched::{setns, CloneFlags};
use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;

/// The pod's IPv6 gateway: the host veth's EUI-64 link-local address (from its fixed MAC).
pub const POD_GATEWAY_V6: Ipv6Addr = link_local_from_mac(HOST_VETH_MAC);

/// EUI-64 link-local address for `mac`, as the kernel derives it with `addr_gen_mode` eui64.
pub const fn link_local_from_mac(mac: [u8; 6]) -> Ipv6Addr {
    Ipv6Addr::new(
        0xfe80,
        0,
        0,
        0,
        (((mac[0] ^ 0x02) as u16) << 8) | mac[1] as u16,
        ((mac[2] as u16) << 8) | 0xff,
        0xfe00 | mac[3] as u16,
        ((mac[4] as u16) << 8) | mac[5] as u16,
    )
}

pub fn format_mac(mac: &[u8]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The plugin's own network namespace (the node's), to come back to after opening a socket in
/// a pod's namespace.
pub struct HostNetns {
    file: File,
}

impl HostNetns {
    pub fn current() -> io::Result<HostNetns> {
        Ok(HostNetns {
            file: File::open("/proc/thread-self/ns/net")?,
        })
    }

    /// Whether `other` is this same namespace (same nsfs inode).
    pub fn is_same(&self, other: &File) -> io::Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (self.file.metadata()?, other.metadata()?);
        Ok(a.dev() == b.dev() && a.ino() == b.ino())
    }

    /// Opens a netlink socket inside `target`. The thread enters `target` only for the socket()
    /// call (a netlink socket stays bound to the namespace it was created in) and comes straight
    /// back; if it cannot come back, the error says so and nothing else may run.
    pub fn netlink_in(&self, target: &File) -> io::Result<Netlink> {
        setns(target, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
        let nl = Netlink::open();
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|e| {
            io::Error::other(format!(
                "cannot return to the node's network namespace: {e}"
            ))
        })?;
        nl
    }
}

fn link_by_name(name: &str) -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    msg
}

/// The pod side's MAC: derived from the attachment, so a repeated ADD reports the same result.
/// Locally administered unicast; it only has to be unique on its own point-to-point link.
pub fn pod_mac(container_id: &str, ifname: &str) -> [u8; 6] {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{container_id}/{ifname}").as_bytes());
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&digest[..6]);
    mac[0] = (mac[0] & 0xfc) | 0x02;
    mac
}

/// Creates the pair in one request: `host` here (MAC ee:ee:ee:ee:ee:ee, up) and its peer
/// `ifname` (MAC `pod_mac`) directly inside `pod_ns`, so the pod side never exists in the node's
/// namespace. The host side's alias records `owner`, the sandbox's container ID (see
/// `veth_owner`).
pub fn create_veth(
    nl: &mut Netlink,
    host: &str,
    ifname: &str,
    pod_mac: [u8; 6],
    pod_ns: &File,
    mtu: Option<u32>,
    owner: &str,
) -> io::Result<()> {
    let mut peer = LinkMessage::default();
    peer.attributes
        .push(LinkAttribute::IfName(ifname.to_string()));
    peer.attributes
        .push(LinkAttribute::Address(pod_mac.to_vec()));
    peer.attributes
        .push(LinkAttribute::NetNsFd(pod_ns.as_raw_fd()));
    let mut msg = link_by_name(host);
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    msg.attributes
        .push(LinkAttribute::Address(HOST_VETH_MAC.to_vec()));
    if let Some(mtu) = mtu {
        msg.attributes.push(LinkAttribute::Mtu(mtu));
        peer.attributes.push(LinkAttribute::Mtu(mtu));
    }
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
    ]));
    nl.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)?;
    // The kernel ignores an alias on creation; set after, and only on the pair just made (a
    // batch would also run it when the name was taken by another pair).
    let mut alias = link_by_name(host);
    alias
        .attributes
        .push(LinkAttribute::IfAlias(owner.to_string()));
    nl.request(RouteNetlinkMessage::SetLink(alias), 0)
}

/// The container ID a host veth was created for (its alias), `None` when it has none (made by
/// an older plugin) or does not exist. A host veth is named after the pod, not the sandbox: a
/// runtime repeating DEL for a dead sandbox after the pod's new sandbox took the name must not
/// remove the new one's pair.
pub fn veth_owner(nl: &mut Netlink, host: &str) -> io::Result<Option<String>> {
    match get_link(nl, host) {
        Ok(link) => Ok(link.attributes.into_iter().find_map(|a| match a {
            LinkAttribute::IfAlias(alias) if !alias.is_empty() => Some(alias),
            _ => None,
        })),
        Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes a link by name (a veth takes its peer with it). `Ok(false)` when there was none.
pub fn delete_link(nl: &mut Netlink, name: &str) -> io::Result<bool> {
    match nl.request(RouteNetlinkMessage::DelLink(link_by_name(name)), 0) {
        Ok(()) => Ok(true),
        Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Takes a host veth out of service without paying for unregistering it (see
/// `api::tombstone_name`): down, then renamed to its tombstone, in one batch. `Ok(false)` when
/// there is no such link. If a tombstone of that name still exists, falls back to deleting.
pub fn retire_veth(nl: &mut Netlink, host: &str) -> io::Result<bool> {
    let index = match get_link(nl, host) {
        Ok(link) => link.header.index,
        Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => return Ok(false),
        Err(e) => return Err(e),
    };
    let mut down = LinkMessage::default();
    down.header.index = index;
    down.header.change_mask = LinkFlags::Up;
    // A device must be down to be renamed: two messages, in this order, one round trip.
    let mut rename = LinkMessage::default();
    rename.header.index = index;
    rename
        .attributes
        .push(LinkAttribute::IfName(crate::api::tombstone_name(host)));
    let mut results = nl.batch(vec![
        (RouteNetlinkMessage::SetLink(down), 0),
        (RouteNetlinkMessage::SetLink(rename), 0),
    ])?;
    let renamed = results
        .pop()
        .unwrap_or_else(|| Err(io::Error::other("no ack")));
    match renamed {
        Ok(()) => Ok(true),
        // Gone since the lookup: the kernel removes a pair with its pod's network namespace,
        // and that namespace may have just been torn down (DEL after the sandbox is gone).
        Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => Ok(false),
        Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST) => delete_link(nl, host),
        Err(e) => Err(e),
    }
}

/// Names of every link in the socket's namespace.
pub fn link_names(nl: &mut Netlink) -> io::Result<Vec<String>> {
    Ok(nl
        .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))?
        .into_iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewLink(link) => {
                link.attributes.into_iter().find_map(|a| match a {
                    LinkAttribute::IfName(name) => Some(name),
                    _ => None,
                })
            }
            _ => None,
        })
        .collect())
}

/// If `host`'s veth peer lives in `pod_nl`'s namespace, its name there: each end's IFLA_LINK
/// is the other's index.
pub fn peer_in(nl: &mut Netlink, host: &str, pod_nl: &mut Netlink) -> io::Result<Option<String>> {
    let peer_of = |link: &LinkMessage| {
        link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Link(index) => Some(*index),
            _ => None,
        })
    };
    let host_link = match get_link(nl, host) {
        Ok(link) => link,
        Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => return Ok(None),
        Err(e) => return Err(e),
    };
    let Some(peer_index) = peer_of(&host_link) else {
        return Ok(None);
    };
    let mut query = LinkMessage::default();
    query.header.index = peer_index;
    let peer = match pod_nl.get(RouteNetlinkMessage::GetLink(query)) {
        Ok(RouteNetlinkMessage::NewLink(link)) => link,
        Ok(_) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => return Ok(None),
        Err(e) => return Err(e),
    };
    if peer_of(&peer) != Some(host_link.header.index) {
        return Ok(None);
    }
    Ok(peer.attributes.into_iter().find_map(|a| match a {
        LinkAttribute::IfName(name) => Some(name),
        _ => None,
    }))
}

pub fn set_up(nl: &mut Netlink, name: &str) -> io::Result<()> {
    let mut msg = link_by_name(name);
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    nl.request(RouteNetlinkMessage::SetLink(msg), 0)
}

/// Whether a link of this name exists.
pub fn link_exists(nl: &mut Netlink, name: &str) -> io::Result<bool> {
    match get_link(nl, name) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(nix::libc::ENODEV) => Ok(false),
        Err(e) => Err(e),
    }
}

pub fn set_mtu(nl: &mut Netlink, name: &str, mtu: u32) -> io::Result<()> {
    let mut msg = link_by_name(name);
    msg.attributes.push(LinkAttribute::Mtu(mtu));
    nl.request(RouteNetlinkMessage::SetLink(msg), 0)
}

/// Host-side sysctls of the veth: proxy ARP answers for the pod's gateway 169.254.1.1 without
/// delay and both families forward. With an IPv6 pod, the host side must have its EUI-64
/// link-local (the pod's v6 gateway): IPv6 on, `addr_gen_mode` eui64 (0) whatever the node's
/// default, and no DAD so it answers as soon as the pod side comes up. Written before the pod
/// side is up (the link-local appears with carrier). /proc/sys shows the writer's namespace.
pub fn set_host_sysctls(host: &str, ipv6: bool) -> io::Result<()> {
    let write = |path: String, value: &str| {
        std::fs::write(&path, value).map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
    };
    write(format!("/proc/sys/net/ipv4/conf/{host}/proxy_arp"), "1")?;
    write(format!("/proc/sys/net/ipv4/neigh/{host}/proxy_delay"), "0")?;
    write(format!("/proc/sys/net/ipv4/conf/{host}/forwarding"), "1")?;
    let mut v6: Vec<(&str, &str)> = vec![("forwarding", "1")];
    if ipv6 {
        v6 = vec![
            ("disable_ipv6", "0"),
            ("addr_gen_mode", "0"),
            ("accept_dad", "0"),
            ("forwarding", "1"),
        ];
    }
    for (key, value) in v6 {
        match write(format!("/proc/sys/net/ipv6/conf/{host}/{key}"), value) {
            // A node without IPv6 has no such directory; only an IPv6 pod needs it.
            Err(e) if e.kind() == io::ErrorKind::NotFound && !ipv6 => {}
            other => other?,
        }
    }
    Ok(())
}

/// `route_localnet` on the host veth, for a pod with a hostPort the node reaches on 127.0.0.1:
/// the reply to such a connection comes back from the pod with 127.0.0.1 as its source once
/// conntrack undoes the DNAT, and the kernel drops a loopback source arriving on any other
/// interface without it. The hostport table drops what a pod itself sends to 127.0.0.0/8, so this
/// opens nothing to the pod (the hole CVE-2020-8558 describes).
pub fn set_route_localnet(host: &str) -> io::Result<()> {
    let path = format!("/proc/sys/net/ipv4/conf/{host}/route_localnet");
    std::fs::write(&path, "1").map_err(|e| io::Error::new(e.kind(), format!("{path}: {e}")))
}

/// What the pod side looks like once configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodLink {
    pub index: u32,
    pub mac: String,
}

/// Looks a link up by name: index, MAC, flags, MTU.
pub fn get_link(nl: &mut Netlink, name: &str) -> io::Result<LinkMessage> {
    match nl.get(RouteNetlinkMessage::GetLink(link_by_name(name)))? {
        RouteNetlinkMessage::NewLink(link) => Ok(link),
        other => Err(io::Error::other(format!(
            "unexpected reply to GETLINK: {other:?}"
        ))),
    }
}

fn link_mac(link: &LinkMessage) -> String {
    link.attributes
        .iter()
        .find_map(|a| match a {
            LinkAttribute::Address(mac) => Some(format_mac(mac)),
            _ => None,
        })
        .unwrap_or_default()
}

fn address(index: u32, ip: IpAddr) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header.family = family(ip);
    msg.header.prefix_len = if ip.is_ipv4() { 32 } else { 128 };
    msg.header.scope = AddressScope::Universe;
    msg.header.index = index;
    msg.attributes.push(AddressAttribute::Local(ip));
    msg.attributes.push(AddressAttribute::Address(ip));
    if ip.is_ipv6() {
        // The /128 is unique by allocation; DAD would only delay it by a second.
        msg.header.flags = AddressHeaderFlags::Nodad;
        msg.attributes
            .push(AddressAttribute::Flags(AddressFlags::Nodad));
    }
    msg
}

fn family(ip: IpAddr) -> AddressFamily {
    if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn route(index: u32, dst: IpAddr, prefix: u8, gateway: Option<IpAddr>) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = family(dst);
    msg.header.destination_prefix_length = prefix;
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::Boot;
    msg.header.kind = RouteType::Unicast;
    msg.header.scope = if gateway.is_none() && dst.is_ipv4() {
        RouteScope::Link
    } else {
        RouteScope::Universe
    };
    if prefix > 0 {
        msg.attributes
            .push(RouteAttribute::Destination(RouteAddress::from(dst)));
    }
    if let Some(gw) = gateway {
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::from(gw)));
    }
    msg.attributes.push(RouteAttribute::Oif(index));
    msg
}

/// A permanent neighbour entry in the pod for its gateway `gw`, at the host veth's fixed MAC.
///
/// Without it the pod resolves 169.254.1.1 by ARP, which the host answers by proxy ARP only
/// while the node itself has a route to 169.254.1.1 out of another interface (its default
/// route): a node whose routes all come from BGP, with the ToR's default refused, would leave
/// every pod's gateway FAILED. With it, the pod's connectivity depends on nothing in the node's
/// routing table. IPv6 gets one too: the host answers NDP for its own link-local anyway, but
/// the entry spares the pod the solicitation and keeps both families alike.
fn gateway_neighbour(index: u32, gw: IpAddr) -> NeighbourMessage {
    let mut msg = NeighbourMessage::default();
    msg.header.family = family(gw);
    msg.header.ifindex = index;
    msg.header.state = NeighbourState::Permanent;
    msg.header.kind = RouteType::Unicast;
    msg.attributes
        .push(NeighbourAttribute::Destination(NeighbourAddress::from(gw)));
    msg.attributes
        .push(NeighbourAttribute::LinkLayerAddress(HOST_VETH_MAC.to_vec()));
    msg
}

/// The gateways of a pod with addresses `ips`: 169.254.1.1 with IPv4, the host veth's
/// link-local with IPv6.
fn gateways(ips: &[IpAddr]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    if ips.iter().any(IpAddr::is_ipv4) {
        out.push(IpAddr::V4(POD_GATEWAY_V4));
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        out.push(IpAddr::V6(POD_GATEWAY_V6));
    }
    out
}

/// Configures the pod side over a socket opened in the pod's namespace, in one batch: MTU and
/// up, the /32 and /128, a scope-link route to 169.254.1.1, the default routes and a permanent
/// neighbour entry for each gateway.
pub fn configure_pod(
    nl: &mut Netlink,
    ifname: &str,
    ips: &[IpAddr],
    mtu: Option<u32>,
) -> io::Result<PodLink> {
    let link = get_link(nl, ifname)?;
    let index = link.header.index;
    let mut up = LinkMessage::default();
    up.header.index = index;
    up.header.flags = LinkFlags::Up;
    up.header.change_mask = LinkFlags::Up;
    if let Some(mtu) = mtu {
        up.attributes.push(LinkAttribute::Mtu(mtu));
    }
    let upsert = NLM_F_CREATE | NLM_F_REPLACE;
    let mut batch = vec![(RouteNetlinkMessage::SetLink(up), 0)];
    for ip in ips {
        batch.push((RouteNetlinkMessage::NewAddress(address(index, *ip)), upsert));
    }
    if ips.iter().any(IpAddr::is_ipv4) {
        let gw = IpAddr::V4(POD_GATEWAY_V4);
        batch.push((
            RouteNetlinkMessage::NewRoute(route(index, gw, 32, None)),
            upsert,
        ));
        let any = IpAddr::V4(Ipv4Addr::UNSPECIFIED);
        batch.push((
            RouteNetlinkMessage::NewRoute(route(index, any, 0, Some(gw))),
            upsert,
        ));
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        let any = IpAddr::V6(Ipv6Addr::UNSPECIFIED);
        let gw = IpAddr::V6(POD_GATEWAY_V6);
        batch.push((
            RouteNetlinkMessage::NewRoute(route(index, any, 0, Some(gw))),
            upsert,
        ));
    }
    for gw in gateways(ips) {
        batch.push((
            RouteNetlinkMessage::NewNeighbour(gateway_neighbour(index, gw)),
            upsert,
        ));
    }
    for (i, result) in nl.batch(batch)?.into_iter().enumerate() {
        let what = if i == 0 {
            "set link up"
        } else {
            "add address, route or gateway neighbour"
        };
        result.map_err(|e| io::Error::new(e.kind(), format!("{what} on {ifname}: {e}")))?;
    }
    Ok(PodLink {
        index,
        mac: link_mac(&link),
    })
}

/// CHECK of the pod side: `ifname` is up, holds every address in `ips` (and `mac` when given),
/// and has the gateway routes ADD installs. Returns what differs.
pub fn check_pod(
    nl: &mut Netlink,
    ifname: &str,
    ips: &[IpAddr],
    mac: Option<&str>,
) -> Result<(), String> {
    let link = get_link(nl, ifname).map_err(|e| format!("pod interface {ifname}: {e}"))?;
    let index = link.header.index;
    if !link.header.flags.contains(LinkFlags::Up) {
        return Err(format!("pod interface {ifname} is down"));
    }
    if let Some(want) = mac {
        let have = link_mac(&link);
        if !have.eq_ignore_ascii_case(want) {
            return Err(format!(
                "pod interface {ifname} has MAC {have}, prevResult says {want}"
            ));
        }
    }
    let addrs = nl
        .dump(RouteNetlinkMessage::GetAddress(AddressMessage::default()))
        .map_err(|e| format!("list addresses: {e}"))?;
    let have: Vec<IpAddr> = addrs
        .iter()
        .filter_map(|m| match m {
            RouteNetlinkMessage::NewAddress(a) if a.header.index == index => a
                .attributes
                .iter()
                .find_map(|attr| match attr {
                    AddressAttribute::Local(ip) => Some(*ip),
                    _ => None,
                })
                .or_else(|| {
                    a.attributes.iter().find_map(|attr| match attr {
                        AddressAttribute::Address(ip) => Some(*ip),
                        _ => None,
                    })
                }),
            _ => None,
        })
        .collect();
    for ip in ips {
        if !have.contains(ip) {
            return Err(format!("pod interface {ifname} lacks address {ip}"));
        }
    }
    let mut want_routes: Vec<(IpAddr, u8, Option<IpAddr>)> = Vec::new();
    if ips.iter().any(IpAddr::is_ipv4) {
        let gw = IpAddr::V4(POD_GATEWAY_V4);
        want_routes.push((gw, 32, None));
        want_routes.push((IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0, Some(gw)));
    }
    if ips.iter().any(IpAddr::is_ipv6) {
        want_routes.push((
            IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            0,
            Some(IpAddr::V6(POD_GATEWAY_V6)),
        ));
    }
    for fam in [AddressFamily::Inet, AddressFamily::Inet6] {
        let wanted: Vec<_> = want_routes
            .iter()
            .filter(|(dst, _, _)| family(*dst) == fam)
            .collect();
        if wanted.is_empty() {
            continue;
        }
        let mut query = RouteMessage::default();
        query.header.address_family = fam;
        let routes = nl
            .dump(RouteNetlinkMessage::GetRoute(query))
            .map_err(|e| format!("list routes: {e}"))?;
        for (dst, prefix, gw) in wanted {
            let found = routes.iter().any(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => route_matches(r, index, *dst, *prefix, *gw),
                _ => false,
            });
            if !found {
                let via = gw.map(|g| format!(" via {g}")).unwrap_or_default();
                return Err(format!("pod lacks route {dst}/{prefix}{via} dev {ifname}"));
            }
        }
    }
    check_gateway_neighbours(nl, ifname, index, ips)
}

/// The permanent gateway entries ADD writes (see [`gateway_neighbour`]).
fn check_gateway_neighbours(
    nl: &mut Netlink,
    ifname: &str,
    index: u32,
    ips: &[IpAddr],
) -> Result<(), String> {
    let neighbours = nl
        .dump(RouteNetlinkMessage::GetNeighbour(
            NeighbourMessage::default(),
        ))
        .map_err(|e| format!("list neighbours: {e}"))?;
    for gw in gateways(ips) {
        let want = gateway_neighbour(index, gw);
        let found = neighbours.iter().any(|m| match m {
            RouteNetlinkMessage::NewNeighbour(n) => {
                n.header.ifindex == index
                    && n.header.state == NeighbourState::Permanent
                    && want
                        .attributes
                        .iter()
                        .all(|attr| n.attributes.contains(attr))
            }
            _ => false,
        });
        if !found {
            return Err(format!(
                "pod lacks the permanent neighbour {gw} lladdr {} dev {ifname}",
                format_mac(&HOST_VETH_MAC)
            ));
        }
    }
    Ok(())
}

fn route_matches(
    r: &RouteMessage,
    index: u32,
    dst: IpAddr,
    prefix: u8,
    gw: Option<IpAddr>,
) -> bool {
    let table = r
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(r.header.table));
    let oif = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    });
    let rdst = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Destination(d) => Some(d.clone()),
        _ => None,
    });
    let rgw = r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Gateway(g) => Some(g.clone()),
        _ => None,
    });
    let dst_ok = if prefix == 0 {
        rdst.is_none()
    } else {
        rdst == Some(RouteAddress::from(dst))
    };
    table == u32::from(RouteHeader::RT_TABLE_MAIN)
        && oif == Some(index)
        && r.header.destination_prefix_length == prefix
        && dst_ok
        && rgw == gw.map(RouteAddress::from)
}

/// CHECK of the host side: the veth exists, is up, has Sepal's MAC and proxy ARP on.
pub fn check_host(nl: &mut Netlink, host: &str) -> Result<(), String> {
    let link = get_link(nl, host).map_err(|e| format!("host veth {host}: {e}"))?;
    if !link.header.flags.contains(LinkFlags::Up) {
        return Err(format!("host veth {host} is down"));
    }
    let mac = link_mac(&link);
    if mac != format_mac(&HOST_VETH_MAC) {
        return Err(format!(
            "host veth {host} has MAC {mac}, not {}",
            format_mac(&HOST_VETH_MAC)
        ));
    }
    let proxy_arp = std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{host}/proxy_arp"))
        .map_err(|e| format!("host veth {host}: proxy_arp: {e}"))?;
    if proxy_arp.trim() != "1" {
        return Err(format!(
            "host veth {host} has proxy_arp {}",
            proxy_arp.trim()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v6_gateway_is_the_eui64_link_local_of_the_host_mac() {
        assert_eq!(
            POD_GATEWAY_V6,
            "fe80::ecee:eeff:feee:eeee".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            link_local_from_mac([0x02, 0x42, 0xac, 0x11, 0x00, 0x02]),
            "fe80::42:acff:fe11:2".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn pod_macs_are_stable_local_unicast() {
        let a = pod_mac("c1", "eth0");
        assert_eq!(a, pod_mac("c1", "eth0"));
        assert_ne!(a, pod_mac("c2", "eth0"));
        assert_eq!(a[0] & 0x03, 0x02);
    }

    #[test]
    fn macs_format_like_iproute2() {
        assert_eq!(format_mac(&HOST_VETH_MAC), "ee:ee:ee:ee:ee:ee");
        assert_eq!(format_mac(&[0, 1, 0xab, 2, 3, 4]), "00:01:ab:02:03:04");
    }

    #[test]
    fn gateway_routes_are_shaped_like_ip_route() {
        let r = route(7, IpAddr::V4(POD_GATEWAY_V4), 32, None);
        assert_eq!(r.header.scope, RouteScope::Link);
        assert!(route_matches(&r, 7, IpAddr::V4(POD_GATEWAY_V4), 32, None));
        let d = route(
            7,
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            0,
            Some(IpAddr::V4(POD_GATEWAY_V4)),
        );
        assert_eq!(d.header.scope, RouteScope::Universe);
        assert!(route_matches(
            &d,
            7,
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            0,
            Some(IpAddr::V4(POD_GATEWAY_V4))
        ));
        assert!(!route_matches(
            &d,
            8,
            IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            0,
            Some(IpAddr::V4(POD_GATEWAY_V4))
        ));
    }
}
