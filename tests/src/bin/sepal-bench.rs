//! `sepal-bench`: Sepal measured side by side with a reference in the same run, reported as
//! ratios. Each subcommand prints its figures and, as its last line, one JSON object.

use sepal_tests::bench;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((what, rest)) = args.split_first() else {
        eprintln!("usage: sepal-bench <{}> [options]", bench::NAMES.join("|"));
        std::process::exit(2);
    };
    if let Err(err) = bench::run(what, rest) {
        eprintln!("sepal-bench {what}: {err:#}");
        std::process::exit(1);
    }
}
