//! Allocated and changed ranges of a volume image, exact to the driver's block size, and the
//! sparse copy that snapshots and clones are made with. A volume image is a sparse file: the
//! ranges the file system holds data for are the volume's allocated blocks.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;

use rustix::fs::SeekFrom;
use rustix::io::Errno;

/// The block size the driver reports metadata in (the host file system's allocation unit).
pub const BLOCK: u64 = 4096;

/// The byte ranges of `file` (of `len` bytes) that hold data, widened to whole blocks, sorted and
/// merged. Holes are not allocated; written zeros are.
pub fn allocated(file: &File, len: u64) -> io::Result<Vec<Range<u64>>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    let mut pos = 0;
    while pos < len {
        let start = match rustix::fs::seek(file, SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if start >= len {
            break;
        }
        let end = rustix::fs::seek(file, SeekFrom::Hole(start))?.min(len);
        push_merged(
            &mut out,
            align_down(start)..align_up(end).min(align_up(len)),
        );
        pos = end;
    }
    Ok(out)
}

/// The blocks whose content differs between `base` and `target` (holes read as zeros), both
/// `len` bytes long: only the blocks allocated in either are read.
pub fn changed(base: &File, target: &File, len: u64) -> io::Result<Vec<Range<u64>>> {
    let candidates = union(&allocated(base, len)?, &allocated(target, len)?);
    let mut out = Vec::new();
    let (mut a, mut b) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    for range in candidates {
        let mut pos = range.start;
        while pos < range.end {
            let n = (range.end - pos).min(a.len() as u64) as usize;
            read_full(base, &mut a[..n], pos)?;
            read_full(target, &mut b[..n], pos)?;
            for (i, (x, y)) in a[..n]
                .chunks(BLOCK as usize)
                .zip(b[..n].chunks(BLOCK as usize))
                .enumerate()
            {
                if x != y {
                    let at = pos + i as u64 * BLOCK;
                    push_merged(&mut out, at..(at + BLOCK).min(range.end));
                }
            }
            pos += n as u64;
        }
    }
    Ok(out)
}

/// Copies the allocated ranges of `src` into `dst` and sets `dst` to `len` bytes, so the copy is
/// as sparse as the original.
pub fn copy_sparse(src: &File, dst: &File, len: u64) -> io::Result<()> {
    dst.set_len(len)?;
    let src_len = src.metadata()?.len().min(len);
    for range in allocated(src, src_len)? {
        let mut pos = range.start;
        let end = range.end.min(src_len);
        while pos < end {
            let (mut from, mut to) = (pos, pos);
            let n = rustix::fs::copy_file_range(
                src,
                Some(&mut from),
                dst,
                Some(&mut to),
                (end - pos) as usize,
            )?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("source ended at byte {pos} while copying"),
                ));
            }
            pos += n as u64;
        }
    }
    dst.sync_all()
}

/// The ranges from `starting_offset` on: a range that ends at or before it is dropped, one that
/// contains it starts at the block holding it (CSI: no tuple may end before the offset).
pub fn from_offset(ranges: &[Range<u64>], starting_offset: u64) -> Vec<Range<u64>> {
    ranges
        .iter()
        .filter(|r| r.end > starting_offset)
        .map(|r| r.start.max(align_down(starting_offset))..r.end)
        .collect()
}

fn union(a: &[Range<u64>], b: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut all: Vec<Range<u64>> = a.iter().chain(b).cloned().collect();
    all.sort_by_key(|r| r.start);
    let mut out = Vec::new();
    for r in all {
        push_merged(&mut out, r);
    }
    out
}

fn push_merged(out: &mut Vec<Range<u64>>, r: Range<u64>) {
    if r.is_empty() {
        return;
    }
    match out.last_mut() {
        Some(last) if last.end >= r.start => last.end = last.end.max(r.end),
        _ => out.push(r),
    }
}

fn read_full(file: &File, buf: &mut [u8], at: u64) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], at + done as u64)? {
            // Past the end of a shorter file: zeros, as a hole would read.
            0 => {
                buf[done..].fill(0);
                return Ok(());
            }
            n => done += n,
        }
    }
    Ok(())
}

fn align_down(x: u64) -> u64 {
    x / BLOCK * BLOCK
}

fn align_up(x: u64) -> u64 {
    x.div_ceil(BLOCK) * BLOCK
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(len: u64, writes: &[(u64, &[u8])]) -> File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(len).unwrap();
        for (at, data) in writes {
            f.write_all_at(data, *at).unwrap();
        }
        f
    }

    #[test]
    fn allocated_is_the_written_blocks() {
        let len = 64 << 20;
        let f = image(len, &[(0, b"a"), (10 << 20, &[1; 8192]), (len - 1, b"z")]);
        assert_eq!(
            allocated(&f, len).unwrap(),
            vec![0..BLOCK, (10 << 20)..(10 << 20) + 8192, len - BLOCK..len]
        );
    }

    #[test]
    fn changed_reports_only_differing_blocks() {
        let len = 16 << 20;
        let base = image(len, &[(0, &[7; 3 * 4096]), (8 << 20, b"gone")]);
        let target = image(
            len,
            &[(0, &[7; 3 * 4096]), (4096, b"x"), (12 << 20, b"new")],
        );
        // Block 1 rewritten, the block at 8 MiB only in the base (now zeros), 12 MiB new.
        assert_eq!(
            changed(&base, &target, len).unwrap(),
            vec![
                4096..8192,
                (8 << 20)..(8 << 20) + BLOCK,
                (12 << 20)..(12 << 20) + BLOCK
            ]
        );
    }

    #[test]
    fn rewriting_the_same_bytes_is_no_change() {
        let len = 1 << 20;
        let base = image(len, &[(4096, &[5; 4096])]);
        let target = image(len, &[(4096, &[5; 4096]), (8192, &[0; 4096])]);
        assert!(changed(&base, &target, len).unwrap().is_empty());
    }

    #[test]
    fn from_offset_never_returns_a_range_ending_before_it() {
        let r = vec![0..8192, 16384..32768];
        assert_eq!(from_offset(&r, 0), r);
        assert_eq!(from_offset(&r, 8192), vec![16384..32768]);
        assert_eq!(from_offset(&r, 20000), vec![16384..32768]);
        assert_eq!(from_offset(&r, 24576), vec![24576..32768]);
        assert!(from_offset(&r, 32768).is_empty());
    }

    #[test]
    fn sparse_copy_keeps_holes_and_bytes() {
        let len = 32 << 20;
        let src = image(len, &[(3 << 20, &[9; 5000])]);
        let dst = tempfile::tempfile().unwrap();
        copy_sparse(&src, &dst, len + (1 << 20)).unwrap();
        assert_eq!(dst.metadata().unwrap().len(), len + (1 << 20));
        assert_eq!(allocated(&dst, len).unwrap(), allocated(&src, len).unwrap());
        assert!(changed(&src, &dst, len).unwrap().is_empty());
    }
}
