//! Byte encodings of the control stream: the version preamble and length-prefixed messages.
//!
//! Preamble (both directions, once): `"UNDR"` then the version as u16 big-endian. A side that does
//! not speak the peer's version answers with its own preamble and closes, so both ends can say
//! which versions met. Messages: u32 big-endian length, then the postcard encoding of [`Control`].

use super::messages::*;

/// Why bytes from the peer were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error(
        "peer did not open with the Understudy preamble: it is not an Understudy agent, or speaks another protocol"
    )]
    BadPreamble,
    #[error(
        "peer speaks protocol version {peer}, this agent speaks {ours}: upgrade the older agent so both run the same release"
    )]
    Version { peer: u16, ours: u16 },
    #[error("control message of {0} bytes exceeds the {MAX_CONTROL_MESSAGE}-byte limit")]
    TooLarge(u32),
    #[error("control message cannot be decoded: {0}")]
    Malformed(String),
}

/// The six preamble bytes of this build.
pub fn preamble() -> [u8; 6] {
    let v = PROTOCOL_VERSION.to_be_bytes();
    let m = PREAMBLE_MAGIC;
    [m[0], m[1], m[2], m[3], v[0], v[1]]
}

/// Checks a peer's preamble.
pub fn check_preamble(b: &[u8; 6]) -> Result<(), CodecError> {
    if &b[..4] != PREAMBLE_MAGIC {
        return Err(CodecError::BadPreamble);
    }
    let peer = u16::from_be_bytes([b[4], b[5]]);
    if peer != PROTOCOL_VERSION {
        return Err(CodecError::Version {
            peer,
            ours: PROTOCOL_VERSION,
        });
    }
    Ok(())
}

/// Encodes a message with its length prefix.
pub fn encode(msg: &Control) -> Vec<u8> {
    let body = postcard::to_stdvec(msg).expect("control messages always serialise");
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

/// Checks a length prefix before anything is allocated for the body.
pub fn check_len(prefix: [u8; 4]) -> Result<usize, CodecError> {
    let len = u32::from_be_bytes(prefix);
    if len > MAX_CONTROL_MESSAGE {
        return Err(CodecError::TooLarge(len));
    }
    Ok(len as usize)
}

/// Decodes a message body.
pub fn decode(body: &[u8]) -> Result<Control, CodecError> {
    postcard::from_bytes(body).map_err(|e| CodecError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn versions_are_checked() {
        assert_eq!(check_preamble(&preamble()), Ok(()));
        let mut p = preamble();
        p[5] = p[5].wrapping_add(1);
        assert!(matches!(
            check_preamble(&p),
            Err(CodecError::Version { .. })
        ));
        assert_eq!(check_preamble(b"GET / "), Err(CodecError::BadPreamble));
    }

    #[test]
    fn round_trip_and_limit() {
        let m = Control::Hello {
            group: "shop".into(),
        };
        let bytes = encode(&m);
        let len = check_len(bytes[..4].try_into().unwrap()).unwrap();
        assert_eq!(decode(&bytes[4..4 + len]).unwrap(), m);
        assert!(check_len(u32::MAX.to_be_bytes()).is_err());
    }

    proptest! {
        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&data);
        }
    }
}
