//! Content identifiers: every chunk, segment, content list and tree is named by the BLAKE3 hash of its bytes.

use std::fmt;

/// A 32-byte BLAKE3 hash naming a stored object.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectId(pub [u8; 32]);

impl ObjectId {
    /// Length of an id in bytes.
    pub const LEN: usize = 32;

    /// Hashes `data` with plain BLAKE3: this is how a chunk is named.
    ///
    /// ```
    /// let id = snapstore::ObjectId::of(b"hello");
    /// assert_eq!(id, snapstore::ObjectId::of(b"hello"));
    /// assert_ne!(id, snapstore::ObjectId::of(b"hellO"));
    /// ```
    pub fn of(data: &[u8]) -> Self {
        ObjectId(*blake3::hash(data).as_bytes())
    }

    /// Reads an id from a 32-byte slice, `None` when the length is wrong.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(ObjectId(bytes.try_into().ok()?))
    }

    /// Reads an id from its 64 hex digits, `None` for anything else.
    pub(crate) fn from_hex(hex: &str) -> Option<Self> {
        blake3::Hash::from_hex(hex).ok().map(|h| ObjectId(*h.as_bytes()))
    }

    /// The id as 64 lowercase hex digits.
    ///
    /// ```
    /// let id = snapstore::ObjectId([0xab; 32]);
    /// assert!(id.to_hex().starts_with("abab"));
    /// assert_eq!(id.to_hex().len(), 64);
    /// ```
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }
}

impl fmt::Debug for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ObjectId({})", &self.to_hex()[..16])
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Lowercase hex of `bytes`.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

/// A hasher with a domain prefix, so that a tree, a segment and a content list can never share an id by
/// accident of their encodings. Chunk ids have no prefix (they are the BLAKE3 of the chunk's bytes), so a chunk
/// whose bytes are such a prefixed encoding shares its id: see `tree::named_by_chunk` for the one place
/// where that matters.
pub(crate) fn domain_hasher(domain: &str) -> blake3::Hasher {
    let mut h = blake3::Hasher::new();
    h.update(domain.as_bytes());
    h.update(&[0]);
    h
}

pub(crate) fn finish(h: &blake3::Hasher) -> ObjectId {
    ObjectId(*h.finalize().as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_roundtrip_matches_blake3() {
        let id = ObjectId::of(b"abc");
        assert_eq!(id.to_hex(), blake3::hash(b"abc").to_hex().as_str());
        assert_eq!(ObjectId::from_slice(&id.0), Some(id));
        assert_eq!(ObjectId::from_slice(&id.0[..31]), None);
        assert_eq!(ObjectId::from_hex(&id.to_hex()), Some(id));
        assert_eq!(ObjectId::from_hex(&id.to_hex()[..62]), None);
        assert_eq!(ObjectId::from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn domains_separate_ids() {
        let mut a = domain_hasher("tree");
        let mut b = domain_hasher("segment");
        a.update(b"x");
        b.update(b"x");
        assert_ne!(finish(&a), finish(&b));
    }
}
