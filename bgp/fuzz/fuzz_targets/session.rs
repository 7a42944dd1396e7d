// Fuzz target: an Established session fed arbitrary bytes after the OPEN exchange.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sepal_bgp::testing::feed_established_session(data);
});
