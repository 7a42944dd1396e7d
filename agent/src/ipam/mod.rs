//! Node IPAM: hands out pod addresses from this node's blocks (its Node's spec.podCIDRs), one per
//! family, keyed by CNI attachment (container ID + ifname). Pure logic here; disk in `store`.
//!
//! Invariants: no address is held by two attachments; an ADD for a known attachment returns its
//! addresses again; a just-released address is not reused at once (a round-robin cursor per
//! block); IPv4 network and broadcast addresses are never handed out.

pub mod store;

use ipnetwork::IpNetwork;
use sepal_cni::api::{AttachmentKey, PortMapping};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::net::IpAddr;

/// One attachment's addresses and what the agent needs to find its host side again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Allocation {
    pub key: AttachmentKey,
    /// IPv4 first, then IPv6.
    pub ips: Vec<IpAddr>,
    pub pod_namespace: String,
    pub pod_name: String,
    pub host_veth: String,
    /// The pod's hostPorts, kept with its addresses so a restarted agent maps them again.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub port_mappings: Vec<PortMapping>,
}

/// What an ADD asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    pub key: AttachmentKey,
    pub pod_namespace: String,
    pub pod_name: String,
    pub host_veth: String,
    pub port_mappings: Vec<PortMapping>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpamError {
    #[error("this node has no pod block yet (its Node object has no spec.podCIDRs)")]
    NoBlock,
    #[error("pod block {0} has no free address")]
    Exhausted(IpNetwork),
}

/// The whole IPAM state: this is what is persisted.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpamState {
    /// The node's blocks as last known (so a restart has them before the datastore syncs).
    #[serde(default)]
    pub blocks: Vec<IpNetwork>,
    #[serde(default)]
    pub allocations: Vec<Allocation>,
    /// Per block, the last address handed out: the next search starts after it.
    #[serde(default)]
    pub cursors: BTreeMap<String, IpAddr>,
}

/// How many addresses a block can hand out.
pub fn capacity(block: IpNetwork) -> u128 {
    let (first, last) = usable(block);
    last.saturating_sub(first).saturating_add(1)
}

/// Addresses of a block that may be handed out: for IPv4 all but network and broadcast (except
/// in /31 and /32, which have none), for IPv6 all but the subnet-router anycast (all-zero host).
fn usable(block: IpNetwork) -> (u128, u128) {
    match block {
        IpNetwork::V4(n) => {
            let first = u32::from(n.network()) as u128;
            let size = 1u128 << (32 - n.prefix());
            if n.prefix() >= 31 {
                (first, first + size - 1)
            } else {
                (first + 1, first + size - 2)
            }
        }
        IpNetwork::V6(n) => {
            let first = u128::from(n.network());
            let last = first | (u128::MAX.checked_shr(u32::from(n.prefix())).unwrap_or(0));
            if n.prefix() >= 127 {
                (first, last)
            } else {
                (first + 1, last)
            }
        }
    }
}

fn to_ip(block: IpNetwork, v: u128) -> IpAddr {
    match block {
        IpNetwork::V4(_) => IpAddr::V4(std::net::Ipv4Addr::from(v as u32)),
        IpNetwork::V6(_) => IpAddr::V6(std::net::Ipv6Addr::from(v)),
    }
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

impl IpamState {
    pub fn get(&self, key: &AttachmentKey) -> Option<&Allocation> {
        self.allocations.iter().find(|a| &a.key == key)
    }

    fn used(&self) -> HashSet<IpAddr> {
        self.allocations
            .iter()
            .flat_map(|a| a.ips.iter().copied())
            .collect()
    }

    /// Replaces the node's blocks. Returns allocations now outside every block: they stay until
    /// released (their pods keep working), and the caller logs them.
    pub fn set_blocks(&mut self, blocks: Vec<IpNetwork>) -> Vec<&Allocation> {
        self.blocks = blocks;
        self.cursors
            .retain(|b, _| self.blocks.iter().any(|n| n.to_string() == *b));
        let blocks = &self.blocks;
        self.allocations
            .iter()
            .filter(|a| {
                a.ips
                    .iter()
                    .any(|ip| !blocks.iter().any(|b| b.contains(*ip)))
            })
            .collect()
    }

    /// The attachment's addresses: the existing ones for a known key (its recorded host veth and
    /// pod follow the claim), else one new address per family.
    pub fn allocate(&mut self, claim: &Claim) -> Result<Allocation, IpamError> {
        if let Some(existing) = self.allocations.iter_mut().find(|a| a.key == claim.key) {
            existing.host_veth.clone_from(&claim.host_veth);
            existing.pod_namespace.clone_from(&claim.pod_namespace);
            existing.pod_name.clone_from(&claim.pod_name);
            existing.port_mappings.clone_from(&claim.port_mappings);
            return Ok(existing.clone());
        }
        if self.blocks.is_empty() {
            return Err(IpamError::NoBlock);
        }
        let used = self.used();
        let mut ips = Vec::new();
        let mut cursors = Vec::new();
        for family_v4 in [true, false] {
            let blocks: Vec<IpNetwork> = self
                .blocks
                .iter()
                .filter(|b| b.is_ipv4() == family_v4)
                .copied()
                .collect();
            if blocks.is_empty() {
                continue;
            }
            let mut got = None;
            for block in &blocks {
                if let Some(ip) = self.pick(*block, &used) {
                    got = Some((*block, ip));
                    break;
                }
            }
            match got {
                Some((block, ip)) => {
                    ips.push(ip);
                    cursors.push((block, ip));
                }
                None => return Err(IpamError::Exhausted(blocks[0])),
            }
        }
        for (block, ip) in cursors {
            self.cursors.insert(block.to_string(), ip);
        }
        let alloc = Allocation {
            key: claim.key.clone(),
            ips,
            pod_namespace: claim.pod_namespace.clone(),
            pod_name: claim.pod_name.clone(),
            host_veth: claim.host_veth.clone(),
            port_mappings: claim.port_mappings.clone(),
        };
        self.allocations.push(alloc.clone());
        Ok(alloc)
    }

    /// The next free usable address of `block` after its cursor, wrapping around.
    fn pick(&self, block: IpNetwork, used: &HashSet<IpAddr>) -> Option<IpAddr> {
        let (first, last) = usable(block);
        if last < first {
            return None;
        }
        let size = last - first + 1;
        let in_block = used.iter().filter(|ip| block.contains(**ip)).count() as u128;
        if in_block >= size {
            return None;
        }
        let start = match self.cursors.get(&block.to_string()) {
            Some(c) if block.contains(*c) => {
                let c = to_u128(*c);
                if c >= last || c < first {
                    first
                } else {
                    c + 1
                }
            }
            _ => first,
        };
        // At most in_block + 1 candidates are looked at: one of them is free.
        let mut v = start;
        for _ in 0..=in_block {
            let ip = to_ip(block, v);
            if !used.contains(&ip) {
                return Some(ip);
            }
            v = if v >= last { first } else { v + 1 };
        }
        None
    }

    /// Removes the other attachments whose host veth is `claim`'s: the plugin makes that veth
    /// for `claim` before asking for addresses, replacing the pair of a sandbox of the same pod
    /// that died without a DEL, so those attachments have no host side left. Returns them.
    pub fn supersede(&mut self, claim: &Claim) -> Vec<Allocation> {
        let (gone, kept) = std::mem::take(&mut self.allocations)
            .into_iter()
            .partition(|a| a.host_veth == claim.host_veth && a.key != claim.key);
        self.allocations = kept;
        gone
    }

    /// Releases an attachment; returns what it held (None when unknown: DEL is idempotent).
    pub fn release(&mut self, key: &AttachmentKey) -> Option<Allocation> {
        let pos = self.allocations.iter().position(|a| &a.key == key)?;
        Some(self.allocations.remove(pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn claim(id: &str) -> Claim {
        Claim {
            key: AttachmentKey {
                container_id: id.into(),
                ifname: "eth0".into(),
            },
            pod_namespace: "default".into(),
            pod_name: id.into(),
            host_veth: format!("sep{id}"),
            port_mappings: Vec::new(),
        }
    }

    fn state(blocks: &[&str]) -> IpamState {
        let mut s = IpamState::default();
        s.set_blocks(blocks.iter().map(|b| b.parse().unwrap()).collect());
        s
    }

    #[test]
    fn skips_network_and_broadcast_and_exhausts() {
        let mut s = state(&["10.0.0.0/30"]);
        let a = s.allocate(&claim("a")).unwrap();
        let b = s.allocate(&claim("b")).unwrap();
        assert_eq!(a.ips, vec!["10.0.0.1".parse::<IpAddr>().unwrap()]);
        assert_eq!(b.ips, vec!["10.0.0.2".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            s.allocate(&claim("c")),
            Err(IpamError::Exhausted("10.0.0.0/30".parse().unwrap()))
        );
        assert!(
            s.get(&claim("c").key).is_none(),
            "failed claim leaves nothing"
        );
    }

    #[test]
    fn idempotent_add_and_no_immediate_reuse() {
        let mut s = state(&["10.0.0.0/29"]);
        let a = s.allocate(&claim("a")).unwrap();
        assert_eq!(s.allocate(&claim("a")).unwrap().ips, a.ips);
        assert_eq!(s.allocations.len(), 1);
        s.release(&claim("a").key).unwrap();
        assert!(s.release(&claim("a").key).is_none());
        let b = s.allocate(&claim("b")).unwrap();
        assert_ne!(a.ips, b.ips, "released address not reused at once");
        // The cursor wraps around and fills the block.
        for id in ["c", "d", "e", "f", "g"] {
            s.allocate(&claim(id)).unwrap();
        }
        let mut all: Vec<IpAddr> = s.allocations.iter().flat_map(|a| a.ips.clone()).collect();
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 6, "/29 has 6 usable addresses, all distinct");
        assert!(s.allocate(&claim("h")).is_err());
    }

    #[test]
    fn dual_stack_gives_one_of_each() {
        let mut s = state(&["10.0.0.0/24", "fd00::/120"]);
        let a = s.allocate(&claim("a")).unwrap();
        assert_eq!(a.ips.len(), 2);
        assert!(a.ips[0].is_ipv4() && a.ips[1].is_ipv6());
        assert_eq!(a.ips[1], "fd00::1".parse::<IpAddr>().unwrap());
        // v6 exhaustion fails the whole claim and takes no v4 address.
        let mut s = state(&["10.0.0.0/24", "fd00::/127"]);
        s.allocate(&claim("a")).unwrap();
        s.allocate(&claim("b")).unwrap();
        assert!(matches!(
            s.allocate(&claim("c")),
            Err(IpamError::Exhausted(_))
        ));
        assert_eq!(s.allocations.len(), 2);
    }

    #[test]
    fn no_block_and_block_changes() {
        let mut s = IpamState::default();
        assert_eq!(s.allocate(&claim("a")), Err(IpamError::NoBlock));
        s.set_blocks(vec!["10.0.0.0/24".parse().unwrap()]);
        s.allocate(&claim("a")).unwrap();
        let outside = s.set_blocks(vec!["10.0.1.0/24".parse().unwrap()]);
        assert_eq!(outside.len(), 1, "allocation outside the new block is kept");
        assert_eq!(s.allocations.len(), 1);
        let b = s.allocate(&claim("b")).unwrap();
        assert!(b.ips[0].to_string().starts_with("10.0.1."));
    }

    #[test]
    fn large_v6_block() {
        let mut s = state(&["fd00:1::/64"]);
        let a = s.allocate(&claim("a")).unwrap();
        assert_eq!(a.ips, vec!["fd00:1::1".parse::<IpAddr>().unwrap()]);
    }
}
