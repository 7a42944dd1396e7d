//! The agent's bounded memory of flow records: the newest `capacity` records, oldest dropped
//! first. A packet of a flow that already has a record (same verdict, rule and 5-tuple, its last
//! packet less than `MERGE_WINDOW` ago) is counted into that record instead of making a new one,
//! so a denied connection's retransmitted SYNs are one record.

use super::record::{rfc3339, FlowRecord};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

/// Packets of one flow this close together share a record (TCP's SYN retries back off 1, 2, 4,
/// 8, 16 s).
pub const MERGE_WINDOW: Duration = Duration::from_secs(30);

/// What makes two packets one flow for a record.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub verdict: &'static str,
    pub comment: String,
    pub protocol: u8,
    pub src: std::net::IpAddr,
    pub sport: Option<u16>,
    pub dst: std::net::IpAddr,
    pub dport: Option<u16>,
}

#[derive(Debug)]
pub struct Ring {
    capacity: usize,
    records: VecDeque<FlowRecord>,
    /// Each record's flow, in the same order (to close it when the record goes).
    keys: VecDeque<FlowKey>,
    /// Flows with a record still in the ring: its seq and when its last packet came.
    open: HashMap<FlowKey, (u64, Instant)>,
    next_seq: u64,
}

impl Ring {
    pub fn new(capacity: usize) -> Ring {
        Ring {
            capacity: capacity.max(1),
            records: VecDeque::new(),
            keys: VecDeque::new(),
            open: HashMap::new(),
            next_seq: 1,
        }
    }

    /// Counts a packet into the flow's open record, if it has one; true when it did.
    pub fn merge(&mut self, key: &FlowKey, now: Instant, time: SystemTime) -> bool {
        let Some((seq, last)) = self.open.get_mut(key) else {
            return false;
        };
        if now.duration_since(*last) > MERGE_WINDOW {
            self.open.remove(key);
            return false;
        }
        *last = now;
        let seq = *seq;
        if let Some(r) = self.get_mut(seq) {
            r.packets += 1;
            r.last_time = rfc3339(time);
            return true;
        }
        false
    }

    /// Adds a new flow's record (its `seq` assigned here), dropping the oldest when full.
    pub fn push(&mut self, key: FlowKey, mut record: FlowRecord, now: Instant) {
        record.seq = self.next_seq;
        self.next_seq += 1;
        self.open.insert(key.clone(), (record.seq, now));
        self.keys.push_back(key);
        self.records.push_back(record);
        while self.records.len() > self.capacity {
            let (Some(old), Some(key)) = (self.records.pop_front(), self.keys.pop_front()) else {
                break;
            };
            if self.open.get(&key).is_some_and(|(seq, _)| *seq == old.seq) {
                self.open.remove(&key);
            }
        }
    }

    fn get_mut(&mut self, seq: u64) -> Option<&mut FlowRecord> {
        let first = self.records.front()?.seq;
        let at = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.records.get_mut(at)
    }

    /// The records after `after` (all with 0) that `keep` selects, oldest first.
    pub fn since(&self, after: u64, keep: impl Fn(&FlowRecord) -> bool) -> Vec<FlowRecord> {
        self.records
            .iter()
            .filter(|r| r.seq > after && keep(r))
            .cloned()
            .collect()
    }

    /// The seq of the newest record (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// The seq of the oldest record still held (what follows a gap in `--follow`).
    pub fn first_seq(&self) -> Option<u64> {
        self.records.front().map(|r| r.seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flows::record::{FlowRecord, Verdict};
    use crate::flows::rule::Decision;
    use sepal_felix::nflog::Flow;

    fn flow(sport: u16) -> (FlowKey, FlowRecord) {
        let f = Flow {
            protocol: 6,
            src: "10.0.0.1".parse().unwrap(),
            dst: "10.0.0.2".parse().unwrap(),
            sport: Some(sport),
            dport: Some(80),
        };
        let key = FlowKey {
            verdict: "denied",
            comment: "a/b ingress default deny".into(),
            protocol: 6,
            src: f.src,
            sport: f.sport,
            dst: f.dst,
            dport: f.dport,
        };
        let record = FlowRecord::new(
            "n",
            Verdict::Denied,
            &f,
            Decision::parse(&key.comment),
            [None, None],
            SystemTime::now(),
        );
        (key, record)
    }

    #[test]
    fn retransmissions_merge_and_new_flows_append() {
        let mut ring = Ring::new(3);
        let t0 = Instant::now();
        let (k1, r1) = flow(1000);
        ring.push(k1.clone(), r1, t0);
        assert!(ring.merge(&k1, t0 + Duration::from_secs(1), SystemTime::now()));
        assert!(ring.merge(&k1, t0 + Duration::from_secs(3), SystemTime::now()));
        let held = ring.since(0, |_| true);
        assert_eq!((held.len(), held[0].packets, held[0].seq), (1, 3, 1));
        // After the window the same 5-tuple is a new flow.
        assert!(!ring.merge(&k1, t0 + Duration::from_secs(40), SystemTime::now()));
        let (k2, r2) = flow(1001);
        assert!(!ring.merge(&k2, t0, SystemTime::now()));
        ring.push(k2, r2, t0);
        assert_eq!(ring.last_seq(), 2);
        assert_eq!(ring.since(1, |_| true).len(), 1);
    }

    #[test]
    fn full_rings_forget_the_oldest() {
        let mut ring = Ring::new(2);
        let now = Instant::now();
        for port in 0..5 {
            let (k, r) = flow(port);
            ring.push(k, r, now);
        }
        let held: Vec<u64> = ring.since(0, |_| true).iter().map(|r| r.seq).collect();
        assert_eq!(held, [4, 5]);
        assert_eq!(ring.first_seq(), Some(4));
        // The forgotten flows are no longer open: their next packet makes a new record.
        let (k0, _) = flow(0);
        assert!(!ring.merge(&k0, now, SystemTime::now()));
        assert_eq!(ring.open.len(), 2);
    }
}
