//! Sealed objects of an encrypted archive (docs/store-format.md, "Archive encryption"): a pack
//! is sealed frame by frame, each frame on its own with AES-256-GCM under the archive's newest
//! key generation, bound to its keyed address; a catalog snapshot is sealed in segments bound
//! to its stamp and their order. Nothing of a block, a manifest or a chunk address is left in
//! the clear.
//!
//! ```text
//! sealed pack                           sealed snapshot
//!  0  8 magic "USPACK01"                 0  8 magic "USSNAP01"
//!  8  4 pack id, u32 LE                  8  4 key generation, u32 LE
//! 12  4 key generation, u32 LE          12  4 reserved, zero
//! 16  . records, one per frame:         16  . segments of at most 1 MiB:
//!       32 keyed address                      12 nonce
//!       12 nonce                               4 sealed length, u32 LE
//!        4 sealed length, u32 LE               . AES-GCM(segment) + tag,
//!        . AES-GCM(frame) + tag,                 AD = stamp, index, last?
//!          AD = keyed address
//! ```
//! A pack's nonces are derived from the pack id, the frame's offset in the local pack and the
//! frame's BLAKE3 ([`DataKey::nonce`]): sealing a pack again (an upload resumed after a crash)
//! gives the same bytes, and pack ids are never reused, so no nonce repeats with other data.
//! Opening re-derives each nonce, so a record moved to another place in the pack is refused.

use anyhow::{Context, Result, bail, ensure};
use ring::rand::{SecureRandom, SystemRandom};
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use understudy_common::chunk::{self, HEADER_LEN, MAX_PAYLOAD};
use understudy_common::keys::{DataKey, Keyring, TAG_LEN};
use understudy_common::store::pack::{PACK_HEADER_LEN, check_header, pack_header};

const PACK_MAGIC: &[u8; 8] = b"USPACK01";
const SNAP_MAGIC: &[u8; 8] = b"USSNAP01";
/// A record's clear prefix: keyed address, nonce, sealed length.
const RECORD_PREFIX: usize = 32 + 12 + 4;
/// A snapshot segment's plain size.
const SEGMENT: usize = 1 << 20;

/// The sealed size of a pack of `len` bytes holding `frames` frames.
pub fn sealed_pack_len(len: u64, frames: u64) -> u64 {
    len + frames * (RECORD_PREFIX + TAG_LEN) as u64
}

/// Calls `each(offset, header)` for every frame in the first `len` bytes of local pack `id`
/// (open at `file`), in order; returns how many there were.
fn frames_of(
    file: &std::fs::File,
    id: u32,
    len: u64,
    mut each: impl FnMut(u64, &chunk::Header) -> Result<()>,
) -> Result<u64> {
    check_header(file, id)?;
    let (mut at, mut frames) = (PACK_HEADER_LEN, 0);
    while at < len {
        let mut head = [0u8; HEADER_LEN];
        file.read_exact_at(&mut head, at)
            .with_context(|| format!("pack {id} ends inside the frame at offset {at}"))?;
        let h = chunk::parse_header(&head)
            .with_context(|| format!("pack {id}: the frame at offset {at} is damaged"))?;
        ensure!(
            at + h.frame_len() as u64 <= len,
            "pack {id}: the frame at offset {at} runs past the pack's committed length {len}"
        );
        each(at, &h)?;
        at += h.frame_len() as u64;
        frames += 1;
    }
    Ok(frames)
}

fn open(path: &Path) -> Result<std::fs::File> {
    std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))
}

/// Seals the first `len` bytes of local pack `id` at `src` into `dst`; returns the sealed length.
pub fn seal_pack(key: &DataKey, id: u32, src: &Path, len: u64, dst: &Path) -> Result<u64> {
    let file = open(src)?;
    let mut out = BufWriter::new(create(dst)?);
    out.write_all(PACK_MAGIC)?;
    out.write_all(&id.to_le_bytes())?;
    out.write_all(&key.generation().to_le_bytes())?;
    let mut frame = Vec::new();
    let frames = frames_of(&file, id, len, |at, h| {
        frame.resize(h.frame_len(), 0);
        file.read_exact_at(&mut frame, at)?;
        let addr = key.address(&h.hash.0);
        let nonce = frame_nonce(key, id, at, &frame);
        key.seal(nonce, &addr, &mut frame);
        out.write_all(&addr)?;
        out.write_all(&nonce)?;
        out.write_all(&(frame.len() as u32).to_le_bytes())?;
        out.write_all(&frame)?;
        Ok(())
    })?;
    finish(out)?;
    Ok(sealed_pack_len(len, frames))
}

/// The nonce of the frame at `offset` of local pack `id`.
fn frame_nonce(key: &DataKey, id: u32, offset: u64, frame: &[u8]) -> [u8; 12] {
    key.nonce(&[
        b"pack",
        &id.to_le_bytes(),
        &offset.to_le_bytes(),
        blake3::hash(frame).as_bytes(),
    ])
}

/// The sealed length of the first `len` bytes of local pack `id` (its frames counted from
/// their headers, nothing decoded).
pub fn pack_sealed_len(src: &Path, id: u32, len: u64) -> Result<u64> {
    let frames = frames_of(&open(src)?, id, len, |_, _| Ok(()))?;
    Ok(sealed_pack_len(len, frames))
}

/// Opens the sealed object at `src`, checks its magic, and returns it past its 16-byte header,
/// and the header.
fn sealed_header(
    src: &Path,
    magic: &[u8; 8],
    what: &str,
) -> Result<(BufReader<std::fs::File>, [u8; 16])> {
    let mut input = BufReader::new(open(src)?);
    let mut head = [0u8; 16];
    input
        .read_exact(&mut head)
        .with_context(|| format!("shorter than a sealed {what}'s header"))?;
    ensure!(
        &head[..8] == magic,
        "not a sealed {what} (bad magic): the object is damaged, or the archive is not encrypted"
    );
    Ok((input, head))
}

/// Opens sealed pack `id` at `src` into the local pack `dst`; returns its local length. Every
/// frame must open under its generation's key and sit at the address it was sealed for.
pub fn open_pack(keys: &Keyring, id: u32, src: &Path, dst: &Path) -> Result<u64> {
    let (mut input, head) = sealed_header(src, PACK_MAGIC, "pack")?;
    let got = u32::from_le_bytes(head[8..12].try_into().expect("4"));
    ensure!(got == id, "holds pack {got}, not pack {id}");
    let key = keys.get(u32::from_le_bytes(head[12..16].try_into().expect("4")))?;
    let mut out = BufWriter::new(create(dst)?);
    out.write_all(&pack_header(id))?;
    let (mut read, mut len) = (16u64, PACK_HEADER_LEN);
    let mut buf = Vec::new();
    loop {
        let mut prefix = [0u8; RECORD_PREFIX];
        match read_full(&mut input, &mut prefix)? {
            0 => break,
            RECORD_PREFIX => {}
            _ => bail!("cut short inside the record at byte {read}"),
        }
        let addr: [u8; 32] = prefix[..32].try_into().expect("32");
        let nonce: [u8; 12] = prefix[32..44].try_into().expect("12");
        let sealed = u32::from_le_bytes(prefix[44..].try_into().expect("4")) as usize;
        ensure!(
            (HEADER_LEN + TAG_LEN..=HEADER_LEN + MAX_PAYLOAD as usize + TAG_LEN).contains(&sealed),
            "the record at byte {read} claims {sealed} sealed bytes: the object is damaged"
        );
        buf.resize(sealed, 0);
        input
            .read_exact(&mut buf)
            .with_context(|| format!("cut short inside the record at byte {read}"))?;
        let n = key
            .open(nonce, &addr, &mut buf)
            .with_context(|| format!("the record at byte {read}"))?;
        let h = chunk::parse_header(&buf[..n])
            .with_context(|| format!("the frame of the record at byte {read} is damaged"))?;
        let here = frame_nonce(key, id, len, &buf[..n]);
        ensure!(
            h.frame_len() == n && key.address(&h.hash.0) == addr && here == nonce,
            "the record at byte {read} is not the frame sealed for that place (records moved?)"
        );
        out.write_all(&buf[..n])?;
        read += (RECORD_PREFIX + sealed) as u64;
        len += n as u64;
    }
    finish(out)?;
    Ok(len)
}

/// The additional data of a snapshot segment.
fn segment_aad(stamp: &str, index: u64, last: bool) -> Vec<u8> {
    let mut a = format!("understudy snapshot {stamp}\0").into_bytes();
    a.extend_from_slice(&index.to_le_bytes());
    a.push(last as u8);
    a
}

/// Bit 31 of a segment's length field: this is the last segment.
const LAST: u32 = 1 << 31;

/// Seals catalog snapshot `stamp` at `src` into `dst`; returns the sealed length.
pub fn seal_snapshot(key: &DataKey, stamp: &str, src: &Path, dst: &Path) -> Result<u64> {
    let rng = SystemRandom::new();
    let mut input = BufReader::new(open(src)?);
    let mut out = BufWriter::new(create(dst)?);
    out.write_all(SNAP_MAGIC)?;
    out.write_all(&key.generation().to_le_bytes())?;
    out.write_all(&[0; 4])?;
    let mut total = 16u64;
    let (mut seg, mut next) = (vec![0u8; SEGMENT], vec![0u8; SEGMENT]);
    let mut n = read_full(&mut input, &mut seg)?;
    for index in 0.. {
        let m = if n == SEGMENT {
            read_full(&mut input, &mut next)?
        } else {
            0
        };
        let last = m == 0;
        let mut data = seg[..n].to_vec();
        let mut nonce = [0u8; 12];
        rng.fill(&mut nonce)
            .map_err(|_| anyhow::anyhow!("no system randomness"))?;
        key.seal(nonce, &segment_aad(stamp, index, last), &mut data);
        let field = data.len() as u32 | if last { LAST } else { 0 };
        out.write_all(&nonce)?;
        out.write_all(&field.to_le_bytes())?;
        out.write_all(&data)?;
        total += (16 + data.len()) as u64;
        if last {
            break;
        }
        std::mem::swap(&mut seg, &mut next);
        n = m;
    }
    finish(out)?;
    Ok(total)
}

/// Opens sealed snapshot `stamp` at `src` into `dst`. A segment moved, dropped or altered, or
/// the object cut short, fails.
pub fn open_snapshot(keys: &Keyring, stamp: &str, src: &Path, dst: &Path) -> Result<()> {
    let (mut input, head) = sealed_header(src, SNAP_MAGIC, "snapshot")?;
    let key = keys.get(u32::from_le_bytes(head[8..12].try_into().expect("4")))?;
    let mut out = BufWriter::new(create(dst)?);
    let mut buf = Vec::new();
    for index in 0.. {
        let mut prefix = [0u8; 16];
        if read_full(&mut input, &mut prefix)? != 16 {
            bail!("cut short before its last segment (segment {index})");
        }
        let nonce: [u8; 12] = prefix[..12].try_into().expect("12");
        let field = u32::from_le_bytes(prefix[12..].try_into().expect("4"));
        let (last, sealed) = (field & LAST != 0, (field & !LAST) as usize);
        ensure!(
            (TAG_LEN..=SEGMENT + TAG_LEN).contains(&sealed),
            "segment {index} claims {sealed} sealed bytes: the object is damaged"
        );
        buf.resize(sealed, 0);
        input
            .read_exact(&mut buf)
            .with_context(|| format!("cut short inside segment {index}"))?;
        let n = key
            .open(nonce, &segment_aad(stamp, index, last), &mut buf)
            .with_context(|| format!("segment {index} of snapshot {stamp}"))?;
        out.write_all(&buf[..n])?;
        if last {
            ensure!(
                read_full(&mut input, &mut [0u8; 1])? == 0,
                "bytes follow its last segment: the object is damaged"
            );
            break;
        }
    }
    finish(out)
}

fn create(path: &Path) -> Result<std::fs::File> {
    std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))
}

fn finish(out: BufWriter<std::fs::File>) -> Result<()> {
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(())
}

/// Reads until `buf` is full or the input ends; the bytes read.
fn read_full(input: &mut impl Read, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match input.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use understudy_common::keys::{Kek, KekSource, KeyObject};
    use understudy_common::store::pack::PackWriter;

    fn ring(dir: &Path) -> Keyring {
        let p = dir.join("kek");
        std::fs::write(&p, [3u8; 32]).unwrap();
        let kek = Kek::load(KekSource::File(p)).unwrap();
        let mut ring = Keyring::default();
        ring.insert(KeyObject::create(&kek, 1).unwrap().1);
        ring
    }

    /// A pack of three frames (one of them compressible); its path and length.
    fn pack(dir: &Path) -> (std::path::PathBuf, u64) {
        let mut w = PackWriter::create(dir, 5).unwrap();
        for seed in 0..3u8 {
            let raw: Vec<u8> = if seed == 1 {
                vec![b'a'; 70_000]
            } else {
                let mut v = vec![0u8; 65_536];
                blake3::Hasher::new()
                    .update(&[seed])
                    .finalize_xof()
                    .fill(&mut v);
                v
            };
            w.append(&chunk::encode(&raw, 3)).unwrap();
        }
        let len = w.sync().unwrap();
        (understudy_common::store::pack::pack_path(dir, 5), len)
    }

    #[test]
    fn a_pack_opens_to_its_bytes_and_seals_again_to_the_same_object() {
        let d = tempfile::tempdir().unwrap();
        let keys = ring(d.path());
        let key = keys.current().unwrap();
        let (src, len) = pack(d.path());
        let (a, b, back) = (
            d.path().join("a"),
            d.path().join("b"),
            d.path().join("back"),
        );
        let n = seal_pack(key, 5, &src, len, &a).unwrap();
        assert_eq!(n, std::fs::metadata(&a).unwrap().len());
        assert_eq!(n, pack_sealed_len(&src, 5, len).unwrap());
        seal_pack(key, 5, &src, len, &b).unwrap();
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        assert_eq!(open_pack(&keys, 5, &a, &back).unwrap(), len);
        assert_eq!(
            std::fs::read(&back).unwrap(),
            std::fs::read(&src).unwrap()[..len as usize]
        );
        // No frame header (which holds the plain hash) is left in the clear.
        let sealed = std::fs::read(&a).unwrap();
        assert!(!sealed.windows(4).any(|w| w == b"UCK1"));
        assert!(
            open_pack(&keys, 6, &a, &back).is_err(),
            "opened as another pack"
        );
    }

    #[test]
    fn an_altered_cut_or_reordered_pack_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let keys = ring(d.path());
        let (src, len) = pack(d.path());
        let sealed = d.path().join("sealed");
        seal_pack(keys.current().unwrap(), 5, &src, len, &sealed).unwrap();
        let good = std::fs::read(&sealed).unwrap();
        let try_open = |bytes: &[u8]| {
            let p = d.path().join("try");
            std::fs::write(&p, bytes).unwrap();
            open_pack(&keys, 5, &p, &d.path().join("out")).map_err(|e| format!("{e:#}"))
        };
        let mut flipped = good.clone();
        flipped[16 + RECORD_PREFIX + 10] ^= 1;
        assert!(try_open(&flipped).unwrap_err().contains("does not decrypt"));
        assert!(
            try_open(&good[..good.len() - 1])
                .unwrap_err()
                .contains("cut short")
        );
        // The first and third records (same sealed length) swapped: each opens, neither is in
        // its place.
        let rec = |i: usize| {
            let mut at = 16;
            for _ in 0..i {
                let l = u32::from_le_bytes(good[at + 44..at + 48].try_into().unwrap()) as usize;
                at += RECORD_PREFIX + l;
            }
            let l = u32::from_le_bytes(good[at + 44..at + 48].try_into().unwrap()) as usize;
            at..at + RECORD_PREFIX + l
        };
        let (r0, r2) = (rec(0), rec(2));
        assert_eq!(r0.len(), r2.len());
        let mut swapped = good.clone();
        swapped[r0.clone()].copy_from_slice(&good[r2.clone()]);
        swapped[r2].copy_from_slice(&good[r0]);
        assert!(try_open(&swapped).unwrap_err().contains("records moved"));
    }

    #[test]
    fn a_snapshot_opens_whole_and_refuses_a_cut_or_a_dropped_segment() {
        let d = tempfile::tempdir().unwrap();
        let keys = ring(d.path());
        let plain: Vec<u8> = (0..SEGMENT * 2 + 1000).map(|i| (i % 251) as u8).collect();
        let (src, sealed, back) = (d.path().join("s"), d.path().join("x"), d.path().join("b"));
        std::fs::write(&src, &plain).unwrap();
        seal_snapshot(keys.current().unwrap(), "0001", &src, &sealed).unwrap();
        open_snapshot(&keys, "0001", &sealed, &back).unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), plain);
        assert!(
            open_snapshot(&keys, "0002", &sealed, &back).is_err(),
            "opened as another stamp"
        );
        let good = std::fs::read(&sealed).unwrap();
        let seg = 16 + SEGMENT + TAG_LEN;
        let try_open = |bytes: &[u8]| {
            let p = d.path().join("try");
            std::fs::write(&p, bytes).unwrap();
            open_snapshot(&keys, "0001", &p, &back).map_err(|e| format!("{e:#}"))
        };
        // Cut after two whole segments.
        assert!(
            try_open(&good[..16 + 2 * seg])
                .unwrap_err()
                .contains("cut short")
        );
        // Cut there, the second segment marked last: its tag no longer matches.
        let mut dropped = good[..16 + 2 * seg].to_vec();
        let field = 16 + seg + 12;
        dropped[field + 3] |= 0x80;
        assert!(try_open(&dropped).unwrap_err().contains("does not decrypt"));
        let mut longer = good.clone();
        longer.push(0);
        assert!(
            try_open(&longer)
                .unwrap_err()
                .contains("follow its last segment")
        );
    }

    #[test]
    fn an_empty_snapshot_seals_to_one_segment() {
        let d = tempfile::tempdir().unwrap();
        let keys = ring(d.path());
        let (src, sealed, back) = (d.path().join("s"), d.path().join("x"), d.path().join("b"));
        std::fs::write(&src, b"").unwrap();
        let n = seal_snapshot(keys.current().unwrap(), "1", &src, &sealed).unwrap();
        assert_eq!(n, (16 + 16 + TAG_LEN) as u64);
        open_snapshot(&keys, "1", &sealed, &back).unwrap();
        assert!(std::fs::read(&back).unwrap().is_empty());
    }
}
