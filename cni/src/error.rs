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

    /// The spec's JSON error object, in the version the runtime asked for. `msg` and `details`
    /// are clipped (`MAX_MSG`, `MAX_DETAILS`): errors quote the input they reject, and a runtime
    /// logs and stores what it gets, so a 1 MB config must not come back as a 1 MB error.
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        let mut obj = serde_json::json!({
            "cniVersion": cni_version,
            "code": self.code,
            "msg": clip(&self.msg, MAX_MSG),
        });
        if !self.details.is_empty() {
            obj["details"] = serde_json::Value::String(clip(&self.details, MAX_DETAILS));
        }
        obj
    }
}

/// Most bytes `msg` takes in the error object (as a JSON string, quotes excluded).
pub const MAX_MSG: usize = 1024;
/// Most bytes `details` takes in the error object.
pub const MAX_DETAILS: usize = 2048;

/// `text`, cut so that it takes at most `max` bytes as a JSON string (escapes counted), at a
/// character boundary and ending in `…` when cut.
pub fn clip(text: &str, max: usize) -> String {
    let width = |c: char| match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{8}' | '\u{c}' => 2,
        c if (c as u32) < 0x20 => 6,
        c => c.len_utf8(),
    };
    if text.chars().map(width).sum::<usize>() <= max {
        return text.to_string();
    }
    let mut out = String::new();
    let mut used = 0;
    for c in text.chars() {
        // Room for the `…` (3 bytes) that marks the cut.
        if used + width(c) > max.saturating_sub(3) {
            break;
        }
        used += width(c);
        out.push(c);
    }
    out.push('…');
    out
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
    fn long_messages_are_clipped_on_stdout() {
        // `ipam` and serde's messages quote the input: a large config came back whole (and
        // larger, escaped) in the error object, past the fuzz target's 4 KiB bound.
        let big = "\"\u{1}é".repeat(10_000);
        let err = CniError::config(format!("unsupported field: {big}")).details(big.clone());
        let text = err.to_json("1.1.0").to_string();
        assert!(
            text.len() <= MAX_MSG + MAX_DETAILS + 100,
            "{} bytes",
            text.len()
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(v["msg"].as_str().unwrap().ends_with('…'));
        assert!(v["msg"]
            .as_str()
            .unwrap()
            .starts_with("unsupported field: "));
        assert_eq!(clip("short", 10), "short");
        assert_eq!(clip("abcdefghijk", 10), "abcdefg…");
        assert_eq!(
            err.msg.len(),
            "unsupported field: ".len() + big.len(),
            "kept whole in memory"
        );
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
