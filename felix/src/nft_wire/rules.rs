//! A compiled rule as nf_tables expressions, the ones nft 1.0.6 emits for the same rule text
//! (`nft --debug=netlink` shows them): the same loads, registers, dependencies and user data.

use std::collections::BTreeMap;

use super::attrs::{Batch, NLM_F_APPEND, NLM_F_CREATE};
use super::Unsupported;
use crate::flow_log::{self, FlowLog};
use crate::nft::unquoted;
use crate::policy::{Action, Family, Match, NftRule, Set, SetKind, PASS_MARK};

const NFT_MSG_NEWRULE: u8 = 6;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
pub(super) const NFTA_DATA_VERDICT: u16 = 2;
pub(super) const NFTA_VERDICT_CODE: u16 = 1;
pub(super) const NFTA_VERDICT_CHAIN: u16 = 2;

const NFT_REG_VERDICT: u32 = 0;
const NFT_REG_1: u32 = 1;
const NFT_REG32_00: u32 = 8;

const NFT_META_MARK: u32 = 3;
const NFT_META_NFPROTO: u32 = 15;
const NFT_META_L4PROTO: u32 = 16;
const NFT_PAYLOAD_NETWORK_HEADER: u32 = 1;
const NFT_PAYLOAD_TRANSPORT_HEADER: u32 = 2;
const NFT_CMP_EQ: u32 = 0;
const NFT_CMP_NEQ: u32 = 1;
const NFT_BYTEORDER_HTON: u32 = 1;
const NFT_OBJECT_LIMIT: u32 = 4;

const NF_DROP: u32 = 0;
const NF_ACCEPT: u32 = 1;
pub(super) const NFT_JUMP: u32 = -3i32 as u32;
const NFT_RETURN: u32 = -5i32 as u32;

/// nft keeps a rule's comment as user data: TLV type 0, at most 128 bytes.
const UDATA_RULE_COMMENT: u8 = 0;
const COMMENT_MAX: usize = 128;

/// The register holding the 32-bit word `word` of a concatenation, as nft names it: the
/// 16-byte register when the word starts one, else the 32-bit one.
fn reg(word: u32) -> u32 {
    if word.is_multiple_of(4) {
        NFT_REG_1 + word / 4
    } else {
        NFT_REG32_00 + word
    }
}

/// Appends `rule` (and, first, its flow-log rule) to `chain`.
pub fn add_rule(
    b: &mut Batch,
    table: &str,
    chain: &str,
    rule: &NftRule,
    sets: &BTreeMap<String, Set>,
    nflog_group: Option<u16>,
    flow: Option<&FlowLog>,
) -> Result<(), Unsupported> {
    if let (Some(flow), Some((limit, verb))) = (flow, flow_log::log_rule_parts(rule, flow)) {
        begin_rule(b, table, chain, format!("add flow-log rule to {chain}"));
        matches(b, rule, sets)?;
        objref_limit(b, limit);
        log(
            b,
            &unquoted(&flow_log::prefix(verb, &rule.comment)),
            flow.group,
        );
        end_rule(b, None)?;
    }
    begin_rule(
        b,
        table,
        chain,
        format!("add rule to {chain}: {}", rule.comment),
    );
    matches(b, rule, sets)?;
    expr(b, "counter", |_| {});
    match &rule.action {
        Action::Accept => verdict(b, NF_ACCEPT, None),
        Action::Jump(target) => verdict(b, NFT_JUMP, Some(target)),
        Action::Pass => {
            set_mark(b, !PASS_MARK, PASS_MARK);
            verdict(b, NFT_RETURN, None);
        }
        Action::Return => verdict(b, NFT_RETURN, None),
        Action::ClearPass => set_mark(b, !PASS_MARK, 0),
        Action::Drop => {
            if let Some(group) = nflog_group {
                log(b, &unquoted(&crate::nft::log_prefix(&rule.comment)), group);
            }
            verdict(b, NF_DROP, None);
        }
    }
    end_rule(b, Some(&rule.comment))
}

fn begin_rule(b: &mut Batch, table: &str, chain: &str, step: String) {
    b.begin(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, step);
    b.put_str(NFTA_RULE_TABLE, table);
    b.put_str(NFTA_RULE_CHAIN, chain);
    b.nest(NFTA_RULE_EXPRESSIONS);
}

fn end_rule(b: &mut Batch, comment: Option<&str>) -> Result<(), Unsupported> {
    b.end_nest();
    if let Some(comment) = comment {
        // As the text path quotes it: what it strips, the kernel never sees either way.
        let text = crate::nft::unquoted(comment);
        if text.len() > COMMENT_MAX {
            return Err(Unsupported("a comment longer than nft allows"));
        }
        let mut udata = vec![UDATA_RULE_COMMENT, (text.len() + 1) as u8];
        udata.extend(text.as_bytes());
        udata.push(0);
        b.put(NFTA_RULE_USERDATA, &udata);
    }
    b.end();
    Ok(())
}

/// One expression: its name and its attributes.
fn expr(b: &mut Batch, name: &str, data: impl FnOnce(&mut Batch)) {
    b.nest(NFTA_LIST_ELEM);
    b.put_str(NFTA_EXPR_NAME, name);
    b.nest(NFTA_EXPR_DATA);
    data(b);
    b.end_nest();
    b.end_nest();
}

fn meta_load(b: &mut Batch, key: u32, dreg: u32) {
    expr(b, "meta", |b| {
        b.put_u32(2, key); // NFTA_META_KEY
        b.put_u32(1, dreg); // NFTA_META_DREG
    });
}

fn payload(b: &mut Batch, base: u32, offset: u32, len: u32, dreg: u32) {
    expr(b, "payload", |b| {
        b.put_u32(1, dreg); // NFTA_PAYLOAD_DREG
        b.put_u32(2, base);
        b.put_u32(3, offset);
        b.put_u32(4, len);
    });
}

fn cmp(b: &mut Batch, op: u32, value: &[u8]) {
    expr(b, "cmp", |b| {
        b.put_u32(1, NFT_REG_1); // NFTA_CMP_SREG
        b.put_u32(2, op);
        b.nest(3); // NFTA_CMP_DATA
        b.put(NFTA_DATA_VALUE, value);
        b.end_nest();
    });
}

fn lookup(b: &mut Batch, set: &str) {
    expr(b, "lookup", |b| {
        b.put_u32(2, NFT_REG_1); // NFTA_LOOKUP_SREG
        b.put_str(1, set); // NFTA_LOOKUP_SET
    });
}

/// reg 1 = (reg 1 & mask) ^ xor, 4 bytes; the mark is in host byte order.
fn bitwise(b: &mut Batch, mask: u32, xor: u32) {
    expr(b, "bitwise", |b| {
        b.put_u32(1, NFT_REG_1); // NFTA_BITWISE_SREG
        b.put_u32(2, NFT_REG_1); // NFTA_BITWISE_DREG
        b.put_u32(6, 0); // NFTA_BITWISE_OP: NFT_BITWISE_BOOL
        b.put_u32(3, 4); // NFTA_BITWISE_LEN
        b.nest(4);
        b.put(NFTA_DATA_VALUE, &mask.to_ne_bytes());
        b.end_nest();
        b.nest(5);
        b.put(NFTA_DATA_VALUE, &xor.to_ne_bytes());
        b.end_nest();
    });
}

/// `meta mark set meta mark and MASK or XOR`.
fn set_mark(b: &mut Batch, mask: u32, xor: u32) {
    meta_load(b, NFT_META_MARK, NFT_REG_1);
    bitwise(b, mask, xor);
    expr(b, "meta", |b| {
        b.put_u32(2, NFT_META_MARK); // NFTA_META_KEY
        b.put_u32(3, NFT_REG_1); // NFTA_META_SREG
    });
}

fn verdict(b: &mut Batch, code: u32, chain: Option<&str>) {
    expr(b, "immediate", |b| {
        b.put_u32(1, NFT_REG_VERDICT); // NFTA_IMMEDIATE_DREG
        b.nest(2); // NFTA_IMMEDIATE_DATA
        b.nest(NFTA_DATA_VERDICT);
        b.put_u32(NFTA_VERDICT_CODE, code);
        if let Some(chain) = chain {
            b.put_str(NFTA_VERDICT_CHAIN, chain);
        }
        b.end_nest();
        b.end_nest();
    });
}

fn log(b: &mut Batch, prefix: &str, group: u16) {
    expr(b, "log", |b| {
        b.put_str(2, prefix); // NFTA_LOG_PREFIX
        b.put_u16(1, group); // NFTA_LOG_GROUP
    });
}

fn objref_limit(b: &mut Batch, name: &str) {
    expr(b, "objref", |b| {
        b.put_u32(1, NFT_OBJECT_LIMIT); // NFTA_OBJREF_IMM_TYPE
        b.put_str(2, name); // NFTA_OBJREF_IMM_NAME
    });
}

/// The rule's matches. An address match needs the packet's family first (`meta nfproto`), once
/// per rule as nft does it.
fn matches(b: &mut Batch, rule: &NftRule, sets: &BTreeMap<String, Set>) -> Result<(), Unsupported> {
    let mut family_checked = None;
    let mut family = |b: &mut Batch, f: Family| {
        if family_checked != Some(f) {
            meta_load(b, NFT_META_NFPROTO, NFT_REG_1);
            cmp(b, NFT_CMP_EQ, &[nfproto(f)]);
            family_checked = Some(f);
        }
    };
    for m in &rule.matches {
        match m {
            Match::SrcAddr(f, set) | Match::DstAddr(f, set) => {
                family(b, *f);
                let (offset, len) = addr_field(*f, matches!(m, Match::SrcAddr(..)));
                payload(b, NFT_PAYLOAD_NETWORK_HEADER, offset, len, NFT_REG_1);
                lookup(b, set);
            }
            Match::ProtoPort(set) => {
                let interval = match sets.get(set).map(|s| s.kind) {
                    Some(SetKind::ProtoPort) => false,
                    Some(SetKind::ProtoPortInterval) => true,
                    _ => return Err(Unsupported("a port match on a set of another kind")),
                };
                meta_load(b, NFT_META_L4PROTO, reg(0));
                if interval {
                    // nft's own step for `inet_proto` in a concatenated interval set.
                    expr(b, "byteorder", |b| {
                        b.put_u32(1, NFT_REG_1); // NFTA_BYTEORDER_SREG
                        b.put_u32(2, NFT_REG_1); // NFTA_BYTEORDER_DREG
                        b.put_u32(3, NFT_BYTEORDER_HTON);
                        b.put_u32(4, 1); // NFTA_BYTEORDER_LEN
                        b.put_u32(5, 2); // NFTA_BYTEORDER_SIZE
                    });
                }
                payload(b, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, reg(1));
                lookup(b, set);
            }
            Match::DstAddrProtoPort(f, set) => {
                family(b, *f);
                let (offset, len) = addr_field(*f, false);
                payload(b, NFT_PAYLOAD_NETWORK_HEADER, offset, len, NFT_REG_1);
                let words = len / 4;
                meta_load(b, NFT_META_L4PROTO, reg(words));
                payload(b, NFT_PAYLOAD_TRANSPORT_HEADER, 2, 2, reg(words + 1));
                lookup(b, set);
            }
            Match::Passed => {
                meta_load(b, NFT_META_MARK, NFT_REG_1);
                bitwise(b, PASS_MARK, 0);
                cmp(b, NFT_CMP_NEQ, &0u32.to_ne_bytes());
            }
        }
    }
    Ok(())
}

fn nfproto(f: Family) -> u8 {
    match f {
        Family::V4 => libc::NFPROTO_IPV4 as u8,
        Family::V6 => libc::NFPROTO_IPV6 as u8,
    }
}

/// Offset and length of the source or destination address in the network header.
fn addr_field(f: Family, source: bool) -> (u32, u32) {
    match (f, source) {
        (Family::V4, true) => (12, 4),
        (Family::V4, false) => (16, 4),
        (Family::V6, true) => (8, 16),
        (Family::V6, false) => (24, 16),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_are_named_as_nft_names_them() {
        // ip daddr . meta l4proto . th dport: reg 1, 9, 10; ip6: reg 1, 2, 13.
        assert_eq!([reg(0), reg(1), reg(2)], [1, 9, 10]);
        assert_eq!([reg(4), reg(5)], [2, 13]);
    }

    /// `ip saddr @s meta l4proto . th dport @p counter accept comment "x/web ingress[0]"`: the
    /// expressions in the order nft 1.0.6 sends them (`nft --debug=netlink`) and its comment's
    /// user data byte for byte (the root test compares whole tables with nft's).
    #[test]
    fn a_rule_is_encoded_as_nft_encodes_it() {
        let rule = NftRule {
            matches: vec![
                Match::SrcAddr(Family::V4, "s".into()),
                Match::ProtoPort("p".into()),
            ],
            action: Action::Accept,
            comment: "x/web ingress[0]".into(),
        };
        let sets = BTreeMap::from([(
            "p".to_string(),
            Set {
                kind: SetKind::ProtoPort,
                elements: Default::default(),
            },
        )]);
        let mut b = Batch::new(1);
        add_rule(&mut b, "sepal", "c", &rule, &sets, None, None).unwrap();
        let names: Vec<String> = b
            .buf
            .windows(10)
            .filter_map(|w| {
                [
                    "meta\0",
                    "cmp\0",
                    "payload\0",
                    "lookup\0",
                    "counter\0",
                    "immediate\0",
                ]
                .iter()
                .find(|n| w.starts_with(n.as_bytes()))
                .map(|n| n.trim_end_matches('\0').to_string())
            })
            .collect();
        assert_eq!(
            names,
            [
                "meta",
                "cmp",
                "payload",
                "lookup",
                "meta",
                "payload",
                "lookup",
                "counter",
                "immediate"
            ]
        );
        let udata = b"\x00\x11x/web ingress[0]\x00";
        assert!(b.buf.windows(udata.len()).any(|w| w == udata));
    }
}
