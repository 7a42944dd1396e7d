//! The control plane's credentials: a CA and the API server's serving certificate (openssl), the
//! ServiceAccount signing key, one bearer token per client in a static token file, and a
//! kubeconfig per client. Everything lives in the control plane's own directory.

use anyhow::{bail, Context, Result};
use std::io::Read;
use std::path::Path;
use std::process::Command;

/// Names the API server's certificate answers to: loopback (the tests, the lab's relay), and the
/// `kubernetes` Service's ClusterIP and DNS names (in-cluster clients), and the address it is
/// advertised at, when it has one beside loopback (kubelets on lab nodes).
pub fn serving_names(service_ip: &str, advertised: Option<std::net::IpAddr>) -> Vec<String> {
    let mut names = vec!["IP:127.0.0.1".to_string(), format!("IP:{service_ip}")];
    names.extend(advertised.map(|a| format!("IP:{a}")));
    for dns in [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ] {
        names.push(format!("DNS:{dns}"));
    }
    names
}

/// Runs openssl in `dir`; a failure says which command and what openssl printed.
pub(crate) fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("run openssl (Debian package openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Makes the CA (P-256, ten years: a lab's credentials never need renewal), the serving
/// certificate it signs (`apiserver.crt`), the API server's client certificate for kubelets
/// (`apiserver-kubelet-client.crt`), and the ServiceAccount key pair (`sa.key`, `sa.pub`:
/// tokens are signed with one and checked against the other) in `dir`.
pub fn make(dir: &Path, service_ip: &str, advertised: Option<std::net::IpAddr>) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=sepal-lab-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &ca)?;
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "apiserver.key",
        "-out",
        "apiserver.csr",
        "-subj",
        "/CN=kube-apiserver",
    ]);
    openssl(dir, &csr)?;
    let ext = format!(
        "subjectAltName={}\nextendedKeyUsage=serverAuth\nkeyUsage=critical,digitalSignature\n\
         basicConstraints=critical,CA:FALSE\n",
        serving_names(service_ip, advertised).join(",")
    );
    std::fs::write(dir.join("apiserver.ext"), ext)?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            "apiserver.ext",
            "-out",
            "apiserver.crt",
        ],
    )?;
    // The API server's client certificate towards kubelets (logs, exec, port-forward): kubelet
    // authenticates it against the same CA and asks the API server whether it may; as a member of
    // system:masters it may.
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "apiserver-kubelet-client.key",
        "-out",
        "apiserver-kubelet-client.csr",
        "-subj",
        "/O=system:masters/CN=kube-apiserver-kubelet-client",
    ]);
    openssl(dir, &csr)?;
    std::fs::write(
        dir.join("client.ext"),
        "extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n\
         basicConstraints=critical,CA:FALSE\n",
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "apiserver-kubelet-client.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            "client.ext",
            "-out",
            "apiserver-kubelet-client.crt",
        ],
    )?;
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "sa.key",
        ],
    )?;
    openssl(dir, &["pkey", "-in", "sa.key", "-pubout", "-out", "sa.pub"])
}

/// A fresh bearer token: 32 random bytes, hex.
pub fn token() -> Result<String> {
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(hex(&bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A client of the API server with a static token: its user name and groups.
pub struct TokenUser {
    pub token: String,
    pub user: &'static str,
    pub groups: &'static [&'static str],
}

/// The API server's `--token-auth-file`: `token,user,uid[,"group,group"]` per line.
pub fn token_file(users: &[TokenUser]) -> String {
    users
        .iter()
        .map(|u| match u.groups {
            [] => format!("{},{},{}\n", u.token, u.user, u.user),
            groups => format!(
                "{},{},{},\"{}\"\n",
                u.token,
                u.user,
                u.user,
                groups.join(",")
            ),
        })
        .collect()
}

/// A kubeconfig for one client: the server, the CA that signed its certificate, a bearer token.
pub fn kubeconfig(server: &str, ca: &Path, user: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: sepal-lab\n  cluster:\n    server: {server}\n    \
         certificate-authority: {ca}\ncontexts:\n- name: {user}@sepal-lab\n  context:\n    cluster: sepal-lab\n    \
         user: {user}\ncurrent-context: {user}@sepal-lab\nusers:\n- name: {user}\n  user:\n    token: {token}\n",
        ca = ca.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_file_lines_follow_the_api_servers_format() {
        let users = [
            TokenUser {
                token: "abc".into(),
                user: "admin",
                groups: &["system:masters"],
            },
            TokenUser {
                token: "def".into(),
                user: "system:kube-scheduler",
                groups: &[],
            },
        ];
        assert_eq!(
            token_file(&users),
            "abc,admin,admin,\"system:masters\"\ndef,system:kube-scheduler,system:kube-scheduler\n"
        );
    }

    #[test]
    fn tokens_are_long_and_distinct() {
        let (a, b) = (token().unwrap(), token().unwrap());
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }

    #[test]
    fn serving_names_cover_loopback_and_the_service() {
        let names = serving_names("10.96.0.1", None);
        assert!(names.contains(&"IP:127.0.0.1".to_string()));
        assert!(names.contains(&"IP:10.96.0.1".to_string()));
        assert!(names.contains(&"DNS:kubernetes.default.svc".to_string()));
    }
}
