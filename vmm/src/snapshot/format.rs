//! The snapshot state file: a fixed header (magic, format version, body length, CRC32) and a
//! bincode body. See docs/snapshot-format.md.
use bincode::Options;
use serde::{de::DeserializeOwned, Serialize};

pub const MAGIC: &[u8; 8] = b"FLINTSNP";
/// The version this flint-vmm writes. Bumped whenever the body's layout changes (bincode is not
/// self-describing: any change of a saved struct is a new version).
pub const FORMAT_VERSION: u32 = 2;
/// The oldest version this flint-vmm reads (older bodies are upgraded on read; see docs/snapshot-format.md).
pub const OLDEST_READABLE_VERSION: u32 = 1;
/// Largest body accepted (a state file is small: registers, device state, config).
pub const MAX_BODY_BYTES: u64 = 64 << 20;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;

#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a Flint snapshot state file (bad magic)")]
    BadMagic,
    #[error("snapshot state format version {found} is newer than this flint-vmm reads (versions {OLDEST_READABLE_VERSION} to {FORMAT_VERSION}): restore it with a flint-vmm that reads format version {found}")]
    Newer { found: u32 },
    #[error("snapshot state format version {found} is older than this flint-vmm reads (versions {OLDEST_READABLE_VERSION} to {FORMAT_VERSION}): recreate the snapshot")]
    Older { found: u32 },
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

/// Encodes `body` with the header, as the current format version.
pub fn encode<T: Serialize>(body: &T) -> Result<Vec<u8>, FormatError> {
    encode_as(FORMAT_VERSION, body)
}

/// Encodes `body` with a header naming `version` (the body must be that version's layout).
pub fn encode_as<T: Serialize>(version: u32, body: &T) -> Result<Vec<u8>, FormatError> {
    let payload = bincode::serialize(body).map_err(FormatError::Encode)?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&version.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Validates the header (of the current version) and decodes the body.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
    match decode_versioned(bytes)? {
        (FORMAT_VERSION, body) => decode_body(body),
        (found, _) => Err(FormatError::Older { found }),
    }
}

/// Decodes a body checked by [`decode_versioned`] as `T`.
pub fn decode_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, FormatError> {
    bincode::options()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(MAX_BODY_BYTES)
        .deserialize(body)
        .map_err(FormatError::Decode)
}

/// Validates the header (any readable version) and returns the version and the body, CRC-checked.
pub fn decode_versioned(bytes: &[u8]) -> Result<(u32, &[u8]), FormatError> {
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
    if version > FORMAT_VERSION {
        return Err(FormatError::Newer { found: version });
    }
    if version < OLDEST_READABLE_VERSION {
        return Err(FormatError::Older { found: version });
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
    Ok((version, body))
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
        let e = decode::<Body>(&bad).unwrap_err();
        assert!(matches!(e, FormatError::Newer { found: 9 }));
        assert!(e.to_string().contains("reads format version 9"), "{e}");
        let mut bad = bytes.clone();
        bad[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(matches!(decode::<Body>(&bad), Err(FormatError::Older { found: 0 })));
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
