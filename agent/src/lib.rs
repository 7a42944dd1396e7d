//! The `sepal` binary's code: the node agent (`sepal node`), the lab (`sepal lab`), and the
//! operator commands, each a clap subcommand dispatched here (`main`, which src/main.rs calls).
//! A library so that the fuzz targets in agent/fuzz reach the decoders; only `main` and
//! `testing` are public.

mod admin;
mod bfd;
mod config;
mod crd;
mod datastore;
mod flows;
mod hostports;
mod ipam;
mod lab;
mod metrics;
mod model;
mod node;
mod ops;
mod policy;
mod policy_explain;
mod routing;
mod server;
pub mod testing;

use clap::{Parser, Subcommand};
use config::{LogFormat, NodeArgs, NodeConfig};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "sepal",
    version,
    about = "Sepal: a Layer 3 Kubernetes pod network"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the node agent: IPAM, the CNI plugin's socket, host routes.
    Node(NodeArgs),
    /// Run BFD apart from the agent, for its `--bfd-socket`: the sessions outlive agent
    /// restarts, so peers keep the node's routes through them (graceful restart).
    Bfd(bfd::daemon::BfdArgs),
    /// A whole cluster on one Linux box, in network namespaces.
    Lab(lab::LabArgs),
    /// Print the model a datastore yields (once synced; with --watch after every change).
    Datastore(datastore::kube::InspectArgs),
    /// Write Sepal's CRDs (generated from the Rust types) into a directory.
    Crds {
        #[arg(long, default_value = "deploy/crds")]
        out: std::path::PathBuf,
    },
    /// The agent's state: node, blocks, datastore, readiness and BGP sessions.
    Status {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: ops::AgentTarget,
    },
    /// Kernel routes Sepal owns (protocol 83), with the BGP route each comes from.
    Routes {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: ops::AgentTarget,
    },
    /// This node's pods: addresses, host veths, whether they are routed.
    Endpoints {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        target: ops::AgentTarget,
    },
    /// The path of a packet from a pod: veths, route lookups, BGP next hops, policy verdicts.
    Trace(ops::FlowArgs),
    /// NetworkPolicy: `explain` why a packet is allowed or dropped.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// Flow records: each flow a policy rule denied (or allowed, with `sepal node --flow-logs
    /// all`), its pods and the tier, policy and rule that decided, from the running agent.
    Flows(flows::cli::FlowsArgs),
}

#[derive(Debug, Subcommand)]
enum PolicyCommand {
    /// The verdict for one packet, the policy rule that decided it and its kernel counters,
    /// from the running agent.
    Explain(ops::FlowArgs),
}

impl Command {
    /// Long-running commands with network connections: the agent, the datastore watcher, the
    /// lab's API relay and control-plane supervisor.
    fn has_sockets(&self) -> bool {
        match self {
            Command::Node(_) | Command::Bfd(_) | Command::Datastore(_) => true,
            Command::Lab(lab) => lab.command.has_sockets(),
            _ => false,
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn run_node(args: NodeArgs) -> anyhow::Result<()> {
    let cfg = NodeConfig::resolve(&args)?;
    init_logging(cfg.log_format);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(node::run(cfg))
}

/// The `sepal` command line.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !cli.command.has_sockets() {
        // A command's output piped into `head` ends it quietly, as for any Unix tool (Rust
        // ignores SIGPIPE, and println! then panics). Commands that hold network connections
        // keep ignoring it: with the default action, a write to a connection the peer has reset
        // kills the process without a word.
        // SAFETY: called before any thread starts; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let result = match cli.command {
        Command::Node(args) => run_node(args),
        Command::Bfd(args) => bfd::daemon::run(args),
        Command::Lab(args) => lab::run(args),
        Command::Datastore(args) => datastore::kube::run_inspect(args),
        Command::Crds { out } => crd::write_crds(&out)
            .map(|files| files.iter().for_each(|f| println!("{}", f.display())))
            .map_err(Into::into),
        Command::Status { json, target } => ops::status(&target, json),
        Command::Routes { json, target } => ops::routes(&target, json),
        Command::Endpoints { json, target } => ops::endpoints(&target, json),
        Command::Trace(args) => ops::trace(&args),
        Command::Policy(PolicyCommand::Explain(args)) => policy_explain::run(&args),
        Command::Flows(args) => flows::cli::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sepal: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
