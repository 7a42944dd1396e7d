//! The benchmarks behind `sepal-bench`, one module each.

pub mod bgp;
pub mod cni;
pub mod datapath;
pub mod datastore;
pub mod fabric;
pub mod failover;
pub mod iperf;
pub mod podstart;
pub mod policy;
pub mod procstat;

/// Subcommand names, for the usage line.
pub const NAMES: &[&str] = &[
    "bgp",
    "cni",
    "datapath",
    "datastore",
    "fabric",
    "failover",
    "podstart",
    "policy",
];

pub fn run(what: &str, args: &[String]) -> anyhow::Result<()> {
    match what {
        "bgp" => bgp::run(args),
        "cni" => cni::run(args),
        "datapath" => datapath::run(args),
        "datastore" => datastore::run(args),
        "fabric" => fabric::run(args),
        "failover" => failover::run(args),
        "podstart" => podstart::run(args),
        "policy" => policy::run(args),
        other => anyhow::bail!("unknown benchmark {other:?}; one of {}", NAMES.join(", ")),
    }
}
