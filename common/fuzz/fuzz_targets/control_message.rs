//! Control-stream input as a peer sends it: the 6-byte preamble, then length-prefixed messages.
//! Whatever decodes must encode and decode back to the same message.
#![no_main]
use libfuzzer_sys::fuzz_target;
use understudy_common::protocol::codec;

fuzz_target!(|data: &[u8]| {
    if let Some(p) = data.get(..6) {
        let _ = codec::check_preamble(p.try_into().expect("6 bytes"));
    }
    let mut rest = data;
    while rest.len() >= 4 {
        let Ok(len) = codec::check_len(rest[..4].try_into().expect("4 bytes")) else {
            return;
        };
        let Some(body) = rest.get(4..4 + len) else {
            return;
        };
        if let Ok(msg) = codec::decode(body) {
            let again = codec::encode(&msg);
            assert_eq!(codec::decode(&again[4..]).ok(), Some(msg));
        }
        rest = &rest[4 + len..];
    }
});
