//! The plugin's commands (ADD, DEL, CHECK, VERSION, STATUS, GC): environment + config in, result
//! or error object out. Plumbing lives in `plumbing`, IPAM and host routes in the agent.

use crate::api::{self, codes, AddRequest, CheckRequest, DelRequest, GcRequest, Request, Response};
use crate::client::{self, CallError};
use crate::config::{peek_version, NetConf};
use crate::env::{CniEnv, Command};
use crate::error::CniError;
use crate::netlink::Netlink;
use crate::plumbing::{self, HostNetns, POD_GATEWAY_V6};
use crate::result::{CniResult, Interface, IpConfig, IpPrefix, Route};
use crate::version::{version_answer, CniVersion};
use serde_json::Value;
use std::fs::File;
use std::io;
use std::net::IpAddr;

/// What the process prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub stdout: Option<String>,
    pub exit_code: i32,
}

/// Runs one plugin invocation. `get_env` reads the CNI_* variables, `stdin` is the config.
pub fn execute(get_env: impl Fn(&str) -> Option<String>, stdin: &[u8]) -> Outcome {
    match parse(get_env, stdin).and_then(run) {
        Ok(out) => Outcome {
            stdout: out.map(|v| v.to_string()),
            exit_code: 0,
        },
        Err(err) => failure(&err, stdin),
    }
}

/// What a failed invocation prints: the spec's error object, in the version the runtime asked
/// for when we speak it.
pub fn failure(err: &CniError, stdin: &[u8]) -> Outcome {
    let version = peek_version(stdin)
        .and_then(|v| CniVersion::parse(&v).ok())
        .unwrap_or(CniVersion::LATEST);
    Outcome {
        stdout: Some(err.to_json(version.as_str()).to_string()),
        exit_code: 1,
    }
}

/// One invocation, read and checked: the environment and config are valid, the config's version
/// allows the command. Nothing up to here touches the node (`parse` is a pure function of the
/// environment and stdin: the cni/invocation fuzz target's input); `run` does the rest.
#[derive(Debug, Clone, PartialEq)]
pub enum Invocation {
    /// VERSION, answered: it needs no config.
    Version(Value),
    Add(CniEnv, NetConf),
    Del(CniEnv, NetConf),
    Check(CniEnv, NetConf, Expected),
    Status(NetConf),
    Gc(NetConf),
}

/// What CHECK verifies, from prevResult: the sandbox interface's addresses and MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    pub ips: Vec<IpAddr>,
    pub mac: Option<String>,
}

/// Reads and checks one invocation, without side effects.
pub fn parse(
    get_env: impl Fn(&str) -> Option<String>,
    stdin: &[u8],
) -> Result<Invocation, CniError> {
    let env = CniEnv::parse(get_env)?;
    if env.command == Command::Version {
        return Ok(Invocation::Version(version_answer(
            peek_version(stdin).as_deref(),
        )));
    }
    let conf = NetConf::parse(stdin)?;
    let version = conf.cni_version;
    let needs = |ok: bool, what: &str| {
        if ok {
            Ok(())
        } else {
            Err(CniError::new(
                codes::INCOMPATIBLE_VERSION,
                format!(
                    "config version {version} does not allow {}",
                    env.command.as_str()
                ),
            )
            .details(format!(
                "{} needs cniVersion {what} or later",
                env.command.as_str()
            )))
        }
    };
    Ok(match env.command {
        Command::Add => Invocation::Add(env, conf),
        Command::Del => Invocation::Del(env, conf),
        Command::Check => {
            needs(version.has_check(), "0.4.0")?;
            let expected = expected(&env, &conf)?;
            Invocation::Check(env, conf, expected)
        }
        Command::Status => {
            needs(version.has_status_and_gc(), "1.1.0")?;
            Invocation::Status(conf)
        }
        Command::Gc => {
            needs(version.has_status_and_gc(), "1.1.0")?;
            Invocation::Gc(conf)
        }
        // Answered above, before the config is parsed (VERSION needs none).
        Command::Version => Invocation::Version(version_answer(Some(version.as_str()))),
    })
}

/// Carries out a checked invocation: the result to print, if any.
pub fn run(invocation: Invocation) -> Result<Option<Value>, CniError> {
    match invocation {
        Invocation::Version(answer) => Ok(Some(answer)),
        Invocation::Add(env, conf) => add(&env, &conf).map(Some),
        Invocation::Del(env, conf) => del(&env, &conf).map(|()| None),
        Invocation::Check(env, conf, expected) => check(&env, &conf, &expected).map(|()| None),
        Invocation::Status(conf) => status(&conf).map(|()| None),
        Invocation::Gc(conf) => gc(&conf).map(|()| None),
    }
}

/// The agent call as the CNI sees it: unreachable is "try again later" (11).
fn agent(conf: &NetConf, request: &Request) -> Result<Response, CniError> {
    agent_call(conf, request).map_err(|(e, _)| e)
}

/// Like `agent`, also telling whether the request may have reached the agent.
fn agent_call(conf: &NetConf, request: &Request) -> Result<Response, (CniError, bool)> {
    client::call(&conf.socket, request).map_err(|e| match e {
        CallError::Unreachable { sent, .. } => (
            CniError::new(codes::TRY_AGAIN_LATER, "sepal agent unreachable").details(e.to_string()),
            sent,
        ),
        CallError::BadResponse(_) => (
            CniError::new(codes::IO_FAILURE, "sepal agent sent an invalid response")
                .details(e.to_string()),
            true,
        ),
    })
}

fn unexpected(response: Response) -> CniError {
    CniError::new(codes::IO_FAILURE, "sepal agent sent an unexpected response")
        .details(format!("{response:?}"))
}

fn netlink_err(what: &str) -> impl FnOnce(io::Error) -> CniError + '_ {
    move |e| CniError::io(what, e)
}

/// Opens the sandbox's netns file; a missing one is "container unknown" (3).
fn open_netns(path: &str) -> Result<File, CniError> {
    File::open(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            CniError::new(
                codes::CONTAINER_UNKNOWN,
                format!("network namespace {path} does not exist"),
            )
        } else {
            CniError::io(format!("cannot open network namespace {path}"), e)
        }
    })
}

fn add(env: &CniEnv, conf: &NetConf) -> Result<Value, CniError> {
    let netns_path = env
        .netns
        .as_deref()
        .ok_or_else(|| CniError::env("CNI_NETNS is not set"))?;
    let pod_ns = open_netns(netns_path)?;
    let host_ns = HostNetns::current().map_err(netlink_err("cannot open the node's netns"))?;
    // Plumbing the node's own namespace as a pod would replace the node's default route.
    if host_ns
        .is_same(&pod_ns)
        .map_err(netlink_err("cannot inspect CNI_NETNS"))?
    {
        return Err(CniError::env(format!(
            "CNI_NETNS {netns_path} is the node's own network namespace"
        )));
    }
    let mut nl = Netlink::open().map_err(netlink_err("cannot open netlink"))?;
    let mut pod_nl = host_ns
        .netlink_in(&pod_ns)
        .map_err(netlink_err("cannot open netlink in the pod's netns"))?;
    let host_veth = env.host_veth();

    let mac = plumbing::pod_mac(&env.container_id, &env.ifname);
    let create = |nl: &mut Netlink| {
        plumbing::create_veth(
            nl,
            &host_veth,
            &env.ifname,
            mac,
            &pod_ns,
            conf.mtu,
            &env.container_id,
        )
    };
    let mut created = create(&mut nl);
    if matches!(&created, Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST)) {
        created = replace_existing(env, &mut nl, &mut pod_nl, &host_veth, netns_path, create);
    }
    created
        .map_err(|e| CniError::io(format!("cannot create veth {host_veth}/{}", env.ifname), e))?;

    let mut agent_reached = false;
    let result = add_after_veth(
        env,
        conf,
        &mut nl,
        &mut pod_nl,
        &host_veth,
        &mut agent_reached,
    );
    if result.is_err() {
        // A failed ADD leaves nothing behind: no allocation, no veth (its peer goes with it).
        if agent_reached {
            let _ = agent(conf, &Request::Del(del_request(env)));
        }
        let _ = plumbing::delete_link(&mut nl, &host_veth);
    }
    result
}

/// The veth could not be created because a name is taken. If it is this attachment's own pair
/// (ADD again for the same attachment), keep it: ADD is idempotent and the pod keeps its
/// connectivity. If its peer is another interface of this sandbox, refuse. Otherwise it is a
/// dead sandbox of the same pod, or a retired pair whose peer still holds `ifname` in the
/// netns: remove those and create afresh.
fn replace_existing(
    env: &CniEnv,
    nl: &mut Netlink,
    pod_nl: &mut Netlink,
    host_veth: &str,
    netns_path: &str,
    create: impl Fn(&mut Netlink) -> io::Result<()>,
) -> io::Result<()> {
    match plumbing::peer_in(nl, host_veth, pod_nl)? {
        Some(name) if name == env.ifname => return plumbing::set_up(nl, host_veth),
        // The veth is named after the pod: one Sepal attachment per sandbox. Never break the
        // existing one for a second interface.
        Some(name) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("the sandbox is already attached to Sepal as {name}"),
            ))
        }
        None => {}
    }
    let mut removed = false;
    for name in [host_veth.to_string(), api::tombstone_name(host_veth)] {
        removed |= plumbing::delete_link(nl, &name)?;
    }
    let created = create(nl);
    if !removed && matches!(&created, Err(e) if e.raw_os_error() == Some(nix::libc::EEXIST)) {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("interface {} already exists in {netns_path}", env.ifname),
        ));
    }
    created
}

fn add_after_veth(
    env: &CniEnv,
    conf: &NetConf,
    nl: &mut Netlink,
    pod_nl: &mut Netlink,
    host_veth: &str,
    agent_reached: &mut bool,
) -> Result<Value, CniError> {
    let (pod_namespace, pod_name) = env.pod();
    let response = agent_call(
        conf,
        &Request::Add(AddRequest {
            key: env.key(),
            netns: env.netns.clone().unwrap_or_default(),
            pod_namespace,
            pod_name,
            host_veth: host_veth.to_string(),
            port_mappings: conf.port_mappings.clone(),
        }),
    );
    // Only a request that never left (no connection) certainly allocated nothing.
    *agent_reached = !matches!(&response, Err((_, false)));
    let reply = match response.map_err(|(e, _)| e)? {
        Response::Added(reply) => reply,
        Response::Error(e) => return Err(e.into()),
        other => return Err(unexpected(other)),
    };
    let ips = validate_ips(&reply.ips)?;
    // Configured MTU wins; else the agent's (the node's uplink MTU); 0 means "leave the default".
    let mtu = conf.mtu.or((reply.mtu > 0).then_some(reply.mtu));
    if let Some(small) = mtu.filter(|m| *m < 1280 && ips.iter().any(IpAddr::is_ipv6)) {
        // The kernel turns IPv6 off on links below its minimum MTU.
        return Err(CniError::config(format!(
            "mtu {small} is below IPv6's minimum of 1280, and the pod gets an IPv6 address"
        )));
    }
    plumbing::set_host_sysctls(host_veth, ips.iter().any(IpAddr::is_ipv6))
        .map_err(netlink_err("cannot set host veth sysctls"))?;
    if conf
        .port_mappings
        .iter()
        .any(api::PortMapping::reaches_localhost)
    {
        plumbing::set_route_localnet(host_veth)
            .map_err(netlink_err("cannot set route_localnet on the host veth"))?;
    }
    if conf.mtu.is_none() {
        if let Some(mtu) = mtu {
            plumbing::set_mtu(nl, host_veth, mtu)
                .map_err(netlink_err("cannot set the host veth MTU"))?;
        }
    }
    let pod = plumbing::configure_pod(pod_nl, &env.ifname, &ips, mtu)
        .map_err(netlink_err("cannot configure the pod interface"))?;

    Ok(add_output(env, conf, host_veth, &pod.mac, mtu, &ips))
}

/// ADD's result: prevResult (when chained) with this attachment's interfaces, addresses and
/// routes appended, in the config's version.
pub fn add_output(
    env: &CniEnv,
    conf: &NetConf,
    host_veth: &str,
    pod_mac: &str,
    mtu: Option<u32>,
    ips: &[IpAddr],
) -> Value {
    let ours = add_result(env, host_veth, pod_mac, mtu, ips, conf);
    let result = match conf.prev_result.clone() {
        Some(mut prev) => {
            prev.append(ours);
            prev
        }
        None => ours,
    };
    result.to_json(conf.cni_version)
}

/// The agent must hand out at most one address per family.
fn validate_ips(ips: &[IpAddr]) -> Result<Vec<IpAddr>, CniError> {
    let v4 = ips.iter().filter(|ip| ip.is_ipv4()).count();
    let v6 = ips.len() - v4;
    if ips.is_empty() || v4 > 1 || v6 > 1 {
        return Err(CniError::new(
            codes::IO_FAILURE,
            "sepal agent returned an unusable address set",
        )
        .details(format!("{ips:?}: want one address per family")));
    }
    Ok(ips.to_vec())
}

fn add_result(
    env: &CniEnv,
    host_veth: &str,
    pod_mac: &str,
    mtu: Option<u32>,
    ips: &[IpAddr],
    conf: &NetConf,
) -> CniResult {
    let interfaces = vec![
        Interface {
            name: host_veth.to_string(),
            mac: Some(plumbing::format_mac(&api::HOST_VETH_MAC)),
            mtu,
            ..Default::default()
        },
        Interface {
            name: env.ifname.clone(),
            mac: Some(pod_mac.to_string()),
            mtu,
            sandbox: env.netns.clone(),
            ..Default::default()
        },
    ];
    let gateway = |ip: &IpAddr| -> IpAddr {
        if ip.is_ipv4() {
            IpAddr::V4(api::POD_GATEWAY_V4)
        } else {
            IpAddr::V6(POD_GATEWAY_V6)
        }
    };
    let ip_configs = ips
        .iter()
        .map(|ip| IpConfig {
            address: IpPrefix::host(*ip),
            gateway: Some(gateway(ip)),
            interface: Some(1),
        })
        .collect();
    let routes = ips
        .iter()
        .map(|ip| Route {
            dst: IpPrefix {
                addr: if ip.is_ipv4() {
                    IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
                } else {
                    IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
                },
                prefix: 0,
            },
            gw: Some(gateway(ip)),
            extra: Default::default(),
        })
        .collect();
    CniResult {
        interfaces,
        ips: ip_configs,
        routes,
        dns: conf.dns.clone(),
    }
}

fn del_request(env: &CniEnv) -> DelRequest {
    DelRequest {
        key: env.key(),
        pod_namespace: env.args.pod_namespace.clone(),
        pod_name: env.args.pod_name.clone(),
    }
}

/// DEL: retire the host veth (down + renamed, see `api::tombstone_name`: deleting a device
/// costs tens of milliseconds of kernel RCU waits), then release in the agent. Succeeds when
/// everything is already gone; an unreachable agent answers 11 (the allocation could not be
/// released, the runtime must retry) after the veth has been taken out of service anyway.
fn del(env: &CniEnv, conf: &NetConf) -> Result<(), CniError> {
    let mut nl = Netlink::open().map_err(netlink_err("cannot open netlink"))?;
    let host_veth = env.host_veth();
    // The pod's newer sandbox may hold the name by now (a runtime repeats DEL for a dead
    // sandbox): its pair is not this attachment's to remove.
    let owner = plumbing::veth_owner(&mut nl, &host_veth)
        .map_err(netlink_err("cannot look up the host veth"))?;
    let theirs = owner.is_some_and(|o| o != env.container_id);
    let retired = !theirs
        && plumbing::retire_veth(&mut nl, &host_veth)
            .map_err(netlink_err("cannot retire the host veth"))?;
    if !retired
        && !plumbing::link_exists(&mut nl, &api::tombstone_name(&host_veth))
            .map_err(netlink_err("cannot look up links"))?
    {
        // No veth under the expected name (the runtime may not pass the pod's identity on DEL):
        // the pod side names the pair too. Rare, so the plain (slow) delete is fine here.
        if let Some(path) = env.netns.as_deref() {
            if let Ok(pod_ns) = File::open(path) {
                let host_ns =
                    HostNetns::current().map_err(netlink_err("cannot open the node's netns"))?;
                let mut pod_nl = host_ns
                    .netlink_in(&pod_ns)
                    .map_err(netlink_err("cannot open netlink in the pod's netns"))?;
                plumbing::delete_link(&mut pod_nl, &env.ifname)
                    .map_err(netlink_err("cannot remove the pod interface"))?;
            }
        }
    }
    match agent(conf, &Request::Del(del_request(env)))? {
        Response::Ok | Response::Collected { .. } => Ok(()),
        Response::Error(e) => Err(CniError::from(e)),
        other => Err(unexpected(other)),
    }
}

/// CHECK's expectations from prevResult: a sandbox interface named CNI_IFNAME with addresses.
fn expected(env: &CniEnv, conf: &NetConf) -> Result<Expected, CniError> {
    let prev = conf.prev_result.as_ref().ok_or_else(|| {
        CniError::config("CHECK needs prevResult (the result of the ADD being checked)")
    })?;
    let failed = |msg: String| CniError::new(codes::CHECK_FAILED, msg);
    let index = prev
        .interfaces
        .iter()
        .position(|i| i.name == env.ifname && i.sandbox.is_some())
        .ok_or_else(|| {
            failed(format!(
                "prevResult has no sandbox interface {}",
                env.ifname
            ))
        })?;
    let ips: Vec<IpAddr> = prev
        .ips
        .iter()
        .filter(|ip| ip.interface == Some(index))
        .map(|ip| ip.address.addr)
        .collect();
    if ips.is_empty() {
        return Err(failed(format!(
            "prevResult has no address on {}",
            env.ifname
        )));
    }
    Ok(Expected {
        ips,
        mac: prev.interfaces[index].mac.clone(),
    })
}

fn check(env: &CniEnv, conf: &NetConf, expected: &Expected) -> Result<(), CniError> {
    let failed = |msg: String| CniError::new(codes::CHECK_FAILED, msg);
    let ips = expected.ips.clone();
    let netns_path = env
        .netns
        .as_deref()
        .ok_or_else(|| CniError::env("CNI_NETNS is not set"))?;
    let pod_ns = open_netns(netns_path)?;
    let host_ns = HostNetns::current().map_err(netlink_err("cannot open the node's netns"))?;
    let mut pod_nl = host_ns
        .netlink_in(&pod_ns)
        .map_err(netlink_err("cannot open netlink in the pod's netns"))?;
    plumbing::check_pod(&mut pod_nl, &env.ifname, &ips, expected.mac.as_deref()).map_err(failed)?;
    let host_veth = env.host_veth();
    let mut nl = Netlink::open().map_err(netlink_err("cannot open netlink"))?;
    plumbing::check_host(&mut nl, &host_veth).map_err(failed)?;
    match agent(
        conf,
        &Request::Check(CheckRequest {
            key: env.key(),
            host_veth,
            ips,
        }),
    )? {
        Response::Ok => Ok(()),
        Response::Error(e) => Err(e.into()),
        other => Err(unexpected(other)),
    }
}

/// STATUS: ready when the agent says so. Any failure is "plugin not available" (50) unless the
/// agent itself reports 51 (not available, existing containers limited).
fn status(conf: &NetConf) -> Result<(), CniError> {
    let unavailable = |msg: String, details: String| {
        CniError::new(codes::PLUGIN_NOT_AVAILABLE, msg).details(details)
    };
    match client::call(&conf.socket, &Request::Status) {
        Ok(Response::Ok) => Ok(()),
        Ok(Response::Error(e)) if e.code == 51 => Err(e.into()),
        Ok(Response::Error(e)) => Err(unavailable(
            e.msg,
            format!(
                "agent code {}{}{}",
                e.code,
                if e.details.is_empty() { "" } else { ": " },
                e.details
            ),
        )),
        Ok(other) => Err(unavailable(
            "sepal agent sent an unexpected response".into(),
            format!("{other:?}"),
        )),
        Err(e) => Err(unavailable("sepal agent unreachable".into(), e.to_string())),
    }
}

/// GC: the agent releases every allocation (and host route) whose attachment is not listed;
/// then the plugin deletes retired veths (tombstones) still around, e.g. of sandboxes the
/// runtime kept. GC is not latency-critical, so paying for the unregistering is fine here.
fn gc(conf: &NetConf) -> Result<(), CniError> {
    let released = match agent(
        conf,
        &Request::Gc(GcRequest {
            valid: conf.valid_attachments.clone(),
        }),
    ) {
        Ok(Response::Ok | Response::Collected { .. }) => Ok(()),
        Ok(Response::Error(e)) => Err(CniError::from(e)),
        Ok(other) => Err(unexpected(other)),
        Err(e) => Err(e),
    };
    // Spec: keep going after an error, remove what can be removed, then report.
    let reaped = (|| {
        let mut nl = Netlink::open().map_err(netlink_err("cannot open netlink"))?;
        let names = plumbing::link_names(&mut nl).map_err(netlink_err("cannot list links"))?;
        let mut first_error = Ok(());
        for name in names
            .iter()
            .filter(|n| n.starts_with(api::TOMBSTONE_PREFIX))
        {
            if let Err(e) = plumbing::delete_link(&mut nl, name) {
                if first_error.is_ok() {
                    first_error = Err(CniError::io(
                        format!("cannot delete retired veth {name}"),
                        e,
                    ));
                }
            }
        }
        first_error
    })();
    released.and(reaped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(vars: &[(&str, &str)], stdin: &str) -> Outcome {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        execute(|k| map.get(k).cloned(), stdin.as_bytes())
    }

    fn error_code(out: &Outcome) -> u64 {
        assert_eq!(out.exit_code, 1);
        let v: Value = serde_json::from_str(out.stdout.as_deref().unwrap()).unwrap();
        v["code"].as_u64().unwrap()
    }

    #[test]
    fn version_needs_no_config() {
        let out = run(&[("CNI_COMMAND", "VERSION")], "");
        assert_eq!(out.exit_code, 0);
        let v: Value = serde_json::from_str(out.stdout.as_deref().unwrap()).unwrap();
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), 5);
        let out = run(&[("CNI_COMMAND", "VERSION")], r#"{"cniVersion":"0.3.1"}"#);
        assert!(out.stdout.unwrap().contains(r#""cniVersion":"0.3.1""#));
    }

    #[test]
    fn errors_render_in_the_asked_version() {
        let out = run(&[], r#"{"cniVersion":"0.4.0","name":"n"}"#);
        assert_eq!(error_code(&out), 4);
        assert!(out.stdout.unwrap().contains(r#""cniVersion":"0.4.0""#));
        let out = run(
            &[("CNI_COMMAND", "STATUS")],
            r#"{"cniVersion":"0.2.0","name":"n"}"#,
        );
        assert_eq!(error_code(&out), 1);
        assert!(out.stdout.unwrap().contains(r#""cniVersion":"1.1.0""#));
    }

    #[test]
    fn commands_are_gated_by_config_version() {
        let sock = r#""socket":"/nonexistent/sepal.sock""#;
        let out = run(
            &[("CNI_COMMAND", "STATUS")],
            &format!(r#"{{"cniVersion":"1.0.0","name":"n",{sock}}}"#),
        );
        assert_eq!(error_code(&out), 1);
        let out = run(
            &[("CNI_COMMAND", "GC")],
            &format!(r#"{{"cniVersion":"0.4.0","name":"n",{sock}}}"#),
        );
        assert_eq!(error_code(&out), 1);
        let check = [
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/nonexistent"),
            ("CNI_IFNAME", "eth0"),
        ];
        let out = run(
            &check,
            &format!(r#"{{"cniVersion":"0.3.1","name":"n",{sock}}}"#),
        );
        assert_eq!(error_code(&out), 1);
        // From 0.4.0 on CHECK runs, and without prevResult the config is invalid.
        let out = run(
            &check,
            &format!(r#"{{"cniVersion":"0.4.0","name":"n",{sock}}}"#),
        );
        assert_eq!(error_code(&out), 7);
    }

    #[test]
    fn status_and_gc_without_agent() {
        let sock = r#""socket":"/nonexistent/sepal.sock""#;
        let out = run(
            &[("CNI_COMMAND", "STATUS")],
            &format!(r#"{{"cniVersion":"1.1.0","name":"n",{sock}}}"#),
        );
        assert_eq!(error_code(&out), 50);
        let out = run(
            &[("CNI_COMMAND", "GC")],
            &format!(r#"{{"cniVersion":"1.1.0","name":"n",{sock}}}"#),
        );
        assert_eq!(error_code(&out), 11);
    }

    #[test]
    fn add_of_a_missing_netns_is_container_unknown() {
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/nonexistent/netns"),
            ("CNI_IFNAME", "eth0"),
        ];
        let out = run(
            &vars,
            r#"{"cniVersion":"1.0.0","name":"n","socket":"/nonexistent/s"}"#,
        );
        assert_eq!(error_code(&out), 3);
    }

    #[test]
    fn parsing_touches_nothing() {
        // The netns, socket and agent are not looked at before `run`.
        let vars: HashMap<&str, &str> = [
            ("CNI_COMMAND", "CHECK"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/nonexistent/netns"),
            ("CNI_IFNAME", "eth0"),
        ]
        .into();
        let conf = r#"{"cniVersion":"1.1.0","name":"n","socket":"/nonexistent/s",
            "prevResult":{"interfaces":[{"name":"eth0","sandbox":"/x","mac":"02:00:00:00:00:01"}],
                          "ips":[{"address":"10.0.0.5/32","interface":0}]}}"#;
        let get = |k: &str| vars.get(k).map(|v| v.to_string());
        let Ok(Invocation::Check(env, _, expected)) = parse(get, conf.as_bytes()) else {
            panic!("CHECK parses")
        };
        assert_eq!(env.ifname, "eth0");
        assert_eq!(expected.ips, vec!["10.0.0.5".parse::<IpAddr>().unwrap()]);
        assert_eq!(expected.mac.as_deref(), Some("02:00:00:00:00:01"));
        let conf = conf.replace(r#""name":"eth0""#, r#""name":"net1""#);
        assert_eq!(
            parse(get, conf.as_bytes()).unwrap_err().code,
            codes::CHECK_FAILED
        );
    }

    #[test]
    fn agent_address_sets_are_validated() {
        let v4: IpAddr = "10.0.0.1".parse().unwrap();
        let v4b: IpAddr = "10.0.0.2".parse().unwrap();
        let v6: IpAddr = "fd00::1".parse().unwrap();
        assert!(validate_ips(&[v4, v6]).is_ok());
        assert!(validate_ips(&[v6]).is_ok());
        assert!(validate_ips(&[]).is_err());
        assert!(validate_ips(&[v4, v4b]).is_err());
    }
}
