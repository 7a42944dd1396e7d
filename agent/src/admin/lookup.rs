//! `ip route get` over netlink: the kernel's own forwarding decision for one destination, as a
//! packet from a pod's veth would meet it (input lookup with `iif`) or as the node sends it.

use super::RouteLookup;
use futures::TryStreamExt;
use rtnetlink::packet_route::route::{
    RouteAddress, RouteAttribute, RouteMessage, RouteNextHop, RouteType,
};
use rtnetlink::packet_route::AddressFamily;
use rtnetlink::Handle;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Where the packet enters the node: from this source address on this interface.
pub struct Ingress {
    pub src: IpAddr,
    pub ifindex: u32,
}

fn query(dst: IpAddr, ingress: Option<&Ingress>) -> RouteMessage {
    let mut msg = RouteMessage::default();
    let (family, bits) = match dst {
        IpAddr::V4(_) => (AddressFamily::Inet, 32),
        IpAddr::V6(_) => (AddressFamily::Inet6, 128),
    };
    msg.header.address_family = family;
    msg.header.destination_prefix_length = bits;
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(dst)));
    if let Some(i) = ingress {
        msg.header.source_prefix_length = bits;
        msg.attributes
            .push(RouteAttribute::Source(RouteAddress::from(i.src)));
        msg.attributes.push(RouteAttribute::Iif(i.ifindex));
    }
    msg
}

fn address(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn kind_name(kind: RouteType) -> String {
    match kind {
        RouteType::Unicast => "unicast".into(),
        RouteType::Local => "local".into(),
        RouteType::BlackHole => "blackhole".into(),
        RouteType::Unreachable => "unreachable".into(),
        RouteType::Prohibit => "prohibit".into(),
        other => format!("{other:?}").to_ascii_lowercase(),
    }
}

/// Reads the kernel's answer: type, first next hop's device and gateway, preferred source.
fn describe(msg: &RouteMessage, names: &BTreeMap<u32, String>) -> RouteLookup {
    let mut out = RouteLookup {
        kind: kind_name(msg.header.kind),
        ..RouteLookup::default()
    };
    let mut hops: &[RouteNextHop] = &[];
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Oif(i) => out.device = names.get(i).cloned(),
            RouteAttribute::Gateway(g) => out.gateway = address(g),
            RouteAttribute::PrefSource(s) => out.source = address(s),
            RouteAttribute::MultiPath(h) => hops = h,
            _ => {}
        }
    }
    if let Some(h) = hops.first() {
        out.device = out
            .device
            .or_else(|| names.get(&h.interface_index).cloned());
        out.gateway = out.gateway.or_else(|| {
            h.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(g) => address(g),
                _ => None,
            })
        });
    }
    out
}

/// The kernel answers a lookup that hits a drop route with that route's error (fib_props in
/// the kernel): a blackhole gives EINVAL, unreachable EHOSTUNREACH, prohibit EACCES.
fn refused(e: &rtnetlink::Error) -> RouteLookup {
    let kind = match sepal_felix::links::errno(e) {
        Some(libc::EINVAL) => "blackhole",
        Some(libc::EHOSTUNREACH) => "unreachable",
        Some(libc::EACCES) => "prohibit",
        _ => "error",
    };
    let error = match kind {
        "error" => e.to_string(),
        drop => format!("dropped: the kernel's route to it is {drop}"),
    };
    RouteLookup {
        kind: kind.into(),
        error: Some(error),
        ..RouteLookup::default()
    }
}

async fn get(handle: &Handle, msg: RouteMessage) -> Result<Option<RouteMessage>, rtnetlink::Error> {
    handle.route().get(msg).execute().try_next().await
}

/// The kernel's route for `dst`, looked up as input from `ingress` when given; an input lookup
/// the kernel refuses (e.g. reverse-path filtering) falls back to the node's own lookup.
pub async fn route_get(handle: &Handle, dst: IpAddr, ingress: Option<Ingress>) -> RouteLookup {
    let names: BTreeMap<u32, String> = sepal_felix::links::all_links(handle)
        .await
        .unwrap_or_default()
        .into_iter()
        .map(|l| (l.index, l.name))
        .collect();
    let mut answer = match &ingress {
        Some(i) => get(handle, query(dst, Some(i))).await,
        None => get(handle, query(dst, None)).await,
    };
    if ingress.is_some() && answer.is_err() {
        answer = get(handle, query(dst, None)).await;
    }
    match answer {
        Ok(Some(msg)) => describe(&msg, &names),
        Ok(None) => RouteLookup {
            kind: "none".into(),
            error: Some("the kernel returned no route".into()),
            ..RouteLookup::default()
        },
        Err(e) => refused(&e),
    }
}
