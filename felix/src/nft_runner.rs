//! Running nft command batches: one batch, one kernel transaction, through libnftables in
//! process when this runner uses plain `nft` and the library loads, else through the `nft` tool.
//! Shared by every table Sepal programs (`nft` for policy, `hostport` for port mappings).

use crate::exec::ExecError;
use crate::libnft::Libnft;
use std::path::PathBuf;

#[derive(Debug)]
pub struct NftRunner {
    command: Vec<String>,
    /// Network namespace (a /run/netns path) nft runs in; `None`: the caller's.
    netns: Option<PathBuf>,
    /// libnftables for batches, once loaded (`nft` runs when it cannot be).
    lib: Option<Libnft>,
    lib_tried: bool,
}

impl Default for NftRunner {
    fn default() -> NftRunner {
        NftRunner::new()
    }
}

impl NftRunner {
    /// `nft` in the current network namespace.
    pub fn new() -> NftRunner {
        NftRunner::with_command(vec!["nft".into()])
    }

    /// A custom command line running nft (e.g. `ip netns exec NS nft`).
    pub fn with_command(command: Vec<String>) -> NftRunner {
        NftRunner {
            command,
            netns: None,
            lib: None,
            lib_tried: false,
        }
    }

    /// `nft` run inside the network namespace at `path` (much cheaper than `ip netns exec`).
    pub fn in_netns(path: impl Into<PathBuf>) -> NftRunner {
        NftRunner {
            netns: Some(path.into()),
            ..NftRunner::new()
        }
    }

    /// Is this the `nft` command itself (not a wrapper such as `ip netns exec NS nft`)?
    pub fn is_plain_nft(&self) -> bool {
        self.command == ["nft"]
    }

    /// The network namespace nft runs in, when not the caller's.
    pub fn netns(&self) -> Option<&std::path::Path> {
        self.netns.as_deref()
    }

    /// Runs `batch` (nft's command language) as one transaction.
    pub fn batch(&mut self, batch: &str) -> Result<(), ExecError> {
        if !self.lib_tried && self.command == ["nft"] {
            self.lib_tried = true;
            self.lib = match &self.netns {
                None => Libnft::open(),
                Some(path) => crate::netns::on_thread_in(path, Libnft::open)
                    .ok()
                    .flatten(),
            };
        }
        let Some(lib) = self.lib.as_mut() else {
            return self.run(&["-f", "-"], Some(batch)).map(|_| ());
        };
        let ran = match &self.netns {
            None => lib.run(batch),
            Some(path) => crate::netns::on_thread_in(path, || lib.run(batch))
                .map_err(|e| format!("netns {}: {e}", path.display()))
                .and_then(|r| r),
        };
        ran.map(|_| ()).map_err(|stderr| ExecError::Failed {
            program: "nft".into(),
            stderr,
        })
    }

    /// Runs the nft tool with `args` (queries: `list`, `-j list`), returning its stdout.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, ExecError> {
        crate::exec::run(&self.command, self.netns.as_deref(), args, stdin)
    }
}
