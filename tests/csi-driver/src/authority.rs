//! A workaround for the kubelet's plugin-registration client: it dials the registration socket
//! without `WithAuthority("localhost")` (pkg/kubelet/pluginmanager/operationexecutor, unlike its
//! CSI client), so grpc-go sends the percent-encoded socket path as `:authority`, which the Rust
//! HTTP/2 stack (h2) rightly refuses with PROTOCOL_ERROR (hyperium/h2#487, kubernetes#108254).
//! The driver therefore puts this small relay in front of its registration server: it forwards
//! the kubelet's bytes, rewriting only the `:authority` of each HEADERS frame to `localhost`.
//! Only HPACK's framing is parsed (integers and string lengths); no header is decoded.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const HEADERS: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// `:authority` in HPACK's static table.
const AUTHORITY_INDEX: u64 = 1;

/// Copies an HTTP/2 client's byte stream to the server, with every literal `:authority` header
/// set to `localhost`.
pub async fn relay_client<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    mut from: R,
    mut to: W,
) -> io::Result<()> {
    let mut preface = [0u8; 24];
    from.read_exact(&mut preface).await?;
    if preface != PREFACE {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not an HTTP/2 client preface",
        ));
    }
    to.write_all(&preface).await?;
    loop {
        let mut head = [0u8; 9];
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return to.shutdown().await,
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        from.read_exact(&mut payload).await?;
        if head[3] == HEADERS
            && head[4] & END_HEADERS != 0
            && head[4] & PADDED == 0
            && let Some(rewritten) = rewrite_headers(&payload, head[4] & PRIORITY != 0)
        {
            payload = rewritten;
            let n = (payload.len() as u32).to_be_bytes();
            head[..3].copy_from_slice(&n[1..]);
        }
        to.write_all(&head).await?;
        to.write_all(&payload).await?;
    }
}

/// The HEADERS payload with each literal `:authority` (name from the static table) replaced by
/// `localhost`; `None` when the block does not parse (it is then forwarded unchanged).
pub fn rewrite_headers(payload: &[u8], priority: bool) -> Option<Vec<u8>> {
    let start = if priority { 5 } else { 0 };
    let block = payload.get(start..)?;
    let mut out = payload[..start].to_vec();
    let mut i = 0;
    while i < block.len() {
        let b = block[i];
        let prefix = match b {
            _ if b & 0x80 != 0 => {
                // Indexed field: just the index.
                let (_, n) = integer(&block[i..], 7)?;
                out.extend_from_slice(&block[i..i + n]);
                i += n;
                continue;
            }
            // Literal with incremental indexing: a 6-bit name index.
            _ if b & 0xC0 == 0x40 => 6,
            _ if b & 0xE0 == 0x20 => {
                // Dynamic table size update.
                let (_, n) = integer(&block[i..], 5)?;
                out.extend_from_slice(&block[i..i + n]);
                i += n;
                continue;
            }
            // Literal without indexing or never indexed: a 4-bit name index.
            _ => 4,
        };
        let (name_index, n) = integer(&block[i..], prefix)?;
        let field_start = i;
        let mut j = i + n;
        if name_index == 0 {
            j += string_len(&block[j..])?;
        }
        let value_at = j;
        j += string_len(&block[j..])?;
        if name_index == AUTHORITY_INDEX {
            out.extend_from_slice(&block[field_start..value_at]);
            out.push(9); // not Huffman-coded, 9 bytes
            out.extend_from_slice(b"localhost");
        } else {
            out.extend_from_slice(&block[field_start..j]);
        }
        i = j;
    }
    Some(out)
}

/// An HPACK integer with an `n`-bit prefix: its value and its length in bytes.
fn integer(b: &[u8], n: u32) -> Option<(u64, usize)> {
    let max = (1u64 << n) - 1;
    let mut v = (*b.first()? as u64) & max;
    if v < max {
        return Some((v, 1));
    }
    let mut shift = 0;
    for (k, byte) in b[1..].iter().enumerate() {
        v += ((byte & 0x7f) as u64) << shift;
        if byte & 0x80 == 0 {
            return Some((v, k + 2));
        }
        shift += 7;
        if shift > 56 {
            return None;
        }
    }
    None
}

/// The length in bytes of an HPACK string literal (its length prefix and its bytes).
fn string_len(b: &[u8]) -> Option<usize> {
    let (len, n) = integer(b, 7)?;
    let total = n + len as usize;
    (total <= b.len()).then_some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_authority_becomes_localhost_and_nothing_else_changes() {
        let path = b"%2Ftmp%2Fplugins_registry%2Fx-reg.sock";
        let mut block = vec![0x83, 0x86]; // :method POST, :scheme http (indexed)
        block.push(0x41); // :authority, literal with incremental indexing
        block.push(path.len() as u8);
        block.extend_from_slice(path);
        block.extend_from_slice(&[0x44, 0x03]); // :path, 3 bytes
        block.extend_from_slice(b"/x/");
        block.extend_from_slice(&[0x00, 0x02, b't', b'e', 0x08]); // literal new name "te": "trailers"
        block.extend_from_slice(b"trailers");
        let out = rewrite_headers(&block, false).unwrap();
        let mut want = vec![0x83, 0x86, 0x41, 9];
        want.extend_from_slice(b"localhost");
        want.extend_from_slice(&block[4 + path.len()..]);
        assert_eq!(out, want);
        // With a priority prefix, the 5 bytes are kept.
        let mut prio = vec![0, 0, 0, 3, 15];
        prio.extend_from_slice(&block);
        assert_eq!(&rewrite_headers(&prio, true).unwrap()[5..], &want[..]);
    }

    #[test]
    fn a_truncated_block_is_left_alone() {
        assert!(rewrite_headers(&[0x41, 40, b'a'], false).is_none());
        assert_eq!(integer(&[0x1f, 0x9a, 0x0a], 5), Some((1337, 3)));
    }
}
