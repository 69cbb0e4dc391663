//! The content-addressed structure of a checkpoint: trees of entries, files as lists of segments of chunks.
//!
//! A directory is a *tree*: its sorted entries, named by the hash of their canonical encoding. A file's content
//! is a list of *segments*, each a run of chunk references cut where a chunk id's first byte is zero (so a
//! local change rewrites one segment, not the whole list). All three are stored once however many checkpoints
//! share them, which keeps the catalog's growth per checkpoint proportional to what changed.

use crate::error::{Error, Result};
use crate::id::{ObjectId, domain_hasher, finish};

/// What an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    /// A regular file; `target` is its content id.
    File,
    /// A directory; `target` is its tree id.
    Dir,
    /// A symbolic link; `target` is the link's bytes.
    Symlink,
}

impl EntryKind {
    pub(crate) fn code(self) -> u8 {
        match self {
            EntryKind::File => 1,
            EntryKind::Dir => 2,
            EntryKind::Symlink => 3,
        }
    }

    pub(crate) fn from_code(code: i64) -> Result<Self> {
        match code {
            1 => Ok(EntryKind::File),
            2 => Ok(EntryKind::Dir),
            3 => Ok(EntryKind::Symlink),
            _ => Err(Error::corrupt(format!("unknown entry kind {code} in catalog"))),
        }
    }
}

/// One name in a directory of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The name's raw bytes (Unix names need not be UTF-8).
    pub name: Vec<u8>,
    /// File, directory or symlink.
    pub kind: EntryKind,
    /// Permission bits (including setuid/setgid/sticky).
    pub mode: u32,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// Status-change time when committed; used only to tell whether a file changed since.
    pub ctime_ns: i64,
    /// Inode number when committed; used only to tell whether a file changed since.
    pub ino: u64,
    /// Numeric owner and group when committed; `None` for a stream and in trees written before schema 10.
    pub owner: Option<Owner>,
    /// Files with other hard links: a number shared by every name of the same file in the checkpoint, and by no
    /// other file's (schema 10 onwards). A checkout links such names together again.
    pub link: Option<u64>,
    /// Extended attributes of a file or directory (ACLs among them), sorted by name, no name twice (schema 11
    /// onwards); empty where there are none, for symlinks and streams, and in older trees.
    pub xattrs: Vec<Xattr>,
    /// File size in bytes (0 for directories and symlinks).
    pub size: u64,
    /// Content id (file), tree id (directory) or link target bytes (symlink).
    pub target: Vec<u8>,
}

/// A file's numeric owner and group, as `stat` gives them: names are not recorded, since the machine that
/// checks out may map them to other ids (as `tar --numeric-owner` does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Owner {
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
}

impl Owner {
    /// The owner and group of what `md` describes.
    pub(crate) fn of(md: &std::fs::Metadata) -> Owner {
        use std::os::unix::fs::MetadataExt;
        Owner { uid: md.uid(), gid: md.gid() }
    }
}

/// One extended attribute: its full name (`user.note`, `security.capability`, `system.posix_acl_access`) and
/// its value, both raw bytes as the kernel gives them.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Xattr {
    /// The name, namespace prefix included.
    pub name: Vec<u8>,
    /// The value.
    pub value: Vec<u8>,
}

/// Linux's limits: a name of at most 255 bytes, a value of at most 64 KiB. A tree that claims more is damage.
pub const XATTR_NAME_MAX: usize = 255;
/// See [`XATTR_NAME_MAX`].
pub const XATTR_VALUE_MAX: usize = 65536;
/// What one entry's attributes may hold in all (names and values): more is not recorded (commit says so), so
/// that a directory's tree, held whole in memory, stays small whatever a filesystem allows.
pub const XATTRS_MAX_BYTES: usize = 256 * 1024;

/// Set in an entry's kind byte when its owner follows the mode: entries without it hash and encode as before
/// schema 10, so old trees keep their ids, and the kind byte alone tells a reader what comes next.
const OWNER_FLAG: u8 = 0x80;
/// Set in an entry's kind byte when its hard-link group follows (after the owner, if any).
const LINK_FLAG: u8 = 0x40;
/// Set in an entry's kind byte when its extended attributes follow (after the link group, if any).
const XATTR_FLAG: u8 = 0x20;

impl Entry {
    /// The content or tree id this entry points at, `None` for a symlink.
    pub fn object(&self) -> Result<Option<ObjectId>> {
        match self.kind {
            EntryKind::Symlink => Ok(None),
            _ => ObjectId::from_slice(&self.target)
                .map(Some)
                .ok_or_else(|| Error::corrupt(format!("entry {:?} has a malformed id", self.name_lossy()))),
        }
    }

    /// The name for display.
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }
}

/// Checks that a name from the catalog is one plain path component, so that joining it to a destination
/// directory can never leave that directory.
pub fn validate_name(name: &[u8]) -> Result<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0) {
        return Err(Error::UnsafeName { name: String::from_utf8_lossy(name).into_owned() });
    }
    Ok(())
}

/// The id of a tree with these entries, which must be sorted by name with no duplicates.
pub fn tree_id(entries: &[Entry]) -> ObjectId {
    let mut h = domain_hasher("snapstore-tree-v1");
    for e in entries {
        h.update(&(e.name.len() as u32).to_le_bytes());
        h.update(&e.name);
        h.update(&[kind_byte(e)]);
        h.update(&e.mode.to_le_bytes());
        if let Some(o) = e.owner {
            h.update(&o.uid.to_le_bytes());
            h.update(&o.gid.to_le_bytes());
        }
        if let Some(group) = e.link {
            h.update(&group.to_le_bytes());
        }
        if !e.xattrs.is_empty() {
            h.update(&(e.xattrs.len() as u32).to_le_bytes());
            for x in &e.xattrs {
                h.update(&(x.name.len() as u32).to_le_bytes());
                h.update(&x.name);
                h.update(&(x.value.len() as u32).to_le_bytes());
                h.update(&x.value);
            }
        }
        h.update(&e.mtime_ns.to_le_bytes());
        h.update(&e.ctime_ns.to_le_bytes());
        h.update(&e.ino.to_le_bytes());
        h.update(&e.size.to_le_bytes());
        h.update(&(e.target.len() as u32).to_le_bytes());
        h.update(&e.target);
    }
    finish(&h)
}

fn kind_byte(e: &Entry) -> u8 {
    e.kind.code()
        | if e.owner.is_some() { OWNER_FLAG } else { 0 }
        | if e.link.is_some() { LINK_FLAG } else { 0 }
        | if e.xattrs.is_empty() { 0 } else { XATTR_FLAG }
}

/// Encodes a tree's entries, which must be sorted by name with no duplicates, as the catalog stores them:
/// per entry the name (length-prefixed), kind (with bit 0x80 set if the owner is known, 0x40 if the file has
/// other hard links, 0x20 if it has extended attributes), mode, the uid and gid if known, the hard-link group
/// if any, the extended attributes if any (their count, then each name and value length-prefixed), mtime as a
/// delta from the previous entry's, ctime as a delta from the mtime, inode, size and target (length-prefixed),
/// integers as LEB128 varints (deltas zigzagged). Directories' times sit close together and most fields are
/// small, so an entry costs about its name plus its 32-byte target plus a dozen bytes, where a row per entry
/// cost three times that. The id is not over this encoding but over `tree_id`'s fixed-width one, so the
/// storage form can change without renaming any tree.
pub fn encode_tree(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(|e| e.name.len() + e.target.len() + 24).sum());
    let mut prev_mtime = 0i64;
    for e in entries {
        put_varint(&mut out, e.name.len() as u64);
        out.extend_from_slice(&e.name);
        out.push(kind_byte(e));
        put_varint(&mut out, e.mode.into());
        if let Some(o) = e.owner {
            put_varint(&mut out, o.uid.into());
            put_varint(&mut out, o.gid.into());
        }
        if let Some(group) = e.link {
            put_varint(&mut out, group);
        }
        if !e.xattrs.is_empty() {
            put_varint(&mut out, e.xattrs.len() as u64);
            for x in &e.xattrs {
                put_varint(&mut out, x.name.len() as u64);
                out.extend_from_slice(&x.name);
                put_varint(&mut out, x.value.len() as u64);
                out.extend_from_slice(&x.value);
            }
        }
        put_varint(&mut out, zigzag(e.mtime_ns.wrapping_sub(prev_mtime)));
        put_varint(&mut out, zigzag(e.ctime_ns.wrapping_sub(e.mtime_ns)));
        put_varint(&mut out, e.ino);
        put_varint(&mut out, e.size);
        put_varint(&mut out, e.target.len() as u64);
        out.extend_from_slice(&e.target);
        prev_mtime = e.mtime_ns;
    }
    out
}

/// Decodes [`encode_tree`]'s bytes, refusing anything it would not have written: truncation, trailing bytes,
/// an unknown kind or flag, a mode, uid or gid beyond 32 bits, names out of order or repeated, extended
/// attributes out of order, repeated, empty-named or beyond Linux's limits or 256 KiB in all.
pub fn decode_tree(bytes: &[u8]) -> Result<Vec<Entry>> {
    let bad = |what: &str| Error::corrupt(format!("tree data is malformed ({what})"));
    let mut r = bytes;
    let mut out: Vec<Entry> = Vec::new();
    let mut prev_mtime = 0i64;
    while !r.is_empty() {
        let name = take_bytes(&mut r).ok_or_else(|| bad("name"))?.to_vec();
        if out.last().is_some_and(|last| last.name >= name) {
            return Err(bad("names out of order"));
        }
        let (&kind, rest) = r.split_first().ok_or_else(|| bad("kind"))?;
        r = rest;
        let (has_owner, has_link, has_xattrs) = (kind & OWNER_FLAG != 0, kind & LINK_FLAG != 0, kind & XATTR_FLAG != 0);
        let kind = EntryKind::from_code((kind & !(OWNER_FLAG | LINK_FLAG | XATTR_FLAG)).into())?;
        let mut u32_field = |what| take_varint(&mut r).and_then(|m| u32::try_from(m).ok()).ok_or_else(|| bad(what));
        let mode = u32_field("mode")?;
        let owner = if has_owner { Some(Owner { uid: u32_field("uid")?, gid: u32_field("gid")? }) } else { None };
        let link = if has_link { Some(take_varint(&mut r).ok_or_else(|| bad("link"))?) } else { None };
        let xattrs =
            if has_xattrs { take_xattrs(&mut r).ok_or_else(|| bad("extended attributes"))? } else { Vec::new() };
        let mtime_ns = prev_mtime.wrapping_add(unzigzag(take_varint(&mut r).ok_or_else(|| bad("mtime"))?));
        let ctime_ns = mtime_ns.wrapping_add(unzigzag(take_varint(&mut r).ok_or_else(|| bad("ctime"))?));
        let ino = take_varint(&mut r).ok_or_else(|| bad("inode"))?;
        let size = take_varint(&mut r).ok_or_else(|| bad("size"))?;
        let target = take_bytes(&mut r).ok_or_else(|| bad("target"))?.to_vec();
        prev_mtime = mtime_ns;
        out.push(Entry { name, kind, mode, mtime_ns, ctime_ns, ino, owner, link, xattrs, size, target });
    }
    Ok(out)
}

/// Whether `xattrs` is a list a tree may hold: not empty (an entry without any has no flag), sorted by name
/// with no name twice, every name non-empty and free of NUL, and within the limits.
pub fn valid_xattrs(xattrs: &[Xattr]) -> bool {
    let sizes_ok = xattrs.iter().all(|x| {
        !x.name.is_empty() && x.name.len() <= XATTR_NAME_MAX && !x.name.contains(&0) && x.value.len() <= XATTR_VALUE_MAX
    });
    let total: usize = xattrs.iter().map(|x| x.name.len() + x.value.len()).sum();
    !xattrs.is_empty() && sizes_ok && total <= XATTRS_MAX_BYTES && xattrs.windows(2).all(|w| w[0].name < w[1].name)
}

fn take_xattrs(r: &mut &[u8]) -> Option<Vec<Xattr>> {
    let count = usize::try_from(take_varint(r)?).ok()?;
    // Each takes at least three bytes: no count beyond what the bytes could hold is believed.
    if count > r.len() / 3 {
        return None;
    }
    let mut out = Vec::with_capacity(count);
    for _ in 0..count {
        let name = take_bytes(r)?.to_vec();
        let value = take_bytes(r)?.to_vec();
        out.push(Xattr { name, value });
    }
    valid_xattrs(&out).then_some(out)
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push(v as u8 | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A LEB128 varint of at most ten bytes in its shortest form (so that each value has one encoding).
fn take_varint(r: &mut &[u8]) -> Option<u64> {
    let mut v = 0u64;
    for (i, &b) in r.iter().enumerate().take(10) {
        let bits = u64::from(b & 0x7f);
        if i == 9 && bits > 1 {
            return None;
        }
        v |= bits << (7 * i);
        if b & 0x80 == 0 {
            if b == 0 && i > 0 {
                return None;
            }
            *r = &r[i + 1..];
            return Some(v);
        }
    }
    None
}

fn take_bytes<'a>(r: &mut &'a [u8]) -> Option<&'a [u8]> {
    let len = usize::try_from(take_varint(r)?).ok()?;
    if len > r.len() {
        return None;
    }
    let (head, tail) = r.split_at(len);
    *r = tail;
    Some(head)
}

/// A reference from a segment to one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// The chunk.
    pub id: ObjectId,
    /// Its length in bytes.
    pub len: u32,
}

const REF_LEN: usize = 36;
/// A segment never holds more chunk references than this, whatever the ids.
pub const SEGMENT_MAX: usize = 4096;

/// Whether a segment ends after this chunk: content-defined, so segments re-align after an insertion.
pub fn ends_segment(id: &ObjectId, refs_in_segment: usize) -> bool {
    id.0[0] == 0 || refs_in_segment >= SEGMENT_MAX
}

/// Encodes a segment: 36 bytes per chunk (id, length u32 LE).
pub fn encode_segment(refs: &[ChunkRef]) -> Vec<u8> {
    let mut out = Vec::with_capacity(refs.len() * REF_LEN);
    for r in refs {
        out.extend_from_slice(&r.id.0);
        out.extend_from_slice(&r.len.to_le_bytes());
    }
    out
}

/// Decodes a segment, rejecting malformed bytes.
pub fn decode_segment(bytes: &[u8]) -> Result<Vec<ChunkRef>> {
    if !bytes.len().is_multiple_of(REF_LEN) || bytes.len() / REF_LEN > SEGMENT_MAX {
        return Err(Error::corrupt("segment has a malformed length"));
    }
    Ok(bytes
        .chunks_exact(REF_LEN)
        .map(|r| ChunkRef {
            id: ObjectId::from_slice(&r[..32]).expect("32 bytes"),
            len: u32::from_le_bytes(r[32..].try_into().expect("4 bytes")),
        })
        .collect())
}

/// The id of an encoded segment.
pub fn segment_id(encoded: &[u8]) -> ObjectId {
    let mut h = domain_hasher("snapstore-segment-v1");
    h.update(encoded);
    finish(&h)
}

const CONTENT_DOMAIN: &str = "snapstore-content-v1";

/// Whether a file of exactly one chunk of `len` bytes is named by that chunk, with no content row
/// (docs/format.md). A chunk id is the plain BLAKE3 of the bytes, and a content id the BLAKE3 of
/// `CONTENT_DOMAIN || 0 || size u64 || segment ids`, 29 + 32 k bytes: a chunk of such a length could be
/// crafted to carry another file's content id, which readers would then resolve to that file. Chunks of
/// every other length can share an id with a content only through a BLAKE3 collision; one file in 32 of the
/// remaining length keeps its content row.
pub fn named_by_chunk(len: u32) -> bool {
    const PREIMAGE_HEAD: usize = CONTENT_DOMAIN.len() + 1 + 8;
    len as usize % ObjectId::LEN != PREIMAGE_HEAD % ObjectId::LEN
}

/// The id of a file content: its size and its segment ids (concatenated 32-byte ids).
pub fn content_id(size: u64, segment_ids: &[u8]) -> ObjectId {
    let mut h = domain_hasher(CONTENT_DOMAIN);
    h.update(&size.to_le_bytes());
    h.update(segment_ids);
    finish(&h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The seed segments in `tests/corpus/segment/` are what the encoder makes today (`SNAPSTORE_WRITE_CORPUS=1`
    /// regenerates them).
    #[test]
    fn segment_corpus_is_current() {
        let refs = |n: u32| {
            (0..n).map(|i| ChunkRef { id: ObjectId::of(&i.to_le_bytes()), len: 65536 + i }).collect::<Vec<_>>()
        };
        let names = [0, 1, 7].map(|n| format!("{n}-refs.seg"));
        let seeds: Vec<(&str, Vec<u8>)> =
            names.iter().zip([0, 1, 7]).map(|(name, n)| (name.as_str(), encode_segment(&refs(n)))).collect();
        crate::testutil::check_seeds("segment", &seeds);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]
        /// Segments from the corpus, damaged: decoding either fails as corruption or gives references that
        /// encode back to exactly the bytes read.
        #[test]
        fn damaged_segments_are_refused_or_decoded_exactly(
            which in any::<prop::sample::Index>(),
            damages in proptest::collection::vec(crate::testutil::damage(), 0..4),
        ) {
            let bytes = crate::testutil::damaged_seed("segment", which, &damages);
            match decode_segment(&bytes) {
                Ok(refs) => prop_assert_eq!(encode_segment(&refs), bytes),
                Err(e) => prop_assert!(e.is_corruption(), "{}", e),
            }
        }
    }

    fn entry(name: &[u8]) -> Entry {
        Entry {
            name: name.to_vec(),
            kind: EntryKind::File,
            mode: 0o644,
            mtime_ns: 1,
            ctime_ns: 2,
            ino: 3,
            owner: Some(Owner { uid: 1000, gid: 100 }),
            link: None,
            xattrs: Vec::new(),
            size: 4,
            target: vec![9; 32],
        }
    }

    #[test]
    fn hostile_names_are_refused() {
        for bad in [&b""[..], b".", b"..", b"../x", b"/etc/x", b"a/b", b"a\0b"] {
            assert!(matches!(validate_name(bad), Err(Error::UnsafeName { .. })), "{bad:?}");
        }
        for good in [&b"x"[..], b"...", b"\xff\xfe", "naïve ✓".as_bytes(), b"line\nbreak"] {
            validate_name(good).unwrap();
        }
    }

    #[test]
    fn tree_id_depends_on_every_field() {
        let base = vec![entry(b"a")];
        let id = tree_id(&base);
        let mut changed = base.clone();
        changed[0].mtime_ns += 1;
        assert_ne!(tree_id(&changed), id);
        changed = base.clone();
        changed[0].target[0] = 0;
        assert_ne!(tree_id(&changed), id);
        for owner in [None, Some(Owner { uid: 1000, gid: 101 }), Some(Owner { uid: 1001, gid: 100 })] {
            changed = base.clone();
            changed[0].owner = owner;
            assert_ne!(tree_id(&changed), id, "{owner:?}");
        }
        changed = base.clone();
        changed[0].link = Some(7);
        let linked = tree_id(&changed);
        assert_ne!(linked, id);
        changed[0].link = Some(8);
        assert_ne!(tree_id(&changed), linked);
        // Name/target boundaries are length-prefixed: moving a byte between them changes the id.
        let mut a = entry(b"ab");
        a.kind = EntryKind::Symlink;
        a.target = b"c".to_vec();
        let mut b = a.clone();
        b.name = b"a".to_vec();
        b.target = b"bc".to_vec();
        assert_ne!(tree_id(&[a]), tree_id(&[b]));
    }

    /// An entry written before schema 10 (no owner) keeps the id its tree had then: the fixed-width layout
    /// of docs/format.md, built here byte by byte.
    #[test]
    fn entries_without_owner_hash_as_before_schema_10() {
        let mut e = entry(b"name");
        e.owner = None;
        let mut layout = Vec::new();
        layout.extend_from_slice(&4u32.to_le_bytes());
        layout.extend_from_slice(b"name");
        layout.push(1);
        layout.extend_from_slice(&0o644u32.to_le_bytes());
        for v in [1i64, 2] {
            layout.extend_from_slice(&v.to_le_bytes());
        }
        for v in [3u64, 4] {
            layout.extend_from_slice(&v.to_le_bytes());
        }
        layout.extend_from_slice(&32u32.to_le_bytes());
        layout.extend_from_slice(&[9; 32]);
        let mut h = domain_hasher("snapstore-tree-v1");
        h.update(&layout);
        assert_eq!(tree_id(&[e.clone()]), finish(&h));
        // Encoded as before too: the kind byte without the owner flag, no uid or gid.
        assert_eq!(encode_tree(&[e.clone()])[5..7], [1, 0xa4]); // 0o644 = 420, LEB128 0xa4 0x03
        let mut owned = e.clone();
        owned.owner = Some(Owner { uid: 5, gid: 6 });
        let bytes = encode_tree(&[owned.clone()]);
        assert_eq!(bytes[5], 1 | OWNER_FLAG);
        assert_eq!(decode_tree(&bytes).unwrap(), vec![owned.clone()]);
        owned.link = Some(300);
        let bytes = encode_tree(&[owned.clone()]);
        assert_eq!(bytes[5], 1 | OWNER_FLAG | LINK_FLAG);
        assert_eq!(bytes[8..12], [5, 6, 0xac, 0x02], "uid, gid, then the link group");
        assert_eq!(decode_tree(&bytes).unwrap(), vec![owned]);
    }

    #[test]
    fn extended_attributes_are_flagged_hashed_and_checked() {
        let plain = entry(b"a");
        let mut e = plain.clone();
        let x = |n: &str, v: &[u8]| Xattr { name: n.as_bytes().to_vec(), value: v.to_vec() };
        e.xattrs = vec![x("user.a", b""), x("user.b", b"\0\xff")];
        let bytes = encode_tree(&[e.clone()]);
        assert_eq!(bytes[2], 1 | OWNER_FLAG | XATTR_FLAG);
        assert_eq!(decode_tree(&bytes).unwrap(), vec![e.clone()]);
        assert_ne!(tree_id(&[e.clone()]), tree_id(std::slice::from_ref(&plain)));
        let mut other = e.clone();
        other.xattrs[1].value = b"\0\xfe".to_vec();
        assert_ne!(tree_id(&[e.clone()]), tree_id(&[other]), "a value is part of the id");
        // What no commit writes is refused: disorder, a name twice, an empty name, a flag with no attribute,
        // more than the limits.
        for bad in [
            vec![x("user.b", b""), x("user.a", b"")],
            vec![x("user.a", b"1"), x("user.a", b"2")],
            vec![x("", b"1")],
            vec![x("user.\0", b"1")],
            vec![],
            vec![x(&"n".repeat(XATTR_NAME_MAX + 1), b"")],
            vec![x("user.a", &vec![0; XATTR_VALUE_MAX + 1])],
            (0..5).map(|i| x(&format!("user.{i}"), &vec![0; XATTR_VALUE_MAX])).collect(),
        ] {
            let mut tampered = encode_tree(std::slice::from_ref(&plain));
            // After the name (2 bytes), kind, mode (2), uid 1000 (2) and gid 100: where the attributes go.
            let at = 8;
            let mut attrs = Vec::new();
            put_varint(&mut attrs, bad.len() as u64);
            for a in &bad {
                put_varint(&mut attrs, a.name.len() as u64);
                attrs.extend_from_slice(&a.name);
                put_varint(&mut attrs, a.value.len() as u64);
                attrs.extend_from_slice(&a.value);
            }
            tampered[2] |= XATTR_FLAG;
            tampered.splice(at..at, attrs);
            assert!(decode_tree(&tampered).unwrap_err().is_corruption(), "{:?}", bad.first().map(|a| &a.name));
        }
    }

    #[test]
    fn an_unknown_flag_in_the_kind_byte_is_refused() {
        let mut bytes = encode_tree(&[entry(b"a")]);
        assert_eq!(bytes[2], 1 | OWNER_FLAG);
        bytes[2] |= 0x10;
        assert!(decode_tree(&bytes).unwrap_err().is_corruption());
    }

    fn arb_entry() -> impl Strategy<Value = Entry> {
        (
            proptest::collection::vec(any::<u8>(), 1..12),
            1u8..=3,
            any::<u32>(),
            any::<i64>(),
            any::<i64>(),
            any::<u64>(),
            proptest::option::of((any::<u32>(), any::<u32>())),
            proptest::option::of(any::<u64>()),
            proptest::collection::btree_map(
                proptest::collection::vec(1u8..=255, 1..8),
                proptest::collection::vec(any::<u8>(), 0..12),
                0..3,
            ),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..40),
        )
            .prop_map(|(name, kind, mode, mtime_ns, ctime_ns, ino, owner, link, xattrs, size, target)| Entry {
                name,
                kind: EntryKind::from_code(kind.into()).unwrap(),
                mode,
                mtime_ns,
                ctime_ns,
                ino,
                owner: owner.map(|(uid, gid)| Owner { uid, gid }),
                link,
                xattrs: xattrs.into_iter().map(|(name, value)| Xattr { name, value }).collect(),
                size,
                target,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        /// Any sorted entries survive the catalog's encoding exactly, extreme times included.
        #[test]
        fn trees_roundtrip(mut entries in proptest::collection::vec(arb_entry(), 0..20)) {
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            entries.dedup_by(|a, b| a.name == b.name);
            prop_assert_eq!(decode_tree(&encode_tree(&entries)).unwrap(), entries);
        }

        /// Damaged tree data is refused as corruption or decodes to entries that encode back to exactly the
        /// bytes read: one encoding per tree, so verify's id check sees every change.
        #[test]
        fn damaged_trees_are_refused_or_decoded_exactly(
            mut entries in proptest::collection::vec(arb_entry(), 1..6),
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
            cut in any::<bool>(),
        ) {
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            entries.dedup_by(|a, b| a.name == b.name);
            let mut bytes = encode_tree(&entries);
            let i = at.index(bytes.len());
            if cut { bytes.truncate(i) } else { bytes[i] = byte }
            match decode_tree(&bytes) {
                Ok(decoded) => prop_assert_eq!(encode_tree(&decoded), bytes),
                Err(e) => prop_assert!(e.is_corruption(), "{}", e),
            }
        }
    }

    #[test]
    fn tree_data_refuses_disorder_and_long_varints() {
        let (a, b) = (entry(b"a"), entry(b"b"));
        assert!(decode_tree(&encode_tree(&[b.clone(), a.clone()])).is_err());
        assert!(decode_tree(&encode_tree(&[a.clone(), a.clone()])).is_err());
        // The name length 1 written in two bytes (0x81 0x00) is not the shortest form.
        let mut long = vec![0x81, 0x00];
        long.extend_from_slice(&encode_tree(&[a])[1..]);
        assert!(decode_tree(&long).is_err());
        assert_eq!(decode_tree(&[]).unwrap(), vec![]);
    }

    #[test]
    fn segment_roundtrip_and_bad_length() {
        let refs = vec![ChunkRef { id: ObjectId::of(b"x"), len: 7 }, ChunkRef { id: ObjectId::of(b"y"), len: 9 }];
        let enc = encode_segment(&refs);
        assert_eq!(decode_segment(&enc).unwrap(), refs);
        assert!(decode_segment(&enc[1..]).is_err());
    }
}
