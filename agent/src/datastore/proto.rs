//! Kubernetes' protobuf encoding, read for the one resource where it matters: Pods. A Pod with
//! its managedFields and status is about 11 KB of JSON and 3.4 KB of protobuf, and the API
//! server encodes protobuf several times faster, so at 30,000 pods the initial state arrives in a
//! fraction of the time. Only the fields `PodWire` holds are decoded; the rest is skipped by its
//! length, as protobuf readers skip unknown fields. Pure code.
//!
//! Framing, as the API server writes it (k8s.io/apimachinery's protobuf serializer):
//! - an object is the magic `k8s\0` then a `runtime.Unknown` {1: TypeMeta {1: apiVersion,
//!   2: kind}, 2: raw (the object's own message)};
//! - a watch stream is a sequence of frames, each a 4-byte big-endian length then a
//!   `meta.v1.WatchEvent` {1: type, 2: RawExtension {1: raw (an object as above)}}.
//!
//! Field numbers are those of k8s.io/api/core/v1/generated.proto and
//! k8s.io/apimachinery/pkg/apis/meta/v1/generated.proto, stable across releases by protobuf's
//! own rule (a number is never reused).

use crate::model::wire::{ContainerPortWire, ContainerWire, PodIpWire, PodWire};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use std::collections::BTreeMap;

/// The content type to ask for: protobuf objects, and protobuf frames for watches.
pub const ACCEPT_WATCH: &str = "application/vnd.kubernetes.protobuf;stream=watch";

const MAGIC: &[u8] = b"k8s\0";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("protobuf message truncated")]
    Truncated,
    #[error("a watch frame of {0} bytes, more than any object can be")]
    FrameTooLarge(usize),
    #[error("protobuf wire type {0} is not one Kubernetes uses")]
    WireType(u64),
    #[error("field {field} has the wrong wire type")]
    FieldType { field: u32 },
    #[error("a string field is not UTF-8")]
    Utf8,
    #[error("not a Kubernetes protobuf object (no k8s magic)")]
    Magic,
    #[error("expected a {expected}, the server sent a {got}")]
    Kind { expected: &'static str, got: String },
    #[error("watch event type {0:?} is unknown")]
    EventType(String),
}

/// One field's value as the wire has it.
#[derive(Debug, Clone, Copy)]
enum Wire<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    /// Fixed-width values: no field read here has one; skipped.
    Fixed,
}

/// Reads a message's fields in order.
struct Fields<'a> {
    buf: &'a [u8],
}

fn varint(buf: &mut &[u8]) -> Result<u64, DecodeError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = buf.split_first().ok_or(DecodeError::Truncated)?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(DecodeError::Truncated)
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], DecodeError> {
    if buf.len() < n {
        return Err(DecodeError::Truncated);
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<(u32, Wire<'a>), DecodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.buf.is_empty() {
            return None;
        }
        let field = (|| {
            let key = varint(&mut self.buf)?;
            let number = (key >> 3) as u32;
            let value = match key & 7 {
                0 => Wire::Varint(varint(&mut self.buf)?),
                1 => {
                    take(&mut self.buf, 8)?;
                    Wire::Fixed
                }
                2 => {
                    let len = varint(&mut self.buf)?;
                    let len = usize::try_from(len).map_err(|_| DecodeError::Truncated)?;
                    Wire::Bytes(take(&mut self.buf, len)?)
                }
                5 => {
                    take(&mut self.buf, 4)?;
                    Wire::Fixed
                }
                other => return Err(DecodeError::WireType(other)),
            };
            Ok((number, value))
        })();
        if field.is_err() {
            // Nothing after a malformed field can be trusted.
            self.buf = &[];
        }
        Some(field)
    }
}

fn fields(buf: &[u8]) -> Fields<'_> {
    Fields { buf }
}

fn bytes(field: u32, w: Wire<'_>) -> Result<&[u8], DecodeError> {
    match w {
        Wire::Bytes(b) => Ok(b),
        _ => Err(DecodeError::FieldType { field }),
    }
}

fn string(field: u32, w: Wire<'_>) -> Result<String, DecodeError> {
    let b = bytes(field, w)?;
    std::str::from_utf8(b)
        .map(str::to_string)
        .map_err(|_| DecodeError::Utf8)
}

fn uint(field: u32, w: Wire<'_>) -> Result<u64, DecodeError> {
    match w {
        Wire::Varint(v) => Ok(v),
        _ => Err(DecodeError::FieldType { field }),
    }
}

/// An object's kind and its own message, from the `k8s\0` + `runtime.Unknown` envelope.
fn unwrap_object(buf: &[u8]) -> Result<(String, &[u8]), DecodeError> {
    let unknown = buf.strip_prefix(MAGIC).ok_or(DecodeError::Magic)?;
    let (mut kind, mut raw) = (String::new(), &[][..]);
    for f in fields(unknown) {
        match f? {
            (1, w) => {
                for tf in fields(bytes(1, w)?) {
                    if let (2, w) = tf? {
                        kind = string(2, w)?;
                    }
                }
            }
            (2, w) => raw = bytes(2, w)?,
            _ => {}
        }
    }
    Ok((kind, raw))
}

/// ObjectMeta: name 1, namespace 3, resourceVersion 6, deletionTimestamp 9, labels 11,
/// annotations 12 (read only for the watch list's end-of-initial-events bookmark).
fn decode_meta(
    buf: &[u8],
    meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    annotations: Option<&mut BTreeMap<String, String>>,
) -> Result<(), DecodeError> {
    let mut labels = BTreeMap::new();
    let mut annotations = annotations;
    for f in fields(buf) {
        match f? {
            (1, w) => meta.name = Some(string(1, w)?),
            (3, w) => meta.namespace = Some(string(3, w)?),
            (6, w) => meta.resource_version = Some(string(6, w)?),
            (9, w) => {
                bytes(9, w)?;
                // Only that it is set matters (the pod is terminating), not when.
                meta.deletion_timestamp = Some(Time(k8s_openapi::jiff::Timestamp::UNIX_EPOCH));
            }
            (11, w) => {
                let (k, v) = map_entry(bytes(11, w)?)?;
                labels.insert(k, v);
            }
            (12, w) => {
                if let Some(a) = annotations.as_deref_mut() {
                    let (k, v) = map_entry(bytes(12, w)?)?;
                    a.insert(k, v);
                }
            }
            _ => {}
        }
    }
    if !labels.is_empty() {
        meta.labels = Some(labels);
    }
    Ok(())
}

fn map_entry(buf: &[u8]) -> Result<(String, String), DecodeError> {
    let (mut k, mut v) = (String::new(), String::new());
    for f in fields(buf) {
        match f? {
            (1, w) => k = string(1, w)?,
            (2, w) => v = string(2, w)?,
            _ => {}
        }
    }
    Ok((k, v))
}

/// PodSpec: containers 2 (Container: ports 6: ContainerPort {name 1, containerPort 3,
/// protocol 4}), nodeName 10, hostNetwork 11.
fn decode_spec(buf: &[u8], pod: &mut PodWire) -> Result<(), DecodeError> {
    for f in fields(buf) {
        match f? {
            (2, w) => {
                let mut c = ContainerWire::default();
                for cf in fields(bytes(2, w)?) {
                    if let (6, w) = cf? {
                        let mut p = ContainerPortWire::default();
                        for pf in fields(bytes(6, w)?) {
                            match pf? {
                                (1, w) => p.name = Some(string(1, w)?),
                                // int32 on the wire as a varint; a negative one is invalid, and
                                // becomes a value no port conversion accepts.
                                (3, w) => {
                                    p.container_port = i32::try_from(uint(3, w)?).unwrap_or(-1)
                                }
                                (4, w) => p.protocol = Some(string(4, w)?),
                                _ => {}
                            }
                        }
                        c.ports.push(p);
                    }
                }
                pod.spec.containers.push(c);
            }
            (10, w) => pod.spec.node_name = Some(string(10, w)?),
            (11, w) => pod.spec.host_network = Some(uint(11, w)? != 0),
            _ => {}
        }
    }
    Ok(())
}

/// PodStatus: phase 1, podIP 6, podIPs 12 (PodIP {ip 1}).
fn decode_status(buf: &[u8], pod: &mut PodWire) -> Result<(), DecodeError> {
    for f in fields(buf) {
        match f? {
            (1, w) => pod.status.phase = Some(string(1, w)?),
            (6, w) => pod.status.pod_ip = Some(string(6, w)?),
            (12, w) => {
                let mut ip = PodIpWire::default();
                for pf in fields(bytes(12, w)?) {
                    if let (1, w) = pf? {
                        ip.ip = string(1, w)?;
                    }
                }
                pod.status.pod_ips.push(ip);
            }
            _ => {}
        }
    }
    Ok(())
}

/// A Pod's own message: metadata 1, spec 2, status 3.
fn decode_pod(
    buf: &[u8],
    annotations: Option<&mut BTreeMap<String, String>>,
) -> Result<PodWire, DecodeError> {
    let mut pod = PodWire::default();
    let mut annotations = annotations;
    for f in fields(buf) {
        match f? {
            (1, w) => decode_meta(bytes(1, w)?, &mut pod.metadata, annotations.as_deref_mut())?,
            (2, w) => decode_spec(bytes(2, w)?, &mut pod)?,
            (3, w) => decode_status(bytes(3, w)?, &mut pod)?,
            _ => {}
        }
    }
    Ok(pod)
}

/// A `meta.v1.Status` the server sends in an ERROR event: code 6, reason 4, message 3.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    pub code: u16,
    pub reason: String,
    pub message: String,
}

fn decode_status_object(buf: &[u8]) -> Result<Status, DecodeError> {
    let mut s = Status::default();
    for f in fields(buf) {
        match f? {
            (3, w) => s.message = string(3, w)?,
            (4, w) => s.reason = string(4, w)?,
            (6, w) => s.code = u16::try_from(uint(6, w)?).unwrap_or(u16::MAX),
            _ => {}
        }
    }
    Ok(s)
}

/// The annotation the server puts on the bookmark that ends a watch list's initial events.
const INITIAL_EVENTS_END: &str = "k8s.io/initial-events-end";

/// One event of a Pod watch.
#[derive(Debug, Clone)]
pub enum PodEvent {
    Added(PodWire),
    Modified(PodWire),
    Deleted(PodWire),
    /// The resourceVersion to resume from; `initial_end` on the bookmark that closes a watch
    /// list's initial events.
    Bookmark {
        resource_version: String,
        initial_end: bool,
    },
    Error(Status),
}

/// Decodes one watch frame (without its length prefix).
pub fn decode_pod_event(frame: &[u8]) -> Result<PodEvent, DecodeError> {
    let (mut kind, mut object) = (String::new(), &[][..]);
    for f in fields(frame) {
        match f? {
            (1, w) => kind = string(1, w)?,
            (2, w) => {
                for rf in fields(bytes(2, w)?) {
                    if let (1, w) = rf? {
                        object = bytes(1, w)?;
                    }
                }
            }
            _ => {}
        }
    }
    let (object_kind, raw) = unwrap_object(object)?;
    if kind == "ERROR" {
        return Ok(PodEvent::Error(decode_status_object(raw)?));
    }
    if object_kind != "Pod" {
        return Err(DecodeError::Kind {
            expected: "Pod",
            got: object_kind,
        });
    }
    Ok(match kind.as_str() {
        "ADDED" => PodEvent::Added(decode_pod(raw, None)?),
        "MODIFIED" => PodEvent::Modified(decode_pod(raw, None)?),
        "DELETED" => PodEvent::Deleted(decode_pod(raw, None)?),
        "BOOKMARK" => {
            let mut annotations = BTreeMap::new();
            let pod = decode_pod(raw, Some(&mut annotations))?;
            PodEvent::Bookmark {
                resource_version: pod.metadata.resource_version.unwrap_or_default(),
                initial_end: annotations.get(INITIAL_EVENTS_END).map(String::as_str)
                    == Some("true"),
            }
        }
        _ => return Err(DecodeError::EventType(kind)),
    })
}

/// Splits a watch stream into frames as bytes arrive: 4-byte big-endian length, then the frame.
#[derive(Debug, Default)]
pub struct Framer {
    buf: Vec<u8>,
    start: usize,
}

/// Frames larger than this are refused: a Pod is bounded by etcd's 1.5 MiB request limit.
const MAX_FRAME: usize = 16 << 20;

impl Framer {
    pub fn push(&mut self, data: &[u8]) {
        // Drop what was consumed before growing, so the buffer stays about one chunk long.
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > (1 << 20) {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, if one has arrived.
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, DecodeError> {
        let pending = &self.buf[self.start..];
        let Some(len) = pending.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len > MAX_FRAME {
            return Err(DecodeError::FrameTooLarge(len));
        }
        if pending.len() < 4 + len {
            return Ok(None);
        }
        let frame = self.start + 4..self.start + 4 + len;
        self.start = frame.end;
        Ok(Some(&self.buf[frame]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // A small encoder, the inverse of the reader, to build the server's messages.
    fn key(field: u32, wire: u8, out: &mut Vec<u8>) {
        put_varint(u64::from(field) << 3 | u64::from(wire), out);
    }
    fn put_varint(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
    fn msg(field: u32, body: &[u8], out: &mut Vec<u8>) {
        key(field, 2, out);
        put_varint(body.len() as u64, out);
        out.extend_from_slice(body);
    }
    fn num(field: u32, v: u64, out: &mut Vec<u8>) {
        key(field, 0, out);
        put_varint(v, out);
    }
    fn entry(field: u32, k: &str, v: &str, out: &mut Vec<u8>) {
        let mut e = Vec::new();
        msg(1, k.as_bytes(), &mut e);
        msg(2, v.as_bytes(), &mut e);
        msg(field, &e, out);
    }
    fn object(kind: &str, raw: &[u8]) -> Vec<u8> {
        let mut tm = Vec::new();
        msg(1, b"v1", &mut tm);
        msg(2, kind.as_bytes(), &mut tm);
        let mut u = MAGIC.to_vec();
        msg(1, &tm, &mut u);
        msg(2, raw, &mut u);
        msg(4, b"", &mut u);
        u
    }
    fn event(kind: &str, obj: &[u8]) -> Vec<u8> {
        let mut raw = Vec::new();
        msg(1, obj, &mut raw);
        let mut e = Vec::new();
        msg(1, kind.as_bytes(), &mut e);
        msg(2, &raw, &mut e);
        e
    }
    fn pod() -> Vec<u8> {
        let mut meta = Vec::new();
        msg(1, b"web-1", &mut meta);
        msg(3, b"shop", &mut meta);
        msg(5, b"uid-ignored", &mut meta);
        msg(6, b"42", &mut meta);
        entry(11, "app", "web", &mut meta);
        entry(12, "note", "not kept", &mut meta);
        // managedFields (17), skipped whole.
        msg(17, &[0x0a, 0x03, b'k', b'u', b'b'], &mut meta);
        let mut port = Vec::new();
        msg(1, b"http", &mut port);
        num(3, 8080, &mut port);
        msg(4, b"TCP", &mut port);
        let mut container = Vec::new();
        msg(1, b"app", &mut container);
        msg(6, &port, &mut container);
        let mut spec = Vec::new();
        msg(2, &container, &mut spec);
        msg(10, b"node-3", &mut spec);
        num(11, 0, &mut spec);
        // A fixed64 and a fixed32 field of some later release: skipped.
        key(99, 1, &mut spec);
        spec.extend_from_slice(&[0; 8]);
        key(98, 5, &mut spec);
        spec.extend_from_slice(&[0; 4]);
        let mut ip = Vec::new();
        msg(1, b"10.244.3.7", &mut ip);
        let mut status = Vec::new();
        msg(1, b"Running", &mut status);
        msg(6, b"10.244.3.7", &mut status);
        msg(12, &ip, &mut status);
        let mut p = Vec::new();
        msg(1, &meta, &mut p);
        msg(2, &spec, &mut p);
        msg(3, &status, &mut p);
        p
    }

    #[test]
    fn decodes_the_fields_the_model_reads() {
        let PodEvent::Added(p) = decode_pod_event(&event("ADDED", &object("Pod", &pod()))).unwrap()
        else {
            panic!("not an ADDED event")
        };
        let info = crate::model::PodInfo::from_wire(p.clone()).unwrap();
        assert_eq!((&*info.namespace, &*info.name), ("shop", "web-1"));
        assert_eq!(p.metadata.resource_version.as_deref(), Some("42"));
        assert!(p.metadata.annotations.is_none());
        assert_eq!(info.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(info.node.as_deref(), Some("node-3"));
        assert_eq!(
            info.ips,
            vec!["10.244.3.7".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(info.ports.len(), 1);
        assert_eq!((&*info.ports[0].name, info.ports[0].port), ("http", 8080));
        assert_eq!(info.phase, crate::model::pod::PodPhase::Running);
        assert!(!info.deleting && !info.host_network);
    }

    #[test]
    fn bookmarks_errors_and_bad_input() {
        let mut meta = Vec::new();
        msg(6, b"777", &mut meta);
        entry(12, INITIAL_EVENTS_END, "true", &mut meta);
        let mut p = Vec::new();
        msg(1, &meta, &mut p);
        let ev = decode_pod_event(&event("BOOKMARK", &object("Pod", &p))).unwrap();
        assert!(
            matches!(ev, PodEvent::Bookmark { ref resource_version, initial_end: true }
            if resource_version == "777")
        );

        let mut st = Vec::new();
        msg(3, b"too old resource version", &mut st);
        msg(4, b"Expired", &mut st);
        num(6, 410, &mut st);
        let ev = decode_pod_event(&event("ERROR", &object("Status", &st))).unwrap();
        assert!(matches!(ev, PodEvent::Error(Status { code: 410, .. })));

        let frame = event("ADDED", &object("Pod", &pod()));
        for cut in [1, 5, frame.len() / 2, frame.len() - 1] {
            assert!(decode_pod_event(&frame[..cut]).is_err(), "cut at {cut}");
        }
        assert_eq!(
            decode_pod_event(&event("ADDED", &pod())).unwrap_err(),
            DecodeError::Magic
        );
        assert!(matches!(
            decode_pod_event(&event("ADDED", &object("Node", &pod()))),
            Err(DecodeError::Kind { .. })
        ));
        assert!(matches!(
            decode_pod_event(&event("RENAMED", &object("Pod", &pod()))),
            Err(DecodeError::EventType(_))
        ));
        // A string field holding a varint.
        let mut bad = Vec::new();
        num(1, 5, &mut bad);
        assert!(decode_pod_event(&bad).is_err());
    }

    #[test]
    fn framer_splits_frames_across_chunks() {
        let frames = [event("ADDED", &object("Pod", &pod())), b"xyz".to_vec()];
        let mut stream = Vec::new();
        for f in &frames {
            stream.extend_from_slice(&(f.len() as u32).to_be_bytes());
            stream.extend_from_slice(f);
        }
        for chunk in [1, 3, 7, stream.len()] {
            let mut framer = Framer::default();
            let mut got = Vec::new();
            for part in stream.chunks(chunk) {
                framer.push(part);
                while let Some(f) = framer.next_frame().unwrap() {
                    got.push(f.to_vec());
                }
            }
            assert_eq!(got, frames, "chunks of {chunk}");
        }
        let mut framer = Framer::default();
        framer.push(&u32::MAX.to_be_bytes());
        assert!(matches!(
            framer.next_frame(),
            Err(DecodeError::FrameTooLarge(_))
        ));
    }
}
