//! Test workload for group consistency: writes sequence-numbered records across k volumes,
//! record n on volume n mod k at slot n / k, each record naming the previous one and carrying a
//! checksum. Runs until the volumes are full or it is killed. `check` reads volumes back and
//! prints the highest record of the prefix, failing if the records are not exactly a prefix.

use anyhow::{Context, Result, bail};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

const REC: u64 = 64;

fn record(n: u64) -> [u8; REC as usize] {
    let mut r = [0u8; REC as usize];
    r[..4].copy_from_slice(b"REC1");
    r[4..12].copy_from_slice(&n.to_le_bytes());
    r[12..20].copy_from_slice(&n.wrapping_sub(1).to_le_bytes());
    let sum = blake3::hash(&r[..20]);
    r[20..52].copy_from_slice(sum.as_bytes());
    r
}

fn parse(r: &[u8]) -> Option<u64> {
    if &r[..4] != b"REC1" || blake3::hash(&r[..20]).as_bytes() != &r[20..52] {
        return None;
    }
    let n = u64::from_le_bytes(r[4..12].try_into().ok()?);
    let prev = u64::from_le_bytes(r[12..20].try_into().ok()?);
    (prev == n.wrapping_sub(1)).then_some(n)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("write") => write(&args[1..]),
        Some("check") => check(&args[1..]),
        _ => bail!("usage: consistency-writer write|check VOLUME..."),
    }
}

fn write(paths: &[String]) -> Result<()> {
    let files: Vec<std::fs::File> = paths
        .iter()
        .map(|p| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(p)
                .with_context(|| p.clone())
        })
        .collect::<Result<_>>()?;
    let k = files.len() as u64;
    let slots = files
        .iter()
        .map(|f| f.metadata().map(|m| m.len() / REC))
        .collect::<std::io::Result<Vec<_>>>()?;
    let cap = slots.iter().min().copied().unwrap_or(0) * k;
    for n in 0..cap {
        files[(n % k) as usize].write_all_at(&record(n), (n / k) * REC)?;
        if n % 64 == 0 {
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    }
    Ok(())
}

fn check(paths: &[String]) -> Result<()> {
    let k = paths.len() as u64;
    let mut found = Vec::new();
    for (v, p) in paths.iter().enumerate() {
        let data = std::fs::read(PathBuf::from(p)).with_context(|| p.clone())?;
        for (slot, r) in data.chunks_exact(REC as usize).enumerate() {
            if r.iter().all(|b| *b == 0) {
                continue;
            }
            let Some(n) = parse(r) else {
                bail!("volume {p} slot {slot}: torn or foreign record")
            };
            if n % k != v as u64 || n / k != slot as u64 {
                bail!("volume {p} slot {slot}: record {n} is in the wrong place");
            }
            found.push(n);
        }
    }
    found.sort_unstable();
    for (i, n) in found.iter().enumerate() {
        if *n != i as u64 {
            bail!("records are not a prefix: record {i} is missing but record {n} is present");
        }
    }
    println!("{}", found.len());
    Ok(())
}
