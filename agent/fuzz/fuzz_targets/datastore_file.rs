// Fuzz target: one dir datastore file (its name on the first line, then its content) decodes
// to objects or to an error naming a line, bounded, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sepal_agent::testing::datastore_file(data);
});
