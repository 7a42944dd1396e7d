//! Container images without a registry: OCI image-layout archives (one uncompressed layer, a
//! config with the entrypoint) written directly, as `ctr -n k8s.io images import` reads them.
//! The lab's pause and agnhost images are static binaries, so one layer holds all they need;
//! the Sepal image (`sepal_image.rs`) adds the shared libraries its programs load.

use anyhow::{bail, Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::io::Write;
use std::path::{Path, PathBuf};

/// What goes at one path of an image's filesystem.
#[derive(Debug, Clone)]
pub enum Entry {
    /// A host file's content.
    File {
        source: PathBuf,
        mode: u32,
    },
    Dir {
        mode: u32,
    },
    Symlink {
        target: String,
    },
}

/// An image to write: its full name (`registry/repo:tag`), the other names it is also imported
/// under (the same manifest), entrypoint, default arguments and its one layer, path by path
/// (paths relative to `/`, parents before children).
#[derive(Debug, Clone)]
pub struct Image {
    pub name: String,
    pub aliases: Vec<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub entries: Vec<(String, Entry)>,
}

/// The images the e2e suites name, as scripts/kube-build found them in the pinned Kubernetes'
/// test/utils/image/manifest.go (`bin/IMAGES`: one `key name` pair a line), and the other names
/// other pinned suites give agnhost (`agnhost-alias name` lines, any number: the
/// network-policy-api conformance suite names an older tag).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageNames {
    pub pause: String,
    pub agnhost: String,
    pub agnhost_aliases: Vec<String>,
}

impl ImageNames {
    pub fn load(bin: &Path) -> Result<ImageNames> {
        let path = bin.join("IMAGES");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "read {}: build the node components with scripts/kube-build",
                path.display()
            )
        })?;
        ImageNames::parse(&text).with_context(|| format!("parse {}", path.display()))
    }

    fn parse(text: &str) -> Result<ImageNames> {
        let find = |key: &str| {
            text.lines()
                .filter_map(|l| l.split_once(' '))
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.trim().to_string())
                .with_context(|| format!("no `{key}` line"))
        };
        let agnhost = find("agnhost")?;
        let mut agnhost_aliases: Vec<String> = Vec::new();
        for (_, name) in text
            .lines()
            .filter_map(|l| l.split_once(' '))
            .filter(|(k, _)| *k == "agnhost-alias")
        {
            let name = name.trim().to_string();
            if name != agnhost && !agnhost_aliases.contains(&name) {
                agnhost_aliases.push(name);
            }
        }
        Ok(ImageNames {
            pause: find("pause")?,
            agnhost,
            agnhost_aliases,
        })
    }
}

/// The directories every container's root has (runc mounts /proc, /sys, /dev onto them, and
/// kubelet's /etc/hosts and /etc/resolv.conf go into /etc).
pub(crate) fn base_dirs() -> Vec<(String, Entry)> {
    ["dev", "etc", "proc", "sys", "tmp", "var", "var/run"]
        .iter()
        .map(|d| {
            let mode = if *d == "tmp" { 0o1777 } else { 0o755 };
            (d.to_string(), Entry::Dir { mode })
        })
        .collect()
}

/// The pause image the runtime starts every Pod sandbox from: our own pause program.
pub fn pause(names: &ImageNames, bin: &Path) -> Image {
    let mut entries = base_dirs();
    entries.push((
        "pause".into(),
        Entry::File {
            source: bin.join("pause"),
            mode: 0o755,
        },
    ));
    Image {
        name: names.pause.clone(),
        aliases: vec![],
        entrypoint: vec!["/pause".into()],
        cmd: vec![],
        entries,
    }
}

/// What the e2e suites run inside agnhost containers besides agnhost itself (`kubectl exec`
/// with `/bin/sh -c`; the network-policy-api suite starts its servers with `/bin/bash -c`: curl, wget, OpenBSD nc, ss, grep, seq, tail and the like), taken from
/// this host as upstream's image takes them from Alpine.
pub const AGNHOST_USERLAND: &[&str] = &[
    "/bin/sh",
    "/bin/bash",
    "/bin/cat",
    "/bin/date",
    "/bin/echo",
    "/bin/ls",
    "/bin/sleep",
    "/bin/grep",
    "/usr/bin/head",
    "/usr/bin/tail",
    "/usr/bin/seq",
    "/usr/bin/wc",
    "/usr/bin/curl",
    "/usr/bin/wget",
    "/bin/nc",
    "/bin/ss",
    "/bin/ip",
    "/bin/hostname",
];

/// agnhost as upstream's image runs it (`ENTRYPOINT ["/agnhost"]`, `CMD ["pause"]`, the
/// `agnhost-2` alias), with the userland the e2e suites exec in it ([`AGNHOST_USERLAND`]) and
/// the TLS pair `porter` serves with (`/localhost.crt`, `/localhost.key`, written beside agnhost
/// by scripts/kube-build).
pub fn agnhost(names: &ImageNames, bin: &Path) -> Result<Image> {
    let mut entries = super::sepal_image::host_programs(AGNHOST_USERLAND)?;
    entries.push((
        "agnhost".into(),
        Entry::File {
            source: bin.join("agnhost"),
            mode: 0o755,
        },
    ));
    entries.push((
        "agnhost-2".into(),
        Entry::Symlink {
            target: "agnhost".into(),
        },
    ));
    for f in ["localhost.crt", "localhost.key"] {
        if bin.join(f).is_file() {
            let source = bin.join(f);
            entries.push((
                f.into(),
                Entry::File {
                    source,
                    mode: 0o644,
                },
            ));
        }
    }
    entries.push(("uploads".into(), Entry::Dir { mode: 0o755 }));
    Ok(Image {
        name: names.agnhost.clone(),
        aliases: names.agnhost_aliases.clone(),
        entrypoint: vec!["/agnhost".into()],
        cmd: vec!["pause".into()],
        entries,
    })
}

/// One ustar header block. Times, owners and names are fixed, so the same input always gives
/// the same bytes (and the same digests: importing an unchanged image is a no-op).
fn tar_header(name: &str, size: u64, mode: u32, kind: u8, link: &str) -> Result<[u8; 512]> {
    if name.len() > 100 || link.len() > 100 {
        bail!("tar path too long: {name}");
    }
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |h: &mut [u8; 512], at: usize, width: usize, v: u64| {
        let s = format!("{v:0w$o}", w = width - 1);
        h[at..at + width - 1].copy_from_slice(s.as_bytes());
    };
    octal(&mut h, 100, 8, mode as u64);
    octal(&mut h, 108, 8, 0);
    octal(&mut h, 116, 8, 0);
    octal(&mut h, 124, 12, size);
    octal(&mut h, 136, 12, 0);
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    Ok(h)
}

/// Appends one regular file to a tar stream.
fn tar_file(out: &mut impl Write, name: &str, data: &[u8], mode: u32) -> Result<()> {
    out.write_all(&tar_header(name, data.len() as u64, mode, b'0', "")?)?;
    out.write_all(data)?;
    let pad = (512 - data.len() % 512) % 512;
    out.write_all(&vec![0u8; pad])?;
    Ok(())
}

fn tar_end(out: &mut impl Write) -> Result<()> {
    out.write_all(&[0u8; 1024])?;
    Ok(())
}

/// The layer: a tar of the image's entries.
fn layer(entries: &[(String, Entry)]) -> Result<Vec<u8>> {
    let mut tar = Vec::new();
    for (path, entry) in entries {
        match entry {
            Entry::Dir { mode } => {
                tar.write_all(&tar_header(&format!("{path}/"), 0, *mode, b'5', "")?)?
            }
            Entry::Symlink { target } => {
                tar.write_all(&tar_header(path, 0, 0o777, b'2', target)?)?
            }
            Entry::File { source, mode } => {
                let data = std::fs::read(source)
                    .with_context(|| format!("read {} for the image", source.display()))?;
                tar_file(&mut tar, path, &data, *mode)?;
            }
        }
    }
    tar_end(&mut tar)?;
    Ok(tar)
}

fn sha256(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let hex: String = d.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

/// A blob and its digest, computed once (the agnhost layer is tens of MB).
struct Blob {
    data: Vec<u8>,
    digest: String,
}

impl Blob {
    fn new(data: Vec<u8>) -> Blob {
        let digest = sha256(&data);
        Blob { data, digest }
    }

    fn descriptor(&self, media_type: &str) -> serde_json::Value {
        json!({ "mediaType": media_type, "digest": self.digest, "size": self.data.len() })
    }
}

/// Writes `image` as an OCI image-layout archive to `out` (replaced atomically); returns the
/// manifest's digest.
pub fn write_archive(image: &Image, out: &Path) -> Result<String> {
    let layer = Blob::new(layer(&image.entries)?);
    let repo = match image.name.rsplit_once(':') {
        Some((r, t)) if !t.contains('/') => r,
        _ => bail!("image name {} has no tag", image.name),
    };
    let config = Blob::new(serde_json::to_vec(&json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": image.entrypoint,
            "Cmd": image.cmd,
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
            "WorkingDir": "/",
        },
        // Uncompressed, so the layer's digest is its diff ID.
        "rootfs": { "type": "layers", "diff_ids": [layer.digest] },
        "history": [{ "created_by": "sepal lab", "comment": repo }],
    }))?);
    let manifest = Blob::new(serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": config.descriptor("application/vnd.oci.image.config.v1+json"),
        "layers": [layer.descriptor("application/vnd.oci.image.layer.v1.tar")],
    }))?);
    // One descriptor of the same manifest per name: containerd imports an image for each.
    let mut descs = Vec::new();
    for name in std::iter::once(&image.name).chain(&image.aliases) {
        let tag = match name.rsplit_once(':') {
            Some((_, t)) if !t.contains('/') => t,
            _ => bail!("image name {name} has no tag"),
        };
        let mut desc = manifest.descriptor("application/vnd.oci.image.manifest.v1+json");
        desc["annotations"] = json!({
            // containerd names the imported image after this; other tools read the OCI one.
            "io.containerd.image.name": name,
            "org.opencontainers.image.ref.name": tag,
        });
        desc["platform"] = json!({ "architecture": "amd64", "os": "linux" });
        descs.push(desc);
    }
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": descs,
    }))?;

    // Per process: nodes starting side by side may write the same shared archive.
    let tmp = out.with_extension(format!("tar.{}.tmp", std::process::id()));
    let file = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let mut w = std::io::BufWriter::new(file);
    tar_file(
        &mut w,
        "oci-layout",
        br#"{"imageLayoutVersion":"1.0.0"}"#,
        0o644,
    )?;
    tar_file(&mut w, "index.json", &index, 0o644)?;
    w.write_all(&tar_header("blobs/", 0, 0o755, b'5', "")?)?;
    w.write_all(&tar_header("blobs/sha256/", 0, 0o755, b'5', "")?)?;
    for blob in [&layer, &config, &manifest] {
        let name = format!("blobs/sha256/{}", &blob.digest["sha256:".len()..]);
        tar_file(&mut w, &name, &blob.data, 0o644)?;
    }
    tar_end(&mut w)?;
    w.into_inner().map_err(|e| e.into_error())?.sync_all().ok();
    std::fs::rename(&tmp, out)?;
    Ok(manifest.digest)
}

/// Writes `image` to `out` unless `out` is already newer than every file the image is made of
/// (archives are reproducible, so an unchanged one need not be written again). Nodes of one lab
/// share the archives this way.
pub fn ensure_archive(image: &Image, out: &Path) -> Result<()> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    // The names it was written with, beside it: a new alias needs a new archive too.
    let names_file = out.with_extension("names");
    let names = std::iter::once(&image.name)
        .chain(&image.aliases)
        .map(|n| format!("{n}\n"))
        .collect::<String>();
    let same_names = std::fs::read_to_string(&names_file).is_ok_and(|n| n == names)
        || (image.aliases.is_empty() && !names_file.exists());
    if let Some(written) = modified(out).filter(|_| same_names) {
        let newer = image.entries.iter().all(|(_, e)| match e {
            Entry::File { source, .. } => modified(source).is_some_and(|m| m <= written),
            _ => true,
        });
        if newer {
            return Ok(());
        }
    }
    write_archive(image, out)?;
    std::fs::write(&names_file, names).with_context(|| format!("write {}", names_file.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_have_the_ustar_checksum() {
        let h = tar_header("pause", 5, 0o755, b'0', "").unwrap();
        let stored = u32::from_str_radix(std::str::from_utf8(&h[148..154]).unwrap(), 8).unwrap();
        let mut blank = h;
        blank[148..156].copy_from_slice(b"        ");
        assert_eq!(stored, blank.iter().map(|b| *b as u32).sum::<u32>());
        assert_eq!(&h[124..135], b"00000000005");
    }

    #[test]
    fn image_names_come_from_the_build() {
        let n = ImageNames::parse(
            "pause registry.k8s.io/pause:3.10.2\nagnhost registry.k8s.io/e2e-test-images/agnhost:2.63.0\n",
        )
        .unwrap();
        assert_eq!(n.pause, "registry.k8s.io/pause:3.10.2");
        assert!(n.agnhost_aliases.is_empty());
        assert!(ImageNames::parse("pause x:1\n").is_err());
        let n = ImageNames::parse(
            "pause p:1\nagnhost a:2.63.0\nagnhost-alias a:2.45\nagnhost-alias a:2.63.0\nagnhost-alias a:2.45\n",
        )
        .unwrap();
        assert_eq!(n.agnhost_aliases, vec!["a:2.45".to_string()]);
    }

    #[test]
    fn archives_are_reproducible_and_name_the_image() {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("pause");
        std::fs::write(&bin, b"#!/bin/true\n").unwrap();
        let names = ImageNames {
            pause: "registry.k8s.io/pause:3.10.2".into(),
            agnhost: "a:1".into(),
            agnhost_aliases: vec![],
        };
        let image = pause(&names, dir.path());
        let (a, b) = (dir.path().join("a.tar"), dir.path().join("b.tar"));
        let da = write_archive(&image, &a).unwrap();
        assert_eq!(da, write_archive(&image, &b).unwrap());
        let bytes = std::fs::read(&a).unwrap();
        assert_eq!(bytes, std::fs::read(&b).unwrap());
        assert_eq!(bytes.len() % 512, 0);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("\"io.containerd.image.name\":\"registry.k8s.io/pause:3.10.2\""));
    }

    #[test]
    fn aliases_name_the_same_manifest_and_rewrite_the_archive() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pause"), b"#!/bin/true\n").unwrap();
        let names = ImageNames {
            pause: "r/pause:3.10.2".into(),
            agnhost: "a:1".into(),
            agnhost_aliases: vec![],
        };
        let mut image = pause(&names, dir.path());
        let out = dir.path().join("p.tar");
        ensure_archive(&image, &out).unwrap();
        let one = std::fs::read(&out).unwrap();
        image.aliases = vec!["r/pause:old".into()];
        ensure_archive(&image, &out).unwrap();
        let text = String::from_utf8_lossy(&std::fs::read(&out).unwrap()).into_owned();
        assert_ne!(text.as_bytes(), &one[..]);
        assert!(text.contains("\"io.containerd.image.name\":\"r/pause:3.10.2\""));
        assert!(text.contains("\"io.containerd.image.name\":\"r/pause:old\""));
        assert!(text.contains("\"org.opencontainers.image.ref.name\":\"old\""));
    }
}
