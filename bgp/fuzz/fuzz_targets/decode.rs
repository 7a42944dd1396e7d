// Fuzz target: the wire decoder must return a message, "need more" or a NOTIFICATION, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use sepal_bgp::wire::{decode, DecodeCtx};

fuzz_target!(|data: &[u8]| {
    let Some((flags, rest)) = data.split_first() else { return };
    let ctx = DecodeCtx { asn4: flags & 1 != 0, extended_message: flags & 2 != 0 };
    let mut buf = rest;
    while let Ok(Some((_, used))) = decode(buf, ctx) {
        buf = &buf[used..];
    }
});
