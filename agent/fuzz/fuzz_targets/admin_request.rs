// Fuzz target: one operator socket request decodes (and trace/explain parse and explain) or gets
// a bounded error reply, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sepal_agent::testing::admin_request(data);
});
