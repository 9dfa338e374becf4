//! `understudy-testbed-tool`: small programs the test bed runs inside pods (image
//! `understudy.local/programs:1`): a UDP echo server and client for the cross-cluster path, and a
//! writer and checker of sequence-numbered records for snapshot-consistency tests, and a
//! scribbler that changes a fraction of a volume's blocks (benchmarks).

use std::fs::{File, OpenOptions};
use std::net::{SocketAddr, UdpSocket};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

/// The size of one record (one 4 KiB block).
const RECORD: u64 = 4096;
const MAGIC: &[u8; 8] = b"USRECORD";

#[derive(Parser)]
struct Args {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Answers every datagram with the same bytes, forever.
    UdpEcho {
        /// Address to bind.
        #[arg(long)]
        bind: SocketAddr,
    },
    /// Sends a datagram until it is echoed (up to `--tries`), prints the answer.
    UdpPing {
        /// Where to send.
        #[arg(long)]
        to: SocketAddr,
        /// What to send.
        #[arg(long)]
        message: String,
        /// Attempts, one per second.
        #[arg(long, default_value_t = 30)]
        tries: u32,
    },
    /// Writes records 0, 1, 2, ... round-robin over the devices (record i to device i mod n, at
    /// block i div n), each made durable before the next is written, until killed.
    WriteRecords {
        /// Block devices or files.
        #[arg(required = true)]
        devices: Vec<PathBuf>,
        /// Pause between records.
        #[arg(long, default_value_t = 2)]
        pause_ms: u64,
        /// Directory of the quiesce handshake (see `quiesce`): while `<dir>/quiesce` exists the
        /// writer holds `<dir>/quiet` and writes nothing.
        #[arg(long)]
        quiesce_dir: Option<PathBuf>,
    },
    /// Asks a writer to stop writing and waits until it has (an application's freeze hook).
    Quiesce {
        /// The writer's --quiesce-dir.
        #[arg(long)]
        dir: PathBuf,
        /// How long to wait for the writer.
        #[arg(long, default_value_t = 10_000)]
        timeout_ms: u64,
    },
    /// Lets a quiesced writer go on (the thaw hook).
    Resume {
        /// The writer's --quiesce-dir.
        #[arg(long)]
        dir: PathBuf,
    },
    /// Overwrites a fraction of each device's 64 KiB blocks, at distinct random places, with
    /// random data, made durable; with `--every-ms`, again each period (spread over it),
    /// until killed. Prints per round the blocks and bytes written.
    Scribble {
        /// Block devices or files.
        #[arg(required = true)]
        devices: Vec<PathBuf>,
        /// Fraction of the blocks to change per round (0.01: 1%).
        #[arg(long)]
        fraction: f64,
        /// Seed of the places and data.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Repeat every this many milliseconds, forever.
        #[arg(long)]
        every_ms: Option<u64>,
    },
    /// Prints, per device, how many records it holds from 0 on with no gap; fails on a gap or
    /// on a damaged record.
    CheckRecords {
        /// Block devices or files, in the writer's order.
        #[arg(required = true)]
        devices: Vec<PathBuf>,
        /// How many devices the writer wrote to (default: as many as given here, that is
        /// all of them); the given ones are its first.
        #[arg(long)]
        writer_devices: Option<u64>,
    },
}

fn main() -> Result<()> {
    match Args::parse().command {
        Cmd::UdpEcho { bind } => echo(bind),
        Cmd::UdpPing { to, message, tries } => ping(to, &message, tries),
        Cmd::WriteRecords {
            devices,
            pause_ms,
            quiesce_dir,
        } => write_records(&devices, pause_ms, quiesce_dir.as_deref()),
        Cmd::Quiesce { dir, timeout_ms } => quiesce(&dir, timeout_ms),
        Cmd::Resume { dir } => {
            let _ = std::fs::remove_file(dir.join("quiesce"));
            Ok(())
        }
        Cmd::Scribble {
            devices,
            fraction,
            seed,
            every_ms,
        } => scribble(&devices, fraction, seed, every_ms),
        Cmd::CheckRecords {
            devices,
            writer_devices,
        } => {
            let n = writer_devices.unwrap_or(devices.len() as u64);
            check_records(&devices, n)
        }
    }
}

fn echo(bind: SocketAddr) -> Result<()> {
    let s = UdpSocket::bind(bind).with_context(|| format!("binding {bind}"))?;
    println!("listening on {}", s.local_addr()?);
    let mut buf = [0u8; 2048];
    loop {
        let (n, from) = s.recv_from(&mut buf)?;
        println!("from {from}: {}", String::from_utf8_lossy(&buf[..n]));
        s.send_to(&buf[..n], from)?;
    }
}

fn ping(to: SocketAddr, message: &str, tries: u32) -> Result<()> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let mut buf = [0u8; 2048];
    for _ in 0..tries {
        s.send_to(message.as_bytes(), to)?;
        if let Ok((n, from)) = s.recv_from(&mut buf) {
            println!("reply from {from}: {}", String::from_utf8_lossy(&buf[..n]));
            return Ok(());
        }
    }
    bail!("no reply from {to} after {tries} tries")
}

fn record(seq: u64) -> Vec<u8> {
    let mut b = vec![0u8; RECORD as usize];
    b[..8].copy_from_slice(MAGIC);
    b[8..16].copy_from_slice(&seq.to_le_bytes());
    let h = blake3::hash(&b[..16]);
    b[16..48].copy_from_slice(h.as_bytes());
    b
}

fn quiesce(dir: &std::path::Path, timeout_ms: u64) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("quiesce"), b"")?;
    let deadline = std::time::Instant::now() + Duration::from_millis(timeout_ms);
    while !dir.join("quiet").exists() {
        if std::time::Instant::now() > deadline {
            let _ = std::fs::remove_file(dir.join("quiesce"));
            bail!("the writer did not quiesce within {timeout_ms} ms");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    println!("quiet");
    Ok(())
}

/// Holds the writer while a quiesce is asked for: acknowledges with `quiet`, waits for the
/// request to go, then withdraws the acknowledgement.
fn hold_if_asked(dir: Option<&std::path::Path>) -> Result<()> {
    let Some(dir) = dir else { return Ok(()) };
    if !dir.join("quiesce").exists() {
        return Ok(());
    }
    std::fs::write(dir.join("quiet"), b"")?;
    while dir.join("quiesce").exists() {
        std::thread::sleep(Duration::from_millis(2));
    }
    std::fs::remove_file(dir.join("quiet"))?;
    Ok(())
}

fn write_records(
    devices: &[PathBuf],
    pause_ms: u64,
    quiesce_dir: Option<&std::path::Path>,
) -> Result<()> {
    if let Some(d) = quiesce_dir {
        std::fs::create_dir_all(d)?;
    }
    let files: Vec<File> = devices
        .iter()
        .map(|d| {
            OpenOptions::new()
                .write(true)
                .create(d.parent().is_some_and(|p| !p.starts_with("/dev")))
                .truncate(false)
                .open(d)
                .with_context(|| format!("opening {}", d.display()))
        })
        .collect::<Result<_>>()?;
    let n = files.len() as u64;
    for seq in 0.. {
        hold_if_asked(quiesce_dir)?;
        let f = &files[(seq % n) as usize];
        f.write_all_at(&record(seq), seq / n * RECORD)?;
        f.sync_data()?;
        if seq % 100 == 0 {
            println!("wrote {}", seq + 1);
        }
        std::thread::sleep(Duration::from_millis(pause_ms));
    }
    Ok(())
}

fn check_records(devices: &[PathBuf], n: u64) -> Result<()> {
    let mut counts = Vec::new();
    for (d, path) in devices.iter().enumerate() {
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let mut buf = vec![0u8; RECORD as usize];
        let mut count = 0u64;
        loop {
            let at = count * RECORD;
            if f.read_exact_at(&mut buf, at).is_err() || buf[..8] != MAGIC[..] {
                break;
            }
            let want = count * n + d as u64;
            if buf != record(want) {
                bail!(
                    "{}: block {count} holds a damaged record (want seq {want})",
                    path.display()
                );
            }
            count += 1;
        }
        // Nothing may follow the first missing record.
        for later in count + 1..count + 64 {
            if f.read_exact_at(&mut buf, later * RECORD).is_ok() && buf[..8] == MAGIC[..] {
                bail!(
                    "{}: record at block {later} after a gap at block {count}",
                    path.display()
                );
            }
        }
        counts.push(count);
    }
    println!("{}", serde_json::json!({ "counts": counts }));
    Ok(())
}

/// The scribbler's block.
const SCRIBBLE_BLOCK: u64 = 64 << 10;

fn scribble(devices: &[PathBuf], fraction: f64, seed: u64, every_ms: Option<u64>) -> Result<()> {
    use rand::{RngExt, SeedableRng};
    if !(0.0..=1.0).contains(&fraction) {
        bail!("--fraction {fraction} is not between 0 and 1");
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let files: Vec<(File, u64)> = devices
        .iter()
        .map(|d| {
            let f = OpenOptions::new()
                .write(true)
                .open(d)
                .with_context(|| format!("opening {}", d.display()))?;
            let size = size_of(&f).with_context(|| format!("sizing {}", d.display()))?;
            Ok((f, size / SCRIBBLE_BLOCK))
        })
        .collect::<Result<_>>()?;
    let mut data = vec![0u8; SCRIBBLE_BLOCK as usize];
    loop {
        let round = std::time::Instant::now();
        let per_device: Vec<u64> = files
            .iter()
            .map(|(_, blocks)| (*blocks as f64 * fraction).round() as u64)
            .collect();
        let total: u64 = per_device.iter().sum();
        let pause = every_ms.map(|p| Duration::from_millis(p) / total.max(1) as u32);
        for ((f, blocks), n) in files.iter().zip(&per_device) {
            let places = rand::seq::index::sample(&mut rng, *blocks as usize, *n as usize);
            for b in places {
                rng.fill(&mut data[..]);
                f.write_all_at(&data, b as u64 * SCRIBBLE_BLOCK)?;
                if let Some(p) = pause {
                    f.sync_data()?;
                    std::thread::sleep(p.saturating_sub(Duration::from_micros(100)));
                }
            }
            f.sync_data()?;
        }
        println!(
            "{{\"blocks\": {total}, \"bytes\": {}}}",
            total * SCRIBBLE_BLOCK
        );
        let Some(p) = every_ms else { return Ok(()) };
        std::thread::sleep(Duration::from_millis(p).saturating_sub(round.elapsed()));
    }
}

/// A file's or block device's size.
fn size_of(f: &File) -> Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    Ok(f.seek(SeekFrom::End(0))?)
}
