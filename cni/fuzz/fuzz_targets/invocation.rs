// Fuzz target: one plugin invocation (CNI_* environment lines, an empty line, the config on
// stdin) must parse or fail with the spec's error object, bounded, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sepal_cni::testing::invocation(data);
});
