//! Incremental changes to table `inet sepal` in nf_tables' own netlink protocol, bypassing
//! libnftables.
//!
//! Why: before each transaction libnftables (1.0.6 here) fetches the table's chain and set
//! definitions, and the elements of every interval set, to check the commands against them.
//! At 2,400 chains and 600 sets that is about 300 KB and 7 ms per change, however small the
//! change: most of what a pod start or a policy edit costs. The kernel needs none of it; it
//! resolves every name in the batch itself and checks everything nft would.
//!
//! So the steps of a diff (`nft::Op`, the same list the nft text is written from) are encoded
//! here as one nfnetlink batch, one transaction, as atomic as the text batch, and sent on a
//! socket of our own (`socket`). Each step is encoded exactly as nft 1.0.6 encodes the same
//! command: the same expressions and registers (`rules`), set flags, key types and user data,
//! and element layouts (`keys`), so `nft list` shows the same table whichever path wrote it.
//! `tests/tests/nft_wire_root.rs` applies the same changes both ways and compares.
//!
//! Steps this module does not encode (base chains come and go once per direction), text it
//! cannot parse, or a batch the kernel refuses leave the diff to the text path, unchanged.

mod attrs;
mod keys;
mod rules;
mod socket;

pub use socket::{WireError, WireSocket};

use crate::nft::{Op, Options, TABLE};
use crate::policy::{Family, Ruleset, SetKind};
pub use attrs::Batch;
use attrs::NLM_F_CREATE;

const NFT_MSG_NEWCHAIN: u8 = 3;
const NFT_MSG_DELCHAIN: u8 = 5;
const NFT_MSG_DELRULE: u8 = 8;
const NFT_MSG_NEWSET: u8 = 9;
const NFT_MSG_DELSET: u8 = 11;
const NFT_MSG_NEWSETELEM: u8 = 12;
const NFT_MSG_DELSETELEM: u8 = 14;

const NFT_SET_INTERVAL: u32 = 0x4;
const NFT_SET_CONCAT: u32 = 0x80;
const NFT_SET_ELEM_INTERVAL_END: u32 = 0x1;

/// nft's data type ids (its `enum datatypes`); a concatenation's id packs them 6 bits apiece.
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;

/// What nft stores as a set's user data (key byte order, and for concatenations the typeof
/// description) for each declaration the compiler uses, byte for byte.
const UDATA_ADDR: &[u8] = &[0x00, 0x04, 0x02, 0x00, 0x00, 0x00];
const UDATA_CONCAT: &[u8] = &[
    0x00, 0x04, 0x00, 0x00, 0x00, 0x00, 0x03, 0x08, 0x00, 0x04, 0x0d, 0x00, 0x00, 0x00, 0x01, 0x00,
];

/// Element lists are split so that one message's nest stays well inside 64 KiB.
const ELEMENTS_PER_MESSAGE_BYTES: usize = 32 * 1024;

/// Why a diff went to the text path instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unsupported(pub &'static str);

/// Sends the whole difference from `old` to `new` as one netlink batch, and nothing else (no
/// fallback): for tests and tools. The dataplane uses `encode` and falls back itself.
pub fn send_diff(
    socket: &mut WireSocket,
    old: &Ruleset,
    new: &Ruleset,
    opts: &Options,
) -> Result<(), WireError> {
    let ops = crate::nft::diff_ops(old, new, &crate::nft::Scope::all(old, new));
    let batch = encode(&ops, old, new, opts).map_err(|why| WireError::Unsupported(why.0))?;
    socket.commit(&batch)
}

/// `ops` (from `old` to `new`) as one batch.
pub(crate) fn encode(
    ops: &[Op],
    old: &Ruleset,
    new: &Ruleset,
    opts: &Options,
) -> Result<Batch, Unsupported> {
    let mut b = Batch::new(1);
    let mut next_set_id = 1;
    for op in ops {
        match op {
            Op::AddSet(name, kind) => {
                add_set(&mut b, name, *kind, next_set_id);
                next_set_id += 1;
            }
            // Elements are laid out by their set's kind: the new set's when adding, the old one's
            // when deleting (a set whose kind changes is replaced whole).
            Op::AddElements(name, elements) => set_elements(
                &mut b,
                NFT_MSG_NEWSETELEM,
                name,
                kind_of(new, name)?,
                elements,
            )?,
            Op::DeleteElements(name, elements) => set_elements(
                &mut b,
                NFT_MSG_DELSETELEM,
                name,
                kind_of(old, name)?,
                elements,
            )?,
            Op::AddChain(name) => chain(&mut b, NFT_MSG_NEWCHAIN, NLM_F_CREATE, name),
            Op::FlushChain(name) => {
                b.begin(NFT_MSG_DELRULE, 0, format!("flush chain {name}"));
                b.put_str(1, TABLE); // NFTA_RULE_TABLE
                b.put_str(2, name); // NFTA_RULE_CHAIN
                b.end();
            }
            Op::AddRules(name, chain) => {
                for rule in &chain.rules {
                    rules::add_rule(
                        &mut b,
                        TABLE,
                        name,
                        rule,
                        &new.sets,
                        opts.nflog_group,
                        opts.flow_log.as_ref(),
                    )?;
                }
            }
            Op::AddMapEntries(map, entries) => {
                map_elements(&mut b, NFT_MSG_NEWSETELEM, map, entries)?
            }
            Op::DeleteMapKeys(map, keys) => {
                let entries: Vec<(&str, &str)> = keys.iter().map(|k| (*k, "")).collect();
                map_elements(&mut b, NFT_MSG_DELSETELEM, map, &entries)?;
            }
            Op::AddBaseChain(_) => return Err(Unsupported("a base chain")),
            Op::DeleteChain(name) => chain(&mut b, NFT_MSG_DELCHAIN, 0, name),
            Op::DeleteSet(name) => {
                b.begin(NFT_MSG_DELSET, 0, format!("delete set {name}"));
                b.put_str(1, TABLE); // NFTA_SET_TABLE
                b.put_str(2, name); // NFTA_SET_NAME
                b.end();
            }
        }
    }
    if b.overflow {
        return Err(Unsupported("an attribute too long for netlink"));
    }
    b.finish();
    Ok(b)
}

fn kind_of(rs: &Ruleset, set: &str) -> Result<SetKind, Unsupported> {
    rs.sets
        .get(set)
        .map(|s| s.kind)
        .ok_or(Unsupported("elements of an unknown set"))
}

fn chain(b: &mut Batch, msg: u8, flags: u16, name: &str) {
    let verb = if msg == NFT_MSG_NEWCHAIN {
        "add"
    } else {
        "delete"
    };
    b.begin(msg, flags, format!("{verb} chain {name}"));
    b.put_str(1, TABLE); // NFTA_CHAIN_TABLE
    b.put_str(3, name); // NFTA_CHAIN_NAME
    b.end();
}

/// Flags, key type and key length of a set of `kind`, as nft declares it.
fn set_shape(kind: SetKind) -> (u32, u32, u32) {
    let addr = |f| match f {
        Family::V4 => (TYPE_IPADDR, 4),
        Family::V6 => (TYPE_IP6ADDR, 16),
    };
    let proto_port = (TYPE_INET_PROTOCOL << 6) | TYPE_INET_SERVICE;
    match kind {
        SetKind::Addr(f) => (0, addr(f).0, addr(f).1),
        SetKind::AddrInterval(f) => (NFT_SET_INTERVAL, addr(f).0, addr(f).1),
        SetKind::ProtoPort => (0, proto_port, 8),
        SetKind::ProtoPortInterval => (NFT_SET_INTERVAL | NFT_SET_CONCAT, proto_port, 8),
        SetKind::AddrProtoPort(f) => (0, (addr(f).0 << 12) | proto_port, addr(f).1 + 8),
    }
}

fn add_set(b: &mut Batch, name: &str, kind: SetKind, id: u32) {
    let (flags, key_type, key_len) = set_shape(kind);
    b.begin(NFT_MSG_NEWSET, NLM_F_CREATE, format!("add set {name}"));
    b.put_str(1, TABLE); // NFTA_SET_TABLE
    b.put_str(2, name); // NFTA_SET_NAME
    b.put_u32(3, flags); // NFTA_SET_FLAGS
    b.put_u32(4, key_type); // NFTA_SET_KEY_TYPE
    b.put_u32(5, key_len); // NFTA_SET_KEY_LEN
    b.put_u32(10, id); // NFTA_SET_ID
    if kind == SetKind::ProtoPortInterval {
        // A concatenated interval set (pipapo) needs its fields' lengths: protocol, port.
        b.nest(9); // NFTA_SET_DESC
        b.nest(2); // NFTA_SET_DESC_CONCAT
        for len in [1, 2] {
            b.nest(1); // NFTA_LIST_ELEM
            b.put_u32(1, len); // NFTA_SET_FIELD_LEN
            b.end_nest();
        }
        b.end_nest();
        b.end_nest();
    }
    let udata = match kind {
        SetKind::Addr(_) | SetKind::AddrInterval(_) => UDATA_ADDR,
        _ => UDATA_CONCAT,
    };
    b.put(13, udata); // NFTA_SET_USERDATA
    b.end();
}

fn begin_elements(b: &mut Batch, msg: u8, set: &str) {
    let verb = if msg == NFT_MSG_NEWSETELEM {
        "add"
    } else {
        "delete"
    };
    b.begin(
        msg,
        if msg == NFT_MSG_NEWSETELEM {
            NLM_F_CREATE
        } else {
            0
        },
        format!("{verb} elements of {set}"),
    );
    b.put_str(1, TABLE); // NFTA_SET_ELEM_LIST_TABLE
    b.put_str(2, set); // NFTA_SET_ELEM_LIST_SET
    b.nest(3); // NFTA_SET_ELEM_LIST_ELEMENTS
}

fn end_elements(b: &mut Batch) {
    b.end_nest();
    b.end();
}

/// Starts the next message for the same set when this one is full.
fn split_if_full(b: &mut Batch, msg: u8, set: &str) {
    if b.message_len() > ELEMENTS_PER_MESSAGE_BYTES {
        end_elements(b);
        begin_elements(b, msg, set);
    }
}

fn set_elements(
    b: &mut Batch,
    msg: u8,
    set: &str,
    kind: SetKind,
    elements: &[&String],
) -> Result<(), Unsupported> {
    begin_elements(b, msg, set);
    for text in elements {
        let wire = keys::elements(kind, text).ok_or(Unsupported("an element nft must parse"))?;
        for e in wire {
            b.nest(1); // NFTA_LIST_ELEM
            if e.interval_end {
                b.put_u32(3, NFT_SET_ELEM_INTERVAL_END); // NFTA_SET_ELEM_FLAGS
            }
            b.nest(1); // NFTA_SET_ELEM_KEY
            b.put(1, &e.key); // NFTA_DATA_VALUE
            b.end_nest();
            if let Some(end) = &e.key_end {
                b.nest(10); // NFTA_SET_ELEM_KEY_END
                b.put(1, end);
                b.end_nest();
            }
            b.end_nest();
        }
        split_if_full(b, msg, set);
    }
    end_elements(b);
    Ok(())
}

/// Verdict-map entries `iface : jump chain` (deleting: the keys only, `chain` empty).
fn map_elements(
    b: &mut Batch,
    msg: u8,
    map: &str,
    entries: &[(&str, &str)],
) -> Result<(), Unsupported> {
    begin_elements(b, msg, map);
    for (iface, chain) in entries {
        let key = keys::ifname(&crate::nft::unquoted(iface))
            .ok_or(Unsupported("an interface name nft must check"))?;
        b.nest(1); // NFTA_LIST_ELEM
        b.nest(1); // NFTA_SET_ELEM_KEY
        b.put(1, &key);
        b.end_nest();
        if msg == NFT_MSG_NEWSETELEM {
            b.nest(2); // NFTA_SET_ELEM_DATA
            b.nest(rules::NFTA_DATA_VERDICT);
            b.put_u32(rules::NFTA_VERDICT_CODE, rules::NFT_JUMP);
            b.put_str(rules::NFTA_VERDICT_CHAIN, chain);
            b.end_nest();
            b.end_nest();
        }
        b.end_nest();
        split_if_full(b, msg, map);
    }
    end_elements(b);
    Ok(())
}
