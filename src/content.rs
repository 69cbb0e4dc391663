//! Reading a checkpoint's structure: finding an entry by path, and streaming a file's chunks with their offsets.
//!
//! Everything here reads the catalog only, one segment at a time, so that a file's chunk list is never held
//! whole (a 1 TiB image has 16 million chunks) and no chunk data is fetched.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use crate::catalog::{Catalog, Layout};
use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::tree::{self, ChunkRef, Entry, EntryKind};

/// The single entry at the top of a checkpoint: the committed file, directory or symlink.
pub(crate) fn root_entry(catalog: &Catalog, checkpoint: &str) -> Result<Entry> {
    let root_tree = catalog.checkpoint_root(checkpoint)?;
    match catalog.tree(&root_tree)?.as_slice() {
        [only] => {
            tree::validate_name(&only.name)?;
            Ok(only.clone())
        }
        _ => Err(Error::corrupt(format!("checkpoint {checkpoint}: root tree must hold exactly one entry"))),
    }
}

/// Splits a path inside a checkpoint into plain names, refusing `..` and anything that is not one.
fn components(path: &Path) -> Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(n.as_bytes()),
            Component::CurDir | Component::RootDir => {}
            _ => {
                return Err(Error::InvalidInput(format!(
                    "{}: a path inside a checkpoint cannot contain '..'",
                    path.display()
                )));
            }
        }
    }
    Ok(out)
}

/// Finds the entry at `path` inside a checkpoint, relative to the committed directory (`sub/file`), or to its
/// parent (`run/sub/file`, as `show` prints paths). An empty path names the root entry. Returns the entry and
/// its path relative to the committed directory, or `None` when nothing is there. A path that names an entry
/// both ways (`run/x` in a checkpoint of `run` holding `x` and `run/x`) is refused as ambiguous rather than
/// resolved to either: a path copied from `show` must not restore another file. `./` in front makes a path
/// relative to the committed directory only.
pub(crate) fn lookup(catalog: &Catalog, root: &Entry, path: &Path) -> Result<Option<(Entry, PathBuf)>> {
    let parts = components(path)?;
    let inside = descend(catalog, root, &parts)?;
    if path.components().next() == Some(Component::CurDir) {
        return Ok(inside);
    }
    // `run/sub/file` for a checkpoint of `run`: the form `show` and `ls -r` print.
    let shown = match parts.split_first() {
        Some((first, rest)) if *first == root.name.as_slice() => descend(catalog, root, rest)?,
        _ => None,
    };
    match (inside, shown) {
        (Some((_, a)), Some((_, b))) => Err(Error::InvalidInput(format!(
            "{} names two entries of this checkpoint: {} as `show` prints it (write {}), and {} inside the \
             committed directory (write ./{})",
            path.display(),
            path.display(),
            // The committed directory itself: `.` names it.
            if b.as_os_str().is_empty() { Path::new(".") } else { &b }.display(),
            Path::new(OsStr::from_bytes(&root.name)).join(&a).display(),
            a.display()
        ))),
        (inside, shown) => Ok(inside.or(shown)),
    }
}

/// [`lookup`] of a path known to be relative to the committed directory.
pub(crate) fn lookup_relative(catalog: &Catalog, root: &Entry, rel: &Path) -> Result<Option<(Entry, PathBuf)>> {
    descend(catalog, root, &components(rel)?)
}

fn descend(catalog: &Catalog, root: &Entry, parts: &[&[u8]]) -> Result<Option<(Entry, PathBuf)>> {
    if root.kind != EntryKind::Dir {
        // A file or symlink checkpoint: the only path is the entry itself.
        return Ok(parts.is_empty().then(|| (root.clone(), PathBuf::new())));
    }
    let mut entry = root.clone();
    let mut rel = PathBuf::new();
    for name in parts {
        if entry.kind != EntryKind::Dir {
            return Ok(None);
        }
        let tree_id = entry.object()?.expect("dir has a tree");
        match catalog.tree_entry(&tree_id, name)? {
            Some(child) => {
                tree::validate_name(&child.name)?;
                rel.push(OsStr::from_bytes(&child.name));
                entry = child;
            }
            None => return Ok(None),
        }
    }
    Ok(Some((entry, rel)))
}

/// A file content's chunks in order, with their offsets, decoded one segment at a time.
pub(crate) struct ChunkCursor<'a> {
    catalog: &'a Catalog,
    content: ObjectId,
    size: u64,
    segments: Vec<u8>,
    next_segment: usize,
    refs: std::vec::IntoIter<ChunkRef>,
    offset: u64,
}

impl<'a> ChunkCursor<'a> {
    /// Starts at the first chunk of `content`.
    pub fn new(catalog: &'a Catalog, content: &ObjectId) -> Result<Self> {
        Self::of_size(catalog, content, None)
    }

    /// [`ChunkCursor::new`] for a file whose size its tree entry gives (see [`Catalog::content_of_size`]).
    pub fn of_size(catalog: &'a Catalog, content: &ObjectId, size: Option<u64>) -> Result<Self> {
        let (size, layout) = catalog.content_of_size(content, size)?;
        let (segments, refs) = match layout {
            Layout::Segments(ids) => (ids, Vec::new()),
            Layout::Chunk(r) => (Vec::new(), vec![r]),
        };
        Ok(ChunkCursor {
            catalog,
            content: *content,
            size,
            segments,
            next_segment: 0,
            refs: refs.into_iter(),
            offset: 0,
        })
    }

    /// The content's length in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The next chunk and its offset; `None` at the end. Fails if the chunks do not add up to the size.
    pub fn next_chunk(&mut self) -> Result<Option<(u64, ChunkRef)>> {
        loop {
            if let Some(r) = self.refs.next() {
                let at = self.offset;
                self.offset += r.len as u64;
                if self.offset > self.size {
                    break;
                }
                return Ok(Some((at, r)));
            }
            let Some(seg) = self.segments.chunks_exact(ObjectId::LEN).nth(self.next_segment) else {
                if self.offset == self.size {
                    return Ok(None);
                }
                break;
            };
            let seg = ObjectId::from_slice(seg).expect("32 bytes");
            self.next_segment += 1;
            self.refs = tree::decode_segment(&self.catalog.segment(&seg)?)?.into_iter();
        }
        Err(Error::corrupt(format!(
            "file content {}: its chunks do not add up to its size {}",
            self.content, self.size
        )))
    }
}

/// Walks `b`'s chunks in order, telling for each whether `a` holds the same chunk at the same offset: the
/// chunks a file holding `a` lacks to become `b` are exactly those with `same == false`.
pub(crate) fn compare(
    catalog: &Catalog,
    a: &ObjectId,
    b: &ObjectId,
    mut f: impl FnMut(u64, ChunkRef, bool) -> Result<()>,
) -> Result<()> {
    let mut before = ChunkCursor::new(catalog, a)?;
    let mut after = ChunkCursor::new(catalog, b)?;
    let mut current = before.next_chunk()?;
    while let Some((at, r)) = after.next_chunk()? {
        while let Some((old_at, _)) = current
            && old_at < at
        {
            current = before.next_chunk()?;
        }
        f(at, r, matches!(current, Some((old_at, old)) if old_at == at && old == r))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Repository;
    use crate::testutil::pseudo_random;

    /// A repository holding two versions of one stream, and the catalog's content ids for them.
    fn two_versions(a: &[u8], b: &[u8]) -> (tempfile::TempDir, Catalog, ObjectId, ObjectId) {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repository::init(dir.path().join("repo")).unwrap();
        let ia = repo.commit_reader("s", &mut &a[..], &Default::default()).unwrap().id;
        let ib = repo.commit_reader("s", &mut &b[..], &Default::default()).unwrap().id;
        let cat = repo.open_catalog().unwrap();
        let content = |id: &str| root_entry(&cat, id).unwrap().object().unwrap().unwrap();
        let (ca, cb) = (content(&ia), content(&ib));
        (dir, cat, ca, cb)
    }

    #[test]
    fn compare_marks_only_chunks_that_moved_or_changed() {
        let a = pseudo_random(2 << 20, 3);
        let mut b = a.clone();
        b[1_000_000] ^= 1;
        b.extend_from_slice(&pseudo_random(100_000, 4));
        let (_dir, cat, ca, cb) = two_versions(&a, &b);
        let mut changed = Vec::new();
        let mut total = 0;
        compare(&cat, &ca, &cb, |at, r, same| {
            assert_eq!(at, total, "offsets run contiguously");
            total += r.len as u64;
            if !same {
                changed.push((at, at + r.len as u64));
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(total, b.len() as u64);
        assert!(changed.iter().any(|&(s, e)| (s..e).contains(&1_000_000)), "{changed:?}");
        assert!(changed.iter().any(|&(_, e)| e == b.len() as u64), "the appended tail is new: {changed:?}");
        let bytes: u64 = changed.iter().map(|(s, e)| e - s).sum();
        assert!(bytes < 1 << 20, "a one-byte edit and a 100 KB tail changed {bytes} bytes");
        // A content compared with itself has nothing to write.
        compare(&cat, &cb, &cb, |_, _, same| {
            assert!(same);
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn cursor_detects_chunks_that_do_not_add_up() {
        let (_dir, cat, ca, _) = two_versions(&pseudo_random(300_000, 1), b"x");
        cat.connection().execute("UPDATE contents SET size = size + 1 WHERE id = ?1", [&ca.0[..]]).unwrap();
        let mut cursor = ChunkCursor::new(&cat, &ca).unwrap();
        let err = loop {
            match cursor.next_chunk() {
                Ok(Some(_)) => continue,
                Ok(None) => panic!("a short content went unnoticed"),
                Err(e) => break e,
            }
        };
        assert!(err.is_corruption(), "{err}");
    }

    #[test]
    fn lookup_takes_both_path_forms_and_refuses_dotdot() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("run");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("sub/a"), b"alpha").unwrap();
        let repo = Repository::init(dir.path().join("repo")).unwrap();
        let id = repo.commit(&src, &Default::default()).unwrap().id;
        let cat = repo.open_catalog().unwrap();
        let root = root_entry(&cat, &id).unwrap();
        for p in ["sub/a", "run/sub/a", "./sub/a", "/sub/a"] {
            let (e, rel) = lookup(&cat, &root, Path::new(p)).unwrap().unwrap_or_else(|| panic!("{p} not found"));
            assert_eq!((e.size, rel), (5, PathBuf::from("sub/a")), "{p}");
        }
        assert_eq!(lookup(&cat, &root, Path::new("")).unwrap().unwrap().0, root);
        assert!(lookup(&cat, &root, Path::new("sub/nope")).unwrap().is_none());
        assert!(lookup(&cat, &root, Path::new("sub/a/deeper")).unwrap().is_none());
        assert!(matches!(lookup(&cat, &root, Path::new("sub/../sub/a")), Err(Error::InvalidInput(_))));
    }

    #[test]
    fn a_path_naming_two_entries_is_refused_and_each_has_a_form_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("top");
        std::fs::create_dir_all(src.join("top")).unwrap();
        std::fs::write(src.join("x"), b"outer").unwrap();
        std::fs::write(src.join("top/x"), b"inner!").unwrap();
        let repo = Repository::init(dir.path().join("repo")).unwrap();
        let id = repo.commit(&src, &Default::default()).unwrap().id;
        let cat = repo.open_catalog().unwrap();
        let root = root_entry(&cat, &id).unwrap();
        let err = lookup(&cat, &root, Path::new("top/x")).unwrap_err();
        assert!(err.to_string().contains("write x") && err.to_string().contains("write ./top/x"), "{err}");
        let size = |p: &str| lookup(&cat, &root, Path::new(p)).unwrap().unwrap().0.size;
        assert_eq!((size("x"), size("./x")), (5, 5));
        assert_eq!((size("./top/x"), size("top/top/x")), (6, 6));
        assert_eq!(lookup_relative(&cat, &root, Path::new("top/x")).unwrap().unwrap().0.size, 6);
        // The root named like its child: the root's own form is `.`.
        let err = lookup(&cat, &root, Path::new("top")).unwrap_err().to_string();
        assert!(err.contains("(write .)") && err.contains("(write ./top)"), "{err}");
        assert_eq!(lookup(&cat, &root, Path::new(".")).unwrap().unwrap().0, root);
    }
}
