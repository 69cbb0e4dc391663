//! Diff: what changed between two checkpoints, from the catalog alone.
//!
//! Both trees are walked together in name order; a subtree whose id is the same on both sides is identical
//! and skipped whole. For a file whose content changed, the chunk lists are compared by position: the bytes
//! of the new version at offsets where the old one does not hold the same chunk are reported as changed
//! ranges, except where both hold zeros. Runs of zeros are cut into maximum chunks from wherever the run
//! starts, so when data before a run grows or shrinks the two versions' zero chunks are out of phase and no
//! chunk matches, though not a byte differs; in a disk image that would report most of its free space as
//! changed. No chunk data is read, so a diff of two 100 GiB images costs a few catalog reads per segment.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use std::collections::VecDeque;

use crate::catalog::Catalog;
use crate::content::{self, ChunkCursor};
use crate::error::Result;
use crate::id::ObjectId;
use crate::tree::{self, ChunkRef, Entry, EntryKind};

/// How an entry changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ChangeKind {
    /// In the second checkpoint only.
    Added,
    /// In the first checkpoint only.
    Removed,
    /// In both, with different content or metadata.
    Modified,
}

/// One difference between two checkpoints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Change {
    /// Path relative to the committed directory (a checkpoint of one file: its name). In JSON, a name that
    /// is not UTF-8 shows each byte outside UTF-8 as U+FFFD, and `path_b64` holds its bytes in base64.
    #[serde(flatten, serialize_with = "crate::json_path::path")]
    pub path: PathBuf,
    /// Added, removed or modified.
    pub change: ChangeKind,
    /// What the entry is (in the second checkpoint, or the first if removed).
    pub kind: EntryKind,
    /// Size in the first checkpoint (0 if added).
    pub size_before: u64,
    /// Size in the second checkpoint (0 if removed).
    pub size_after: u64,
    /// The content (or symlink target) differs; false when only mode, owner, extended attributes or mtime
    /// changed.
    pub content_changed: bool,
    /// Files: bytes of the second version at offsets where the first does not hold the same chunk.
    pub bytes_changed: u64,
    /// Files: those bytes as `[start, end)` ranges of the second version, merged where adjacent.
    pub ranges: Vec<(u64, u64)>,
    /// Symlinks: where it points (in the second checkpoint, or the first if removed). In JSON, as `path` is
    /// (`link_target_b64`).
    #[serde(flatten, serialize_with = "crate::json_path::link_target")]
    pub link_target: Option<PathBuf>,
    /// Symlinks pointing elsewhere now: where it pointed in the first checkpoint (`link_target_before_b64`
    /// in JSON where it is not UTF-8).
    #[serde(flatten, serialize_with = "crate::json_path::link_target_before")]
    pub link_target_before: Option<PathBuf>,
}

/// Totals of a diff.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DiffSummary {
    /// The first checkpoint.
    pub from: String,
    /// The second checkpoint.
    pub to: String,
    /// Entries added.
    pub added: u64,
    /// Entries removed.
    pub removed: u64,
    /// Entries modified.
    pub modified: u64,
    /// Bytes of files added.
    pub bytes_added: u64,
    /// Bytes of files removed.
    pub bytes_removed: u64,
    /// Bytes changed within modified files.
    pub bytes_changed: u64,
}

struct Differ<'a> {
    catalog: &'a Catalog,
    /// The id of a maximum chunk of zeros, which is what runs of zeros are cut into.
    zero: ChunkRef,
    f: &'a mut dyn FnMut(&Change) -> Result<()>,
    summary: DiffSummary,
}

pub(crate) fn diff(
    catalog: &Catalog,
    a: &str,
    b: &str,
    f: &mut dyn FnMut(&Change) -> Result<()>,
) -> Result<DiffSummary> {
    let (ra, rb) = (content::root_entry(catalog, a)?, content::root_entry(catalog, b)?);
    let mut d = Differ::new(catalog, f, a, b)?;
    // The root's path is empty for a directory (its entries are named relative to it), its name otherwise.
    let rel = if rb.kind == EntryKind::Dir { PathBuf::new() } else { PathBuf::from(OsStr::from_bytes(&rb.name)) };
    d.pair(&ra, &rb, &rel)?;
    Ok(d.summary)
}

/// What checkpoint `b` holds, each entry as added: the changes of a path's first checkpoint, with none before
/// it to compare with, as `git show` tells a root commit's. `from` is empty in the summary.
pub(crate) fn added(catalog: &Catalog, b: &str, f: &mut dyn FnMut(&Change) -> Result<()>) -> Result<DiffSummary> {
    let rb = content::root_entry(catalog, b)?;
    let mut d = Differ::new(catalog, f, "", b)?;
    if rb.kind == EntryKind::Dir {
        // A directory's entries are named relative to it, as in `diff`: the root itself is no change.
        for c in catalog.tree(&rb.object()?.expect("dir has a tree"))? {
            d.all(&c, &child(Path::new(""), &c)?, ChangeKind::Added)?;
        }
    } else {
        d.all(&rb, Path::new(OsStr::from_bytes(&rb.name)), ChangeKind::Added)?;
    }
    Ok(d.summary)
}

/// Whether the owner changed, as far as both checkpoints recorded one: across the upgrade that began
/// recording owners every entry gains one, which is no change of the files.
fn owner_changed(a: &Entry, b: &Entry) -> bool {
    matches!((a.owner, b.owner), (Some(x), Some(y)) if x != y)
}

/// Whether what an entry records besides its content and mtime changed: mode, owner, extended attributes.
/// (Across the upgrade that began recording attributes, an entry that has some gains them: shown as a change.)
fn attributes_changed(a: &Entry, b: &Entry) -> bool {
    a.mode != b.mode || owner_changed(a, b) || a.xattrs != b.xattrs
}

impl<'a> Differ<'a> {
    /// A comparison from checkpoint `from` (empty: nothing) to `to`, reporting each change to `f`.
    fn new(catalog: &'a Catalog, f: &'a mut dyn FnMut(&Change) -> Result<()>, from: &str, to: &str) -> Result<Self> {
        let max = catalog.params()?.chunk_max;
        let zero = ChunkRef { id: ObjectId::of(&vec![0u8; max as usize]), len: max };
        let summary = DiffSummary { from: from.to_string(), to: to.to_string(), ..Default::default() };
        Ok(Differ { catalog, zero, f, summary })
    }

    fn pair(&mut self, a: &Entry, b: &Entry, rel: &Path) -> Result<()> {
        if a.kind != b.kind {
            self.all(a, rel, ChangeKind::Removed)?;
            return self.all(b, rel, ChangeKind::Added);
        }
        match b.kind {
            EntryKind::Dir => {
                if attributes_changed(a, b) {
                    // A directory's mtime moves with every change inside it: only its mode, owner and extended
                    // attributes are worth a line.
                    self.emit(b, Some(a), rel, ChangeKind::Modified, false, Vec::new())?;
                }
                if a.target == b.target {
                    return Ok(());
                }
                let left = self.catalog.tree(&a.object()?.expect("dir has a tree"))?;
                let right = self.catalog.tree(&b.object()?.expect("dir has a tree"))?;
                let (mut i, mut j) = (0, 0);
                while i < left.len() || j < right.len() {
                    let order = match (left.get(i), right.get(j)) {
                        (Some(l), Some(r)) => l.name.cmp(&r.name),
                        (Some(_), None) => std::cmp::Ordering::Less,
                        _ => std::cmp::Ordering::Greater,
                    };
                    match order {
                        std::cmp::Ordering::Less => {
                            self.all(&left[i], &child(rel, &left[i])?, ChangeKind::Removed)?;
                            i += 1;
                        }
                        std::cmp::Ordering::Greater => {
                            self.all(&right[j], &child(rel, &right[j])?, ChangeKind::Added)?;
                            j += 1;
                        }
                        std::cmp::Ordering::Equal => {
                            self.pair(&left[i], &right[j], &child(rel, &right[j])?)?;
                            i += 1;
                            j += 1;
                        }
                    }
                }
                Ok(())
            }
            EntryKind::Symlink => {
                let changed = a.target != b.target;
                if changed || a.mtime_ns != b.mtime_ns || attributes_changed(a, b) {
                    self.emit(b, Some(a), rel, ChangeKind::Modified, changed, Vec::new())?;
                }
                Ok(())
            }
            EntryKind::File => {
                if a.target == b.target {
                    if a.mtime_ns != b.mtime_ns || attributes_changed(a, b) {
                        self.emit(b, Some(a), rel, ChangeKind::Modified, false, Vec::new())?;
                    }
                    return Ok(());
                }
                let (before, after) = (a.object()?.expect("file"), b.object()?.expect("file"));
                let ranges = self.changed_ranges(&before, &after)?;
                self.emit(b, Some(a), rel, ChangeKind::Modified, true, ranges)
            }
        }
    }

    /// The ranges of `after` whose bytes may differ from `before`'s at the same offsets, merged where adjacent:
    /// every chunk of `after` unless `before` holds the same chunk at its offset, or zeros wherever it lies.
    fn changed_ranges(&self, before: &ObjectId, after: &ObjectId) -> Result<Vec<(u64, u64)>> {
        let mut old = ChunkCursor::new(self.catalog, before)?;
        let mut new = ChunkCursor::new(self.catalog, after)?;
        // The old chunks that overlap the new chunk at hand, in order (contiguous), and the next one after.
        let mut overlap: VecDeque<(u64, ChunkRef)> = VecDeque::new();
        let mut next = old.next_chunk()?;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        while let Some((at, r)) = new.next_chunk()? {
            let end = at + r.len as u64;
            while let Some(c) = next.filter(|c| c.0 < end) {
                overlap.push_back(c);
                next = old.next_chunk()?;
            }
            while overlap.front().is_some_and(|&(s, c)| s + c.len as u64 <= at) {
                overlap.pop_front();
            }
            let same = match overlap.front() {
                Some(&(s, c)) if s == at && c == r => true,
                Some(&(s, _)) if r == self.zero && s <= at => {
                    overlap.iter().all(|(_, c)| *c == self.zero)
                        && overlap.back().is_some_and(|&(s, c)| s + c.len as u64 >= end)
                }
                _ => false,
            };
            if !same {
                match ranges.last_mut() {
                    Some(last) if last.1 == at => last.1 = end,
                    _ => ranges.push((at, end)),
                }
            }
        }
        Ok(ranges)
    }

    /// Reports `e` and everything below it as added or removed.
    fn all(&mut self, e: &Entry, rel: &Path, change: ChangeKind) -> Result<()> {
        let mut stack = vec![(e.clone(), rel.to_path_buf())];
        while let Some((e, rel)) = stack.pop() {
            self.emit(&e, None, &rel, change, true, Vec::new())?;
            if e.kind == EntryKind::Dir {
                for c in self.catalog.tree(&e.object()?.expect("dir has a tree"))?.into_iter().rev() {
                    let p = child(&rel, &c)?;
                    stack.push((c, p));
                }
            }
        }
        Ok(())
    }

    /// Reports entry `e` at `rel`; `before` is what it was in the first checkpoint, for a modified entry.
    fn emit(
        &mut self,
        e: &Entry,
        before: Option<&Entry>,
        rel: &Path,
        change: ChangeKind,
        content_changed: bool,
        ranges: Vec<(u64, u64)>,
    ) -> Result<()> {
        let size_before = match change {
            ChangeKind::Removed => e.size,
            ChangeKind::Added => 0,
            ChangeKind::Modified => before.map_or(0, |b| b.size),
        };
        let file = e.kind == EntryKind::File;
        let size_after = if change == ChangeKind::Removed { 0 } else { e.size };
        let bytes_changed = if change == ChangeKind::Modified { ranges.iter().map(|(s, e)| e - s).sum() } else { 0 };
        match change {
            ChangeKind::Added => {
                self.summary.added += 1;
                self.summary.bytes_added += if file { e.size } else { 0 };
            }
            ChangeKind::Removed => {
                self.summary.removed += 1;
                self.summary.bytes_removed += if file { e.size } else { 0 };
            }
            ChangeKind::Modified => {
                self.summary.modified += 1;
                self.summary.bytes_changed += bytes_changed;
            }
        }
        let target = |e: &Entry| (e.kind == EntryKind::Symlink).then(|| PathBuf::from(OsStr::from_bytes(&e.target)));
        (self.f)(&Change {
            path: rel.to_path_buf(),
            change,
            kind: e.kind,
            size_before,
            size_after,
            content_changed,
            bytes_changed,
            ranges,
            link_target: target(e),
            link_target_before: before.filter(|b| b.target != e.target).and_then(target),
        })
    }
}

fn child(rel: &Path, e: &Entry) -> Result<PathBuf> {
    tree::validate_name(&e.name)?;
    Ok(rel.join(OsStr::from_bytes(&e.name)))
}
