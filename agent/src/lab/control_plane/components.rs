//! The command line of each control-plane component: pure functions of where the control plane
//! lives and which ports it got, so what the tests and the lab run can be read (and tested) here.

use std::path::{Path, PathBuf};

/// The four components, in start order (stopped in reverse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Etcd,
    ApiServer,
    ControllerManager,
    Scheduler,
}

impl Component {
    pub const ALL: [Component; 4] = [
        Component::Etcd,
        Component::ApiServer,
        Component::ControllerManager,
        Component::Scheduler,
    ];

    /// The binary's name, as scripts/kube-build writes it.
    pub fn binary(self) -> &'static str {
        match self {
            Component::Etcd => "etcd",
            Component::ApiServer => "kube-apiserver",
            Component::ControllerManager => "kube-controller-manager",
            Component::Scheduler => "kube-scheduler",
        }
    }
}

/// Loopback ports chosen at run time, so control planes can run side by side.
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Ports {
    pub etcd_client: u16,
    pub etcd_peer: u16,
    pub api_server: u16,
    pub controller_manager: u16,
    pub scheduler: u16,
}

/// What the cluster looks like: the ranges node IPAM and Services hand out.
#[derive(Debug, Clone, clap::Args)]
pub struct ClusterSettings {
    /// Pod range(s) kube-controller-manager's node IPAM splits into node podCIDRs (one IPv4 and
    /// optionally one IPv6, comma separated).
    #[arg(long, default_value = "10.244.0.0/16")]
    pub cluster_cidr: String,
    /// Size of each node's IPv4 podCIDR.
    #[arg(long, default_value_t = 24)]
    pub node_cidr_mask_size: u8,
    /// Size of each node's IPv6 podCIDR, in a dual-stack cluster.
    #[arg(long, default_value_t = 64)]
    pub node_cidr_mask_size_ipv6: u8,
    /// The Services' ClusterIP range; its first address is the `kubernetes` Service.
    #[arg(long, default_value = "10.96.0.0/16")]
    pub service_cidr: String,
    /// Run kube-controller-manager's node lifecycle controller (marks kubelet-less nodes
    /// unreachable after 50 s, then evicts their pods); off while no kubelet runs.
    #[arg(long)]
    pub node_lifecycle: bool,
    /// The address kubelets, kube-proxy and in-cluster clients reach the API server at (the
    /// `kubernetes` Service's endpoint); the API server then listens on every address of its
    /// namespace, not only loopback. Without it, loopback only.
    #[arg(long)]
    pub advertise_address: Option<std::net::IpAddr>,
    /// One more kube-apiserver flag (repeatable), e.g. `--apiserver-arg=--watch-cache=false`.
    #[arg(long = "apiserver-arg", allow_hyphen_values = true)]
    pub apiserver_args: Vec<String>,
}

impl ClusterSettings {
    /// The `kubernetes` Service's ClusterIP: the first address of the Service range.
    pub fn service_ip(&self) -> anyhow::Result<String> {
        let net: ipnet::IpNet = self
            .service_cidr
            .parse()
            .map_err(|e| anyhow::anyhow!("--service-cidr {}: {e}", self.service_cidr))?;
        let first = net
            .hosts()
            .next()
            .ok_or_else(|| anyhow::anyhow!("--service-cidr {} has no host", self.service_cidr))?;
        Ok(first.to_string())
    }
}

/// What the API server audits: each request of a ServiceAccount in sepal-system (the agents),
/// with its verb, resource, query and response code, so tests can see every path the agent
/// takes and what RBAC answered; nothing of the control plane's own traffic.
pub const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: Metadata
    userGroups: [\"system:serviceaccounts:sepal-system\"]
  - level: None
";

/// Where each file of a control plane is, under its directory.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
}

impl Layout {
    pub fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }
    pub fn pki_file(&self, name: &str) -> PathBuf {
        self.pki().join(name)
    }
    pub fn log(&self, c: Component) -> PathBuf {
        self.dir.join("logs").join(format!("{}.log", c.binary()))
    }
    pub fn kubeconfig(&self, user: &str) -> PathBuf {
        self.dir.join(format!("{user}.kubeconfig"))
    }
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.kubeconfig("admin")
    }
    pub fn token_file(&self) -> PathBuf {
        self.dir.join("tokens.csv")
    }
    /// The API server's audit log: every request of Sepal's ServiceAccounts (see `AUDIT_POLICY`).
    pub fn audit_log(&self) -> PathBuf {
        self.dir.join("logs").join("audit.log")
    }
    pub fn audit_policy(&self) -> PathBuf {
        self.dir.join("audit-policy.yaml")
    }
    /// Written once every component is ready: the control plane's endpoints, as JSON.
    pub fn ready_file(&self) -> PathBuf {
        self.dir.join("control-plane.json")
    }
    fn work(&self, c: Component) -> PathBuf {
        self.dir.join(c.binary())
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// The component's flags. Every listener is on 127.0.0.1 and every file under the layout's
/// directory: nothing of the host's (/var/run/kubernetes, /var/lib/etcd) is touched.
pub fn args(c: Component, l: &Layout, ports: &Ports, s: &ClusterSettings) -> Vec<String> {
    let loopback = |port: u16| format!("http://127.0.0.1:{port}");
    let mut a: Vec<String> = match c {
        Component::Etcd => vec![
            "--name=sepal".into(),
            format!("--data-dir={}", path(&l.work(c))),
            format!("--listen-client-urls={}", loopback(ports.etcd_client)),
            format!("--advertise-client-urls={}", loopback(ports.etcd_client)),
            format!("--listen-peer-urls={}", loopback(ports.etcd_peer)),
            format!(
                "--initial-advertise-peer-urls={}",
                loopback(ports.etcd_peer)
            ),
            format!("--initial-cluster=sepal={}", loopback(ports.etcd_peer)),
            // A disposable single-member cluster on a shared disk: durability is not the point,
            // and fsync stalls on a busy machine would time out the API server's requests.
            "--unsafe-no-fsync=true".into(),
            "--log-level=warn".into(),
        ],
        Component::ApiServer => vec![
            format!("--etcd-servers={}", loopback(ports.etcd_client)),
            match s.advertise_address {
                Some(_) => "--bind-address=0.0.0.0".into(),
                None => "--bind-address=127.0.0.1".into(),
            },
            format!(
                "--advertise-address={}",
                s.advertise_address
                    .map_or("127.0.0.1".into(), |a| a.to_string())
            ),
            format!("--secure-port={}", ports.api_server),
            format!("--cert-dir={}", path(&l.work(c))),
            format!("--tls-cert-file={}", path(&l.pki_file("apiserver.crt"))),
            format!(
                "--tls-private-key-file={}",
                path(&l.pki_file("apiserver.key"))
            ),
            format!("--client-ca-file={}", path(&l.pki_file("ca.crt"))),
            format!("--token-auth-file={}", path(&l.token_file())),
            // Kubelets (lab nodes): reached at their InternalIP, never by a host name the
            // node's resolver would be asked for, with a client certificate of the lab's CA.
            "--kubelet-preferred-address-types=InternalIP".into(),
            format!(
                "--kubelet-client-certificate={}",
                path(&l.pki_file("apiserver-kubelet-client.crt"))
            ),
            format!(
                "--kubelet-client-key={}",
                path(&l.pki_file("apiserver-kubelet-client.key"))
            ),
            "--authorization-mode=Node,RBAC".into(),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
            format!("--service-account-key-file={}", path(&l.pki_file("sa.pub"))),
            format!(
                "--service-account-signing-key-file={}",
                path(&l.pki_file("sa.key"))
            ),
            format!("--service-cluster-ip-range={}", s.service_cidr),
            format!("--audit-policy-file={}", path(&l.audit_policy())),
            format!("--audit-log-path={}", path(&l.audit_log())),
            "--audit-log-maxsize=100".into(),
            "--audit-log-maxbackup=1".into(),
            // The DaemonSet's agent is privileged (netlink, nftables, sysctls).
            "--allow-privileged=true".into(),
            "--profiling=false".into(),
        ],
        Component::ControllerManager => {
            let mut a = vec![
                format!("--kubeconfig={}", path(&l.kubeconfig(c.binary()))),
                "--bind-address=127.0.0.1".into(),
                format!("--secure-port={}", ports.controller_manager),
                format!("--cert-dir={}", path(&l.work(c))),
                "--leader-elect=false".into(),
                // Each controller under its own ServiceAccount, as in a real cluster, so RBAC
                // is exercised for them too.
                "--use-service-account-credentials=true".into(),
                format!(
                    "--service-account-private-key-file={}",
                    path(&l.pki_file("sa.key"))
                ),
                format!("--root-ca-file={}", path(&l.pki_file("ca.crt"))),
                format!(
                    "--cluster-signing-cert-file={}",
                    path(&l.pki_file("ca.crt"))
                ),
                format!("--cluster-signing-key-file={}", path(&l.pki_file("ca.key"))),
                // Node IPAM: every Node gets its podCIDR(s) from here.
                "--allocate-node-cidrs=true".into(),
                format!("--cluster-cidr={}", s.cluster_cidr),
                format!("--service-cluster-ip-range={}", s.service_cidr),
            ];
            if s.cluster_cidr.contains(',') {
                a.push(format!(
                    "--node-cidr-mask-size-ipv4={}",
                    s.node_cidr_mask_size
                ));
                a.push(format!(
                    "--node-cidr-mask-size-ipv6={}",
                    s.node_cidr_mask_size_ipv6
                ));
            } else {
                a.push(format!("--node-cidr-mask-size={}", s.node_cidr_mask_size));
            }
            if !s.node_lifecycle {
                a.push("--controllers=*,-node-lifecycle-controller".into());
            }
            a
        }
        Component::Scheduler => vec![
            format!("--kubeconfig={}", path(&l.kubeconfig(c.binary()))),
            "--bind-address=127.0.0.1".into(),
            format!("--secure-port={}", ports.scheduler),
            format!("--cert-dir={}", path(&l.work(c))),
            "--leader-elect=false".into(),
        ],
    };
    if c == Component::ApiServer {
        a.extend(s.apiserver_args.iter().cloned());
    }
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        s: ClusterSettings,
    }

    fn settings(args: &[&str]) -> ClusterSettings {
        Cli::parse_from(std::iter::once("x").chain(args.iter().copied())).s
    }

    const PORTS: Ports = Ports {
        etcd_client: 1,
        etcd_peer: 2,
        api_server: 3,
        controller_manager: 4,
        scheduler: 5,
    };

    fn layout() -> Layout {
        Layout { dir: "/cp".into() }
    }

    #[test]
    fn every_listener_is_on_loopback_and_every_file_under_the_directory() {
        let s = settings(&[]);
        for c in Component::ALL {
            for a in args(c, &layout(), &PORTS, &s) {
                // URLs to connect to or listen on (the issuer is a name inside tokens).
                if a.contains("://") && !a.starts_with("--service-account-issuer") {
                    assert!(a.contains("http://127.0.0.1:"), "{c:?}: {a}");
                }
                if a.starts_with("--bind-address") {
                    assert_eq!(a, "--bind-address=127.0.0.1");
                }
                if let Some((_, v)) = a.split_once('=') {
                    if v.starts_with('/') {
                        assert!(v.starts_with("/cp/"), "{c:?}: {a}");
                    }
                }
            }
        }
    }

    #[test]
    fn node_ipam_is_on_and_dual_stack_gets_both_masks() {
        let kcm = args(
            Component::ControllerManager,
            &layout(),
            &PORTS,
            &settings(&[]),
        );
        assert!(kcm.contains(&"--allocate-node-cidrs=true".to_string()));
        assert!(kcm.contains(&"--node-cidr-mask-size=24".to_string()));
        assert!(kcm.contains(&"--controllers=*,-node-lifecycle-controller".to_string()));
        let dual = args(
            Component::ControllerManager,
            &layout(),
            &PORTS,
            &settings(&[
                "--cluster-cidr=10.244.0.0/16,fd00:10:244::/56",
                "--node-lifecycle",
            ]),
        );
        assert!(dual.contains(&"--node-cidr-mask-size-ipv6=64".to_string()));
        assert!(!dual.iter().any(|a| a.starts_with("--controllers")));
    }

    #[test]
    fn extra_api_server_flags_are_passed_through() {
        let s = settings(&["--apiserver-arg=--watch-cache=false"]);
        let a = args(Component::ApiServer, &layout(), &PORTS, &s);
        assert_eq!(a.last().map(String::as_str), Some("--watch-cache=false"));
        assert_eq!(s.service_ip().unwrap(), "10.96.0.1");
    }
}
