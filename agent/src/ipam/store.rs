//! IPAM persistence: the state lives in `<state-dir>/ipam.json`, replaced crash-safe on every
//! change (write a temp file, fsync it, rename it over, fsync the directory).
//!
//! A change is computed on a copy and only becomes the in-memory state once it is on disk, so
//! what the agent has handed out is always a subset of what a restart will load.

use super::{Allocation, Claim, IpamError, IpamState};
use ipnetwork::IpNetwork;
use sepal_cni::api::AttachmentKey;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const FILE: &str = "ipam.json";
const TEMP: &str = ".ipam.json.tmp";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error("saving IPAM state to {path}: {source}")]
    Save {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("loading IPAM state from {path}: {msg} (fix or move the file away; starting empty could hand out addresses twice)")]
    Load { path: PathBuf, msg: String },
}

/// The IPAM state and the file it is kept in.
#[derive(Debug)]
pub struct Ipam {
    state: IpamState,
    dir: PathBuf,
}

/// Writes `bytes` to `dir/name` so that a crash at any point leaves either the old or the new
/// content, never a mix (temp file, rename), and fsyncs the file before the rename and the
/// directory after it, so the change survives a power loss too.
fn write_replace(dir: &Path, name: &str, temp: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(temp);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()?;
    Ok(())
}

impl Ipam {
    /// Loads the state from `dir` (created if missing); no file means a fresh node.
    pub fn load(dir: &Path) -> Result<Ipam, StoreError> {
        let path = dir.join(FILE);
        let load_err = |msg: String| StoreError::Load {
            path: path.clone(),
            msg,
        };
        fs::create_dir_all(dir).map_err(|e| load_err(format!("creating the directory: {e}")))?;
        let state = match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| load_err(e.to_string()))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => IpamState::default(),
            Err(e) => return Err(load_err(e.to_string())),
        };
        // A temp file is a write that crashed before its rename: the old file is the truth.
        let _ = fs::remove_file(dir.join(TEMP));
        Ok(Ipam {
            state,
            dir: dir.to_path_buf(),
        })
    }

    pub fn state(&self) -> &IpamState {
        &self.state
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(FILE)
    }

    /// Applies `change` to a copy, persists the copy durably, then adopts it. When the change
    /// fails or saving fails, nothing changes. Releases are durable too: a release lost to a
    /// power loss would bring back an allocation whose pod is gone, kept until something
    /// notices.
    fn commit<R>(
        &mut self,
        change: impl FnOnce(&mut IpamState) -> Result<R, IpamError>,
    ) -> Result<R, StoreError> {
        let mut next = self.state.clone();
        let out = change(&mut next)?;
        if next != self.state {
            let bytes = serde_json::to_vec_pretty(&next).map_err(|e| StoreError::Save {
                path: self.path(),
                source: io::Error::other(e),
            })?;
            write_replace(&self.dir, FILE, TEMP, &bytes).map_err(|source| StoreError::Save {
                path: self.path(),
                source,
            })?;
            self.state = next;
        }
        Ok(out)
    }

    /// The claim's addresses, and the attachments it supersedes (see
    /// [`IpamState::supersede`]), released in the same write.
    pub fn allocate(&mut self, claim: &Claim) -> Result<(Allocation, Vec<Allocation>), StoreError> {
        self.commit(|s| {
            let superseded = s.supersede(claim);
            Ok((s.allocate(claim)?, superseded))
        })
    }

    pub fn release(&mut self, key: &AttachmentKey) -> Result<Option<Allocation>, StoreError> {
        self.commit(|s| Ok(s.release(key)))
    }

    /// Releases every key in one write; returns the allocations that existed.
    pub fn release_all(&mut self, keys: &[AttachmentKey]) -> Result<Vec<Allocation>, StoreError> {
        self.commit(|s| Ok(keys.iter().filter_map(|k| s.release(k)).collect()))
    }

    /// Sets the node's blocks; returns the allocations now outside them (kept until released).
    pub fn set_blocks(&mut self, blocks: Vec<IpNetwork>) -> Result<Vec<Allocation>, StoreError> {
        self.commit(|s| Ok(s.set_blocks(blocks).into_iter().cloned().collect()))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::claim;
    use super::*;
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    fn block() -> Vec<IpNetwork> {
        vec![
            "10.1.0.0/24".parse().unwrap(),
            "fd00:1::/120".parse().unwrap(),
        ]
    }

    #[test]
    fn persists_across_reload() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::load(dir.path()).unwrap();
        ipam.set_blocks(block()).unwrap();
        let a = ipam.allocate(&claim("a")).unwrap().0;
        let b = ipam.allocate(&claim("b")).unwrap().0;
        ipam.release(&claim("b").key).unwrap();
        drop(ipam);

        let mut again = Ipam::load(dir.path()).unwrap();
        assert_eq!(again.state().blocks, block());
        assert_eq!(
            again.allocate(&claim("a")).unwrap().0.ips,
            a.ips,
            "same addresses after restart"
        );
        let c = again.allocate(&claim("c")).unwrap().0;
        assert!(
            c.ips
                .iter()
                .all(|ip| !a.ips.contains(ip) && !b.ips.contains(ip)),
            "cursor persisted too"
        );
    }

    #[test]
    fn a_new_sandbox_of_a_pod_supersedes_the_dead_one_in_the_same_write() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::load(dir.path()).unwrap();
        ipam.set_blocks(block()).unwrap();
        let (old, none) = ipam.allocate(&claim("a")).unwrap();
        assert!(none.is_empty());
        let other = ipam.allocate(&claim("b")).unwrap().0;
        // The same pod (same host veth) under a new container ID: the old sandbox died.
        let mut again = claim("a2");
        again.host_veth.clone_from(&old.host_veth);
        let (new, superseded) = ipam.allocate(&again).unwrap();
        assert_eq!(superseded, vec![old.clone()]);
        assert_ne!(new.ips, old.ips);
        let reloaded = Ipam::load(dir.path()).unwrap();
        let keys: Vec<_> = reloaded
            .state()
            .allocations
            .iter()
            .map(|a| a.key.clone())
            .collect();
        assert_eq!(keys, vec![other.key, again.key]);
    }

    #[test]
    fn crash_leftovers_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::load(dir.path()).unwrap();
        ipam.set_blocks(block()).unwrap();
        let a = ipam.allocate(&claim("a")).unwrap().0;
        // A crash mid-write leaves a half-written temp file: the committed file wins.
        fs::write(dir.path().join(TEMP), b"{\"allocations\": [").unwrap();
        let again = Ipam::load(dir.path()).unwrap();
        assert_eq!(again.state().get(&claim("a").key).unwrap().ips, a.ips);
        assert!(!dir.path().join(TEMP).exists());
        // A corrupt state file is an error, not an empty (double-allocating) start.
        fs::write(dir.path().join(FILE), b"garbage").unwrap();
        let err = Ipam::load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("ipam.json"), "{err}");
    }

    #[test]
    fn failed_save_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::load(dir.path()).unwrap();
        ipam.set_blocks(block()).unwrap();
        // Make the temp path a directory so the write fails.
        fs::create_dir(dir.path().join(TEMP)).unwrap();
        assert!(ipam.allocate(&claim("a")).is_err());
        assert!(ipam.state().get(&claim("a").key).is_none());
    }

    #[test]
    fn concurrent_requests_never_share_an_address() {
        let dir = tempfile::tempdir().unwrap();
        let mut ipam = Ipam::load(dir.path()).unwrap();
        ipam.set_blocks(block()).unwrap();
        let ipam = Arc::new(Mutex::new(ipam));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let ipam = ipam.clone();
                std::thread::spawn(move || {
                    (0..20)
                        .map(|i| {
                            let c = claim(&format!("t{t}-{i}"));
                            let a = ipam.lock().unwrap().allocate(&c).unwrap().0;
                            if i % 3 == 0 {
                                ipam.lock().unwrap().release(&c.key).unwrap();
                                None
                            } else {
                                Some(a)
                            }
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let kept: Vec<Allocation> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .flatten()
            .collect();
        let ips: HashSet<_> = kept.iter().flat_map(|a| a.ips.clone()).collect();
        assert_eq!(ips.len(), kept.len() * 2, "every live address distinct");
        let reloaded = Ipam::load(dir.path()).unwrap();
        assert_eq!(reloaded.state().allocations.len(), kept.len());
    }
}
