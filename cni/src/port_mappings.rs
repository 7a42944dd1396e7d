//! `runtimeConfig.portMappings`, the CNI conventions' capability for a pod's hostPorts:
//! `[{"hostPort": 8080, "containerPort": 80, "protocol": "tcp", "hostIP": "10.0.0.5"}]`.
//! Keys match without regard to case, as Go's decoder (and so portmap) matches them: containerd
//! sends its Go struct's field names, `HostPort`, `ContainerPort`, `Protocol`, `HostIP`.
//! A runtime passes it only to plugins whose conflist entry declares
//! `"capabilities": {"portMappings": true}`. Anything malformed is an invalid config (7): a
//! silently dropped mapping would be a hostPort that never answers.

use crate::api::{PortMapping, Protocol};
use crate::error::CniError;
use serde_json::Value;
use std::net::IpAddr;

/// The mappings in `runtimeConfig` (an object, already checked), in the runtime's order.
pub fn parse(runtime_config: Option<&Value>) -> Result<Vec<PortMapping>, CniError> {
    let Some(list) = runtime_config.and_then(|rc| rc.get("portMappings")) else {
        return Ok(Vec::new());
    };
    if list.is_null() {
        return Ok(Vec::new());
    }
    let items = list
        .as_array()
        .ok_or_else(|| CniError::config("runtimeConfig.portMappings must be a list"))?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            one(item).map_err(|why| {
                CniError::config(format!("runtimeConfig.portMappings[{i}]: {why}"))
                    .details(item.to_string())
            })
        })
        .collect()
}

/// `object[key]`, the key compared without regard to ASCII case.
fn field<'a>(object: &'a serde_json::Map<String, Value>, key: &str) -> Option<&'a Value> {
    object.get(key).or_else(|| {
        object
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

fn one(item: &Value) -> Result<PortMapping, String> {
    let Some(item) = item.as_object() else {
        return Err("not an object".into());
    };
    let port = |key: &str| -> Result<u16, String> {
        let v = field(item, key).ok_or_else(|| format!("no {key}"))?;
        v.as_u64()
            .filter(|p| (1..=65535).contains(p))
            .map(|p| p as u16)
            .ok_or_else(|| format!("{key} must be a port from 1 to 65535, not {v}"))
    };
    let protocol = match field(item, "protocol") {
        None | Some(Value::Null) => Protocol::Tcp,
        Some(Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "" | "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => Protocol::Sctp,
            _ => return Err(format!("unknown protocol {s:?} (tcp, udp or sctp)")),
        },
        Some(v) => return Err(format!("protocol must be a string, not {v}")),
    };
    let host_ip = match field(item, "hostIP") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(
            s.parse::<IpAddr>()
                .map_err(|_| format!("hostIP {s:?} is not an IP address"))?,
        ),
        Some(v) => return Err(format!("hostIP must be a string, not {v}")),
    };
    Ok(PortMapping {
        protocol,
        host_ip,
        host_port: port("hostPort")?,
        container_port: port("containerPort")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn mappings_as_runtimes_send_them() {
        let rc = json!({"portMappings": [
            {"hostPort": 54323, "containerPort": 8080, "protocol": "tcp", "hostIP": "127.0.0.1"},
            {"hostPort": 53, "containerPort": 5353, "protocol": "UDP"},
            {"hostPort": 80, "containerPort": 80, "hostIP": ""},
            // containerd's form: its Go struct's field names.
            {"ContainerPort": 8080, "HostIP": "127.0.0.1", "HostPort": 54323, "Protocol": "tcp"}
        ]});
        let got = parse(Some(&rc)).unwrap();
        assert_eq!(got.len(), 4);
        assert_eq!(got[3], got[0]);
        assert_eq!(got[0].host_ip, Some("127.0.0.1".parse().unwrap()));
        assert_eq!((got[0].host_port, got[0].container_port), (54323, 8080));
        assert_eq!(got[1].protocol, Protocol::Udp);
        assert_eq!((got[2].protocol, got[2].host_ip), (Protocol::Tcp, None));
        assert!(parse(None).unwrap().is_empty());
        assert!(parse(Some(&json!({"bandwidth": {}}))).unwrap().is_empty());
    }

    #[test]
    fn malformed_mappings_are_invalid_config() {
        for bad in [
            json!({"portMappings": {}}),
            json!({"portMappings": [{"hostPort": 0, "containerPort": 80}]}),
            json!({"portMappings": [{"hostPort": 70000, "containerPort": 80}]}),
            json!({"portMappings": [{"hostPort": 80}]}),
            json!({"portMappings": [{"hostPort": 80, "containerPort": 80, "protocol": "icmp"}]}),
            json!({"portMappings": [{"hostPort": 80, "containerPort": 80, "hostIP": "node"}]}),
            json!({"portMappings": ["80:80"]}),
        ] {
            let err = parse(Some(&bad)).unwrap_err();
            assert_eq!(err.code, crate::api::codes::INVALID_CONFIG, "{bad}");
        }
    }
}
