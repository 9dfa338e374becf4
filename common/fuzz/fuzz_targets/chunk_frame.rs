//! A chunk frame from a data stream, a pack file or a source spool: header parsing, length
//! checks, decompression (bounded by the header's raw length) and the hash check.
#![no_main]
use libfuzzer_sys::fuzz_target;
use understudy_common::chunk;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = chunk::parse_header(data) {
        assert!(h.frame_len() <= chunk::HEADER_LEN + chunk::MAX_PAYLOAD as usize);
    }
    if let Ok((h, raw)) = chunk::decode(data) {
        assert_eq!(raw.len(), h.raw_len as usize);
    }
    let _ = chunk::verify(data.to_vec());
});
