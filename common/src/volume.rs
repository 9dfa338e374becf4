//! Volumes: raw block devices and image files, read and written with positional I/O.
//!
//! The size comes from the device (seek to the end works for both block devices and files); sparse
//! ranges of image files are found with SEEK_DATA/SEEK_HOLE so a multi-GiB sparse image costs only
//! its allocated bytes to read.

use anyhow::{Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

/// A named volume of a protection group, as configured by the user (`name=path`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VolumeSpec {
    /// Stable name of the volume inside its group (the PVC name in cluster mode).
    pub name: String,
    /// Block device or image file.
    pub path: PathBuf,
}

impl std::str::FromStr for VolumeSpec {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        let (name, path) = s.split_once('=').with_context(|| {
            format!("volume `{s}` is not NAME=PATH (for example data=/dev/loop3)")
        })?;
        check_name(name)?;
        anyhow::ensure!(!path.is_empty(), "volume `{name}` has an empty path");
        Ok(VolumeSpec {
            name: name.to_string(),
            path: PathBuf::from(path),
        })
    }
}

/// Checks a volume or group name: it becomes a file name on the standby.
pub fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    anyhow::ensure!(
        ok,
        "name `{name}` is not valid: use 1-128 letters, digits, '-', '_' or '.', not starting with '.'"
    );
    Ok(())
}

/// An open volume, read-only.
pub struct Volume {
    file: File,
    path: PathBuf,
    size: u64,
    sparse_aware: bool,
}

impl Volume {
    /// Opens a block device or image file for reading.
    /// A path that does not exist, may not be read, or is neither a block device nor a regular
    /// file gives a [`crate::error::Permanent`] error: retrying cannot fix it.
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| {
            let fixable_by_user = matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::PermissionDenied
            );
            let e = anyhow::Error::new(e).context(format!(
                "cannot open volume {}: check the path exists and this agent may read it",
                path.display()
            ));
            if fixable_by_user {
                crate::error::permanent(e)
            } else {
                e
            }
        })?;
        let meta = file
            .metadata()
            .with_context(|| format!("cannot stat volume {}", path.display()))?;
        let ft = meta.file_type();
        if !(ft.is_file() || ft.is_block_device()) {
            let what = if ft.is_dir() {
                "a directory"
            } else {
                "neither a block device nor a regular file"
            };
            return Err(crate::error::permanent(anyhow::anyhow!(
                "volume {} is {what}: give a block device or an image file",
                path.display()
            )));
        }
        let size = file
            .seek(SeekFrom::End(0))
            .with_context(|| format!("cannot size volume {}", path.display()))?;
        Ok(Volume {
            file,
            path: path.to_path_buf(),
            size,
            sparse_aware: ft.is_file(),
        })
    }

    /// Size in bytes, from the device.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Path it was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads `buf.len()` bytes at `offset` (short only at the end of the volume).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            let n = self
                .file
                .read_at(&mut buf[done..], offset + done as u64)
                .with_context(|| {
                    format!(
                        "read of {} at offset {} failed",
                        self.path.display(),
                        offset + done as u64
                    )
                })?;
            if n == 0 {
                break;
            }
            done += n;
        }
        Ok(done)
    }

    /// The data extents within `[offset, offset+len)`, as the file system reports them
    /// (SEEK_DATA / SEEK_HOLE), in order; everything between them is a hole. Block devices, and
    /// file systems that cannot tell, answer the whole range (the caller then reads and checks
    /// for zeros).
    pub fn data_extents(&self, offset: u64, len: u64) -> Vec<std::ops::Range<u64>> {
        let end = offset + len;
        let mut out = Vec::new();
        if !self.sparse_aware {
            out.push(offset..end);
            return out;
        }
        let mut pos = offset;
        while pos < end {
            let data = match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(pos)) {
                Ok(d) => d,
                Err(rustix::io::Errno::NXIO) => break,
                Err(_) => {
                    out.push(pos..end);
                    break;
                }
            };
            if data >= end {
                break;
            }
            let hole = rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Hole(data))
                .map_or(end, |h| h.min(end));
            out.push(data..hole);
            pos = hole;
        }
        out
    }
}

/// Starts writing `[offset, offset+len)` of `file` to its device without waiting for it
/// (write-behind): the disk works while the caller computes the next data, and the fsync that
/// makes it durable finds little left to do. It guarantees nothing by itself; a failure only
/// leaves the work to that fsync.
pub fn start_writeback(file: &File, offset: u64, len: u64) {
    use std::os::fd::AsRawFd;
    // SAFETY: sync_file_range gets a descriptor borrowed for the call and plain integers; it
    // only starts writeback of the file's dirty pages in the range and touches no memory of ours.
    unsafe {
        libc::sync_file_range(
            file.as_raw_fd(),
            offset as libc::off64_t,
            len as libc::off64_t,
            libc::SYNC_FILE_RANGE_WRITE,
        );
    }
}

/// Where a restored volume is written: an image file (created sparse) or an existing device.
pub struct VolumeWriter {
    file: File,
    path: PathBuf,
    is_device: bool,
    /// Held for each write. A buffered write takes the file's inode lock anyway, and the kernel's
    /// waiters for that lock spin on a CPU the other workers need for decoding; waiting here
    /// sleeps instead.
    writing: std::sync::Mutex<()>,
}

impl VolumeWriter {
    /// Creates (or truncates) an image file of `size` bytes; unwritten ranges stay holes.
    pub fn create_image(path: &Path, size: u64) -> Result<Self> {
        let file = crate::files::create_private(path).context("cannot create the image")?;
        file.set_len(size)
            .with_context(|| format!("cannot size image {} to {size} bytes", path.display()))?;
        Ok(VolumeWriter {
            file,
            path: path.to_path_buf(),
            is_device: false,
            writing: Default::default(),
        })
    }

    /// Opens an existing block device (or file) of at least `size` bytes for writing.
    pub fn open_device(path: &Path, size: u64) -> Result<Self> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| {
                format!(
                    "cannot open {} for writing: check it exists and is not in use",
                    path.display()
                )
            })?;
        let have = file.seek(SeekFrom::End(0))?;
        anyhow::ensure!(
            have >= size,
            "{} holds {have} bytes but the volume needs {size}: give a larger device",
            path.display()
        );
        let is_device = file.metadata()?.file_type().is_block_device();
        Ok(VolumeWriter {
            file,
            path: path.to_path_buf(),
            is_device,
            writing: Default::default(),
        })
    }

    /// Writes a block's bytes at `offset`.
    pub fn write_at(&self, data: &[u8], offset: u64) -> Result<()> {
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        self.file.write_all_at(data, offset).with_context(|| {
            format!(
                "write to {} at offset {offset} failed (disk full or device error?)",
                self.path.display()
            )
        })
    }

    /// True when holes must be written as zeros: on a device or a reused file. A fresh sparse
    /// image already reads as zeros there.
    pub fn holes_need_zeros(&self, fresh_image: bool) -> bool {
        !fresh_image || self.is_device
    }

    /// Makes `[offset, offset+len)` read as zeros without writing them where the kernel can: on
    /// a device by BLKZEROOUT (a thin or loop device then holds no data there), on a file by
    /// punching a hole; else by writing zeros.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        use std::os::fd::AsRawFd;
        let fd = self.file.as_raw_fd();
        // SAFETY: both calls get a descriptor borrowed for the call and plain integers (the
        // ioctl reads two u64s from `range`, which lives across it); they only change the
        // file's or device's contents in the range.
        let done = if self.is_device {
            let range: [u64; 2] = [offset, len];
            // BLKZEROOUT = _IO(0x12, 127).
            unsafe { libc::ioctl(fd, 0x127f, &range) == 0 }
        } else {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) == 0 }
        };
        if done {
            return Ok(());
        }
        let zeros = vec![0u8; (1u64 << 20).min(len) as usize];
        let mut at = offset;
        while at < offset + len {
            let n = (offset + len - at).min(zeros.len() as u64) as usize;
            self.write_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Starts writing `[offset, offset+len)` to the device (see [`start_writeback`]).
    pub fn start_writeback(&self, offset: u64, len: u64) {
        start_writeback(&self.file, offset, len);
    }

    /// Flushes the written data to stable storage, then drops it from the page cache, so a
    /// read-back reads what the device holds, not what was written to memory.
    pub fn sync(&self) -> Result<()> {
        use std::os::fd::AsRawFd;
        self.file
            .sync_all()
            .with_context(|| format!("fsync of {} failed", self.path.display()))?;
        // SAFETY: a borrowed descriptor and plain integers; advice only (clean pages dropped).
        unsafe { libc::posix_fadvise(self.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        Ok(())
    }

    /// Opens the written volume again for reading (read-back verification).
    pub fn reopen(&self) -> Result<Volume> {
        Volume::open(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_image_reports_holes_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.img");
        let w = VolumeWriter::create_image(&p, 64 << 20).unwrap();
        w.write_at(&[1u8; 4096], 32 << 20).unwrap();
        w.sync().unwrap();
        let v = Volume::open(&p).unwrap();
        assert_eq!(v.size(), 64 << 20);
        assert!(!v.data_extents(32 << 20, 4096).is_empty());
        assert!(v.data_extents(40 << 20, 1 << 20).is_empty());
        // Zeroing a range punches it out again.
        w.zero_range(32 << 20, 4096).unwrap();
        let mut back = vec![1u8; 4096];
        v.read_at(&mut back, 32 << 20).unwrap();
        assert!(back.iter().all(|b| *b == 0));
        let mut b = [0u8; 10];
        assert_eq!(v.read_at(&mut b, (64 << 20) - 4).unwrap(), 4);
    }

    #[test]
    fn data_extents_name_the_data_between_the_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("v.img");
        let w = VolumeWriter::create_image(&p, 8 << 20).unwrap();
        w.write_at(&[1u8; 64 << 10], 1 << 20).unwrap();
        w.write_at(&[2u8; 64 << 10], 3 << 20).unwrap();
        w.sync().unwrap();
        let v = Volume::open(&p).unwrap();
        let window = v.data_extents(0, 4 << 20);
        let covered: u64 = window.iter().map(|r| r.end - r.start).sum();
        assert!(
            window.iter().any(|r| r.contains(&(1 << 20)))
                && window.iter().any(|r| r.contains(&(3 << 20))),
            "{window:?}"
        );
        assert!(covered < 4 << 20, "holes are left out: {window:?}");
        assert!(window.iter().all(|r| r.start < r.end && r.end <= 4 << 20));
        assert!(v.data_extents(4 << 20, 4 << 20).is_empty(), "all hole");
        // A window starting inside data is clipped to the window.
        let inner = v.data_extents((1 << 20) + 4096, 4096);
        assert_eq!(inner, vec![(1 << 20) + 4096..(1 << 20) + 8192]);
    }

    #[test]
    fn bad_specs_are_explained() {
        assert!(
            "data"
                .parse::<VolumeSpec>()
                .unwrap_err()
                .to_string()
                .contains("NAME=PATH")
        );
        assert!("../x=/dev/sda".parse::<VolumeSpec>().is_err());
        assert_eq!(
            "db-0=/dev/loop1".parse::<VolumeSpec>().unwrap().name,
            "db-0"
        );
    }
}
