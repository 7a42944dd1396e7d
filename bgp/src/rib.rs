// The RIB: Adj-RIB-In per peer (post-import), Loc-RIB with the RFC 4271 §9.1 decision process and ECMP,
// and the export rules (split horizon, route reflection per RFC 4456, next-hop-self to eBGP, loop checks).

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use smallvec::SmallVec;

use crate::wire::{Attrs, OriginKind, Segment};

/// Who a path came from; `Local` are the speaker's own announcements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Source {
    Local,
    Peer(IpAddr),
}

/// Facts about the peer a path was learned from, used by the decision process and export rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerFacts {
    pub addr: IpAddr,
    pub asn: u32,
    pub router_id: Ipv4Addr,
    pub ibgp: bool,
    pub rr_client: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Path {
    pub source: Source,
    pub next_hop: IpAddr,
    pub attrs: Arc<Attrs>,
    /// Set for learned paths.
    pub peer: Option<Arc<PeerFacts>>,
    /// RFC 4724: retained from a restarting peer until its End-of-RIB.
    pub stale: bool,
}

impl Path {
    fn local_pref(&self) -> u32 {
        self.attrs.local_pref.unwrap_or(100)
    }
    fn ebgp(&self) -> bool {
        self.peer.as_ref().is_some_and(|p| !p.ibgp)
    }
    /// RFC 4456 §9: the ORIGINATOR_ID stands in for the router ID.
    fn router_id(&self) -> u32 {
        match (&self.attrs.originator_id, &self.peer) {
            (Some(o), _) => u32::from(*o),
            (None, Some(p)) => u32::from(p.router_id),
            (None, None) => 0,
        }
    }
}

/// Outcome of comparing two paths: how far down the §9.1.2.2 list they tie.
/// `Ecmp` paths are equal up to (not including) the router-ID tie-breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cmp {
    Better,
    Worse,
    Ecmp(std::cmp::Ordering),
}

/// RFC 4271 §9.1.2: is `a` preferred over `b`?
fn compare(a: &Path, b: &Path) -> Cmp {
    use std::cmp::Ordering::*;
    let pick = |o: std::cmp::Ordering| match o {
        Greater => Some(Cmp::Better),
        Less => Some(Cmp::Worse),
        Equal => None,
    };
    // Local routes first (they have no AS path of ours and represent the node itself).
    let la = matches!(a.source, Source::Local);
    let lb = matches!(b.source, Source::Local);
    if let Some(c) = pick(la.cmp(&lb)) {
        return c;
    }
    if let Some(c) = pick(a.local_pref().cmp(&b.local_pref())) {
        return c;
    }
    if let Some(c) = pick(b.attrs.as_path_len().cmp(&a.attrs.as_path_len())) {
        return c;
    }
    let origin = |o: OriginKind| o as u8;
    if let Some(c) = pick(origin(b.attrs.origin).cmp(&origin(a.attrs.origin))) {
        return c;
    }
    // MED only between routes from the same neighbouring AS; missing MED is 0 (lowest).
    if a.attrs.neighbor_as() == b.attrs.neighbor_as() {
        if let Some(c) = pick(b.attrs.med.unwrap_or(0).cmp(&a.attrs.med.unwrap_or(0))) {
            return c;
        }
    }
    if let Some(c) = pick(a.ebgp().cmp(&b.ebgp())) {
        return c;
    }
    // (IGP cost to the next hop is not known to the library: all equal.)
    let tie = b
        .router_id()
        .cmp(&a.router_id())
        .then(b.attrs.cluster_list.len().cmp(&a.attrs.cluster_list.len()))
        .then_with(|| {
            let addr = |p: &Path| p.peer.as_ref().map(|p| p.addr);
            addr(b).cmp(&addr(a))
        });
    Cmp::Ecmp(tie)
}

/// A cheap hash for prefixes and addresses, which are a few integers each: every integer is folded
/// in with one multiply (FNV-1a style; byte slices byte by byte) and the result is finished with
/// MurmurHash3's mixer, so the low bits the table indexes by depend on every input bit (the low
/// byte of a /24 is always zero).
#[derive(Default, Clone, Copy)]
pub struct Fnv(u64);

const FNV_OFFSET: u64 = 0xcbf29ce484222325;
const FNV_PRIME: u64 = 0x100000001b3;

impl Fnv {
    fn fold(&mut self, x: u64) {
        let h = if self.0 == 0 { FNV_OFFSET } else { self.0 };
        self.0 = (h ^ x).wrapping_mul(FNV_PRIME);
    }
}

impl std::hash::Hasher for Fnv {
    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51afd7ed558ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ceb9fe1a85ec53);
        h ^ (h >> 33)
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.fold(u64::from(*b));
        }
    }
    fn write_u8(&mut self, x: u8) {
        self.fold(x.into());
    }
    fn write_u16(&mut self, x: u16) {
        self.fold(x.into());
    }
    fn write_u32(&mut self, x: u32) {
        self.fold(x.into());
    }
    fn write_u64(&mut self, x: u64) {
        self.fold(x);
    }
    fn write_u128(&mut self, x: u128) {
        self.fold(x as u64);
        self.fold((x >> 64) as u64);
    }
    fn write_usize(&mut self, x: usize) {
        self.fold(x as u64);
    }
}

pub type PrefixHash = BuildHasherDefault<Fnv>;

/// A best-route change for the FIB: the new set of next hops, or `None` when the prefix is gone.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RouteChange {
    pub prefix: IpNet,
    pub best: Option<BestRoute>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BestRoute {
    /// All ECMP next hops, best first.
    pub next_hops: Vec<IpAddr>,
    pub source: Source,
    #[serde(serialize_with = "ser_attrs")]
    pub attrs: Arc<Attrs>,
}

fn ser_attrs<S: serde::Serializer>(a: &Arc<Attrs>, s: S) -> Result<S::Ok, S::Error> {
    serde::Serialize::serialize(&**a, s)
}

/// The paths of one prefix, kept in preference order: the first `selected` are the best path and
/// its ECMP siblings, the rest follow in no particular order. Inline storage for one path (the
/// common case) keeps a 100k-prefix table to one allocation.
#[derive(Debug, Default)]
struct Entry {
    paths: SmallVec<[Path; 1]>,
    selected: u32,
}

/// What a change report compares: the next hops, source and attributes of the selection.
type Selection = (SmallVec<[IpAddr; 4]>, Source, Arc<Attrs>);

impl Entry {
    fn best(&self) -> &[Path] {
        &self.paths[..self.selected as usize]
    }

    fn selection(&self) -> Option<Selection> {
        let first = self.best().first()?;
        let hops = self.best().iter().map(|p| p.next_hop).collect();
        Some((hops, first.source, first.attrs.clone()))
    }

    /// Runs the decision process over the paths (RFC 4271 §9.1.2) and picks up to `ecmp` paths
    /// equal to the best one with distinct next hops.
    fn select(&mut self, ecmp: usize) {
        // One path (the common case when ingesting a table) needs no comparison.
        if self.paths.len() > 1 {
            self.paths.sort_by(|a, b| match compare(a, b) {
                Cmp::Better => std::cmp::Ordering::Less,
                Cmp::Worse => std::cmp::Ordering::Greater,
                Cmp::Ecmp(o) => o.reverse(),
            });
        }
        let mut n = self.paths.len().min(1);
        for i in 1..self.paths.len() {
            if n >= ecmp || !matches!(compare(&self.paths[0], &self.paths[i]), Cmp::Ecmp(_)) {
                break;
            }
            let hop = self.paths[i].next_hop;
            if !self.paths[..n].iter().any(|p| p.next_hop == hop) {
                // Paths between n and i are duplicates of a chosen next hop: their order is free.
                self.paths.swap(n, i);
                n += 1;
            }
        }
        self.selected = n as u32;
    }
}

/// Prefix → slot, one map per family so an IPv4 bucket is 12 bytes (an `IpNet` key alone is 18).
#[derive(Debug, Default)]
struct Index {
    v4: HashMap<Ipv4Net, u32, PrefixHash>,
    v6: HashMap<Ipv6Net, u32, PrefixHash>,
}

impl Index {
    fn get(&self, k: &IpNet) -> Option<u32> {
        match k {
            IpNet::V4(k) => self.v4.get(k).copied(),
            IpNet::V6(k) => self.v6.get(k).copied(),
        }
    }
    fn insert(&mut self, k: IpNet, slot: u32) {
        match k {
            IpNet::V4(k) => self.v4.insert(k, slot),
            IpNet::V6(k) => self.v6.insert(k, slot),
        };
    }
    fn remove(&mut self, k: &IpNet) {
        match k {
            IpNet::V4(k) => self.v4.remove(k),
            IpNet::V6(k) => self.v6.remove(k),
        };
    }
    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }
    fn iter(&self) -> impl Iterator<Item = (IpNet, u32)> + '_ {
        let v4 = self.v4.iter().map(|(k, i)| (IpNet::V4(*k), *i));
        v4.chain(self.v6.iter().map(|(k, i)| (IpNet::V6(*k), *i)))
    }
}

/// The table: prefixes hashed (with a fast non-keyed hasher: prefixes are not attacker-chosen keys
/// in a way that matters here, max-prefix bounds the table per peer) to a slot in one vector of
/// entries. A table load then grows the hash tables' small buckets and one vector (which the
/// allocator grows in place), instead of moving every entry at each rehash.
#[derive(Debug)]
pub struct Rib {
    pub ecmp: usize,
    index: Index,
    slots: Vec<Entry>,
    /// Slots of removed prefixes, reused first.
    free: Vec<u32>,
    /// Accepted prefixes per peer (Adj-RIB-In size after import).
    counts: HashMap<IpAddr, usize, PrefixHash>,
}

impl Rib {
    pub fn new(ecmp: usize) -> Rib {
        Rib {
            ecmp: ecmp.max(1),
            index: Index::default(),
            slots: Vec::new(),
            free: Vec::new(),
            counts: HashMap::default(),
        }
    }

    pub fn count(&self, peer: IpAddr) -> usize {
        self.counts.get(&peer).copied().unwrap_or(0)
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn entry(&self, prefix: &IpNet) -> Option<&Entry> {
        self.index.get(prefix).map(|i| &self.slots[i as usize])
    }

    /// Every prefix with its entry.
    fn entries(&self) -> impl Iterator<Item = (IpNet, &Entry)> {
        self.index.iter().map(|(k, i)| (k, &self.slots[i as usize]))
    }

    /// Adds or replaces the path from `path.source` for `prefix`.
    pub fn insert(&mut self, prefix: IpNet, path: Path) -> Option<RouteChange> {
        let Some(slot) = self.index.get(&prefix) else {
            // A new prefix (the bulk of a table load): its only path is the best.
            if let Source::Peer(a) = path.source {
                *self.counts.entry(a).or_default() += 1;
            }
            let change = RouteChange {
                prefix,
                best: Some(BestRoute {
                    next_hops: vec![path.next_hop],
                    source: path.source,
                    attrs: path.attrs.clone(),
                }),
            };
            let mut paths = SmallVec::new();
            paths.push(path);
            let e = Entry { paths, selected: 1 };
            let slot = match self.free.pop() {
                Some(i) => {
                    self.slots[i as usize] = e;
                    i
                }
                None => {
                    // u32 slots: a table of 4 billion prefixes is out of reach anyway.
                    self.slots.push(e);
                    (self.slots.len() - 1) as u32
                }
            };
            self.index.insert(prefix, slot);
            return Some(change);
        };
        let e = &mut self.slots[slot as usize];
        let before = e.selection();
        match e.paths.iter_mut().find(|p| p.source == path.source) {
            Some(p) => *p = path,
            None => {
                if let Source::Peer(a) = path.source {
                    *self.counts.entry(a).or_default() += 1;
                }
                e.paths.push(path);
            }
        }
        e.select(self.ecmp);
        report(prefix, before, e.selection())
    }

    pub fn remove(&mut self, prefix: IpNet, source: Source) -> Option<RouteChange> {
        let slot = self.index.get(&prefix)?;
        let e = &mut self.slots[slot as usize];
        let i = e.paths.iter().position(|p| p.source == source)?;
        let before = e.selection();
        e.paths.swap_remove(i);
        if let Source::Peer(a) = source {
            if let Some(c) = self.counts.get_mut(&a) {
                *c = c.saturating_sub(1);
            }
        }
        e.select(self.ecmp);
        let after = e.selection();
        if after.is_none() {
            self.index.remove(&prefix);
            self.slots[slot as usize] = Entry::default();
            self.free.push(slot);
        }
        report(prefix, before, after)
    }

    /// Prefixes a source has paths for.
    pub fn prefixes_of(&self, source: Source) -> Vec<IpNet> {
        self.entries()
            .filter(|(_, e)| e.paths.iter().any(|p| p.source == source))
            .map(|(k, _)| k)
            .collect()
    }

    /// Removes everything from a peer (session down without graceful restart).
    pub fn remove_source(&mut self, source: Source) -> Vec<RouteChange> {
        self.prefixes_of(source)
            .into_iter()
            .filter_map(|p| self.remove(p, source))
            .collect()
    }

    /// Drops the paths from `source` that `keep` refuses (an import policy made stricter: the
    /// paths here passed the old one).
    pub fn retain_source(
        &mut self,
        source: Source,
        mut keep: impl FnMut(&IpNet, &Attrs) -> bool,
    ) -> Vec<RouteChange> {
        let refused: Vec<IpNet> = self
            .entries()
            .filter(|(k, e)| {
                e.paths
                    .iter()
                    .any(|p| p.source == source && !keep(k, &p.attrs))
            })
            .map(|(k, _)| k)
            .collect();
        refused
            .into_iter()
            .filter_map(|k| self.remove(k, source))
            .collect()
    }

    /// RFC 4724 receiving speaker: keep the peer's paths but mark them stale.
    pub fn mark_stale(&mut self, source: Source, family: Option<crate::wire::Family>) {
        for (k, i) in self.index.iter() {
            if family.is_some_and(|f| crate::wire::Family::of(&k) != f) {
                continue;
            }
            let e = &mut self.slots[i as usize];
            for p in e.paths.iter_mut().filter(|p| p.source == source) {
                p.stale = true;
            }
        }
    }

    /// Drops the peer's still-stale paths (after its End-of-RIB or the restart timer).
    pub fn sweep_stale(
        &mut self,
        source: Source,
        family: Option<crate::wire::Family>,
    ) -> Vec<RouteChange> {
        let stale: Vec<IpNet> = self
            .entries()
            .filter(|(k, _)| family.is_none_or(|f| crate::wire::Family::of(k) == f))
            .filter(|(_, e)| e.paths.iter().any(|p| p.source == source && p.stale))
            .map(|(k, _)| k)
            .collect();
        stale
            .into_iter()
            .filter_map(|p| self.remove(p, source))
            .collect()
    }

    /// The best path of a prefix.
    pub fn best_path(&self, prefix: &IpNet) -> Option<&Path> {
        self.entry(prefix)?.best().first()
    }

    /// The selected paths (best first) of a prefix.
    pub fn best(&self, prefix: &IpNet) -> Vec<&Path> {
        self.entry(prefix)
            .map(|e| e.best().iter().collect())
            .unwrap_or_default()
    }

    /// Every prefix with its best paths.
    pub fn iter_best(&self) -> impl Iterator<Item = (IpNet, &[Path])> {
        self.entries().map(|(k, e)| (k, e.best()))
    }

    /// Every prefix in the table.
    pub fn prefixes(&self) -> impl Iterator<Item = IpNet> + '_ {
        self.index.iter().map(|(k, _)| k)
    }
}

/// The change to report when a prefix's selection went from `before` to `after`, if it changed.
fn report(
    prefix: IpNet,
    before: Option<Selection>,
    after: Option<Selection>,
) -> Option<RouteChange> {
    if before == after {
        return None;
    }
    Some(RouteChange {
        prefix,
        best: after.map(|(hops, source, attrs)| BestRoute {
            next_hops: hops.into_vec(),
            source,
            attrs,
        }),
    })
}

/// What we know about the peer we export to.
#[derive(Debug, Clone)]
pub struct ExportTarget {
    pub addr: IpAddr,
    pub asn: u32,
    pub ibgp: bool,
    pub rr_client: bool,
    /// The peer's BGP identifier from its OPEN.
    pub router_id: Ipv4Addr,
    /// Our address on this session (next-hop-self).
    pub local_addr: IpAddr,
    /// Our IPv6 address on this session for IPv6 routes over an IPv4 session, if any.
    pub local_addr_v6: Option<IpAddr>,
    pub local_addr_v4: Option<IpAddr>,
}

/// Speaker-wide facts used by the export rules.
#[derive(Debug, Clone)]
pub struct ExportCtx {
    pub local_as: u32,
    pub router_id: Ipv4Addr,
    /// RFC 4456 cluster ID when acting as a reflector (default: router ID).
    pub cluster_id: Ipv4Addr,
}

/// The Adj-RIB-Out decision for one best path towards one peer: attributes and next hop, or `None`.
pub fn export(
    ctx: &ExportCtx,
    to: &ExportTarget,
    prefix: &IpNet,
    best: &Path,
) -> Option<(Attrs, IpAddr)> {
    // Cheap refusals first: this runs for every changed prefix towards every peer.
    if let Some(from) = &best.peer {
        if from.addr == to.addr || (to.ibgp && from.ibgp && !(from.rr_client || to.rr_client)) {
            return None;
        }
    }
    if !to.ibgp && best.attrs.contains_as(to.asn) {
        return None;
    }
    let mut a = (*best.attrs).clone();
    if let Some(from) = &best.peer {
        if to.ibgp && from.ibgp {
            // RFC 4456 §6: from a client to everyone; from a non-client only to clients.
            if a.originator_id.is_none() {
                a.originator_id = Some(from.router_id);
            }
            // RFC 4456 §10: never reflect back to the originator.
            if a.originator_id == Some(to.router_id) {
                return None;
            }
            a.cluster_list.insert(0, ctx.cluster_id);
        }
    }
    let own_v6 = matches!(prefix, IpNet::V6(_));
    let session_nh = |v6: bool| -> IpAddr {
        match (v6, to.local_addr) {
            (true, IpAddr::V6(_)) | (false, IpAddr::V4(_)) => to.local_addr,
            (true, IpAddr::V4(_)) => to.local_addr_v6.unwrap_or(to.local_addr),
            (false, IpAddr::V6(_)) => to.local_addr_v4.unwrap_or(to.local_addr),
        }
    };
    let nh;
    if to.ibgp {
        a.local_pref.get_or_insert(100);
        nh = match best.source {
            // Our own routes: the given next hop, or ourselves when it is unspecified.
            Source::Local if !best.next_hop.is_unspecified() => best.next_hop,
            Source::Local => session_nh(own_v6),
            Source::Peer(_) => best.next_hop,
        };
    } else {
        // eBGP: our AS first, our address as next hop, no iBGP-only attributes.
        if a.contains_as(to.asn) {
            // The peer would drop it anyway (its own AS in the path): don't send.
            return None;
        }
        a.prepend(ctx.local_as);
        a.local_pref = None;
        a.originator_id = None;
        a.cluster_list.clear();
        if !a.carried.is_empty() {
            a.carried = a
                .carried
                .iter()
                .filter_map(crate::wire::CarriedAttr::across_as_boundary)
                .collect();
        }
        if best.peer.is_some() {
            a.med = None;
        }
        nh = match best.source {
            // Our own route naming a next hop of its family keeps it where the session has no
            // address of that family (an IPv6 block over an IPv4 session would otherwise go out
            // with an IPv4-mapped next hop no router can use).
            Source::Local
                if !best.next_hop.is_unspecified()
                    && best.next_hop.is_ipv6() == own_v6
                    && session_nh(own_v6).is_ipv6() != own_v6 =>
            {
                best.next_hop
            }
            _ => session_nh(own_v6),
        };
    }
    Some((a, nh))
}

/// Inbound loop checks (RFC 4271 §9.1.2 AS loop, RFC 4456 §8 ORIGINATOR_ID / CLUSTER_LIST).
pub fn looped(ctx: &ExportCtx, attrs: &Attrs) -> bool {
    attrs.as_path.iter().any(|s| match s {
        Segment::Sequence(v) | Segment::Set(v) => v.contains(&ctx.local_as),
    }) || attrs.originator_id == Some(ctx.router_id)
        || attrs.cluster_list.contains(&ctx.cluster_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::net4;

    fn peer(addr: [u8; 4], asn: u32, ibgp: bool) -> Arc<PeerFacts> {
        Arc::new(PeerFacts {
            addr: IpAddr::from(addr),
            asn,
            router_id: Ipv4Addr::from(addr),
            ibgp,
            rr_client: false,
        })
    }

    fn path(p: &Arc<PeerFacts>, f: impl FnOnce(&mut Attrs)) -> Path {
        let mut a = Attrs {
            as_path: vec![Segment::Sequence(vec![p.asn])],
            ..Default::default()
        };
        if p.ibgp {
            a.as_path.clear();
        }
        f(&mut a);
        Path {
            source: Source::Peer(p.addr),
            next_hop: p.addr,
            attrs: Arc::new(a),
            peer: Some(p.clone()),
            stale: false,
        }
    }

    #[test]
    fn decision_process_order() {
        let n = net4([10, 1, 0, 0], 24);
        let (a, b) = (
            peer([10, 0, 0, 1], 65001, false),
            peer([10, 0, 0, 2], 65002, false),
        );
        let mut rib = Rib::new(1);
        let c = rib.insert(n, path(&a, |_| {})).unwrap();
        assert_eq!(c.best.unwrap().next_hops, vec![IpAddr::from([10, 0, 0, 1])]);
        // Higher local-pref wins.
        let c = rib
            .insert(n, path(&b, |x| x.local_pref = Some(200)))
            .unwrap();
        assert_eq!(c.best.unwrap().next_hops, vec![IpAddr::from([10, 0, 0, 2])]);
        // Shorter AS path wins when local-pref ties.
        rib.insert(
            n,
            path(&b, |x| {
                x.as_path = vec![Segment::Sequence(vec![65002, 65009])]
            }),
        );
        assert_eq!(rib.best(&n)[0].next_hop, IpAddr::from([10, 0, 0, 1]));
        // Origin IGP beats INCOMPLETE.
        rib.insert(n, path(&a, |x| x.origin = OriginKind::Incomplete));
        rib.insert(n, path(&b, |_| {}));
        assert_eq!(rib.best(&n)[0].next_hop, IpAddr::from([10, 0, 0, 2]));
        // Withdraw leaves the other.
        let c = rib
            .remove(n, Source::Peer(IpAddr::from([10, 0, 0, 2])))
            .unwrap();
        assert_eq!(c.best.unwrap().next_hops, vec![IpAddr::from([10, 0, 0, 1])]);
        let c = rib
            .remove(n, Source::Peer(IpAddr::from([10, 0, 0, 1])))
            .unwrap();
        assert_eq!(c.best, None);
        assert!(rib.is_empty());
    }

    #[test]
    fn med_only_within_same_as_and_ebgp_over_ibgp() {
        let n = net4([10, 1, 0, 0], 24);
        let (a, b) = (
            peer([10, 0, 0, 1], 65001, false),
            peer([10, 0, 0, 2], 65001, false),
        );
        let mut rib = Rib::new(1);
        rib.insert(n, path(&a, |x| x.med = Some(50)));
        rib.insert(n, path(&b, |x| x.med = Some(10)));
        assert_eq!(rib.best(&n)[0].next_hop, IpAddr::from([10, 0, 0, 2]));
        let i = peer([10, 0, 0, 3], 65000, true);
        let mut rib = Rib::new(1);
        rib.insert(
            n,
            path(&i, |x| x.as_path = vec![Segment::Sequence(vec![65001])]),
        );
        rib.insert(n, path(&a, |_| {}));
        assert_eq!(rib.best(&n)[0].next_hop, IpAddr::from([10, 0, 0, 1]));
    }

    #[test]
    fn ecmp_collects_equal_paths_and_router_id_breaks_ties() {
        let n = net4([10, 1, 0, 0], 24);
        let (a, b, c) = (
            peer([10, 0, 0, 3], 65001, false),
            peer([10, 0, 0, 2], 65002, false),
            peer([10, 0, 0, 1], 65003, false),
        );
        let mut rib = Rib::new(4);
        rib.insert(n, path(&a, |_| {}));
        rib.insert(n, path(&b, |_| {}));
        let ch = rib.insert(n, path(&c, |_| {})).unwrap();
        let hops = ch.best.unwrap().next_hops;
        assert_eq!(
            hops,
            vec![
                IpAddr::from([10, 0, 0, 1]),
                IpAddr::from([10, 0, 0, 2]),
                IpAddr::from([10, 0, 0, 3])
            ]
        );
        let mut rib = Rib::new(1);
        rib.insert(n, path(&a, |_| {}));
        rib.insert(n, path(&b, |_| {}));
        assert_eq!(rib.best(&n)[0].next_hop, IpAddr::from([10, 0, 0, 2]));
    }

    #[test]
    fn graceful_restart_stale_sweep() {
        let (n1, n2) = (net4([10, 1, 0, 0], 24), net4([10, 2, 0, 0], 24));
        let a = peer([10, 0, 0, 1], 65001, false);
        let mut rib = Rib::new(1);
        rib.insert(n1, path(&a, |_| {}));
        rib.insert(n2, path(&a, |_| {}));
        rib.mark_stale(Source::Peer(a.addr), None);
        assert_eq!(rib.len(), 2);
        // Re-sync refreshes n2 only; End-of-RIB sweeps n1.
        assert!(rib.insert(n2, path(&a, |_| {})).is_none());
        let gone = rib.sweep_stale(Source::Peer(a.addr), None);
        assert_eq!(
            gone,
            vec![RouteChange {
                prefix: n1,
                best: None
            }]
        );
        assert_eq!(rib.count(a.addr), 1);
    }

    #[test]
    fn retain_source_drops_only_what_the_source_may_no_longer_give() {
        let (default, block) = (net4([0, 0, 0, 0], 0), net4([10, 1, 0, 0], 24));
        let (a, b) = (
            peer([10, 0, 0, 1], 65001, false),
            peer([10, 0, 0, 2], 65002, false),
        );
        let mut rib = Rib::new(1);
        for n in [default, block] {
            rib.insert(n, path(&a, |_| {}));
        }
        rib.insert(default, path(&b, |_| {}));
        // a may no longer give a default route: b's stays best, a's block stays.
        let changes = rib.retain_source(Source::Peer(a.addr), |k, _| k.prefix_len() > 0);
        assert_eq!(rib.count(a.addr), 1);
        assert_eq!(rib.best(&default).len(), 1);
        assert_eq!(rib.best(&default)[0].source, Source::Peer(b.addr));
        assert_eq!(rib.best(&block)[0].source, Source::Peer(a.addr));
        assert_eq!(
            changes.iter().map(|c| c.prefix).collect::<Vec<_>>(),
            vec![default]
        );
        // Refused by every path's source: the prefix goes.
        let changes = rib.retain_source(Source::Peer(b.addr), |_, _| false);
        assert_eq!(
            changes,
            vec![RouteChange {
                prefix: default,
                best: None
            }]
        );
        assert!(rib.best_path(&default).is_none());
        assert_eq!(rib.len(), 1);
    }

    #[test]
    fn removed_slots_are_reused_and_lookups_stay_right() {
        let a = peer([10, 0, 0, 1], 65001, false);
        let net = |i: u32| net4((0x1400_0000 + (i << 8)).to_be_bytes(), 24);
        let mut rib = Rib::new(1);
        for i in 0..1000 {
            rib.insert(net(i), path(&a, |_| {}));
        }
        for i in (0..1000).step_by(2) {
            assert!(rib.remove(net(i), Source::Peer(a.addr)).is_some());
        }
        let slots = rib.slots.len();
        for i in 1000..1500 {
            rib.insert(net(i), path(&a, |x| x.med = Some(i)));
        }
        assert_eq!(rib.slots.len(), slots, "freed slots are taken first");
        assert_eq!(rib.len(), 1000);
        assert_eq!(rib.count(a.addr), 1000);
        assert!(rib.best_path(&net(2)).is_none());
        assert_eq!(rib.best_path(&net(3)).unwrap().attrs.med, None);
        assert_eq!(rib.best_path(&net(1234)).unwrap().attrs.med, Some(1234));
        assert_eq!(rib.remove_source(Source::Peer(a.addr)).len(), 1000);
        assert!(rib.is_empty());
    }

    fn ctx() -> ExportCtx {
        ExportCtx {
            local_as: 65000,
            router_id: Ipv4Addr::new(10, 0, 0, 9),
            cluster_id: Ipv4Addr::new(10, 0, 0, 9),
        }
    }

    fn target(addr: [u8; 4], asn: u32, ibgp: bool, rr_client: bool) -> ExportTarget {
        ExportTarget {
            addr: IpAddr::from(addr),
            asn,
            ibgp,
            rr_client,
            router_id: Ipv4Addr::from(addr),
            local_addr: IpAddr::from([10, 0, 0, 9]),
            local_addr_v6: None,
            local_addr_v4: None,
        }
    }

    #[test]
    fn export_rules() {
        let n = net4([10, 1, 0, 0], 24);
        let ib = peer([10, 0, 0, 1], 65000, true);
        let p = path(&ib, |x| x.local_pref = Some(100));
        // iBGP split horizon: not to another non-client iBGP peer, and never back to the sender.
        assert!(export(&ctx(), &target([10, 0, 0, 2], 65000, true, false), &n, &p).is_none());
        assert!(export(&ctx(), &target([10, 0, 0, 1], 65000, true, true), &n, &p).is_none());
        // Reflected to a client with ORIGINATOR_ID and CLUSTER_LIST.
        let (a, nh) = export(&ctx(), &target([10, 0, 0, 2], 65000, true, true), &n, &p).unwrap();
        assert_eq!(a.originator_id, Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(a.cluster_list, vec![Ipv4Addr::new(10, 0, 0, 9)]);
        assert_eq!(nh, IpAddr::from([10, 0, 0, 1]));
        // To eBGP: prepend, next-hop-self, no LOCAL_PREF.
        let (a, nh) = export(&ctx(), &target([10, 0, 1, 1], 65100, false, false), &n, &p).unwrap();
        assert_eq!(a.as_path, vec![Segment::Sequence(vec![65000])]);
        assert_eq!(a.local_pref, None);
        assert_eq!(nh, IpAddr::from([10, 0, 0, 9]));
        // Not to an eBGP peer whose AS is already in the path.
        let e = peer([10, 0, 2, 1], 65100, false);
        assert!(export(
            &ctx(),
            &target([10, 0, 1, 1], 65100, false, false),
            &n,
            &path(&e, |_| {})
        )
        .is_none());
    }

    #[test]
    fn own_ipv6_route_over_ipv4_ebgp_keeps_its_ipv6_next_hop() {
        let v6: IpNet = "fd10:244:1::/64".parse().unwrap();
        let own = |nh: &str| Path {
            source: Source::Local,
            next_hop: nh.parse().unwrap(),
            attrs: Arc::new(Attrs::default()),
            peer: None,
            stale: false,
        };
        let ebgp = target([10, 0, 1, 1], 65100, false, false);
        let (_, nh) = export(&ctx(), &ebgp, &v6, &own("fd00::9")).unwrap();
        assert_eq!(nh, "fd00::9".parse::<IpAddr>().unwrap());
        // Without one, the session's address (mapped on the wire), as before.
        let (_, nh) = export(&ctx(), &ebgp, &v6, &own("::")).unwrap();
        assert_eq!(nh, IpAddr::from([10, 0, 0, 9]));
        // An IPv4 route keeps next-hop-self towards eBGP.
        let (_, nh) = export(&ctx(), &ebgp, &net4([10, 1, 0, 0], 24), &own("10.9.9.9")).unwrap();
        assert_eq!(nh, IpAddr::from([10, 0, 0, 9]));
    }

    #[test]
    fn reflection_keeps_communities_and_carried_attributes_ebgp_loses_local_ones() {
        let n = net4([192, 0, 2, 0], 24);
        let ib = peer([10, 0, 0, 1], 65000, true);
        let carried = |code, value: &[u8]| crate::wire::CarriedAttr {
            code,
            partial: code != crate::wire::EXTENDED_COMMUNITIES,
            value: value.into(),
        };
        // One transitive extended community (route target) and one non-transitive (0x43).
        let ext = [0, 2, 0xfd, 0xe9, 0, 0, 0, 100, 0x43, 0x0b, 0, 0, 0, 0, 0, 1];
        let p = path(&ib, |x| {
            x.large_communities = vec![(65000, 1, 2)];
            x.carried = vec![carried(16, &ext), carried(240, &[1, 2, 3])];
        });
        let (a, _) = export(&ctx(), &target([10, 0, 0, 2], 65000, true, true), &n, &p).unwrap();
        assert_eq!(a.large_communities, p.attrs.large_communities);
        assert_eq!(a.carried, p.attrs.carried, "reflected as received");
        let (a, _) = export(&ctx(), &target([10, 0, 1, 1], 65100, false, false), &n, &p).unwrap();
        assert_eq!(a.large_communities, p.attrs.large_communities);
        assert_eq!(
            a.carried,
            vec![carried(16, &ext[..8]), carried(240, &[1, 2, 3])],
            "the non-transitive extended community stays in the AS"
        );
    }

    #[test]
    fn loops_detected() {
        let mut a = Attrs {
            as_path: vec![Segment::Sequence(vec![65100, 65000])],
            ..Default::default()
        };
        assert!(looped(&ctx(), &a));
        a.as_path.clear();
        assert!(!looped(&ctx(), &a));
        a.cluster_list = vec![Ipv4Addr::new(10, 0, 0, 9)];
        assert!(looped(&ctx(), &a));
    }
}
