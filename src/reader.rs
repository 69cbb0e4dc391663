//! Random access to one file of a checkpoint, fetching only the chunks a read covers.
//!
//! Opening reads the file's segment list and each segment's length (catalog rows only); a read finds its
//! segment and chunk by binary search, loads that one segment's references, and fetches and verifies that one
//! chunk, which stays cached for the reads that follow. A 4 KiB read from a 10 GiB image touches one chunk, or
//! two where it straddles a boundary.

use std::io::{self, Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::Backend;
use crate::catalog::{Catalog, Layout};
use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::readonly::Fingerprint;
use crate::store::ChunkReader;
use crate::tree::{self, ChunkRef};

/// A file of a checkpoint, readable and seekable without restoring it. Every chunk read is verified against
/// its hash; damage surfaces as an [`io::Error`] of kind `InvalidData` wrapping the library's error (on a
/// read-only mount, [`Error::ChangedWhileRead`] when another mount wrote the repository meanwhile).
///
/// ```
/// use std::io::{Read, Seek, SeekFrom};
/// # let dir = tempfile::tempdir().unwrap();
/// # let repo = snapstore::Repository::init(dir.path().join("repo")).unwrap();
/// let state: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
/// let s = repo.commit_reader("tensors.bin", &mut &state[..], &Default::default()).unwrap();
/// let mut f = repo.open_file(&s.id, "tensors.bin").unwrap();
/// let mut buf = [0u8; 4096];
/// f.seek(SeekFrom::Start(700_000)).unwrap();
/// f.read_exact(&mut buf).unwrap();
/// assert_eq!(&buf[..], &state[700_000..704_096]);
/// ```
pub struct FileReader {
    catalog: Catalog,
    chunks: ChunkReader,
    size: u64,
    /// Each segment's id and the offset it starts at.
    segments: Vec<(u64, ObjectId)>,
    /// The loaded segment's index and its chunks with their offsets.
    segment: Option<(usize, Vec<(u64, ChunkRef)>)>,
    /// The cached chunk's offset and bytes.
    chunk: Option<(u64, Vec<u8>)>,
    pos: u64,
    /// For a repository in a bucket, the session that keeps GC from deleting what this reader reads.
    session: Option<Box<dyn Send>>,
    /// For a repository on a read-only mount, its catalog's path and fingerprint at open: a read that fails
    /// after another mount wrote the repository fails as [`Error::ChangedWhileRead`], not as damage.
    watch: Option<(PathBuf, Fingerprint)>,
    /// The checkpoint read: one forgotten and collected meanwhile makes a read fail as
    /// [`Error::Forgotten`], not as damage.
    checkpoint: Option<String>,
}

impl FileReader {
    /// Keeps `session` for as long as the reader lives.
    pub(crate) fn hold(mut self, session: Box<dyn Send>) -> Self {
        self.session = Some(session);
        self
    }

    /// Reads a file of checkpoint `id`, which a failed read then checks is still there.
    pub(crate) fn of_checkpoint(mut self, id: &str) -> Self {
        self.checkpoint = Some(id.to_string());
        self
    }

    /// Checks catalog `path` against `fingerprint` when a read fails.
    pub(crate) fn watch(mut self, path: PathBuf, fingerprint: Fingerprint) -> Self {
        self.watch = Some((path, fingerprint));
        self
    }

    pub(crate) fn open(catalog: Catalog, backend: Arc<dyn Backend>, content: &ObjectId) -> Result<Self> {
        let (size, layout) = catalog.content(content)?;
        let (mut segments, mut segment) = (Vec::new(), None);
        let mut offset = 0u64;
        match layout {
            Layout::Segments(ids) => {
                for seg in ids.chunks_exact(ObjectId::LEN) {
                    let seg = ObjectId::from_slice(seg).expect("32 bytes");
                    segments.push((offset, seg));
                    offset += tree::decode_segment(&catalog.segment(&seg)?)?.iter().map(|r| r.len as u64).sum::<u64>();
                }
            }
            Layout::Chunk(r) => {
                // One segment that is already loaded, so its id (here the chunk's) is never looked up.
                segments.push((0, r.id));
                segment = Some((0, vec![(0, r)]));
                offset = r.len.into();
            }
        }
        if offset != size {
            return Err(Error::corrupt(format!("file content {content}: its chunks add up to {offset}, not {size}")));
        }
        let chunks = ChunkReader::new(backend)?;
        Ok(FileReader {
            catalog,
            chunks,
            size,
            segments,
            segment,
            chunk: None,
            pos: 0,
            session: None,
            watch: None,
            checkpoint: None,
        })
    }

    /// The file's size in bytes.
    pub fn len(&self) -> u64 {
        self.size
    }

    /// Whether the file is empty.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Makes the chunk covering `pos` (< size) the cached one.
    fn load(&mut self, pos: u64) -> Result<()> {
        if let Some((start, data)) = &self.chunk
            && (*start..*start + data.len() as u64).contains(&pos)
        {
            return Ok(());
        }
        let s = self.segments.partition_point(|(start, _)| *start <= pos) - 1;
        if self.segment.as_ref().is_none_or(|(i, _)| *i != s) {
            let (mut at, id) = self.segments[s];
            let refs = tree::decode_segment(&self.catalog.segment(&id)?)?;
            let placed = refs
                .into_iter()
                .map(|r| {
                    let p = (at, r);
                    at += r.len as u64;
                    p
                })
                .collect();
            self.segment = Some((s, placed));
        }
        let (_, refs) = self.segment.as_ref().expect("just loaded");
        let (start, r) = refs[refs.partition_point(|(start, _)| *start <= pos) - 1];
        let mut data = self.chunk.take().map(|(_, d)| d).unwrap_or_default();
        self.chunks.read_chunks(&self.catalog, &[r], |_, bytes| {
            data.clear();
            data.extend_from_slice(bytes);
            Ok(())
        })?;
        self.chunk = Some((start, data));
        Ok(())
    }
}

impl Read for FileReader {
    /// Reads from at most one chunk per call, as a short read; `read_exact` and `io::copy` continue across.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.pos >= self.size {
            return Ok(0);
        }
        if let Err(e) = self.load(self.pos) {
            let e = match &self.watch {
                Some((path, opened)) if e.may_come_from_a_changing_read() => opened.check(path).err().unwrap_or(e),
                _ => e,
            };
            // A chunk or segment gone because retention and GC took the checkpoint meanwhile is no damage.
            let e = match &self.checkpoint {
                Some(id) => self.catalog.unless_forgotten(e, id),
                None => e,
            };
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
        let (start, data) = self.chunk.as_ref().expect("just loaded");
        let from = (self.pos - start) as usize;
        let n = buf.len().min(data.len() - from);
        buf[..n].copy_from_slice(&data[from..from + n]);
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for FileReader {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "seek to a negative or overflowing offset"))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::pseudo_random;

    /// A read that fails after the catalog changed (on a read-only mount: another mount wrote the repository)
    /// says so; the same failure with the catalog as it was is damage.
    #[test]
    fn a_read_failing_after_the_catalog_changed_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("repo");
        let repo = crate::Repository::init(&root).unwrap();
        let data = pseudo_random(1 << 20, 3);
        let c = repo.commit_reader("state", &mut &data[..], &Default::default()).unwrap();
        let catalog = root.join(crate::CATALOG_FILE);
        // Nothing is marked damaged in a catalog opened for reading only; this one is not, so the damage the
        // reads meet would be marked, changing it: without the table, marking fails and changes nothing.
        let db = || rusqlite::Connection::open(&catalog).unwrap();
        let table: String =
            db().query_row("SELECT sql FROM sqlite_master WHERE name = 'damaged_chunks'", [], |r| r.get(0)).unwrap();
        db().execute_batch("DROP TABLE damaged_chunks").unwrap();
        let open = || {
            let r = repo.open_file(&c.id, "").unwrap();
            r.watch(catalog.clone(), Fingerprint::of(&catalog))
        };
        let (mut changed, mut same) = (open(), open());
        for pack in walkdir::WalkDir::new(root.join("packs")).into_iter().flatten() {
            if pack.file_type().is_file() {
                std::fs::remove_file(pack.path()).unwrap();
            }
        }
        let error = |r: &mut FileReader| {
            let e = r.read(&mut [0u8; 10]).unwrap_err();
            *e.into_inner().unwrap().downcast::<Error>().unwrap()
        };
        let damage = error(&mut same);
        assert!(damage.is_corruption(), "{damage}");
        std::thread::sleep(std::time::Duration::from_millis(10));
        db().execute_batch(&table).unwrap();
        repo.commit_reader("other", &mut &b"written elsewhere"[..], &Default::default()).unwrap();
        assert!(matches!(error(&mut changed), Error::ChangedWhileRead(_)));
    }
}
