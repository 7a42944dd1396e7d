// Fuzz target: the wire decoder must return a message, "need more" or a NOTIFICATION, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sepal_bgp::testing::decode_stream(data);
});
