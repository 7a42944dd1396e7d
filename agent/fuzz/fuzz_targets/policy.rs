// Fuzz target: NetworkPolicies from a JSON file, validated and compiled by felix against a fixed
// cluster, rendered as nftables text: bounded, well-formed, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    sepal_agent::testing::policy(data);
});
