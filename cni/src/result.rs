//! CNI results: one version-independent model, rendered in the version the runtime asked for
//! (0.3.x/0.4.0 carry `ips[].version`, 1.1.0 adds interface `mtu`), and parsed from `prevResult`.

use crate::error::CniError;
use crate::version::CniVersion;
use serde::Deserialize;
use serde_json::{json, Map, Value};
use std::net::IpAddr;
use std::str::FromStr;

/// An address with prefix length, as results write it (`10.1.2.3/32`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpPrefix {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl IpPrefix {
    pub fn host(addr: IpAddr) -> IpPrefix {
        let prefix = if addr.is_ipv4() { 32 } else { 128 };
        IpPrefix { addr, prefix }
    }
}

impl std::fmt::Display for IpPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpPrefix {
    type Err = String;
    fn from_str(text: &str) -> Result<IpPrefix, String> {
        let (addr, prefix) = text
            .split_once('/')
            .ok_or_else(|| format!("{text:?} is not address/prefix"))?;
        let addr: IpAddr = addr.parse().map_err(|_| format!("{text:?}: bad address"))?;
        let prefix: u8 = prefix
            .parse()
            .map_err(|_| format!("{text:?}: bad prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("{text:?}: prefix length over {max}"));
        }
        Ok(IpPrefix { addr, prefix })
    }
}

impl<'de> Deserialize<'de> for IpPrefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<IpPrefix, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Interface {
    pub name: String,
    #[serde(default)]
    pub mac: Option<String>,
    #[serde(default)]
    pub mtu: Option<u32>,
    #[serde(default)]
    pub sandbox: Option<String>,
    #[serde(default)]
    pub socket_path: Option<String>,
    #[serde(default, rename = "pciID")]
    pub pci_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct IpConfig {
    pub address: IpPrefix,
    #[serde(default)]
    pub gateway: Option<IpAddr>,
    /// Index into `interfaces`.
    #[serde(default)]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Route {
    pub dst: IpPrefix,
    #[serde(default)]
    pub gw: Option<IpAddr>,
    /// 1.1.0 optional fields, kept verbatim when passing a prevResult through.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Dns {
    #[serde(default)]
    pub nameservers: Vec<String>,
    #[serde(default)]
    pub domain: Option<String>,
    #[serde(default)]
    pub search: Vec<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

impl Dns {
    fn to_json(&self) -> Value {
        let mut obj = Map::new();
        if !self.nameservers.is_empty() {
            obj.insert("nameservers".into(), json!(self.nameservers));
        }
        if let Some(domain) = &self.domain {
            obj.insert("domain".into(), json!(domain));
        }
        if !self.search.is_empty() {
            obj.insert("search".into(), json!(self.search));
        }
        if !self.options.is_empty() {
            obj.insert("options".into(), json!(self.options));
        }
        Value::Object(obj)
    }
}

/// A CNI result independent of the spec version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct CniResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

impl CniResult {
    /// Parses a `prevResult` of any supported version (0.3.x/0.4.0 `ips[].version` is ignored:
    /// the address says it).
    pub fn from_prev(value: &Value) -> Result<CniResult, CniError> {
        let result = CniResult::deserialize(value).map_err(|e| {
            CniError::new(
                crate::api::codes::DECODE_FAILURE,
                "cannot decode prevResult",
            )
            .details(e.to_string())
        })?;
        for ip in &result.ips {
            if ip.interface.is_some_and(|i| i >= result.interfaces.len()) {
                return Err(CniError::new(
                    crate::api::codes::DECODE_FAILURE,
                    format!(
                        "prevResult: ip {} points at a missing interface",
                        ip.address
                    ),
                ));
            }
        }
        Ok(result)
    }

    /// Appends `other` after this result's entries, shifting its interface indexes (a plugin
    /// chained after another passes the earlier result on).
    pub fn append(&mut self, other: CniResult) {
        let offset = self.interfaces.len();
        self.interfaces.extend(other.interfaces);
        self.ips.extend(other.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + offset);
            ip
        }));
        self.routes.extend(other.routes);
        if self.dns == Dns::default() {
            self.dns = other.dns;
        }
    }

    /// The result as printed for `version`.
    pub fn to_json(&self, version: CniVersion) -> Value {
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut obj = Map::new();
                obj.insert("name".into(), json!(i.name));
                if let Some(mac) = &i.mac {
                    obj.insert("mac".into(), json!(mac));
                }
                if version.interface_has_mtu() {
                    if let Some(mtu) = i.mtu {
                        obj.insert("mtu".into(), json!(mtu));
                    }
                    if let Some(p) = &i.socket_path {
                        obj.insert("socketPath".into(), json!(p));
                    }
                    if let Some(p) = &i.pci_id {
                        obj.insert("pciID".into(), json!(p));
                    }
                }
                if let Some(sandbox) = &i.sandbox {
                    obj.insert("sandbox".into(), json!(sandbox));
                }
                Value::Object(obj)
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut obj = Map::new();
                if version.ip_has_version_field() {
                    let family = if ip.address.addr.is_ipv4() { "4" } else { "6" };
                    obj.insert("version".into(), json!(family));
                }
                obj.insert("address".into(), json!(ip.address.to_string()));
                if let Some(gw) = ip.gateway {
                    obj.insert("gateway".into(), json!(gw.to_string()));
                }
                if let Some(i) = ip.interface {
                    obj.insert("interface".into(), json!(i));
                }
                Value::Object(obj)
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut obj = Map::new();
                obj.insert("dst".into(), json!(r.dst.to_string()));
                if let Some(gw) = r.gw {
                    obj.insert("gw".into(), json!(gw.to_string()));
                }
                if version >= CniVersion::V1_1_0 {
                    for (k, v) in &r.extra {
                        obj.insert(k.clone(), v.clone());
                    }
                }
                Value::Object(obj)
            })
            .collect();
        json!({
            "cniVersion": version.as_str(),
            "interfaces": interfaces,
            "ips": ips,
            "routes": routes,
            "dns": self.dns.to_json(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "sep0123456789a".into(),
                    mac: Some("ee:ee:ee:ee:ee:ee".into()),
                    mtu: Some(1450),
                    ..Default::default()
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("02:00:00:00:00:01".into()),
                    mtu: Some(1450),
                    sandbox: Some("/run/netns/p".into()),
                    ..Default::default()
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.244.1.5/32".parse().unwrap(),
                    gateway: Some("169.254.1.1".parse().unwrap()),
                    interface: Some(1),
                },
                IpConfig {
                    address: "fd00::5/128".parse().unwrap(),
                    gateway: Some("fe80::ecee:eeff:feee:eeee".parse().unwrap()),
                    interface: Some(1),
                },
            ],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("169.254.1.1".parse().unwrap()),
                extra: Map::new(),
            }],
            dns: Dns {
                nameservers: vec!["10.96.0.10".into()],
                ..Default::default()
            },
        }
    }

    #[test]
    fn renders_1_1_0_with_mtu_and_without_ip_version() {
        let v = sample().to_json(CniVersion::V1_1_0);
        assert_eq!(v["cniVersion"], "1.1.0");
        assert_eq!(v["interfaces"][0]["mtu"], 1450);
        assert_eq!(v["interfaces"][1]["sandbox"], "/run/netns/p");
        assert_eq!(v["interfaces"][0].get("sandbox"), None);
        assert_eq!(v["ips"][0].get("version"), None);
        assert_eq!(v["ips"][0]["address"], "10.244.1.5/32");
        assert_eq!(v["ips"][0]["gateway"], "169.254.1.1");
        assert_eq!(v["ips"][0]["interface"], 1);
        assert_eq!(
            v["routes"][0],
            json!({"dst":"0.0.0.0/0","gw":"169.254.1.1"})
        );
        assert_eq!(v["dns"], json!({"nameservers":["10.96.0.10"]}));
    }

    #[test]
    fn renders_1_0_0_without_interface_mtu() {
        let v = sample().to_json(CniVersion::V1_0_0);
        assert_eq!(v["cniVersion"], "1.0.0");
        assert_eq!(v["interfaces"][0].get("mtu"), None);
        assert_eq!(v["ips"][1].get("version"), None);
    }

    #[test]
    fn renders_0_3_and_0_4_with_ip_version() {
        for version in [CniVersion::V0_3_0, CniVersion::V0_3_1, CniVersion::V0_4_0] {
            let v = sample().to_json(version);
            assert_eq!(v["cniVersion"], version.as_str());
            assert_eq!(v["ips"][0]["version"], "4");
            assert_eq!(v["ips"][1]["version"], "6");
            assert_eq!(v["ips"][1]["interface"], 1);
            assert_eq!(v["interfaces"][0].get("mtu"), None);
        }
    }

    #[test]
    fn prev_results_of_every_version_parse_back() {
        for version in crate::version::SUPPORTED {
            let text = sample().to_json(version);
            let back = CniResult::from_prev(&text).unwrap();
            assert_eq!(back.ips, sample().ips);
            assert_eq!(back.interfaces[1].sandbox.as_deref(), Some("/run/netns/p"));
        }
    }

    #[test]
    fn bad_prev_results_are_decode_errors() {
        for bad in [
            json!({"ips":[{"address":"10.0.0.1"}]}),
            json!({"ips":[{"address":"10.0.0.1/33"}]}),
            json!({"ips":[{"address":"10.0.0.1/32","interface":3}],"interfaces":[]}),
            json!({"interfaces":"eth0"}),
        ] {
            let err = CniResult::from_prev(&bad).unwrap_err();
            assert_eq!(err.code, crate::api::codes::DECODE_FAILURE, "{bad}");
        }
    }

    #[test]
    fn append_shifts_interface_indexes() {
        let mut prev = CniResult {
            interfaces: vec![Interface {
                name: "lo".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        prev.append(sample());
        assert_eq!(prev.interfaces.len(), 3);
        assert_eq!(prev.ips[0].interface, Some(2));
        assert_eq!(prev.dns.nameservers, vec!["10.96.0.10".to_string()]);
    }

    #[test]
    fn route_extras_only_in_1_1_0() {
        let prev = json!({"routes":[{"dst":"10.0.0.0/8","gw":"10.0.0.1","mtu":1400,"table":100}]});
        let r = CniResult::from_prev(&prev).unwrap();
        assert_eq!(r.to_json(CniVersion::V1_1_0)["routes"][0]["table"], 100);
        assert_eq!(
            r.to_json(CniVersion::V1_0_0)["routes"][0].get("table"),
            None
        );
    }
}
