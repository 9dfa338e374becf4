//! Sample data for the demo and the tests: seeded random blocks, compressible log text, and a
//! digest of a whole file to check a restore is bit-exact.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Writes `len` bytes of seeded pseudo-random data at `offset`.
pub fn write_random(path: &Path, offset: u64, len: usize, seed: u64) {
    let mut buf = vec![0u8; len];
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .update(&offset.to_le_bytes())
        .finalize_xof()
        .fill(&mut buf);
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for write");
    f.write_all_at(&buf, offset).expect("write");
    f.sync_all().expect("sync");
}

/// Writes compressible text at `offset`.
pub fn write_text(path: &Path, offset: u64, len: usize, seed: u64) {
    let mut text = String::new();
    let mut i = seed;
    while text.len() < len {
        text += &format!(
            "2026-11-21T10:{:02}:{:02}Z INFO request {i} served in {}ms\n",
            i % 60,
            (i * 7) % 60,
            i % 97
        );
        i += 1;
    }
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open for write");
    f.write_all_at(&text.as_bytes()[..len], offset)
        .expect("write");
    f.sync_all().expect("sync");
}

/// BLAKE3 of a whole file or device (reads in 4 MiB pieces).
pub fn digest(path: &Path) -> String {
    let f = std::fs::File::open(path).expect("open");
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut off = 0u64;
    loop {
        let n = f.read_at(&mut buf, off).expect("read");
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        off += n as u64;
    }
    h.finalize().to_hex().to_string()
}
