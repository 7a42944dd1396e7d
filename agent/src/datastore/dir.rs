//! The dir datastore: every *.yaml/*.yml/*.json under a directory (recursively, multi-document
//! YAML allowed) is the cluster; changes seen by inotify become upsert/delete events.
//!
//! Each file keeps its last good content: a file that fails to parse is logged with file and line
//! and ignored, and what it held before stays in force until it parses again or is removed.
//! Writers that write a temp file and rename it over the old one are just another change.

use crate::model::{Event, Object, ObjectKey};
use anyhow::{Context, Result};
use notify::{RecursiveMode, Watcher};
use sepal_cni::error::clip;
use serde_json::Value;
use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;

/// Quiet time after a change before rescanning: a burst of writes (an editor, `kubectl`-style
/// temp+rename, a `cp -r`) becomes one rescan. Short, because a Pod's new address waits for it on
/// every other node; a file caught half-written fails to parse, keeps its last good content, and
/// is read again on the write event that completes it.
const DEBOUNCE: Duration = Duration::from_millis(10);
/// A full rescan this often even without inotify events, in case a watch was lost (directory
/// replaced, queue overflow).
const RESCAN: Duration = Duration::from_secs(30);
/// Directory depth limit: protects against symlink loops.
const MAX_DEPTH: usize = 16;

/// Most bytes of a `FileError`'s message: messages quote what they refuse (a whole document,
/// escaped), and one log line should not carry a file.
pub const MAX_MESSAGE: usize = 1024;

/// Why a file was not loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}: {msg}", path.display())]
pub struct FileError {
    pub path: PathBuf,
    /// 1-based line of the problem (of the document holding it when the parser gives no line).
    pub line: usize,
    pub msg: String,
}

/// Enough of a file's metadata to tell it changed without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime_ns: i128,
}

#[derive(Debug)]
struct FileState {
    stamp: Stamp,
    /// The objects of the last version of this file that parsed.
    objects: Vec<Object>,
}

/// The directory's current state and the means to diff a rescan against it.
pub struct DirSource {
    root: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
    merged: BTreeMap<ObjectKey, Object>,
    /// Rescans so far (shared, so a test can watch a running source).
    rescans: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml" | "json")
    )
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn walk(dir: &Path, depth: usize, out: &mut Vec<(PathBuf, Stamp)>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            tracing::warn!(dir = %dir.display(), "cannot read datastore directory: {e}");
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        // Dot-files are editor swap files, temp files of atomic writers, ConfigMap `..data` dirs.
        if is_hidden(&path) {
            continue;
        }
        let Ok(meta) = std::fs::metadata(&path) else {
            continue; // removed meanwhile, or a dangling symlink
        };
        if meta.is_dir() {
            if depth < MAX_DEPTH {
                walk(&path, depth + 1, out);
            }
        } else if meta.is_file() && is_manifest(&path) {
            let stamp = Stamp {
                ino: meta.ino(),
                len: meta.len(),
                mtime_ns: meta.mtime() as i128 * 1_000_000_000 + meta.mtime_nsec() as i128,
            };
            out.push((path, stamp));
        }
    }
}

/// Splits YAML text into documents at `---` lines, with the 0-based line each starts at.
fn yaml_documents(text: &str) -> Vec<(usize, String)> {
    let mut docs = vec![(0usize, String::new())];
    for (i, line) in text.lines().enumerate() {
        let marker = line == "---"
            || line.starts_with("--- ")
            || line.starts_with("---\t")
            || line.starts_with("---#");
        if marker {
            // Content after the marker on the same line belongs to the new document.
            docs.push((i, format!("{}\n", &line[3..])));
        } else if line == "..." {
            docs.push((i + 1, String::new()));
        } else if let Some(last) = docs.last_mut() {
            last.1.push_str(line);
            last.1.push('\n');
        }
    }
    docs
}

/// The objects in one manifest file's text. A JSON file holds one object (or a `List` of them);
/// a YAML file holds any number of documents, each an object or a `List`.
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<Object>, FileError> {
    let err = |line: usize, msg: String| FileError {
        path: path.to_path_buf(),
        line,
        msg: clip(&msg, MAX_MESSAGE),
    };
    let mut values = Vec::new();
    if path.extension().and_then(|e| e.to_str()) == Some("json") {
        let v: Value = serde_json::from_str(text).map_err(|e| err(e.line(), e.to_string()))?;
        values.push((1, v));
    } else {
        for (start, doc) in yaml_documents(text) {
            let v: Value = serde_norway::from_str(&doc).map_err(|e| {
                // From the byte offset, not the parser's line: YAML also breaks lines at a lone
                // CR (and NEL, LS, PS), which no editor here shows as one.
                let line = e.location().map_or(1, |l| {
                    let before = &doc.as_bytes()[..l.index().min(doc.len())];
                    1 + before.iter().filter(|b| **b == b'\n').count()
                });
                err(start + line, e.to_string())
            })?;
            if !v.is_null() {
                // Report problems inside the document at its first non-blank line.
                let first = doc
                    .lines()
                    .position(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
                    .unwrap_or(0);
                values.push((start + first + 1, v));
            }
        }
    }
    let mut objects = Vec::new();
    for (line, value) in values {
        let items = if value.get("kind").and_then(Value::as_str) == Some("List") {
            match value.get("items") {
                Some(Value::Array(items)) => items.clone(),
                _ => return Err(err(line, "List without an items array".into())),
            }
        } else {
            vec![value]
        };
        for item in items {
            if !item.is_object() {
                return Err(err(line, format!("expected an object, found {item}")));
            }
            // Stripped as the Kubernetes datastore strips, so both give the same model.
            let obj = Object::from_value(item)
                .map(super::kube::strip)
                .map_err(|e| err(line, e.to_string()))?;
            objects.push(obj);
        }
    }
    Ok(objects)
}

impl DirSource {
    /// A source for `root`, which must be a directory.
    pub fn new(root: PathBuf) -> Result<DirSource> {
        let meta = std::fs::metadata(&root)
            .with_context(|| format!("datastore directory {}", root.display()))?;
        if !meta.is_dir() {
            anyhow::bail!("datastore {} is not a directory", root.display());
        }
        Ok(DirSource {
            root,
            files: BTreeMap::new(),
            merged: BTreeMap::new(),
            rescans: Default::default(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Rereads what changed on disk and returns the events that turn the previous state into the
    /// new one. Files that fail to parse are logged and keep their last good objects.
    pub fn rescan(&mut self) -> Vec<Event> {
        self.rescans
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut found = Vec::new();
        walk(&self.root, 0, &mut found);
        let mut files = BTreeMap::new();
        for (path, stamp) in found {
            let previous = self.files.remove(&path);
            if let Some(prev) = previous.as_ref().filter(|p| p.stamp == stamp) {
                files.insert(
                    path,
                    FileState {
                        stamp,
                        objects: prev.objects.clone(),
                    },
                );
                continue;
            }
            let parsed = std::fs::read_to_string(&path)
                .map_err(|e| FileError {
                    path: path.clone(),
                    line: 0,
                    msg: e.to_string(),
                })
                .and_then(|text| parse_file(&path, &text));
            let objects = match parsed {
                Ok(objects) => objects,
                Err(e) => {
                    let kept = previous.as_ref().map_or(0, |p| p.objects.len());
                    tracing::error!(
                        file = %e.path.display(),
                        line = e.line,
                        "ignoring datastore file that does not parse ({kept} objects from its last good version stay in force): {e}"
                    );
                    previous.map(|p| p.objects).unwrap_or_default()
                }
            };
            files.insert(path, FileState { stamp, objects });
        }
        // Whatever is left in self.files was removed from disk.
        self.files = files;

        let mut merged: BTreeMap<ObjectKey, Object> = BTreeMap::new();
        for (path, state) in &self.files {
            for obj in &state.objects {
                let key = obj.key();
                if merged.contains_key(&key) {
                    tracing::warn!(file = %path.display(), "{key} is defined in more than one file; the last one (by path) wins");
                }
                merged.insert(key, obj.clone());
            }
        }
        let mut events = Vec::new();
        for key in self.merged.keys() {
            if !merged.contains_key(key) {
                events.push(Event::Delete(key.clone()));
            }
        }
        for (key, obj) in &merged {
            if self.merged.get(key) != Some(obj) {
                events.push(Event::Upsert(obj.clone()));
            }
        }
        self.merged = merged;
        events
    }
}

/// Feeds `tx`: the initial state, `Synced`, then live changes, until the receiver goes away.
pub async fn run(mut source: DirSource, tx: mpsc::Sender<Event>) {
    let (wake_tx, mut wake_rx) = mpsc::unbounded_channel::<()>();
    // The watcher lives as long as this task; its callback runs on notify's own thread.
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        match &res {
            // Reads change nothing, and a rescan's own reads would wake the next rescan: the
            // loop would rescan at rest, one debounce apart.
            Ok(event) if event.kind.is_access() => return,
            Ok(_) => {}
            Err(e) => tracing::warn!("datastore watch: {e}"),
        }
        let _ = wake_tx.send(());
    });
    let _watcher = match watcher {
        Ok(mut w) => match w.watch(source.root(), RecursiveMode::Recursive) {
            Ok(()) => Some(w),
            Err(e) => {
                tracing::error!(dir = %source.root().display(), "cannot watch datastore directory, rescanning every {}s instead: {e}", RESCAN.as_secs());
                None
            }
        },
        Err(e) => {
            tracing::error!("cannot create a file watcher: {e}");
            None
        }
    };
    for event in source.rescan() {
        if tx.send(event).await.is_err() {
            return;
        }
    }
    if tx.send(Event::Synced).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            woke = wake_rx.recv() => {
                if woke.is_none() {
                    // The watcher is gone: fall back to periodic rescans.
                    tokio::time::sleep(RESCAN).await;
                }
                // Debounce: wait until the directory has been quiet for a moment.
                while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, wake_rx.recv()).await {}
            }
            _ = tokio::time::sleep(RESCAN) => {}
            _ = tx.closed() => return,
        }
        for event in source.rescan() {
            if tx.send(event).await.is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    const NODE: &str =
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\nspec:\n  podCIDRs: [10.0.0.0/24]\n";

    fn names(events: &[Event]) -> Vec<String> {
        events
            .iter()
            .map(|e| match e {
                Event::Upsert(o) => format!("+{}", o.key()),
                Event::Delete(k) => format!("-{k}"),
                Event::Synced => "synced".into(),
                Event::ListStart(_) | Event::ListEnd(_) => "list".into(),
            })
            .collect()
    }

    #[test]
    fn multi_document_yaml_and_json() {
        let text = format!(
            "# a comment\n{NODE}---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: web\n---\n---\napiVersion: sepal.dev/v1\nkind: BGPPeer\nmetadata:\n  name: tor\n"
        );
        let objs = parse_file(Path::new("a.yaml"), &text).unwrap();
        assert_eq!(objs.len(), 3);
        assert!(matches!(objs[0], Object::Node(_)));
        assert!(matches!(objs[2], Object::Other(..)));
        let json = r#"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p","namespace":"web"}}]}"#;
        let objs = parse_file(Path::new("b.json"), json).unwrap();
        assert_eq!(objs[0].key().to_string(), "Pod web/p");
    }

    #[test]
    fn cluster_network_policies_are_read_and_stripped() {
        let text = "apiVersion: policy.networking.k8s.io/v1beta1\nkind: ClusterNetworkPolicy\n\
            metadata:\n  name: deny-db\n  generation: 4\n  uid: x\n  annotations:\n    \
            kubectl.kubernetes.io/last-applied-configuration: '{}'\n\
            spec:\n  tier: Admin\n  priority: 0\n  subject: {namespaces: {}}\n  \
            egress: [{action: Deny, to: [{networks: [10.0.0.0/8]}]}]\n";
        let objs = parse_file(Path::new("cnp.yaml"), text).unwrap();
        let [Object::ClusterNetworkPolicy(p)] = &objs[..] else {
            panic!("{objs:?}")
        };
        assert_eq!(objs[0].key().to_string(), "ClusterNetworkPolicy deny-db");
        assert_eq!(p.spec.egress.as_ref().map(Vec::len), Some(1));
        // As the Kubernetes datastore keeps it: the generation (the status writer's), no uid,
        // no kubectl copy.
        assert_eq!(p.metadata.generation, Some(4));
        assert!(p.metadata.uid.is_none() && p.metadata.annotations.is_none());
        // A field of the wrong type names the file, the line and the policy.
        let bad = text.replace("priority: 0", "priority: [0]");
        let e = parse_file(Path::new("cnp.yaml"), &bad).unwrap_err();
        assert_eq!(e.line, 1, "{e}");
        assert!(e.msg.contains("ClusterNetworkPolicy deny-db"), "{e}");
    }

    #[test]
    fn errors_name_file_and_line() {
        let text = format!("{NODE}---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: [unclosed\n");
        let e = parse_file(Path::new("x.yaml"), &text).unwrap_err();
        assert_eq!(e.path, Path::new("x.yaml"));
        assert!(
            e.line >= 10,
            "line {} should point into the second document",
            e.line
        );
        assert!(e.to_string().starts_with("x.yaml:"), "{e}");
        // A type error (not syntax) points at the document.
        let bad = format!("{NODE}---\n\napiVersion: v1\nkind: Node\nmetadata:\n  name: n2\nspec:\n  podCIDRs: 7\n");
        let e = parse_file(Path::new("y.yml"), &bad).unwrap_err();
        assert_eq!(e.line, 9, "{e}");
        let e = parse_file(Path::new("z.json"), "{\n\"a\": \n}").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        // Found by the agent/datastore_file fuzz target: a lone CR is a line break to YAML, so
        // the parser's line pointed past the end of this two-line file.
        let e = parse_file(Path::new("cr.yaml"), "# x\n{\"a\r`").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
        let e = parse_file(Path::new("cr.yaml"), "a: 1\r\nb: [\r\n").unwrap_err();
        assert_eq!(e.line, 3, "{e}");
    }

    #[test]
    fn error_messages_are_bounded() {
        // Caught by the agent/datastore_file fuzz target's 4 KiB bound: "expected an object,
        // found …" and serde's messages quoted the document whole, escaped (1.5 times its size).
        let text = format!("- \"{}\"\n", "\\x01".repeat(2000));
        let e = parse_file(Path::new("big.yaml"), &text).unwrap_err();
        assert!(e.msg.len() <= MAX_MESSAGE, "{} bytes", e.msg.len());
        assert!(e.msg.starts_with("expected an object, found [") && e.msg.ends_with('…'));
    }

    #[test]
    fn rescan_diffs_and_keeps_last_good_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = DirSource::new(dir.path().to_path_buf()).unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("sub/node.yaml"), NODE).unwrap();
        fs::write(dir.path().join("notes.txt"), "not a manifest").unwrap();
        assert_eq!(names(&src.rescan()), vec!["+Node n1"]);
        assert!(src.rescan().is_empty(), "nothing changed");

        // Broken file: no events, the node stays.
        fs::write(dir.path().join("sub/node.yaml"), "kind: [").unwrap();
        assert!(src.rescan().is_empty());
        assert_eq!(src.merged.len(), 1);

        // Temp file + rename over the broken one, with a change.
        let changed = NODE.replace("10.0.0.0/24", "10.0.1.0/24");
        fs::write(dir.path().join(".node.yaml.tmp"), &changed).unwrap();
        fs::rename(
            dir.path().join(".node.yaml.tmp"),
            dir.path().join("sub/node.yaml"),
        )
        .unwrap();
        assert_eq!(names(&src.rescan()), vec!["+Node n1"]);

        // Removal deletes.
        fs::remove_file(dir.path().join("sub/node.yaml")).unwrap();
        assert_eq!(names(&src.rescan()), vec!["-Node n1"]);
    }

    #[tokio::test]
    async fn watches_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let src = DirSource::new(dir.path().to_path_buf()).unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(run(src, tx));
        assert_eq!(rx.recv().await, Some(Event::Synced));
        fs::write(
            dir.path().join("n.json"),
            serde_json::to_string(&serde_norway::from_str::<Value>(NODE).unwrap()).unwrap(),
        )
        .unwrap();
        let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(names(&[ev]), vec!["+Node n1"]);
        drop(rx);
        task.abort();
    }

    /// A rescan reads every file; those reads must not wake the next one (it used to rescan
    /// about 80 times a second at rest).
    #[tokio::test]
    async fn rests_when_nothing_changes() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("n.yaml"), NODE).unwrap();
        let src = DirSource::new(dir.path().to_path_buf()).unwrap();
        let rescans = src.rescans.clone();
        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(run(src, tx));
        while rx.recv().await != Some(Event::Synced) {}
        tokio::time::sleep(Duration::from_millis(300)).await;
        let before = rescans.load(std::sync::atomic::Ordering::Relaxed);
        tokio::time::sleep(Duration::from_secs(1)).await;
        let after = rescans.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            after - before <= 1,
            "{} rescans in a second at rest",
            after - before
        );
        // And a change is still seen.
        fs::write(dir.path().join("n.yaml"), NODE.replace("n1", "n2")).unwrap();
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let ev = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .unwrap()
                .unwrap();
            seen.extend(names(&[ev]));
        }
        seen.sort();
        assert_eq!(seen, vec!["+Node n2", "-Node n1"]);
        task.abort();
    }
}
