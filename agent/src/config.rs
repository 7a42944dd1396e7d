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
    #[serde(alias = "syncTimeout")]
    sync_timeout: Option<String>,
    #[serde(alias = "procSys")]
    proc_sys: Option<PathBuf>,
    #[serde(alias = "stopMode")]
    stop_mode: Option<StopMode>,
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
    /// How long start waits for the datastore's initial state before serving anyway.
    pub sync_timeout: std::time::Duration,
    /// The node's /proc/sys (see `--proc-sys`).
    pub proc_sys: PathBuf,
    /// What a stop tells BGP peers (see `--stop-mode`).
    pub stop_mode: StopMode,
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
            policy_log_drops: args.policy_log_drops.or(file.policy_log_drops),
            sync_timeout,
            proc_sys: args
                .proc_sys
                .clone()
                .or(file.proc_sys)
                .unwrap_or_else(|| PathBuf::from("/proc/sys")),
            stop_mode: args.stop_mode.or(file.stop_mode).unwrap_or_default(),
        })
    }
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
}
