//! The route reconciler: owns exactly the routes of protocol `ROUTE_PROTO` (83) in the main
//! table, IPv4 and IPv6 — pod /32s and /128s to host veths, node-block blackholes, later BGP routes.
//!
//! The desired state is a map destination → target. `reconcile` dumps the kernel and applies only
//! the difference (adopting what is already right, so a restart changes nothing that is correct);
//! `update`, `install` and `withdraw` work from what this reconciler last wrote, for the per-request
//! fast path. A route of any other protocol or table is never added over, replaced or deleted.

use crate::links::{self, errno};
use crate::route_batch::{BatchSocket, Op, Outcome, BATCH};
use crate::ROUTE_PROTO;
use futures::TryStreamExt;
use ipnetwork::IpNetwork;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteNextHop,
    RouteNextHopFlags, RouteProtocol, RouteScope, RouteType, RouteVia,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::Handle;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

/// Where packets for a destination go.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// Dropped: a node block's unused addresses must never follow the default route.
    Blackhole,
    /// Directly on this interface, scope link: a pod behind its host veth.
    Dev(String),
    /// Through one gateway, or several for ECMP (BGP-learned routes).
    Via(Vec<NextHop>),
}

/// One gateway of a `Target::Via` route.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NextHop {
    pub gateway: IpAddr,
    /// Output interface; None lets the kernel resolve it from the gateway.
    pub dev: Option<String>,
    /// The gateway is on the link even without a covering connected route (BGP next hops).
    pub onlink: bool,
}

/// The routes Sepal wants in the kernel, keyed by destination (in canonical network form).
pub type Desired = BTreeMap<IpNetwork, Target>;

/// A protocol-83 route as found in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRoute {
    pub dst: IpNetwork,
    pub target: Target,
    /// The route's metric, when the kernel reported one (IPv6 always has one).
    pub priority: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("netlink: {context}: {source}")]
    Netlink {
        context: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("route to {dst}: no interface named {dev}")]
    NoSuchLink { dst: IpNetwork, dev: String },
    #[error("route to {dst}: a route Sepal does not own (another protocol) is in the way")]
    Foreign { dst: IpNetwork },
    #[error("route to {dst}: {msg}")]
    Invalid { dst: IpNetwork, msg: String },
    #[error("netlink: {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> RouteError {
    move |source| RouteError::Io {
        context: context.into(),
        source,
    }
}

fn nl(context: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> RouteError {
    let context = context.into();
    move |source| RouteError::Netlink { context, source }
}

/// What a reconcile or update did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    /// Routes already right in the kernel and left alone.
    pub adopted: usize,
    pub added: usize,
    pub replaced: usize,
    pub removed: usize,
    /// Routes that could not be programmed (e.g. their interface is gone); the rest went ahead.
    pub errors: Vec<String>,
}

/// The destination in canonical form (host bits cleared), so `10.0.0.5/24` and `10.0.0.0/24` are
/// one key.
pub fn canonical(net: IpNetwork) -> IpNetwork {
    IpNetwork::new(net.network(), net.prefix()).unwrap_or(net)
}

/// The /32 or /128 of one address.
pub fn host_net(ip: IpAddr) -> IpNetwork {
    IpNetwork::from(ip)
}

/// Does a kernel route carry out what the desired target asks? A next hop without a device
/// matches whatever interface the kernel resolved.
pub fn matches(desired: &Target, kernel: &Target) -> bool {
    match (desired, kernel) {
        (Target::Blackhole, Target::Blackhole) => true,
        (Target::Dev(a), Target::Dev(b)) => a == b,
        (Target::Via(want), Target::Via(have)) => {
            want.len() == have.len()
                && want.iter().all(|w| {
                    have.iter().any(|h| {
                        w.gateway == h.gateway
                            && w.onlink == h.onlink
                            && (w.dev.is_none() || w.dev == h.dev)
                    })
                })
        }
        _ => false,
    }
}

/// Reconciles the kernel's protocol-83 routes in the main table of the handle's namespace.
pub struct RouteReconciler {
    handle: Handle,
    /// What this reconciler last saw in or wrote to the kernel.
    installed: Desired,
    /// Interface indexes looked up during one reconcile or update: a burst of BGP routes out
    /// one interface costs one lookup, not one per route. Cleared at the start of each, so an
    /// interface recreated between them is looked up again.
    ifindexes: std::sync::Mutex<HashMap<String, u32>>,
    /// The socket batched writes go through, once one has been made.
    batch: Option<BatchSocket>,
}

impl RouteReconciler {
    pub fn new(handle: Handle) -> RouteReconciler {
        RouteReconciler {
            handle,
            installed: Desired::new(),
            ifindexes: Default::default(),
            batch: None,
        }
    }

    /// What this reconciler believes is in the kernel (after the last reconcile and updates).
    pub fn installed(&self) -> &Desired {
        &self.installed
    }

    async fn ifindex_names(&self) -> Result<HashMap<u32, String>, RouteError> {
        Ok(links::all_links(&self.handle)
            .await
            .map_err(nl("listing links"))?
            .into_iter()
            .map(|l| (l.index, l.name))
            .collect())
    }

    fn forget_ifindexes(&self) {
        if let Ok(mut m) = self.ifindexes.lock() {
            m.clear();
        }
    }

    async fn ifindex(&self, dst: IpNetwork, dev: &str) -> Result<u32, RouteError> {
        if let Some(i) = self.ifindexes.lock().ok().and_then(|m| m.get(dev).copied()) {
            return Ok(i);
        }
        let index = self.lookup_ifindex(dst, dev).await?;
        if let Ok(mut m) = self.ifindexes.lock() {
            m.insert(dev.to_string(), index);
        }
        Ok(index)
    }

    async fn lookup_ifindex(&self, dst: IpNetwork, dev: &str) -> Result<u32, RouteError> {
        match links::link_by_name(&self.handle, dev)
            .await
            .map_err(nl(format!("looking up {dev}")))?
        {
            Some(l) => Ok(l.index),
            None => Err(RouteError::NoSuchLink {
                dst,
                dev: dev.to_string(),
            }),
        }
    }

    /// Every protocol-83 route of the main table, both families.
    pub async fn kernel_routes(&self) -> Result<Vec<KernelRoute>, RouteError> {
        let names = self.ifindex_names().await?;
        let mut out = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut query = RouteMessage::default();
            query.header.address_family = family;
            let msgs: Vec<RouteMessage> = self
                .handle
                .route()
                .get(query)
                .execute()
                .try_collect()
                .await
                .map_err(nl("dumping routes"))?;
            out.extend(msgs.iter().filter_map(|m| decode(m, &names)));
        }
        Ok(out)
    }

    /// Makes the kernel's protocol-83 routes equal `desired`: adds what is missing, replaces what
    /// differs, deletes what is not desired, leaves correct routes alone. Routes whose interface
    /// is missing are reported in `Report::errors` and skipped; the rest still goes ahead.
    pub async fn reconcile(&mut self, desired: &Desired) -> Result<Report, RouteError> {
        self.forget_ifindexes();
        let kernel = self.kernel_routes().await?;
        let in_kernel: std::collections::HashSet<IpNetwork> =
            kernel.iter().map(|r| r.dst).collect();
        let mut report = Report::default();
        let mut present: Desired = Desired::new();
        for route in kernel {
            let keep = match desired.get(&route.dst) {
                Some(want) => matches(want, &route.target) && !present.contains_key(&route.dst),
                None => false,
            };
            if keep {
                present.insert(route.dst, route.target.clone());
                report.adopted += 1;
            } else if desired.contains_key(&route.dst) && !present.contains_key(&route.dst) {
                // Wrong target: replaced below (a replace keeps the destination routed throughout).
            } else {
                self.delete(&route).await?;
                report.removed += 1;
            }
        }
        self.installed = present;
        for (dst, target) in desired {
            if self.installed.contains_key(dst) {
                continue;
            }
            let existed = in_kernel.contains(dst);
            match self.write(*dst, target, existed).await {
                Ok(()) => {
                    self.installed.insert(*dst, target.clone());
                    if existed {
                        report.replaced += 1
                    } else {
                        report.added += 1
                    }
                }
                Err(e @ (RouteError::NoSuchLink { .. } | RouteError::Foreign { .. })) => {
                    report.errors.push(e.to_string())
                }
                Err(e) => return Err(e),
            }
        }
        Ok(report)
    }

    /// Applies the difference between `desired` and what this reconciler last installed, without
    /// dumping the kernel.
    pub async fn update(&mut self, desired: &Desired) -> Result<Report, RouteError> {
        let stale: Vec<IpNetwork> = self
            .installed
            .keys()
            .filter(|k| !desired.contains_key(k))
            .copied()
            .collect();
        let mut adopted = 0;
        let mut writes = Vec::new();
        for (dst, target) in desired {
            if self.installed.get(dst) == Some(target) {
                adopted += 1;
            } else {
                writes.push((canonical(*dst), target));
            }
        }
        let mut report = self.execute(stale, writes).await?;
        report.adopted = adopted;
        Ok(report)
    }

    /// Applies `changes` (a destination's new target, or None to remove Sepal's route to it)
    /// on top of what this reconciler installed, touching nothing else: the incremental form
    /// of [`RouteReconciler::update`], for a stream of changes to a large table.
    pub async fn apply_changes(
        &mut self,
        changes: &[(IpNetwork, Option<&Target>)],
    ) -> Result<Report, RouteError> {
        let mut deletes = Vec::new();
        let mut writes = Vec::new();
        let mut adopted = 0;
        for (dst, target) in changes {
            let dst = canonical(*dst);
            match target {
                None if self.installed.contains_key(&dst) => deletes.push(dst),
                None => {}
                Some(t) if self.installed.get(&dst) == Some(*t) => adopted += 1,
                Some(t) => writes.push((dst, *t)),
            }
        }
        let mut report = self.execute(deletes, writes).await?;
        report.adopted = adopted;
        Ok(report)
    }

    /// Deletes, then writes, BATCH messages to a sendmsg on the batch socket; `installed` follows
    /// what succeeded. A write the kernel refuses as existing, or whose answer was lost, takes
    /// the one-at-a-time path, which finds out whose route is in the way.
    async fn execute(
        &mut self,
        deletes: Vec<IpNetwork>,
        writes: Vec<(IpNetwork, &Target)>,
    ) -> Result<Report, RouteError> {
        self.forget_ifindexes();
        let mut report = Report::default();
        let mut fatal = None;
        // (destination, target to write or None to delete, whether a route of ours was there)
        let mut jobs: Vec<(IpNetwork, Option<&Target>, bool)> =
            deletes.into_iter().map(|d| (d, None, true)).collect();
        let mut ops = Vec::with_capacity(jobs.len() + writes.len());
        for dst in jobs.iter().map(|j| j.0) {
            ops.push(Op::Delete(delete_message(dst, None)));
        }
        for (dst, target) in writes {
            let existed = self.installed.contains_key(&dst);
            match self.build(dst, target).await {
                Ok(msg) => {
                    ops.push(if existed {
                        Op::Replace(msg)
                    } else {
                        Op::Add(msg)
                    });
                    jobs.push((dst, Some(target), existed));
                }
                Err(e @ (RouteError::NoSuchLink { .. } | RouteError::Invalid { .. })) => {
                    report.errors.push(e.to_string())
                }
                Err(e) => return Err(e),
            }
        }
        let mut outcomes = Vec::with_capacity(ops.len());
        if !ops.is_empty() {
            let socket = self.batch_socket()?;
            let mut ops = ops.into_iter().peekable();
            while ops.peek().is_some() {
                let chunk: Vec<Op> = ops.by_ref().take(BATCH).collect();
                outcomes.extend(socket.run(chunk).map_err(io("writing routes"))?);
            }
        }
        for ((dst, target, existed), outcome) in jobs.into_iter().zip(outcomes) {
            let result = match (target, outcome) {
                (None, Outcome::Done) => Ok(()),
                (None, Outcome::Failed(libc::ESRCH | libc::ENOENT)) => Ok(()),
                (None, Outcome::Unknown) => self.delete_dst(dst).await,
                (Some(_), Outcome::Done) => Ok(()),
                (Some(t), Outcome::Failed(libc::EEXIST) | Outcome::Unknown) => {
                    self.write(dst, t, existed).await
                }
                (_, Outcome::Failed(e)) => Err(RouteError::Io {
                    context: format!("route to {dst}"),
                    source: std::io::Error::from_raw_os_error(e),
                }),
            };
            match (result, target) {
                (Ok(()), None) => {
                    self.installed.remove(&dst);
                    report.removed += 1;
                }
                (Ok(()), Some(t)) => {
                    self.installed.insert(dst, t.clone());
                    if existed {
                        report.replaced += 1
                    } else {
                        report.added += 1
                    }
                }
                (Err(e @ (RouteError::NoSuchLink { .. } | RouteError::Foreign { .. })), _) => {
                    report.errors.push(e.to_string())
                }
                (Err(e), _) => fatal = fatal.or(Some(e)),
            }
        }
        match fatal {
            Some(e) => Err(e),
            None => Ok(report),
        }
    }

    /// The batch socket, opened on first use (in the namespace the reconciler works in).
    fn batch_socket(&mut self) -> Result<&mut BatchSocket, RouteError> {
        if self.batch.is_none() {
            self.batch = Some(BatchSocket::open().map_err(io("opening a netlink socket"))?);
        }
        Ok(self.batch.as_mut().expect("just opened"))
    }

    pub async fn install(&mut self, dst: IpNetwork, target: Target) -> Result<(), RouteError> {
        // The interface is looked up afresh: a pod's veth may be new under the name of one that
        // an earlier batch cached (a sandbox recreated with the same container ID).
        self.forget_ifindexes();
        let dst = canonical(dst);
        let ours = self.installed.contains_key(&dst);
        self.write(dst, &target, ours).await?;
        self.installed.insert(dst, target);
        Ok(())
    }

    /// Removes Sepal's route to `dst` if there is one. Idempotent; never removes another
    /// protocol's route to the same destination.
    pub async fn withdraw(&mut self, dst: IpNetwork) -> Result<(), RouteError> {
        let dst = canonical(dst);
        self.delete_dst(dst).await?;
        self.installed.remove(&dst);
        Ok(())
    }

    /// Deletes Sepal's route to `dst` from the kernel; already gone is fine.
    async fn delete_dst(&self, dst: IpNetwork) -> Result<(), RouteError> {
        let msg = delete_message(dst, None);
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT)) => Ok(()),
            Err(e) => Err(nl(format!("deleting route to {dst}"))(e)),
        }
    }

    async fn kernel_has(&self, dst: IpNetwork) -> Result<bool, RouteError> {
        Ok(self.kernel_routes().await?.iter().any(|r| r.dst == dst))
    }

    /// Adds (or, when a route of ours is known to be there, replaces) one route. An add that
    /// collides checks whether the route in the way is ours before replacing it.
    async fn write(
        &self,
        dst: IpNetwork,
        target: &Target,
        replace: bool,
    ) -> Result<(), RouteError> {
        let msg = self.build(dst, target).await?;
        let request = self.handle.route().add(msg.clone());
        let result = if replace {
            request.replace().execute().await
        } else {
            request.execute().await
        };
        match result {
            Ok(()) => Ok(()),
            Err(e) if errno(&e) == Some(libc::EEXIST) => {
                if self.kernel_has(dst).await? {
                    self.handle
                        .route()
                        .add(msg)
                        .replace()
                        .execute()
                        .await
                        .map_err(nl(format!("replacing route to {dst}")))
                } else {
                    Err(RouteError::Foreign { dst })
                }
            }
            Err(e) => Err(nl(format!("adding route to {dst}"))(e)),
        }
    }

    async fn build(&self, dst: IpNetwork, target: &Target) -> Result<RouteMessage, RouteError> {
        let mut msg = header(dst);
        match target {
            Target::Blackhole => {
                msg.header.kind = RouteType::BlackHole;
            }
            Target::Dev(dev) => {
                msg.header.scope = RouteScope::Link;
                let idx = self.ifindex(dst, dev).await?;
                msg.attributes.push(RouteAttribute::Oif(idx));
            }
            Target::Via(hops) => match hops.as_slice() {
                [] => {
                    return Err(RouteError::Invalid {
                        dst,
                        msg: "no next hop".into(),
                    })
                }
                [hop] => {
                    msg.attributes.push(gateway_attr(dst, hop.gateway)?);
                    if let Some(dev) = &hop.dev {
                        let idx = self.ifindex(dst, dev).await?;
                        msg.attributes.push(RouteAttribute::Oif(idx));
                    }
                    if hop.onlink {
                        msg.header.flags |= RouteFlags::Onlink;
                    }
                }
                many => {
                    let mut nexthops = Vec::new();
                    for hop in many {
                        let mut nh = RouteNextHop::default();
                        if let Some(dev) = &hop.dev {
                            nh.interface_index = self.ifindex(dst, dev).await?;
                        }
                        if hop.onlink {
                            nh.flags |= RouteNextHopFlags::Onlink;
                        }
                        nh.attributes.push(gateway_attr(dst, hop.gateway)?);
                        nexthops.push(nh);
                    }
                    msg.attributes.push(RouteAttribute::MultiPath(nexthops));
                }
            },
        }
        Ok(msg)
    }

    async fn delete(&self, route: &KernelRoute) -> Result<(), RouteError> {
        let msg = delete_message(route.dst, route.priority);
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) if matches!(errno(&e), Some(libc::ESRCH | libc::ENOENT)) => Ok(()),
            Err(e) => Err(nl(format!("deleting route to {}", route.dst))(e)),
        }
    }
}

/// The message that deletes Sepal's route to `dst` (of that metric, when given).
fn delete_message(dst: IpNetwork, priority: Option<u32>) -> RouteMessage {
    let mut msg = header(dst);
    msg.header.scope = RouteScope::NoWhere;
    msg.header.kind = RouteType::Unspec;
    if let Some(p) = priority {
        msg.attributes.push(RouteAttribute::Priority(p));
    }
    msg
}

/// A route message for `dst` in the main table with Sepal's protocol.
fn header(dst: IpNetwork) -> RouteMessage {
    let mut msg = RouteMessage::default();
    msg.header.address_family = match dst {
        IpNetwork::V4(_) => AddressFamily::Inet,
        IpNetwork::V6(_) => AddressFamily::Inet6,
    };
    msg.header.destination_prefix_length = dst.prefix();
    msg.header.table = RouteHeader::RT_TABLE_MAIN;
    msg.header.protocol = RouteProtocol::from(ROUTE_PROTO);
    msg.header.scope = RouteScope::Universe;
    msg.header.kind = RouteType::Unicast;
    msg.attributes
        .push(RouteAttribute::Destination(RouteAddress::from(
            dst.network(),
        )));
    msg
}

fn gateway_attr(dst: IpNetwork, gw: IpAddr) -> Result<RouteAttribute, RouteError> {
    match (dst, gw) {
        (IpNetwork::V4(_), IpAddr::V4(_)) | (IpNetwork::V6(_), IpAddr::V6(_)) => {
            Ok(RouteAttribute::Gateway(RouteAddress::from(gw)))
        }
        // An IPv4 route via an IPv6 next hop (RFC 5549), as BGP unnumbered peers announce.
        (IpNetwork::V4(_), IpAddr::V6(v6)) => Ok(RouteAttribute::Via(RouteVia::Inet6(v6))),
        (IpNetwork::V6(_), IpAddr::V4(_)) => Err(RouteError::Invalid {
            dst,
            msg: format!("IPv6 route via IPv4 gateway {gw}"),
        }),
    }
}

fn address(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

fn dev_name(names: &HashMap<u32, String>, idx: u32) -> String {
    names
        .get(&idx)
        .cloned()
        .unwrap_or_else(|| format!("if#{idx}"))
}

/// The kernel route as a (destination, target), if it is one of Sepal's in the main table.
fn decode(msg: &RouteMessage, names: &HashMap<u32, String>) -> Option<KernelRoute> {
    if msg.header.protocol != RouteProtocol::from(ROUTE_PROTO) {
        return None;
    }
    let table = msg
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table));
    if table != u32::from(RouteHeader::RT_TABLE_MAIN) {
        return None;
    }
    let len = msg.header.destination_prefix_length;
    let mut dst_ip = None;
    let mut oif = None;
    let mut gateway = None;
    let mut priority = None;
    let mut multipath = None;
    for attr in &msg.attributes {
        match attr {
            RouteAttribute::Destination(a) => dst_ip = address(a),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::Gateway(a) => gateway = address(a),
            RouteAttribute::Via(RouteVia::Inet6(v6)) => gateway = Some(IpAddr::V6(*v6)),
            RouteAttribute::Priority(p) => priority = Some(*p),
            RouteAttribute::MultiPath(hops) => multipath = Some(hops),
            _ => {}
        }
    }
    let dst_ip = dst_ip.unwrap_or(match msg.header.address_family {
        AddressFamily::Inet6 => IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED),
        _ => IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
    });
    let dst = canonical(IpNetwork::new(dst_ip, len).ok()?);
    let target = if msg.header.kind == RouteType::BlackHole {
        Target::Blackhole
    } else if let Some(hops) = multipath {
        let mut out = Vec::new();
        for h in hops {
            let gw = h.attributes.iter().find_map(|a| match a {
                RouteAttribute::Gateway(a) => address(a),
                RouteAttribute::Via(RouteVia::Inet6(v6)) => Some(IpAddr::V6(*v6)),
                _ => None,
            })?;
            out.push(NextHop {
                gateway: gw,
                dev: (h.interface_index != 0).then(|| dev_name(names, h.interface_index)),
                onlink: h.flags.contains(RouteNextHopFlags::Onlink),
            });
        }
        out.sort();
        Target::Via(out)
    } else if let Some(gw) = gateway {
        Target::Via(vec![NextHop {
            gateway: gw,
            dev: oif.map(|i| dev_name(names, i)),
            onlink: msg.header.flags.contains(RouteFlags::Onlink),
        }])
    } else {
        Target::Dev(dev_name(names, oif?))
    };
    Some(KernelRoute {
        dst,
        target,
        priority,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(gw: &str, dev: Option<&str>) -> NextHop {
        NextHop {
            gateway: gw.parse().unwrap(),
            dev: dev.map(str::to_string),
            onlink: false,
        }
    }

    #[test]
    fn canonical_clears_host_bits() {
        let n: IpNetwork = "10.1.2.3/24".parse().unwrap();
        assert_eq!(canonical(n).to_string(), "10.1.2.0/24");
        assert_eq!(host_net("fd00::1".parse().unwrap()).prefix(), 128);
    }

    #[test]
    fn next_hops_without_device_match_any_device() {
        let want = Target::Via(vec![hop("10.0.0.1", None), hop("10.0.0.2", None)]);
        let have = Target::Via(vec![
            hop("10.0.0.2", Some("eth1")),
            hop("10.0.0.1", Some("eth0")),
        ]);
        assert!(matches(&want, &have));
        let pinned = Target::Via(vec![hop("10.0.0.1", Some("eth1")), hop("10.0.0.2", None)]);
        assert!(!matches(&pinned, &have));
        assert!(!matches(&Target::Dev("a".into()), &Target::Dev("b".into())));
        assert!(matches(&Target::Blackhole, &Target::Blackhole));
    }

    #[test]
    fn decode_skips_foreign_protocols_and_tables() {
        let names = HashMap::from([(7u32, "sep0".to_string())]);
        let mut msg = header("10.0.0.5/32".parse().unwrap());
        msg.attributes.push(RouteAttribute::Oif(7));
        let r = decode(&msg, &names).unwrap();
        assert_eq!(r.target, Target::Dev("sep0".into()));
        let mut foreign = msg.clone();
        foreign.header.protocol = RouteProtocol::Static;
        assert!(decode(&foreign, &names).is_none());
        let mut other_table = msg.clone();
        other_table.attributes.push(RouteAttribute::Table(100));
        assert!(decode(&other_table, &names).is_none());
        let mut bh = header("10.0.0.0/24".parse().unwrap());
        bh.header.kind = RouteType::BlackHole;
        assert_eq!(decode(&bh, &names).unwrap().target, Target::Blackhole);
    }
}
