//! The snapshot state file: a fixed header (magic, format version, body length, CRC32) and a
//! bincode body. See docs/snapshot-format.md.
use serde::{de::DeserializeOwned, Serialize};

pub const MAGIC: &[u8; 8] = b"FLINTSNP";
/// Bumped when the body's layout changes incompatibly.
pub const FORMAT_VERSION: u32 = 1;
/// Largest body accepted (a state file is small: registers, device state, config).
pub const MAX_BODY_BYTES: u64 = 64 << 20;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a Flint snapshot state file (bad magic)")]
    BadMagic,
    #[error("snapshot format version {found} is not supported by this flint-vmm (it reads version {FORMAT_VERSION})")]
    Version { found: u32 },
    #[error("snapshot state file is truncated ({have} of {want} bytes)")]
    Truncated { have: u64, want: u64 },
    #[error("snapshot state body of {0} bytes exceeds the {MAX_BODY_BYTES}-byte limit")]
    TooLarge(u64),
    #[error("snapshot state file is corrupt (CRC32 {found:#010x}, expected {expected:#010x})")]
    Crc { found: u32, expected: u32 },
    #[error("snapshot state body cannot be decoded")]
    Decode(#[source] bincode::Error),
    #[error("snapshot state cannot be encoded")]
    Encode(#[source] bincode::Error),
}

/// Encodes `body` with the header.
pub fn encode<T: Serialize>(body: &T) -> Result<Vec<u8>, FormatError> {
    let payload = bincode::serialize(body).map_err(FormatError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Validates the header and decodes the body.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
    if bytes.len() < HEADER_LEN {
        if bytes.len() >= 8 && &bytes[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        return Err(FormatError::Truncated { have: bytes.len() as u64, want: HEADER_LEN as u64 });
    }
    if &bytes[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if version != FORMAT_VERSION {
        return Err(FormatError::Version { found: version });
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[12..20]);
    let len = u64::from_le_bytes(len8);
    if len > MAX_BODY_BYTES {
        return Err(FormatError::TooLarge(len));
    }
    let want = HEADER_LEN as u64 + len;
    if (bytes.len() as u64) < want {
        return Err(FormatError::Truncated { have: bytes.len() as u64, want });
    }
    let expected = u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
    let body = &bytes[HEADER_LEN..want as usize];
    let found = crc32fast::hash(body);
    if found != expected {
        return Err(FormatError::Crc { found, expected });
    }
    bincode::deserialize(body).map_err(FormatError::Decode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Body {
        a: u64,
        b: Vec<u8>,
    }

    #[test]
    fn round_trip_and_every_corruption_is_caught() {
        let body = Body { a: 7, b: vec![1, 2, 3] };
        let bytes = encode(&body).unwrap();
        assert_eq!(decode::<Body>(&bytes).unwrap(), body);

        let mut bad = bytes.clone();
        bad[0] = b'X';
        assert!(matches!(decode::<Body>(&bad), Err(FormatError::BadMagic)));
        let mut bad = bytes.clone();
        bad[8] = 9;
        assert!(matches!(decode::<Body>(&bad), Err(FormatError::Version { found: 9 })));
        assert!(matches!(decode::<Body>(&bytes[..bytes.len() - 1]), Err(FormatError::Truncated { .. })));
        assert!(matches!(decode::<Body>(&bytes[..10]), Err(FormatError::Truncated { .. })));
        let mut bad = bytes.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert!(matches!(decode::<Body>(&bad), Err(FormatError::Crc { .. })));
        let mut bad = bytes.clone();
        bad[12..20].copy_from_slice(&(MAX_BODY_BYTES + 1).to_le_bytes());
        assert!(matches!(decode::<Body>(&bad), Err(FormatError::TooLarge(_))));
    }
}
