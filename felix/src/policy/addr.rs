//! Address sets as sorted, disjoint, non-adjacent ranges per family: the form an nftables interval
//! set needs (no two elements may overlap) and the form `except` subtraction is exact in.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::IpNetwork;

/// IPv4 or IPv6.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    pub fn of(ip: &IpAddr) -> Family {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    fn bits(self) -> u32 {
        match self {
            Family::V4 => 32,
            Family::V6 => 128,
        }
    }

    fn idx(self) -> usize {
        match self {
            Family::V4 => 0,
            Family::V6 => 1,
        }
    }
}

/// A set of addresses of both families.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddrRanges {
    ranges: [Vec<(u128, u128)>; 2],
}

fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u32::from(a) as u128,
        IpAddr::V6(a) => u128::from(a),
    }
}

fn from_u128(family: Family, v: u128) -> IpAddr {
    match family {
        Family::V4 => IpAddr::V4(Ipv4Addr::from(v as u32)),
        Family::V6 => IpAddr::V6(Ipv6Addr::from(v)),
    }
}

fn net_bounds(net: &IpNetwork) -> (Family, u128, u128) {
    let family = Family::of(&net.ip());
    let host_bits = family.bits() - net.prefix() as u32;
    let mask = if host_bits >= 128 {
        u128::MAX
    } else {
        (1u128 << host_bits) - 1
    };
    let start = to_u128(net.ip()) & !mask;
    (family, start, start | mask)
}

impl AddrRanges {
    pub fn new() -> AddrRanges {
        AddrRanges::default()
    }

    pub fn add_ip(&mut self, ip: IpAddr) {
        let v = to_u128(ip);
        self.add_range(Family::of(&ip), v, v);
    }

    pub fn add_net(&mut self, net: &IpNetwork) {
        let (family, start, end) = net_bounds(net);
        self.add_range(family, start, end);
    }

    fn normalize(&mut self) {
        for list in &mut self.ranges {
            Self::merge(list);
        }
    }

    fn add_range(&mut self, family: Family, start: u128, end: u128) {
        let list = &mut self.ranges[family.idx()];
        list.push((start, end));
        Self::merge(list);
    }

    fn merge(list: &mut Vec<(u128, u128)>) {
        list.sort_unstable();
        let mut merged: Vec<(u128, u128)> = Vec::with_capacity(list.len());
        for &(s, e) in list.iter() {
            match merged.last_mut() {
                Some(last) if s <= last.1.saturating_add(1) => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        *list = merged;
    }

    /// Removes a network (an ipBlock's `except`).
    pub fn subtract_net(&mut self, net: &IpNetwork) {
        let (family, cs, ce) = net_bounds(net);
        let list = &mut self.ranges[family.idx()];
        let mut out = Vec::with_capacity(list.len() + 1);
        for &(s, e) in list.iter() {
            if e < cs || s > ce {
                out.push((s, e));
                continue;
            }
            if s < cs {
                out.push((s, cs - 1));
            }
            if e > ce {
                out.push((ce + 1, e));
            }
        }
        *list = out;
    }

    /// Adds every range of `other`.
    pub fn union(&mut self, other: &AddrRanges) {
        for family in Family::ALL {
            self.ranges[family.idx()].extend_from_slice(&other.ranges[family.idx()]);
        }
        self.normalize();
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let v = to_u128(ip);
        let list = &self.ranges[Family::of(&ip).idx()];
        // Ranges are sorted and disjoint: the candidate is the last one starting at or before v.
        let i = list.partition_point(|&(s, _)| s <= v);
        i > 0 && list[i - 1].1 >= v
    }

    pub fn is_empty(&self, family: Family) -> bool {
        self.ranges[family.idx()].is_empty()
    }

    /// nftables interval-set elements of one family: `a`, `a/len` when the range is exactly a
    /// prefix, else `a-b`. Sorted and disjoint, so they never conflict inside the set.
    pub fn elements(&self, family: Family) -> Vec<String> {
        self.ranges[family.idx()]
            .iter()
            .map(|&(s, e)| range_element(family, s, e))
            .collect()
    }

    /// The same ranges split in two: single addresses (for a hash set, which a packet looks up
    /// in constant time) and wider ranges (interval-set elements, as `elements` gives them).
    pub fn hosts_and_ranges(&self, family: Family) -> (Vec<String>, Vec<String>) {
        let (hosts, wide): (Vec<_>, Vec<_>) = self.ranges[family.idx()]
            .iter()
            .partition(|&&(s, e)| s == e);
        (
            hosts
                .into_iter()
                .map(|&(s, _)| from_u128(family, s).to_string())
                .collect(),
            wide.into_iter()
                .map(|&(s, e)| range_element(family, s, e))
                .collect(),
        )
    }
}

fn range_element(family: Family, s: u128, e: u128) -> String {
    if s == e {
        return from_u128(family, s).to_string();
    }
    let size = e.wrapping_sub(s).wrapping_add(1);
    let is_prefix = size == 0 || (size.is_power_of_two() && s.is_multiple_of(size));
    if is_prefix {
        let host_bits = if size == 0 {
            128
        } else {
            size.trailing_zeros()
        };
        format!("{}/{}", from_u128(family, s), family.bits() - host_bits)
    } else {
        format!("{}-{}", from_u128(family, s), from_u128(family, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    #[test]
    fn except_splits_a_block_into_disjoint_ranges() {
        let mut r = AddrRanges::new();
        r.add_net(&net("10.0.0.0/8"));
        r.subtract_net(&net("10.1.0.0/16"));
        r.subtract_net(&net("10.2.3.4/32"));
        assert_eq!(
            r.elements(Family::V4),
            vec![
                "10.0.0.0/16",
                "10.2.0.0-10.2.3.3",
                "10.2.3.5-10.255.255.255"
            ]
        );
        assert!(r.contains("10.3.0.1".parse().unwrap()));
        assert!(!r.contains("10.1.2.3".parse().unwrap()));
        assert!(!r.contains("10.2.3.4".parse().unwrap()));
        assert!(!r.contains("11.0.0.0".parse().unwrap()));
        assert_eq!(
            r.hosts_and_ranges(Family::V4),
            (
                vec![],
                vec![
                    "10.0.0.0/16".to_string(),
                    "10.2.0.0-10.2.3.3".into(),
                    "10.2.3.5-10.255.255.255".into()
                ]
            )
        );
    }

    #[test]
    fn single_addresses_split_from_wider_ranges() {
        let mut r = AddrRanges::new();
        r.add_net(&net("10.0.0.9/32"));
        r.add_net(&net("10.0.0.16/28"));
        r.add_net(&net("10.0.1.1/32"));
        r.add_net(&net("10.0.1.3/32"));
        r.add_net(&net("fd00::1/128"));
        assert_eq!(
            r.hosts_and_ranges(Family::V4),
            (
                vec!["10.0.0.9".to_string(), "10.0.1.1".into(), "10.0.1.3".into()],
                vec!["10.0.0.16/28".to_string()]
            )
        );
        assert_eq!(
            r.hosts_and_ranges(Family::V6),
            (vec!["fd00::1".to_string()], vec![])
        );
    }

    #[test]
    fn adjacent_and_overlapping_ranges_merge() {
        let mut r = AddrRanges::new();
        r.add_ip("10.0.0.1".parse().unwrap());
        r.add_ip("10.0.0.0".parse().unwrap());
        r.add_net(&net("10.0.0.2/31"));
        r.add_net(&net("fd00::/64"));
        assert_eq!(r.elements(Family::V4), vec!["10.0.0.0/30"]);
        assert_eq!(r.elements(Family::V6), vec!["fd00::/64"]);
        let mut all = AddrRanges::new();
        all.add_net(&net("0.0.0.0/0"));
        all.add_net(&net("::/0"));
        assert_eq!(all.elements(Family::V4), vec!["0.0.0.0/0"]);
        assert_eq!(all.elements(Family::V6), vec!["::/0"]);
    }
}
