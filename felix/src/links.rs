//! Host-side links Sepal owns: veths named `sep…` (and their retired `sepx…` tombstones), plus the
//! rtnetlink connection helper and the default-route interface's MTU the pods inherit.

use futures::TryStreamExt;
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{RouteAttribute, RouteHeader};
use netlink_packet_route::AddressFamily;
use rtnetlink::Handle;
use std::io;

/// errno values the kernel answers with when the thing asked about is not there.
pub(crate) const ENODEV: i32 = libc::ENODEV;

/// Opens an rtnetlink connection in the network namespace of the calling thread and drives it
/// on the current tokio runtime (so a test thread that did setns gets a handle for its netns).
pub fn connect() -> io::Result<Handle> {
    let (connection, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(connection);
    Ok(handle)
}

/// The errno of a netlink error answer, if it is one (positive, e.g. `libc::EEXIST`).
pub fn errno(err: &rtnetlink::Error) -> Option<i32> {
    match err {
        rtnetlink::Error::NetlinkError(msg) => msg.code.map(|c| -c.get()),
        _ => None,
    }
}

/// One link as Sepal cares about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: Option<u32>,
}

fn to_link(msg: &LinkMessage) -> Option<Link> {
    let mut name = None;
    let mut mtu = None;
    for attr in &msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => name = Some(n.clone()),
            LinkAttribute::Mtu(m) => mtu = Some(*m),
            _ => {}
        }
    }
    Some(Link {
        index: msg.header.index,
        name: name?,
        mtu,
    })
}

/// Every link of this namespace.
pub async fn all_links(handle: &Handle) -> Result<Vec<Link>, rtnetlink::Error> {
    let msgs: Vec<LinkMessage> = handle.link().get().execute().try_collect().await?;
    Ok(msgs.iter().filter_map(to_link).collect())
}

/// Links whose name starts with `prefix` (Sepal's host veths: `sep`; tombstones: `sepx`).
pub async fn links_with_prefix(
    handle: &Handle,
    prefix: &str,
) -> Result<Vec<Link>, rtnetlink::Error> {
    Ok(all_links(handle)
        .await?
        .into_iter()
        .filter(|l| l.name.starts_with(prefix))
        .collect())
}

/// The link called `name`, or None when there is none.
pub async fn link_by_name(handle: &Handle, name: &str) -> Result<Option<Link>, rtnetlink::Error> {
    let mut stream = handle.link().get().match_name(name.to_string()).execute();
    match stream.try_next().await {
        Ok(Some(msg)) => Ok(to_link(&msg)),
        Ok(None) => Ok(None),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Deletes the link called `name`. Idempotent: a link that is already gone is success.
/// Returns whether a link was deleted.
pub async fn delete_link(handle: &Handle, name: &str) -> Result<bool, rtnetlink::Error> {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    match handle.link().del_with_message(msg).execute().await {
        Ok(()) => Ok(true),
        Err(e) if errno(&e) == Some(ENODEV) => Ok(false),
        Err(e) => Err(e),
    }
}

/// MTU of the interface the IPv4 default route (main table) leaves through; None when there is
/// no such route. Pods get this MTU so they never send what the uplink cannot carry.
pub async fn default_route_mtu(handle: &Handle) -> Result<Option<u32>, rtnetlink::Error> {
    let mut query = rtnetlink::RouteMessageBuilder::<std::net::Ipv4Addr>::new().build();
    query.header.address_family = AddressFamily::Inet;
    let routes: Vec<_> = handle.route().get(query).execute().try_collect().await?;
    let oif = routes.iter().find_map(|r| {
        if r.header.destination_prefix_length != 0 || r.header.table != RouteHeader::RT_TABLE_MAIN {
            return None;
        }
        r.attributes.iter().find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(*i),
            RouteAttribute::MultiPath(hops) => hops.first().map(|h| h.interface_index),
            _ => None,
        })
    });
    let Some(oif) = oif else { return Ok(None) };
    let mut stream = handle.link().get().match_index(oif).execute();
    Ok(stream
        .try_next()
        .await?
        .as_ref()
        .and_then(to_link)
        .and_then(|l| l.mtu))
}
