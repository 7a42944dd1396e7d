// Fixed-seed mutation test of the decoder and an Established session: mutated peer messages must
// never panic. Runs a bounded number of inputs (a few seconds) through the same functions as the
// libFuzzer targets in bgp/fuzz, which `scripts/fuzz-bgp` runs coverage-guided for longer.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sepal_bgp::testing::{decode_stream, feed_established_session, seeds};
use sepal_bgp::wire::{decode, DecodeCtx};

fn mutate(rng: &mut StdRng, seed: &[u8]) -> Vec<u8> {
    let mut m = seed.to_vec();
    for _ in 0..rng.random_range(1..=4) {
        if m.is_empty() {
            m.push(rng.random());
            continue;
        }
        let i = rng.random_range(0..m.len());
        match rng.random_range(0..6) {
            0 => m[i] = rng.random(),
            1 => m[i] ^= 1 << rng.random_range(0..8),
            2 => m.insert(i, rng.random()),
            3 => {
                m.remove(i);
            }
            4 => m.truncate(i),
            _ => m[i] = [0, 1, 0x7f, 0x80, 0xff][rng.random_range(0..5)],
        }
    }
    // Usually keep the header length consistent so the body parsers are reached.
    if m.len() >= 19 && rng.random_bool(0.8) {
        let len = (m.len() as u16).to_be_bytes();
        m[16] = len[0];
        m[17] = len[1];
    }
    m
}

#[test]
fn mutated_messages_never_panic() {
    let seeds = seeds();
    let mut rng = StdRng::seed_from_u64(0x5e9a1);
    let (mut ok, mut err) = (0u32, 0u32);
    for _ in 0..60_000 {
        let s = &seeds[rng.random_range(0..seeds.len())];
        let m = mutate(&mut rng, s);
        let ctx = DecodeCtx {
            asn4: rng.random(),
            extended_message: rng.random_bool(0.1),
        };
        match decode(&m, ctx) {
            Ok(_) => ok += 1,
            Err(n) => {
                assert!((1..=7).contains(&n.code), "{n:?}");
                err += 1;
            }
        }
        // Also as a stream after OPEN: two messages back to back.
        let mut stream = vec![u8::from(ctx.asn4)];
        stream.extend_from_slice(&m);
        let second = rng.random_range(0..seeds.len());
        stream.extend_from_slice(&mutate(&mut rng, &seeds[second]));
        decode_stream(&stream);
        feed_established_session(&stream);
    }
    assert!(
        ok > 1000 && err > 1000,
        "mutations too mild or too harsh: {ok} ok, {err} errors"
    );
}
