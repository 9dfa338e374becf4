//! Benchmark data, from a fixed seed: `create` writes a volume of 64 KiB blocks, about 40%
//! incompressible, 40% compressible (log-like text, ~4x with zstd) and 20% all-zero, shuffled;
//! `mutate` overwrites a given percentage of blocks at random offsets with new random data.
//! Each prints one JSON line: the blocks it wrote and their size compressed block by block with
//! zstd level 1 (the raw size where that is smaller), the yardstick for bytes on the wire.

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

const BLOCK: u64 = 64 << 10;

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create (or overwrite) the volume file.
    Create {
        path: PathBuf,
        #[arg(long, default_value_t = 4)]
        size_gib: u64,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Overwrite PERCENT of the blocks with new random data.
    Mutate {
        path: PathBuf,
        #[arg(long)]
        percent: f64,
        #[arg(long, default_value_t = 2)]
        seed: u64,
    },
}

/// splitmix64: a tiny, well-known seeded generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

fn random_block(seed: u64, index: u64, buf: &mut [u8]) {
    blake3::Hasher::new()
        .update(&seed.to_le_bytes())
        .update(&index.to_le_bytes())
        .finalize_xof()
        .fill(buf);
}

fn text_block(seed: u64, index: u64, buf: &mut [u8]) {
    let mut rng = Rng(seed ^ index.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let mut s = String::with_capacity(buf.len() + 200);
    let levels = ["INFO", "WARN", "DEBUG", "ERROR"];
    let paths = [
        "/api/orders",
        "/api/cart",
        "/healthz",
        "/api/users/login",
        "/static/app.js",
    ];
    while s.len() < buf.len() {
        let r = rng.next();
        s += &format!(
            "2026-11-21T{:02}:{:02}:{:02}.{:03}Z {} req={:08x} {} {} {}ms user={}\n",
            r % 24,
            (r >> 8) % 60,
            (r >> 16) % 60,
            (r >> 24) % 1000,
            levels[(r >> 34) as usize % 4],
            (r >> 12) as u32,
            paths[(r >> 40) as usize % 5],
            200 + (r >> 44) % 4 * 100,
            (r >> 50) % 900,
            (r >> 20) % 5000
        );
    }
    buf.copy_from_slice(&s.as_bytes()[..buf.len()]);
}

fn main() -> Result<()> {
    match Args::parse().cmd {
        Cmd::Create {
            path,
            size_gib,
            seed,
        } => create(&path, size_gib << 30, seed),
        Cmd::Mutate {
            path,
            percent,
            seed,
        } => mutate(&path, percent, seed),
    }
}

/// A block's size after zstd level 1, or its raw size when that is smaller.
fn compressed_len(block: &[u8]) -> u64 {
    let z = zstd::bulk::compress(block, 1).map_or(usize::MAX, |c| c.len());
    z.min(block.len()) as u64
}

fn create(path: &PathBuf, size: u64, seed: u64) -> Result<()> {
    let f =
        std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
    f.set_len(size)?;
    let blocks = size / BLOCK;
    let mut rng = Rng(seed);
    let mut buf = vec![0u8; BLOCK as usize];
    let (mut random, mut text, mut zero, mut compressed) = (0u64, 0u64, 0u64, 0u64);
    for i in 0..blocks {
        match rng.next() % 10 {
            0..=3 => {
                random_block(seed, i, &mut buf);
                random += 1;
            }
            4..=7 => {
                text_block(seed, i, &mut buf);
                text += 1;
            }
            _ => {
                zero += 1;
                continue;
            }
        }
        compressed += compressed_len(&buf);
        f.write_all_at(&buf, i * BLOCK)?;
    }
    f.sync_all()?;
    println!(
        "{}",
        serde_json::json!({"blocks": blocks, "random": random, "text": text, "zero": zero,
            "data_bytes": (random + text) * BLOCK, "compressed_bytes": compressed})
    );
    Ok(())
}

fn mutate(path: &PathBuf, percent: f64, seed: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let blocks = f.metadata()?.len() / BLOCK;
    let n = ((blocks as f64) * percent / 100.0).round() as u64;
    let mut rng = Rng(seed.wrapping_mul(7919));
    let mut buf = vec![0u8; BLOCK as usize];
    let mut chosen = std::collections::HashSet::new();
    while (chosen.len() as u64) < n {
        chosen.insert(rng.next() % blocks);
    }
    let mut compressed = 0;
    for i in &chosen {
        random_block(seed ^ 0xABCD, *i, &mut buf);
        compressed += compressed_len(&buf);
        f.write_all_at(&buf, i * BLOCK)?;
    }
    f.sync_all()?;
    println!(
        "{}",
        serde_json::json!({"blocks": blocks, "changed_blocks": n, "percent": percent,
            "data_bytes": n * BLOCK, "compressed_bytes": compressed})
    );
    Ok(())
}
