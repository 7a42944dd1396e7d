//! The benchmarks behind `sepal-bench`, one module each.

pub mod cni;

/// Subcommand names, for the usage line.
pub const NAMES: &[&str] = &["cni"];

pub fn run(what: &str, args: &[String]) -> anyhow::Result<()> {
    match what {
        "cni" => cni::run(args),
        other => anyhow::bail!("unknown benchmark {other:?}; one of {}", NAMES.join(", ")),
    }
}
