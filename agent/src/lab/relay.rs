//! The lab's management path to a Kubernetes API server: the server listens on the host's
//! loopback, which node namespaces cannot reach, so one relay process listens on the same loopback
//! address inside every node namespace and forwards each connection, byte for byte (TLS included),
//! to the server. The agents then use a kubeconfig of that server unchanged.

use super::state::LabState;
use anyhow::{bail, Context, Result};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The API server's address from a kubeconfig; it must be on loopback (e.g. `kubectl proxy`, or
/// a test's control plane), since that is the address the relay takes inside the node namespaces.
pub fn api_address(kubeconfig: &Path) -> Result<SocketAddr> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let config = rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(kubeconfig)?;
        kube::Config::from_custom_kubeconfig(kc, &Default::default()).await
    });
    let url = config
        .with_context(|| format!("kubeconfig {}", kubeconfig.display()))?
        .cluster_url;
    let host = url.host().unwrap_or_default().trim_matches(['[', ']']);
    let ip: IpAddr = match host {
        "localhost" => Ipv4Addr::LOCALHOST.into(),
        h => h
            .parse()
            .with_context(|| format!("API server host {h:?} is not an IP address"))?,
    };
    if !ip.is_loopback() {
        bail!(
            "the lab reaches its API server at {url} through a relay on the same loopback \
             address in every node; point the kubeconfig at a server on 127.0.0.1 \
             (for a remote cluster: `kubectl proxy`)"
        );
    }
    let port = url
        .port_u16()
        .unwrap_or(if url.scheme_str() == Some("http") {
            80
        } else {
            443
        });
    Ok(SocketAddr::new(ip, port))
}

/// Binds `addr` inside network namespace `netns` (a socket keeps the namespace it was made in).
fn bind_in(netns: &str, addr: SocketAddr) -> Result<std::net::TcpListener> {
    let path = PathBuf::from("/run/netns").join(netns);
    let bind = || -> std::io::Result<std::net::TcpListener> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    };
    sepal_felix::netns::on_thread_in(&path, bind)
        .with_context(|| format!("enter {}", path.display()))?
        .with_context(|| format!("bind {addr} in {}", path.display()))
}

/// `sepal lab api-relay`: binds in every node, writes `relay.ready`, then forwards until killed.
/// With real nodes it relays the other way (see [`run_host`]).
pub fn run(lab: &LabState) -> Result<()> {
    if lab.real_nodes() {
        return run_host(lab);
    }
    let kubeconfig = lab
        .admin_kubeconfig()
        .context("this lab uses the dir datastore: no API server to relay")?;
    let upstream = api_address(kubeconfig)?;
    let listeners = lab
        .nodes
        .iter()
        .map(|n| bind_in(&n.netns, upstream))
        .collect::<Result<Vec<_>>>()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        for listener in listeners {
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tokio::spawn(async move {
                loop {
                    let Ok((mut down, _)) = listener.accept().await else {
                        continue;
                    };
                    tokio::spawn(async move {
                        // The server refusing is the same to the agent as no server: it retries.
                        if let Ok(mut up) = tokio::net::TcpStream::connect(upstream).await {
                            let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                        }
                    });
                }
            });
        }
        std::fs::write(ready_file(lab), b"")?;
        std::future::pending::<()>().await;
        Ok(())
    })
}

/// With real nodes (`up --kubernetes`) the API server runs in the control plane's namespace on
/// the fabric, where kubelets reach it; the host reaches it through one listener on the host's
/// loopback (any free port, written into `relay.ready`) that connects to it inside that namespace.
fn run_host(lab: &LabState) -> Result<()> {
    let cp = lab
        .kubeconfig
        .as_ref()
        .and_then(|k| k.control_plane.as_ref())
        .context("this lab has no control plane of its own")?;
    let endpoints = super::control_plane::Endpoints::load(&cp.dir)?;
    let upstream = SocketAddr::new(Ipv4Addr::LOCALHOST.into(), endpoints.ports.api_server);
    let netns = PathBuf::from("/run/netns").join(super::real_nodes::cp_netns(lab));
    let listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    listener.set_nonblocking(true)?;
    let port = listener.local_addr()?.port();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener)?;
        std::fs::write(ready_file(lab), port.to_string())?;
        loop {
            let Ok((mut down, _)) = listener.accept().await else {
                continue;
            };
            let netns = netns.clone();
            tokio::spawn(async move {
                let connect = move || {
                    sepal_felix::netns::on_thread_in(&netns, || {
                        std::net::TcpStream::connect_timeout(&upstream, Duration::from_secs(5))
                    })
                };
                let Ok(Ok(Ok(up))) = tokio::task::spawn_blocking(connect).await else {
                    return;
                };
                if up.set_nonblocking(true).is_err() {
                    return;
                }
                if let Ok(mut up) = tokio::net::TcpStream::from_std(up) {
                    let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                }
            });
        }
    })
}

/// The host relay's loopback port (real nodes), once it listens.
pub fn host_port(lab: &LabState) -> Result<u16> {
    let text = std::fs::read_to_string(ready_file(lab))?;
    text.trim()
        .parse()
        .with_context(|| format!("relay port {text:?}"))
}

fn ready_file(lab: &LabState) -> PathBuf {
    lab.dir().join("relay.ready")
}

/// Starts the relay (in the host namespace, detached) and waits until it listens in every node.
pub fn start(lab: &LabState) -> Result<u32> {
    let sepal = std::env::current_exe()?;
    let log = lab.dir().join("relay.log");
    let file = std::fs::File::create(&log)?;
    let child = std::process::Command::new("setsid")
        .arg(&sepal)
        .args(["lab", "api-relay", "--name", &lab.name])
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .context("start the API relay")?;
    let pid = child.id();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ready_file(lab).exists() {
        if !super::net::alive(pid) || Instant::now() > deadline {
            super::net::stop(pid);
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            bail!("the API relay did not start: {}", text.trim());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kubeconfig(server: &str) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(
            f.path(),
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {server}\n\
                 contexts:\n- name: c\n  context:\n    cluster: c\n    user: u\n\
                 current-context: c\nusers:\n- name: u\n  user: {{}}\n"
            ),
        )
        .unwrap();
        f
    }

    #[test]
    fn only_loopback_servers_are_relayed() {
        let a = |s: &str| api_address(kubeconfig(s).path());
        assert_eq!(
            a("http://127.0.0.1:8001").unwrap(),
            "127.0.0.1:8001".parse().unwrap()
        );
        assert_eq!(
            a("https://localhost").unwrap(),
            "127.0.0.1:443".parse().unwrap()
        );
        assert_eq!(
            a("https://[::1]:6443").unwrap(),
            "[::1]:6443".parse().unwrap()
        );
        let err = a("https://10.0.0.1:6443").unwrap_err().to_string();
        assert!(err.contains("kubectl proxy"), "{err}");
        assert!(a("https://api.example:6443").is_err());
    }
}
