//! CNI spec versions this plugin speaks, and which commands and result fields each one has.
//! Every answer is rendered in the version the runtime's config asked for.

use crate::api::codes;
use crate::error::CniError;
use std::fmt;

/// A CNI spec version Sepal supports. Ordered, so `v >= CniVersion::V0_4_0` reads as in the spec.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

/// Every version we accept, oldest first, as printed by VERSION.
pub const SUPPORTED: [CniVersion; 5] = [
    CniVersion::V0_3_0,
    CniVersion::V0_3_1,
    CniVersion::V0_4_0,
    CniVersion::V1_0_0,
    CniVersion::V1_1_0,
];

impl CniVersion {
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// Parses a config's `cniVersion`; anything we do not speak is the spec's error 1.
    pub fn parse(text: &str) -> Result<CniVersion, CniError> {
        SUPPORTED
            .iter()
            .copied()
            .find(|v| v.as_str() == text)
            .ok_or_else(|| {
                CniError::new(
                    codes::INCOMPATIBLE_VERSION,
                    format!("incompatible CNI version {text:?}"),
                )
                .details(format!("sepal-cni supports {}", supported_list()))
            })
    }

    /// CHECK exists from 0.4.0 on.
    pub fn has_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// STATUS and GC exist from 1.1.0 on.
    pub fn has_status_and_gc(self) -> bool {
        self >= CniVersion::V1_1_0
    }

    /// Results before 1.0.0 carry `"version": "4"|"6"` in each `ips` entry.
    pub fn ip_has_version_field(self) -> bool {
        self < CniVersion::V1_0_0
    }

    /// 1.1.0 added `mtu` to result interfaces.
    pub fn interface_has_mtu(self) -> bool {
        self >= CniVersion::V1_1_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `MAJOR.MINOR.PATCH` with decimal parts.
fn looks_like_version(text: &str) -> bool {
    let parts: Vec<&str> = text.split('.').collect();
    parts.len() == 3
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.len() <= 5 && p.bytes().all(|b| b.is_ascii_digit()))
}

fn supported_list() -> String {
    SUPPORTED
        .iter()
        .map(|v| v.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The VERSION answer. Spec: `cniVersion` is the value given on input (any version string,
/// even one we do not speak: `supportedVersions` tells); ours when none or not a version.
pub fn version_answer(asked: Option<&str>) -> serde_json::Value {
    let version = asked
        .filter(|v| looks_like_version(v))
        .unwrap_or(CniVersion::LATEST.as_str());
    serde_json::json!({
        "cniVersion": version,
        "supportedVersions": SUPPORTED.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_supported_version() {
        for v in SUPPORTED {
            assert_eq!(CniVersion::parse(v.as_str()).unwrap(), v);
        }
    }

    #[test]
    fn rejects_old_and_unknown_versions_with_code_1() {
        for text in ["0.1.0", "0.2.0", "1.2.0", "", "one", "1.0"] {
            let err = CniVersion::parse(text).unwrap_err();
            assert_eq!(err.code, codes::INCOMPATIBLE_VERSION, "{text}");
            assert!(err.details.contains("1.1.0"));
        }
    }

    #[test]
    fn command_availability_follows_the_spec() {
        assert!(!CniVersion::V0_3_1.has_check());
        assert!(CniVersion::V0_4_0.has_check());
        assert!(!CniVersion::V1_0_0.has_status_and_gc());
        assert!(CniVersion::V1_1_0.has_status_and_gc());
        assert!(CniVersion::V0_4_0.ip_has_version_field());
        assert!(!CniVersion::V1_0_0.ip_has_version_field());
    }

    #[test]
    fn version_answer_echoes_the_asked_version() {
        let v = version_answer(Some("0.4.0"));
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(
            v["supportedVersions"],
            serde_json::json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
        assert_eq!(version_answer(None)["cniVersion"], "1.1.0");
        assert_eq!(version_answer(Some("0.2.0"))["cniVersion"], "0.2.0");
        assert_eq!(version_answer(Some("garbage"))["cniVersion"], "1.1.0");
        assert_eq!(version_answer(Some("1.1"))["cniVersion"], "1.1.0");
    }
}
