//! One node's kubelet: its client certificate (the Node authorizer's `system:node:NAME` in group
//! `system:nodes`, signed by the control plane's CA), its kubeconfig, its config file and flags.

use super::{NodeLayout, NodeSpec};
use crate::lab::control_plane::pki::openssl;
use anyhow::Result;
use std::path::Path;

/// kubelet's client certificate (`kubelet.crt`, `kubelet.key` in the node's pki directory):
/// CN=system:node:NAME, O=system:nodes, so the Node authorizer lets it register its Node and
/// read and write just what that node's Pods need.
pub fn client_certificate(l: &NodeLayout, name: &str, ca_cert: &Path, ca_key: &Path) -> Result<()> {
    let subj = format!("/O=system:nodes/CN=system:node:{name}");
    sign_client(l, "kubelet", &subj, ca_cert, ca_key)
}

/// A client certificate `STEM.crt`/`STEM.key` in the node's pki directory for `subj`, signed by
/// the cluster's CA.
pub fn sign_client(
    l: &NodeLayout,
    stem: &str,
    subj: &str,
    ca_cert: &Path,
    ca_key: &Path,
) -> Result<()> {
    let dir = l.pki();
    std::fs::create_dir_all(&dir)?;
    let (key, csr, ext, crt) = (
        format!("{stem}.key"),
        format!("{stem}.csr"),
        format!("{stem}.ext"),
        format!("{stem}.crt"),
    );
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            subj,
        ],
    )?;
    std::fs::write(
        dir.join(&ext),
        "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n\
         basicConstraints=critical,CA:FALSE\n",
    )?;
    let (ca_cert, ca_key) = (ca_cert.display().to_string(), ca_key.display().to_string());
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-CAserial",
            "ca.srl",
            "-days",
            "3650",
            "-extfile",
            &ext,
            "-out",
            &crt,
        ],
    )
}

/// The kubeconfig kubelet reaches the API server with (its client certificate).
pub fn kubeconfig(l: &NodeLayout, server: &str, ca_cert: &Path, name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: sepal-lab\n  cluster:\n    server: {server}\n    \
         certificate-authority: {ca}\ncontexts:\n- name: {name}\n  context:\n    cluster: sepal-lab\n    \
         user: system:node:{name}\ncurrent-context: {name}\nusers:\n- name: system:node:{name}\n  user:\n    \
         client-certificate: {crt}\n    client-key: {key}\n",
        ca = ca_cert.display(),
        crt = l.pki().join("kubelet.crt").display(),
        key = l.pki().join("kubelet.key").display(),
    )
}

/// The cgroup every Pod of this node goes under (cgroupfs driver: the same path in every
/// hierarchy), so nodes on one machine never share one and teardown knows what to remove.
pub fn cgroup_root(spec: &NodeSpec) -> String {
    format!("/sepal/{}/{}", spec.lab, spec.name)
}

/// The KubeletConfiguration. What matters on the lab's machines:
/// - `failCgroupV1: false`: kubelet 1.35+ refuses a cgroup v1 (here hybrid v1+v2) host otherwise;
/// - `cgroupDriver: cgroupfs` (no systemd) and a `cgroupRoot` of the node's own;
/// - image GC thresholds at 100 % and eviction thresholds at 0: the lab's images come from no
///   registry, and a busy shared disk must neither delete them nor evict the lab's Pods;
/// - `oomScoreAdj: 0`: no CAP_SYS_RESOURCE, so kubelet cannot lower its own (default -999);
/// - `failSwapOn: false`, `localStorageCapacityIsolation: false`, no `resolvConf`: the host's
///   settings are not the node's business;
/// - no certificate rotation and no server TLS bootstrap: the certificate is made here;
/// - every port of kubelet's on the node's own addresses (it runs in the node's namespace).
pub fn config(spec: &NodeSpec, l: &NodeLayout, ca_cert: &Path) -> String {
    format!(
        r#"apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: {cgroup_root}
cgroupsPerQOS: true
enforceNodeAllocatable: [pods]
containerRuntimeEndpoint: unix://{sock}
imageServiceEndpoint: unix://{sock}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
imageMinimumGCAge: 87600h
evictionHard:
  memory.available: "0%"
  nodefs.available: "0%"
  nodefs.inodesFree: "0%"
  imagefs.available: "0%"
  imagefs.inodesFree: "0%"
failSwapOn: false
oomScoreAdj: 0
localStorageCapacityIsolation: false
protectKernelDefaults: false
resolvConf: ""
clusterDomain: cluster.local
clusterDNS: [{cluster_dns}]
rotateCertificates: false
serverTLSBootstrap: false
tlsCertFile: {pki}/kubelet-serving.crt
tlsPrivateKeyFile: {pki}/kubelet-serving.key
authentication:
  anonymous:
    enabled: false
  webhook:
    enabled: true
  x509:
    clientCAFile: {ca}
authorization:
  mode: Webhook
address: 0.0.0.0
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
maxPods: {max_pods}
podPidsLimit: 4096
serializeImagePulls: false
registerNode: true
nodeStatusUpdateFrequency: 10s
syncFrequency: 10s
fileCheckFrequency: 20s
staticPodPath: ""
podLogsDir: {pod_logs}
containerLogMaxSize: 10Mi
containerLogMaxFiles: 2
"#,
        cgroup_root = cgroup_root(spec),
        sock = l.containerd_socket().display(),
        cluster_dns = spec.cluster_dns,
        pki = l.pki().display(),
        ca = ca_cert.display(),
        max_pods = spec.max_pods,
        pod_logs = l.pod_logs().display(),
    )
}

/// kubelet's flags: what has no config key (or belongs to the node, not the config).
pub fn args(spec: &NodeSpec, l: &NodeLayout) -> Vec<String> {
    let p = |p: &Path| p.display().to_string();
    let mut a = vec![
        format!("--config={}", p(&l.kubelet_config())),
        format!("--kubeconfig={}", p(&l.kubelet_kubeconfig())),
        format!("--root-dir={}", p(&l.kubelet_root())),
        format!("--cert-dir={}", p(&l.pki())),
        format!("--hostname-override={}", spec.name),
        "--v=2".into(),
    ];
    if let Some(ip) = &spec.node_ip {
        a.push(format!("--node-ip={ip}"));
    }
    for (k, v) in &spec.labels {
        a.push(format!("--node-labels={k}={v}"));
    }
    a.extend(spec.kubelet_args.iter().cloned());
    a
}

/// kubelet's serving certificate (for the API server's exec, logs and port-forward calls):
/// signed by the cluster's CA for the node's name and address.
pub fn serving_certificate(
    l: &NodeLayout,
    name: &str,
    ip: Option<&str>,
    ca_cert: &Path,
    ca_key: &Path,
) -> Result<()> {
    let dir = l.pki();
    let subj = format!("/O=system:nodes/CN=system:node:{name}");
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "kubelet-serving.key",
            "-out",
            "kubelet-serving.csr",
            "-subj",
            &subj,
        ],
    )?;
    let mut san = format!("DNS:{name},IP:127.0.0.1");
    if let Some(ip) = ip {
        san.push_str(&format!(",IP:{ip}"));
    }
    std::fs::write(
        dir.join("kubelet-serving.ext"),
        format!(
            "subjectAltName={san}\nextendedKeyUsage=serverAuth\n\
             keyUsage=critical,digitalSignature\nbasicConstraints=critical,CA:FALSE\n"
        ),
    )?;
    let (ca_cert, ca_key) = (ca_cert.display().to_string(), ca_key.display().to_string());
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "kubelet-serving.csr",
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-CAserial",
            "ca.srl",
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            "kubelet-serving.ext",
            "-out",
            "kubelet-serving.crt",
        ],
    )
}
