//! The network configuration on stdin: Sepal's own keys (`socket`, `mtu`) and the spec's standard
//! fields (cniVersion, name, prevResult, runtimeConfig, args, dns, `cni.dev/valid-attachments`).

use crate::api::{codes, AttachmentKey, PortMapping, DEFAULT_SOCKET};
use crate::error::CniError;
use crate::result::{CniResult, Dns};
use crate::version::CniVersion;
use serde::Deserialize;
use serde_json::Value;
use std::path::PathBuf;

/// Smallest MTU the kernel accepts for IPv4; IPv6 needs 1280, checked by the kernel itself.
const MIN_MTU: u32 = 68;
const MAX_MTU: u32 = 65535;

/// The parsed plugin configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: CniVersion,
    pub name: String,
    pub socket: PathBuf,
    pub mtu: Option<u32>,
    pub dns: Dns,
    pub prev_result: Option<CniResult>,
    /// GC only: attachments the runtime still knows.
    pub valid_attachments: Vec<AttachmentKey>,
    /// ADD: the pod's hostPorts (`runtimeConfig.portMappings`).
    pub port_mappings: Vec<PortMapping>,
}

/// The raw JSON shape; unknown keys are allowed (the spec lets plugins ignore them).
#[derive(Deserialize)]
struct Raw {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    _kind: Option<String>,
    socket: Option<String>,
    mtu: Option<Value>,
    #[serde(default)]
    dns: Option<Value>,
    #[serde(rename = "prevResult")]
    prev_result: Option<Value>,
    #[serde(rename = "runtimeConfig")]
    runtime_config: Option<Value>,
    args: Option<Value>,
    ipam: Option<Value>,
    #[serde(rename = "ipMasq")]
    ip_masq: Option<Value>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Value>,
    /// The name an earlier spec draft used; libcni sends both.
    #[serde(rename = "cni.dev/attachments")]
    attachments: Option<Value>,
}

#[derive(Deserialize)]
struct GcAttachment {
    #[serde(rename = "containerID")]
    container_id: String,
    ifname: String,
}

/// Reads just `cniVersion` from a config, for rendering errors in the asked version even when
/// the rest of the config is broken.
pub fn peek_version(stdin: &[u8]) -> Option<String> {
    #[derive(Deserialize)]
    struct Peek {
        #[serde(rename = "cniVersion")]
        v: Option<String>,
    }
    serde_json::from_slice::<Peek>(stdin).ok().and_then(|p| p.v)
}

impl NetConf {
    pub fn parse(stdin: &[u8]) -> Result<NetConf, CniError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| {
            CniError::new(
                codes::DECODE_FAILURE,
                "cannot decode the network configuration",
            )
            .details(e.to_string())
        })?;
        if !value.is_object() {
            return Err(CniError::new(
                codes::DECODE_FAILURE,
                "the network configuration is not a JSON object",
            ));
        }
        let raw: Raw = serde_json::from_value(value).map_err(|e| {
            CniError::config("invalid network configuration").details(e.to_string())
        })?;
        let version = raw
            .cni_version
            .ok_or_else(|| CniError::config("network configuration has no cniVersion"))?;
        let cni_version = CniVersion::parse(&version)?;
        let name = raw
            .name
            .ok_or_else(|| CniError::config("network configuration has no name"))?;
        validate_network_name(&name)?;

        // Spec: the message of error 2 names the unsupported key and its value.
        if let Some(ipam) = &raw.ipam {
            return Err(CniError::new(
                codes::UNSUPPORTED_FIELD,
                format!("unsupported field \"ipam\": {ipam}"),
            )
            .details("the sepal node agent allocates pod addresses from the node's pod CIDRs"));
        }
        match &raw.ip_masq {
            None | Some(Value::Bool(false)) => {}
            Some(value) => {
                return Err(CniError::new(
                    codes::UNSUPPORTED_FIELD,
                    format!("unsupported field \"ipMasq\": {value}"),
                )
                .details("pod addresses are routable; sepal-cni does not masquerade"))
            }
        }
        if let Some(rc) = &raw.runtime_config {
            if !rc.is_object() {
                return Err(CniError::config("runtimeConfig must be an object"));
            }
        }
        let port_mappings = crate::port_mappings::parse(raw.runtime_config.as_ref())?;
        if let Some(args) = &raw.args {
            if !args.is_object() {
                return Err(CniError::config("args must be an object"));
            }
        }

        let socket = match raw.socket {
            None => PathBuf::from(DEFAULT_SOCKET),
            Some(s) if s.is_empty() => return Err(CniError::config("socket must not be empty")),
            Some(s) => PathBuf::from(s),
        };
        let mtu = match raw.mtu {
            None | Some(Value::Null) => None,
            Some(v) => {
                let mtu = v
                    .as_u64()
                    .filter(|m| (MIN_MTU as u64..=MAX_MTU as u64).contains(m))
                    .ok_or_else(|| {
                        CniError::config(format!(
                            "mtu must be a number from {MIN_MTU} to {MAX_MTU}, not {v}"
                        ))
                    })?;
                Some(mtu as u32)
            }
        };
        let dns = match raw.dns {
            None | Some(Value::Null) => Dns::default(),
            Some(v) => Dns::deserialize(&v)
                .map_err(|e| CniError::config("invalid dns section").details(e.to_string()))?,
        };
        let prev_result = match raw.prev_result {
            None | Some(Value::Null) => None,
            Some(v) => Some(CniResult::from_prev(&v)?),
        };
        let valid_attachments = match raw.valid_attachments.or(raw.attachments) {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => Vec::<GcAttachment>::deserialize(&v)
                .map_err(|e| {
                    CniError::config("invalid cni.dev/valid-attachments").details(e.to_string())
                })?
                .into_iter()
                .map(|a| AttachmentKey {
                    container_id: a.container_id,
                    ifname: a.ifname,
                })
                .collect(),
        };
        Ok(NetConf {
            cni_version,
            name,
            socket,
            mtu,
            dns,
            prev_result,
            valid_attachments,
            port_mappings,
        })
    }
}

/// Spec: a network name starts alphanumeric, then alphanumerics, `_`, `.`, `-`.
fn validate_network_name(name: &str) -> Result<(), CniError> {
    let mut chars = name.chars();
    let ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !ok {
        return Err(CniError::config(format!("invalid network name {name:?}")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<NetConf, CniError> {
        NetConf::parse(text.as_bytes())
    }

    #[test]
    fn minimal_config_uses_defaults() {
        let c = parse(r#"{"cniVersion":"1.1.0","name":"sepal","type":"sepal-cni"}"#).unwrap();
        assert_eq!(c.cni_version, CniVersion::V1_1_0);
        assert_eq!(c.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(c.mtu, None);
        assert_eq!(c.prev_result, None);
        assert!(c.valid_attachments.is_empty());
    }

    #[test]
    fn full_config() {
        let c = parse(
            r#"{"cniVersion":"0.4.0","name":"k8s-pod-network","type":"sepal-cni",
                "socket":"/tmp/s.sock","mtu":1400,
                "dns":{"nameservers":["10.96.0.10"],"search":["svc.cluster.local"]},
                "runtimeConfig":{"portMappings":[]},"args":{"labels":{"a":"b"}},
                "somethingElse":true,
                "prevResult":{"cniVersion":"0.4.0","interfaces":[{"name":"eth0","sandbox":"/x"}],
                              "ips":[{"version":"4","address":"10.1.0.2/32","interface":0}]}}"#,
        )
        .unwrap();
        assert_eq!(c.cni_version, CniVersion::V0_4_0);
        assert_eq!(c.socket, PathBuf::from("/tmp/s.sock"));
        assert_eq!(c.mtu, Some(1400));
        assert_eq!(c.dns.search, vec!["svc.cluster.local".to_string()]);
        let prev = c.prev_result.unwrap();
        assert_eq!(prev.ips[0].address.to_string(), "10.1.0.2/32");
    }

    #[test]
    fn gc_attachments_from_either_key() {
        for key in ["cni.dev/valid-attachments", "cni.dev/attachments"] {
            let c = parse(&format!(
                r#"{{"cniVersion":"1.1.0","name":"n","type":"sepal-cni",
                    "{key}":[{{"containerID":"c1","ifname":"eth0"}},{{"containerID":"c2","ifname":"net1"}}]}}"#
            ))
            .unwrap();
            assert_eq!(c.valid_attachments.len(), 2);
            assert_eq!(c.valid_attachments[1].container_id, "c2");
            assert_eq!(c.valid_attachments[1].ifname, "net1");
        }
        let err = parse(
            r#"{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":[{"containerID":"c1"}]}"#,
        )
        .unwrap_err();
        assert_eq!(err.code, codes::INVALID_CONFIG);
    }

    #[test]
    fn error_codes_for_bad_configs() {
        let cases = [
            ("", codes::DECODE_FAILURE),
            ("{", codes::DECODE_FAILURE),
            ("[]", codes::DECODE_FAILURE),
            (r#"{"name":"n"}"#, codes::INVALID_CONFIG),
            (
                r#"{"cniVersion":"0.2.0","name":"n"}"#,
                codes::INCOMPATIBLE_VERSION,
            ),
            (r#"{"cniVersion":"1.1.0"}"#, codes::INVALID_CONFIG),
            (
                r#"{"cniVersion":"1.1.0","name":"-bad"}"#,
                codes::INVALID_CONFIG,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","mtu":"big"}"#,
                codes::INVALID_CONFIG,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","mtu":10}"#,
                codes::INVALID_CONFIG,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","mtu":70000}"#,
                codes::INVALID_CONFIG,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","socket":""}"#,
                codes::INVALID_CONFIG,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","socket":5}"#,
                codes::INVALID_CONFIG,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","args":5}"#,
                codes::INVALID_CONFIG,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","ipam":{"type":"host-local"}}"#,
                codes::UNSUPPORTED_FIELD,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","ipMasq":true}"#,
                codes::UNSUPPORTED_FIELD,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","ipMasq":"yes"}"#,
                codes::UNSUPPORTED_FIELD,
            ),
            (
                r#"{"cniVersion":"1.1.0","name":"n","prevResult":{"ips":[{"address":"x"}]}}"#,
                codes::DECODE_FAILURE,
            ),
        ];
        for (text, code) in cases {
            assert_eq!(parse(text).unwrap_err().code, code, "{text}");
        }
        parse(r#"{"cniVersion":"1.1.0","name":"n","ipMasq":false,"mtu":null}"#).unwrap();
    }

    #[test]
    fn unsupported_field_errors_name_key_and_value() {
        let err =
            parse(r#"{"cniVersion":"1.1.0","name":"n","ipam":{"type":"host-local"}}"#).unwrap_err();
        assert!(err.msg.contains("ipam"), "{err}");
        assert!(err.msg.contains("host-local"), "{err}");
        let err = parse(r#"{"cniVersion":"1.1.0","name":"n","ipMasq":true}"#).unwrap_err();
        assert!(
            err.msg.contains("ipMasq") && err.msg.contains("true"),
            "{err}"
        );
    }

    #[test]
    fn peek_version_survives_broken_configs() {
        assert_eq!(
            peek_version(br#"{"cniVersion":"0.3.1","mtu":"x"}"#).as_deref(),
            Some("0.3.1")
        );
        assert_eq!(peek_version(b"garbage"), None);
    }
}
