//! One node's kube-proxy (optional): Services for the node's namespace, in nftables or iptables
//! mode, as user `system:kube-proxy` (the default RBAC binds it to `system:node-proxier`).

use super::{NodeLayout, NodeSpec};
use std::path::Path;

/// The modes the lab runs kube-proxy in.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum ProxyMode {
    Nftables,
    Iptables,
}

impl ProxyMode {
    pub fn name(self) -> &'static str {
        match self {
            ProxyMode::Nftables => "nftables",
            ProxyMode::Iptables => "iptables",
        }
    }
}

/// The kubeconfig kube-proxy reaches the API server with (its client certificate).
pub fn kubeconfig(l: &NodeLayout, server: &str, ca_cert: &Path) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: sepal-lab\n  cluster:\n    server: {server}\n    \
         certificate-authority: {ca}\ncontexts:\n- name: kube-proxy\n  context:\n    cluster: sepal-lab\n    \
         user: system:kube-proxy\ncurrent-context: kube-proxy\nusers:\n- name: system:kube-proxy\n  user:\n    \
         client-certificate: {crt}\n    client-key: {key}\n",
        ca = ca_cert.display(),
        crt = l.pki().join("kube-proxy.crt").display(),
        key = l.pki().join("kube-proxy.key").display(),
    )
}

/// The KubeProxyConfiguration. Conntrack sizing and timeouts are left alone (zeros): they are
/// the host's or the namespace's business, not a lab node's.
pub fn config(spec: &NodeSpec, l: &NodeLayout, mode: ProxyMode) -> String {
    format!(
        r#"apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection:
  kubeconfig: {kubeconfig}
hostnameOverride: {name}
mode: {mode}
bindAddress: 0.0.0.0
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
conntrack:
  maxPerCore: 0
  min: 0
  tcpEstablishedTimeout: 0s
  tcpCloseWaitTimeout: 0s
"#,
        kubeconfig = l.dir.join("kube-proxy.kubeconfig").display(),
        name = spec.name,
        mode = mode.name(),
    )
}

pub fn args(l: &NodeLayout) -> Vec<String> {
    vec![
        format!("--config={}", l.dir.join("kube-proxy.yaml").display()),
        "--v=2".into(),
    ]
}
