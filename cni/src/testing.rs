// Drivers shared by the fuzz target in cni/fuzz and the mutation test: one plugin invocation's
// environment and stdin in, checked output out; no netlink, namespaces, sockets or files.
// Not part of the stable API.

use crate::api::{codes, host_veth_name, tombstone_name};
use crate::error::{MAX_DETAILS, MAX_MSG};
use crate::plugin::{self, Invocation, Outcome};
use crate::result::CniResult;
use crate::version::{CniVersion, SUPPORTED};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::IpAddr;

/// Bound on a printed error object, whatever the input.
pub const MAX_ERROR: usize = 4096;

/// The fuzz input's two parts: `KEY=VALUE` lines up to the first empty line are the environment
/// (a value that is not UTF-8 reads as unset, as `std::env::var` gives it), the rest is stdin.
pub fn split(data: &[u8]) -> (BTreeMap<String, String>, &[u8]) {
    let (env, stdin) = match data.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&data[..i], &data[i + 2..]),
        None => (data, &data[data.len()..]),
    };
    let mut vars = BTreeMap::new();
    for line in env.split(|b| *b == b'\n') {
        let Some(eq) = line.iter().position(|b| *b == b'=') else {
            continue;
        };
        if let (Ok(k), Ok(v)) = (
            std::str::from_utf8(&line[..eq]),
            std::str::from_utf8(&line[eq + 1..]),
        ) {
            // getenv(3) returns the first of repeated names.
            vars.entry(k.to_string()).or_insert_with(|| v.to_string());
        }
    }
    (vars, stdin)
}

/// Runs the plugin's parsing and validation (`plugin::parse`) on one input and renders what the
/// plugin would print without touching the node: the error object, VERSION's answer, or for ADD
/// the result it would build from a fixed agent answer. Panics when an invariant breaks: errors
/// are the spec's error object with a code and a message, bounded in size; results are bounded
/// by the input and parse back (a chained plugin reads them as its prevResult).
pub fn invocation(data: &[u8]) -> Outcome {
    let (vars, stdin) = split(data);
    match plugin::parse(|k| vars.get(k).cloned(), stdin) {
        Err(e) => {
            let out = plugin::failure(&e, stdin);
            check_error(&out);
            let code = e.code;
            assert!(
                matches!(
                    code,
                    codes::INCOMPATIBLE_VERSION
                        | codes::UNSUPPORTED_FIELD
                        | codes::INVALID_ENV
                        | codes::DECODE_FAILURE
                        | codes::INVALID_CONFIG
                        | codes::CHECK_FAILED
                ),
                "code {code} from parsing alone: {e}"
            );
            out
        }
        Ok(invocation) => {
            let stdout = rendered(&invocation, stdin.len());
            Outcome {
                stdout,
                exit_code: 0,
            }
        }
    }
}

/// Checks a failure's stdout: the spec's error object, in a version we speak, at most
/// `MAX_ERROR` bytes, with a well-known code (or a plugin's, 100 and up) and a message.
pub fn check_error(out: &Outcome) {
    assert_eq!(out.exit_code, 1);
    let text = out
        .stdout
        .as_deref()
        .expect("a failure prints the error object");
    assert!(
        text.len() <= MAX_ERROR,
        "error object of {} bytes",
        text.len()
    );
    let v: Value = serde_json::from_str(text).expect("the error object is JSON");
    let code = v["code"].as_u64().expect("the error object has a code");
    assert!(
        matches!(code, 1..=7 | 11 | 50 | 51 | 100..=999),
        "code {code} is neither the spec's nor a plugin's"
    );
    let msg = v["msg"].as_str().expect("the error object has a msg");
    assert!(!msg.trim().is_empty(), "empty msg in {text}");
    assert!(msg.len() <= MAX_MSG && v["details"].as_str().map_or(0, str::len) <= MAX_DETAILS);
    let version = v["cniVersion"].as_str().unwrap_or_default();
    assert!(
        SUPPORTED.iter().any(|s| s.as_str() == version),
        "error in version {version:?}"
    );
}

/// What a checked invocation leads to that needs no node: VERSION's answer, ADD's result.
fn rendered(invocation: &Invocation, input_len: usize) -> Option<String> {
    match invocation {
        Invocation::Version(answer) => {
            let text = answer.to_string();
            assert!(text.len() <= 256, "VERSION answer {text}");
            assert!(answer["supportedVersions"].is_array());
            Some(text)
        }
        Invocation::Add(env, conf) => {
            assert!(env.netns.is_some(), "ADD without CNI_NETNS");
            let host_veth = env.host_veth();
            assert_eq!(host_veth.len(), 14);
            assert!(tombstone_name(&host_veth).len() <= 15);
            let (ns, name) = env.pod();
            assert_eq!(host_veth, host_veth_name(&ns, &name));
            if let Some(prev) = &conf.prev_result {
                // Passed through whole: what the earlier plugin reported survives.
                let again = CniResult::from_prev(&prev.to_json(CniVersion::LATEST));
                assert_eq!(again.as_ref(), Ok(prev), "prevResult changed in passing");
            }
            let ips: [IpAddr; 2] = [
                IpAddr::V4(std::net::Ipv4Addr::new(10, 244, 0, 5)),
                IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 5)),
            ];
            let out =
                plugin::add_output(env, conf, &host_veth, "02:00:00:00:00:01", conf.mtu, &ips);
            let text = out.to_string();
            assert!(
                text.len() <= 2 * input_len + 2048,
                "ADD result of {} bytes from {input_len} bytes of input",
                text.len()
            );
            // The next plugin in the chain reads it back as the same result.
            let back = CniResult::from_prev(&out).expect("ADD's result parses as a prevResult");
            assert_eq!(back.to_json(conf.cni_version), out);
            Some(text)
        }
        Invocation::Check(_, conf, expected) => {
            let prev = conf.prev_result.as_ref().expect("CHECK has a prevResult");
            assert!(!expected.ips.is_empty() && expected.ips.len() <= prev.ips.len());
            None
        }
        Invocation::Del(env, _) => {
            assert!(!env.container_id.is_empty() && !env.ifname.is_empty());
            None
        }
        Invocation::Status(conf) | Invocation::Gc(conf) => {
            assert!(conf.cni_version.has_status_and_gc());
            None
        }
    }
}

/// Inputs a runtime sends, as seeds for mutation (the fuzz target's seed corpus, too).
pub fn seeds() -> Vec<&'static [u8]> {
    vec![
        include_bytes!("../fuzz/seeds/invocation/add.txt"),
        include_bytes!("../fuzz/seeds/invocation/check.txt"),
        include_bytes!("../fuzz/seeds/invocation/del.txt"),
        include_bytes!("../fuzz/seeds/invocation/gc.txt"),
        include_bytes!("../fuzz/seeds/invocation/status.txt"),
        include_bytes!("../fuzz/seeds/invocation/version.txt"),
    ]
}

/// JSON values every decoder must meet: other types, bounds, odd strings.
pub const VALUE_TOKENS: &[&str] = &[
    "null",
    "true",
    "false",
    "0",
    "-1",
    "1",
    "65535",
    "65536",
    "1e999",
    "\"\"",
    "\"x\"",
    "[]",
    "{}",
    "[{}]",
    "\"\\u0000\"",
    "\"é\"",
];

/// A small deterministic mutator of text inputs (JSON, YAML, `KEY=VALUE` lines) for the
/// crates' mutation tests: byte edits, and replacements of whole values (a quoted string or a
/// run of word characters) by tokens, which keep the text parseable often enough to get past
/// the parser. No dependencies: a SplitMix64 stream from a fixed seed.
pub struct Mutator {
    state: u64,
}

impl Mutator {
    pub fn new(seed: u64) -> Mutator {
        Mutator { state: seed }
    }

    /// The next pseudo-random number.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// One mutant of `seed`: one to four edits, values replaced by tokens among them (the
    /// input's own `tokens`, and [`VALUE_TOKENS`]).
    pub fn mutate(&mut self, seed: &[u8], tokens: &[&str]) -> Vec<u8> {
        let mut m = seed.to_vec();
        for _ in 0..1 + self.below(4) {
            let k = self.below(VALUE_TOKENS.len() + tokens.len());
            let token = VALUE_TOKENS
                .get(k)
                .unwrap_or_else(|| &tokens[k - VALUE_TOKENS.len()]);
            let token = token.as_bytes();
            if m.is_empty() {
                m.extend_from_slice(token);
                continue;
            }
            let i = self.below(m.len());
            match self.below(8) {
                0 => m[i] = self.next_u64() as u8,
                1 => m[i] ^= 1 << self.below(8),
                2 => {
                    m.splice(i..i, token.iter().copied());
                }
                3 => {
                    let end = (i + 1 + self.below(16)).min(m.len());
                    m.drain(i..end);
                }
                4 => {
                    // Repeat a stretch: duplicate keys, list items, documents.
                    let end = (i + 1 + self.below(64)).min(m.len());
                    let copy = m[i..end].to_vec();
                    let at = self.below(m.len());
                    m.splice(at..at, copy);
                }
                5 if self.below(4) == 0 => m.truncate(i),
                _ => {
                    let (start, end) = value_at(&m, i);
                    m.splice(start..end, token.iter().copied());
                }
            }
        }
        m
    }
}

/// The value around `i`: a quoted string (quotes included) or a run of word characters.
fn value_at(text: &[u8], i: usize) -> (usize, usize) {
    let mut open = None;
    let mut j = 0;
    while j < text.len() && (j <= i || open.is_some()) {
        match (text[j], open) {
            (b'\\', Some(_)) => j += 1,
            (b'"', None) => open = Some(j),
            (b'"', Some(start)) if j >= i => return (start, j + 1),
            (b'"', Some(_)) => open = None,
            _ => {}
        }
        j += 1;
    }
    let word = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'/');
    let start = text[..i]
        .iter()
        .rposition(|b| !word(*b))
        .map_or(0, |p| p + 1);
    let end = text[i..]
        .iter()
        .position(|b| !word(*b))
        .map_or(text.len(), |p| i + p);
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The spec's words and values (with the mutator's own value tokens).
    const TOKENS: &[&str] = &[
        "4294967296",
        "\"eth0\"",
        "\"1.1.0\"",
        "\"0.4.0\"",
        "\"0.3.1\"",
        "\"10.0.0.1/32\"",
        "\"fd00::1/128\"",
        "\"::/0\"",
        "\"tcp\"",
        "\"SCTP\"",
        "\"127.0.0.1\"",
        "ADD",
        "DEL",
        "CHECK",
        "GC",
        "STATUS",
        "VERSION",
        "=",
        ";",
        "\n",
        "\n\n",
        "IgnoreUnknown=1",
        "K8S_POD_NAME=",
        "CNI_NETNS=",
        "CNI_IFNAME=..",
        "\"prevResult\"",
        "\"ipam\"",
        "\"interface\"",
        "\"portMappings\"",
        "2",
    ];

    #[test]
    fn seeds_pass_their_checks() {
        for seed in seeds() {
            let out = invocation(seed);
            assert_eq!(
                out.exit_code,
                0,
                "{}: {:?}",
                String::from_utf8_lossy(seed),
                out.stdout
            );
        }
    }

    #[test]
    fn mutated_invocations_keep_the_invariants() {
        let seeds = seeds();
        let mut rng = Mutator::new(0x5e9a1);
        let (mut ok, mut err) = (0u32, 0u32);
        for _ in 0..20_000 {
            let seed = seeds[rng.below(seeds.len())];
            let input = rng.mutate(seed, TOKENS);
            match invocation(&input).exit_code {
                0 => ok += 1,
                _ => err += 1,
            }
        }
        assert!(
            ok > 1000 && err > 1000,
            "mutations too mild or too harsh: {ok} ok, {err} errors"
        );
    }

    #[test]
    fn input_splits_into_environment_and_stdin() {
        let (vars, stdin) = split(b"A=1\nB=x=y\nA=2\nnoise\nC=\xff\n\n{\"a\":1}\n\nmore");
        assert_eq!(vars.get("A").map(String::as_str), Some("1"));
        assert_eq!(vars.get("B").map(String::as_str), Some("x=y"));
        assert_eq!(vars.get("C"), None);
        assert_eq!(stdin, b"{\"a\":1}\n\nmore");
        let (vars, stdin) = split(b"CNI_COMMAND=VERSION");
        assert_eq!(vars.len(), 1);
        assert!(stdin.is_empty());
    }
}
