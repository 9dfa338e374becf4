//! File operations shared by both agents: replace a file atomically, make a rename or a new file
//! durable by syncing its directory, remove a file that may already be gone, and create the
//! agents' files and directories owner-only.
//!
//! Everything an agent writes holds volume data or secrets (spool, packs, catalog, rebuilt
//! images, manifests with Secrets in them), so it is created 0600 (files) and 0700 (directories)
//! whatever the umask: [`private_dir`], [`private_file`], [`write_private`]. Directories the user
//! made are left as they are; what the agent creates inside them is owner-only.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of every file an agent creates.
pub const FILE_MODE: u32 = 0o600;
/// Mode of every directory an agent creates.
pub const DIR_MODE: u32 = 0o700;

/// Creates `dir` and its missing parents owner-only (0700). A directory that already exists keeps
/// its mode, unless it is `dir` itself and this agent created it earlier with a wider one.
pub fn private_dir(dir: &Path) -> Result<()> {
    let existed = dir.is_dir();
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .with_context(|| {
            format!(
                "cannot create directory {}: check that its parent exists and is writable by this agent",
                dir.display()
            )
        })?;
    if !existed {
        // The umask may have taken bits away, never added any; set the mode exactly.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE))
            .with_context(|| format!("cannot set the mode of {}", dir.display()))?;
    }
    Ok(())
}

/// Options that create a file owner-only (0600); add read, write, create or truncate as needed.
pub fn private_file() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Creates `path` (or truncates it), owner-only even when it existed with a wider mode, open
/// for reading and writing.
pub fn create_private(path: &Path) -> Result<File> {
    let f = private_file()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .with_context(|| {
            format!(
                "cannot create {}: check the directory exists and is writable by this agent",
                path.display()
            )
        })?;
    restrict(&f, path)?;
    Ok(f)
}

/// Writes `data` to `path` (created owner-only, or truncated), not atomically.
pub fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = create_private(path)?;
    f.write_all(data)
        .with_context(|| format!("cannot write {} (disk full?)", path.display()))
}

/// Makes an open file owner-only (for files that existed before, or that another library created).
pub fn restrict(file: &File, path: &Path) -> Result<()> {
    file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))
        .with_context(|| format!("cannot make {} owner-only", path.display()))
}

/// Writes a file so a crash leaves either the old or the new content. The file is owner-only.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write in {}", dir.display()))?;
    tmp.write_all(data)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path)
        .with_context(|| format!("cannot replace {}", path.display()))?;
    sync_dir(dir)
}

/// Fsyncs a directory, so the names created, renamed or removed in it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| {
        format!(
            "cannot fsync directory {}: check the disk it is on for I/O errors (dmesg)",
            dir.display()
        )
    })
}

/// Removes `path` unless it is already gone.
pub fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).with_context(|| {
            format!(
                "cannot remove {}: check that its directory is writable by this agent",
                path.display()
            )
        }),
        _ => Ok(()),
    }
}
