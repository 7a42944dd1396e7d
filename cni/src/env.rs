//! The CNI_* environment of one plugin call: which command, which attachment, which sandbox, and
//! CNI_ARGS (Kubernetes pod identity, IgnoreUnknown), validated as the spec requires per command.

use crate::error::CniError;
use std::collections::BTreeMap;

/// The six commands of CNI 1.1.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
    Status,
    Gc,
}

impl Command {
    pub fn parse(text: &str) -> Result<Command, CniError> {
        Ok(match text {
            "ADD" => Command::Add,
            "DEL" => Command::Del,
            "CHECK" => Command::Check,
            "VERSION" => Command::Version,
            "STATUS" => Command::Status,
            "GC" => Command::Gc,
            other => {
                return Err(CniError::env(format!("unknown CNI_COMMAND {other:?}"))
                    .details("expected ADD, DEL, CHECK, VERSION, STATUS or GC"))
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Command::Add => "ADD",
            Command::Del => "DEL",
            Command::Check => "CHECK",
            Command::Version => "VERSION",
            Command::Status => "STATUS",
            Command::Gc => "GC",
        }
    }
}

/// CNI_ARGS: `KEY=VALUE;KEY=VALUE`. Only the keys Sepal understands are kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub pod_uid: Option<String>,
    pub infra_container_id: Option<String>,
}

impl CniArgs {
    /// Parses CNI_ARGS. An unknown key is an error unless `IgnoreUnknown` is `1`/`true`, as in
    /// libcni's argument loader that runtimes expect plugins to mirror.
    pub fn parse(text: &str) -> Result<CniArgs, CniError> {
        let mut pairs = BTreeMap::new();
        for pair in text.split(';').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                CniError::env(format!("CNI_ARGS: invalid pair {pair:?}"))
                    .details("expected KEY=VALUE pairs separated by ';'")
            })?;
            if key.is_empty() {
                return Err(CniError::env(format!("CNI_ARGS: empty key in {pair:?}")));
            }
            pairs.insert(key, value);
        }
        let ignore_unknown = match pairs.remove("IgnoreUnknown") {
            None => false,
            Some(v) => match v.to_ascii_lowercase().as_str() {
                "1" | "true" => true,
                "0" | "false" => false,
                _ => {
                    return Err(CniError::env(format!(
                        "CNI_ARGS: IgnoreUnknown={v:?} is not a boolean"
                    )))
                }
            },
        };
        let mut take = |key: &str| {
            pairs
                .remove(key)
                .filter(|v| !v.is_empty())
                .map(str::to_string)
        };
        let args = CniArgs {
            pod_namespace: take("K8S_POD_NAMESPACE"),
            pod_name: take("K8S_POD_NAME"),
            pod_uid: take("K8S_POD_UID"),
            infra_container_id: take("K8S_POD_INFRA_CONTAINER_ID"),
        };
        if !ignore_unknown {
            if let Some(key) = pairs.keys().next() {
                return Err(CniError::env(format!("CNI_ARGS: unknown key {key:?}"))
                    .details("set IgnoreUnknown=1 to pass keys sepal-cni does not use"));
            }
        }
        Ok(args)
    }
}

/// The validated environment of one call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniEnv {
    pub command: Command,
    /// Empty for VERSION, STATUS and GC.
    pub container_id: String,
    /// The sandbox's network namespace path; `None` when not given (allowed for DEL).
    pub netns: Option<String>,
    /// Empty for VERSION, STATUS and GC.
    pub ifname: String,
    pub args: CniArgs,
    pub path: Vec<String>,
}

impl CniEnv {
    /// Reads the environment from `get` (so tests need not touch the process environment) and
    /// checks what the spec requires for the command: CNI_CONTAINERID, CNI_IFNAME for ADD, DEL,
    /// CHECK, and CNI_NETNS for ADD and CHECK.
    pub fn parse(get: impl Fn(&str) -> Option<String>) -> Result<CniEnv, CniError> {
        let var = |name: &str| get(name).filter(|v| !v.is_empty());
        let command = Command::parse(
            &var("CNI_COMMAND").ok_or_else(|| CniError::env("CNI_COMMAND is not set"))?,
        )?;
        let path = var("CNI_PATH")
            .map(|p| {
                p.split(':')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        let mut env = CniEnv {
            command,
            container_id: String::new(),
            netns: None,
            ifname: String::new(),
            args: CniArgs::default(),
            path,
        };
        if !matches!(command, Command::Add | Command::Del | Command::Check) {
            return Ok(env);
        }
        env.container_id =
            var("CNI_CONTAINERID").ok_or_else(|| CniError::env("CNI_CONTAINERID is not set"))?;
        validate_container_id(&env.container_id)?;
        env.ifname = var("CNI_IFNAME").ok_or_else(|| CniError::env("CNI_IFNAME is not set"))?;
        validate_ifname(&env.ifname)?;
        env.netns = var("CNI_NETNS");
        if env.netns.is_none() && command != Command::Del {
            return Err(CniError::env(format!(
                "CNI_NETNS is not set (required for {})",
                command.as_str()
            )));
        }
        env.args = CniArgs::parse(&var("CNI_ARGS").unwrap_or_default())?;
        Ok(env)
    }

    /// The pod's identity for naming its host veth and for the agent. Without Kubernetes
    /// arguments (a plain runtime), the container ID stands in for the pod name.
    pub fn pod(&self) -> (String, String) {
        match (&self.args.pod_namespace, &self.args.pod_name) {
            (Some(ns), Some(name)) => (ns.clone(), name.clone()),
            _ => (String::new(), self.container_id.clone()),
        }
    }

    /// Host-side veth name of this attachment.
    pub fn host_veth(&self) -> String {
        let (ns, name) = self.pod();
        crate::api::host_veth_name(&ns, &name)
    }

    pub fn key(&self) -> crate::api::AttachmentKey {
        crate::api::AttachmentKey {
            container_id: self.container_id.clone(),
            ifname: self.ifname.clone(),
        }
    }
}

/// Spec: a container ID is non-empty, starts alphanumeric, then alphanumerics, `_`, `.`, `-`.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')) {
        return Err(
            CniError::env(format!("invalid CNI_CONTAINERID {id:?}")).details(
                "must start with a letter or digit and hold only letters, digits, '_', '.', '-'",
            ),
        );
    }
    Ok(())
}

/// Spec: an interface name is at most 15 bytes, not `.` or `..`, without `/`, `:` or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let bad = name.is_empty()
        || name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace() || c.is_control());
    if bad {
        return Err(CniError::env(format!("invalid CNI_IFNAME {name:?}"))
            .details("at most 15 characters, not '.' or '..', no '/', ':' or whitespace"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::codes;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Result<CniEnv, CniError> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        CniEnv::parse(|k| map.get(k).cloned())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "abc123"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin:/usr/lib/cni"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc123;K8S_POD_UID=u1",
        ),
    ];

    #[test]
    fn parses_a_kubelet_add() {
        let e = env(ADD).unwrap();
        assert_eq!(e.command, Command::Add);
        assert_eq!(e.container_id, "abc123");
        assert_eq!(e.netns.as_deref(), Some("/run/netns/x"));
        assert_eq!(e.ifname, "eth0");
        assert_eq!(e.path, vec!["/opt/cni/bin", "/usr/lib/cni"]);
        assert_eq!(e.args.pod_namespace.as_deref(), Some("default"));
        assert_eq!(e.args.pod_name.as_deref(), Some("web-0"));
        assert_eq!(e.args.pod_uid.as_deref(), Some("u1"));
        assert_eq!(
            e.host_veth(),
            crate::api::host_veth_name("default", "web-0")
        );
    }

    #[test]
    fn every_command_parses() {
        for (text, cmd) in [
            ("ADD", Command::Add),
            ("DEL", Command::Del),
            ("CHECK", Command::Check),
            ("VERSION", Command::Version),
            ("STATUS", Command::Status),
            ("GC", Command::Gc),
        ] {
            assert_eq!(Command::parse(text).unwrap(), cmd);
            assert_eq!(cmd.as_str(), text);
        }
        assert_eq!(Command::parse("add").unwrap_err().code, codes::INVALID_ENV);
    }

    #[test]
    fn missing_variables_are_code_4() {
        for drop in ["CNI_COMMAND", "CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"] {
            let vars: Vec<_> = ADD.iter().copied().filter(|(k, _)| *k != drop).collect();
            let err = env(&vars).unwrap_err();
            assert_eq!(err.code, codes::INVALID_ENV, "{drop}");
            assert!(err.msg.contains(drop), "{err}");
        }
    }

    #[test]
    fn del_does_not_need_a_netns() {
        let vars = [
            ("CNI_COMMAND", "DEL"),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_NETNS", ""),
        ];
        let e = env(&vars).unwrap();
        assert_eq!(e.netns, None);
        assert_eq!(e.args, CniArgs::default());
    }

    #[test]
    fn status_gc_and_version_need_only_the_command() {
        for cmd in ["STATUS", "GC", "VERSION"] {
            let e = env(&[("CNI_COMMAND", cmd)]).unwrap();
            assert!(e.container_id.is_empty());
        }
    }

    #[test]
    fn cni_args_unknown_keys_need_ignore_unknown() {
        let err = CniArgs::parse("K8S_POD_NAME=a;FOO=bar").unwrap_err();
        assert_eq!(err.code, codes::INVALID_ENV);
        assert!(err.msg.contains("FOO"));
        for flag in ["1", "true", "True", "TRUE"] {
            let a =
                CniArgs::parse(&format!("IgnoreUnknown={flag};FOO=bar;K8S_POD_NAME=a")).unwrap();
            assert_eq!(a.pod_name.as_deref(), Some("a"));
        }
        assert!(CniArgs::parse("IgnoreUnknown=0;FOO=bar").is_err());
        assert!(CniArgs::parse("IgnoreUnknown=maybe").is_err());
    }

    #[test]
    fn cni_args_rejects_malformed_pairs() {
        assert!(CniArgs::parse("K8S_POD_NAME").is_err());
        assert!(CniArgs::parse("=x").is_err());
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());
        // Empty segments (a trailing ';') are tolerated, values may hold '='.
        let a = CniArgs::parse("K8S_POD_NAMESPACE=ns;K8S_POD_NAME=a=b;").unwrap();
        assert_eq!(a.pod_name.as_deref(), Some("a=b"));
    }

    #[test]
    fn without_k8s_args_the_container_id_names_the_pod() {
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_CONTAINERID", "c1"),
            ("CNI_NETNS", "/x"),
            ("CNI_IFNAME", "eth0"),
        ];
        let e = env(&vars).unwrap();
        assert_eq!(e.pod(), (String::new(), "c1".to_string()));
        assert!(e.host_veth().starts_with("sep"));
    }

    #[test]
    fn container_id_and_ifname_are_validated() {
        for good in ["a", "0abc", "a_b.c-d", "3f6940ab5ab43bc522569d15b23f8c1b"] {
            validate_container_id(good).unwrap();
        }
        for bad in ["", "-a", ".a", "a b", "a/b", "a;b", "é"] {
            assert_eq!(
                validate_container_id(bad).unwrap_err().code,
                codes::INVALID_ENV,
                "{bad}"
            );
        }
        for good in ["eth0", "net1", "a234567890abcde"] {
            validate_ifname(good).unwrap();
        }
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "a234567890abcdef"] {
            assert_eq!(
                validate_ifname(bad).unwrap_err().code,
                codes::INVALID_ENV,
                "{bad}"
            );
        }
    }
}
