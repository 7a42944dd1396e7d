//! `sepal node` settings: command-line flags, an optional YAML file with the same keys, and the
//! defaults, merged once at start (flags win over the file, the file over defaults).

use crate::datastore::DatastoreSpec;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/sepal";
/// Where `/metrics`, `/healthz` and `/readyz` answer (the DaemonSet's probes use it).
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9099";

/// `--metrics-addr`: an address, or `off`.
fn parse_metrics_addr(s: &str) -> Result<Option<std::net::SocketAddr>, String> {
    if s == "off" {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e| format!("metrics address {s:?}: {e} (want IP:PORT or off)"))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// What a stop (SIGTERM) means to the agent's BGP peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StopMode {
    /// Cease/Administrative Shutdown: peers drop this node's routes at once.
    #[default]
    Withdraw,
    /// A restart: sessions close without a NOTIFICATION and graceful-restart peers keep the
    /// routes until the next agent is back, or for the restart time.
    Restart,
}

/// Flags of `sepal node`. Every one is optional here so that the config file can fill it in.
#[derive(Debug, Clone, Default, Args)]
pub struct NodeArgs {
    /// This node's name: its Node object carries the pod blocks (default: the hostname).
    #[arg(long)]
    pub node_name: Option<String>,
    /// Where the cluster's objects come from: `kubernetes` or `dir:PATH`.
    #[arg(long)]
    pub datastore: Option<DatastoreSpec>,
    /// Kubeconfig for `--datastore kubernetes` [default: in-cluster, else KUBECONFIG or
    /// ~/.kube/config].
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Directory for the agent's state (IPAM allocations) [default: /var/lib/sepal].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Unix socket the CNI plugin talks to [default: /run/sepal/sepal.sock].
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// YAML file with any of these settings under the flag names (e.g. `node-name: n1`).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Log format on stderr [default: text].
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Pod MTU; by default the MTU of the node's IPv4 default-route interface.
    #[arg(long, value_parser = clap::value_parser!(u32).range(576..=65535))]
    pub mtu: Option<u32>,
    /// Unix socket for `sepal status|routes|endpoints|trace` [default: admin.sock beside --socket].
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    /// HTTP address of /metrics, /healthz and /readyz, or `off` [default: 127.0.0.1:9099].
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// Also log packets a NetworkPolicy default deny drops to this nflog group (`log group N`,
    /// prefix `sepal NS/POD DIRECTION default deny: `); without a value, group 0.
    #[arg(long, value_name = "GROUP", num_args = 0..=1, default_missing_value = "0")]
    pub policy_log_drops: Option<u16>,
    /// Flow logs for `sepal flows`: `denied` (flows a rule denied), `all` (also the first packet
    /// of flows an allow rule accepted) or `off` [default: denied].
    #[arg(long, value_enum, value_name = "WHICH")]
    pub flow_logs: Option<crate::flows::FlowLogMode>,
    /// The nflog group the agent reads its flow logs from (no other reader may bind it)
    /// [default: 83].
    #[arg(long, value_name = "GROUP")]
    pub flow_log_group: Option<u16>,
    /// Most packets the kernel logs per second for each verdict, node-wide; beyond it packets
    /// are still decided and counted, only not recorded [default: 100].
    #[arg(long, value_name = "PER_SECOND",
          value_parser = clap::value_parser!(u32).range(1..=crate::flows::MAX_RATE as i64))]
    pub flow_log_rate: Option<u32>,
    /// Most series of sepal_policy_rule_packets_total with a rule of their own; the other
    /// rules' packets add up in one `_overflow` series per verdict [default: 1000].
    #[arg(long, value_name = "N")]
    pub policy_rule_series: Option<usize>,
    /// How long start waits for the datastore's full initial state before serving CNI calls
    /// anyway (Go-style duration, e.g. `30s`, `2m`) [default: 30s]. Until that state is complete
    /// the agent is not ready and does not declare its Node's network available.
    #[arg(long, value_name = "DURATION", value_parser = parse_sync_timeout)]
    pub sync_timeout: Option<std::time::Duration>,
    /// Where the node's /proc/sys is, for the forwarding sysctls: in a container (whose
    /// /proc/sys runtimes mount read-only), a hostPath mount of the host's /proc/sys/net
    /// below this path [default: /proc/sys].
    #[arg(long)]
    pub proc_sys: Option<PathBuf>,
    /// What a stop (SIGTERM) tells BGP peers: `withdraw` (Cease, routes dropped at once) or
    /// `restart` (graceful restart: peers keep the routes until the next agent is back)
    /// [default: withdraw].
    #[arg(long, value_enum)]
    pub stop_mode: Option<StopMode>,
    /// Run BFD through the `sepal bfd` daemon listening on this socket (e.g.
    /// /run/sepal/bfd.sock), whose sessions outlive agent restarts; without it BFD runs inside
    /// the agent and goes down with it.
    #[arg(long, value_name = "PATH")]
    pub bfd_socket: Option<PathBuf>,
}

pub const DEFAULT_SYNC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// `--sync-timeout`: a Go-style duration.
fn parse_sync_timeout(s: &str) -> Result<std::time::Duration, String> {
    crate::crd::parse_duration(s)
        .ok_or_else(|| format!("sync timeout {s:?}: want a duration such as 30s, 2m or 500ms"))
}

/// The config file: the flags' names as keys (camelCase accepted too).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileConfig {
    #[serde(alias = "nodeName")]
    node_name: Option<String>,
    datastore: Option<String>,
    kubeconfig: Option<PathBuf>,
    #[serde(alias = "stateDir")]
    state_dir: Option<PathBuf>,
    socket: Option<PathBuf>,
    #[serde(alias = "logFormat")]
    log_format: Option<LogFormat>,
    mtu: Option<u32>,
    #[serde(alias = "adminSocket")]
    admin_socket: Option<PathBuf>,
    #[serde(alias = "metricsAddr")]
    metrics_addr: Option<String>,
    #[serde(alias = "policyLogDrops")]
    policy_log_drops: Option<u16>,
    #[serde(alias = "flowLogs")]
    flow_logs: Option<crate::flows::FlowLogMode>,
    #[serde(alias = "flowLogGroup")]
    flow_log_group: Option<u16>,
    #[serde(alias = "flowLogRate")]
    flow_log_rate: Option<u32>,
    #[serde(alias = "policyRuleSeries")]
    policy_rule_series: Option<usize>,
    #[serde(alias = "syncTimeout")]
    sync_timeout: Option<String>,
    #[serde(alias = "procSys")]
    proc_sys: Option<PathBuf>,
    #[serde(alias = "stopMode")]
    stop_mode: Option<StopMode>,
    #[serde(alias = "bfdSocket")]
    bfd_socket: Option<PathBuf>,
}

/// The settings the agent runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub node_name: String,
    pub datastore: DatastoreSpec,
    pub kubeconfig: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub log_format: LogFormat,
    pub mtu: Option<u32>,
    pub admin_socket: PathBuf,
    /// None: no metrics or health endpoint.
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// nflog group for default-deny drops; None: drops are only counted.
    pub policy_log_drops: Option<u16>,
    /// Flow logs (`sepal flows`): which, the nflog group, the kernel's rate bound.
    pub flow_log: crate::flows::Settings,
    /// Cap on per-rule metric series (see `--policy-rule-series`).
    pub policy_rule_series: usize,
    /// How long start waits for the datastore's initial state before serving anyway.
    pub sync_timeout: std::time::Duration,
    /// The node's /proc/sys (see `--proc-sys`).
    pub proc_sys: PathBuf,
    /// What a stop tells BGP peers (see `--stop-mode`).
    pub stop_mode: StopMode,
    /// The `sepal bfd` daemon's socket; None: BFD in the agent (see `--bfd-socket`).
    pub bfd_socket: Option<PathBuf>,
}

fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    if text.trim().is_empty() {
        return Ok(FileConfig::default());
    }
    serde_norway::from_str(&text).map_err(|e| {
        let line = e.location().map(|l| l.line()).unwrap_or(0);
        anyhow::anyhow!("config file {}:{line}: {e}", path.display())
    })
}

impl NodeConfig {
    /// Merges flags, the config file they name (if any) and defaults.
    pub fn resolve(args: &NodeArgs) -> Result<NodeConfig> {
        let file = match &args.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    fn merge(args: &NodeArgs, file: FileConfig) -> Result<NodeConfig> {
        let datastore = match (&args.datastore, file.datastore) {
            (Some(d), _) => d.clone(),
            (None, Some(s)) => s
                .parse()
                .map_err(|e: String| anyhow::anyhow!("config file: {e}"))?,
            (None, None) => bail!(
                "no datastore: pass --datastore kubernetes|dir:PATH (or `datastore:` in --config)"
            ),
        };
        let node_name = match args.node_name.clone().or(file.node_name) {
            Some(n) => n,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
                .filter(|h| !h.is_empty())
                .context("no node name: pass --node-name (the hostname could not be read)")?,
        };
        if node_name.is_empty() {
            bail!("the node name must not be empty");
        }
        let mtu = args.mtu.or(file.mtu);
        if let Some(m) = mtu {
            if !(576..=65535).contains(&m) {
                bail!("mtu {m} out of range 576..=65535");
            }
        }
        let socket = args
            .socket
            .clone()
            .or(file.socket)
            .unwrap_or_else(|| PathBuf::from(sepal_cni::api::DEFAULT_SOCKET));
        let admin_socket = args
            .admin_socket
            .clone()
            .or(file.admin_socket)
            .unwrap_or_else(|| crate::admin::admin_socket_beside(&socket));
        if admin_socket == socket {
            bail!("--admin-socket must differ from --socket");
        }
        let metrics_addr = parse_metrics_addr(
            args.metrics_addr
                .as_deref()
                .or(file.metrics_addr.as_deref())
                .unwrap_or(DEFAULT_METRICS_ADDR),
        )
        .map_err(|e| anyhow::anyhow!(e))?;
        let policy_log_drops = args.policy_log_drops.or(file.policy_log_drops);
        let from_file = (file.flow_logs, file.flow_log_group, file.flow_log_rate);
        let flow_log = flow_log_settings(args, from_file, policy_log_drops)?;
        let sync_timeout = match (args.sync_timeout, file.sync_timeout) {
            (Some(t), _) => t,
            (None, Some(s)) => {
                parse_sync_timeout(&s).map_err(|e| anyhow::anyhow!("config file: {e}"))?
            }
            (None, None) => DEFAULT_SYNC_TIMEOUT,
        };
        Ok(NodeConfig {
            node_name,
            datastore,
            kubeconfig: args.kubeconfig.clone().or(file.kubeconfig),
            state_dir: args
                .state_dir
                .clone()
                .or(file.state_dir)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_STATE_DIR)),
            socket,
            log_format: args.log_format.or(file.log_format).unwrap_or_default(),
            mtu,
            admin_socket,
            metrics_addr,
            policy_log_drops,
            flow_log,
            policy_rule_series: args
                .policy_rule_series
                .or(file.policy_rule_series)
                .unwrap_or(crate::metrics::rules::DEFAULT_SERIES),
            sync_timeout,
            proc_sys: args
                .proc_sys
                .clone()
                .or(file.proc_sys)
                .unwrap_or_else(|| PathBuf::from("/proc/sys")),
            stop_mode: args.stop_mode.or(file.stop_mode).unwrap_or_default(),
            bfd_socket: args.bfd_socket.clone().or(file.bfd_socket),
        })
    }
}

/// The flow-log settings from flags, file and defaults. The agent must be the group's only
/// reader, so it cannot be the `--policy-log-drops` group meant for another one.
fn flow_log_settings(
    args: &NodeArgs,
    (mode, group, rate): (Option<crate::flows::FlowLogMode>, Option<u16>, Option<u32>),
    policy_log_drops: Option<u16>,
) -> Result<crate::flows::Settings> {
    use crate::flows::{FlowLogMode, Settings, MAX_RATE};
    let defaults = Settings::default();
    let settings = Settings {
        mode: args.flow_logs.or(mode).unwrap_or(defaults.mode),
        group: args.flow_log_group.or(group).unwrap_or(defaults.group),
        rate: args.flow_log_rate.or(rate).unwrap_or(defaults.rate),
    };
    if !(1..=MAX_RATE).contains(&settings.rate) {
        bail!(
            "flow-log-rate {} out of range 1..={MAX_RATE} (use flow-logs: off for none)",
            settings.rate
        );
    }
    if settings.mode != FlowLogMode::Off && policy_log_drops == Some(settings.group) {
        bail!(
            "nflog group {} is both --policy-log-drops (for another reader) and --flow-log-group (the agent's own): pick another for one of them",
            settings.group
        );
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sepal.yaml");
        std::fs::write(
            &path,
            "node-name: from-file\ndatastore: dir:/srv/cluster\nmtu: 1400\nlogFormat: json\n",
        )
        .unwrap();
        let args = NodeArgs {
            node_name: Some("from-flag".into()),
            config: Some(path.clone()),
            ..Default::default()
        };
        let cfg = NodeConfig::resolve(&args).unwrap();
        assert_eq!(cfg.node_name, "from-flag");
        assert_eq!(cfg.datastore, DatastoreSpec::Dir("/srv/cluster".into()));
        assert_eq!(cfg.mtu, Some(1400));
        assert_eq!(cfg.log_format, LogFormat::Json);
        assert_eq!(cfg.state_dir, PathBuf::from(DEFAULT_STATE_DIR));
        assert_eq!(cfg.socket, PathBuf::from("/run/sepal/sepal.sock"));
        assert_eq!(cfg.admin_socket, PathBuf::from("/run/sepal/admin.sock"));
        assert_eq!(cfg.metrics_addr, Some("127.0.0.1:9099".parse().unwrap()));
        assert_eq!(cfg.sync_timeout, DEFAULT_SYNC_TIMEOUT);
    }

    #[test]
    fn sync_timeout_is_a_duration_from_flag_or_file() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            node: NodeArgs,
        }
        let parse = |extra: &[&str]| -> Result<std::time::Duration, String> {
            let mut argv = vec!["sepal", "--datastore", "dir:/x", "--node-name", "n"];
            argv.extend(extra);
            let cli = <Cli as clap::Parser>::try_parse_from(argv).map_err(|e| e.to_string())?;
            NodeConfig::resolve(&cli.node)
                .map(|c| c.sync_timeout)
                .map_err(|e| e.to_string())
        };
        let secs = std::time::Duration::from_secs;
        assert_eq!(parse(&["--sync-timeout", "2m"]), Ok(secs(120)));
        assert_eq!(parse(&["--sync-timeout", "500ms"]), Ok(secs(1) / 2));
        let err = parse(&["--sync-timeout", "soon"]).unwrap_err();
        assert!(err.contains("30s, 2m or 500ms"), "{err}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "syncTimeout: 45s\n").unwrap();
        assert_eq!(parse(&["--config", path.to_str().unwrap()]), Ok(secs(45)));
        std::fs::write(&path, "sync-timeout: forever\n").unwrap();
        let err = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(
            err.contains("config file") && err.contains("forever"),
            "{err}"
        );
    }

    #[test]
    fn bad_config_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "datastore: dir:/x\nnode-nmae: typo\n").unwrap();
        let args = NodeArgs {
            config: Some(path),
            ..Default::default()
        };
        let err = NodeConfig::resolve(&args).unwrap_err().to_string();
        assert!(
            err.contains("c.yaml:2") && err.contains("node-nmae"),
            "{err}"
        );
        let bad_addr = NodeArgs {
            datastore: Some(DatastoreSpec::Dir("/x".into())),
            node_name: Some("n".into()),
            metrics_addr: Some("localhost".into()),
            ..Default::default()
        };
        let err = NodeConfig::resolve(&bad_addr).unwrap_err().to_string();
        assert!(err.contains("IP:PORT or off"), "{err}");
        let off = NodeArgs {
            metrics_addr: Some("off".into()),
            ..bad_addr
        };
        assert_eq!(NodeConfig::resolve(&off).unwrap().metrics_addr, None);
        let none = NodeConfig::resolve(&NodeArgs::default()).unwrap_err();
        assert!(none.to_string().contains("--datastore"));
    }

    #[test]
    fn policy_log_drops_takes_an_optional_group() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            node: NodeArgs,
        }
        let parse = |extra: &[&str]| {
            let mut argv = vec!["sepal", "--datastore", "dir:/x", "--node-name", "n"];
            argv.extend(extra);
            let cli = <Cli as clap::Parser>::try_parse_from(argv).unwrap();
            NodeConfig::resolve(&cli.node).unwrap().policy_log_drops
        };
        assert_eq!(parse(&[]), None);
        assert_eq!(parse(&["--policy-log-drops"]), Some(0));
        assert_eq!(parse(&["--policy-log-drops=7"]), Some(7));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(&path, "policy-log-drops: 3\n").unwrap();
        assert_eq!(parse(&["--config", path.to_str().unwrap()]), Some(3));
    }

    #[test]
    fn flow_logs_default_to_denied_and_refuse_a_shared_group() {
        use crate::flows::FlowLogMode;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            node: NodeArgs,
        }
        let parse = |extra: &[&str]| -> Result<NodeConfig, String> {
            let mut argv = vec!["sepal", "--datastore", "dir:/x", "--node-name", "n"];
            argv.extend(extra);
            let cli = <Cli as clap::Parser>::try_parse_from(argv).map_err(|e| e.to_string())?;
            NodeConfig::resolve(&cli.node).map_err(|e| e.to_string())
        };
        let cfg = parse(&[]).unwrap();
        assert_eq!(cfg.flow_log, crate::flows::Settings::default());
        assert_eq!(cfg.flow_log.mode, FlowLogMode::Denied);
        assert_eq!(cfg.policy_rule_series, 1000);
        let all = parse(&["--flow-logs", "all", "--flow-log-rate", "20"]).unwrap();
        assert_eq!(
            (all.flow_log.mode, all.flow_log.rate),
            (FlowLogMode::All, 20)
        );
        assert!(parse(&["--flow-log-rate", "0"]).is_err());
        assert!(parse(&["--flow-logs", "some"]).is_err());
        let err = parse(&["--policy-log-drops=83"]).unwrap_err();
        assert!(err.contains("nflog group 83"), "{err}");
        assert!(parse(&["--policy-log-drops=83", "--flow-logs", "off"]).is_ok());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.yaml");
        std::fs::write(
            &path,
            "flow-logs: all\nflowLogGroup: 9\nflow-log-rate: 5\npolicy-rule-series: 10\n",
        )
        .unwrap();
        let file = parse(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(
            (file.flow_log.mode, file.flow_log.group, file.flow_log.rate),
            (FlowLogMode::All, 9, 5)
        );
        assert_eq!(file.policy_rule_series, 10);
        std::fs::write(&path, "flow-log-rate: 0\n").unwrap();
        let err = parse(&["--config", path.to_str().unwrap()]).unwrap_err();
        assert!(err.contains("out of range"), "{err}");
    }
}
