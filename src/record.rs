//! Records: a catalog change set ([`Batch`]) as one immutable object, so that a bucket holds the catalog too.
//!
//! Every transaction that changes a remote repository's catalog writes the same change as a record
//! (docs/format.md, *Remote repositories*): a commit's packs, chunk locations, segments, contents, trees and
//! checkpoint; a forget; what GC swept, moved and deleted. Replaying every record rebuilds the catalog.
//!
//! Layout: `"SNAPREC1"`, then one zstd frame of items, each a tag byte and its fields; integers little-endian,
//! strings and byte strings as a u32 length and the bytes.

use std::io::{Read, Write};

use crate::catalog::{Batch, NewCheckpoint};
use crate::checkpoint::Checkpoint;
use crate::error::{Error, Result};
use crate::group::GroupPart;
use crate::id::ObjectId;
use crate::pack::PackEntry;

const MAGIC: &[u8; 8] = b"SNAPREC1";

const T_PACK: u8 = 1;
const T_SEGMENT: u8 = 2;
const T_CONTENT: u8 = 3;
const T_TREE: u8 = 4;
const T_CHECKPOINT: u8 = 5;
const T_FORGET: u8 = 6;
const T_FORGET_GROUP: u8 = 7;
const T_MOVED: u8 = 8;
const T_DROP: u8 = 9;
const T_DEAD_PACK: u8 = 10;
const T_LOCATE: u8 = 11;
/// First in every record from groups keyed by part count on (catalog schema 9): builds before it refuse the
/// item as malformed, so they stop at their next sync instead of applying, by their older rules, records whose
/// group parts they would leave out and whose group forgets they would misread.
const T_PROTOCOL: u8 = 12;
/// A checkpoint's tags changed after its commit: its id, then the tags added and the tags removed, each a u32
/// count and the tags.
const T_RETAG: u8 = 13;
/// The newest protocol [`T_PROTOCOL`] names, the one this build reads. Protocol 3 added [`T_RETAG`], protocol
/// 4 tree entries with owners or hard-link groups (catalog schema 10), protocol 5 tree entries with extended
/// attributes (schema 11). A record says the lowest protocol that reads it (2, [`PROTOCOL_BASE`], without any
/// of these), so older builds go on working beside this one until the
/// first record they cannot read, where they stop (every command, since no later record can be applied before it) and
/// ask to be upgraded.
const PROTOCOL: u8 = 5;
const PROTOCOL_OWNERS: u8 = 4;
const PROTOCOL_BASE: u8 = 2;
const PROTOCOL_RETAG: u8 = 3;

/// The protocol a record of `batch` says: see [`PROTOCOL`].
fn protocol_of(batch: &Batch) -> u8 {
    // Data that does not decode is not this build's to judge; the newest protocol keeps older ones off it.
    let needs = |data: &[u8]| match crate::tree::decode_tree(data) {
        Err(_) => PROTOCOL,
        Ok(es) if es.iter().any(|e| !e.xattrs.is_empty()) => PROTOCOL,
        Ok(es) if es.iter().any(|e| e.owner.is_some() || e.link.is_some()) => PROTOCOL_OWNERS,
        Ok(_) => 0,
    };
    if let Some(p) = batch.trees.iter().map(|(_, data)| needs(data)).max().filter(|&p| p > 0) {
        p
    } else if !batch.retags.is_empty() {
        PROTOCOL_RETAG
    } else {
        PROTOCOL_BASE
    }
}

/// A length field larger than this is damage, not data: no record item comes near it.
const MAX_FIELD: u32 = 1 << 28;

/// Encodes a change set.
pub(crate) fn encode(batch: &Batch) -> Result<Vec<u8>> {
    let mut out = MAGIC.to_vec();
    let mut z = zstd::Encoder::new(&mut out, 3).map_err(|e| Error::Internal(format!("zstd: {e}")))?;
    let mut w = Writer(Vec::with_capacity(1 << 16));
    w.u8(T_PROTOCOL);
    w.u8(protocol_of(batch));
    for (tag, packs) in [(T_PACK, &batch.packs), (T_MOVED, &batch.moved)] {
        for (name, size, entries) in packs {
            w.u8(tag);
            w.str(name);
            w.u64(*size);
            w.u32(entries.len() as u32);
            for e in entries {
                w.entry(e);
            }
        }
    }
    for (id, data) in &batch.segments {
        w.u8(T_SEGMENT);
        w.id(id);
        w.bytes(data);
    }
    for (id, size, segs) in &batch.contents {
        w.u8(T_CONTENT);
        w.id(id);
        w.u64(*size);
        w.bytes(segs);
    }
    for (id, data) in &batch.trees {
        w.u8(T_TREE);
        w.id(id);
        w.bytes(data);
    }
    for (pack, e) in &batch.locates {
        w.u8(T_LOCATE);
        w.str(pack);
        w.entry(e);
    }
    for (kind, id) in &batch.drops {
        w.u8(T_DROP);
        w.u8(*kind as u8);
        w.id(id);
    }
    for name in &batch.dead_packs {
        w.u8(T_DEAD_PACK);
        w.str(name);
    }
    for id in &batch.forget {
        w.u8(T_FORGET);
        w.str(id);
    }
    for name in &batch.forget_groups {
        w.u8(T_FORGET_GROUP);
        w.str(name);
    }
    for (id, add, remove) in &batch.retags {
        w.u8(T_RETAG);
        w.str(id);
        for tags in [add, remove] {
            w.u32(tags.len() as u32);
            for t in tags {
                w.str(t);
            }
        }
    }
    if let Some(cp) = &batch.checkpoint {
        w.u8(T_CHECKPOINT);
        let c = &cp.record;
        w.str(&c.id);
        w.str(c.parent.as_deref().unwrap_or(""));
        w.u64(c.time_ns as u64);
        w.str(&c.message);
        w.str(&c.host);
        w.str(&c.path);
        w.id(&cp.root);
        for v in [c.files, c.dirs, c.symlinks, c.logical_bytes, c.bytes_new, c.bytes_stored, c.skipped] {
            w.u64(v);
        }
        w.u32(c.tags.len() as u32);
        for t in &c.tags {
            w.str(t);
        }
        w.u32(cp.skipped.len() as u32);
        for (path, reason) in &cp.skipped {
            w.bytes(path);
            w.str(reason);
        }
        match &cp.group {
            Some(g) => {
                w.u8(1);
                w.str(&g.name);
                w.u32(g.part);
                w.u32(g.parts);
            }
            None => w.u8(0),
        }
    }
    z.write_all(&w.0).map_err(|e| Error::Internal(format!("zstd: {e}")))?;
    z.finish().map_err(|e| Error::Internal(format!("zstd: {e}")))?;
    Ok(out)
}

/// Decodes a record, refusing anything malformed.
pub(crate) fn decode(data: &[u8]) -> Result<Batch> {
    let bad = |what: &str| Error::corrupt(format!("record: {what}"));
    let body = data.strip_prefix(&MAGIC[..]).ok_or_else(|| bad("not a snapstore record"))?;
    let mut raw = Vec::new();
    zstd::Decoder::new(body)
        .and_then(|mut d| d.read_to_end(&mut raw))
        .map_err(|e| bad(&format!("cannot be decompressed ({e})")))?;
    let mut r = Reader { data: &raw, at: 0 };
    let mut b = Batch::default();
    while r.at < raw.len() {
        match r.u8()? {
            tag @ (T_PACK | T_MOVED) => {
                let name = r.str()?;
                let size = r.u64()?;
                let n = r.u32()?;
                let entries = (0..n).map(|_| r.entry()).collect::<Result<Vec<_>>>()?;
                if tag == T_PACK { &mut b.packs } else { &mut b.moved }.push((name, size, entries));
            }
            T_SEGMENT => b.segments.push((r.id()?, r.bytes()?)),
            T_CONTENT => b.contents.push((r.id()?, r.u64()?, r.bytes()?)),
            T_TREE => b.trees.push((r.id()?, r.bytes()?)),
            T_LOCATE => b.locates.push((r.str()?, r.entry()?)),
            T_DROP => b.drops.push((r.u8()? as i64, r.id()?)),
            T_DEAD_PACK => b.dead_packs.push(r.str()?),
            T_FORGET => b.forget.push(r.str()?),
            T_FORGET_GROUP => b.forget_groups.push(r.str()?),
            T_RETAG => {
                let id = r.str()?;
                let mut tags = || (0..r.u32()?).map(|_| r.str()).collect::<Result<Vec<_>>>();
                let (add, remove) = (tags()?, tags()?);
                // Shown by `log`: a tag no command could have added is damage (removing one changes nothing).
                if add.iter().any(|t| crate::checkpoint::validate_tag(t).is_err()) {
                    return Err(bad("bad tag"));
                }
                b.retags.push((id, add, remove));
            }
            T_PROTOCOL => {
                let v = r.u8()?;
                if v > PROTOCOL {
                    return Err(Error::Format(format!(
                        "a record in the bucket was written by a newer snapstore (protocol {v}); upgrade snapstore"
                    )));
                }
            }
            T_CHECKPOINT => {
                if b.checkpoint.is_some() {
                    return Err(bad("two checkpoints"));
                }
                let id = r.str()?;
                let parent = Some(r.str()?).filter(|p| !p.is_empty());
                let time_ns = r.u64()? as i64;
                let (message, host, path) = (r.str()?, r.str()?, r.str()?);
                let root = r.id()?;
                let mut v = [0u64; 7];
                for x in &mut v {
                    *x = r.u64()?;
                }
                let tags = (0..r.u32()?).map(|_| r.str()).collect::<Result<Vec<_>>>()?;
                let skipped = (0..r.u32()?).map(|_| Ok((r.bytes()?, r.str()?))).collect::<Result<Vec<_>>>()?;
                let group = match r.u8()? {
                    0 => None,
                    1 => Some(GroupPart { name: r.str()?, part: r.u32()?, parts: r.u32()? }),
                    _ => return Err(bad("bad group flag")),
                };
                let record = Checkpoint {
                    id,
                    parent,
                    time_ns,
                    message,
                    tags,
                    host,
                    path,
                    root: root.to_string(),
                    files: v[0],
                    dirs: v[1],
                    symlinks: v[2],
                    logical_bytes: v[3],
                    bytes_new: v[4],
                    bytes_stored: v[5],
                    skipped: v[6],
                };
                b.checkpoint = Some(NewCheckpoint { record, root, skipped, group, xattrs: false });
            }
            t => return Err(bad(&format!("unknown item {t}"))),
        }
    }
    Ok(b)
}

struct Writer(Vec<u8>);

impl Writer {
    fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    fn id(&mut self, id: &ObjectId) {
        self.0.extend_from_slice(&id.0);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }
    fn entry(&mut self, e: &PackEntry) {
        self.id(&e.id);
        self.u8(e.flags);
        self.u32(e.raw_len);
        self.u32(e.stored_len);
        self.u64(e.offset);
    }
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8]> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let end = end.ok_or_else(|| Error::corrupt("record: truncated"))?;
        let s = &self.data[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn id(&mut self) -> Result<ObjectId> {
        Ok(ObjectId::from_slice(self.take(32)?).expect("32 bytes"))
    }
    fn bytes(&mut self) -> Result<Vec<u8>> {
        let n = self.u32()?;
        if n > MAX_FIELD {
            return Err(Error::corrupt("record: field too long"));
        }
        Ok(self.take(n as usize)?.to_vec())
    }
    fn str(&mut self) -> Result<String> {
        String::from_utf8(self.bytes()?).map_err(|_| Error::corrupt("record: text is not UTF-8"))
    }
    fn entry(&mut self) -> Result<PackEntry> {
        Ok(PackEntry {
            id: self.id()?,
            flags: self.u8()?,
            raw_len: self.u32()?,
            stored_len: self.u32()?,
            offset: self.u64()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Batch {
        let id = |b: u8| ObjectId([b; 32]);
        let e = |b: u8| PackEntry { id: id(b), flags: 1, raw_len: 100, stored_len: 60, offset: 16 };
        let record = Checkpoint {
            id: "ab".repeat(32),
            parent: None,
            time_ns: 1_700_000_000_000_000_000,
            message: "before upgrade".into(),
            tags: vec!["nightly".into()],
            host: "node-1".into(),
            path: "/data/run".into(),
            root: id(9).to_string(),
            files: 1,
            dirs: 2,
            symlinks: 3,
            logical_bytes: 4,
            bytes_new: 5,
            bytes_stored: 6,
            skipped: 1,
        };
        Batch {
            packs: vec![("packs/aa/x.pack".into(), 1000, vec![e(1), e(2)])],
            moved: vec![("packs/bb/y.pack".into(), 500, vec![e(3)])],
            segments: vec![(id(4), vec![1, 2, 3])],
            contents: vec![(id(5), 77, vec![4; 32])],
            trees: vec![(id(6), vec![0; 10])],
            locates: vec![("packs/cc/z.pack".into(), e(7))],
            drops: vec![(2, id(8))],
            dead_packs: vec!["packs/dd/w.pack".into()],
            forget: vec!["cd".repeat(32)],
            forget_groups: vec!["step-5".into()],
            retags: vec![("ef".repeat(32), vec!["keep".into(), "v2".into()], vec!["nightly".into()])],
            checkpoint: Some(NewCheckpoint {
                record,
                root: id(9),
                skipped: vec![(b"bad/file".to_vec(), "permission denied".into())],
                group: Some(GroupPart { name: "g".into(), part: 1, parts: 4 }),
                xattrs: false,
            }),
            bytes: 0,
        }
    }

    #[test]
    fn a_record_decodes_to_what_was_encoded() {
        let b = sample();
        let d = decode(&encode(&b).unwrap()).unwrap();
        assert_eq!(d.packs[0].0, b.packs[0].0);
        assert_eq!(d.packs[0].2, b.packs[0].2);
        assert_eq!(d.moved[0].2, b.moved[0].2);
        assert_eq!(d.segments, b.segments);
        assert_eq!(d.contents, b.contents);
        assert_eq!(d.trees, b.trees);
        assert_eq!(d.locates, b.locates);
        assert_eq!(d.drops, b.drops);
        assert_eq!((d.dead_packs, d.forget, d.forget_groups), (b.dead_packs, b.forget, b.forget_groups));
        assert_eq!(d.retags, b.retags);
        let items = |b: &Batch| {
            let mut raw = Vec::new();
            zstd::Decoder::new(&encode(b).unwrap()[MAGIC.len()..]).unwrap().read_to_end(&mut raw).unwrap();
            raw
        };
        // A record says the lowest protocol that reads it: 3 only if it changes tags, 4 only if a tree has an
        // entry with an owner, 5 only if one has extended attributes, so older builds still read the others.
        let tree = |owner, xattrs: Vec<crate::tree::Xattr>| {
            let e = crate::tree::Entry {
                name: b"f".to_vec(),
                kind: crate::tree::EntryKind::File,
                mode: 0o644,
                mtime_ns: 1,
                ctime_ns: 1,
                ino: 1,
                owner,
                link: None,
                xattrs,
                size: 0,
                target: vec![1; 32],
            };
            let es = [e];
            (crate::tree::tree_id(&es), crate::tree::encode_tree(&es))
        };
        let retags = b.retags.clone();
        let with = |trees, retags| Batch { trees, retags, ..Default::default() };
        let owned = Some(crate::tree::Owner { uid: 0, gid: 0 });
        let attr = || vec![crate::tree::Xattr { name: b"user.a".to_vec(), value: b"1".to_vec() }];
        assert_eq!(items(&with(vec![tree(None, vec![])], vec![]))[..2], [T_PROTOCOL, PROTOCOL_BASE]);
        assert_eq!(items(&with(vec![tree(None, vec![])], retags.clone()))[..2], [T_PROTOCOL, PROTOCOL_RETAG]);
        assert_eq!(items(&with(vec![tree(None, vec![]), tree(owned, vec![])], vec![]))[..2], [T_PROTOCOL, 4]);
        assert_eq!(items(&with(vec![tree(owned, vec![])], retags.clone()))[..2], [T_PROTOCOL, 4]);
        assert_eq!(items(&with(vec![tree(owned, vec![]), tree(None, attr())], vec![]))[..2], [T_PROTOCOL, 5]);
        assert_eq!(items(&with(vec![tree(None, attr())], retags))[..2], [T_PROTOCOL, 5]);
        assert_eq!(items(&sample())[..2], [T_PROTOCOL, PROTOCOL]);
        let mut raw = items(&Batch::default());
        assert_eq!(raw[..2], [T_PROTOCOL, PROTOCOL_BASE]);
        // A record of a newer protocol is refused as such, not applied by older rules.
        raw[1] = PROTOCOL + 1;
        let newer = [&MAGIC[..], &zstd::encode_all(&raw[..], 3).unwrap()].concat();
        assert!(matches!(decode(&newer), Err(Error::Format(_))));
        let (x, y) = (d.checkpoint.unwrap(), b.checkpoint.unwrap());
        assert_eq!((x.record, x.root, x.skipped, x.group), (y.record, y.root, y.skipped, y.group));
    }

    #[test]
    fn damaged_records_are_refused() {
        let good = encode(&sample()).unwrap();
        assert!(decode(&good[..good.len() - 3]).is_err());
        assert!(decode(b"SNAPREC2").is_err());
        // A valid frame around truncated items.
        let mut raw = MAGIC.to_vec();
        raw.extend(zstd::encode_all(&[T_TREE, 1, 2][..], 3).unwrap());
        assert!(matches!(decode(&raw), Err(Error::Corrupt { .. })));
        let mut raw = MAGIC.to_vec();
        raw.extend(zstd::encode_all(&[200u8][..], 3).unwrap());
        assert!(decode(&raw).is_err());
        // A tag change whose tag no commit could give (a control character, shown by `log`).
        let hostile = Batch { retags: vec![("ab".repeat(32), vec!["a\x1b[2J".into()], vec![])], ..Default::default() };
        assert!(matches!(decode(&encode(&hostile).unwrap()), Err(Error::Corrupt { .. })));
    }
}
