//! The benchmarks behind `sepal-bench`, one module each.

pub mod cni;
pub mod policy;

/// Subcommand names, for the usage line.
pub const NAMES: &[&str] = &["cni", "policy"];

pub fn run(what: &str, args: &[String]) -> anyhow::Result<()> {
    match what {
        "cni" => cni::run(args),
        "policy" => policy::run(args),
        other => anyhow::bail!("unknown benchmark {other:?}; one of {}", NAMES.join(", ")),
    }
}
