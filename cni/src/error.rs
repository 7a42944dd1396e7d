//! The CNI error object: what every failure becomes on stdout (spec "Error" result), with the
//! well-known codes from `api::codes` and a non-zero exit status.

use crate::api::codes;
use std::fmt;

/// A failure to report to the runtime. `code` is one of `api::codes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    pub fn config(msg: impl Into<String>) -> CniError {
        CniError::new(codes::INVALID_CONFIG, msg)
    }

    pub fn env(msg: impl Into<String>) -> CniError {
        CniError::new(codes::INVALID_ENV, msg)
    }

    pub fn io(msg: impl Into<String>, err: impl fmt::Display) -> CniError {
        CniError::new(codes::IO_FAILURE, msg).details(err.to_string())
    }

    /// The spec's JSON error object, in the version the runtime asked for.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        let mut obj = serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": self.msg,
        });
        if !self.details.is_empty() {
            obj["details"] = serde_json::Value::String(self.details.clone());
        }
        obj
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "code {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

impl From<crate::api::ErrorReply> for CniError {
    fn from(reply: crate::api::ErrorReply) -> CniError {
        CniError {
            code: reply.code,
            msg: reply.msg,
            details: reply.details,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_object_has_the_spec_fields() {
        let err = CniError::new(codes::TRY_AGAIN_LATER, "agent unreachable").details("ENOENT");
        let v = err.to_json("1.0.0");
        assert_eq!(
            v,
            serde_json::json!({"cniVersion":"1.0.0","code":11,"msg":"agent unreachable","details":"ENOENT"})
        );
    }

    #[test]
    fn empty_details_are_omitted() {
        let v = CniError::config("bad").to_json("0.4.0");
        assert_eq!(v.get("details"), None);
        assert_eq!(v["code"], 7);
    }

    #[test]
    fn agent_errors_keep_their_code() {
        let err: CniError = crate::api::ErrorReply {
            code: codes::IPAM_EXHAUSTED,
            msg: "pool full".into(),
            details: String::new(),
        }
        .into();
        assert_eq!(err.code, 100);
    }
}
