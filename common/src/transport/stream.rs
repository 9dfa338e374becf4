//! Framing on quinn streams: the preamble and control messages on the control stream, chunk frames
//! on data streams. Every length is checked before anything is allocated for it.

use crate::chunk::{self, HEADER_LEN};
use crate::protocol::codec;
use crate::protocol::{Control, DATA_STREAM_KIND, PUSH_STREAM_KIND};
use anyhow::{Context, Result, bail};
use quinn::{RecvStream, SendStream};

/// Writes this build's preamble.
pub async fn write_preamble(s: &mut SendStream) -> Result<()> {
    s.write_all(&codec::preamble())
        .await
        .context("peer closed the control stream")
}

/// Reads and checks the peer's preamble.
pub async fn read_preamble(r: &mut RecvStream) -> Result<()> {
    let mut b = [0u8; 6];
    r.read_exact(&mut b)
        .await
        .context("peer closed the control stream before its preamble")?;
    codec::check_preamble(&b)?;
    Ok(())
}

/// Sends one control message.
pub async fn send(s: &mut SendStream, msg: &Control) -> Result<()> {
    s.write_all(&codec::encode(msg))
        .await
        .with_context(|| format!("cannot send {}: the connection broke", msg.name()))
}

/// Receives one control message.
pub async fn recv(r: &mut RecvStream) -> Result<Control> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)
        .await
        .context("the peer closed the control stream")?;
    let len = codec::check_len(len)?;
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)
        .await
        .context("the control stream ended inside a message")?;
    Ok(codec::decode(&body)?)
}

/// Opens a unidirectional stream of `kind` (its kind byte written), for chunk frames.
pub async fn open_data(conn: &quinn::Connection, kind: StreamKind) -> Result<SendStream> {
    let (what, byte) = match kind {
        StreamKind::Data => ("data", DATA_STREAM_KIND),
        StreamKind::Push => ("push", PUSH_STREAM_KIND),
    };
    let mut s = conn
        .open_uni()
        .await
        .with_context(|| format!("cannot open a {what} stream: the connection broke"))?;
    s.write_all(&[byte])
        .await
        .with_context(|| format!("cannot start a {what} stream: the connection broke"))?;
    Ok(s)
}

/// Writes one chunk frame (as [`crate::chunk`] encodes it: the frame carries its own length).
pub async fn write_frame(s: &mut SendStream, frame: &[u8]) -> Result<()> {
    s.write_all(frame)
        .await
        .context("the connection broke while sending chunks")
}

/// Reads the kind byte that opens a data stream.
pub async fn read_data_kind(r: &mut RecvStream) -> Result<StreamKind> {
    let mut k = [0u8; 1];
    r.read_exact(&mut k)
        .await
        .context("data stream ended before its kind byte")?;
    match k[0] {
        DATA_STREAM_KIND => Ok(StreamKind::Data),
        PUSH_STREAM_KIND => Ok(StreamKind::Push),
        other => bail!("unknown stream kind {other:#04x}"),
    }
}

/// What a unidirectional stream carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// Chunks the target asked for.
    Data,
    /// Chunks pushed while the cut was being made.
    Push,
}

/// Reads the next chunk frame of a data stream; `None` at a clean end of stream.
pub async fn read_frame(r: &mut RecvStream) -> Result<Option<Vec<u8>>> {
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        match r.read(&mut header[got..]).await? {
            Some(n) => got += n,
            None if got == 0 => return Ok(None),
            None => bail!("data stream ended inside a chunk header"),
        }
    }
    let len = chunk::parse_header(&header)?.frame_len();
    // Filled from quinn's own buffers: a zeroed buffer would cost a calloc per chunk, which
    // for 64 KiB means a madvise and 16 page faults.
    let mut frame = Vec::with_capacity(len);
    frame.extend_from_slice(&header);
    while frame.len() < len {
        let part = r
            .read_chunk(len - frame.len(), true)
            .await
            .context("data stream broke inside a chunk")?
            .context("data stream ended inside a chunk")?;
        frame.extend_from_slice(&part.bytes);
    }
    Ok(Some(frame))
}
