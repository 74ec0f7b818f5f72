//! Chunk identity and the stored chunk encoding.
//!
//! A chunk is named by the BLAKE3 hash of its plaintext ([`ChunkId`]). What is stored (in every tier, byte for
//! byte the same object) is a small header followed by the zstd-compressed plaintext, optionally sealed with
//! ChaCha20-Poly1305 under a key derived from the chunk id and the store secret (convergent encryption: equal
//! plaintexts still deduplicate, and nobody without the secret can read or forge a chunk).
//!
//! ```text
//! offset size
//! 0      4    magic "FLCK"
//! 4      1    encoding version (1)
//! 5      1    flags: bit 0 = sealed (encrypted)
//! 6      2    reserved, zero
//! 8      4    plaintext length, little endian
//! 12     ...  zstd frame, or (sealed) ChaCha20-Poly1305(zstd frame) with the 12 header bytes as associated data
//! ```
//!
//! Decoding always ends with recomputing the plaintext hash, so a flipped byte anywhere (header, payload, a
//! chunk stored under the wrong name) is reported as corruption, never returned as data.

use std::fmt;
use std::str::FromStr;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};

const MAGIC: &[u8; 4] = b"FLCK";
const VERSION: u8 = 1;
const FLAG_SEALED: u8 = 1;
const HEADER_LEN: usize = 12;
/// The largest chunk plaintext accepted (a corrupt header cannot make a reader allocate more).
pub const MAX_CHUNK_SIZE: usize = 64 << 20;

/// Most bytes a stored chunk of `plain` plaintext bytes can take: header, zstd's worst case
/// (ZSTD_COMPRESSBOUND), the AEAD tag. Reads of chunk objects are capped by it.
pub const fn max_stored_len(plain: usize) -> u64 {
    (HEADER_LEN + plain + plain / 256 + (128 << 10) / 2048 + 64 + 16) as u64
}

/// Most bytes any chunk object may take.
pub const MAX_CHUNK_OBJECT: u64 = max_stored_len(MAX_CHUNK_SIZE);

/// BLAKE3 hash of a chunk's plaintext.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkId(pub [u8; 32]);

impl ChunkId {
    pub fn of(plain: &[u8]) -> ChunkId {
        ChunkId(*blake3::hash(plain).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        let mut s = String::with_capacity(64);
        for b in self.0 {
            s.push_str(&format!("{b:02x}"));
        }
        s
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId({})", &self.to_hex()[..16])
    }
}

impl FromStr for ChunkId {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s.len() != 64 || !s.bytes().all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()) {
            return Err(format!("`{s}` is not a chunk id (64 lowercase hex digits)"));
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|e| e.to_string())?;
        }
        Ok(ChunkId(out))
    }
}

impl serde::Serialize for ChunkId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> serde::Deserialize<'de> for ChunkId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The store secret used for sealing chunks and manifests (32 bytes).
#[derive(Clone)]
pub struct Secret(pub [u8; 32]);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl Secret {
    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Secret, String> {
        let id: ChunkId =
            s.trim().parse().map_err(|_| "the store secret must be 64 lowercase hex digits".to_string())?;
        Ok(Secret(id.0))
    }

    fn chunk_key(&self, id: &ChunkId) -> [u8; 32] {
        *blake3::keyed_hash(&self.0, &[b"flint chunk key v1\0".as_slice(), &id.0].concat()).as_bytes()
    }

    /// The object name of a sealed chunk: keyed, so a bucket listing does not reveal plaintext hashes.
    pub fn chunk_name(&self, id: &ChunkId) -> ChunkId {
        ChunkId(*blake3::keyed_hash(&self.0, &[b"flint chunk name v1\0".as_slice(), &id.0].concat()).as_bytes())
    }

    pub(crate) fn manifest_key(&self) -> [u8; 32] {
        blake3::derive_key("flint manifest key v1", &self.0)
    }
}

/// Why a stored chunk could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a chunk object (bad magic or version)")]
    BadHeader,
    #[error("chunk declares {0} bytes, more than the {MAX_CHUNK_SIZE} byte limit")]
    TooLarge(usize),
    #[error("chunk is sealed but the store has no secret")]
    NoSecret,
    #[error("chunk is not sealed but the store requires encryption")]
    NotSealed,
    #[error("authentication of the sealed chunk failed")]
    Unseal,
    #[error("zstd: {0}")]
    Decompress(std::io::Error),
    #[error("plaintext is {got} bytes, header says {want}")]
    Length { got: usize, want: usize },
    #[error("plaintext hash {got} does not match the chunk id")]
    Hash { got: ChunkId },
}

/// Encodes a chunk's plaintext into its stored form.
pub fn encode(plain: &[u8], id: &ChunkId, level: i32, secret: Option<&Secret>) -> Vec<u8> {
    let mut header = [0u8; HEADER_LEN];
    header[..4].copy_from_slice(MAGIC);
    header[4] = VERSION;
    header[5] = if secret.is_some() { FLAG_SEALED } else { 0 };
    header[8..12].copy_from_slice(&(plain.len() as u32).to_le_bytes());
    // zstd on an in-memory buffer only fails on allocation failure; fall back to level 1 on a bad level.
    let compressed = zstd::bulk::compress(plain, level)
        .or_else(|_| zstd::bulk::compress(plain, 1))
        .unwrap_or_else(|e| panic!("zstd compression failed: {e}"));
    let payload = match secret {
        None => compressed,
        Some(secret) => {
            let cipher = ChaCha20Poly1305::new(Key::from_slice(&secret.chunk_key(id)));
            // The key is unique per plaintext, so a fixed nonce never repeats under one key.
            cipher
                .encrypt(Nonce::from_slice(&[0u8; 12]), Payload { msg: &compressed, aad: &header })
                .unwrap_or_else(|e| panic!("sealing failed: {e}"))
        }
    };
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(&payload);
    out
}

/// Decodes a stored chunk and verifies it is the plaintext of `id`.
pub fn decode(stored: &[u8], id: &ChunkId, secret: Option<&Secret>) -> Result<Vec<u8>, DecodeError> {
    if stored.len() < HEADER_LEN || &stored[..4] != MAGIC || stored[4] != VERSION || stored[6..8] != [0, 0] {
        return Err(DecodeError::BadHeader);
    }
    let header = &stored[..HEADER_LEN];
    let want = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if want > MAX_CHUNK_SIZE {
        return Err(DecodeError::TooLarge(want));
    }
    if header[5] & !FLAG_SEALED != 0 {
        return Err(DecodeError::BadHeader);
    }
    let sealed = header[5] & FLAG_SEALED != 0;
    let body = &stored[HEADER_LEN..];
    let compressed;
    let frame: &[u8] = match (sealed, secret) {
        (true, None) => return Err(DecodeError::NoSecret),
        (false, Some(_)) => return Err(DecodeError::NotSealed),
        (false, None) => body,
        (true, Some(secret)) => {
            let cipher = ChaCha20Poly1305::new(Key::from_slice(&secret.chunk_key(id)));
            compressed = cipher
                .decrypt(Nonce::from_slice(&[0u8; 12]), Payload { msg: body, aad: header })
                .map_err(|_| DecodeError::Unseal)?;
            &compressed
        }
    };
    let plain = zstd::bulk::decompress(frame, want).map_err(DecodeError::Decompress)?;
    if plain.len() != want {
        return Err(DecodeError::Length { got: plain.len(), want });
    }
    let got = ChunkId::of(&plain);
    if got != *id {
        return Err(DecodeError::Hash { got });
    }
    Ok(plain)
}

/// Seals a manifest body (random nonce; manifests are not deduplicated).
pub(crate) fn seal_manifest(body: &[u8], secret: &Secret) -> Vec<u8> {
    let mut nonce = [0u8; 12];
    getrandom::getrandom(&mut nonce).unwrap_or_else(|e| panic!("no randomness for a manifest nonce: {e}"));
    let cipher = ChaCha20Poly1305::new(Key::from_slice(&secret.manifest_key()));
    let sealed = cipher.encrypt(Nonce::from_slice(&nonce), body).unwrap_or_else(|e| panic!("sealing failed: {e}"));
    let mut out = b"FLMS".to_vec();
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// Opens a manifest object: plain JSON, or sealed with [`seal_manifest`].
pub(crate) fn open_manifest(stored: &[u8], secret: Option<&Secret>) -> Result<Vec<u8>, DecodeError> {
    if stored.starts_with(b"FLMS") {
        let secret = secret.ok_or(DecodeError::NoSecret)?;
        if stored.len() < 16 {
            return Err(DecodeError::BadHeader);
        }
        let cipher = ChaCha20Poly1305::new(Key::from_slice(&secret.manifest_key()));
        return cipher.decrypt(Nonce::from_slice(&stored[4..16]), &stored[16..]).map_err(|_| DecodeError::Unseal);
    }
    if secret.is_some() {
        return Err(DecodeError::NotSealed);
    }
    Ok(stored.to_vec())
}

/// True when every byte is zero (fast path over u64 words).
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets the aligned middle part.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..200_000u32).map(|i| (i % 251) as u8 ^ (i / 4096) as u8).collect()
    }

    #[test]
    fn round_trip_plain_and_sealed() {
        let plain = sample();
        let id = ChunkId::of(&plain);
        let stored = encode(&plain, &id, 3, None);
        assert!(stored.len() < plain.len() / 4, "compressible data compresses");
        assert_eq!(decode(&stored, &id, None).unwrap(), plain);

        let secret = Secret([7; 32]);
        let sealed = encode(&plain, &id, 3, Some(&secret));
        assert_eq!(sealed, encode(&plain, &id, 3, Some(&secret)), "convergent: same plaintext, same object");
        assert_eq!(decode(&sealed, &id, Some(&secret)).unwrap(), plain);
        assert!(matches!(decode(&sealed, &id, Some(&Secret([8; 32]))), Err(DecodeError::Unseal)));
        assert!(matches!(decode(&sealed, &id, None), Err(DecodeError::NoSecret)));
        assert!(matches!(decode(&stored, &id, Some(&secret)), Err(DecodeError::NotSealed)));
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let plain = sample();
        let id = ChunkId::of(&plain);
        for secret in [None, Some(Secret([1; 32]))] {
            let stored = encode(&plain, &id, 3, secret.as_ref());
            for i in (0..stored.len()).step_by(7).chain([stored.len() - 1]) {
                let mut bad = stored.clone();
                bad[i] ^= 0x20;
                // Either detected, or (a flipped padding bit of the zstd bitstream) decoded to the exact plaintext:
                // never different data.
                if let Ok(got) = decode(&bad, &id, secret.as_ref()) {
                    assert!(got == plain && secret.is_none(), "flip at {i} went unnoticed");
                }
            }
        }
        let other = ChunkId::of(b"something else");
        assert!(matches!(decode(&encode(&plain, &id, 3, None), &other, None), Err(DecodeError::Hash { .. })));
    }

    #[test]
    fn hostile_headers_are_refused() {
        assert!(matches!(decode(b"FLC", &ChunkId([0; 32]), None), Err(DecodeError::BadHeader)));
        let mut huge = b"FLCK\x01\0\0\0".to_vec();
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode(&huge, &ChunkId([0; 32]), None), Err(DecodeError::TooLarge(_))));
    }

    #[test]
    fn ids_parse_and_print() {
        let id = ChunkId::of(b"x");
        assert_eq!(id.to_hex().parse::<ChunkId>().unwrap(), id);
        assert!("zz".parse::<ChunkId>().is_err());
        assert!(id.to_hex().to_uppercase().parse::<ChunkId>().is_err());
    }

    #[test]
    fn zero_detection() {
        let mut buf = vec![0u8; 4099];
        assert!(is_zero(&buf));
        assert!(is_zero(&buf[1..]));
        buf[4098] = 1;
        assert!(!is_zero(&buf));
        assert!(!is_zero(&buf[3..]));
    }
}
