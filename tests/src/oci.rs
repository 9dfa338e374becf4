//! OCI image archives made locally, for the test bed's containerd (nothing is pulled): one
//! uncompressed layer of chosen host files, an image config with the entrypoint, and an
//! index.json whose manifest carries `io.containerd.image.name`, as `ctr images import` reads.
//! Archives are cached by the content of their inputs, so an image is rebuilt only when a file
//! in it changed (a rebuilt agent binary, say).

use anyhow::{Context, Result};
use serde_json::json;
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// One entry of the image's file system.
#[derive(Clone, Debug)]
enum Entry {
    /// A host file copied in, with its mode.
    File(PathBuf),
    /// A host program copied in without its debug information (`objcopy --strip-debug`): the
    /// agents' debug builds are mostly DWARF, which would make the image ten times larger.
    Program(PathBuf),
    /// A symbolic link to a path.
    Symlink(String),
}

/// An image to build: files and an entrypoint.
#[derive(Clone, Debug)]
pub struct Image {
    name: String,
    entrypoint: Vec<String>,
    entries: Vec<(String, Entry)>,
}

impl Image {
    /// An empty image named `name` (keep a dotted first element, `understudy.local/x:1`, so the
    /// CRI does not prefix a registry).
    pub fn new(name: &str, entrypoint: &[&str]) -> Self {
        Image {
            name: name.into(),
            entrypoint: entrypoint.iter().map(|s| s.to_string()).collect(),
            entries: Vec::new(),
        }
    }

    /// The image's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Adds a host file at `path` in the image.
    pub fn file(mut self, path: &str, host: &Path) -> Self {
        self.entries.push((
            path.trim_start_matches('/').into(),
            Entry::File(host.to_path_buf()),
        ));
        self
    }

    /// Adds a symbolic link.
    pub fn symlink(mut self, path: &str, to: &str) -> Self {
        self.entries.push((
            path.trim_start_matches('/').into(),
            Entry::Symlink(to.into()),
        ));
        self
    }

    /// Adds a dynamically linked host program at `path` with the shared libraries `ldd` names,
    /// at their host paths.
    pub fn program(mut self, path: &str, host: &Path) -> Result<Self> {
        let out = Command::new("ldd")
            .arg(host)
            .output()
            .context("running ldd")?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let lib = line
                .split("=>")
                .last()
                .unwrap_or(line)
                .split_whitespace()
                .next()
                .unwrap_or("");
            if lib.starts_with('/')
                && !self
                    .entries
                    .iter()
                    .any(|(p, _)| p == lib.trim_start_matches('/'))
            {
                let real =
                    std::fs::canonicalize(lib).with_context(|| format!("resolving {lib}"))?;
                self = self.file(lib, &real);
            }
        }
        self.entries.push((
            path.trim_start_matches('/').into(),
            Entry::Program(host.to_path_buf()),
        ));
        Ok(self)
    }

    /// The busybox-based tools image: a shell and the usual applets.
    pub fn tools(name: &str) -> Result<Self> {
        let busybox = which("busybox")?;
        let mut img = Image::new(name, &["/bin/sh"]).file("/bin/busybox", &busybox);
        for applet in [
            "sh",
            "cat",
            "dd",
            "echo",
            "head",
            "ls",
            "mkdir",
            "mount",
            "od",
            "printf",
            "rm",
            "sha256sum",
            "sleep",
            "stat",
            "sync",
            "tail",
            "test",
            "touch",
            "tr",
            "wc",
            "xxd",
            "cmp",
            "seq",
            "true",
            "false",
            "hostname",
            "sed",
            "grep",
            "awk",
            "timeout",
            "df",
            "umount",
        ] {
            img = img.symlink(&format!("/bin/{applet}"), "busybox");
        }
        Ok(img)
    }

    /// The sandbox ("pause") image: a shell that waits until SIGTERM and then exits at once.
    pub fn pause(name: &str) -> Result<Self> {
        let busybox = which("busybox")?;
        Ok(Image::new(
            name,
            &[
                "/bin/busybox",
                "sh",
                "-c",
                "trap 'exit 0' TERM INT; while true; do sleep 3600 & wait $!; done",
            ],
        )
        .file("/bin/busybox", &busybox)
        .symlink("/bin/sleep", "busybox"))
    }

    /// Writes the archive into `cache` (unless an archive of the same content is there) and
    /// returns its path.
    pub fn archive(&self, cache: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(cache)?;
        let key = self.inputs_key()?;
        let safe: String = self
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .collect();
        let out = cache.join(format!("{safe}-{}.tar", &key[..16]));
        if out.exists() {
            return Ok(out);
        }
        remove_older(cache, &safe);
        // Unique temporary names: clusters starting at once may build the same archive.
        let unique = format!("{}-{:?}", std::process::id(), std::thread::current().id())
            .replace(|c: char| !c.is_ascii_alphanumeric(), "");
        let layer_path = out.with_extension(format!("layer.{unique}.tmp"));
        self.write_layer(&layer_path, &unique)?;
        let layer_digest = sha256_file(&layer_path)?;
        let layer_size = std::fs::metadata(&layer_path)?.len();
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {"Entrypoint": self.entrypoint, "Env": ["PATH=/bin:/usr/bin"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [format!("sha256:{layer_digest}")]},
        }))?;
        let config_digest = hex::encode(Sha256::digest(&config));
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{config_digest}"), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{layer_digest}"), "size": layer_size}],
        }))?;
        let manifest_digest = hex::encode(Sha256::digest(&manifest));
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "manifests": [{
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": format!("sha256:{manifest_digest}"),
                "size": manifest.len(),
                "annotations": {"io.containerd.image.name": self.name, "org.opencontainers.image.ref.name": self.name.rsplit(':').next().unwrap_or("latest")},
            }],
        }))?;
        let tmp = out.with_extension(format!("tar.{unique}.tmp"));
        let mut ar = tar::Builder::new(File::create(&tmp)?);
        append_bytes(&mut ar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
        append_bytes(&mut ar, "index.json", &index)?;
        append_bytes(
            &mut ar,
            &format!("blobs/sha256/{manifest_digest}"),
            &manifest,
        )?;
        append_bytes(&mut ar, &format!("blobs/sha256/{config_digest}"), &config)?;
        ar.append_path_with_name(&layer_path, format!("blobs/sha256/{layer_digest}"))?;
        ar.into_inner()?.sync_all()?;
        std::fs::remove_file(&layer_path)?;
        std::fs::rename(&tmp, &out)?;
        Ok(out)
    }

    fn write_layer(&self, path: &Path, unique: &str) -> Result<()> {
        let mut ar = tar::Builder::new(File::create(path)?);
        ar.follow_symlinks(true);
        // Plain entries only: containerd does not take GNU sparse ones (type S).
        ar.sparse(false);
        let mut dirs = std::collections::BTreeSet::new();
        for (p, _) in &self.entries {
            let mut d = Path::new(p).parent();
            while let Some(dir) = d.filter(|d| !d.as_os_str().is_empty()) {
                dirs.insert(dir.to_path_buf());
                d = dir.parent();
            }
        }
        for d in dirs {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            ar.append_data(&mut h, &d, std::io::empty())?;
        }
        for (p, e) in &self.entries {
            match e {
                Entry::File(host) => ar
                    .append_path_with_name(host, p)
                    .with_context(|| format!("adding {}", host.display()))?,
                Entry::Program(host) => {
                    let stripped = path.with_extension(format!("strip.{unique}.tmp"));
                    strip_debug(host, &stripped)?;
                    let added = ar
                        .append_path_with_name(&stripped, p)
                        .with_context(|| format!("adding {}", host.display()));
                    std::fs::remove_file(&stripped)?;
                    added?
                }
                Entry::Symlink(to) => {
                    let mut h = tar::Header::new_gnu();
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_size(0);
                    ar.append_link(&mut h, p, to)?;
                }
            }
        }
        ar.into_inner()?.sync_all()?;
        Ok(())
    }

    /// A digest of everything the archive is made from.
    fn inputs_key(&self) -> Result<String> {
        let mut h = Sha256::new();
        // The archive layout's version: a change in how archives are written rebuilds them.
        h.update(b"understudy-oci-3");
        h.update(self.name.as_bytes());
        h.update(self.entrypoint.join("\0").as_bytes());
        for (p, e) in &self.entries {
            h.update(p.as_bytes());
            match e {
                Entry::File(host) | Entry::Program(host) => h.update(sha256_file(host)?.as_bytes()),
                Entry::Symlink(to) => h.update(to.as_bytes()),
            }
        }
        Ok(hex::encode(h.finalize()))
    }
}

/// Removes the cached archives of an earlier content of the image named `safe`: each holds
/// a whole build of its programs.
fn remove_older(cache: &Path, safe: &str) {
    let prefix = format!("{safe}-");
    for e in std::fs::read_dir(cache).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(rest) = name.strip_prefix(&prefix)
            && rest.len() == "0123456789abcdef.tar".len()
            && rest.ends_with(".tar")
        {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Copies `host` to `to` without debug sections, keeping its mode.
fn strip_debug(host: &Path, to: &Path) -> Result<()> {
    let out = Command::new("objcopy")
        .arg("--strip-debug")
        .arg(host)
        .arg(to)
        .output()
        .context("running objcopy (binutils)")?;
    anyhow::ensure!(
        out.status.success(),
        "objcopy --strip-debug {} failed: {}",
        host.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn append_bytes<W: Write>(ar: &mut tar::Builder<W>, path: &str, data: &[u8]) -> Result<()> {
    let mut h = tar::Header::new_gnu();
    h.set_size(data.len() as u64);
    h.set_mode(0o644);
    ar.append_data(&mut h, path, data)?;
    Ok(())
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

fn which(program: &str) -> Result<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
        .with_context(|| {
            format!("{program} is not installed (tests/kube-testbed/build.sh --node installs it)")
        })
}
