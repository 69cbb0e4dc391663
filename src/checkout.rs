//! Checkout: rebuild a checkpoint's tree at a destination, verifying every chunk.
//!
//! The caller's thread walks the checkpoint's trees, creates directories and symlinks, and hands each file's
//! chunks to workers in batches. Workers read, verify and write the chunks at their offsets into a temporary
//! file beside the destination; the worker finishing a file's last batch sets its mode and mtime and renames
//! it into place, so a file is either absent, or whole and verified. Directory modes and mtimes are applied
//! last, deepest first, so a read-only directory does not stop its own checkout.

use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use crossbeam_channel::{Receiver, bounded};

use crate::backend::Backend;
use crate::catalog::Catalog;
use crate::error::{Error, Result};
use crate::id::ObjectId;
use crate::progress::{NoProgress, Progress};
use crate::sparse::is_zero;
use crate::store::ChunkReader;
use crate::tree::{self, ChunkRef, Entry, EntryKind};

/// How to check out.
#[derive(Clone)]
pub struct CheckoutOptions {
    /// Write into a destination that exists and is not empty, replacing what the checkpoint names.
    pub force: bool,
    /// Worker threads; 0 means two per core.
    pub threads: usize,
    /// Receives progress.
    pub progress: Arc<dyn Progress>,
}

impl Default for CheckoutOptions {
    fn default() -> Self {
        CheckoutOptions { force: false, threads: 0, progress: Arc::new(NoProgress) }
    }
}

/// What a checkout did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CheckoutSummary {
    /// The checkpoint checked out.
    pub id: String,
    /// Regular files written.
    pub files: u64,
    /// Directories created or reused.
    pub dirs: u64,
    /// Symbolic links created.
    pub symlinks: u64,
    /// Bytes of file content restored.
    pub bytes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// Chunks handed to a worker at once: big enough to amortise, small enough to spread a large file.
const BATCH_BYTES: u64 = 4 << 20;

struct FileTask {
    file: File,
    temp: PathBuf,
    dest: PathBuf,
    rel: PathBuf,
    mode: u32,
    mtime_ns: i64,
    /// Batches not yet written, plus one held by the walker until it has sent them all.
    remaining: AtomicUsize,
    failed: AtomicBool,
    /// Renamed into place; until then, dropping the task removes its temporary.
    placed: AtomicBool,
}

impl Drop for FileTask {
    fn drop(&mut self) {
        // Reached when the last job holding the task is done or discarded (a checkout that stopped early).
        if !self.placed.load(Ordering::Acquire) {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

struct Job {
    task: Arc<FileTask>,
    offset: u64,
    refs: Vec<ChunkRef>,
}

fn mtime(ns: i64) -> std::time::SystemTime {
    if ns >= 0 {
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    } else {
        UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
    }
}

fn temp_path(dir: &Path) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    dir.join(format!(".snapstore-tmp-{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
}

fn file_error(rel: &Path, e: Error) -> Error {
    match e {
        Error::Corrupt { what } => Error::corrupt(format!("{}: {what}", rel.display())),
        other => other,
    }
}

impl FileTask {
    /// Called once per batch and once by the walker; the last caller puts the file in place.
    fn release(&self) -> Result<()> {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) != 1 || self.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        let io = |e| Error::io(&self.dest, e);
        self.file.set_permissions(fs::Permissions::from_mode(self.mode)).map_err(io)?;
        self.file.set_modified(mtime(self.mtime_ns)).map_err(io)?;
        fs::rename(&self.temp, &self.dest).map_err(io)?;
        self.placed.store(true, Ordering::Release);
        Ok(())
    }

    fn fail(&self) {
        if !self.failed.swap(true, Ordering::AcqRel) {
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Removes whatever is at `path` (never following a symlink), so the checkout can put its own entry there.
fn clear(path: &Path) -> Result<()> {
    match fs::symlink_metadata(path) {
        Ok(md) if md.is_dir() => fs::remove_dir_all(path).map_err(|e| Error::io(path, e)),
        Ok(_) => fs::remove_file(path).map_err(|e| Error::io(path, e)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

pub(crate) fn checkout(
    catalog_path: &Path,
    backend: Arc<dyn Backend>,
    id: &str,
    dest: &Path,
    opts: &CheckoutOptions,
) -> Result<CheckoutSummary> {
    let started = Instant::now();
    let catalog = Catalog::open(catalog_path)?;
    let root_tree = catalog.checkpoint_root(id)?;
    let root = match catalog.tree(&root_tree)?.as_slice() {
        [only] => only.clone(),
        _ => {
            return Err(Error::corrupt(format!("checkpoint {id}: root tree must hold exactly one entry")));
        }
    };
    tree::validate_name(&root.name)?;
    match fs::symlink_metadata(dest) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io(dest, e)),
        Ok(md) if md.is_dir() && root.kind != EntryKind::Dir => {
            // Even with --force, never replace a whole directory by a file: that is almost surely a typo.
            return Err(Error::InvalidInput(format!(
                "{} is a directory, but the checkpoint holds a {}: give the path it should have, e.g. {}",
                dest.display(),
                if root.kind == EntryKind::File { "file" } else { "symlink" },
                dest.join(OsStr::from_bytes(&root.name)).display()
            )));
        }
        Ok(md) => {
            let empty_dir = md.is_dir() && fs::read_dir(dest).map_err(|e| Error::io(dest, e))?.next().is_none();
            if !(opts.force || (empty_dir && root.kind == EntryKind::Dir)) {
                return Err(Error::DestinationNotEmpty(dest.to_path_buf()));
            }
        }
    }
    let total: u64 =
        catalog
            .connection()
            .query_row("SELECT logical_bytes FROM checkpoints WHERE id = ?1", [id], |r| r.get::<_, i64>(0))?
            as u64;
    opts.progress.start("checkout", Some(total));

    // Twice the cores: workers spend much of their time in the kernel writing pages, often waiting on the
    // file's lock, and measured throughput keeps rising up to about two per core.
    let threads = if opts.threads == 0 {
        2 * std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2)
    } else {
        opts.threads
    };
    let (tx, rx) = bounded::<Job>(threads * 2);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let abort = AtomicBool::new(false);
    let mut summary = CheckoutSummary { id: id.to_string(), ..Default::default() };

    let walked = std::thread::scope(|s| {
        for _ in 0..threads {
            let rx = rx.clone();
            let (backend, first_error, abort) = (backend.clone(), &first_error, &abort);
            let progress = opts.progress.clone();
            s.spawn(move || {
                if let Err(e) = worker(catalog_path, backend, rx, &*progress, abort) {
                    abort.store(true, Ordering::SeqCst);
                    first_error.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                }
            });
        }
        drop(rx);
        let r = walk(&catalog, &root, dest, &tx, &abort, opts, &mut summary);
        drop(tx);
        r
    });
    if let Some(e) = first_error.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    walked?;
    apply_dir_metadata(&catalog, &root, dest)?;
    summary.seconds = started.elapsed().as_secs_f64();
    opts.progress.finish();
    Ok(summary)
}

fn worker(
    catalog_path: &Path,
    backend: Arc<dyn Backend>,
    jobs: Receiver<Job>,
    progress: &dyn Progress,
    abort: &AtomicBool,
) -> Result<()> {
    let catalog = Catalog::open(catalog_path)?;
    let mut reader = ChunkReader::new(backend)?;
    let mut offsets = Vec::new();
    for job in jobs {
        let task = &job.task;
        if abort.load(Ordering::Relaxed) || task.failed.load(Ordering::Relaxed) {
            task.fail();
            continue;
        }
        offsets.clear();
        let mut at = job.offset;
        for r in &job.refs {
            offsets.push(at);
            at += r.len as u64;
        }
        let written = reader.read_chunks(&catalog, &job.refs, |i, data| {
            // The file was extended to its full size up front: skipping zeros leaves holes, so sparse
            // files come back sparse.
            if !is_zero(data) {
                task.file.write_all_at(data, offsets[i]).map_err(|e| Error::io(&task.dest, e))?;
            }
            progress.bytes(data.len() as u64);
            Ok(())
        });
        if let Err(e) = written.and_then(|()| task.release()) {
            task.fail();
            return Err(file_error(&task.rel, e));
        }
    }
    Ok(())
}

/// Walks the checkpoint's trees depth first, creating directories and symlinks and queueing file batches.
fn walk(
    catalog: &Catalog,
    root: &Entry,
    dest: &Path,
    tx: &crossbeam_channel::Sender<Job>,
    abort: &AtomicBool,
    opts: &CheckoutOptions,
    summary: &mut CheckoutSummary,
) -> Result<()> {
    let mut stack: Vec<(Entry, PathBuf, PathBuf)> =
        vec![(root.clone(), dest.to_path_buf(), PathBuf::from(OsStr::from_bytes(&root.name)))];
    while let Some((entry, path, rel)) = stack.pop() {
        if abort.load(Ordering::Relaxed) {
            return Ok(());
        }
        match entry.kind {
            EntryKind::Dir => {
                match fs::symlink_metadata(&path) {
                    Ok(md) if md.is_dir() => {}
                    Ok(_) => {
                        clear(&path)?;
                        create_dir(&path)?;
                    }
                    Err(_) => create_dir(&path)?,
                }
                summary.dirs += 1;
                let tree_id = entry.object()?.expect("dir has a tree");
                let children = catalog.tree(&tree_id)?;
                for child in children.into_iter().rev() {
                    tree::validate_name(&child.name)?;
                    let name = OsStr::from_bytes(&child.name);
                    let (p, r) = (path.join(name), rel.join(name));
                    stack.push((child, p, r));
                }
            }
            EntryKind::Symlink => {
                clear(&path)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&entry.target), &path).map_err(|e| Error::io(&path, e))?;
                let t = filetime::FileTime::from_system_time(mtime(entry.mtime_ns));
                filetime::set_symlink_file_times(&path, t, t).map_err(|e| Error::io(&path, e))?;
                summary.symlinks += 1;
            }
            EntryKind::File => {
                summary.files += 1;
                summary.bytes += entry.size;
                opts.progress.file(&rel);
                file(catalog, &entry, &path, rel, tx)?;
            }
        }
    }
    Ok(())
}

fn create_dir(path: &Path) -> Result<()> {
    fs::DirBuilder::new().mode(0o700).create(path).map_err(|e| Error::io(path, e))
}

fn file(
    catalog: &Catalog,
    entry: &Entry,
    dest: &Path,
    rel: PathBuf,
    tx: &crossbeam_channel::Sender<Job>,
) -> Result<()> {
    let content = entry.object()?.expect("file has content");
    let (size, segment_ids) = catalog.content(&content)?;
    if size != entry.size {
        return Err(Error::corrupt(format!(
            "{}: content size {size} differs from the entry's {}",
            rel.display(),
            entry.size
        )));
    }
    if fs::symlink_metadata(dest).is_ok_and(|m| m.is_dir()) {
        clear(dest)?;
    }
    let dir = dest.parent().unwrap_or(Path::new("."));
    let temp = temp_path(dir);
    let f = OpenOptions::new().write(true).create_new(true).mode(0o600).open(&temp).map_err(|e| Error::io(&temp, e))?;
    f.set_len(size).map_err(|e| Error::io(&temp, e))?;
    let task = Arc::new(FileTask {
        file: f,
        temp,
        dest: dest.to_path_buf(),
        rel,
        mode: entry.mode,
        mtime_ns: entry.mtime_ns,
        remaining: AtomicUsize::new(1),
        failed: AtomicBool::new(false),
        placed: AtomicBool::new(false),
    });
    let mut offset = 0u64;
    let mut batch = Vec::new();
    let mut batch_start = 0u64;
    let send = |refs: Vec<ChunkRef>, at: u64| -> Result<()> {
        task.remaining.fetch_add(1, Ordering::AcqRel);
        tx.send(Job { task: task.clone(), offset: at, refs })
            .map_err(|_| Error::Internal("checkout workers stopped".into()))
    };
    for seg in segment_ids.chunks_exact(ObjectId::LEN) {
        let seg = ObjectId::from_slice(seg).expect("32 bytes");
        for r in tree::decode_segment(&catalog.segment(&seg)?)? {
            batch.push(r);
            offset += r.len as u64;
            if offset - batch_start >= BATCH_BYTES {
                send(std::mem::take(&mut batch), batch_start)?;
                batch_start = offset;
            }
        }
    }
    if !batch.is_empty() {
        send(batch, batch_start)?;
    }
    if offset != size {
        task.fail();
        return Err(Error::corrupt(format!("{}: chunks add up to {offset} bytes, not {size}", task.rel.display())));
    }
    task.release().map_err(|e| file_error(&task.rel, e))
}

/// Sets directory modes and mtimes, children before parents (post-order), once all files are in place.
fn apply_dir_metadata(catalog: &Catalog, root: &Entry, dest: &Path) -> Result<()> {
    if root.kind != EntryKind::Dir {
        return Ok(());
    }
    // (entry, path, children expanded yet?)
    let mut stack = vec![(root.clone(), dest.to_path_buf(), false)];
    while let Some((entry, path, expanded)) = stack.pop() {
        if expanded {
            let t = filetime::FileTime::from_system_time(mtime(entry.mtime_ns));
            // The mtime first: setting it opens the directory, which its final mode may forbid.
            filetime::set_file_mtime(&path, t).map_err(|e| Error::io(&path, e))?;
            fs::set_permissions(&path, fs::Permissions::from_mode(entry.mode)).map_err(|e| Error::io(&path, e))?;
            continue;
        }
        let tree_id = entry.object()?.expect("dir has a tree");
        stack.push((entry, path.clone(), true));
        for child in catalog.tree(&tree_id)? {
            if child.kind == EntryKind::Dir {
                let p = path.join(OsStr::from_bytes(&child.name));
                stack.push((child, p, false));
            }
        }
    }
    Ok(())
}
