//! `sepal-cni`: the CNI plugin binary. Reads the CNI_* environment and the config on stdin, prints
//! the result or the spec's error object on stdout, exits non-zero on error.

use std::io::{Read, Write};

fn main() {
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        // Without a config only VERSION can work; let the parser report the rest.
        eprintln!("sepal-cni: reading stdin: {e}");
        stdin.clear();
    }
    let outcome = sepal_cni::plugin::execute(|name| std::env::var(name).ok(), &stdin);
    if let Some(text) = outcome.stdout {
        let mut out = std::io::stdout().lock();
        let _ = out.write_all(text.as_bytes());
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }
    std::process::exit(outcome.exit_code);
}
