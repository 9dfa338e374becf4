//! The chunk frame: one block, compressed (or not) and hashed. The same bytes travel on a data
//! stream and sit in a pack file; nothing recompresses them on the way.
//!
//! ```text
//! offset size field
//!      0    4 magic "UCK1"
//!      4    1 codec: 0 = raw, 1 = zstd
//!      5    3 reserved, zero
//!      8    4 raw_len      (u32 LE) length of the block's bytes, 1..=MAX_BLOCK_SIZE
//!     12    4 payload_len  (u32 LE) length of what follows; raw_len when codec = raw
//!     16   32 hash         BLAKE3 of the raw bytes
//!     48    . payload
//! ```

use crate::MAX_BLOCK_SIZE;
use crate::hash::ChunkHash;

/// Bytes before the payload.
pub const HEADER_LEN: usize = 48;
const MAGIC: &[u8; 4] = b"UCK1";
/// Largest payload accepted: a zstd frame of an incompressible block is a little larger than it.
pub const MAX_PAYLOAD: u32 = MAX_BLOCK_SIZE + MAX_BLOCK_SIZE / 64 + 1024;

/// How a payload is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// The raw bytes: used when compression would not save at least 1/32 of the block.
    Raw = 0,
    /// One zstd frame.
    Zstd = 1,
}

/// A frame's parsed header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Payload encoding.
    pub codec: Codec,
    /// Length of the raw block.
    pub raw_len: u32,
    /// Length of the payload that follows the header.
    pub payload_len: u32,
    /// BLAKE3 of the raw block.
    pub hash: ChunkHash,
}

impl Header {
    /// Whole frame length (header + payload).
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("chunk frame is truncated: {have} bytes, need {need}")]
    Truncated { have: usize, need: usize },
    #[error("chunk frame has a bad magic (not an Understudy chunk, or the data is damaged)")]
    BadMagic,
    #[error("chunk frame uses unknown codec {0}")]
    UnknownCodec(u8),
    #[error(
        "chunk frame declares raw length {raw_len} and payload length {payload_len}, outside the limits (raw 1..={MAX_BLOCK_SIZE}, payload <= {MAX_PAYLOAD})"
    )]
    BadLength { raw_len: u32, payload_len: u32 },
    #[error("chunk payload does not decompress: {0}")]
    Decompress(String),
    #[error("chunk holds {declared} bytes where the block is {expected} bytes")]
    WrongBlockLength { expected: usize, declared: u32 },
    #[error(
        "chunk content does not match its hash (declared {declared}, actual {actual}): the data was damaged"
    )]
    HashMismatch {
        declared: ChunkHash,
        actual: ChunkHash,
    },
}

thread_local! {
    /// One zstd compression context per thread, reused for every block (creating one per block
    /// costs an allocation and its initialisation on the hot path).
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { std::cell::RefCell::new(None) };
    /// One zstd decompression context per thread.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
}

fn compress(raw: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.as_ref().map(|(l, _)| *l) != Some(level) {
            *c = Some((level, zstd::bulk::Compressor::new(level)?));
        }
        c.as_mut().expect("just set").1.compress(raw)
    })
}

/// Decompresses `payload` into `out`; returns the bytes written.
fn decompress_into(payload: &[u8], out: &mut [u8]) -> std::io::Result<usize> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = Some(zstd::bulk::Decompressor::new()?);
        }
        d.as_mut()
            .expect("just set")
            .decompress_to_buffer(payload, out)
    })
}

/// Builds the frame of one block: hashes it, compresses it at `level` unless that saves too little.
pub fn encode(raw: &[u8], level: i32) -> Vec<u8> {
    let hash = ChunkHash::of(raw);
    encode_with_hash(raw, hash, level)
}

/// Windows sampled by [`looks_incompressible`], spread evenly over the block.
const SAMPLE_WINDOWS: usize = 16;
/// Bytes per sampled window.
const SAMPLE_WINDOW: usize = 256;
/// Order-0 entropy, in bits per byte, above which a sample counts as incompressible. Random and
/// already-compressed data measure about 7.95 on a 4 KiB sample, log text 4 to 5.5.
const INCOMPRESSIBLE_BITS: f64 = 7.6;

/// True when a cheap sample says zstd would not save anything: the sampled bytes are near
/// uniformly distributed and no two sampled windows repeat (repeated pages of random data
/// compress, though each page looks random). Sampling 4 KiB costs about 1/50 of trying zstd on
/// 64 KiB of random data. Blocks too small to sample are always tried.
pub fn looks_incompressible(raw: &[u8]) -> bool {
    if raw.len() < 2 * SAMPLE_WINDOWS * SAMPLE_WINDOW {
        return false;
    }
    let step = raw.len() / SAMPLE_WINDOWS;
    let windows: Vec<&[u8]> = (0..SAMPLE_WINDOWS)
        .map(|w| &raw[w * step..w * step + SAMPLE_WINDOW])
        .collect();
    let mut counts = [0u32; 256];
    for b in windows.iter().flat_map(|w| w.iter()) {
        counts[*b as usize] += 1;
    }
    let n = (SAMPLE_WINDOWS * SAMPLE_WINDOW) as f64;
    let bits: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum();
    let repeats = || (0..windows.len()).any(|i| windows[i + 1..].iter().any(|w| *w == windows[i]));
    bits > INCOMPRESSIBLE_BITS && !repeats()
}

/// As [`encode`], with the hash already computed by the caller.
pub fn encode_with_hash(raw: &[u8], hash: ChunkHash, level: i32) -> Vec<u8> {
    let compressed = Some(raw)
        .filter(|r| !looks_incompressible(r))
        .and_then(|r| compress(r, level).ok())
        .filter(|c| c.len() < raw.len() - raw.len() / 32);
    let (codec, payload) = match &compressed {
        Some(c) => (Codec::Zstd, c.as_slice()),
        None => (Codec::Raw, raw),
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.push(codec as u8);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&hash.0);
    out.extend_from_slice(payload);
    out
}

/// Parses and bounds-checks a header; never allocates.
pub fn parse_header(buf: &[u8]) -> Result<Header, FrameError> {
    if buf.len() < HEADER_LEN {
        return Err(FrameError::Truncated {
            have: buf.len(),
            need: HEADER_LEN,
        });
    }
    if &buf[0..4] != MAGIC {
        return Err(FrameError::BadMagic);
    }
    let codec = match buf[4] {
        0 => Codec::Raw,
        1 => Codec::Zstd,
        c => return Err(FrameError::UnknownCodec(c)),
    };
    let raw_len = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    let payload_len = u32::from_le_bytes(buf[12..16].try_into().expect("4 bytes"));
    let lengths_ok = (1..=MAX_BLOCK_SIZE).contains(&raw_len)
        && payload_len <= MAX_PAYLOAD
        && (codec != Codec::Raw || payload_len == raw_len);
    if !lengths_ok {
        return Err(FrameError::BadLength {
            raw_len,
            payload_len,
        });
    }
    let hash = ChunkHash(buf[16..48].try_into().expect("32 bytes"));
    Ok(Header {
        codec,
        raw_len,
        payload_len,
        hash,
    })
}

/// Reads the `len` bytes of a frame stored at `offset` of `file` (a pack or a spool) into `buf`,
/// resized to them. A buffer kept between calls is neither zeroed again nor reallocated.
pub fn read_stored(
    file: &std::fs::File,
    offset: u64,
    len: usize,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    buf.resize(len, 0);
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

/// Decodes a whole frame into the block's raw bytes and checks them against the frame's hash.
pub fn decode(frame: &[u8]) -> Result<(Header, Vec<u8>), FrameError> {
    let header = parse_header(frame)?;
    let mut raw = vec![0u8; header.raw_len as usize];
    decode_into(frame, &mut raw)?;
    Ok((header, raw))
}

/// Decodes a whole frame into `out`, which must be exactly the block's length, and checks the
/// bytes against the frame's hash. Nothing is allocated: the restore decodes into its write
/// buffer.
pub fn decode_into(frame: &[u8], out: &mut [u8]) -> Result<Header, FrameError> {
    let header = parse_header(frame)?;
    if frame.len() != header.frame_len() {
        return Err(FrameError::Truncated {
            have: frame.len(),
            need: header.frame_len(),
        });
    }
    if out.len() != header.raw_len as usize {
        return Err(FrameError::WrongBlockLength {
            expected: out.len(),
            declared: header.raw_len,
        });
    }
    let payload = &frame[HEADER_LEN..];
    match header.codec {
        Codec::Raw => out.copy_from_slice(payload),
        Codec::Zstd => {
            let n =
                decompress_into(payload, out).map_err(|e| FrameError::Decompress(e.to_string()))?;
            if n != out.len() {
                return Err(FrameError::Decompress(format!(
                    "got {n} bytes, header says {}",
                    header.raw_len
                )));
            }
        }
    }
    let actual = ChunkHash::of(out);
    if actual != header.hash {
        return Err(FrameError::HashMismatch {
            declared: header.hash,
            actual,
        });
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn compressible_blocks_are_compressed_and_random_ones_are_not() {
        let text = b"2026-11-21 INFO request served in 3ms\n".repeat(2000);
        let f = encode(&text, 1);
        assert_eq!(parse_header(&f).unwrap().codec, Codec::Zstd);
        assert!(f.len() < text.len() / 4);
        let noise: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let g = encode(&noise, 1);
        let (h, raw) = decode(&g).unwrap();
        assert_eq!(raw, noise);
        assert_eq!(h.hash, ChunkHash::of(&noise));
    }

    fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        blake3::Hasher::new()
            .update(&seed.to_le_bytes())
            .finalize_xof()
            .fill(&mut out);
        out
    }

    #[test]
    fn the_sample_skips_random_blocks_and_keeps_compressible_ones() {
        let random = random_bytes(1, 65536);
        assert!(looks_incompressible(&random));
        assert_eq!(parse_header(&encode(&random, 1)).unwrap().codec, Codec::Raw);
        let text =
            b"2026-11-21T03:04:05.123Z INFO req=1f2e3d4c GET /api/orders 200 12ms\n".repeat(1000);
        assert!(!looks_incompressible(&text[..65536]));
        // Each 4 KiB page looks random, but the block repeats one page: zstd halves it at least.
        let pages = random_bytes(2, 4096).repeat(16);
        assert!(!looks_incompressible(&pages));
        let f = encode(&pages, 1);
        assert_eq!(parse_header(&f).unwrap().codec, Codec::Zstd);
        assert!(f.len() < pages.len() / 2);
        // Half random, half zeros: the sample sees the zeros and zstd gets its chance.
        let mut half = random_bytes(3, 65536);
        half[32768..].fill(0);
        assert!(!looks_incompressible(&half));
        assert_eq!(parse_header(&encode(&half, 1)).unwrap().codec, Codec::Zstd);
        // Too small to sample: always tried.
        assert!(!looks_incompressible(&random[..4096]));
    }

    #[test]
    fn a_flipped_payload_bit_is_detected() {
        let data = vec![5u8; 4096];
        let mut f = encode(&data, 1);
        let last = f.len() - 1;
        f[last] ^= 1;
        assert!(decode(&f).is_err());
        let mut raw = encode(
            &(0..4096u32)
                .map(|i| (i * 7919 % 251) as u8)
                .collect::<Vec<_>>(),
            1,
        );
        raw[HEADER_LEN + 10] ^= 0x40;
        assert!(matches!(
            decode(&raw),
            Err(FrameError::HashMismatch { .. }) | Err(FrameError::Decompress(_))
        ));
    }

    #[test]
    fn lengths_from_the_frame_are_bounded() {
        let mut f = encode(&[1u8; 100], 1);
        f[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            parse_header(&f),
            Err(FrameError::BadLength { .. })
        ));
    }

    #[test]
    fn decode_into_fills_the_block_and_refuses_another_length() {
        let text = b"2026-11-22 WARN slow disk\n".repeat(2000);
        let random = random_bytes(7, 65536);
        for data in [&text[..], &random[..]] {
            let f = encode(data, 1);
            let mut out = vec![0xAAu8; data.len()];
            let h = decode_into(&f, &mut out).unwrap();
            assert_eq!(out, data);
            assert_eq!(h.hash, ChunkHash::of(data));
            let mut short = vec![0u8; data.len() - 1];
            assert_eq!(
                decode_into(&f, &mut short),
                Err(FrameError::WrongBlockLength {
                    expected: data.len() - 1,
                    declared: data.len() as u32
                })
            );
        }
    }

    proptest! {
        #[test]
        fn round_trip(data in proptest::collection::vec(any::<u8>(), 1..20000), level in 1i32..4) {
            let f = encode(&data, level);
            let (_, raw) = decode(&f).unwrap();
            let mut into = vec![0u8; data.len()];
            decode_into(&f, &mut into).unwrap();
            prop_assert_eq!(&into, &data);
            prop_assert_eq!(raw, data);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode(&data);
        }
    }
}

/// A frame whose content was checked against its hash. Only [`verify`] makes one.
#[derive(Debug, Clone)]
pub struct Verified {
    hash: ChunkHash,
    frame: Vec<u8>,
}

impl Verified {
    /// The chunk's hash.
    pub fn hash(&self) -> ChunkHash {
        self.hash
    }
    /// The frame bytes, to store as they are.
    pub fn frame(&self) -> &[u8] {
        &self.frame
    }
}

thread_local! {
    /// Where [`verify`] decodes, kept from one chunk to the next: a fresh zeroed 64 KiB buffer per
    /// chunk cost the target a madvise, 16 page faults and a TLB flush each (a fifth of its CPU).
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Decodes a frame fully, checks its hash, and keeps the frame bytes for storing unchanged.
pub fn verify(frame: Vec<u8>) -> Result<Verified, FrameError> {
    let header = parse_header(&frame)?;
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        s.resize(header.raw_len as usize, 0);
        decode_into(&frame, &mut s)
    })?;
    Ok(Verified {
        hash: header.hash,
        frame,
    })
}
