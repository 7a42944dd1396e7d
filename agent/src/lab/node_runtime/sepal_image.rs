//! The Sepal image, made without a registry or a base image: the built binaries (`sepal`,
//! `sepal-cni`, `sepal-bgpd`) from beside the running `sepal`, the programs the manifests and the
//! agent run inside the container, and every shared library these load (found as the dynamic
//! loader finds them, with `ldd`), the loader itself included. deploy/Containerfile describes
//! the same files on a minimal base; [`FILES`] and [`PROGRAMS`] are the list both follow.

use super::images::{base_dirs, Entry, Image};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// The image's name: the DaemonSet's image reference, pointed at the lab's build.
pub fn name() -> String {
    format!("sepal.dev/sepal:v{}", env!("CARGO_PKG_VERSION"))
}

/// Sepal's binaries, installed in /usr/local/bin (`sepal-bgpd` only when it was built).
pub const FILES: &[(&str, bool)] = &[("sepal", true), ("sepal-cni", true), ("sepal-bgpd", false)];

/// The host programs the container runs, at the same paths: the agent's `nft` (when
/// libnftables does not do) and `conntrack` (revocation); install-cni's `sh`, `cp`, `chmod`, `mv`.
pub const PROGRAMS: &[&str] = &[
    "/usr/sbin/nft",
    "/usr/sbin/conntrack",
    "/bin/sh",
    "/bin/cp",
    "/bin/chmod",
    "/bin/mv",
];

/// Libraries loaded with dlopen (no DT_NEEDED names them): the agent's libnftables.
pub const DLOPENED: &[&str] = &["libnftables.so.1"];

/// The directories the DaemonSet mounts onto (a read-only root cannot grow mount points).
const MOUNT_POINTS: &[&str] = &[
    "etc/sepal",
    "host",
    "host/etc",
    "host/etc/cni",
    "host/etc/cni/net.d",
    "host/opt",
    "host/opt/cni",
    "host/opt/cni/bin",
    "host/proc",
    "host/proc/sys",
    "host/proc/sys/net",
    "run",
    "run/netns",
    "run/sepal",
    "var/lib",
    "var/lib/sepal",
];

/// The image's filesystem, path by path, as it is being collected.
#[derive(Default)]
struct Tree {
    entries: BTreeMap<String, Entry>,
}

impl Tree {
    fn dir(&mut self, path: &str) {
        self.entries
            .entry(path.to_string())
            .or_insert(Entry::Dir { mode: 0o755 });
    }

    /// Adds the host's `path` at the same place: every directory on the way, every symlink on
    /// the way as a symlink (and what it points to), the file itself.
    fn host_path(&mut self, path: &Path) -> Result<()> {
        self.host_path_depth(path, 0)
    }

    fn host_path_depth(&mut self, path: &Path, depth: usize) -> Result<()> {
        if depth > 16 {
            bail!("too many symlinks at {}", path.display());
        }
        let mut at = PathBuf::from("/");
        let parts: Vec<_> = path.components().collect();
        for (i, c) in parts.iter().enumerate() {
            match c {
                Component::RootDir => continue,
                Component::Normal(n) => at.push(n),
                _ => bail!("{}: not a plain absolute path", path.display()),
            }
            let rel = at.strip_prefix("/")?.display().to_string();
            let meta =
                std::fs::symlink_metadata(&at).with_context(|| format!("{}", at.display()))?;
            if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&at)?;
                self.entries.insert(
                    rel,
                    Entry::Symlink {
                        target: target.display().to_string(),
                    },
                );
                // Follow it, then the rest of the path from where it points.
                let mut next = if target.is_absolute() {
                    target
                } else {
                    at.parent().unwrap_or(Path::new("/")).join(target)
                };
                for rest in &parts[i + 1..] {
                    next.push(rest);
                }
                return self.host_path_depth(&normalize(&next), depth + 1);
            } else if meta.is_dir() {
                self.dir(&rel);
            } else if meta.is_file() {
                use std::os::unix::fs::PermissionsExt;
                let mode = meta.permissions().mode() & 0o7777;
                self.entries.insert(
                    rel,
                    Entry::File {
                        source: at.clone(),
                        mode,
                    },
                );
            } else {
                bail!("{} is not a file, directory or symlink", at.display());
            }
        }
        Ok(())
    }
}

/// `a/b/../c` → `a/c`, lexically (symlinks were already followed up to here).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
            _ => {}
        }
    }
    out
}

/// The shared libraries `elf` loads, the dynamic loader included, as `ldd` resolves them.
pub fn libraries(elf: &Path) -> Result<Vec<PathBuf>> {
    let out = std::process::Command::new("ldd")
        .arg(elf)
        .output()
        .context("run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary: "not a dynamic executable", nothing to add.
        if String::from_utf8_lossy(&out.stderr).contains("not a dynamic executable")
            || text.contains("statically linked")
        {
            return Ok(vec![]);
        }
        bail!(
            "ldd {}: {}",
            elf.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_ldd(&text).with_context(|| format!("ldd {}", elf.display()))
}

fn parse_ldd(text: &str) -> Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.contains("not found") {
            bail!("a library is missing: {line}");
        }
        let path = match line.split_once("=>") {
            Some((_, r)) => r.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Where the dynamic loader finds `soname` (dlopen's search: `ldconfig -p`, then the usual
/// directories).
fn find_library(soname: &str) -> Result<PathBuf> {
    if let Ok(out) = std::process::Command::new("ldconfig").arg("-p").output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let line = line.trim();
            if line.starts_with(&format!("{soname} ")) && line.contains("x86-64") {
                if let Some((_, p)) = line.split_once("=> ") {
                    return Ok(PathBuf::from(p.trim()));
                }
            }
        }
    }
    for d in [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib64",
    ] {
        let p = Path::new(d).join(soname);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{soname} not found (apt-get install libnftables1)")
}

/// Host programs at their own paths with every library they load (as `ldd` resolves them,
/// the loader included), as image entries on top of the base directories: a small userland.
pub fn host_programs(programs: &[&str]) -> Result<Vec<(String, Entry)>> {
    let mut tree = Tree::default();
    for (d, e) in base_dirs() {
        tree.entries.insert(d, e);
    }
    let mut elves = Vec::new();
    for p in programs {
        let path = Path::new(p);
        if !path.exists() {
            bail!("{p} is missing on this host (see the apt-get line in .ci/run)");
        }
        tree.host_path(path)?;
        elves.push(std::fs::canonicalize(path)?);
    }
    for elf in &elves {
        for lib in libraries(elf)? {
            tree.host_path(&lib)?;
        }
    }
    Ok(tree.entries.into_iter().collect())
}

/// The Sepal image from the binaries in `bin` (the running `sepal`'s directory).
pub fn image(bin: &Path) -> Result<Image> {
    let mut tree = Tree::default();
    for (d, e) in base_dirs() {
        tree.entries.insert(d, e);
    }
    for d in MOUNT_POINTS {
        tree.dir(d);
    }
    for d in ["usr", "usr/local", "usr/local/bin"] {
        tree.dir(d);
    }
    let mut elves = Vec::new();
    for (file, required) in FILES {
        let source = bin.join(file);
        if !source.is_file() {
            if *required {
                bail!("{} is missing: cargo build --bins", source.display());
            }
            continue;
        }
        tree.entries.insert(
            format!("usr/local/bin/{file}"),
            Entry::File {
                source: source.clone(),
                mode: 0o755,
            },
        );
        elves.push(source);
    }
    for p in PROGRAMS {
        let path = Path::new(p);
        if !path.exists() {
            bail!(
                "{p} is missing on this host (apt-get install nftables conntrack coreutils dash)"
            );
        }
        tree.host_path(path)?;
        elves.push(std::fs::canonicalize(path)?);
    }
    for soname in DLOPENED {
        let lib = find_library(soname)?;
        tree.host_path(&lib)?;
        elves.push(std::fs::canonicalize(&lib)?);
    }
    for elf in &elves {
        for lib in libraries(elf)? {
            tree.host_path(&lib)?;
        }
    }
    Ok(Image {
        name: name(),
        aliases: vec![],
        entrypoint: vec!["/usr/local/bin/sepal".into()],
        cmd: vec!["node".into()],
        entries: tree.entries.into_iter().collect(),
    })
}

/// `sepal lab image --out DIR`: writes the Sepal image's archive into DIR (unless an
/// up-to-date one is there) and prints its name, path, size and file count as JSON.
pub fn run(out: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("the running sepal's path")?;
    let bin = exe.parent().context("the running sepal's directory")?;
    let image = image(bin)?;
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let file = std::path::absolute(out)?.join(archive_name(&image.name));
    super::images::ensure_archive(&image, &file)?;
    let files = image
        .entries
        .iter()
        .filter(|(_, e)| matches!(e, Entry::File { .. }))
        .count();
    let bytes = std::fs::metadata(&file)?.len();
    println!(
        "{}",
        serde_json::json!({ "name": image.name, "archive": file, "files": files, "bytes": bytes })
    );
    Ok(())
}

/// The archive's file name for an image (`sepal_v0.1.0.tar`): its last path part.
pub fn archive_name(image: &str) -> String {
    let base = image.rsplit('/').next().unwrap_or("image");
    format!("{}.tar", base.replace(':', "_"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_the_libraries_and_the_loader() {
        let libs = parse_ldd(
            "\tlinux-vdso.so.1 (0x00007ffd)\n\
             \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f35)\n\
             \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f35)\n\
             \t/lib64/ld-linux-x86-64.so.2 (0x00007f35)\n",
        )
        .unwrap();
        assert_eq!(
            libs,
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        assert!(parse_ldd("\tlibfoo.so.1 => not found\n").is_err());
    }

    #[test]
    fn symlinks_on_the_way_are_kept_and_followed() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("usr/lib")).unwrap();
        std::fs::write(d.join("usr/lib/libx.so.1.2"), b"x").unwrap();
        std::os::unix::fs::symlink("usr/lib", d.join("lib")).unwrap();
        std::os::unix::fs::symlink("libx.so.1.2", d.join("usr/lib/libx.so.1")).unwrap();
        let mut t = Tree::default();
        t.host_path(&d.join("lib/libx.so.1")).unwrap();
        let rel = |p: &str| format!("{}/{p}", d.strip_prefix("/").unwrap().display());
        assert!(
            matches!(&t.entries[&rel("lib")], Entry::Symlink { target } if target == "usr/lib")
        );
        assert!(matches!(
            &t.entries[&rel("usr/lib/libx.so.1")],
            Entry::Symlink { target } if target == "libx.so.1.2"
        ));
        assert!(matches!(
            &t.entries[&rel("usr/lib/libx.so.1.2")],
            Entry::File { .. }
        ));
        assert!(matches!(&t.entries[&rel("usr/lib")], Entry::Dir { .. }));
        assert_eq!(archive_name("sepal.dev/sepal:v0.1.0"), "sepal_v0.1.0.tar");
    }
}
