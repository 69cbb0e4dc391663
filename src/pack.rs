//! Pack files: many chunks in one object, with their own index at the end.
//!
//! ```text
//! header   "SNAPPACK" | version u32 LE (=1) | reserved u32 (zero)
//! blobs    each chunk's stored bytes (zstd frame, byte planes or raw), back to back
//! index    per chunk: id [32] | flags u8 | raw_len u32 LE | stored_len u32 LE
//! footer   index_offset u64 LE | count u32 LE | reserved u32 (zero) | blake3(index)[..16] | "SNAPIDX1"
//! ```
//!
//! A blob's offset is the header length plus the stored lengths before it, so the index alone rebuilds the
//! catalog's chunk locations. The pack is named by a BLAKE3 hash of all its bytes salted with its writer's
//! process id, the time and a counter, so that two byte-identical packs never share a name.

use std::io::Write;

use crate::backend::{Backend, ObjectWriter};
use crate::error::{Error, Result};
use crate::id::{ObjectId, to_hex};

const MAGIC: &[u8; 8] = b"SNAPPACK";
const FOOTER_MAGIC: &[u8; 8] = b"SNAPIDX1";
const VERSION: u32 = 1;
/// Bytes before the first blob.
pub const HEADER_LEN: u64 = 16;
/// Bytes per chunk in a pack's index.
pub const ENTRY_LEN: usize = 41;
/// Bytes of the footer.
pub const FOOTER_LEN: usize = 40;

/// Chunk flag: the blob is a zstd frame. Flags are 0 (the blob is the raw chunk), this, or [`FLAG_GROUPED`].
pub const FLAG_ZSTD: u8 = 1;
/// Chunk flag: the blob is the chunk's byte planes (see `grouping`); written in format 2 onwards.
pub const FLAG_GROUPED: u8 = 2;

/// One chunk's place in a pack.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackEntry {
    /// The chunk's id (BLAKE3 of its raw bytes).
    pub id: ObjectId,
    /// 0, `FLAG_ZSTD` (1) or `FLAG_GROUPED` (2).
    pub flags: u8,
    /// Length of the chunk itself.
    pub raw_len: u32,
    /// Length of the blob in the pack.
    pub stored_len: u32,
    /// Offset of the blob in the pack.
    pub offset: u64,
}

/// The object name of a pack with content hash `hash`.
pub fn pack_name(hash: &ObjectId) -> String {
    let hex = hash.to_hex();
    format!("packs/{}/{}.pack", &hex[..2], hex)
}

/// Writes one pack, streaming it to the backend so that a pack never sits whole in memory.
pub struct PackWriter {
    out: Box<dyn ObjectWriter>,
    hasher: blake3::Hasher,
    len: u64,
    entries: Vec<PackEntry>,
}

impl PackWriter {
    /// Starts a pack.
    pub fn new(backend: &dyn Backend) -> Result<Self> {
        let out = backend.create().map_err(|e| Error::backend("new pack", e))?;
        let mut w = PackWriter { out, hasher: blake3::Hasher::new(), len: 0, entries: Vec::new() };
        let mut header = Vec::with_capacity(HEADER_LEN as usize);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        w.write(&header)?;
        Ok(w)
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(|e| Error::backend("new pack", e))?;
        self.hasher.update(bytes);
        self.len += bytes.len() as u64;
        Ok(())
    }

    /// Appends a chunk's stored blob and returns its entry.
    pub fn add(&mut self, id: ObjectId, flags: u8, raw_len: u32, blob: &[u8]) -> Result<PackEntry> {
        let entry = PackEntry { id, flags, raw_len, stored_len: blob.len() as u32, offset: self.len };
        self.write(blob)?;
        self.entries.push(entry.clone());
        Ok(entry)
    }

    /// Bytes written so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no chunk has been added.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the index and footer, makes the pack durable and publishes it. Returns its name, size and entries.
    pub fn finish(mut self) -> Result<(String, u64, Vec<PackEntry>)> {
        let index_offset = self.len;
        let index = encode_index(&self.entries);
        self.write(&index)?;
        let mut footer = Vec::with_capacity(FOOTER_LEN);
        footer.extend_from_slice(&index_offset.to_le_bytes());
        footer.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        footer.extend_from_slice(&0u32.to_le_bytes());
        footer.extend_from_slice(&blake3::hash(&index).as_bytes()[..16]);
        footer.extend_from_slice(FOOTER_MAGIC);
        self.write(&footer)?;
        // Two writers can produce byte-identical packs (the same new chunks, at the same time, or a chunk
        // stored again after GC condemned it): the name must still be unique, or one pack would replace the
        // other's file and GC could delete the survivor. So the content hash is salted with who wrote it.
        static WRITTEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut salted = blake3::Hasher::new();
        salted.update(self.hasher.finalize().as_bytes());
        salted.update(&std::process::id().to_le_bytes());
        salted.update(&crate::catalog::now_ns().to_le_bytes());
        salted.update(&WRITTEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed).to_le_bytes());
        let name = pack_name(&ObjectId(*salted.finalize().as_bytes()));
        self.out.publish(&name).map_err(|e| Error::backend(name.clone(), e))?;
        Ok((name, self.len, self.entries))
    }
}

fn encode_index(entries: &[PackEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.len() * ENTRY_LEN);
    for e in entries {
        out.extend_from_slice(&e.id.0);
        out.push(e.flags);
        out.extend_from_slice(&e.raw_len.to_le_bytes());
        out.extend_from_slice(&e.stored_len.to_le_bytes());
    }
    out
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

/// What is wrong with pack `name`, from an error reading it: a corruption's text without the pack's name that
/// [`read_index`] puts in front (a report names the pack beside it), anything else as it reads.
pub(crate) fn problem_of(e: &Error, name: &str) -> String {
    match e {
        Error::Corrupt { what } => what.strip_prefix(&format!("pack {name}: ")).unwrap_or(what).to_string(),
        other => other.to_string(),
    }
}

/// Reads and checks a pack's own index: what the catalog's chunk index is rebuilt from.
pub fn read_index(backend: &dyn Backend, name: &str) -> Result<Vec<PackEntry>> {
    let size = backend.size(name).map_err(|e| Error::backend(name, e))?;
    read_index_sized(backend, name, size)
}

/// Bytes read from a pack's end at once, footer and (in most packs) the whole index: each read is a request to
/// a bucket, and a pack's index used to take three after its size.
const TAIL_READ: u64 = 128 << 10;

/// [`read_index`] of a pack whose size the caller has just looked up.
pub(crate) fn read_index_sized(backend: &dyn Backend, name: &str, size: u64) -> Result<Vec<PackEntry>> {
    let bad = |why: &str| Error::corrupt(format!("pack {name}: {why}"));
    if size < HEADER_LEN + FOOTER_LEN as u64 {
        return Err(bad("too short to be a pack"));
    }
    let tail_at = size - size.min(TAIL_READ);
    let mut tail = vec![0u8; (size - tail_at) as usize];
    backend.read_at(name, tail_at, &mut tail).map_err(|e| Error::backend(name, e))?;
    let mut header = [0u8; HEADER_LEN as usize];
    if tail_at == 0 {
        header.copy_from_slice(&tail[..HEADER_LEN as usize]);
    } else {
        backend.read_at(name, 0, &mut header).map_err(|e| Error::backend(name, e))?;
    }
    // Reserved fields must be zero, so that no byte of a pack can change unnoticed.
    if &header[..8] != MAGIC || u32_at(&header, 8) != VERSION || u32_at(&header, 12) != 0 {
        return Err(bad("bad header"));
    }
    let footer = &tail[tail.len() - FOOTER_LEN..];
    if &footer[32..] != FOOTER_MAGIC || u32_at(footer, 12) != 0 {
        return Err(bad("bad footer"));
    }
    let index_offset = u64::from_le_bytes(footer[..8].try_into().expect("8 bytes"));
    let count = u32_at(footer, 8) as u64;
    let index_len = count * ENTRY_LEN as u64;
    if index_offset < HEADER_LEN || index_offset.checked_add(index_len) != Some(size - FOOTER_LEN as u64) {
        return Err(bad("index bounds do not match the file size"));
    }
    let read;
    let index = if index_offset >= tail_at {
        &tail[(index_offset - tail_at) as usize..tail.len() - FOOTER_LEN]
    } else {
        let mut whole = vec![0u8; index_len as usize];
        backend.read_at(name, index_offset, &mut whole).map_err(|e| Error::backend(name, e))?;
        read = whole;
        &read[..]
    };
    if blake3::hash(index).as_bytes()[..16] != footer[16..32] {
        return Err(bad(&format!("index checksum mismatch ({})", to_hex(&footer[16..32]))));
    }
    decode_index(index, index_offset).ok_or_else(|| bad("index entries do not add up to the blob area"))
}

/// Decodes index bytes, checking that the blobs exactly fill `HEADER_LEN..blobs_end`.
pub fn decode_index(index: &[u8], blobs_end: u64) -> Option<Vec<PackEntry>> {
    if !index.len().is_multiple_of(ENTRY_LEN) {
        return None;
    }
    let mut offset = HEADER_LEN;
    let mut out = Vec::with_capacity(index.len() / ENTRY_LEN);
    for e in index.chunks_exact(ENTRY_LEN) {
        let entry = PackEntry {
            id: ObjectId::from_slice(&e[..32])?,
            flags: e[32],
            raw_len: u32_at(e, 33),
            stored_len: u32_at(e, 37),
            offset,
        };
        if entry.flags > FLAG_GROUPED {
            return None;
        }
        offset = offset.checked_add(entry.stored_len as u64)?;
        out.push(entry);
    }
    (offset == blobs_end).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::MemoryBackend;
    use proptest::prelude::*;

    #[test]
    fn pack_roundtrip_and_damage_detected() {
        let b = MemoryBackend::new();
        let mut w = PackWriter::new(&b).unwrap();
        let e1 = w.add(ObjectId::of(b"one"), 0, 3, b"one").unwrap();
        let e2 = w.add(ObjectId::of(b"two"), FLAG_ZSTD, 3, b"xx").unwrap();
        let (name, size, entries) = w.finish().unwrap();
        assert_eq!(entries, vec![e1.clone(), e2]);
        assert_eq!(b.size(&name).unwrap(), size);
        assert_eq!(read_index(&b, &name).unwrap(), entries);
        let mut blob = [0u8; 3];
        b.read_at(&name, e1.offset, &mut blob).unwrap();
        assert_eq!(&blob, b"one");
        // Flip one index byte: the checksum catches it.
        let mut bytes = vec![0u8; size as usize];
        b.read_at(&name, 0, &mut bytes).unwrap();
        bytes[size as usize - FOOTER_LEN - 3] ^= 1;
        let mut w = b.create().unwrap();
        w.write_all(&bytes).unwrap();
        w.publish("packs/00/bad.pack").unwrap();
        assert!(read_index(&b, "packs/00/bad.pack").unwrap_err().is_corruption());
    }

    /// Packs larger than the tail read at once: one whose header needs a read of its own, and one whose index
    /// does too. Both read back whole, and a flip of the header's or the index's first byte is caught.
    #[test]
    fn large_packs_read_their_header_and_index_beyond_the_tail() {
        let b = MemoryBackend::new();
        let big_blob = vec![7u8; 3 * TAIL_READ as usize];
        let many: Vec<Vec<u8>> =
            (0..2 * TAIL_READ as u32 / ENTRY_LEN as u32).map(|i| i.to_le_bytes().to_vec()).collect();
        for (what, chunks) in [("a large blob", vec![big_blob]), ("a large index", many)] {
            let mut w = PackWriter::new(&b).unwrap();
            for c in &chunks {
                w.add(ObjectId::of(c), 0, c.len() as u32, c).unwrap();
            }
            let (name, size, entries) = w.finish().unwrap();
            assert!(size > TAIL_READ, "{what}");
            assert_eq!(read_index(&b, &name).unwrap(), entries, "{what}");
            let mut bytes = vec![0u8; size as usize];
            b.read_at(&name, 0, &mut bytes).unwrap();
            let index_at = entries[0].offset as usize + chunks.iter().map(Vec::len).sum::<usize>();
            for at in [0, index_at] {
                let mut flipped = bytes.clone();
                flipped[at] ^= 1;
                let e = index_of(&flipped).unwrap_err();
                assert!(e.is_corruption(), "{what}, flip at {at}: {e}");
            }
        }
    }

    /// The seed packs in `tests/corpus/pack/` are what a pack writer makes today (`SNAPSTORE_WRITE_CORPUS=1`
    /// regenerates them).
    #[test]
    fn pack_corpus_is_current() {
        let text: Vec<u8> = b"fn main() { println!(\"checkpoint\"); }\n".repeat(200);
        let weights: Vec<u8> = (0..4096u32)
            .flat_map(|i| {
                let u = (i.wrapping_mul(2_654_435_761) >> 8) as f32 / 16_777_216.0;
                let v = (i * 7919 % 65_521) as f32 / 65_521.0;
                ((u + v - 1.0) * 0.03).to_le_bytes()
            })
            .collect();
        let seeds: Vec<(&str, Vec<Vec<u8>>)> = vec![
            ("one-raw.pack", vec![b"tiny chunk".to_vec()]),
            ("mixed.pack", vec![text.clone(), vec![0u8; 4096], (0..3000u32).map(|i| (i * 7919 % 251) as u8).collect()]),
            ("many-small.pack", (0..40u32).map(|i| format!("chunk number {i}").into_bytes()).collect()),
            // float32 weights (a sum of two uniforms), stored as byte planes.
            ("grouped.pack", vec![weights.clone()]),
        ];
        let mut packs = Vec::new();
        for (name, chunks) in seeds {
            let b = MemoryBackend::new();
            let mut w = PackWriter::new(&b).unwrap();
            let mut comp = crate::store::Compressor::new(3, true).unwrap();
            for c in &chunks {
                let (flags, blob) = comp.compress(c);
                w.add(ObjectId::of(c), flags, c.len() as u32, blob).unwrap();
            }
            let (pack, size, entries) = w.finish().unwrap();
            if name == "grouped.pack" {
                assert_eq!(entries[0].flags, FLAG_GROUPED);
            }
            let mut bytes = vec![0u8; size as usize];
            b.read_at(&pack, 0, &mut bytes).unwrap();
            packs.push((name, bytes));
        }
        crate::testutil::check_seeds("pack", &packs);
    }

    /// `bytes` stored as a pack, and what `read_index` makes of them.
    fn index_of(bytes: &[u8]) -> Result<Vec<PackEntry>> {
        let b = MemoryBackend::new();
        let mut w = b.create().unwrap();
        w.write_all(bytes).unwrap();
        w.publish("packs/00/test.pack").unwrap();
        read_index(&b, "packs/00/test.pack")
    }

    /// Every single-byte flip anywhere in a pack is detected (by the header, footer or index checks, or by
    /// the blob it lands in failing to decode to its id), or is harmless: zstd ignores a few frame-header
    /// bits, and a flip there still decodes every chunk to exactly its id. Never wrong bytes taken as good.
    #[test]
    fn every_byte_flip_is_detected_or_harmless() {
        let (mut detected_flips, mut harmless) = (0, 0);
        for (seed, pack) in crate::testutil::corpus("pack") {
            let original = index_of(&pack).unwrap();
            for at in 0..pack.len() {
                let mut bytes = pack.clone();
                bytes[at] ^= 0x10;
                match index_of(&bytes) {
                    Err(e) => {
                        assert!(e.is_corruption(), "{seed}: flip at {at}: {e}");
                        detected_flips += 1;
                    }
                    Ok(entries) => {
                        let mut decoder = crate::store::BlobDecoder::new().unwrap();
                        let bad = entries.iter().filter(|e| {
                            let blob = &bytes[e.offset as usize..(e.offset + e.stored_len as u64) as usize];
                            decoder.decode(&e.id, e.flags, e.raw_len, blob).is_err()
                        });
                        if bad.count() > 0 {
                            detected_flips += 1;
                        } else {
                            // Nothing noticed: then nothing may differ that matters.
                            assert_eq!(entries, original, "{seed}: flip at {at} changed the index unnoticed");
                            harmless += 1;
                        }
                    }
                }
            }
        }
        eprintln!("byte flips: {detected_flips} detected, {harmless} harmless (ignored zstd frame-header bits)");
        // The ignored bits are a handful per zstd frame; almost every flip must be caught.
        assert!(harmless * 50 < detected_flips, "{harmless} harmless of {}", detected_flips + harmless);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Packs from the corpus, damaged: reading one either fails as corruption, or yields an index that
        /// tiles the blob area, and a blob decodes only to the bytes its id names.
        #[test]
        fn damaged_packs_are_refused_or_read_consistently(
            which in any::<prop::sample::Index>(),
            damages in proptest::collection::vec(crate::testutil::damage(), 0..4),
        ) {
            let bytes = crate::testutil::damaged_seed("pack", which, &damages);
            match index_of(&bytes) {
                Ok(entries) => {
                    let mut decoder = crate::store::BlobDecoder::new().unwrap();
                    let mut at = HEADER_LEN;
                    for e in &entries {
                        prop_assert_eq!(e.offset, at);
                        at += e.stored_len as u64;
                        let blob = &bytes[e.offset as usize..at as usize];
                        if let Ok(data) = decoder.decode(&e.id, e.flags, e.raw_len, blob) {
                            prop_assert_eq!(data.len(), e.raw_len as usize);
                            prop_assert_eq!(ObjectId::of(data), e.id);
                        }
                    }
                    prop_assert!(at as usize <= bytes.len());
                }
                Err(e) => prop_assert!(e.is_corruption(), "{}", e),
            }
        }

        #[test]
        fn decode_index_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400), end in 0u64..100_000) {
            let _ = decode_index(&bytes, end);
        }
    }
}
